//! A sentence-transformers model directory, served as `SentenceTransformer.encode` serves it:
//! tokenizer, transformer encoder, pooling, Dense modules, Normalize.
//!
//! `SentenceEncoder::load` runs in the master, before fork, and must start no thread: it only
//! reads files and copies the weights into plain vectors. Everything that computes runs in
//! workers.

mod aligned;
mod amx;
mod architecture;
mod candle;
mod dense;
mod directory;
mod fast;
mod files;
pub mod kernels;
pub mod linear;
mod many_rows;
mod pooling;
mod region;
mod reuse;
mod tokenizer;
mod weights;

use std::collections::HashMap;
use std::path::Path;

/// Whether `model.precision = "bf16"` runs here (AMX-BF16 and the kernel's permission), or why not.
pub use amx::enable as enable_bf16_tiles;
use architecture::EncoderConfig;
pub use architecture::Family;
pub use dense::Activation;
use dense::Dense;
pub use directory::ModelSpec;
use directory::{DenseSpec, Step};
pub use files::{LoadError, ModelIdentity};
use linear::Linear;
pub use linear::Precision;
use pooling::Pooling;
use tokenizer::SentenceTokenizer;

use crate::embedder::{EmbedError, Embedder, ModelInfo, Side, TokenPiece, Tokens};

/// Which implementation of the transformer's forward pass runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// forkserve's own: packed sentences, no padding, fused QKV (`fast.rs`).
    Fast,
    /// candle-transformers' models over padded batches (BERT and XLM-RoBERTa only).
    Candle,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Fast => "fast",
            Backend::Candle => "candle",
        }
    }
}

enum Encoder {
    Fast(fast::FastEncoder),
    Candle(candle::CandleEncoder),
}

/// What runs after the pooling, in `modules.json` order. A Normalize that ends the pipeline is
/// not here: `ModelInfo::normalized` says it is there, and `embed_all` applies it.
enum PostStep {
    Dense(Dense),
    Normalize,
}

pub struct SentenceEncoder {
    encoder: Encoder,
    tokenizer: SentenceTokenizer,
    pooling: Pooling,
    steps: Vec<PostStep>,
    hidden: usize,
    /// The padding id candle's padded batches use.
    pad_id: u32,
    /// Token counts of the model's prompts, for a pooling that leaves them out.
    prompt_lens: HashMap<String, usize>,
    info: ModelInfo,
}

impl SentenceEncoder {
    /// Read the model directory: its modules, tokenizer and weights (through a memory map).
    pub fn load(dir: &Path) -> Result<SentenceEncoder, LoadError> {
        SentenceEncoder::load_with(dir, Backend::Fast, Precision::F32)
    }

    /// Read the model directory and build `backend`'s forward pass over it, the weights of its
    /// linear layers kept in `precision` (forkserve's own backend only).
    pub fn load_with(
        dir: &Path,
        backend: Backend,
        precision: Precision,
    ) -> Result<SentenceEncoder, LoadError> {
        let spec = ModelSpec::read(dir)?;
        if spec.plain {
            tracing::info!(
                dir = %dir.display(),
                "no modules.json: serving the transformer with mean pooling, as sentence-transformers does"
            );
        }
        let config = EncoderConfig::read(&spec.transformer.dir)?;
        let tokenizer = SentenceTokenizer::load(&spec.transformer, &config)?;
        let weight_files = weights::files_in(&spec.transformer.dir)?;
        let raw = weights::load(&weight_files)?;
        let model_error = |reason: String| LoadError::Model {
            path: weight_files[0].clone(),
            reason,
        };
        let encoder = match backend {
            Backend::Fast => {
                Encoder::Fast(fast::FastEncoder::new(&config, raw, precision).map_err(model_error)?)
            }
            Backend::Candle if precision != Precision::F32 => {
                return Err(LoadError::invalid(
                    dir,
                    "model.precision other than f32 needs model.backend = \"fast\"".to_string(),
                ))
            }
            Backend::Candle => Encoder::Candle(candle::CandleEncoder::new(&config, raw)?),
        };

        let mut dimension = spec.pooling.output_dimension(config.hidden);
        let mut steps = Vec::new();
        let mut dense_names = Vec::new();
        for step in spec.after_pooling {
            match step {
                Step::Normalize => steps.push(PostStep::Normalize),
                Step::Dense(d) => {
                    if d.in_features != dimension {
                        return Err(LoadError::unsupported(
                            d.dir.join("config.json"),
                            "in_features",
                            d.in_features,
                            format!(
                                "the vectors reaching this Dense module have {dimension} values"
                            ),
                        ));
                    }
                    dense_names.push(format!(
                        "{} -> {} {}",
                        d.in_features,
                        d.out_features,
                        d.activation.name()
                    ));
                    dimension = d.out_features;
                    steps.push(PostStep::Dense(load_dense(&d)?));
                }
            }
        }
        let normalized = matches!(steps.last(), Some(PostStep::Normalize));
        if normalized {
            steps.pop();
        }

        let mut prompt_lens = HashMap::new();
        if !spec.pooling.include_prompt {
            for prompt in spec.prompts.values().filter(|p| !p.is_empty()) {
                let len = tokenizer.prompt_len(prompt).map_err(|e| {
                    LoadError::invalid(&spec.dir, format!("prompt {prompt:?}: {e}"))
                })?;
                prompt_lens.insert(prompt.clone(), len);
            }
        }
        let pad_id = config.padding_idx.unwrap_or(0);
        let info = ModelInfo {
            architecture: config.family.name().to_string(),
            model_type: config.model_type.clone(),
            pooling: spec.pooling.modes.iter().map(|m| m.name()).collect(),
            dense: dense_names,
            dimension,
            max_tokens: tokenizer.max_len(),
            prompts: spec.prompts,
            default_prompt_name: spec.default_prompt_name,
            similarity: spec.similarity,
            normalized,
            vocab_size: config.vocab,
            padded_batches: backend == Backend::Candle,
            precision,
            layers: config.layers,
        };
        tracing::debug!(tokenizer = %tokenizer.class, ?info, "model read");
        Ok(SentenceEncoder {
            encoder,
            tokenizer,
            pooling: spec.pooling,
            steps,
            hidden: config.hidden,
            pad_id,
            prompt_lens,
            info,
        })
    }

    /// `use_states` on every token's hidden state (rows of `hidden` values). The fast
    /// encoder's are in a buffer this thread keeps from pass to pass (`reuse`), given back
    /// here once used.
    fn with_hidden_states<T>(
        &self,
        batch: &[&Tokens],
        use_states: impl FnOnce(&[f32]) -> T,
    ) -> Result<T, EmbedError> {
        let ids: Vec<&[u32]> = batch.iter().map(|t| t.ids.as_slice()).collect();
        match &self.encoder {
            // Inside the worker's compute pool: its size is this worker's `threads`.
            Encoder::Fast(e) => {
                let states = e
                    .hidden_states(&ids, rayon::current_num_threads())
                    .map_err(EmbedError::Inference)?;
                let used = use_states(&states);
                reuse::give_back(states);
                Ok(used)
            }
            Encoder::Candle(e) => {
                let states = e
                    .hidden_states(&ids, self.pad_id)
                    .map_err(|e| EmbedError::Inference(e.to_string()))?;
                Ok(use_states(&states))
            }
        }
    }
}

/// The sha256 (hex) of the transformer's weights file, for `model.sha256`. A model whose
/// weights are sharded over several files has no one file to pin: an error says so.
pub fn weights_sha256(dir: &Path) -> Result<String, String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let spec = ModelSpec::read(dir).map_err(|e| e.to_string())?;
    let files = weights::files_in(&spec.transformer.dir).map_err(|e| e.to_string())?;
    let [file] = files.as_slice() else {
        return Err(format!(
            "the weights are in {} files; model.sha256 pins one model.safetensors",
            files.len()
        ));
    };
    let mut f = std::fs::File::open(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| format!("{}: {e}", file.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Everything `load` checks except reading the weights: the modules, the encoder's config, the
/// tokenizer as rebuilt, and that the weights files are there (`--check-config`).
pub fn check(dir: &Path) -> Result<ModelSpec, LoadError> {
    let spec = ModelSpec::read(dir)?;
    let config = EncoderConfig::read(&spec.transformer.dir)?;
    SentenceTokenizer::load(&spec.transformer, &config)?;
    weights::files_in(&spec.transformer.dir)?;
    for step in &spec.after_pooling {
        if let Step::Dense(d) = step {
            weights::files_in(&d.dir)?;
        }
    }
    Ok(spec)
}

fn load_dense(spec: &DenseSpec) -> Result<Dense, LoadError> {
    let files = weights::files_in(&spec.dir)?;
    let mut raw = weights::load(&files)?;
    let (inputs, outputs) = (spec.in_features, spec.out_features);
    let model_error = |reason: String| LoadError::Model {
        path: files[0].clone(),
        reason,
    };
    let weight = raw
        .take("linear.weight", &[outputs, inputs])
        .map_err(model_error)?;
    let bias = match spec.bias {
        true => raw.take("linear.bias", &[outputs]).map_err(model_error)?,
        false => vec![0.0; outputs],
    };
    let residual = match (spec.use_residual, inputs == outputs) {
        (false, _) => None,
        (true, true) => Some(None),
        (true, false) => {
            let w = raw
                .take("residual.weight", &[outputs, inputs])
                .map_err(model_error)?;
            Some(Some(Linear::from_torch(
                &w,
                vec![0.0; outputs],
                inputs,
                outputs,
            )))
        }
    };
    Ok(Dense {
        linear: Linear::from_torch(&weight, bias, inputs, outputs),
        activation: spec.activation,
        residual,
    })
}

impl Embedder for SentenceEncoder {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn tokenize_at(
        &self,
        text: &str,
        prompt: Option<&str>,
        side: Option<Side>,
    ) -> Result<Tokens, EmbedError> {
        // sentence-transformers prepends a prompt only when it is not empty.
        let Some(prompt) = prompt.filter(|p| !p.is_empty()) else {
            return self.tokenizer.encode_at(text, side);
        };
        let mut tokens = self.tokenizer.encode_at(&format!("{prompt}{text}"), side)?;
        if !self.pooling.include_prompt {
            tokens.prompt_len = match self.prompt_lens.get(prompt) {
                Some(n) => *n,
                None => self.tokenizer.prompt_len(prompt)?,
            };
        }
        Ok(tokens)
    }

    fn embed_tokens(&self, batch: &[&Tokens]) -> Result<Vec<Vec<Vec<f32>>>, EmbedError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        self.with_hidden_states(batch, |states| {
            let mut rows = states.chunks_exact(self.hidden).map(<[f32]>::to_vec);
            batch
                .iter()
                .map(|t| rows.by_ref().take(t.len()).collect())
                .collect()
        })
    }

    fn pieces(
        &self,
        text: &str,
        prompt: Option<&str>,
        add_special_tokens: bool,
    ) -> Result<Vec<TokenPiece>, EmbedError> {
        match prompt.filter(|p| !p.is_empty()) {
            Some(p) => self
                .tokenizer
                .pieces(&format!("{p}{text}"), add_special_tokens),
            None => self.tokenizer.pieces(text, add_special_tokens),
        }
    }

    fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, EmbedError> {
        self.tokenizer.decode(ids, skip_special_tokens)
    }

    fn embed_batch(&self, batch: &[&Tokens]) -> Result<Vec<Vec<f32>>, EmbedError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut vectors = self.with_hidden_states(batch, |states| {
            self.pooling.pool(states, self.hidden, batch)
        })?;
        for step in &self.steps {
            match step {
                PostStep::Dense(dense) => vectors = dense.forward(&vectors),
                PostStep::Normalize => vectors
                    .iter_mut()
                    .for_each(|v| crate::embedder::unit_length(v)),
            }
        }
        Ok(vectors)
    }
}
