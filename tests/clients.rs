//! Real clients against a running server: the official `openai` Python package, Hugging Face's
//! `InferenceClient` (text-embeddings-inference's client), schemathesis against /openapi.json,
//! and the page at / in headless Chromium (selenium). The tools are installed by
//! `scripts/test-deps.sh`, which `make test` runs first.

mod support;

use std::path::PathBuf;
use std::process::Command;

use support::*;

fn python() -> PathBuf {
    let venv = project_dir().join("target/pyenv/bin/python");
    assert!(
        venv.exists(),
        "{} missing: run scripts/test-deps.sh (make test does)",
        venv.display()
    );
    venv
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{what}: {}", stdout.trim_end());
    assert!(out.status.success(), "{what} failed:\n{stdout}\n{stderr}");
}

fn base_url(server: &Server) -> String {
    format!("http://127.0.0.1:{}", server.port)
}

#[test]
fn the_official_openai_client_gets_the_reference_embeddings() {
    let server = Server::start(&config("workers = 2"), 2);
    let reference = reference_path();
    run(
        Command::new(python())
            .arg(project_dir().join("tests/clients/openai_client.py"))
            .arg(base_url(&server))
            .arg(reference),
        "openai client",
    );
}

#[test]
fn the_openai_client_with_an_api_key() {
    let server = Server::start(&config("workers = 1\napi_key = \"k3y-for-tests\""), 1);
    run(
        Command::new(python())
            .arg(project_dir().join("tests/clients/openai_client.py"))
            .arg(base_url(&server))
            .arg(reference_path())
            .arg("k3y-for-tests"),
        "openai client with an API key",
    );
}

#[test]
fn huggingface_inference_client_against_the_bare_url_and_base_url() {
    let server = Server::start(&config("workers = 2"), 2);
    run(
        Command::new(python())
            .arg(project_dir().join("tests/clients/hf_client.py"))
            .arg(base_url(&server))
            .arg(reference_path()),
        "huggingface_hub InferenceClient",
    );
    let keyed = Server::start(&config("workers = 1\napi_key = \"hf-k3y\""), 1);
    run(
        Command::new(python())
            .arg(project_dir().join("tests/clients/hf_client.py"))
            .arg(base_url(&keyed))
            .arg(reference_path())
            .arg("hf-k3y"),
        "huggingface_hub InferenceClient with an API key",
    );
}

#[test]
fn schemathesis_finds_nothing_against_the_openapi_document() {
    // /cluster's limits kept small and equal: the document gives one maxItems, which
    // agglomerative's lower limit (a 422 the schema cannot express) would otherwise undercut.
    let server = Server::start(
        &config("workers = 2\n[cluster]\nmax_sentences = 64\nmax_agglomerative_sentences = 64"),
        2,
    );
    let schemathesis = project_dir().join("target/pyenv/bin/schemathesis");
    let pids = server.worker_pids();
    run(
        Command::new(schemathesis)
            .args(["run", &format!("{}/openapi.json", base_url(&server))])
            // Every check: no 5xx, status codes, content types, headers and bodies as
            // documented, invalid data rejected, valid data accepted.
            .args([
                "--checks",
                "all",
                "--max-examples",
                "60",
                "--request-timeout",
                "60",
            ])
            .args(["--generation-database", "none"])
            .env("SCHEMATHESIS_HOOKS", "")
            .current_dir(std::env::temp_dir()),
        "schemathesis",
    );
    assert_eq!(
        server.worker_pids(),
        pids,
        "a worker died under schemathesis"
    );
}

#[test]
fn the_page_clusters_what_a_person_types() {
    let server = Server::start(&config("workers = 1"), 1);
    let screenshot = project_dir().join("target/page-test.png");
    run(
        Command::new(python())
            .arg(project_dir().join("tests/clients/page_test.py"))
            .arg(base_url(&server))
            .arg(&screenshot),
        "page test",
    );
    assert!(screenshot.exists());
}
