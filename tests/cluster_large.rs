//! `POST /cluster` on the sets people cluster: thousands of sentences in one request, the
//! library's communities, progress lines, cancellation, and other requests served meanwhile.
//! The real binary and model, over loopback.

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::*;

/// Distinct sentences over many topics, made here (no fixture needed for the ones whose
/// answer is not compared with the library).
fn many_sentences(n: usize) -> Vec<String> {
    const TOPICS: [&str; 12] = [
        "walking the dog",
        "public speaking",
        "baking bread",
        "learning to swim",
        "saving money",
        "growing tomatoes",
        "running a marathon",
        "fixing a bicycle",
        "sleeping better",
        "remote work",
        "car maintenance",
        "birdwatching",
    ];
    const FORMS: [&str; 6] = [
        "A guide to {} number {}",
        "{}: lesson {} for beginners",
        "What I learned about {} on day {}",
        "Tip {} about {}",
        "Notes on {} ({})",
        "Question {} on {}",
    ];
    (0..n)
        .map(|i| {
            let topic = TOPICS[i % TOPICS.len()];
            let form = FORMS[(i / TOPICS.len()) % FORMS.len()];
            let k = (i / (TOPICS.len() * FORMS.len())).to_string();
            if form.starts_with("Tip") || form.starts_with("Question") {
                form.replacen("{}", &k, 1).replacen("{}", topic, 1)
            } else {
                form.replacen("{}", topic, 1).replacen("{}", &k, 1)
            }
        })
        .collect()
}

/// Communities as sorted lists of sentences, the list sorted: identical sentences are
/// interchangeable, and the order of equal-sized communities is not the point.
fn as_sentence_sets(communities: impl Iterator<Item = Vec<String>>) -> Vec<Vec<String>> {
    let mut sets: Vec<Vec<String>> = communities
        .map(|mut c| {
            c.sort();
            c
        })
        .collect();
    sets.sort();
    sets
}

/// Every sentence of the request in exactly one cluster or in `unclustered`.
fn assert_every_sentence_once(answer: &Value, n: usize) {
    let mut seen: Vec<u64> = answer["indices"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c.as_array().unwrap().iter().map(|i| i.as_u64().unwrap()))
        .chain(
            answer["unclustered_indices"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_u64().unwrap()),
        )
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..n as u64).collect::<Vec<_>>());
}

#[test]
fn communities_equal_sentence_transformers_on_three_thousand_sentences() {
    communities_equal_the_librarys(config("workers = 2\ntimeout = 60"));
}

/// `model.precision = "f16"` keeps the weights rounded to half precision: offered only because
/// the vectors stay within cosine 0.99999 of sentence-transformers' (0.9999997 measured on this
/// reference set) and the reference communities come out the same. bf16 products
/// (`model.precision = "bf16"`, AMX) keep two of these six, thresholds set between close
/// similarities: they are held to the issue's bar on the reference set instead
/// (`tests/reference.rs`) and documented as moving close clusterings.
#[test]
fn with_f16_weights_vectors_and_communities_stay_the_librarys() {
    let recorded = reference();
    // config() ends in the [model] table.
    let f16 = |extra: &str| config(extra) + "precision = \"f16\"\n";
    let server = Server::start(&f16("workers = 1"), 1);
    let info = server.get("/info").json();
    assert_eq!(info["model_dtype"], "float16", "{info}");
    let body = json!({ "inputs": recorded["sentences"] }).to_string();
    let r = post_json_to(server.port, "/embed", &body).expect("answer");
    assert_eq!(r.status, 200);
    let worst = vectors(&r.json())
        .iter()
        .zip(vectors(&recorded["embeddings"]))
        .map(|(ours, library)| cosine(ours, &library))
        .fold(1f64, f64::min);
    assert!(
        worst >= 0.99999,
        "min cosine to sentence-transformers {worst}"
    );
    drop(server);
    communities_equal_the_librarys(f16("workers = 2\ntimeout = 60"));
}

/// The fixture's six clusterings (three thresholds x two minimum sizes), each compared as sets
/// of sentences with what forkserve answers, started from `config_text` (two workers).
fn communities_equal_the_librarys(config_text: String) {
    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(project_dir().join("tests/data/reference/clusters-3000.json"))
            .expect("tests/data/reference/clusters-3000.json"),
    )
    .expect("fixture is JSON");
    let sentences: Vec<String> = fixture["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    let results = fixture["results"].as_array().unwrap().clone();
    assert_eq!(results.len(), 6, "three thresholds x two minimum sizes");
    let server = Server::start(&config_text, 2);
    let port = server.port;
    // Two at a time, one per worker.
    let handles: Vec<_> = results
        .chunks(3)
        .map(|chunk| {
            let chunk = chunk.to_vec();
            let sentences = sentences.clone();
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                for case in chunk {
                    let threshold = case["threshold"].as_f64().unwrap();
                    let min_size = case["min_community_size"].as_u64().unwrap();
                    // The fixture's thresholds sit in gaps of the pair similarities, far wider
                    // than float rounding: no pair can fall on the other side here.
                    assert!(case["margin"].as_f64().unwrap() > 1e-5, "{case}");
                    let body = json!({
                        "sentences": sentences,
                        "threshold": threshold,
                        "min_cluster_size": min_size,
                    })
                    .to_string();
                    let r = post_json_to(port, "/cluster", &body).expect("answer");
                    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
                    let got = r.json();
                    let ours =
                        as_sentence_sets(got["clusters"].as_array().unwrap().iter().map(|c| {
                            c.as_array()
                                .unwrap()
                                .iter()
                                .map(|s| s.as_str().unwrap().to_string())
                                .collect()
                        }));
                    let library =
                        as_sentence_sets(case["communities"].as_array().unwrap().iter().map(|c| {
                            c.as_array()
                                .unwrap()
                                .iter()
                                .map(|i| sentences[i.as_u64().unwrap() as usize].clone())
                                .collect()
                        }));
                    let clustered: usize = ours.iter().map(Vec::len).sum();
                    assert_eq!(
                        clustered + got["unclustered"].as_array().unwrap().len(),
                        sentences.len()
                    );
                    if ours != library {
                        failures.push(format!(
                            "threshold {threshold}, min size {min_size}: {} communities, the \
                             library {}",
                            ours.len(),
                            library.len()
                        ));
                    }
                }
                failures
            })
        })
        .collect();
    let failures: Vec<String> = handles
        .into_iter()
        .flat_map(|h| h.join().expect("client thread"))
        .collect();
    assert!(failures.is_empty(), "{failures:#?}");
}

/// A streamed answer read line by line from a raw connection (chunked transfer coding).
struct Lines {
    reader: BufReader<TcpStream>,
    pending: Vec<u8>,
}

impl Lines {
    fn post(port: u16, path: &str, body: &str) -> (u16, String, Lines) {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        write!(
            stream,
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Accept: application/x-ndjson\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .unwrap();
        stream.write_all(body.as_bytes()).unwrap();
        let mut reader = BufReader::new(stream);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" || line.is_empty() {
                break;
            }
            head.push_str(&line);
        }
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        let lines = Lines {
            reader,
            pending: Vec::new(),
        };
        (status, head, lines)
    }

    /// The next JSON line, or None at the end of the body.
    fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.pending.drain(..=end).collect();
                return Some(serde_json::from_slice(&line).expect("a JSON line"));
            }
            let mut size = String::new();
            if self.reader.read_line(&mut size).ok()? == 0 {
                return None;
            }
            let size = usize::from_str_radix(size.trim(), 16).expect("chunk size");
            if size == 0 {
                return None;
            }
            let mut chunk = vec![0; size + 2];
            self.reader.read_exact(&mut chunk).ok()?;
            self.pending.extend_from_slice(&chunk[..size]);
        }
    }
}

#[test]
fn progress_lines_then_the_same_answer_as_plain_json() {
    let server = Server::start(&config("workers = 1"), 1);
    let sentences = many_sentences(1200);
    let body = json!({"sentences": sentences, "threshold": 0.8, "min_cluster_size": 2}).to_string();
    let (status, head, mut lines) = Lines::post(server.port, "/cluster", &body);
    assert_eq!(status, 200);
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/x-ndjson"),
        "{head}"
    );
    let mut embedded = Vec::new();
    let mut clustering = 0;
    let mut last = None;
    while let Some(line) = lines.next() {
        assert!(last.is_none(), "a line after the result: {line}");
        if let Some(k) = line.get("embedded") {
            assert_eq!(clustering, 0, "embedding after clustering began");
            assert_eq!(line["total"], 1200);
            embedded.push(k.as_u64().unwrap());
        } else if let Some(c) = line.get("clustering") {
            assert_eq!(c["algorithm"], "community");
            assert_eq!(c["total"], 1200);
            clustering += 1;
        } else {
            last = Some(line);
        }
    }
    // One line per forward pass, counting up to every sentence.
    assert!(embedded.len() >= 2, "{embedded:?}");
    assert!(embedded.windows(2).all(|w| w[0] < w[1]), "{embedded:?}");
    assert_eq!(embedded.last(), Some(&1200));
    assert!(clustering >= 1);
    let streamed = last.expect("the result as the last line");
    let plain = server.post_json("/cluster", &body);
    assert_eq!(plain.status, 200);
    assert_eq!(streamed, plain.json());
    assert!(!streamed["clusters"].as_array().unwrap().is_empty());

    // A request refused before any work is still a plain 4xx, not a stream.
    let (status, head, _) = Lines::post(server.port, "/cluster", r#"{"sentences": []}"#);
    assert_eq!(status, 422);
    assert!(head.contains("application/json"), "{head}");
}

#[test]
fn a_client_that_leaves_cancels_its_job() {
    // Short passes (1024 tokens), so that the one running when the client leaves ends soon.
    let server = Server::start(&config("workers = 1\nmax_batch_tokens = 1024"), 1);
    let sentences = many_sentences(8000);
    let body = json!({ "sentences": sentences }).to_string();
    let (status, _, mut lines) = Lines::post(server.port, "/cluster", &body);
    assert_eq!(status, 200);
    let first = lines.next().expect("a progress line");
    assert!(first.get("embedded").is_some(), "{first}");
    drop(lines); // the client goes
    let passes = || server.metric("forkserve_inference_batch_size_count");
    // The server learns that the client left when a progress line fails to go out (TCP
    // takes a write or two after the peer closed), so a pass or three may still run; then
    // none. Settled: unchanged for 1.5 s.
    let mut settled = passes();
    let mut unchanged = 0;
    for _ in 0..40 {
        std::thread::sleep(Duration::from_millis(500));
        let now = passes();
        unchanged = if now == settled { unchanged + 1 } else { 0 };
        settled = now;
        if unchanged == 3 {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        passes(),
        settled,
        "forward passes went on for a client that left"
    );
    // 8000 sentences are ~80 passes of 1024 tokens: far more than ran.
    assert!(
        settled < 20.0,
        "{settled} passes: the job was not cancelled"
    );
    let r = server.post_json("/embed", r#"{"inputs": "still serving"}"#);
    assert_eq!(r.status, 200);
}

#[test]
fn small_requests_are_served_between_a_large_jobs_passes_and_it_is_never_killed() {
    // timeout = 2: a job that held the compute thread for 2 s at once would be killed. A pass
    // of 1024 tokens is ~0.5 s at the rate the probe measures here (1,888 tokens/s).
    let server = Server::start(
        &config("workers = 1\ntimeout = 2\nmax_batch_tokens = 1024"),
        1,
    );
    let worker = *server.worker_pids().iter().next().unwrap();
    let sentences = many_sentences(5000);
    let body = json!({ "sentences": sentences, "threshold": 0.9 }).to_string();
    let port = server.port;
    let started = Instant::now();
    let large = std::thread::spawn(move || {
        let r = post_json_to(port, "/cluster", &body);
        (r, started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(1000));
    let mut slowest = Duration::ZERO;
    for i in 0..5 {
        let t = Instant::now();
        let r = server.post_json("/embed", &format!(r#"{{"inputs": "a small request {i}"}}"#));
        assert_eq!(r.status, 200);
        slowest = slowest.max(t.elapsed());
    }
    let small_done = started.elapsed();
    let (r, large_took) = large.join().unwrap();
    let r = r.expect("the large job's answer");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let answer = r.json();
    assert_every_sentence_once(&answer, 5000);
    assert!(
        small_done < large_took,
        "the small requests waited for the large job ({small_done:?} vs {large_took:?})"
    );
    // A small request waits for at most the pass in progress (and one clustering step); the
    // bound leaves room for a loaded CI host.
    assert!(
        slowest < Duration::from_millis(3000),
        "a small request took {slowest:?}"
    );
    assert!(
        server.worker_pids().contains(&worker),
        "the worker was replaced"
    );
    assert_eq!(
        server.metric("forkserve_worker_restarts_total{reason=\"timeout\"}"),
        0.0
    );
}

#[test]
fn cluster_limits_are_its_own() {
    let server = Server::start(
        &config(
            "max_sentences = 4\n[cluster]\nmax_sentences = 6\nmax_agglomerative_sentences = 5\n",
        ),
        1,
    );
    let six: Vec<String> = many_sentences(6);
    // /cluster takes 6 where the embedding routes take 4.
    let r = server.post_json("/cluster", &json!({ "sentences": six }).to_string());
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = server.post_json("/embed", &json!({ "inputs": six }).to_string());
    assert_eq!(r.status, 422);
    let seven = many_sentences(7);
    let r = server.post_json("/cluster", &json!({ "sentences": seven }).to_string());
    assert_eq!(r.status, 422);
    assert!(
        r.json()["error"].as_str().unwrap().contains("6"),
        "{:?}",
        r.json()
    );
    // Agglomerative has its own, lower limit, and says what to use instead.
    let r = server.post_json(
        "/cluster",
        &json!({ "sentences": six, "algorithm": "agglomerative" }).to_string(),
    );
    assert_eq!(r.status, 422);
    let message = r.json()["error"].as_str().unwrap().to_string();
    assert!(message.contains("community"), "{message}");
    let info = server.get("/info").json();
    assert_eq!(info["cluster_max_sentences"], 6);
    assert_eq!(info["cluster_max_agglomerative_sentences"], 5);
}

/// Agglomerative clustering of 5,000 sentences (its default limit) is answered: it holds the
/// pairs' similarities (100 MB) and runs in O(n²); past the limit, a 422 that says why.
#[test]
fn agglomerative_clustering_of_five_thousand_sentences() {
    let server = Server::start(&config("workers = 1"), 1);
    let worker = *server.worker_pids().iter().next().unwrap();
    let sentences = many_sentences(5000);
    let r = server.post_json(
        "/cluster",
        &json!({ "sentences": sentences, "algorithm": "agglomerative", "threshold": 0.8 })
            .to_string(),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let answer = r.json();
    assert_every_sentence_once(&answer, 5000);
    assert!(server.worker_pids().contains(&worker));
    let more = many_sentences(5001);
    let r = server.post_json(
        "/cluster",
        &json!({ "sentences": more, "algorithm": "agglomerative" }).to_string(),
    );
    assert_eq!(r.status, 422);
}
