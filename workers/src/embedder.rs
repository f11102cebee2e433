//! The seam between serving and the model. The HTTP app and the clustering see an `Embedder`,
//! never a candle type, so the model implementation can change (or be faked in a unit test whose
//! subject is not the model) without touching them.

use std::fmt;

/// A sentence turned into token ids, ready for the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tokens {
    /// Ids the model will see, including the special tokens, cut to the model's maximum length.
    pub ids: Vec<u32>,
    /// How many tokens the sentence had before truncation (special tokens included).
    pub untruncated_len: usize,
}

impl Tokens {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn was_truncated(&self) -> bool {
        self.untruncated_len > self.ids.len()
    }
}

#[derive(Debug)]
pub enum EmbedError {
    /// The tokenizer rejected the text.
    Tokenize(String),
    /// The forward pass failed. Not the client's fault.
    Inference(String),
}

impl fmt::Display for EmbedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EmbedError::Tokenize(e) => write!(f, "tokenization failed: {e}"),
            EmbedError::Inference(e) => write!(f, "inference failed: {e}"),
        }
    }
}

impl std::error::Error for EmbedError {}

/// A sentence-embedding model: tokenize, then embed batches of tokenized sentences into
/// L2-normalised vectors.
pub trait Embedder: Send + Sync {
    /// Length of every embedding vector.
    fn dimension(&self) -> usize;
    /// Longest token sequence the model sees (longer input is truncated).
    fn max_tokens(&self) -> usize;
    /// Tokenize one sentence, truncating it to `max_tokens()`.
    fn tokenize(&self, text: &str) -> Result<Tokens, EmbedError>;
    /// Embed one batch, padded to its longest member. Returns one pooled (not yet normalised)
    /// vector per input, in input order.
    fn embed_batch(&self, batch: &[&Tokens]) -> Result<Vec<Vec<f32>>, EmbedError>;
}

/// Scale to unit length, as sentence-transformers' Normalize module does (`F.normalize`, whose
/// epsilon keeps an all-zero vector at zero).
pub fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
}

/// Embed many tokenized sentences with as little padding as possible: sort by length, cut into
/// batches whose padded size (`longest × count`) stays within `max_batch_tokens`, and put the
/// results back in input order. One long sentence then no longer pads every short one to its
/// length. `unit` normalises every vector.
pub fn embed_all(
    embedder: &dyn Embedder,
    tokens: &[Tokens],
    max_batch_tokens: usize,
    unit: bool,
) -> Result<Vec<Vec<f32>>, EmbedError> {
    let mut order: Vec<usize> = (0..tokens.len()).collect();
    order.sort_by_key(|&i| tokens[i].len());

    let mut out: Vec<Vec<f32>> = vec![Vec::new(); tokens.len()];
    for batch in length_batches(&order, tokens, max_batch_tokens) {
        let refs: Vec<&Tokens> = batch.iter().map(|&i| &tokens[i]).collect();
        let vectors = embedder.embed_batch(&refs)?;
        for (&i, mut v) in batch.iter().zip(vectors) {
            if unit {
                normalize(&mut v);
            }
            out[i] = v;
        }
    }
    Ok(out)
}

/// Cut indices already sorted by token length into consecutive batches whose padded size stays
/// within the budget. A single sentence longer than the budget still forms a batch of one.
fn length_batches<'a>(
    sorted: &'a [usize],
    tokens: &[Tokens],
    max_batch_tokens: usize,
) -> Vec<&'a [usize]> {
    let mut batches = Vec::new();
    let mut start = 0;
    for end in 1..=sorted.len() {
        // Sorted ascending, so the newest member is the longest: the padded size is its length
        // times the member count.
        let longest = tokens[sorted[end - 1]].len().max(1);
        let fits = longest * (end - start) <= max_batch_tokens;
        if !fits && end - 1 > start {
            batches.push(&sorted[start..end - 1]);
            start = end - 1;
        }
    }
    if start < sorted.len() {
        batches.push(&sorted[start..]);
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Records batch shapes; embeds a sentence as [its length, first id]. The subject here is the
    /// batching, not the model.
    struct Recorder(Mutex<Vec<Vec<usize>>>);

    impl Embedder for Recorder {
        fn dimension(&self) -> usize {
            2
        }
        fn max_tokens(&self) -> usize {
            256
        }
        fn tokenize(&self, _: &str) -> Result<Tokens, EmbedError> {
            unreachable!("not used by embed_all")
        }
        fn embed_batch(&self, batch: &[&Tokens]) -> Result<Vec<Vec<f32>>, EmbedError> {
            self.0
                .lock()
                .unwrap()
                .push(batch.iter().map(|t| t.len()).collect());
            Ok(batch
                .iter()
                .map(|t| vec![t.len() as f32, t.ids[0] as f32])
                .collect())
        }
    }

    fn toks(lens: &[usize]) -> Vec<Tokens> {
        lens.iter()
            .enumerate()
            .map(|(i, &n)| Tokens {
                ids: vec![i as u32; n],
                untruncated_len: n,
            })
            .collect()
    }

    #[test]
    fn one_long_sentence_does_not_pad_the_short_ones() {
        let rec = Recorder(Mutex::new(Vec::new()));
        let input = toks(&[5, 200, 6, 4, 5]);
        let out = embed_all(&rec, &input, 256, false).unwrap();
        let batches = rec.0.into_inner().unwrap();
        assert_eq!(batches, vec![vec![4, 5, 5, 6], vec![200]]);
        // Results come back in input order.
        let lens: Vec<f32> = out.iter().map(|v| v[0]).collect();
        assert_eq!(lens, vec![5.0, 200.0, 6.0, 4.0, 5.0]);
        let ids: Vec<f32> = out.iter().map(|v| v[1]).collect();
        assert_eq!(ids, vec![0.0, 1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn budget_bounds_padded_tokens() {
        let rec = Recorder(Mutex::new(Vec::new()));
        let input = toks(&[10; 25]);
        embed_all(&rec, &input, 100, false).unwrap();
        let batches = rec.0.into_inner().unwrap();
        assert_eq!(
            batches.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![10, 10, 5]
        );
        for b in &batches {
            assert!(b.iter().max().unwrap() * b.len() <= 100);
        }
    }

    #[test]
    fn oversized_sentence_is_a_batch_of_one() {
        let rec = Recorder(Mutex::new(Vec::new()));
        embed_all(&rec, &toks(&[300, 3]), 100, false).unwrap();
        assert_eq!(rec.0.into_inner().unwrap(), vec![vec![3], vec![300]]);
    }

    #[test]
    fn normalize_gives_unit_length_and_keeps_zero() {
        let mut v = vec![3.0, 4.0];
        normalize(&mut v);
        assert_eq!(v, vec![0.6, 0.8]);
        let mut z = vec![0.0; 3];
        normalize(&mut z);
        assert_eq!(z, vec![0.0; 3]);
    }

    #[test]
    fn empty_input_embeds_nothing() {
        let rec = Recorder(Mutex::new(Vec::new()));
        assert!(embed_all(&rec, &[], 100, true).unwrap().is_empty());
        assert!(rec.0.into_inner().unwrap().is_empty());
    }
}
