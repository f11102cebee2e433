//! The transformer's `config.json`: which encoder family, its sizes, and what differs between
//! the families forkserve runs.
//!
//! - **BERT** (BERT, MiniLM, bge, e5, gte...): absolute positions from 0, token type 0.
//! - **RoBERTa / XLM-RoBERTa** (multilingual-e5, paraphrase-multilingual-mpnet...): the same
//!   layers, with positions counted from `pad_token_id + 1` (transformers'
//!   `create_position_ids_from_input_ids`).
//! - **MPNet** (all-mpnet-base-v2): positions from 2 (its padding index is fixed at 1), no token
//!   types, and a relative position bias added to every layer's attention scores.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::files::{read_json, LoadError};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Bert,
    Roberta,
    MPNet,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Bert => "bert",
            Family::Roberta => "roberta",
            Family::MPNet => "mpnet",
        }
    }
}

/// The feed-forward activation (`hidden_act`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HiddenAct {
    /// `gelu`: the exact, erf form.
    Gelu,
    /// `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`: the tanh approximation.
    GeluTanh,
    Relu,
    /// `silu` / `swish`.
    Silu,
}

#[derive(Clone, Debug)]
pub struct EncoderConfig {
    pub path: PathBuf,
    pub family: Family,
    /// `model_type` as written (e.g. "xlm-roberta").
    pub model_type: String,
    pub hidden: usize,
    pub heads: usize,
    pub layers: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub max_positions: usize,
    /// Token type rows (0 for MPNet, which has none).
    pub type_vocab: usize,
    pub layer_norm_eps: f64,
    pub act: HiddenAct,
    /// Position of the first token: 0 (BERT), `pad_token_id + 1` (RoBERTa), 2 (MPNet).
    pub position_offset: usize,
    /// The padding id positions skip, for the families that count positions (RoBERTa, MPNet).
    pub padding_idx: Option<u32>,
    /// MPNet's relative attention buckets (rows of `relative_attention_bias`).
    pub relative_buckets: usize,
}

impl EncoderConfig {
    pub fn read(dir: &Path) -> Result<EncoderConfig, LoadError> {
        let path = dir.join("config.json");
        let config: Value = read_json(&path)?;
        let unsupported = |field: &str, value: &Value, why: &str| {
            LoadError::unsupported(&path, field, value, why)
        };
        let model_type = config
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("");
        let family = match model_type {
            "bert" => Family::Bert,
            "roberta" | "xlm-roberta" => Family::Roberta,
            "mpnet" => Family::MPNet,
            _ => {
                return Err(unsupported(
                    "model_type",
                    config.get("model_type").unwrap_or(&Value::Null),
                    "forkserve runs bert, roberta, xlm-roberta and mpnet encoders",
                ))
            }
        };
        let size = |key: &str| -> Result<usize, LoadError> {
            config
                .get(key)
                .and_then(Value::as_u64)
                .and_then(|n| usize::try_from(n).ok())
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    LoadError::invalid(&path, format!("{key}: missing or not a positive integer"))
                })
        };
        let optional =
            |key: &str, default: u64| config.get(key).and_then(Value::as_u64).unwrap_or(default);
        if let Some(kind) = config
            .get("position_embedding_type")
            .filter(|v| !v.is_null())
        {
            if kind.as_str() != Some("absolute") {
                return Err(unsupported(
                    "position_embedding_type",
                    kind,
                    "only absolute position embeddings are implemented",
                ));
            }
        }
        let act = match config
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("gelu")
        {
            "gelu" => HiddenAct::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => HiddenAct::GeluTanh,
            "relu" => HiddenAct::Relu,
            "silu" | "swish" => HiddenAct::Silu,
            _ => {
                return Err(unsupported(
                    "hidden_act",
                    &config["hidden_act"],
                    "implemented: gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, relu, silu",
                ))
            }
        };
        let pad = optional("pad_token_id", 1);
        let (position_offset, padding_idx, type_vocab) = match family {
            Family::Bert => (0, None, optional("type_vocab_size", 2) as usize),
            Family::Roberta => (
                (pad + 1) as usize,
                Some(pad as u32),
                optional("type_vocab_size", 1) as usize,
            ),
            // MPNetEmbeddings fixes its padding index at 1, whatever pad_token_id says.
            Family::MPNet => (2, Some(1), 0),
        };
        let relative_buckets = optional("relative_attention_num_buckets", 32) as usize;
        if family == Family::MPNet && relative_buckets < MPNET_BUCKETS {
            return Err(unsupported(
                "relative_attention_num_buckets",
                &config["relative_attention_num_buckets"],
                "MPNet computes 32 buckets whatever the config says; fewer rows cannot hold them",
            ));
        }
        if family != Family::MPNet && type_vocab == 0 {
            return Err(LoadError::invalid(
                &path,
                "type_vocab_size: must be at least 1",
            ));
        }
        let heads = size("num_attention_heads")?;
        let hidden = size("hidden_size")?;
        if hidden % heads != 0 {
            return Err(LoadError::invalid(
                &path,
                format!("hidden_size {hidden} is not a multiple of num_attention_heads {heads}"),
            ));
        }
        Ok(EncoderConfig {
            family,
            model_type: model_type.to_string(),
            hidden,
            heads,
            layers: size("num_hidden_layers")?,
            intermediate: size("intermediate_size")?,
            vocab: size("vocab_size")?,
            max_positions: size("max_position_embeddings")?,
            type_vocab,
            layer_norm_eps: config
                .get("layer_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-12),
            act,
            position_offset,
            padding_idx,
            relative_buckets,
            path,
        })
    }

    /// The most tokens one sentence can have: positions past the table do not exist.
    pub fn max_tokens(&self) -> usize {
        self.max_positions.saturating_sub(self.position_offset)
    }
}

/// The number of relative position buckets MPNet computes (`compute_position_bias` is called
/// with its default, 32, not with the config's value).
pub const MPNET_BUCKETS: usize = 32;

/// MPNet's bucket for a key `relative` positions after the query (negative: before), as
/// transformers' `MPNetEncoder.relative_position_bucket` computes it with 32 buckets and a
/// maximum distance of 128: 16 buckets per direction, exact up to 8, logarithmic beyond. The
/// logarithm is taken in f32, as torch does, so that the bucket edges fall where they fall
/// there.
pub fn mpnet_bucket(relative: i64) -> usize {
    const HALF: i64 = (MPNET_BUCKETS / 2) as i64;
    const MAX_EXACT: i64 = HALF / 2;
    const MAX_DISTANCE: f32 = 128.0;
    let n = -relative;
    let mut bucket = if n < 0 { HALF } else { 0 };
    let n = n.abs();
    if n < MAX_EXACT {
        bucket += n;
    } else {
        let scale = (MAX_DISTANCE / MAX_EXACT as f32).ln();
        let large = ((n as f32 / MAX_EXACT as f32).ln() / scale * (HALF - MAX_EXACT) as f32) as i64;
        bucket += (MAX_EXACT + large).min(HALF - 1);
    }
    bucket as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mpnet_buckets_match_transformers() {
        // Where the bucket changes, from transformers' MPNetEncoder.relative_position_bucket
        // (torch 2.15, f32) over relative positions -600..=600: each pair is the first
        // relative position of a run and its bucket.
        const EDGES: [(i64, usize); 31] = [
            (-600, 15),
            (-90, 14),
            (-63, 13),
            (-45, 12),
            (-31, 11),
            (-22, 10),
            (-15, 9),
            (-11, 8),
            (-7, 7),
            (-6, 6),
            (-5, 5),
            (-4, 4),
            (-3, 3),
            (-2, 2),
            (-1, 1),
            (0, 0),
            (1, 17),
            (2, 18),
            (3, 19),
            (4, 20),
            (5, 21),
            (6, 22),
            (7, 23),
            (8, 24),
            (12, 25),
            (16, 26),
            (23, 27),
            (32, 28),
            (46, 29),
            (64, 30),
            (91, 31),
        ];
        for relative in -600..=600 {
            let want = EDGES.iter().rev().find(|(r, _)| *r <= relative).unwrap().1;
            assert_eq!(mpnet_bucket(relative), want, "relative {relative}");
        }
    }
}
