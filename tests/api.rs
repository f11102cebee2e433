//! The API people expect, against the real model: TEI's /embed and OpenAI's /v1/embeddings
//! equal sentence-transformers' reference vectors; /info, /metrics (one view of every worker,
//! surviving recycling), /openapi.json, /docs, /; agglomerative clustering; access logs.

mod support;

use base64::Engine;
use serde_json::{json, Value};
use support::*;

fn reference_vectors() -> (Vec<String>, Vec<Vec<f64>>, Vec<usize>) {
    let r = reference();
    let sentences = serde_json::from_value(r["sentences"].clone()).unwrap();
    let vectors = r["embeddings"]
        .as_array()
        .unwrap()
        .iter()
        .map(floats)
        .collect();
    // What the model saw: the ids after truncation.
    let counts = r["input_ids_truncated"]
        .as_array()
        .unwrap()
        .iter()
        .map(|ids| ids.as_array().unwrap().len())
        .collect();
    (sentences, vectors, counts)
}

#[test]
fn embed_matches_sentence_transformers() {
    let (sentences, want, _) = reference_vectors();
    let server = Server::start(&config("workers = 1"), 1);
    let r = server.post_json("/embed", &json!({"inputs": sentences}).to_string());
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let got: Vec<Vec<f64>> = r.json().as_array().unwrap().iter().map(floats).collect();
    assert_eq!(got.len(), 41);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.len(), 384);
        let c = cosine(g, w);
        assert!(c >= 0.9999, "sentence {i}: cosine {c}");
        let norm = g.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4);
    }
    // normalize: false gives the pooled vector: same direction, not unit length.
    let r = server.post_json(
        "/embed",
        &json!({"inputs": "The Art of Dog Walking", "normalize": false}).to_string(),
    );
    let raw = floats(&r.json()[0]);
    let norm = raw.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!((norm - 1.0).abs() > 0.01, "norm {norm}");
    assert!(cosine(&raw, &want[3]) >= 0.9999);
}

#[test]
fn truncate_false_refuses_over_long_input_with_its_token_count() {
    let (sentences, _, _) = reference_vectors();
    let r = reference();
    let untruncated: Vec<usize> = serde_json::from_value(r["token_counts"].clone()).unwrap();
    let long = untruncated.iter().position(|&n| n > 256).unwrap();
    let server = Server::start(&config("workers = 1"), 1);
    let body = json!({"inputs": ["short", sentences[long]], "truncate": false});
    let r = server.post_json("/embed", &body.to_string());
    assert_eq!(r.status, 422);
    let message = r.json()["error"].as_str().unwrap().to_string();
    assert!(message.starts_with("inputs[1]"), "{message}");
    assert!(
        message.contains(&format!("{} tokens", untruncated[long])),
        "{message}"
    );
    assert!(message.contains("256"), "{message}");
    // By default it is truncated like sentence-transformers does.
    let body = json!({"inputs": [sentences[long]]});
    assert_eq!(server.post_json("/embed", &body.to_string()).status, 200);
}

#[test]
fn openai_embeddings_as_floats_and_base64_with_usage() {
    let (sentences, want, counts) = reference_vectors();
    let server = Server::start(&config("workers = 1"), 1);
    for format in ["float", "base64"] {
        let body =
            json!({"input": sentences, "model": "all-MiniLM-L6-v2", "encoding_format": format});
        let r = server.post_json("/v1/embeddings", &body.to_string());
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let body = r.json();
        assert_eq!(body["object"], "list");
        assert_eq!(body["model"], "all-MiniLM-L6-v2");
        let tokens: usize = counts.iter().sum();
        assert_eq!(
            body["usage"],
            json!({"prompt_tokens": tokens, "total_tokens": tokens})
        );
        for (i, item) in body["data"].as_array().unwrap().iter().enumerate() {
            assert_eq!(item["object"], "embedding");
            assert_eq!(item["index"], i);
            let v: Vec<f64> = match format {
                "float" => floats(&item["embedding"]),
                _ => base64::engine::general_purpose::STANDARD
                    .decode(item["embedding"].as_str().unwrap())
                    .unwrap()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64)
                    .collect(),
            };
            assert!(cosine(&v, &want[i]) >= 0.9999, "{format} {i}");
        }
    }
    // The organisation prefix is accepted; another model is not silently served.
    let ok = json!({"input": "x", "model": "sentence-transformers/all-MiniLM-L6-v2"});
    assert_eq!(
        server.post_json("/v1/embeddings", &ok.to_string()).status,
        200
    );
    let wrong = json!({"input": "x", "model": "text-embedding-3-small"});
    let r = server.post_json("/v1/embeddings", &wrong.to_string());
    assert_eq!(r.status, 404);
    // OpenAI's envelope on OpenAI's routes.
    assert_eq!(r.json()["error"]["code"], "model_not_found");
    assert_eq!(r.json()["error"]["param"], "model");
}

#[test]
fn info_openapi_docs_and_page() {
    let server = Server::start(
        &config("workers = 1\nmax_sentences = 100\n[cluster]\nmax_sentences = 300"),
        1,
    );
    let info = server.get("/info").json();
    assert_eq!(info["dimension"], 384);
    assert_eq!(info["max_input_length"], 256);
    assert_eq!(info["max_sentences"], 100);
    assert_eq!(info["model_id"], "all-MiniLM-L6-v2");
    let spec = server.get("/openapi.json").json();
    assert_eq!(spec["openapi"], "3.0.3");
    for path in [
        "/cluster",
        "/embed",
        "/v1/embeddings",
        "/info",
        "/health",
        "/metrics",
        "/docs",
        "/",
    ] {
        assert!(spec["paths"].get(path).is_some(), "{path} not documented");
    }
    // Each route's own limit: /cluster's is cluster.max_sentences.
    assert_eq!(
        spec["components"]["schemas"]["ClusterRequest"]["properties"]["sentences"]["maxItems"],
        300
    );
    assert_eq!(info["cluster_max_sentences"], 300);
    for path in ["/docs", "/"] {
        let r = server.get(path);
        assert_eq!(r.status, 200);
        assert!(r.header("content-type").unwrap().starts_with("text/html"));
        assert!(
            String::from_utf8_lossy(&r.body).contains("<script>"),
            "{path}"
        );
    }
}

#[test]
fn agglomerative_clusters_the_seed() {
    let server = Server::start(&config("workers = 1"), 1);
    let r = server.post_json(
        "/cluster",
        &json!({"sentences": SEED, "algorithm": "agglomerative"}).to_string(),
    );
    assert_eq!(r.status, 200);
    let body = r.json();
    assert_eq!(body["algorithm"], "agglomerative");
    assert_eq!(body["indices"], json!([[0, 1, 2, 3, 4], [5, 6, 7, 8]]));
}

/// Sum of a counter's samples whose labels contain `labels`.
fn metric(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(labels) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn metrics_cover_every_worker_and_survive_recycling() {
    let server = Server::start(&config("workers = 2\nmax_requests = 7"), 2);
    // Fresh connections so the requests spread over both workers and their successors.
    let mut answered_by = std::collections::BTreeSet::new();
    for _ in 0..30 {
        let r = server.post_json("/cluster", &seed_body());
        assert_eq!(r.status, 200);
        answered_by.insert(r.worker_pid());
    }
    assert!(server.post_json("/cluster", "{").status == 400);
    server.wait_log("recycles", std::time::Duration::from_secs(20), |log| {
        log.contains("retired after max_requests")
    });
    // Any worker answers for all: ask several times, the totals agree.
    for _ in 0..4 {
        let text = String::from_utf8(server.get("/metrics").body).unwrap();
        assert_eq!(
            metric(
                &text,
                "forkserve_requests_total",
                "route=\"/cluster\",status=\"200\""
            ),
            30.0,
            "{text}"
        );
        assert_eq!(
            metric(
                &text,
                "forkserve_requests_total",
                "route=\"/cluster\",status=\"400\""
            ),
            1.0
        );
        assert_eq!(
            metric(
                &text,
                "forkserve_request_duration_seconds_count",
                "route=\"/cluster\""
            ),
            31.0
        );
        // Each /cluster request with the 9 seed titles is one forward pass (plus each worker's
        // warm-up pass).
        assert!(metric(&text, "forkserve_inference_batch_size_count", "") >= 30.0);
        assert!(
            metric(
                &text,
                "forkserve_worker_restarts_total",
                "reason=\"max_requests\""
            ) >= 1.0
        );
        assert!(metric(&text, "forkserve_inference_tokens_total", "") >= 30.0 * 60.0);
        // The worker answering is counted, as ready, retiring (past max_requests, serving
        // until its replacement is ready: with max_requests = 7 both workers can be) or
        // draining.
        let serving: f64 = ["ready", "retiring", "draining"]
            .iter()
            .map(|s| metric(&text, "forkserve_workers", &format!("state=\"{s}\"")))
            .sum();
        assert!(serving >= 1.0, "{text}");
        assert!(text.contains("forkserve_worker_private_memory_bytes{worker="));
    }
    assert!(
        answered_by.len() >= 3,
        "recycled workers answered: {answered_by:?}"
    );
}

#[test]
fn access_log_in_json() {
    let server = Server::start(&config("workers = 1\n[log]\nformat = \"json\""), 1);
    let r = request(
        server.port,
        "POST",
        "/cluster?x=1",
        &[
            ("Content-Type", "application/json"),
            ("User-Agent", "forkserve-test"),
            ("Referer", "http://example/"),
        ],
        seed_body().as_bytes(),
    )
    .unwrap();
    assert_eq!(r.status, 200);
    let line = server.wait_log(
        "the access line",
        std::time::Duration::from_secs(5),
        |log| log.contains("forkserve-test"),
    );
    let event: Value = line
        .lines()
        .filter(|l| l.contains("forkserve-test"))
        .map(|l| serde_json::from_str(l).expect("a JSON log line"))
        .next()
        .unwrap();
    let fields = &event["fields"];
    assert_eq!(fields["status"], 200);
    assert_eq!(fields["request"], "POST /cluster?x=1 HTTP/1.1");
    assert_eq!(fields["user_agent"], "forkserve-test");
    assert_eq!(fields["referer"], "http://example/");
    assert_eq!(fields["remote"], "127.0.0.1");
    assert_eq!(fields["pid"], r.worker_pid());
    assert!(fields["length"].as_u64().unwrap() > 100);
    assert!(
        fields["duration_s"]
            .as_str()
            .unwrap()
            .parse::<f64>()
            .unwrap()
            > 0.0
    );
}

/// One raw request on its own connection; the status line's code, and the whole answer.
fn raw(port: u16, bytes: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// RFC 9112 and 9110 where hyper lets a request through: each refused with its own status and
/// a message that says why, and the worker serves on.
#[test]
fn http_corner_cases_get_their_own_status() {
    let server = Server::start(&config("workers = 1"), 1);
    let body = r#"{"inputs": "x"}"#;
    let post = |extra: &str| {
        format!(
            "POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    };
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "HTTP/1.1 without Host",
            "GET /health HTTP/1.1\r\nConnection: close\r\n\r\n".to_string(),
            400,
            "without a Host",
        ),
        (
            "a gzip body",
            post("Content-Encoding: gzip\r\n"),
            415,
            "unsupported content encoding",
        ),
        (
            "Expect other than 100-continue",
            post("Expect: the-unexpected\r\n"),
            417,
            "only 100-continue",
        ),
        (
            "CONNECT",
            "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n".to_string(),
            405,
            "not a proxy",
        ),
        (
            "Content-Length with Transfer-Encoding, on GET /health",
            "GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                .to_string(),
            400,
            "Content-Length",
        ),
    ];
    for (what, bytes, status, says) in cases {
        let (got, text) = raw(server.port, bytes.as_bytes());
        assert_eq!(got, status, "{what}: {text}");
        assert!(text.contains(says), "{what}: {text}");
    }
    // HTTP/1.0 needs no Host, and identity is no encoding.
    let (got, _) = raw(server.port, b"GET /health HTTP/1.0\r\n\r\n");
    assert_eq!(got, 200);
    let (got, text) = raw(
        server.port,
        post("Content-Encoding: identity\r\n").as_bytes(),
    );
    assert_eq!(got, 200, "{text}");
    // 100-continue: the interim 100, then the answer.
    let (got, text) = raw(server.port, post("Expect: 100-continue\r\n").as_bytes());
    assert!(got == 100 && text.contains("HTTP/1.1 200"), "{text}");
}

/// What an operator reads a 503 with: per-worker queue depth and in-flight requests; which
/// build serves and since when; padded tokens equal to tokens on the backend that never pads.
#[test]
fn metrics_for_operators() {
    let server = Server::start(&config("workers = 1"), 1);
    let r = server.post_json(
        "/embed",
        r#"{"inputs": ["a", "a much longer sentence with many more tokens in it than the first"]}"#,
    );
    assert_eq!(r.status, 200);
    let text = server.metrics();
    assert!(
        text.contains("forkserve_worker_queue_depth{worker=\"0\"} 0"),
        "{text}"
    );
    assert!(
        text.contains("forkserve_worker_in_flight{worker=\"0\"}"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "forkserve_build_info{{version=\"{}\",profile=\"release\"}} 1",
            env!("CARGO_PKG_VERSION")
        )),
        "{text}"
    );
    let started = metric_value(&text, "process_start_time_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        started > now - 300.0 && started <= now,
        "start time {started} vs now {now}"
    );
    // forkserve's own forward pass never pads: what it ran is what it counted.
    let tokens = metric_value(&text, "forkserve_inference_tokens_total");
    let padded = metric_value(&text, "forkserve_inference_padded_tokens_total");
    assert!(tokens > 0.0);
    assert_eq!(padded, tokens);
}
