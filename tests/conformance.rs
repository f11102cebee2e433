//! HTTP/1.1 conformance: every request of gunicorn's parser corpus
//! (`../shared/conformance/gunicorn-requests`, see its README) replayed over a real TCP
//! connection to a running server. Invalid requests must be answered with a 4xx or a closed
//! connection; valid ones must be parsed (method and target, seen in the access log) and get
//! an answer from the router (404/405/…), never a 400. The tallies are printed (`--nocapture`).

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use support::*;

fn corpus() -> PathBuf {
    project_dir().join("../shared/conformance/gunicorn-requests")
}

/// The README's decoding: drop newlines, then `\r\n`, `\0`, `\n`, `\t` and `\xHH` escapes.
fn decode(text: &str) -> Vec<u8> {
    let joined: String = text.chars().filter(|&c| c != '\n').collect();
    let bytes = joined.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'\\' {
            out.push(bytes[i]);
            i += 1;
            continue;
        }
        match bytes.get(i + 1) {
            Some(b'r') if bytes.get(i + 2..i + 4) == Some(b"\\n") => {
                out.extend_from_slice(b"\r\n");
                i += 4;
            }
            Some(b'0') => {
                out.push(0);
                i += 2;
            }
            Some(b'n') => {
                out.push(b'\n');
                i += 2;
            }
            Some(b't') => {
                out.push(b'\t');
                i += 2;
            }
            Some(b'r') => {
                out.push(b'\r');
                i += 2;
            }
            Some(b'x') => {
                let hex = std::str::from_utf8(&bytes[i + 2..i + 4]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
                i += 4;
            }
            other => panic!("unexpected escape {other:?} in corpus"),
        }
    }
    out
}

struct Case {
    name: String,
    bytes: Vec<u8>,
    expect: Value,
}

fn cases(kind: &str) -> Vec<Case> {
    let dir = corpus().join(kind);
    let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "http"))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|p| Case {
            name: p.file_stem().unwrap().to_string_lossy().into_owned(),
            bytes: decode(&std::fs::read_to_string(&p).unwrap()),
            expect: serde_json::from_str(
                &std::fs::read_to_string(p.with_extension("json")).unwrap(),
            )
            .unwrap(),
        })
        .collect()
}

/// Requests gunicorn accepts that hyper (and so forkserve) refuses, each for a reason an RFC
/// gives.
const STRICTER: [(&str, &str); 2] = [
    (
        "009",
        "Transfer-Encoding: identity with Content-Length: RFC 9112 §6.3 says a server MUST answer 400 when chunked is not the final coding",
    ),
    (
        "014",
        "'\"' in the request target: not allowed in a URI (RFC 3986 §2)",
    ),
];

/// gunicorn settings we have (the limits); any other key asks for a gunicorn-only mode.
const OUR_SETTINGS: [&str; 3] = [
    "limit_request_line",
    "limit_request_fields",
    "limit_request_field_size",
];

fn foreign_settings(case: &Case) -> Vec<String> {
    case.expect["cfg"]
        .as_object()
        .map(|m| {
            m.keys()
                .filter(|k| !OUR_SETTINGS.contains(&k.as_str()))
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// Our config lines for a case's limits (gunicorn's 0 field size means its default 8190).
fn limits_config(case: &Case) -> String {
    let mut out = String::new();
    if let Some(cfg) = case.expect["cfg"].as_object() {
        for key in OUR_SETTINGS {
            if let Some(v) = cfg.get(key).and_then(Value::as_u64) {
                let v = if v == 0 { 8190 } else { v };
                out.push_str(&format!("{key} = {v}\n"));
            }
        }
    }
    out
}

/// Send the bytes, half-close, and read every response until the server closes.
/// Returns the statuses, or an empty list when the connection closed without one.
fn replay(port: u16, bytes: &[u8]) -> Vec<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    // A reset while writing means the server already refused the request.
    if stream.write_all(bytes).is_err() {
        return Vec::new();
    }
    let _ = stream.shutdown(Shutdown::Write);
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    let mut reader = std::io::BufReader::new(&raw[..]);
    let mut statuses = Vec::new();
    while let Ok(r) = read_response(&mut reader) {
        statuses.push(r.status);
    }
    statuses
}

struct Servers {
    by_config: BTreeMap<String, Server>,
}

impl Servers {
    fn port_for(&mut self, case: &Case) -> (u16, &Server) {
        let extra = limits_config(case);
        let server = self.by_config.entry(extra.clone()).or_insert_with(|| {
            Server::start(
                &config(&format!("workers = 1\nheader_timeout = 2\n{extra}")),
                1,
            )
        });
        (server.port, server)
    }
}

#[test]
fn invalid_requests_get_a_4xx_or_a_closed_connection() {
    let mut servers = Servers {
        by_config: BTreeMap::new(),
    };
    let mut tally: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    let mut failures = Vec::new();
    let mut routed = Vec::new();
    for case in cases("invalid") {
        let (port, server) = servers.port_for(&case);
        let pids = server.worker_pids();
        let statuses = replay(port, &case.bytes);
        let outcome = match statuses.first() {
            None => "closed".to_string(),
            Some(s) => s.to_string(),
        };
        let class = case.expect["expect_error"]
            .as_str()
            .unwrap_or("?")
            .to_string();
        if !matches!(outcome.as_str(), "400" | "431" | "closed") {
            routed.push(format!("{} ({class}) -> {outcome}", case.name));
        }
        *tally
            .entry(class)
            .or_default()
            .entry(outcome.clone())
            .or_default() += 1;
        if statuses.iter().any(|s| !(400..500).contains(s)) {
            failures.push(format!("{}: answered {statuses:?}", case.name));
        }
        assert_eq!(server.worker_pids(), pids, "{}: a worker died", case.name);
    }
    eprintln!("invalid/: gunicorn error class -> our outcome (count)");
    for (class, outcomes) in &tally {
        eprintln!("  {class}: {outcomes:?}");
    }
    eprintln!(
        "invalid/ accepted by the parser and answered by the router ({}):",
        routed.len()
    );
    for r in &routed {
        eprintln!("  {r}");
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn valid_requests_are_parsed_and_routed_never_refused_as_malformed() {
    let mut servers = Servers {
        by_config: BTreeMap::new(),
    };
    let mut routed = BTreeMap::<u16, usize>::new();
    let mut foreign = Vec::new();
    let mut failures = Vec::new();
    for case in cases("valid") {
        let needs = foreign_settings(&case);
        let (port, _) = servers.port_for(&case);
        let statuses = replay(port, &case.bytes);
        if !needs.is_empty() {
            // Only valid under a gunicorn-only mode (PROXY protocol, obsolete line folding,
            // unconventional methods...): forkserve refuses them; they must still get a 4xx
            // or a close, never a 5xx.
            foreign.push(format!(
                "{} ({}): {statuses:?}",
                case.name,
                needs.join(", ")
            ));
            if statuses.iter().any(|s| *s >= 500) {
                failures.push(format!("{}: {statuses:?}", case.name));
            }
            continue;
        }
        if let Some((_, why)) = STRICTER.iter().find(|(name, _)| *name == case.name) {
            // Refused on purpose; the reason is in STRICTER. Still never a 5xx.
            eprintln!(
                "valid/{} refused on purpose ({why}): {statuses:?}",
                case.name
            );
            if statuses != [400] {
                failures.push(format!(
                    "{}: expected a deliberate 400, got {statuses:?}",
                    case.name
                ));
            }
            continue;
        }
        let expected = case.expect["expect_requests"].as_array().unwrap();
        if statuses.is_empty() || statuses.len() > expected.len() {
            failures.push(format!(
                "{}: {} requests expected, answered {statuses:?}",
                case.name,
                expected.len()
            ));
            continue;
        }
        for s in &statuses {
            *routed.entry(*s).or_default() += 1;
            if *s == 400 || *s >= 500 {
                failures.push(format!("{}: answered {statuses:?}", case.name));
            }
        }
    }
    // The access log shows what the parser saw: method and target of each request.
    let mut unseen = Vec::new();
    let logs: String = servers.by_config.values().map(Server::log_text).collect();
    let checked = |c: &&Case| {
        foreign_settings(c).is_empty() && !STRICTER.iter().any(|(name, _)| *name == c.name)
    };
    for case in cases("valid").iter().filter(checked) {
        for req in case.expect["expect_requests"].as_array().unwrap() {
            let uri = &req["uri"];
            let raw = uri["raw"].as_str().unwrap();
            if !raw.is_ascii() {
                // Raw non-ASCII bytes in the target: accepted and answered (checked above); the
                // log shows them re-encoded, so there is no byte-exact line to look for.
                continue;
            }
            // A fragment never reaches a server's router (http::Uri drops it): compare the
            // target without it.
            let target = if raw.starts_with('/') {
                let query = uri["query"].as_str().unwrap_or("");
                let path = uri["path"].as_str().unwrap();
                if query.is_empty() && !raw.contains('?') {
                    path.to_string()
                } else {
                    format!("{path}?{query}")
                }
            } else {
                raw.to_string()
            };
            let line = format!("request={} {} ", req["method"].as_str().unwrap(), target);
            if !logs.contains(&line) {
                unseen.push(format!("{}: {line}", case.name));
            }
        }
    }
    eprintln!("valid/: statuses of routed requests {routed:?}");
    eprintln!("valid/ needing gunicorn-only settings ({}):", foreign.len());
    for f in &foreign {
        eprintln!("  {f}");
    }
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(
        unseen.is_empty(),
        "requests not parsed as expected: {unseen:#?}"
    );
}

#[test]
fn decoding_follows_the_readme() {
    assert_eq!(
        decode("GET / HTTP/1.1\\r\\n\n\\r\\n\n"),
        b"GET / HTTP/1.1\r\n\r\n"
    );
    assert_eq!(decode("a\\0b\\tc\\x7f"), b"a\0b\tc\x7f");
    assert!(Path::new(&corpus()).is_dir());
}
