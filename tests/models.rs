//! Serve the model you trained: any sentence-transformers directory, embedded as
//! sentence-transformers' `encode` embeds it, or refused with the file, field and value.
//!
//! The small models of `tests/data/models/` (made by `scripts/make-model-fixtures.py`, with
//! sentence-transformers' own output beside each) cover every pooling mode, Dense modules with
//! and without an activation, no Normalize, prompts with a default prompt and
//! `include_prompt: false`, both `modules.json` layouts, a plain transformers directory, MPNet,
//! XLM-RoBERTa and RoBERTa encoders, and tokenizers that transformers rebuilds from
//! `tokenizer_config.json`. Each is served by the real binary; `/v1/embeddings` must return
//! `encode`'s vectors (cos >= 0.9999, norms within 1e-3), batched and one sentence at a time,
//! with each prompt; the real all-mpnet-base-v2 is held to its own reference the same way.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use forkserve_worker::embedder::embed_all;
use forkserve_worker::model::{Backend, Precision};
use forkserve_worker::{Embedder, SentenceEncoder};
use serde_json::{json, Value};
use support::*;

const MIN_COSINE: f64 = 0.9999;
const MAX_NORM_DIFF: f64 = 1e-3;

fn fixtures_dir() -> PathBuf {
    project_dir().join("tests/data/models")
}

/// Every fixture model: its name, directory and recorded reference.
fn fixtures() -> Vec<(String, PathBuf, Value)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(fixtures_dir()).expect("tests/data/models") {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let dir = fixtures_dir().join(&name);
        if path.extension().is_some_and(|e| e == "json") && dir.is_dir() {
            let reference = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            out.push((name, dir, reference));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(out.len() >= 10, "only {} fixture models", out.len());
    out
}

fn strings(v: &Value) -> Vec<String> {
    serde_json::from_value(v.clone()).expect("a list of strings")
}

/// The worst agreement of `got` with `want`, vector by vector: (min cosine, max norm
/// difference), and the failures past the thresholds.
fn compare(what: &str, got: &[Vec<f64>], want: &[Vec<f64>]) -> (f64, f64, Vec<String>) {
    let mut failures = Vec::new();
    if got.len() != want.len() {
        failures.push(format!(
            "{what}: {} vectors, expected {}",
            got.len(),
            want.len()
        ));
        return (0.0, f64::INFINITY, failures);
    }
    let (mut min_cos, mut max_norm) = (1.0f64, 0.0f64);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if g.len() != w.len() {
            failures.push(format!(
                "{what}[{i}]: dimension {}, expected {}",
                g.len(),
                w.len()
            ));
            continue;
        }
        // Two zero vectors agree (a prompt that covers a whole sentence can pool to zeros).
        let c = if norm(g) == 0.0 && norm(w) == 0.0 {
            1.0
        } else {
            cosine(g, w)
        };
        let d = (norm(g) - norm(w)).abs();
        min_cos = min_cos.min(c);
        max_norm = max_norm.max(d);
        if !(c >= MIN_COSINE && d <= MAX_NORM_DIFF) {
            failures.push(format!(
                "{what}[{i}]: cosine {c:.6}, norms {:.5} vs {:.5}",
                norm(g),
                norm(w)
            ));
        }
    }
    (min_cos, max_norm, failures)
}

/// `/v1/embeddings` of these sentences, as vectors.
fn openai(server: &Server, sentences: &[String], extra: Value) -> Vec<Vec<f64>> {
    let mut body = json!({"input": sentences, "encoding_format": "float"});
    if let (Value::Object(b), Value::Object(e)) = (&mut body, extra) {
        b.extend(e);
    }
    let r = server.post_json("/v1/embeddings", &body.to_string());
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| floats(&d["embedding"]))
        .collect()
}

/// A server on `dir` that takes the large sentence sets in one request.
fn serve(dir: &Path) -> Server {
    Server::start(
        &config_for(
            dir,
            "workers = 1\nmax_sentences = 4096\nmax_body_bytes = 16777216",
        ),
        1,
    )
}

/// Check one model against its reference through the real binary. Returns (min cosine, max
/// norm difference) over every comparison, and the failures.
fn check_served(name: &str, dir: &Path, reference: &Value) -> (f64, f64, Vec<String>) {
    let sentences = strings(&reference["sentences"]);
    let want = vectors(&reference["embeddings"]);
    let server = serve(dir);
    let mut results = Vec::new();

    // What /info says is what sentence-transformers says of the model.
    let info = server.get("/info").json();
    let mut failures = Vec::new();
    for (key, ours) in [
        ("dimension", "dimension"),
        ("max_seq_length", "max_input_length"),
        ("similarity_fn_name", "similarity_fn_name"),
        ("normalized", "normalized"),
        ("default_prompt_name", "default_prompt_name"),
        ("prompts", "prompts"),
    ] {
        if !reference[key].is_null() && reference[key] != info[ours] {
            failures.push(format!(
                "{name}: /info {ours} = {}, sentence-transformers says {}",
                info[ours], reference[key]
            ));
        }
    }

    // Batched, as one request, then one sentence per request.
    results.push(compare(
        &format!("{name} batched"),
        &openai(&server, &sentences, json!({})),
        &want,
    ));
    let alone: Vec<Vec<f64>> = sentences
        .iter()
        .flat_map(|s| openai(&server, std::slice::from_ref(s), json!({})))
        .collect();
    results.push(compare(&format!("{name} one at a time"), &alone, &want));

    // Each prompt by name, on both embedding routes; and no prompt at all.
    if let Some(by_prompt) = reference["embeddings_by_prompt"].as_object() {
        for (prompt, vectors_of) in by_prompt {
            let want = vectors(vectors_of);
            let got = openai(&server, &sentences, json!({"prompt_name": prompt}));
            results.push(compare(&format!("{name} prompt {prompt}"), &got, &want));
            // TEI's `normalize` scales to unit length: encode's vectors are unit length exactly
            // when the model ends with Normalize.
            let normalize = reference["normalized"].as_bool().unwrap_or(false);
            let r = server.post_json(
                "/embed",
                &json!({"inputs": sentences, "prompt_name": prompt, "normalize": normalize})
                    .to_string(),
            );
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
            let got = vectors(&r.json());
            results.push(compare(
                &format!("{name} /embed prompt {prompt}"),
                &got,
                &want,
            ));
        }
    }

    // Thousands of sentences in one request, sampled.
    if let Some(many) = reference["many"].as_object() {
        let file = fixtures_dir().join(many["sentences_file"].as_str().unwrap());
        let all = strings(&serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap());
        let got = openai(&server, &all, json!({}));
        let indices: Vec<usize> = serde_json::from_value(many["indices"].clone()).unwrap();
        let sampled: Vec<Vec<f64>> = indices.iter().map(|&i| got[i].clone()).collect();
        results.push(compare(
            &format!("{name} {} sentences in one request", all.len()),
            &sampled,
            &vectors(&many["embeddings"]),
        ));
    }

    let min_cos = results.iter().map(|r| r.0).fold(1.0, f64::min);
    let max_norm = results.iter().map(|r| r.1).fold(0.0, f64::max);
    failures.extend(results.into_iter().flat_map(|r| r.2));
    (min_cos, max_norm, failures)
}

#[test]
fn every_model_layout_is_served_as_sentence_transformers_encodes_it() {
    let mut failures = Vec::new();
    eprintln!("model: min cosine, max |norm difference| (batched, alone, prompts, large set)");
    for (name, dir, reference) in fixtures() {
        let (min_cos, max_norm, f) = check_served(&name, &dir, &reference);
        eprintln!("  {name}: {min_cos:.7}, {max_norm:.2e}");
        failures.extend(f);
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn all_mpnet_base_v2_is_served_as_sentence_transformers_encodes_it() {
    let path = project_dir().join("tests/data/reference/all-mpnet-base-v2.json");
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let (min_cos, max_norm, failures) = check_served("all-mpnet-base-v2", &mpnet_dir(), &reference);
    eprintln!("all-mpnet-base-v2: min cosine {min_cos:.7}, max |norm difference| {max_norm:.2e}");
    assert!(failures.is_empty(), "{failures:#?}");
}

/// In-process, both backends where candle-transformers has the architecture: the token ids
/// sentence-transformers fed its transformer, and the vectors.
#[test]
fn token_ids_and_both_backends_match() {
    let mut failures = Vec::new();
    for (name, dir, reference) in fixtures() {
        let sentences = strings(&reference["sentences"]);
        let want_ids: Vec<Vec<u32>> =
            serde_json::from_value(reference["input_ids_truncated"].clone()).unwrap();
        let want = vectors(&reference["embeddings"]);
        let prompt = reference["default_prompt_name"]
            .as_str()
            .and_then(|p| reference["prompts"][p].as_str())
            .map(str::to_string);
        for backend in [Backend::Fast, Backend::Candle] {
            let model = match SentenceEncoder::load_with(&dir, backend, Precision::F32) {
                Ok(m) => m,
                // candle-transformers has no MPNet: refused, never served otherwise.
                Err(e) if backend == Backend::Candle && e.to_string().contains("no MPNet") => {
                    continue
                }
                Err(e) => panic!("{name} ({backend:?}): {e}"),
            };
            let tokens: Vec<_> = sentences
                .iter()
                .map(|s| model.tokenize(s, prompt.as_deref()).unwrap())
                .collect();
            // The ids the transformer received, the default prompt included.
            for (i, (t, w)) in tokens.iter().zip(&want_ids).enumerate() {
                if &t.ids != w {
                    failures.push(format!(
                        "{name}: token ids of sentence {i}: {:?} vs {w:?}",
                        t.ids
                    ));
                }
            }
            let got = embed_all(&model, &tokens, 8192, model.info().normalized).unwrap();
            let got: Vec<Vec<f64>> = got
                .iter()
                .map(|v| v.iter().map(|x| *x as f64).collect())
                .collect();
            failures.extend(compare(&format!("{name} {backend:?}"), &got, &want).2);
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut value: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut value);
    std::fs::write(path, serde_json::to_string_pretty(&value).unwrap()).unwrap();
}

/// One way a directory asks for something forkserve does not implement.
struct Refusal {
    what: &'static str,
    edit: fn(&Path),
    /// What the message must name: file, field, value.
    names: &'static [&'static str],
}

fn refusals() -> Vec<Refusal> {
    vec![
        Refusal {
            what: "an unknown pooling mode",
            edit: |d| {
                edit_json(&d.join("1_Pooling/config.json"), |v| {
                    v["pooling_mode"] = json!("median")
                })
            },
            names: &["1_Pooling/config.json", "pooling_mode", "\"median\""],
        },
        Refusal {
            what: "a Dense activation forkserve does not implement",
            edit: |d| {
                edit_json(&d.join("modules.json"), |v| {
                    v.as_array_mut().unwrap().insert(
                        2,
                        json!({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}),
                    )
                });
                std::fs::create_dir_all(d.join("2_Dense")).unwrap();
                std::fs::write(
                    d.join("2_Dense/config.json"),
                    r#"{"in_features": 32, "out_features": 8, "bias": true, "activation_function": "torch.nn.modules.activation.Softmax"}"#,
                )
                .unwrap();
            },
            names: &[
                "2_Dense/config.json",
                "activation_function",
                "torch.nn.modules.activation.Softmax",
            ],
        },
        Refusal {
            what: "a module type forkserve does not implement",
            edit: |d| {
                edit_json(&d.join("modules.json"), |v| {
                    v[1]["type"] = json!("sentence_transformers.models.WeightedLayerPooling")
                })
            },
            names: &[
                "modules.json",
                "[1].type",
                "sentence_transformers.models.WeightedLayerPooling",
            ],
        },
        Refusal {
            what: "custom module code",
            edit: |d| {
                edit_json(&d.join("modules.json"), |v| {
                    v[1]["type"] = json!("my_package.pooling.MyPooling")
                })
            },
            names: &["modules.json", "[1].type", "my_package.pooling.MyPooling"],
        },
        Refusal {
            what: "an architecture forkserve does not run",
            edit: |d| {
                edit_json(&d.join("config.json"), |v| {
                    v["model_type"] = json!("distilbert")
                })
            },
            names: &["config.json", "model_type", "\"distilbert\""],
        },
        Refusal {
            what: "relative position embeddings in a BERT",
            edit: |d| {
                edit_json(&d.join("config.json"), |v| {
                    v["position_embedding_type"] = json!("relative_key")
                })
            },
            names: &["config.json", "position_embedding_type", "relative_key"],
        },
        Refusal {
            what: "a feed-forward activation forkserve does not implement",
            edit: |d| {
                edit_json(&d.join("config.json"), |v| {
                    v["hidden_act"] = json!("quick_gelu")
                })
            },
            names: &["config.json", "hidden_act", "quick_gelu"],
        },
        Refusal {
            what: "weights only as a PyTorch pickle",
            edit: |d| {
                std::fs::rename(d.join("model.safetensors"), d.join("pytorch_model.bin")).unwrap()
            },
            names: &["pytorch_model.bin", "safetensors"],
        },
        Refusal {
            what: "a tokenizer class forkserve cannot reproduce",
            edit: |d| {
                edit_json(&d.join("tokenizer_config.json"), |v| {
                    v["tokenizer_class"] = json!("BertJapaneseTokenizer")
                })
            },
            names: &["tokenizer", "tokenizer_class", "BertJapanese"],
        },
        Refusal {
            what: "a default prompt that is not one of the prompts",
            edit: |d| {
                std::fs::write(
                    d.join("config_sentence_transformers.json"),
                    r#"{"prompts": {"query": "query: "}, "default_prompt_name": "passage"}"#,
                )
                .unwrap()
            },
            names: &[
                "config_sentence_transformers.json",
                "default_prompt_name",
                "\"passage\"",
            ],
        },
        Refusal {
            what: "a cross-encoder",
            edit: |d| {
                std::fs::write(
                    d.join("config_sentence_transformers.json"),
                    r#"{"model_type": "CrossEncoder"}"#,
                )
                .unwrap()
            },
            names: &[
                "config_sentence_transformers.json",
                "model_type",
                "CrossEncoder",
            ],
        },
    ]
}

#[test]
fn a_directory_forkserve_cannot_serve_is_refused_naming_file_field_and_value() {
    let base = fixtures_dir().join("bert-cls");
    let mut failures = Vec::new();
    for refusal in refusals() {
        let scratch = TempDir::new("refused");
        let dir = scratch.path("model");
        copy_dir(&base, &dir);
        (refusal.edit)(&dir);
        let mut server = Server::spawn(&config_for(&dir, "workers = 1"), &[]);
        let status = server.wait_exit(Duration::from_secs(30));
        let log = server.log_text();
        if status.code() != Some(2) {
            failures.push(format!(
                "{}: exit {status:?}, expected 2; log:\n{log}",
                refusal.what
            ));
        }
        for name in refusal.names {
            if !log.contains(name) {
                failures.push(format!(
                    "{}: the message does not name {name:?}:\n{log}",
                    refusal.what
                ));
            }
        }
        // --check-config reads the same files and refuses the same way.
        let check = std::process::Command::new(BIN)
            .args(["--check-config", "-c"])
            .arg(server.dir.path("forkserve.toml"))
            .output()
            .unwrap();
        if check.status.code() != Some(2) {
            failures.push(format!(
                "{}: --check-config gave {:?}",
                refusal.what, check.status
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn a_reload_to_a_model_it_cannot_serve_keeps_the_old_one() {
    let scratch = TempDir::new("reload-refused");
    let dir = scratch.path("model");
    copy_dir(&fixtures_dir().join("bert-cls"), &dir);
    let server = Server::start(&config_for(&dir, "workers = 1"), 1);
    let before = server.post_json("/v1/embeddings", r#"{"input": ["a reload test"]}"#);
    assert_eq!(before.status, 200);
    let pids = server.worker_pids();

    edit_json(&dir.join("1_Pooling/config.json"), |v| {
        v["pooling_mode"] = json!("median")
    });
    server.signal("HUP");
    server.wait_log("the refused reload", Duration::from_secs(30), |t| {
        t.contains("reload failed") && t.contains("pooling_mode")
    });
    let after = server.post_json("/v1/embeddings", r#"{"input": ["a reload test"]}"#);
    assert_eq!(after.status, 200);
    assert_eq!(
        after.json()["data"],
        before.json()["data"],
        "the old model serves on"
    );
    assert_eq!(server.worker_pids(), pids, "the workers were not rolled");
}

#[test]
fn an_unknown_prompt_name_is_an_error_that_lists_the_prompts() {
    let server = serve(&fixtures_dir().join("bert-prompts"));
    for (path, body) in [
        ("/embed", json!({"inputs": ["x"], "prompt_name": "nope"})),
        (
            "/v1/embeddings",
            json!({"input": ["x"], "prompt_name": "nope"}),
        ),
        (
            "/cluster",
            json!({"sentences": ["x"], "prompt_name": "nope"}),
        ),
    ] {
        let r = server.post_json(path, &body.to_string());
        // OpenAI's route says 400 in OpenAI's envelope, naming the parameter.
        let (status, message) = match path.starts_with("/v1/") {
            true => {
                assert_eq!(r.json()["error"]["param"], "prompt_name");
                (
                    400,
                    r.json()["error"]["message"].as_str().unwrap().to_string(),
                )
            }
            false => (422, r.json()["error"].as_str().unwrap().to_string()),
        };
        assert_eq!(r.status, status, "{path}");
        assert!(
            message.starts_with("prompt_name:")
                && message.contains("query")
                && message.contains("document"),
            "{path}: {message}"
        );
    }
}
