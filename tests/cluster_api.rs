//! POST /cluster and GET /health as a client sees them, and every kind of bad input answered
//! with a clear JSON error by a worker that stays up.

mod support;

use serde_json::json;
use support::*;

#[test]
fn seed_titles_come_back_as_two_clusters() {
    let server = Server::start(&config("workers = 2"), 2);
    let r = server.post_json("/cluster", &seed_body());
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert!(server.worker_pids().contains(&r.worker_pid()));
    let body = r.json();
    assert_eq!(
        body["clusters"],
        json!([&SEED[..5], &SEED[5..]]),
        "dog walking and public speaking"
    );
    assert_eq!(body["indices"], json!([[0, 1, 2, 3, 4], [5, 6, 7, 8]]));
    assert_eq!(body["unclustered"], json!([]));
    assert_eq!(body["threshold"], json!(0.5));
    assert_eq!(body["algorithm"], json!("community"));
}

#[test]
fn threshold_and_min_cluster_size_are_honoured() {
    let server = Server::start(&config("workers = 1"), 1);
    // Only the dog-walking group has 5 members.
    let r = server.post_json(
        "/cluster",
        &json!({"sentences": SEED, "min_cluster_size": 5}).to_string(),
    );
    assert_eq!(r.status, 200);
    let body = r.json();
    assert_eq!(body["indices"], json!([[0, 1, 2, 3, 4]]));
    assert_eq!(body["unclustered_indices"], json!([5, 6, 7, 8]));
    assert_eq!(body["unclustered"], json!(&SEED[5..]));

    // At a similarity of 0.99 nothing but a sentence itself is a neighbour.
    let r = server.post_json(
        "/cluster",
        &json!({"sentences": SEED, "threshold": 0.99}).to_string(),
    );
    assert_eq!(r.json()["indices"].as_array().unwrap().len(), 9);

    // Empty and whitespace-only strings are sentences; duplicates are kept apart by index.
    let r = server.post_json(
        "/cluster",
        &json!({"sentences": ["", "   ", "I love pizza.", "I love pizza."]}).to_string(),
    );
    assert_eq!(r.status, 200);
    let p = partition(&r.json()["indices"]);
    assert!(p.contains(&[2, 3].into_iter().collect()), "{p:?}");
}

#[test]
fn health_answers_with_the_worker_pid() {
    let server = Server::start(&config("workers = 1"), 1);
    let r = server.get("/health");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "ok");
    assert_eq!(
        server.worker_pids().into_iter().collect::<Vec<_>>(),
        vec![r.worker_pid()]
    );
}

struct Case {
    what: &'static str,
    method: &'static str,
    path: &'static str,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    status: u16,
    /// Text the error message must contain (names the field or the problem).
    mentions: &'static str,
}

fn case(what: &'static str, body: &str, status: u16, mentions: &'static str) -> Case {
    Case {
        what,
        method: "POST",
        path: "/cluster",
        content_type: Some("application/json"),
        body: body.as_bytes().to_vec(),
        status,
        mentions,
    }
}

#[test]
fn bad_input_gets_a_clear_error_and_no_worker_dies() {
    let server = Server::start(
        &config(
            "workers = 2\nmax_sentences = 10\nmax_body_bytes = 4096\n\
             [cluster]\nmax_sentences = 10\nmax_body_bytes = 4096",
        ),
        2,
    );
    let pids_before = server.worker_pids();
    let cases = vec![
        case("malformed JSON", "{\"sentences\": [", 400, "malformed JSON"),
        case("empty body", "", 400, "malformed JSON"),
        case("not an object", "[\"a\"]", 422, "body"),
        case("missing field", "{}", 422, "sentences"),
        case("wrong type", "{\"sentences\": \"one\"}", 422, "sentences"),
        case(
            "wrong item type",
            "{\"sentences\": [\"a\", 7]}",
            422,
            "sentences[1]",
        ),
        case("empty list", "{\"sentences\": []}", 422, "sentences"),
        case(
            "too many sentences",
            &json!({"sentences": vec!["x"; 11]}).to_string(),
            422,
            "limit is 10",
        ),
        case(
            "threshold out of range",
            "{\"sentences\": [\"a\"], \"threshold\": 1.5}",
            422,
            "threshold",
        ),
        case(
            "min_cluster_size zero",
            "{\"sentences\": [\"a\"], \"min_cluster_size\": 0}",
            422,
            "min_cluster_size",
        ),
        case(
            "unknown algorithm",
            "{\"sentences\": [\"a\"], \"algorithm\": \"kmeans\"}",
            422,
            "algorithm",
        ),
        case(
            "unknown field",
            "{\"sentences\": [\"a\"], \"treshold\": 0.4}",
            422,
            "treshold",
        ),
        case(
            "deeply nested JSON",
            &format!("{}{}", "[".repeat(2000), "]".repeat(2000)),
            400,
            "recursion",
        ),
        case(
            "body over max_body_bytes",
            &json!({"sentences": [("x ".repeat(3000))]}).to_string(),
            413,
            "4096 bytes",
        ),
        Case {
            what: "invalid UTF-8",
            body: b"{\"sentences\": [\"caf\xe9\"]}".to_vec(),
            ..case("", "", 400, "UTF-8")
        },
        Case {
            what: "not JSON",
            content_type: Some("text/plain"),
            ..case("", "{\"sentences\": [\"a\"]}", 415, "application/json")
        },
        Case {
            what: "no content type",
            content_type: None,
            ..case("", "{\"sentences\": [\"a\"]}", 415, "Content-Type")
        },
        Case {
            what: "wrong method",
            method: "GET",
            ..case("", "", 405, "POST")
        },
        Case {
            what: "unknown path",
            path: "/nope",
            ..case("", "{}", 404, "/nope")
        },
    ];
    for c in &cases {
        let mut headers = vec![];
        if let Some(ct) = c.content_type {
            headers.push(("Content-Type", ct));
        }
        let r = request(server.port, c.method, c.path, &headers, &c.body)
            .unwrap_or_else(|e| panic!("{}: {e}", c.what));
        assert_eq!(
            r.status,
            c.status,
            "{}: {}",
            c.what,
            String::from_utf8_lossy(&r.body)
        );
        let body = r.json();
        let message = body["error"].as_str().unwrap_or_default();
        assert!(
            message.contains(c.mentions),
            "{}: error {message:?} should mention {:?}",
            c.what,
            c.mentions
        );
        assert!(body["error_type"].is_string(), "{}", c.what);
        assert!(r.header("x-worker-pid").is_some(), "{}", c.what);
        if c.status == 405 {
            assert_eq!(r.header("allow"), Some("POST"));
        }
    }
    // A body announced larger than the limit is refused before it is sent.
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    std::io::Write::write_all(
        &mut raw,
        b"POST /cluster HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
          Content-Length: 100000000\r\n\r\n{\"sentences\": [",
    )
    .unwrap();
    let r = read_response(&mut std::io::BufReader::new(raw)).expect("a 413 before the body");
    assert_eq!(r.status, 413);
    // Malformed HTTP never reaches a handler and costs no worker.
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    std::io::Write::write_all(&mut raw, b"GARBAGE / HTTP/9.9\r\n\r\n").unwrap();
    let mut reader = std::io::BufReader::new(raw);
    if let Ok(r) = read_response(&mut reader) {
        assert!(
            (400..500).contains(&r.status),
            "malformed HTTP got {}",
            r.status
        );
    }

    assert_eq!(
        server.worker_pids(),
        pids_before,
        "a worker died on bad input"
    );
    assert_eq!(server.post_json("/cluster", &seed_body()).status, 200);
}

#[test]
fn a_client_that_never_finishes_its_headers_is_dropped() {
    let server = Server::start(&config("workers = 1\nheader_timeout = 1"), 1);
    let mut slow = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    std::io::Write::write_all(&mut slow, b"POST /cluster HTTP/1.1\r\nHost: x\r\n").unwrap();
    slow.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    // Meanwhile the worker serves others.
    assert_eq!(server.post_json("/cluster", &seed_body()).status, 200);
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    // The server ends the connection (possibly after a 408): the read sees EOF, not a timeout.
    let read = std::io::Read::read_to_end(&mut slow, &mut buf);
    assert!(read.is_ok(), "connection not closed: {read:?}");
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    let text = String::from_utf8_lossy(&buf);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
}
