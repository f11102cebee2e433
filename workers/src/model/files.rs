//! Where a model's files are, and reading its small JSON configs. Every error names the file.

use std::fmt;
use std::path::{Path, PathBuf};

use candle_transformers::models::bert::Config as BertConfig;
use serde::Deserialize;

/// Used when a model directory has no `sentence_bert_config.json` (sentence-transformers' own
/// fallback is the tokenizer's limit; 256 is what all-MiniLM-L6-v2 ships).
const DEFAULT_MAX_SEQ_LENGTH: usize = 256;

#[derive(Debug)]
pub enum LoadError {
    /// A file the model needs is not there.
    Missing { path: PathBuf },
    /// A file is there but cannot be read or parsed.
    Invalid { path: PathBuf, reason: String },
    /// The weights do not fit the architecture the config describes.
    Model { path: PathBuf, reason: String },
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::Missing { path } => write!(f, "{}: file not found", path.display()),
            LoadError::Invalid { path, reason } => write!(f, "{}: {reason}", path.display()),
            LoadError::Model { path, reason } => {
                write!(f, "{}: cannot build the model: {reason}", path.display())
            }
        }
    }
}

impl std::error::Error for LoadError {}

/// Which weights file a model was built from: a new file at the path (replaced by a rename,
/// rewritten, or touched) has another identity, and a HUP reloads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelIdentity {
    dev: u64,
    inode: u64,
    size: u64,
    mtime_ns: i128,
}

impl ModelIdentity {
    /// The identity of `dir/model.safetensors`; None if it cannot be read (then any later
    /// state counts as a change).
    pub fn of(dir: &Path) -> Option<ModelIdentity> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(dir.join("model.safetensors")).ok()?;
        Some(ModelIdentity {
            dev: meta.dev(),
            inode: meta.ino(),
            size: meta.size(),
            mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
        })
    }
}

/// The files of a sentence-transformers BERT model directory.
#[derive(Clone, Debug)]
pub struct ModelFiles {
    pub dir: PathBuf,
    pub weights: PathBuf,
    pub tokenizer: PathBuf,
    pub config: PathBuf,
    pub sentence_config: PathBuf,
}

#[derive(Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
}

impl ModelFiles {
    /// Check that the directory holds what we need, before reading anything large.
    pub fn locate(dir: &Path) -> Result<ModelFiles, LoadError> {
        let files = ModelFiles {
            dir: dir.to_path_buf(),
            weights: dir.join("model.safetensors"),
            tokenizer: dir.join("tokenizer.json"),
            config: dir.join("config.json"),
            sentence_config: dir.join("sentence_bert_config.json"),
        };
        if !dir.is_dir() {
            return Err(LoadError::Missing { path: files.dir });
        }
        for path in [&files.weights, &files.tokenizer, &files.config] {
            if !path.is_file() {
                return Err(LoadError::Missing { path: path.clone() });
            }
        }
        Ok(files)
    }

    pub fn bert_config(&self) -> Result<BertConfig, LoadError> {
        read_json(&self.config)
    }

    /// sentence-transformers' `max_seq_length`: longer input is truncated to it.
    pub fn max_seq_length(&self) -> Result<usize, LoadError> {
        if !self.sentence_config.is_file() {
            return Ok(DEFAULT_MAX_SEQ_LENGTH);
        }
        let cfg: SentenceBertConfig = read_json(&self.sentence_config)?;
        match cfg.max_seq_length {
            Some(0) => Err(LoadError::Invalid {
                path: self.sentence_config.clone(),
                reason: "max_seq_length must be at least 1".into(),
            }),
            Some(n) => Ok(n),
            None => Ok(DEFAULT_MAX_SEQ_LENGTH),
        }
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|e| LoadError::Invalid {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| LoadError::Invalid {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}
