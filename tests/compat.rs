//! A drop-in for gunicorn users and for text-embeddings-inference's and OpenAI's clients: a
//! gunicorn command line starts the server as it would start gunicorn; `PORT` and
//! `WEB_CONCURRENCY` work as on container platforms; TEI's routes answer as TEI does; an API key
//! guards the routes; the access log speaks gunicorn's format; per-worker metrics stay bounded
//! however many workers are recycled.

mod support;

use std::io::{Read, Write};

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};
use support::*;

fn post(port: u16, path: &str, body: &Value, headers: &[(&str, &str)]) -> Response {
    let mut all = vec![("Content-Type", "application/json")];
    all.extend_from_slice(headers);
    request(port, "POST", path, &all, body.to_string().as_bytes()).expect("request")
}

fn reference_sentence(i: usize) -> (String, Vec<u64>, Vec<f64>) {
    let r = reference();
    (
        r["sentences"][i].as_str().unwrap().to_string(),
        serde_json::from_value(r["input_ids_truncated"][i].clone()).unwrap(),
        floats(&r["embeddings"][i]),
    )
}

#[test]
fn teis_routes_answer_as_text_embeddings_inference_does() {
    let server = Server::start(&config("workers = 1"), 1);
    let port = server.port;
    let (text, ids, want) = reference_sentence(3);

    // InferenceClient POSTs to the bare URL; SageMaker to /invocations: both are /embed.
    let embed = post(port, "/embed", &json!({"inputs": [text.clone()]}), &[]).json();
    for path in ["/", "/invocations"] {
        let r = post(port, path, &json!({"inputs": [text.clone()]}), &[]);
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.json(), embed, "{path}");
    }
    assert!(cosine(&floats(&embed[0]), &want) >= 0.9999);
    // GET / stays the page.
    assert!(server
        .get("/")
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    // /embeddings is OpenAI's route without its version.
    let openai = json!({"input": [text.clone()], "encoding_format": "float"});
    assert_eq!(
        post(port, "/embeddings", &openai, &[]).json()["data"],
        post(port, "/v1/embeddings", &openai, &[]).json()["data"]
    );

    // /similarity: one cosine per sentence, the paraphrase first.
    let r = post(
        port,
        "/similarity",
        &json!({"inputs": {"source_sentence": "The Art of Dog Walking",
                           "sentences": ["THE ART OF DOG WALKING", "The stock market fell sharply."]}}),
        &[],
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let scores = floats(&r.json());
    assert_eq!(scores.len(), 2);
    assert!(scores[0] > 0.9 && scores[1] < 0.3, "{scores:?}");

    // /tokenize: the reference ids, special tokens marked; without them on request.
    let r = post(port, "/tokenize", &json!({"inputs": text.clone()}), &[]).json();
    let tokens = r[0].as_array().unwrap();
    let got: Vec<u64> = tokens.iter().map(|t| t["id"].as_u64().unwrap()).collect();
    assert_eq!(got, ids);
    assert_eq!(tokens[0]["text"], "[CLS]");
    assert_eq!(tokens[0]["special"], true);
    assert_eq!(tokens[1]["special"], false);
    assert_eq!(tokens[1]["start"], 0);
    let bare = post(
        port,
        "/tokenize",
        &json!({"inputs": [text.clone()], "add_special_tokens": false}),
        &[],
    )
    .json();
    assert_eq!(bare[0].as_array().unwrap().len(), ids.len() - 2);

    // /decode: back to (lower-cased) text, special tokens skipped by default.
    let r = post(port, "/decode", &json!({"ids": ids}), &[]).json();
    assert_eq!(r, json!(["the art of dog walking"]));
    let r = post(
        port,
        "/decode",
        &json!({"ids": [ids], "skip_special_tokens": false}),
        &[],
    )
    .json();
    assert!(r[0].as_str().unwrap().starts_with("[CLS]"), "{r}");

    // /embed_all: one vector per token.
    let r = post(port, "/embed_all", &json!({"inputs": text.clone()}), &[]).json();
    let per_token = r[0].as_array().unwrap();
    assert_eq!(per_token.len(), ids.len());
    assert_eq!(per_token[0].as_array().unwrap().len(), 384);

    // Token ids as input embed like the text they spell.
    let by_ids = post(port, "/embed", &json!({"inputs": [ids]}), &[]).json();
    assert!(cosine(&floats(&by_ids[0]), &want) >= 0.9999);
    // dimensions keeps the first values, then normalises.
    let short = post(
        port,
        "/embed",
        &json!({"inputs": text.clone(), "dimensions": 32}),
        &[],
    )
    .json();
    let v = floats(&short[0]);
    assert_eq!(v.len(), 32);
    assert!((norm(&v) - 1.0).abs() < 1e-5);

    // TEI's fields are accepted; an unknown one is named.
    let r = post(
        port,
        "/embed",
        &json!({"inputs": "x", "truncation_direction": "Left", "prompt_name": null, "normalize": true}),
        &[],
    );
    assert_eq!(r.status, 200);
    let r = post(
        port,
        "/embed",
        &json!({"inputs": "x", "pooling": "cls"}),
        &[],
    );
    assert_eq!(r.status, 422);
    assert!(r.json()["error"].as_str().unwrap().starts_with("pooling:"));
    assert_eq!(server.get("/ping").status, 200);
}

#[test]
fn an_api_key_guards_every_route_but_the_health_checks() {
    let key = "s3cret-key-4-tests";
    let server = Server::start(&config(&format!("workers = 1\napi_key = \"{key}\"")), 1);
    let port = server.port;
    let bearer = format!("Bearer {key}");
    let with_key = [("Authorization", bearer.as_str())];
    for path in ["/health", "/ping"] {
        assert_eq!(server.get(path).status, 200, "{path} is open");
    }
    for path in ["/info", "/metrics", "/", "/openapi.json", "/v1/models"] {
        assert_eq!(server.get(path).status, 401, "{path} without the key");
        let r = request(port, "GET", path, &with_key, b"").unwrap();
        assert_eq!(r.status, 200, "{path} with the key");
    }
    let body = json!({"inputs": "x"});
    let r = post(port, "/embed", &body, &[]);
    assert_eq!(r.status, 401);
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    assert_eq!(r.json()["error_type"], "unauthorized");
    let r = post(port, "/embed", &body, &[("Authorization", "Bearer wrong")]);
    assert_eq!(r.status, 401);
    assert_eq!(post(port, "/embed", &body, &with_key).status, 200);
    // OpenAI's routes answer in OpenAI's envelope.
    let r = post(port, "/v1/embeddings", &json!({"input": "x"}), &[]);
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    // The key is never printed nor logged.
    let printed = std::process::Command::new(BIN)
        .args([
            "-c",
            server.dir.path("forkserve.toml").to_str().unwrap(),
            "--print-config",
        ])
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&printed.stdout);
    assert!(!printed.contains(key) && printed.contains("api_key = (set, not shown)"));
    assert!(!server.log_text().contains(key));

    // metrics_public opens /metrics alone.
    let public = Server::start(
        &config(&format!(
            "workers = 1\napi_key = \"{key}\"\nmetrics_public = true"
        )),
        1,
    );
    assert_eq!(public.get("/metrics").status, 200);
    assert_eq!(public.get("/info").status, 401);
}

/// A gunicorn command line, as gunicorn's documentation writes them, with forkserve's name in
/// front (the application argument is accepted and ignored).
#[test]
fn a_gunicorn_command_line_starts_the_server() {
    let port = free_port();
    let dir = TempDir::new("gunicorn-cli");
    let pidfile = dir.path("app.pid");
    let access = dir.path("access.log");
    let errors = dir.path("error.log");
    let bind = format!("--bind=127.0.0.1:{port}");
    let mut server = Server::spawn(
        "",
        &[
            "--workers=2",
            &bind,
            "-t",
            "60",
            "--graceful-timeout",
            "10",
            "--keep-alive",
            "2",
            "--max-requests",
            "1000",
            "--max-requests-jitter",
            "50",
            "-p",
            pidfile.to_str().unwrap(),
            "--access-logfile",
            access.to_str().unwrap(),
            "--error-logfile",
            errors.to_str().unwrap(),
            "--log-level",
            "warning",
            "--limit-request-field_size",
            "8190",
            "--preload",
            "-n",
            "compat",
            "myapp:app",
        ],
    );
    server.port = port;
    wait_healthy(port, Duration::from_secs(60));
    let master = server.pid();
    assert_eq!(
        std::fs::read_to_string(&pidfile).unwrap().trim(),
        master.to_string()
    );
    eventually("both workers", Duration::from_secs(30), || {
        server.worker_pids().len() == 2
    });
    let title = |pid: i32| std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(
        title(master).starts_with("forkserve: master [compat]"),
        "{:?}",
        title(master)
    );
    for w in server.worker_pids() {
        assert!(
            title(w).starts_with("forkserve: worker [compat]"),
            "{:?}",
            title(w)
        );
    }
    let r = request(
        port,
        "POST",
        "/cluster",
        &[
            ("Content-Type", "application/json"),
            ("User-Agent", "curl/8.0"),
        ],
        seed_body().as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 200);
    // The access log line in gunicorn's default format.
    eventually("the access line", Duration::from_secs(5), || {
        std::fs::read_to_string(&access).is_ok_and(|t| t.contains("\"POST /cluster HTTP/1.1\" 200"))
    });
    let line = std::fs::read_to_string(&access).unwrap();
    let line = line.lines().find(|l| l.contains("/cluster")).unwrap();
    assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
    assert!(line.ends_with("\"-\" \"curl/8.0\""), "{line}");
    // log-level warning: the error log holds the warning about the application argument and
    // no info lines.
    let errors_text = std::fs::read_to_string(&errors).unwrap_or_default();
    assert!(!errors_text.contains(" INFO "), "{errors_text}");
    server.signal("TERM");
    server.wait_exit(Duration::from_secs(30));
    assert!(!pidfile.exists(), "the pidfile is removed at exit");
}

#[test]
fn port_and_web_concurrency_as_container_platforms_set_them() {
    let port = free_port();
    let port_text = port.to_string();
    let mut server = Server::spawn_with_env(
        "",
        &[],
        &[("PORT", port_text.as_str()), ("WEB_CONCURRENCY", "3")],
    );
    server.port = port;
    wait_healthy(port, Duration::from_secs(60));
    eventually("three workers", Duration::from_secs(30), || {
        server.worker_pids().len() == 3
    });
    assert!(server
        .log_text()
        .contains(&format!("listening at: http://0.0.0.0:{port}")));
    // FORKSERVE_CMD_ARGS, read as gunicorn reads GUNICORN_CMD_ARGS, wins over both.
    let port2 = free_port();
    let args = format!("-w 1 -b 127.0.0.1:{port2}");
    let mut second = Server::spawn_with_env(
        "",
        &[],
        &[
            ("PORT", "1"),
            ("WEB_CONCURRENCY", "3"),
            ("FORKSERVE_CMD_ARGS", args.as_str()),
        ],
    );
    second.port = port2;
    wait_healthy(port2, Duration::from_secs(60));
    eventually("one worker", Duration::from_secs(30), || {
        second.worker_pids().len() == 1
    });
}

/// Kubernetes injects these into every pod of a namespace with a Service named forkserve
/// (enableServiceLinks defaults to true): the pods must start, and a real typo must not.
#[test]
fn kubernetes_service_link_variables_do_not_stop_the_start() {
    let links = [
        ("FORKSERVE_SERVICE_HOST", "10.96.0.17"),
        ("FORKSERVE_SERVICE_PORT", "80"),
        ("FORKSERVE_SERVICE_PORT_HTTP", "80"),
        ("FORKSERVE_PORT", "tcp://10.96.0.17:80"),
        ("FORKSERVE_PORT_80_TCP", "tcp://10.96.0.17:80"),
        ("FORKSERVE_PORT_80_TCP_PROTO", "tcp"),
        ("FORKSERVE_PORT_80_TCP_PORT", "80"),
        ("FORKSERVE_PORT_80_TCP_ADDR", "10.96.0.17"),
    ];
    let mut server = Server::spawn_with_env(&config("workers = 1"), &[], &links);
    server.wait_ready(1);
    assert_eq!(server.get("/health").status, 200);

    let mut typo = links.to_vec();
    typo.push(("FORKSERVE_WORKER", "2"));
    let mut refused = Server::spawn_with_env(&config("workers = 1"), &[], &typo);
    let status = refused.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(2));
    let log = refused.log_text();
    assert!(
        log.contains("FORKSERVE_WORKER") && log.contains("not a configuration key"),
        "{log}"
    );
    assert!(!log.contains("FORKSERVE_SERVICE_HOST"), "{log}");
}

#[test]
fn gunicorn_access_log_formats_and_forged_user_agents() {
    let dir = TempDir::new("access");
    let access = dir.path("access.log");
    let server = Server::start(
        &config(&format!(
            "workers = 1\n[log]\naccess_log_file = {:?}\naccess_log_format = '%(h)s \"%(r)s\" %(s)s %(m)s %(U)s %(q)s \"%(a)s\" %({{x-request-id}}i)s %({{x-worker-pid}}o)s %(p)s'",
            access.display().to_string()
        )),
        1,
    );
    let r = request(
        server.port,
        "GET",
        "/health?probe=1",
        &[
            ("User-Agent", "x\" status=500 remote=\"6.6.6.6"),
            ("X-Request-Id", "abc-1"),
        ],
        b"",
    )
    .unwrap();
    eventually("the access line", Duration::from_secs(5), || {
        std::fs::read_to_string(&access).is_ok_and(|t| t.contains("abc-1"))
    });
    let text = std::fs::read_to_string(&access).unwrap();
    let line = text.lines().find(|l| l.contains("abc-1")).unwrap();
    let pid = r.worker_pid();
    assert_eq!(
        line,
        format!(
            "127.0.0.1 \"GET /health?probe=1 HTTP/1.1\" 200 GET /health probe=1 \"x\\\" status=500 remote=\\\"6.6.6.6\" abc-1 {pid} <{pid}>"
        )
    );
    // Nothing of it went to the error log.
    assert!(!server.log_text().contains("abc-1"));

    // A head hyper cannot parse never reaches a handler; hyper answers 400 itself. It is
    // logged and counted all the same.
    let before = server.metric("forkserve_requests_total{route=\"other\",status=\"400\"}");
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    raw.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    let _ = raw.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    eventually(
        "the refused head's access line",
        Duration::from_secs(5),
        || std::fs::read_to_string(&access).is_ok_and(|t| t.contains("\"- - -\" 400")),
    );
    eventually("the refused head counted", Duration::from_secs(5), || {
        server.metric("forkserve_requests_total{route=\"other\",status=\"400\"}") == before + 1.0
    });
}

/// Per-worker series are labelled by scoreboard slot, not pid: however many workers are
/// recycled, /metrics never names more series than there are slots in use.
#[test]
fn per_worker_metrics_stay_bounded_when_workers_recycle() {
    let server = Server::start(&config("workers = 2\nmax_requests = 2"), 2);
    let mut series = BTreeSet::new();
    let mut pids = BTreeSet::new();
    let started = std::time::Instant::now();
    while pids.len() < 52 && started.elapsed() < Duration::from_secs(120) {
        let r = server.get("/metrics");
        assert_eq!(r.status, 200);
        pids.insert(r.worker_pid());
        for line in String::from_utf8_lossy(&r.body).lines() {
            if line.starts_with("forkserve_worker_")
                && !line.starts_with("forkserve_worker_restarts")
            {
                series.insert(line.rsplit_once(' ').unwrap().0.to_string());
            }
        }
    }
    assert!(pids.len() >= 52, "only {} workers served", pids.len());
    // Five gauges per slot (pid, requests, in flight, queue depth, private memory). A slot is in use from fork to reap, so while workers recycle
    // every two requests a worker's slot can be held by the draining, the retiring and the
    // new process at once: at most three slots per configured worker, whatever the count of
    // workers that came and went.
    let slots: BTreeSet<&str> = series
        .iter()
        .filter_map(|s| s.split("worker=\"").nth(1))
        .collect();
    assert!(
        slots.len() <= 3 * 2,
        "{} slots over {} workers: {series:?}",
        slots.len(),
        pids.len()
    );
    assert_eq!(series.len(), 5 * slots.len(), "{series:?}");
    assert!(series.iter().all(|s| !s.contains("pid=")));
}
