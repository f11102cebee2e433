//! sentence-transformers' `Pooling` module: token vectors in, one sentence vector out.
//!
//! It runs on the packed hidden states of `fast.rs` (sentence after sentence, no padding), so
//! "the attention mask" is simply each sentence's own tokens, minus the prompt's tokens when
//! the model says `include_prompt: false`. Each mode follows what sentence-transformers 6.2
//! computes on a right-padded batch (`Pooling._forward_padded`), including what it gives when
//! the prompt covers the whole (truncated) sentence.

use crate::embedder::Tokens;

/// One pooling strategy, by sentence-transformers' name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolingMode {
    /// The first token that is not part of an excluded prompt (`[CLS]` otherwise).
    Cls,
    /// Element-wise maximum.
    Max,
    Mean,
    /// Sum divided by the square root of the token count.
    MeanSqrtLen,
    /// Mean weighted by position (1, 2, 3, ... from the first token of the sentence).
    WeightedMean,
    /// The last token.
    LastToken,
}

impl PoolingMode {
    /// The name sentence-transformers gives the mode in `pooling_mode`.
    pub fn parse(name: &str) -> Option<PoolingMode> {
        Some(match name {
            "cls" => PoolingMode::Cls,
            "max" => PoolingMode::Max,
            "mean" => PoolingMode::Mean,
            "mean_sqrt_len_tokens" => PoolingMode::MeanSqrtLen,
            "weightedmean" => PoolingMode::WeightedMean,
            "lasttoken" => PoolingMode::LastToken,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            PoolingMode::Cls => "cls",
            PoolingMode::Max => "max",
            PoolingMode::Mean => "mean",
            PoolingMode::MeanSqrtLen => "mean_sqrt_len_tokens",
            PoolingMode::WeightedMean => "weightedmean",
            PoolingMode::LastToken => "lasttoken",
        }
    }

    /// The legacy boolean keys of `1_Pooling/config.json`, in the order sentence-transformers
    /// concatenates them when several are true.
    pub const LEGACY_KEYS: [(&'static str, PoolingMode); 6] = [
        ("pooling_mode_cls_token", PoolingMode::Cls),
        ("pooling_mode_max_tokens", PoolingMode::Max),
        ("pooling_mode_mean_tokens", PoolingMode::Mean),
        (
            "pooling_mode_mean_sqrt_len_tokens",
            PoolingMode::MeanSqrtLen,
        ),
        (
            "pooling_mode_weightedmean_tokens",
            PoolingMode::WeightedMean,
        ),
        ("pooling_mode_lasttoken", PoolingMode::LastToken),
    ];
}

/// The modes to concatenate, in order, and whether prompt tokens take part.
#[derive(Clone, Debug, PartialEq)]
pub struct Pooling {
    pub modes: Vec<PoolingMode>,
    pub include_prompt: bool,
}

impl Pooling {
    /// What a plain transformers directory gets from sentence-transformers.
    pub fn mean() -> Pooling {
        Pooling {
            modes: vec![PoolingMode::Mean],
            include_prompt: true,
        }
    }

    pub fn output_dimension(&self, hidden: usize) -> usize {
        self.modes.len() * hidden
    }

    /// One vector per sentence from `states`, the packed `[Σ tokens, hidden]` hidden states of
    /// `sentences` in order.
    pub fn pool(&self, states: &[f32], hidden: usize, sentences: &[&Tokens]) -> Vec<Vec<f32>> {
        let mut out = Vec::with_capacity(sentences.len());
        let mut start = 0;
        for tokens in sentences {
            let n = tokens.len();
            let rows = &states[start * hidden..(start + n) * hidden];
            let skip = if self.include_prompt {
                0
            } else {
                tokens.prompt_len.min(n)
            };
            let mut vector = Vec::with_capacity(self.output_dimension(hidden));
            for mode in &self.modes {
                pool_one(*mode, rows, hidden, skip, &mut vector);
            }
            out.push(vector);
            start += n;
        }
        out
    }
}

/// Append `mode`'s vector for one sentence: `rows` are its `n × hidden` states, the first
/// `skip` of which (the prompt) are masked out.
fn pool_one(mode: PoolingMode, rows: &[f32], hidden: usize, skip: usize, out: &mut Vec<f32>) {
    let n = rows.len() / hidden;
    let row = |i: usize| &rows[i * hidden..(i + 1) * hidden];
    // The tokens that take part; empty only when the prompt covers the whole sentence.
    let kept = skip..n;
    match mode {
        // sentence-transformers takes the argmax of the mask: the first kept token, or token 0
        // when none is kept.
        PoolingMode::Cls => out.extend_from_slice(row(if kept.is_empty() { 0 } else { skip })),
        // With nothing kept, every value is masked to -inf, as in sentence-transformers.
        PoolingMode::Max => {
            let mut max = vec![f32::NEG_INFINITY; hidden];
            for i in kept {
                for (m, v) in max.iter_mut().zip(row(i)) {
                    *m = m.max(*v);
                }
            }
            out.extend(max);
        }
        PoolingMode::Mean | PoolingMode::MeanSqrtLen => {
            let mut sum = vec![0f32; hidden];
            for i in kept.clone() {
                sum.iter_mut().zip(row(i)).for_each(|(s, v)| *s += v);
            }
            // The mask's sum is clamped at 1e-9, so an empty mask gives zeros.
            let count = (kept.len() as f32).max(1e-9);
            let divisor = match mode {
                PoolingMode::Mean => count,
                _ => count.sqrt(),
            };
            out.extend(sum.iter().map(|s| s / divisor));
        }
        PoolingMode::WeightedMean => {
            // Weights are positions counted from 1 at the sentence's first token; an excluded
            // prompt keeps the remaining tokens' original weights.
            let mut sum = vec![0f32; hidden];
            let mut weights = 0f32;
            for i in kept {
                let w = (i + 1) as f32;
                weights += w;
                sum.iter_mut().zip(row(i)).for_each(|(s, v)| *s += w * v);
            }
            let weights = weights.max(1e-9);
            out.extend(sum.iter().map(|s| s / weights));
        }
        // The last kept token; zeros when none is kept (the masked gather).
        PoolingMode::LastToken => match kept.is_empty() {
            true => out.extend(std::iter::repeat_n(0.0, hidden)),
            false => out.extend_from_slice(row(n - 1)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(n: usize, prompt_len: usize) -> Tokens {
        Tokens {
            ids: vec![0; n],
            untruncated_len: n,
            prompt_len,
        }
    }

    /// Two sentences of 3 and 2 tokens, hidden 2: token t of the packed batch is [t, -t].
    fn states() -> Vec<f32> {
        (0..5).flat_map(|t| [t as f32, -(t as f32)]).collect()
    }

    fn pool(modes: &[PoolingMode], include_prompt: bool, prompt: usize) -> Vec<Vec<f32>> {
        let a = tokens(3, prompt);
        let b = tokens(2, prompt);
        Pooling {
            modes: modes.to_vec(),
            include_prompt,
        }
        .pool(&states(), 2, &[&a, &b])
    }

    #[test]
    fn each_mode_on_packed_sentences() {
        use PoolingMode::*;
        assert_eq!(pool(&[Cls], true, 0), [[0.0, 0.0], [3.0, -3.0]]);
        assert_eq!(pool(&[Max], true, 0), [[2.0, 0.0], [4.0, -3.0]]);
        assert_eq!(pool(&[Mean], true, 0), [[1.0, -1.0], [3.5, -3.5]]);
        let s = pool(&[MeanSqrtLen], true, 0);
        assert!((s[0][0] - 3.0 / 3f32.sqrt()).abs() < 1e-6);
        // Weights 1, 2, 3: (0·1 + 1·2 + 2·3) / 6.
        let w = pool(&[WeightedMean], true, 0);
        assert!((w[0][0] - 8.0 / 6.0).abs() < 1e-6);
        assert!((w[1][0] - (3.0 + 8.0) / 3.0).abs() < 1e-6);
        assert_eq!(pool(&[LastToken], true, 0), [[2.0, -2.0], [4.0, -4.0]]);
        // Concatenated in the given order.
        assert_eq!(pool(&[Mean, Cls], true, 0)[0], vec![1.0, -1.0, 0.0, 0.0]);
    }

    #[test]
    fn an_excluded_prompt_is_masked_out() {
        use PoolingMode::*;
        // The first token of each sentence is the prompt.
        assert_eq!(pool(&[Cls], false, 1), [[1.0, -1.0], [4.0, -4.0]]);
        assert_eq!(pool(&[Mean], false, 1), [[1.5, -1.5], [4.0, -4.0]]);
        // Included, the prompt counts.
        assert_eq!(pool(&[Mean], true, 1), [[1.0, -1.0], [3.5, -3.5]]);
        // Positions keep their weights: tokens 1 and 2 weigh 2 and 3.
        let w = pool(&[WeightedMean], false, 1);
        assert!((w[0][0] - (2.0 + 6.0) / 5.0).abs() < 1e-6);
        // A prompt as long as the sentence leaves nothing: sentence-transformers' values.
        assert_eq!(pool(&[Mean], false, 3)[0], [0.0, 0.0]);
        assert_eq!(pool(&[Cls], false, 3)[0], [0.0, 0.0]);
        assert_eq!(pool(&[LastToken], false, 3)[0], [0.0, 0.0]);
        assert!(pool(&[Max], false, 3)[0]
            .iter()
            .all(|v| *v == f32::NEG_INFINITY));
    }

    #[test]
    fn names_round_trip() {
        for (_, mode) in PoolingMode::LEGACY_KEYS {
            assert_eq!(PoolingMode::parse(mode.name()), Some(mode));
        }
        assert_eq!(PoolingMode::parse("median"), None);
    }
}
