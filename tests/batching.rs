//! Batching across requests, on the real binary and model: concurrent requests share forward
//! passes, a sentence's vector does not depend on which requests shared its pass, and a small
//! request is not held behind a large one.

mod support;

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use forkserve_worker::model::linear::few_rows_available;
use support::*;

/// Sum of a metric's samples whose line contains `labels`.
fn metric(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(labels) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn embed_one(port: u16, text: &str) -> Vec<f64> {
    let body = serde_json::json!({ "inputs": text }).to_string();
    let r = post_json_to(port, "/embed", &body).expect("POST /embed");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    vectors(&r.json()).remove(0)
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// The same sentence alone, and inside passes shared with other requests of other lengths
/// (shorter and longer, one and many sentences): the same vector (the same bits with
/// forkserve's own kernels, within 1e-5 with gemm's), and the passes
/// really were shared (the /metrics histogram of requests per pass says so).
#[test]
fn a_sentence_vector_does_not_depend_on_its_pass_mates() {
    let server = Server::start(&config("workers = 1\nthreads = 1"), 1);
    let port = server.port;
    let probe = "Master The Art of Public Speaking";
    let alone = embed_one(port, probe);

    let reference = reference();
    let others: Vec<String> = reference["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    let rounds = 6;
    let clients = 12;
    let mut worst = 0f64;
    for round in 0..rounds {
        let barrier = Arc::new(Barrier::new(clients));
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                let barrier = barrier.clone();
                // Client c sends c % 4 + 1 sentences: the probe at a varying place among
                // sentences of the reference set (short titles and long paragraphs).
                let mut batch: Vec<String> = (0..c % 4)
                    .map(|j| others[(round * 7 + c * 3 + j) % others.len()].clone())
                    .collect();
                batch.insert((c + round) % (batch.len() + 1), probe.to_string());
                thread::spawn(move || {
                    let at = batch.iter().position(|s| s == probe).unwrap();
                    let body = serde_json::json!({ "inputs": batch }).to_string();
                    barrier.wait();
                    let r = post_json_to(port, "/embed", &body).expect("POST /embed");
                    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
                    vectors(&r.json()).remove(at)
                })
            })
            .collect();
        for h in handles {
            let v = h.join().expect("client thread");
            worst = worst.max(max_abs_diff(&v, &alone));
        }
    }
    // Where the server runs its own product kernels (AVX2, FMA and F16C), every route adds
    // the same products in the same order: the very same bits.
    let bound = if few_rows_available() { 0.0 } else { 1e-5 };
    assert!(
        worst <= bound,
        "the probe's vector moved by {worst} depending on its pass (bound {bound})"
    );
    eprintln!("the probe's vector moved by at most {worst:.1e} across its passes");

    let text = String::from_utf8_lossy(&server.get("/metrics").body).into_owned();
    let passes = metric(&text, "forkserve_inference_batch_requests_count", "");
    let single = metric(
        &text,
        "forkserve_inference_batch_requests_bucket",
        "le=\"1\"",
    );
    assert!(
        passes >= 1.0 && single < passes,
        "no pass served more than one request ({single} of {passes} passes had one):\n{text}"
    );
    let requests = metric(&text, "forkserve_inference_batch_requests_sum", "");
    assert_eq!(
        requests as usize,
        1 + rounds * clients,
        "every request counted once in the passes' sums"
    );
    // Every pass is timed once, and every request's wait before its first pass once.
    let timed = metric(&text, "forkserve_inference_duration_seconds_count", "");
    let pass_seconds = metric(&text, "forkserve_inference_duration_seconds_sum", "");
    assert!(
        timed == passes && pass_seconds > 0.0,
        "{timed} passes timed ({pass_seconds} s) of {passes}:\n{text}"
    );
    let queued = metric(&text, "forkserve_queue_duration_seconds_count", "");
    assert_eq!(
        queued as usize,
        1 + rounds * clients,
        "every request's wait counted once"
    );
}

/// A large /cluster request runs as many passes of `max_batch_tokens`; a one-sentence request
/// sent while it runs joins the next pass and is answered while the large one is still
/// running (before the change it waited for the whole job).
#[test]
fn a_small_request_joins_between_the_passes_of_a_large_one() {
    let server = Server::start(
        &config("workers = 1\nthreads = 1\nmax_batch_tokens = 1024"),
        1,
    );
    let port = server.port;
    // 160 sentences of about 120 tokens: about 20 passes of 1024 padded tokens.
    let words = "river garden morning quiet engineer music coffee market winter student ancient \
                 city bright forest paper window travel kitchen lesson ocean planet careful"
        .split(' ')
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>();
    let big: Vec<String> = (0..160)
        .map(|i| {
            (0..110)
                .map(|j| words[(i * 7 + j * 3) % words.len()])
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let body = serde_json::json!({ "sentences": big }).to_string();
    let big_start = Instant::now();
    let big_thread = thread::spawn(move || {
        let r = post_json_to(port, "/cluster", &body).expect("POST /cluster");
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        Instant::now()
    });
    // Wait until the large request is computing (its passes show in /metrics).
    eventually(
        "the large request's first pass",
        Duration::from_secs(60),
        || {
            let text = String::from_utf8_lossy(&server.get("/metrics").body).into_owned();
            metric(&text, "forkserve_inference_batch_requests_count", "") >= 1.0
        },
    );
    let small_sent = Instant::now();
    let v = embed_one(port, "coffee");
    let small_done = Instant::now();
    let big_done = big_thread.join().expect("large request");
    assert_eq!(v.len(), 384);
    assert!(
        small_done < big_done,
        "the one-word request ({:?} after it was sent) finished after the large one ({:?} after \
         its start): it waited behind it",
        small_done - small_sent,
        big_done - big_start
    );
    let text = String::from_utf8_lossy(&server.get("/metrics").body).into_owned();
    let passes = metric(&text, "forkserve_inference_batch_requests_count", "");
    assert!(
        passes >= 10.0,
        "the large request should run as many passes, not {passes}"
    );
}
