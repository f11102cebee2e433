//! HTTP/1.1 conformance: every request of gunicorn's parser corpus replayed over a real TCP
//! connection to a running server.
//!
//! The corpus is `tests/requests/{valid,invalid}` of gunicorn's source distribution on PyPI
//! (gunicorn 27.0.1, pinned by sha256). `make test` fetches it once and turns the expectation
//! modules into JSON (`scripts/gunicorn-corpus.py`, under `target/conformance/`).
//!
//! The rules:
//! - An invalid request gets a 4xx or a closed connection, and nothing sent after it on that
//!   connection is answered: each case is replayed a second time with `GET /health` pipelined
//!   behind it, and an answer to that probe fails the test.
//! - A 404 or 405 (the router answering before the body is read) is acceptable only for a case
//!   whose defect is in the body framing, listed in `BODY_FRAMING` with the defect.
//! - Where hyper is lenient and the framing is still unambiguous, the case is listed in
//!   `HYPER_LENIENT` with the reason, and the test asserts that exact behaviour, so that a change
//!   in hyper shows up here rather than passing silently.
//! - A valid request is parsed (its method and target appear in the access log) and routed
//!   (200/404/405...), never refused as malformed, except the cases in `STRICTER` and those that
//!   only a gunicorn-only setting makes valid, which must still get a 4xx or a close.
//!
//! The tallies are printed (`--nocapture`).

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use support::*;

fn corpus() -> PathBuf {
    let dir = project_dir().join("target/conformance/gunicorn-requests");
    assert!(
        dir.join("SOURCE").is_file(),
        "{} is missing: run `make test`, or `python3 scripts/gunicorn-corpus.py {}`",
        dir.display(),
        dir.display()
    );
    dir
}

/// gunicorn's decoding (`tests/treq.py`), step by step: drop newlines, then `\r\n` → CRLF,
/// `\0` → NUL, `\n` → LF, `\t` → HTAB, then `\xHH` escapes; a backslash left over is an error
/// in the data.
fn decode(text: &[u8]) -> Vec<u8> {
    let mut data: Vec<u8> = text.iter().copied().filter(|&b| b != b'\n').collect();
    for (from, to) in [
        (&b"\\r\\n"[..], &b"\r\n"[..]),
        (b"\\0", b"\0"),
        (b"\\n", b"\n"),
        (b"\\t", b"\t"),
    ] {
        data = replace(&data, from, to);
    }
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    while i < data.len() {
        let hex = data
            .get(i + 2..i + 4)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (data.get(i..i + 2), hex) {
            (Some(b"\\x"), Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            _ => {
                out.push(data[i]);
                i += 1;
            }
        }
    }
    assert!(!out.contains(&b'\\'), "unexpected backslash in corpus data");
    out
}

fn replace(data: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut i = 0;
    while i < data.len() {
        if data[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(data[i]);
            i += 1;
        }
    }
    out
}

struct Case {
    name: String,
    bytes: Vec<u8>,
    expect: Value,
}

impl Case {
    fn error_class(&self) -> &str {
        self.expect["expect_error"].as_str().unwrap_or("?")
    }
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
            bytes: decode(&std::fs::read(&p).unwrap()),
            expect: serde_json::from_str(
                &std::fs::read_to_string(p.with_extension("json")).unwrap(),
            )
            .unwrap(),
        })
        .collect()
}

/// Invalid cases whose defect is in the body framing: the router may answer the request line
/// (404/405) before the body is read, as long as the connection then stops.
const BODY_FRAMING: [(&str, &str); 13] = [
    ("chunked_01", "chunk size with an underscore (`6_0`)"),
    (
        "chunked_09",
        "last chunk size with trailing whitespace (`0 `)",
    ),
    ("chunked_10", "chunk size with leading whitespace (` 0`)"),
    ("chunked_11", "chunk size ended by a bare LF"),
    ("chunked_12", "chunk extension without a chunk size"),
    ("chunked_13", "empty chunk size line"),
    ("chunked_14", "bare CR in a chunk extension"),
    (
        "rfc9110_trailer_forbidden_cl_01",
        "Content-Length in the trailers",
    ),
    ("rfc9110_trailer_forbidden_host_01", "Host in the trailers"),
    (
        "rfc9110_trailer_forbidden_te_01",
        "Transfer-Encoding in the trailers",
    ),
    (
        "rfc9112_chunked_missing_final_crlf_01",
        "last chunk without the final CRLF",
    ),
    (
        "rfc9112_chunked_size_minus_sign_01",
        "chunk size with a minus sign",
    ),
    (
        "rfc9112_chunked_size_plus_sign_01",
        "chunk size with a plus sign",
    ),
];

/// Body-framing cases where hyper reads on: the framing stays unambiguous, so the connection
/// goes on and the probe behind the case is answered. Listed so that a change in hyper shows.
const HYPER_LENIENT: [(&str, &str); 3] = [
    (
        "rfc9110_trailer_forbidden_cl_01",
        "hyper discards trailer fields that RFC 9110 §6.5.1 forbids (Content-Length) and keeps the connection",
    ),
    (
        "rfc9110_trailer_forbidden_host_01",
        "hyper discards trailer fields that RFC 9110 §6.5.1 forbids (Host) and keeps the connection",
    ),
    (
        "rfc9110_trailer_forbidden_te_01",
        "hyper discards trailer fields that RFC 9110 §6.5.1 forbids (Transfer-Encoding) and keeps the connection",
    ),
];

/// Requests gunicorn accepts that forkserve refuses, each for a reason an RFC gives.
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

/// The index of the case's first request that is HTTP/1.1 without a Host header, if any.
/// gunicorn accepts such a request; RFC 9112 §3.2 says a server MUST answer 400, and
/// forkserve does (then closes).
fn hostless_http11(bytes: &[u8]) -> Option<usize> {
    let text = String::from_utf8_lossy(bytes).replace("\r\n", "\n");
    text.split("\n\n")
        .filter(|head| !head.trim().is_empty())
        .position(|head| {
            let mut lines = head.lines();
            lines
                .next()
                .is_some_and(|first| first.ends_with(" HTTP/1.1"))
                && !lines.any(|l| l.to_ascii_lowercase().starts_with("host:"))
        })
}

fn listed<'a>(list: &'a [(&str, &str)], name: &str) -> Option<&'a str> {
    list.iter().find(|(n, _)| *n == name).map(|(_, why)| *why)
}

/// gunicorn settings forkserve has (the limits); any other key asks for a gunicorn-only mode.
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

/// Pipelined behind an invalid case: answering it means the server read on past the defect.
const PROBE: &[u8] = b"GET /health HTTP/1.1\r\nHost: probe\r\n\r\n";

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

/// One server per distinct set of limits.
struct Servers {
    by_config: BTreeMap<String, Server>,
}

impl Servers {
    fn new() -> Servers {
        Servers {
            by_config: BTreeMap::new(),
        }
    }

    fn for_case(&mut self, case: &Case) -> &Server {
        let extra = limits_config(case);
        self.by_config.entry(extra.clone()).or_insert_with(|| {
            Server::start(
                &config(&format!("workers = 1\nheader_timeout = 2\n{extra}")),
                1,
            )
        })
    }
}

fn outcome(statuses: &[u16]) -> String {
    statuses
        .first()
        .map_or("closed".to_string(), |s| s.to_string())
}

#[test]
fn invalid_requests_get_a_4xx_or_a_closed_connection_and_nothing_after_them() {
    let mut servers = Servers::new();
    let mut tally: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    let mut failures = Vec::new();
    let mut routed = Vec::new();
    let mut lenient_seen = Vec::new();
    let mut foreign = Vec::new();
    let invalid = cases("invalid");
    for case in &invalid {
        let server = servers.for_case(case);
        let needs = foreign_settings(case);
        if !needs.is_empty() {
            // Invalid only under a gunicorn-only setting (`header_map = "refuse"`, PROXY
            // protocol, trusted `X-Forwarded-*`). forkserve behaves as gunicorn's defaults do;
            // whatever it answers, never a 5xx.
            let statuses = replay(server.port, &case.bytes);
            foreign.push(format!(
                "{} ({}; {}): {statuses:?}",
                case.name,
                needs.join(", "),
                case.error_class()
            ));
            if statuses.iter().any(|s| *s >= 500) {
                failures.push(format!("{}: answered {statuses:?}", case.name));
            }
            continue;
        }
        let pids = server.worker_pids();
        let alone = replay(server.port, &case.bytes);
        let with_probe = replay(server.port, &[&case.bytes[..], PROBE].concat());
        let first = outcome(&alone);
        *tally
            .entry(case.error_class().to_string())
            .or_default()
            .entry(first.clone())
            .or_default() += 1;

        match alone.first() {
            None => {}
            Some(404 | 405) => match listed(&BODY_FRAMING, &case.name) {
                Some(defect) => routed.push(format!("{} ({defect}) -> {first}", case.name)),
                None => failures.push(format!(
                    "{}: answered {first}, but its defect is not in the body framing",
                    case.name
                )),
            },
            Some(s) if (400..500).contains(s) => {}
            Some(s) => failures.push(format!("{}: answered {s}", case.name)),
        }
        if alone.len() > 1 {
            failures.push(format!(
                "{}: answered as several requests {alone:?}",
                case.name
            ));
        }
        // Whatever follows an invalid request on its connection must go unanswered: one answer
        // at most (the refusal), and never the probe's 200.
        let probe_answered = with_probe.len() > 1 || with_probe.first() == Some(&200);
        match (listed(&HYPER_LENIENT, &case.name), probe_answered) {
            (None, true) => failures.push(format!(
                "{}: the request pipelined behind it was answered: {with_probe:?}",
                case.name
            )),
            (Some(why), true) => lenient_seen.push(format!("{}: {why}", case.name)),
            (Some(_), false) => failures.push(format!(
                "{}: listed in HYPER_LENIENT, but hyper now stops at it ({with_probe:?}): remove it from the list",
                case.name
            )),
            (None, false) => {}
        }
        assert_eq!(server.worker_pids(), pids, "{}: a worker died", case.name);
    }
    eprintln!(
        "invalid/: {} cases; gunicorn error class -> our outcome (count)",
        invalid.len()
    );
    for (class, outcomes) in &tally {
        eprintln!("  {class}: {outcomes:?}");
    }
    eprintln!(
        "invalid/ answered by the router before the body (then the connection stops) ({}):",
        routed.len()
    );
    for r in &routed {
        eprintln!("  {r}");
    }
    eprintln!(
        "invalid/ where hyper reads on, as listed ({}):",
        lenient_seen.len()
    );
    for r in &lenient_seen {
        eprintln!("  {r}");
    }
    eprintln!(
        "invalid/ only under gunicorn-only settings ({}):",
        foreign.len()
    );
    for f in &foreign {
        eprintln!("  {f}");
    }
    for (name, _) in BODY_FRAMING.iter().chain(&HYPER_LENIENT) {
        assert!(
            invalid.iter().any(|c| c.name == *name),
            "{name} is listed but not in the corpus"
        );
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

#[test]
fn valid_requests_are_parsed_and_routed_never_refused_as_malformed() {
    let mut servers = Servers::new();
    let mut routed = BTreeMap::<u16, usize>::new();
    let mut foreign = Vec::new();
    let mut failures = Vec::new();
    let mut no_host = Vec::new();
    let valid = cases("valid");
    for case in &valid {
        let needs = foreign_settings(case);
        let port = servers.for_case(case).port;
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
            if statuses.iter().any(|s| !(400..500).contains(s)) {
                failures.push(format!("{}: {statuses:?}", case.name));
            }
            continue;
        }
        if let Some(at) = hostless_http11(&case.bytes) {
            no_host.push(case.name.clone());
            // The requests before it are answered as usual; it gets the 400 and nothing after
            // it is answered. (If an earlier request closes the connection, it is never read.)
            let before_ok = statuses.iter().take(at).all(|s| *s != 400 && *s < 500);
            let refused = statuses.len() == at + 1 && statuses[at] == 400;
            let never_read = statuses.len() <= at;
            if !before_ok || !(refused || never_read) {
                failures.push(format!(
                    "{}: HTTP/1.1 without Host must be a 400 (RFC 9112 §3.2), got {statuses:?}",
                    case.name
                ));
            }
            continue;
        }
        if let Some(why) = listed(&STRICTER, &case.name) {
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
        foreign_settings(c).is_empty()
            && listed(&STRICTER, &c.name).is_none()
            && hostless_http11(&c.bytes).is_none()
    };
    for case in valid.iter().filter(checked) {
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
            let line = format!("request=\"{} {} ", req["method"].as_str().unwrap(), target);
            if !logs.contains(&line) {
                unseen.push(format!("{}: {line}", case.name));
            }
        }
    }
    eprintln!("valid/: {} cases", valid.len());
    eprintln!("valid/: statuses of routed requests {routed:?}");
    eprintln!(
        "valid/ HTTP/1.1 without Host, 400 per RFC 9112 §3.2 ({}): {no_host:?}",
        no_host.len()
    );
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
fn decoding_follows_gunicorns_treq() {
    assert_eq!(
        decode(b"GET / HTTP/1.1\\r\\n\n\\r\\n\n"),
        b"GET / HTTP/1.1\r\n\r\n"
    );
    assert_eq!(decode(b"a\\0b\\tc\\x7f\\x0D"), b"a\0b\tc\x7f\r");
    // The whole corpus is there: gunicorn 27.0.1 ships 62 valid and 81 invalid cases.
    assert_eq!(cases("valid").len(), 62);
    assert_eq!(cases("invalid").len(), 81);
}
