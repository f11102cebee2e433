//! A transformer encoder forward pass written for serving sentence embeddings on a CPU, in
//! place of candle-transformers' general models (kept as references in the tests). It runs the
//! three encoder families of `architecture.rs`: BERT, RoBERTa / XLM-RoBERTa and MPNet.
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
//!   in the layer norm pass, the activation runs in place. MPNet's relative position bias is a
//!   table per head indexed by distance, so adding it to a row of scores is one slice add.
//! - Buffers are reused by every layer, and kept by the thread for its next pass (`reuse.rs`).
//!
//! The weights are copied out of the safetensors map into plain `Vec<f32>` in the master before
//! fork, so every worker shares them copy-on-write.

use super::aligned::Aligned;
use super::architecture::{mpnet_bucket, EncoderConfig, Family, HiddenAct, MPNET_BUCKETS};
use super::kernels::{
    attention_scores, attention_values, gelu_erf, gelu_tanh, layer_norm, matmul, relu, silu,
    softmax, HeadRows, MatRef,
};
use super::linear::{prefetch, Linear, Precision};
use super::region::{self, RegionBuilder};
use super::reuse;
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

/// Tensor names of one layer, relative to `encoder.layer.{i}.`.
struct LayerNames {
    q: &'static str,
    k: &'static str,
    v: &'static str,
    attention_out: &'static str,
    attention_norm: &'static str,
}

impl LayerNames {
    fn of(family: Family) -> LayerNames {
        match family {
            Family::Bert | Family::Roberta => LayerNames {
                q: "attention.self.query",
                k: "attention.self.key",
                v: "attention.self.value",
                attention_out: "attention.output.dense",
                attention_norm: "attention.output.LayerNorm",
            },
            Family::MPNet => LayerNames {
                q: "attention.attn.q",
                k: "attention.attn.k",
                v: "attention.attn.v",
                attention_out: "attention.attn.o",
                attention_norm: "attention.LayerNorm",
            },
        }
    }
}

/// MPNet's relative position bias, per head, by distance: `by_head[h][j - i + span]` is what
/// head `h` adds to the score of query `i` for key `j`.
struct RelativeBias {
    span: usize,
    by_head: Vec<Vec<f32>>,
}

pub struct FastEncoder {
    word: Vec<f32>,
    position: Vec<f32>,
    /// Row 0 of the token type table (every token is of type 0); None for MPNet.
    token_type: Option<Vec<f32>>,
    embedding_norm: LayerNorm,
    layers: Vec<Layer>,
    relative_bias: Option<RelativeBias>,
    hidden: usize,
    heads: usize,
    eps: f32,
    vocab: usize,
    max_positions: usize,
    position_offset: usize,
    padding_idx: Option<u32>,
    act: HiddenAct,
}

impl FastEncoder {
    /// The encoder of `config` from its weights, the linear layers' weights kept in
    /// `precision`.
    pub fn new(
        config: &EncoderConfig,
        mut weights: RawWeights,
        precision: Precision,
    ) -> Result<FastEncoder, String> {
        let hidden = config.hidden;
        let heads = config.heads;
        // Checkpoints name the tensors with or without the model's prefix ("bert.",
        // "roberta.", "mpnet."): a masked-LM checkpoint keeps its base model under it.
        let prefix = ["", "bert.", "roberta.", "mpnet.", "model."]
            .into_iter()
            .find(|p| weights.contains(&format!("{p}embeddings.word_embeddings.weight")))
            .ok_or("tensor embeddings.word_embeddings.weight missing")?;
        let mut take =
            |name: &str, shape: &[usize]| weights.take(&format!("{prefix}{name}"), shape);
        let inter = config.intermediate;
        let word = take("embeddings.word_embeddings.weight", &[config.vocab, hidden])?;
        let position = take(
            "embeddings.position_embeddings.weight",
            &[config.max_positions, hidden],
        )?;
        let token_type = match config.family {
            Family::MPNet => None,
            _ => {
                let table = take(
                    "embeddings.token_type_embeddings.weight",
                    &[config.type_vocab, hidden],
                )?;
                Some(table[..hidden].to_vec())
            }
        };
        let embedding_norm = LayerNorm {
            weight: take("embeddings.LayerNorm.weight", &[hidden])?,
            bias: take("embeddings.LayerNorm.bias", &[hidden])?,
        };
        let names = LayerNames::of(config.family);
        let mut layers = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let p = format!("encoder.layer.{i}.");
            let mut tensors = |name: &str,
                               inputs: usize,
                               outputs: usize|
             -> Result<(Vec<f32>, Vec<f32>), String> {
                let w = take(&format!("{p}{name}.weight"), &[outputs, inputs])?;
                let b = take(&format!("{p}{name}.bias"), &[outputs])?;
                Ok((w, b))
            };
            let (q, k, v) = (
                tensors(names.q, hidden, hidden)?,
                tensors(names.k, hidden, hidden)?,
                tensors(names.v, hidden, hidden)?,
            );
            let stored = |linear: Linear, name: &str| {
                linear.in_precision(precision).map_err(|e| {
                    format!("{p}{name}: {e}: set model.precision = \"f32\" for this model")
                })
            };
            // Q, K and V as one product: one pass over the activations instead of three.
            let qkv = Linear::from_torch_parts(&[(&q.0, &q.1), (&k.0, &k.1), (&v.0, &v.1)], hidden);
            let qkv = stored(qkv, names.q)?;
            let mut linear =
                |name: &str, inputs: usize, outputs: usize| -> Result<Linear, String> {
                    let (w, b) = tensors(name, inputs, outputs)?;
                    stored(Linear::from_torch(&w, b, inputs, outputs), name)
                };
            let attention_out = linear(names.attention_out, hidden, hidden)?;
            let intermediate = linear("intermediate.dense", hidden, inter)?;
            let output = linear("output.dense", inter, hidden)?;
            let mut norm = |name: &str| -> Result<LayerNorm, String> {
                Ok(LayerNorm {
                    weight: take(&format!("{p}{name}.weight"), &[hidden])?,
                    bias: take(&format!("{p}{name}.bias"), &[hidden])?,
                })
            };
            layers.push(Layer {
                qkv,
                attention_out,
                attention_norm: norm(names.attention_norm)?,
                intermediate,
                output,
                output_norm: norm("output.LayerNorm")?,
            });
        }
        let relative_bias = match config.family {
            Family::MPNet => {
                let table = take(
                    "encoder.relative_attention_bias.weight",
                    &[config.relative_buckets, heads],
                )?;
                let span = config.max_tokens().max(1) - 1;
                let by_head = (0..heads)
                    .map(|h| {
                        (0..=2 * span)
                            .map(|k| {
                                let bucket = mpnet_bucket(k as i64 - span as i64);
                                debug_assert!(bucket < MPNET_BUCKETS);
                                table[bucket * heads + h]
                            })
                            .collect()
                    })
                    .collect();
                Some(RelativeBias { span, by_head })
            }
            _ => None,
        };
        move_to_region(&mut layers)?;
        Ok(FastEncoder {
            word,
            position,
            token_type,
            embedding_norm,
            layers,
            relative_bias,
            hidden,
            heads,
            eps: config.layer_norm_eps as f32,
            vocab: config.vocab,
            max_positions: config.max_positions,
            position_offset: config.position_offset,
            padding_idx: config.padding_idx,
            act: config.act,
        })
    }

    /// The last hidden states of every token, packed: `[Σ tokens, hidden]`, sentence after
    /// sentence in input order.
    ///
    /// With several threads, the sentences are split into that many groups of about equal
    /// token counts, each run through the whole network on its own thread: every product stays
    /// large enough to be efficient and the threads share nothing but the weights. (gemm's own
    /// parallelism scales poorly on the few dozen rows a request has.) A single sentence
    /// splits each product's outputs between the threads instead (`Linear::forward`).
    ///
    /// The states are in a buffer of the calling thread's (`reuse`): give it back when done.
    pub fn hidden_states(
        &self,
        sentences: &[&[u32]],
        threads: usize,
    ) -> Result<Aligned<f32>, String> {
        if threads <= 1 || sentences.len() <= 1 {
            return self.run_group(sentences, threads);
        }
        let groups = split_by_tokens(sentences, threads);
        let results: Vec<Result<Aligned<f32>, String>> = groups
            .into_par_iter()
            .map(|group| self.run_group(group, 1))
            .collect();
        let mut out = reuse::buffer(sentences.iter().map(|s| s.len()).sum::<usize>() * self.hidden);
        let mut at = 0;
        for r in results {
            let r = r?;
            out[at..at + r.len()].copy_from_slice(&r);
            at += r.len();
            reuse::give_back(r);
        }
        Ok(out)
    }

    /// Word + position (+ token type) embeddings of every token, layer-normed.
    fn embed_tokens(&self, sentences: &[&[u32]], x: &mut [f32]) -> Result<(), String> {
        let h = self.hidden;
        let mut row = 0;
        for ids in sentences {
            let mut counted = 0;
            for (i, &id) in ids.iter().enumerate() {
                // RoBERTa and MPNet count positions from the padding index and give a padding
                // token found in the text the padding position (transformers'
                // create_position_ids_from_input_ids); BERT counts from 0.
                let pos = match self.padding_idx {
                    None => i,
                    Some(pad) if id == pad => pad as usize,
                    Some(_) => {
                        counted += 1;
                        self.position_offset - 1 + counted
                    }
                };
                if pos >= self.max_positions {
                    return Err(format!(
                        "{} tokens, more than the model's {} positions",
                        ids.len(),
                        self.max_positions - self.position_offset
                    ));
                }
                let id = id as usize;
                if id >= self.vocab {
                    return Err(format!("token id {id} outside the vocabulary"));
                }
                let out = &mut x[row * h..(row + 1) * h];
                let w = &self.word[id * h..(id + 1) * h];
                let p = &self.position[pos * h..(pos + 1) * h];
                match &self.token_type {
                    Some(t) => {
                        for c in 0..h {
                            out[c] = w[c] + p[c] + t[c];
                        }
                    }
                    None => {
                        for c in 0..h {
                            out[c] = w[c] + p[c];
                        }
                    }
                }
                row += 1;
            }
        }
        self.embedding_norm.rows(x, None, h, self.eps);
        Ok(())
    }

    /// The hidden states of `sentences`' tokens, in a buffer kept by this thread (`reuse`).
    fn run_group(&self, sentences: &[&[u32]], threads: usize) -> Result<Aligned<f32>, String> {
        let h = self.hidden;
        let total: usize = sentences.iter().map(|s| s.len()).sum();
        if total == 0 {
            return Ok(Aligned::default());
        }
        // Kept by the thread from pass to pass (`reuse`), as are the result's (`x`'s): a new
        // one for every pass was mapped, faulted in page by page and unmapped (malloc maps
        // blocks of 128 KiB and more afresh).
        let mut x = reuse::buffer(total * h);
        self.embed_tokens(sentences, &mut x)?;

        let inter = self.layers.first().map_or(0, |l| l.intermediate.outputs);
        let mut qkv = reuse::buffer(total * 3 * h);
        let mut context = reuse::buffer(total * h);
        let mut projected = reuse::buffer(total * h);
        // The first chunk is the widest (`ffn_chunks`).
        let widest = ffn_chunks(total).next().map_or(0, |(_, rows)| rows);
        let mut intermediate = reuse::buffer(widest * inter);
        let longest = sentences.iter().map(|s| s.len()).max().unwrap_or(0);
        // The scores of the longest sentence, and room for K transposed (`short_attention`).
        let mut scores = reuse::buffer(longest * longest + longest * h / self.heads.max(1));
        for layer in &self.layers {
            // A pass over many tokens may outlast the master's `timeout`; each layer is a step.
            crate::busy::progressed();
            layer.qkv.forward(&x, total, &mut qkv, threads);
            self.attention(&qkv, sentences, &mut context, &mut scores);
            layer
                .attention_out
                .forward(&context, total, &mut projected, threads);
            let values = total * h;
            layer
                .attention_norm
                .rows(&mut projected[..values], Some(&x[..values]), h, self.eps);
            std::mem::swap(&mut x, &mut projected);
            // The feed-forward block a chunk of rows at a time, so that its widest buffer
            // (`intermediate`, four times the hidden size) holds one chunk, not the pass.
            for (first, rows) in ffn_chunks(total) {
                let up = &mut intermediate[..rows * inter];
                let x = &x[first * h..(first + rows) * h];
                layer.intermediate.forward(x, rows, up, threads);
                match self.act {
                    HiddenAct::Gelu => gelu_erf(up),
                    HiddenAct::GeluTanh => gelu_tanh(up),
                    HiddenAct::Relu => relu(up),
                    HiddenAct::Silu => silu(up),
                }
                let down = &mut projected[first * h..(first + rows) * h];
                layer.output.forward(up, rows, down, threads);
            }
            layer
                .output_norm
                .rows(&mut projected[..values], Some(&x[..values]), h, self.eps);
            std::mem::swap(&mut x, &mut projected);
        }
        for buffer in [qkv, context, projected, intermediate, scores] {
            reuse::give_back(buffer);
        }
        Ok(x)
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
            if n <= SHORT_ATTENTION {
                self.short_attention(&qkv[start * stride..], n, &mut context[start * h..], scores);
                start += n;
                continue;
            }
            for head in 0..self.heads {
                let q = MatRef::new(&qkv[start * stride + head * d..], n, d, stride, 1);
                // Kᵀ: element (c, j) is K[j][c].
                let kt = MatRef::new(&qkv[start * stride + h + head * d..], d, n, 1, stride);
                let s = &mut scores[..n * n];
                matmul(s, n, 1, false, q, kt, scale, 1);
                self.attention_weights(s, n, head);
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

    /// `attention` for one short sentence of `n` tokens (`SHORT_ATTENTION`): its rows of the
    /// packed `[tokens, 3·hidden]` buffer in, its rows of `context` out. `scratch` holds
    /// `n² + n·d` values: the scores, then room for K transposed (`attention_scores`).
    fn short_attention(&self, qkv: &[f32], n: usize, context: &mut [f32], scratch: &mut [f32]) {
        let h = self.hidden;
        let d = h / self.heads;
        let scale = 1.0 / (d as f32).sqrt();
        let stride = 3 * h;
        let (scores, kt) = scratch.split_at_mut(n * n);
        let rows: &[u8] = bytemuck::cast_slice(&qkv[..n * stride]);
        let f32_bytes = std::mem::size_of::<f32>();
        for head in 0..self.heads {
            // The next head's Q, K and V of every token, while this head computes: they come
            // from L3 (a pass's QKV buffer outgrows L2 from a few sentences on), one or two
            // cache lines per token and part. Measured by perf on 32 sentences: the scores'
            // share of the pass's cycles went down by ~30 %.
            if head + 1 < self.heads {
                for token in 0..n {
                    for part in 0..3 {
                        let from = f32_bytes * (token * stride + part * h + (head + 1) * d);
                        for at in (from..from + f32_bytes * d).step_by(64) {
                            prefetch(rows, at);
                        }
                    }
                }
            }
            let head_rows = HeadRows {
                q: &qkv[head * d..],
                k: &qkv[h + head * d..],
                v: &qkv[2 * h + head * d..],
                stride,
                n,
                d,
            };
            attention_scores(head_rows, scale, kt, scores);
            self.attention_weights(scores, n, head);
            attention_values(head_rows, scores, &mut context[head * d..], h);
        }
    }

    /// Attention scores `[n, n]` of head `head` into weights: MPNet's relative position bias
    /// added, then softmax row by row.
    fn attention_weights(&self, scores: &mut [f32], n: usize, head: usize) {
        if let Some(bias) = &self.relative_bias {
            for (r, row) in scores[..n * n].chunks_exact_mut(n).enumerate() {
                // Keys j = 0..n sit at distances j - r: a contiguous run of the table.
                let from = bias.span - r;
                row.iter_mut()
                    .zip(&bias.by_head[head][from..from + n])
                    .for_each(|(s, b)| *s += b);
            }
        }
        softmax(&mut scores[..n * n], n);
    }
}

/// Every layer's packed weights moved into one region on huge pages (`region.rs`), in the
/// order the pass reads them, each layer's own copy freed.
fn move_to_region(layers: &mut [Layer]) -> Result<(), String> {
    fn linears(layer: &mut Layer) -> [&mut Linear; 4] {
        [
            &mut layer.qkv,
            &mut layer.attention_out,
            &mut layer.intermediate,
            &mut layer.output,
        ]
    }
    let bytes = region::capacity_for(
        layers
            .iter_mut()
            .flat_map(linears)
            .map(|linear| linear.weight_bytes()),
    );
    let mut builder = RegionBuilder::new(bytes)
        .map_err(|e| format!("cannot map {bytes} bytes for the weights: {e}"))?;
    let spans: Vec<_> = layers
        .iter_mut()
        .flat_map(linears)
        .map(|linear| linear.copy_into(&mut builder))
        .collect();
    let region = builder
        .finish()
        .map_err(|e| format!("cannot make the weights read-only: {e}"))?;
    for (linear, span) in layers.iter_mut().flat_map(linears).zip(spans) {
        linear.use_region(&region, span);
    }
    // The layers' own copies, freed as `use_region` replaced them, were blocks of 128 KiB
    // or more: mappings of their own (`tune_allocator`), so the kernel has them back.
    Ok(())
}

/// Up to this many tokens a sentence's attention runs `kernels::attention_scores` and
/// `attention_values`, above it gemm. The short kernels were measured on sentences of ~10
/// tokens (one sentence: 0.94x the time of gemm's attention, side by side); longer ones keep
/// gemm, whose tiling and packing are made for large products.
const SHORT_ATTENTION: usize = 64;

/// Rows per chunk of the feed-forward block, at most. Each chunk runs the up projection, the
/// activation and the down projection before the next starts, so the intermediate buffer
/// holds a chunk rather than the whole pass (1,600 tokens of all-MiniLM-L6-v2: 2.5 MB instead
/// of 9.8 MB), and the pass's buffers stay within what a worker keeps (`reuse::KEEP_BYTES`),
/// sparing it the page faults of fresh memory. A row's result does not depend on the rows it
/// is computed with, so the chunks change no bits. Measured end to end, side by side with
/// ORT, 11 repeats: 128 sentences took 332.8 ms against 340.6 unchunked (0.98x); 32
/// sentences (~400 rows, one chunk), 84.6 against 85.0. Chunks of 120 and 240 rows were no
/// faster at 128 sentences and slower at 32 (86.6 and 85.4 ms).
const FFN_ROWS: usize = 480;

/// `total` rows cut into chunks of at most `FFN_ROWS`, of about equal size, none wider than
/// the first: `(first, rows)`.
/// (Equal sizes rather than full chunks and a remainder: a remainder of a few rows would take
/// the few-rows kernel, which streams all the weights for them.)
fn ffn_chunks(total: usize) -> impl Iterator<Item = (usize, usize)> {
    let count = total.div_ceil(FFN_ROWS);
    let size = total.div_ceil(count.max(1)).max(1);
    (0..total)
        .step_by(size)
        .map(move |first| (first, size.min(total - first)))
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
    fn ffn_chunks_cover_the_rows_in_order_and_evenly() {
        for total in [0, 1, 6, 479, 480, 481, 959, 960, 961, 1600, 5000] {
            let chunks: Vec<(usize, usize)> = ffn_chunks(total).collect();
            let mut next = 0;
            for &(first, rows) in &chunks {
                assert_eq!(first, next, "{total}: {chunks:?}");
                assert!(rows > 0 && rows <= FFN_ROWS, "{total}: {chunks:?}");
                next += rows;
            }
            assert_eq!(next, total);
            assert_eq!(chunks.len(), total.div_ceil(FFN_ROWS));
            // Equal up to the last chunk's rounding.
            let (min, max) = (
                chunks.iter().map(|c| c.1).min(),
                chunks.iter().map(|c| c.1).max(),
            );
            if let (Some(min), Some(max)) = (min, max) {
                assert!(max - min < chunks.len(), "{total}: {chunks:?}");
                // `run_group` sizes its buffer by the first.
                assert_eq!(chunks[0].1, max, "{total}: {chunks:?}");
            }
        }
    }

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
