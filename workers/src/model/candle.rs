//! candle-transformers' own models, over padded batches: `model.backend = "candle"`. They are
//! the independent reference the tests hold `fast.rs` to, and the other side of the benchmark
//! that chose `fast` as the default. candle-transformers has BERT and XLM-RoBERTa; it has no
//! MPNet, so an MPNet model cannot run on this backend.

use candle_core::{Device, Tensor};
use candle_transformers::models::{bert, xlm_roberta};

use super::architecture::{EncoderConfig, Family};
use super::files::{read_json, LoadError};
use super::weights::RawWeights;

pub enum CandleEncoder {
    Bert(bert::BertModel),
    XlmRoberta(xlm_roberta::XLMRobertaModel),
}

impl CandleEncoder {
    pub fn new(config: &EncoderConfig, weights: RawWeights) -> Result<CandleEncoder, LoadError> {
        let path = &config.path;
        let model_error = |e: candle_core::Error| LoadError::Model {
            path: weights_source(path),
            reason: e.to_string(),
        };
        match config.family {
            Family::Bert => {
                let cfg: bert::Config = read_json(path)?;
                // BertModel finds a "bert." prefix by itself.
                let vb = weights.into_var_builder().map_err(model_error)?;
                Ok(CandleEncoder::Bert(
                    bert::BertModel::load(vb, &cfg).map_err(model_error)?,
                ))
            }
            Family::Roberta => {
                // transformers 5 leaves out what equals its defaults; candle's Config wants
                // every field.
                let mut value: serde_json::Value = read_json(path)?;
                for (key, default) in [
                    ("position_embedding_type", serde_json::json!("absolute")),
                    ("hidden_dropout_prob", serde_json::json!(0.1)),
                    ("attention_probs_dropout_prob", serde_json::json!(0.1)),
                    ("type_vocab_size", serde_json::json!(1)),
                    ("pad_token_id", serde_json::json!(1)),
                    ("layer_norm_eps", serde_json::json!(1e-5)),
                    ("hidden_act", serde_json::json!("gelu")),
                ] {
                    if value.get(key).is_none_or(|v| v.is_null()) {
                        value[key] = default;
                    }
                }
                let cfg: xlm_roberta::Config = serde_json::from_value(value)
                    .map_err(|e| LoadError::invalid(path, e.to_string()))?;
                let prefix = ["roberta", "model"]
                    .into_iter()
                    .find(|p| weights.contains(&format!("{p}.embeddings.word_embeddings.weight")));
                let vb = weights.into_var_builder().map_err(model_error)?;
                let vb = match prefix {
                    Some(p) => vb.pp(p),
                    None => vb,
                };
                Ok(CandleEncoder::XlmRoberta(
                    xlm_roberta::XLMRobertaModel::new(&cfg, vb).map_err(model_error)?,
                ))
            }
            Family::MPNet => Err(LoadError::unsupported(
                path,
                "model_type",
                "\"mpnet\"",
                "model.backend = \"candle\": candle-transformers has no MPNet; use the default \
                 backend, \"fast\"",
            )),
        }
    }

    /// Last hidden states of every real token, packed `[Σ tokens, hidden]` like `fast.rs`
    /// gives them. The batch is padded to its longest sentence (with `pad` ids, masked out).
    pub fn hidden_states(&self, sentences: &[&[u32]], pad: u32) -> candle_core::Result<Vec<f32>> {
        let device = Device::Cpu;
        let width = sentences.iter().map(|s| s.len()).max().unwrap_or(0);
        let n = sentences.len();
        if n == 0 || width == 0 {
            return Ok(Vec::new());
        }
        let mut ids = vec![pad; n * width];
        let mut mask = vec![0u32; n * width];
        for (row, s) in sentences.iter().enumerate() {
            ids[row * width..row * width + s.len()].copy_from_slice(s);
            mask[row * width..row * width + s.len()].fill(1);
        }
        let ids = Tensor::from_vec(ids, (n, width), &device)?;
        let mask = Tensor::from_vec(mask, (n, width), &device)?;
        let token_types = ids.zeros_like()?;
        let hidden = match self {
            CandleEncoder::Bert(m) => m.forward(
                &ids,
                &token_types,
                Some(&mask.to_dtype(candle_core::DType::F32)?),
            )?,
            CandleEncoder::XlmRoberta(m) => {
                m.forward(&ids, &mask, &token_types, None, None, None)?
            }
        };
        let rows = hidden.to_dtype(candle_core::DType::F32)?.to_vec3::<f32>()?;
        let mut packed = Vec::new();
        for (sentence, padded) in sentences.iter().zip(rows) {
            for token in padded.into_iter().take(sentence.len()) {
                packed.extend(token);
            }
        }
        Ok(packed)
    }
}

fn weights_source(config: &std::path::Path) -> std::path::PathBuf {
    config.with_file_name("model.safetensors")
}
