//! The seam between serving and the model. The HTTP app and the clustering see an `Embedder`,
//! never a candle type, so the model implementation can change (or be faked in a unit test whose
//! subject is not the model) without touching them.

use std::collections::BTreeMap;
use std::fmt;

/// A sentence turned into token ids, ready for the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tokens {
    /// Ids the model will see, including the special tokens, cut to the model's maximum length.
    pub ids: Vec<u32>,
    /// How many tokens the sentence had before truncation (special tokens included).
    pub untruncated_len: usize,
    /// Leading tokens that belong to the prompt, which a model with `include_prompt: false`
    /// leaves out of its pooling (0 without a prompt).
    pub prompt_len: usize,
}

/// The model as the API describes it: what `SentenceTransformer` would say of itself.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelInfo {
    /// The encoder family (`bert`, `roberta`, `mpnet`) and its `model_type` as written.
    pub architecture: String,
    pub model_type: String,
    /// Pooling modes, concatenated in this order.
    pub pooling: Vec<&'static str>,
    /// Dense modules after the pooling: "in -> out activation" each.
    pub dense: Vec<String>,
    /// Length of the vectors `encode` returns (after Dense modules).
    pub dimension: usize,
    /// Longest token sequence the model sees (longer input is truncated).
    pub max_tokens: usize,
    pub prompts: BTreeMap<String, String>,
    pub default_prompt_name: Option<String>,
    /// `similarity_fn_name`: cosine, dot, euclidean or manhattan.
    pub similarity: String,
    /// Whether `encode` ends with a Normalize module (unit-length vectors).
    pub normalized: bool,
    /// Token ids are below this.
    pub vocab_size: usize,
    /// The forward pass pads a batch to its longest sentence (candle's); false for forkserve's
    /// own, which packs sentences without padding.
    pub padded_batches: bool,
    /// How the encoder's weights are kept in memory.
    pub precision: crate::model::Precision,
    /// Transformer layers. forkserve's own pass reports progress after each (candle's only
    /// after the whole pass), which bounds the longest step the master's `timeout` sees.
    pub layers: usize,
}

impl ModelInfo {
    /// The prompt text `encode(prompt_name=name)` prepends: the named prompt, or the model's
    /// default prompt when no name is given. An unknown name is an error that lists the known
    /// ones.
    pub fn prompt(&self, name: Option<&str>) -> Result<Option<&str>, String> {
        match name {
            Some(name) => match self.prompts.get(name) {
                Some(text) => Ok(Some(text)),
                None if self.prompts.is_empty() => Err(format!(
                    "unknown prompt {name:?}: this model defines no prompts"
                )),
                None => Err(format!(
                    "unknown prompt {name:?}; this model has: {}",
                    self.prompts.keys().cloned().collect::<Vec<_>>().join(", ")
                )),
            },
            None => Ok(self
                .default_prompt_name
                .as_deref()
                .and_then(|n| self.prompts.get(n))
                .map(String::as_str)),
        }
    }
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

/// The end of an over-long input that truncation cuts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Left,
    Right,
}

/// One token of a tokenized text, as TEI's `/tokenize` shows it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TokenPiece {
    pub id: u32,
    pub text: String,
    pub special: bool,
    /// Byte offsets of the piece in the text (None for added special tokens).
    pub start: Option<usize>,
    pub stop: Option<usize>,
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

/// A sentence-embedding model: tokenize, then embed batches of tokenized sentences.
pub trait Embedder: Send + Sync {
    fn info(&self) -> &ModelInfo;
    /// Tokenize one sentence with `prompt` in front of it (as `encode(prompt=...)` does),
    /// truncating the whole to `max_tokens()` at `side` (None: the model's own side).
    fn tokenize_at(
        &self,
        text: &str,
        prompt: Option<&str>,
        side: Option<Side>,
    ) -> Result<Tokens, EmbedError>;
    /// Embed one batch. Returns one vector per input, in input order: what `encode` returns,
    /// except that a final Normalize module is left to the caller (`embed_all`), because
    /// TEI's `normalize: false` asks for the vector before it.
    fn embed_batch(&self, batch: &[&Tokens]) -> Result<Vec<Vec<f32>>, EmbedError>;
    /// The transformer's last hidden state of every token of every input (TEI's
    /// `/embed_all`).
    fn embed_tokens(&self, batch: &[&Tokens]) -> Result<Vec<Vec<Vec<f32>>>, EmbedError>;
    /// The pieces of `prompt + text`, with or without the model's special tokens, not
    /// truncated (TEI's `/tokenize`).
    fn pieces(
        &self,
        text: &str,
        prompt: Option<&str>,
        add_special_tokens: bool,
    ) -> Result<Vec<TokenPiece>, EmbedError>;
    /// Text from token ids (TEI's `/decode`).
    fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, EmbedError>;

    /// `tokenize_at` on the model's own truncation side.
    fn tokenize(&self, text: &str, prompt: Option<&str>) -> Result<Tokens, EmbedError> {
        self.tokenize_at(text, prompt, None)
    }
    /// Length of every embedding vector.
    fn dimension(&self) -> usize {
        self.info().dimension
    }
    /// Longest token sequence the model sees (longer input is truncated).
    fn max_tokens(&self) -> usize {
        self.info().max_tokens
    }
}

/// Scale to unit length, as sentence-transformers' Normalize module does (`F.normalize`, whose
/// epsilon keeps an all-zero vector at zero).
pub fn unit_length(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
}

/// Embed many tokenized sentences with as little padding as possible: sort by length, cut into
/// batches whose padded size (`longest × count`) stays within `max_batch_tokens`, and put the
/// results back in input order. One long sentence then no longer pads every short one to its
/// length. `normalize` scales every vector to unit length.
pub fn embed_all(
    embedder: &dyn Embedder,
    tokens: &[Tokens],
    max_batch_tokens: usize,
    normalize: bool,
) -> Result<Vec<Vec<f32>>, EmbedError> {
    let mut order: Vec<usize> = (0..tokens.len()).collect();
    order.sort_by_key(|&i| tokens[i].len());

    let mut out: Vec<Vec<f32>> = vec![Vec::new(); tokens.len()];
    for batch in length_batches(&order, tokens, max_batch_tokens) {
        let refs: Vec<&Tokens> = batch.iter().map(|&i| &tokens[i]).collect();
        let vectors = embedder.embed_batch(&refs)?;
        for (&i, mut v) in batch.iter().zip(vectors) {
            if normalize {
                unit_length(&mut v);
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
    struct Recorder(Mutex<Vec<Vec<usize>>>, ModelInfo);

    impl Recorder {
        fn new() -> Recorder {
            Recorder(
                Mutex::new(Vec::new()),
                ModelInfo {
                    dimension: 2,
                    max_tokens: 256,
                    ..ModelInfo::default()
                },
            )
        }
    }

    impl Embedder for Recorder {
        fn info(&self) -> &ModelInfo {
            &self.1
        }
        fn tokenize_at(
            &self,
            _: &str,
            _: Option<&str>,
            _: Option<Side>,
        ) -> Result<Tokens, EmbedError> {
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
        fn embed_tokens(&self, _: &[&Tokens]) -> Result<Vec<Vec<Vec<f32>>>, EmbedError> {
            unreachable!("not used by embed_all")
        }
        fn pieces(&self, _: &str, _: Option<&str>, _: bool) -> Result<Vec<TokenPiece>, EmbedError> {
            unreachable!("not used by embed_all")
        }
        fn decode(&self, _: &[u32], _: bool) -> Result<String, EmbedError> {
            unreachable!("not used by embed_all")
        }
    }

    fn toks(lens: &[usize]) -> Vec<Tokens> {
        lens.iter()
            .enumerate()
            .map(|(i, &n)| Tokens {
                ids: vec![i as u32; n],
                untruncated_len: n,
                prompt_len: 0,
            })
            .collect()
    }

    #[test]
    fn one_long_sentence_does_not_pad_the_short_ones() {
        let rec = Recorder::new();
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
        let rec = Recorder::new();
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
        let rec = Recorder::new();
        embed_all(&rec, &toks(&[300, 3]), 100, false).unwrap();
        assert_eq!(rec.0.into_inner().unwrap(), vec![vec![3], vec![300]]);
    }

    #[test]
    fn normalize_gives_unit_length_and_keeps_zero() {
        let mut v = vec![3.0, 4.0];
        unit_length(&mut v);
        assert_eq!(v, vec![0.6, 0.8]);
        let mut z = vec![0.0; 3];
        unit_length(&mut z);
        assert_eq!(z, vec![0.0; 3]);
    }

    #[test]
    fn empty_input_embeds_nothing() {
        let rec = Recorder::new();
        assert!(embed_all(&rec, &[], 100, true).unwrap().is_empty());
        assert!(rec.0.into_inner().unwrap().is_empty());
    }
}
