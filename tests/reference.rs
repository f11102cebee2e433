//! The model gives sentence-transformers' answers: the same token ids, embeddings within a
//! cosine of 0.9999 for every sentence of tests/data/reference/ (long, accented, CJK, emoji,
//! whitespace-only), and POST /cluster gives the same communities at every threshold.

mod support;

use forkserve_worker::embedder::embed_all;
use forkserve_worker::model::{Backend, Precision};
use forkserve_worker::{Embedder, SentenceEncoder, Tokens};
use support::*;

fn cosine(a: &[f32], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * y).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn as_vec<T: serde::de::DeserializeOwned>(v: &serde_json::Value) -> T {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn tokens_and_embeddings_match_sentence_transformers() {
    let reference = reference();
    let sentences: Vec<String> = as_vec(&reference["sentences"]);
    let want_ids: Vec<Vec<u32>> = as_vec(&reference["input_ids_truncated"]);
    let want_counts: Vec<usize> = as_vec(&reference["token_counts"]);
    let want: Vec<Vec<f64>> = as_vec(&reference["embeddings"]);

    // forkserve's own forward pass (the default) and candle-transformers' BertModel.
    for backend in [Backend::Fast, Backend::Candle] {
        let model =
            SentenceEncoder::load_with(&model_dir(), backend, Precision::F32).expect("load model");
        assert_eq!(model.dimension(), 384);
        assert_eq!(model.max_tokens(), 256);
        let tokens: Vec<Tokens> = sentences
            .iter()
            .map(|s| model.tokenize(s, None).unwrap())
            .collect();
        for (i, t) in tokens.iter().enumerate() {
            assert_eq!(
                t.ids, want_ids[i],
                "token ids of sentence {i}: {:?}",
                sentences[i]
            );
            assert_eq!(
                t.untruncated_len, want_counts[i],
                "token count of sentence {i}"
            );
        }

        // As the server batches (sorted by length, token budget), and one sentence at a time.
        for budget in [8192, 1] {
            let got = embed_all(&model, &tokens, budget, true).unwrap();
            let mut worst = 1f64;
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let norm: f32 = g.iter().map(|x| x * x).sum::<f32>().sqrt();
                assert!(
                    (norm - 1.0).abs() < 1e-4,
                    "sentence {i} not normalised: {norm}"
                );
                let cos = cosine(g, w);
                assert!(
                    cos >= 0.9999,
                    "{backend:?}: sentence {i} {:?}: cosine {cos} with budget {budget}",
                    sentences[i]
                );
                worst = worst.min(cos);
            }
            eprintln!(
                "{backend:?}, budget {budget}: min cosine to sentence-transformers {worst:.7}"
            );
        }
    }
}

#[test]
fn cluster_endpoint_matches_reference_communities() {
    let reference = reference();
    let sentences: Vec<String> = as_vec(&reference["sentences"]);
    let communities = reference["community_detection"].as_object().unwrap();
    assert!(!communities.is_empty());
    let server = Server::start(&config("workers = 1"), 1);
    for (threshold, expected) in communities {
        let got = cluster_at(&server, &sentences, threshold);
        assert_eq!(
            partition(&got["indices"]),
            partition(expected),
            "communities at threshold {threshold}"
        );
        // Largest first, and every sentence in exactly one cluster.
        let sizes: Vec<usize> = got["indices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_array().unwrap().len())
            .collect();
        assert!(sizes.windows(2).all(|w| w[0] >= w[1]), "{sizes:?}");
        assert_eq!(sizes.iter().sum::<usize>(), sentences.len());
        // The text clusters are the index clusters, in input order.
        for (texts, idx) in got["clusters"]
            .as_array()
            .unwrap()
            .iter()
            .zip(got["indices"].as_array().unwrap())
        {
            let idx: Vec<usize> = as_vec(idx);
            assert!(idx.windows(2).all(|w| w[0] < w[1]));
            let want: Vec<&str> = idx.iter().map(|&i| sentences[i].as_str()).collect();
            let texts: Vec<String> = as_vec(texts);
            assert_eq!(texts, want);
        }
    }
}

/// `model.precision = "bf16"` (the linear layers' inputs and weights rounded to bfloat16 and
/// multiplied on AMX tiles) on the bar: every reference vector within cosine 0.9999
/// of sentence-transformers' (0.99997 measured), the reference communities identical at every
/// recorded threshold, and a sentence's vector the same bits alone as in a batch. On a CPU
/// without AMX the server must refuse the setting, naming it.
#[test]
fn bf16_products_keep_the_reference_vectors_and_communities() {
    let reference = reference();
    let sentences: Vec<String> = as_vec(&reference["sentences"]);
    let want: Vec<Vec<f64>> = as_vec(&reference["embeddings"]);
    let bf16 = config("workers = 1") + "precision = \"bf16\"\n";
    if let Err(why) = forkserve_worker::model::enable_bf16_tiles() {
        let mut server = Server::spawn(&bf16, &[]);
        let status = server.wait_exit(std::time::Duration::from_secs(60));
        assert!(!status.success());
        let log = server.log_text();
        assert!(
            log.contains("model.precision") && log.contains("AMX"),
            "{log}"
        );
        eprintln!("bf16 refused as it must be here: {why}");
        return;
    }

    let model = SentenceEncoder::load_with(&model_dir(), Backend::Fast, Precision::Bf16)
        .expect("load model");
    let tokens: Vec<Tokens> = sentences
        .iter()
        .map(|s| model.tokenize(s, None).unwrap())
        .collect();
    let batched = embed_all(&model, &tokens, 8192, true).unwrap();
    let alone = embed_all(&model, &tokens, 1, true).unwrap();
    assert_eq!(batched, alone, "a sentence's bits alone and in a batch");
    let worst = batched
        .iter()
        .zip(&want)
        .map(|(g, w)| cosine(g, w))
        .fold(1f64, f64::min);
    eprintln!("bf16: min cosine to sentence-transformers {worst:.7}");
    assert!(
        worst >= 0.9999,
        "min cosine to sentence-transformers {worst}"
    );

    let server = Server::start(&bf16, 1);
    assert_eq!(server.get("/info").json()["model_dtype"], "bfloat16");
    let communities = reference["community_detection"].as_object().unwrap();
    for (threshold, expected) in communities {
        assert_eq!(
            partition(&cluster_at(&server, &sentences, threshold)["indices"]),
            partition(expected),
            "communities at threshold {threshold}"
        );
    }
}

/// `POST /cluster` of `sentences` at the recorded `threshold` (as its JSON key spells it),
/// every community kept (`min_cluster_size` 1, as the reference was recorded): the answer.
fn cluster_at(server: &Server, sentences: &[String], threshold: &str) -> serde_json::Value {
    let body = serde_json::json!({
        "sentences": sentences,
        "threshold": threshold.parse::<f64>().unwrap(),
        "min_cluster_size": 1,
    });
    let r = server.post_json("/cluster", &body.to_string());
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}
