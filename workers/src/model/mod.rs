//! all-MiniLM-L6-v2 (or any BERT sentence-transformers model laid out the same way): files on
//! disk, tokenizer, weights, forward pass, mean pooling and normalisation.
//!
//! `SentenceEncoder::load` runs in the master, before fork, and must start no thread: it only
//! reads files and copies the weights into tensors. Everything that computes runs in workers.

mod fast;
mod files;
pub mod kernels;
mod tokenizer;
mod weights;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::bert::BertModel;

use crate::embedder::{EmbedError, Embedder, Tokens};
pub use files::{LoadError, ModelFiles, ModelIdentity};
use tokenizer::SentenceTokenizer;

/// Which implementation of the forward pass runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// forkserve's own: packed sentences, no padding, fused QKV (`fast.rs`).
    Fast,
    /// candle-transformers' `BertModel` over padded batches (the reference).
    Candle,
}

impl Backend {
    pub fn parse(name: &str) -> Option<Backend> {
        match name {
            "fast" => Some(Backend::Fast),
            "candle" => Some(Backend::Candle),
            _ => None,
        }
    }
}

enum Bert {
    Fast(fast::FastBert),
    Candle(BertModel),
}

/// A BERT encoder with sentence-transformers' pooling (attention-masked mean). Normalisation
/// is the caller's choice (`embedder::embed_all`).
pub struct SentenceEncoder {
    bert: Bert,
    tokenizer: SentenceTokenizer,
    dimension: usize,
}

impl SentenceEncoder {
    /// Read the model directory: config, tokenizer, and the weights through a memory map.
    pub fn load(dir: &Path) -> Result<SentenceEncoder, LoadError> {
        SentenceEncoder::load_with(dir, Backend::Fast)
    }

    pub fn load_with(dir: &Path, backend: Backend) -> Result<SentenceEncoder, LoadError> {
        let files = ModelFiles::locate(dir)?;
        let config = files.bert_config()?;
        let max_seq_length = files.max_seq_length()?;
        let tokenizer = SentenceTokenizer::load(&files.tokenizer, max_seq_length)?;
        let model_error = |reason: String| LoadError::Model {
            path: files.weights.clone(),
            reason,
        };
        let weights = weights::load(&files.weights)?;
        let bert = match backend {
            Backend::Fast => {
                Bert::Fast(fast::FastBert::new(&config, weights).map_err(model_error)?)
            }
            Backend::Candle => Bert::Candle(
                weights::var_builder(weights)
                    .and_then(|vb| BertModel::load(vb, &config))
                    .map_err(|e| model_error(e.to_string()))?,
            ),
        };
        Ok(SentenceEncoder {
            bert,
            tokenizer,
            dimension: config.hidden_size,
        })
    }

    fn forward(&self, bert: &BertModel, batch: &[&Tokens]) -> candle_core::Result<Vec<Vec<f32>>> {
        let device = Device::Cpu;
        let width = batch.iter().map(|t| t.len()).max().unwrap_or(0);
        let n = batch.len();
        // Pad to the longest sentence of this batch only (the tokenizer file's fixed padding to
        // 128 would cost ~6x the compute on short sentences).
        let mut ids = vec![0u32; n * width];
        let mut mask = vec![0f32; n * width];
        for (row, t) in batch.iter().enumerate() {
            ids[row * width..row * width + t.len()].copy_from_slice(&t.ids);
            mask[row * width..row * width + t.len()].fill(1.0);
        }
        let ids = Tensor::from_vec(ids, (n, width), &device)?;
        let mask = Tensor::from_vec(mask, (n, width), &device)?;
        let token_types = ids.zeros_like()?;
        let hidden = bert.forward(&ids, &token_types, Some(&mask))?;

        // Mean over real tokens only: padded positions are zeroed by the mask.
        let summed = hidden.broadcast_mul(&mask.unsqueeze(2)?)?.sum(1)?;
        let counts = mask.sum_keepdim(1)?.clamp(1e-9, f64::MAX)?;
        summed
            .broadcast_div(&counts)?
            .to_dtype(DType::F32)?
            .to_vec2()
    }
}

impl Embedder for SentenceEncoder {
    fn dimension(&self) -> usize {
        self.dimension
    }

    fn max_tokens(&self) -> usize {
        self.tokenizer.max_len()
    }

    fn tokenize(&self, text: &str) -> Result<Tokens, EmbedError> {
        self.tokenizer.encode(text)
    }

    fn embed_batch(&self, batch: &[&Tokens]) -> Result<Vec<Vec<f32>>, EmbedError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        match &self.bert {
            Bert::Fast(bert) => {
                let ids: Vec<&[u32]> = batch.iter().map(|t| t.ids.as_slice()).collect();
                // Inside the worker's compute pool: its size is this worker's `threads`.
                bert.embed(&ids, rayon::current_num_threads())
                    .map_err(EmbedError::Inference)
            }
            Bert::Candle(bert) => self
                .forward(bert, batch)
                .map_err(|e| EmbedError::Inference(e.to_string())),
        }
    }
}
