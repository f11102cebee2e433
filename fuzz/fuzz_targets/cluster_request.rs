//! Request body → JSON decoding → `/cluster` validation → clustering, as a worker runs them,
//! with vectors derived from the sentences' bytes in place of the model (the subject here is
//! the parsing and the clustering, not the embeddings). Any panic is a bug: a worker must
//! answer every body with a response. Invariant checked: every sentence lands exactly once.
#![no_main]

use forkserve_worker::cluster::{agglomerative, community_detection};
use forkserve_worker::http::app::decode_json;
use forkserve_worker::http::types::{parse_cluster_request, RequestLimits};
use forkserve_worker::settings::ClusterDefaults;
use libfuzzer_sys::fuzz_target;

/// A unit vector from a sentence's bytes: equal sentences get equal vectors.
fn vector(text: &str) -> Vec<f32> {
    let mut v = [0.1f32; 8];
    for (i, b) in text.bytes().enumerate() {
        v[i % 8] += (b as f32 - 96.0) / 32.0;
    }
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / n).collect()
}

fuzz_target!(|body: &[u8]| {
    let Ok(json) = decode_json(body) else { return };
    let limits = RequestLimits {
        max_sentences: 64,
        dimension: 8,
    };
    let defaults = ClusterDefaults {
        threshold: 0.5,
        min_cluster_size: 1,
    };
    let Ok(request) = parse_cluster_request(json, limits, &defaults) else {
        return;
    };
    let vectors: Vec<Vec<f32>> = request.sentences.iter().map(|s| vector(s)).collect();
    let clustering = match request.algorithm {
        "agglomerative" => agglomerative(&vectors, request.threshold, request.min_cluster_size),
        _ => community_detection(&vectors, request.threshold, request.min_cluster_size),
    };
    let mut seen: Vec<usize> = clustering.clusters.iter().flatten().copied().collect();
    seen.extend(&clustering.unclustered);
    seen.sort_unstable();
    assert_eq!(seen, (0..vectors.len()).collect::<Vec<_>>());
});
