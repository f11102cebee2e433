//! Whether a model gives usable vectors, checked on a few fixed sentences before it serves (at
//! start and on every reload, `src/model_probe.rs` in the master). A file zeroed or filled with
//! 0xFF by an interrupted copy loads without an error and then answers every request with
//! zeros or NaN; this catches it before a single client sees it.

use crate::embedder::Embedder;

/// Different in topic, language and form, so a working model gives clearly different vectors.
pub const SENTENCES: [&str; 4] = [
    "The quick brown fox jumps over the lazy dog.",
    "Quarterly revenue grew by four percent compared with last year.",
    "¿Dónde está la biblioteca más cercana?",
    "2 + 2 = 4",
];

/// Embed `SENTENCES` and check the vectors.
pub fn probe(embedder: &dyn Embedder) -> Result<(), String> {
    let tokens = SENTENCES
        .iter()
        .map(|s| embedder.tokenize(s, None))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let batch: Vec<_> = tokens.iter().collect();
    let vectors = embedder.embed_batch(&batch).map_err(|e| e.to_string())?;
    check_vectors(&vectors)
}

/// Seconds a forward pass takes per token on this machine, from one pass over ~256 tokens of
/// sentences at the model's longest (one thread; what a worker with `threads = 1` does). An
/// upper bound for shorter sentences, whose attention costs less per token; small enough to
/// add little to a start (such a pass of all-MiniLM-L6-v2 took 0.15 s here, median of 7).
pub fn seconds_per_token(embedder: &dyn Embedder) -> Result<f64, String> {
    let text = "measure the time a pass takes ".repeat(200);
    let long = embedder.tokenize(&text, None).map_err(|e| e.to_string())?;
    let copies = (256 / long.len().max(1)).clamp(1, 64);
    let batch: Vec<_> = std::iter::repeat_n(&long, copies).collect();
    let started = std::time::Instant::now();
    embedder.embed_batch(&batch).map_err(|e| e.to_string())?;
    Ok(started.elapsed().as_secs_f64() / (copies * long.len()).max(1) as f64)
}

/// Every vector finite and non-zero, and not all the same.
pub fn check_vectors(vectors: &[Vec<f32>]) -> Result<(), String> {
    for (i, v) in vectors.iter().enumerate() {
        if let Some(x) = v.iter().find(|x| !x.is_finite()) {
            return Err(format!(
                "the probe sentence {:?} gives a vector holding {x}: the weights are corrupt",
                SENTENCES.get(i).unwrap_or(&"?")
            ));
        }
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm < 1e-6 {
            return Err(format!(
                "the probe sentence {:?} gives a zero vector: the weights are corrupt or \
                 truncated",
                SENTENCES.get(i).unwrap_or(&"?")
            ));
        }
    }
    let scale = vectors
        .iter()
        .flat_map(|v| v.iter())
        .fold(0f32, |m, x| m.max(x.abs()));
    let all_same = vectors.windows(2).all(|w| {
        w[0].iter()
            .zip(&w[1])
            .all(|(a, b)| (a - b).abs() <= 1e-5 * scale)
    });
    if vectors.len() > 1 && all_same {
        return Err(format!(
            "{} different probe sentences give the same vector: the weights are corrupt",
            vectors.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usable_vectors_pass() {
        let v = vec![
            vec![0.1, 0.2, 0.3],
            vec![0.3, -0.2, 0.1],
            vec![0.0, 1.0, 0.0],
        ];
        assert!(check_vectors(&v).is_ok());
    }

    #[test]
    fn nan_zero_and_identical_vectors_are_refused() {
        let nan = vec![vec![0.1, f32::NAN], vec![0.3, 0.2]];
        assert!(check_vectors(&nan).unwrap_err().contains("NaN"));
        let inf = vec![vec![0.1, 0.2], vec![f32::INFINITY, 0.2]];
        assert!(check_vectors(&inf).unwrap_err().contains("inf"));
        let zero = vec![vec![0.1, 0.2], vec![0.0, 0.0]];
        assert!(check_vectors(&zero).unwrap_err().contains("zero vector"));
        let same = vec![vec![0.5, 0.5]; 4];
        assert!(check_vectors(&same).unwrap_err().contains("same vector"));
    }
}
