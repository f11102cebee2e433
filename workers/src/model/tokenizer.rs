//! The model's tokenizer, with the settings sentence-transformers uses rather than the ones
//! stored in `tokenizer.json`.

use std::path::Path;

use tokenizers::Tokenizer;

use super::files::LoadError;
use crate::embedder::{EmbedError, Tokens};

pub struct SentenceTokenizer {
    inner: Tokenizer,
    max_len: usize,
}

impl SentenceTokenizer {
    pub fn load(path: &Path, max_len: usize) -> Result<SentenceTokenizer, LoadError> {
        let mut inner = Tokenizer::from_file(path).map_err(|e| LoadError::Invalid {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        // all-MiniLM-L6-v2's tokenizer.json pads every sentence to 128 and truncates at 128.
        // Padding is done per batch by the encoder; truncation below, at max_seq_length, after
        // counting the full length (a `truncate: false` request needs that count).
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| LoadError::Invalid {
                path: path.to_path_buf(),
                reason: e.to_string(),
            })?;
        Ok(SentenceTokenizer { inner, max_len })
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Encode one sentence with its special tokens. Over-long input keeps its first
    /// `max_len - 1` tokens and its closing special token (`[SEP]`), exactly what the tokenizer's
    /// right-side truncation produces for a single sequence.
    pub fn encode(&self, text: &str) -> Result<Tokens, EmbedError> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|e| EmbedError::Tokenize(e.to_string()))?;
        let mut ids = encoding.get_ids().to_vec();
        let untruncated_len = ids.len();
        if ids.len() > self.max_len {
            let closing = ids[ids.len() - 1];
            ids.truncate(self.max_len - 1);
            ids.push(closing);
        }
        Ok(Tokens {
            ids,
            untruncated_len,
        })
    }
}
