//! A BERT encoder forward pass written for serving sentence embeddings on a CPU, in place of
//! candle-transformers' general `BertModel` (kept as the reference in the tests).
//!
//! What it does differently, and why it is faster:
//! - **No padding at all.** The sentences of a batch are packed one after another into a
//!   `[tokens, hidden]` matrix. Every linear layer runs once over the real tokens only; the
//!   attention runs per sentence, so it needs no mask and costs `n²` per sentence, not
//!   `longest² × batch`.
//! - **One matrix product for Q, K and V** (weights concatenated at load), written straight
//!   into one buffer whose column blocks the attention reads in place: no reshape, no
//!   `.contiguous()` copy, no transposed copies (strides do it).
//! - **Fused element-wise work**: bias is the product's starting value, the residual is added
//!   in the layer norm pass, GELU (erf) runs in place.
//! - Buffers are allocated once per batch and reused by all six layers.
//!
//! The weights are copied out of the safetensors map into plain `Vec<f32>` in the master before
//! fork, so every worker shares them copy-on-write, as before.

use candle_transformers::models::bert::Config as BertConfig;

use super::kernels::{gelu_erf, layer_norm, matmul, softmax, Linear, MatRef};
use super::weights::RawWeights;
use rayon::prelude::*;

struct LayerNorm {
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl LayerNorm {
    /// `x = LayerNorm(x + residual)` on every `width`-wide row of `x`.
    fn rows(&self, x: &mut [f32], residual: Option<&[f32]>, width: usize, eps: f32) {
        match residual {
            Some(r) => x
                .chunks_exact_mut(width)
                .zip(r.chunks_exact(width))
                .for_each(|(row, res)| layer_norm(row, Some(res), &self.weight, &self.bias, eps)),
            None => x
                .chunks_exact_mut(width)
                .for_each(|row| layer_norm(row, None, &self.weight, &self.bias, eps)),
        }
    }
}

struct Layer {
    qkv: Linear,
    attention_out: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

pub struct FastBert {
    word: Vec<f32>,
    position: Vec<f32>,
    token_type: Vec<f32>,
    embedding_norm: LayerNorm,
    layers: Vec<Layer>,
    hidden: usize,
    heads: usize,
    eps: f32,
    vocab: usize,
    max_positions: usize,
}

impl FastBert {
    pub fn new(config: &BertConfig, mut weights: RawWeights) -> Result<FastBert, String> {
        let hidden = config.hidden_size;
        let heads = config.num_attention_heads;
        if heads == 0 || hidden % heads != 0 {
            return Err(format!(
                "hidden size {hidden} is not a multiple of {heads} heads"
            ));
        }
        // Checkpoints name the tensors with or without a "bert." prefix.
        let prefix = if weights.contains_key("bert.embeddings.word_embeddings.weight") {
            "bert."
        } else {
            ""
        };
        let mut take = |name: &str, shape: &[usize]| -> Result<Vec<f32>, String> {
            let full = format!("{prefix}{name}");
            let (got, values) = weights
                .remove(&full)
                .ok_or_else(|| format!("tensor {full} missing"))?;
            if got != shape {
                return Err(format!("tensor {full}: shape {got:?}, expected {shape:?}"));
            }
            Ok(values)
        };
        let inter = config.intermediate_size;
        let word = take(
            "embeddings.word_embeddings.weight",
            &[config.vocab_size, hidden],
        )?;
        let position = take(
            "embeddings.position_embeddings.weight",
            &[config.max_position_embeddings, hidden],
        )?;
        let token_type = take(
            "embeddings.token_type_embeddings.weight",
            &[config.type_vocab_size, hidden],
        )?;
        let embedding_norm = LayerNorm {
            weight: take("embeddings.LayerNorm.weight", &[hidden])?,
            bias: take("embeddings.LayerNorm.bias", &[hidden])?,
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{i}.");
            let mut linear =
                |name: &str, inputs: usize, outputs: usize| -> Result<Linear, String> {
                    let w = take(&format!("{p}{name}.weight"), &[outputs, inputs])?;
                    let b = take(&format!("{p}{name}.bias"), &[outputs])?;
                    Ok(Linear::from_torch(&w, b, inputs, outputs))
                };
            let q = linear("attention.self.query", hidden, hidden)?;
            let k = linear("attention.self.key", hidden, hidden)?;
            let v = linear("attention.self.value", hidden, hidden)?;
            let attention_out = linear("attention.output.dense", hidden, hidden)?;
            let intermediate = linear("intermediate.dense", hidden, inter)?;
            let output = linear("output.dense", inter, hidden)?;
            let mut norm = |name: &str| -> Result<LayerNorm, String> {
                Ok(LayerNorm {
                    weight: take(&format!("{p}{name}.LayerNorm.weight"), &[hidden])?,
                    bias: take(&format!("{p}{name}.LayerNorm.bias"), &[hidden])?,
                })
            };
            layers.push(Layer {
                qkv: Linear::concat(&[q, k, v]),
                attention_out,
                attention_norm: norm("attention.output")?,
                intermediate,
                output,
                output_norm: norm("output")?,
            });
        }
        Ok(FastBert {
            word,
            position,
            token_type,
            embedding_norm,
            layers,
            hidden,
            heads,
            eps: config.layer_norm_eps as f32,
            vocab: config.vocab_size,
            max_positions: config.max_position_embeddings,
        })
    }

    /// Mean-pooled last hidden states, one vector per sentence (not normalised).
    ///
    /// With several threads, the sentences are split into that many groups of about equal
    /// token counts, each run through the whole network on its own thread: every product stays
    /// large enough to be efficient and the threads share nothing but the weights. (gemm's own
    /// parallelism scales poorly on the few dozen rows a request has.) A single sentence uses
    /// gemm's parallelism instead.
    pub fn embed(&self, sentences: &[&[u32]], threads: usize) -> Result<Vec<Vec<f32>>, String> {
        if threads <= 1 || sentences.len() <= 1 {
            return self.embed_group(sentences, threads);
        }
        let groups = split_by_tokens(sentences, threads);
        let results: Vec<Result<Vec<Vec<f32>>, String>> = groups
            .into_par_iter()
            .map(|group| self.embed_group(group, 1))
            .collect();
        let mut out = Vec::with_capacity(sentences.len());
        for r in results {
            out.extend(r?);
        }
        Ok(out)
    }

    fn embed_group(&self, sentences: &[&[u32]], threads: usize) -> Result<Vec<Vec<f32>>, String> {
        let h = self.hidden;
        let total: usize = sentences.iter().map(|s| s.len()).sum();
        if total == 0 {
            return Ok(vec![vec![0.0; h]; sentences.len()]);
        }
        let mut x = vec![0f32; total * h];
        let mut row = 0;
        for ids in sentences {
            if ids.len() > self.max_positions {
                return Err(format!(
                    "{} tokens, more than {} positions",
                    ids.len(),
                    self.max_positions
                ));
            }
            for (pos, &id) in ids.iter().enumerate() {
                let id = id as usize;
                if id >= self.vocab {
                    return Err(format!("token id {id} outside the vocabulary"));
                }
                let out = &mut x[row * h..(row + 1) * h];
                let w = &self.word[id * h..(id + 1) * h];
                let p = &self.position[pos * h..(pos + 1) * h];
                let t = &self.token_type[..h];
                for c in 0..h {
                    out[c] = w[c] + p[c] + t[c];
                }
                row += 1;
            }
        }
        self.embedding_norm.rows(&mut x, None, h, self.eps);

        let inter = self.layers.first().map_or(0, |l| l.intermediate.outputs);
        let mut qkv = vec![0f32; total * 3 * h];
        let mut context = vec![0f32; total * h];
        let mut projected = vec![0f32; total * h];
        let mut intermediate = vec![0f32; total * inter];
        let longest = sentences.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut scores = vec![0f32; longest * longest];
        for layer in &self.layers {
            layer.qkv.forward(&x, total, &mut qkv, threads);
            self.attention(&qkv, sentences, &mut context, &mut scores);
            layer
                .attention_out
                .forward(&context, total, &mut projected, threads);
            let rows = total * h;
            layer
                .attention_norm
                .rows(&mut projected[..rows], Some(&x[..rows]), h, self.eps);
            std::mem::swap(&mut x, &mut projected);
            layer
                .intermediate
                .forward(&x, total, &mut intermediate, threads);
            gelu_erf(&mut intermediate[..total * inter]);
            layer
                .output
                .forward(&intermediate, total, &mut projected, threads);
            layer
                .output_norm
                .rows(&mut projected[..rows], Some(&x[..rows]), h, self.eps);
            std::mem::swap(&mut x, &mut projected);
        }

        let mut pooled = Vec::with_capacity(sentences.len());
        let mut start = 0;
        for ids in sentences {
            let n = ids.len();
            let mut mean = vec![0f32; h];
            for r in start..start + n {
                for (m, v) in mean.iter_mut().zip(&x[r * h..(r + 1) * h]) {
                    *m += v;
                }
            }
            let scale = 1.0 / n.max(1) as f32;
            mean.iter_mut().for_each(|m| *m *= scale);
            pooled.push(mean);
            start += n;
        }
        Ok(pooled)
    }

    /// Self-attention for every sentence and head, reading Q, K and V in place from the
    /// packed `[tokens, 3·hidden]` buffer and writing each head's output into its columns of
    /// `context`.
    fn attention(
        &self,
        qkv: &[f32],
        sentences: &[&[u32]],
        context: &mut [f32],
        scores: &mut [f32],
    ) {
        let h = self.hidden;
        let d = h / self.heads;
        let scale = 1.0 / (d as f32).sqrt();
        let stride = 3 * h;
        let mut start = 0;
        for ids in sentences {
            let n = ids.len();
            for head in 0..self.heads {
                let q = MatRef::new(&qkv[start * stride + head * d..], n, d, stride, 1);
                // Kᵀ: element (c, j) is K[j][c].
                let kt = MatRef::new(&qkv[start * stride + h + head * d..], d, n, 1, stride);
                let s = &mut scores[..n * n];
                matmul(s, n, 1, false, q, kt, scale, 1);
                for r in 0..n {
                    softmax(&mut s[r * n..(r + 1) * n]);
                }
                let p = MatRef::new(&s[..], n, n, n, 1);
                let v = MatRef::new(&qkv[start * stride + 2 * h + head * d..], n, d, stride, 1);
                matmul(
                    &mut context[start * h + head * d..],
                    h,
                    1,
                    false,
                    p,
                    v,
                    1.0,
                    1,
                );
            }
            start += n;
        }
    }
}

/// Cut `sentences` into at most `parts` consecutive groups of about equal token counts.
fn split_by_tokens<'a>(sentences: &'a [&'a [u32]], parts: usize) -> Vec<&'a [&'a [u32]]> {
    let total: usize = sentences.iter().map(|s| s.len()).sum();
    let target = total.div_ceil(parts.max(1)).max(1);
    let mut groups = Vec::with_capacity(parts);
    let (mut start, mut tokens) = (0, 0);
    for (i, s) in sentences.iter().enumerate() {
        tokens += s.len();
        if tokens >= target && groups.len() + 1 < parts {
            groups.push(&sentences[start..=i]);
            start = i + 1;
            tokens = 0;
        }
    }
    if start < sentences.len() {
        groups.push(&sentences[start..]);
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_by_tokens_balances_and_keeps_order() {
        let a = [1u32; 10];
        let b = [1u32; 3];
        let sentences: Vec<&[u32]> = vec![&a, &b, &b, &b, &a];
        let groups = split_by_tokens(&sentences, 2);
        assert_eq!(groups.len(), 2);
        assert_eq!(groups.iter().map(|g| g.len()).sum::<usize>(), 5);
        assert_eq!(groups[0].len(), 3); // 10 + 3 + 3 >= 15 of 29 tokens
        assert_eq!(split_by_tokens(&sentences, 1).len(), 1);
        assert_eq!(split_by_tokens(&sentences[..1], 4).len(), 1);
    }
}
