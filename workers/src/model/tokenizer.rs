//! The model's tokenizer as sentence-transformers 6 gets it from transformers 5, rather than
//! `tokenizer.json` as saved.
//!
//! transformers 5 loads `tokenizer.json` as is only for a generic tokenizer class
//! (`TokenizersBackend`, `PreTrainedTokenizerFast`). For a model-specific class it rebuilds the
//! pipeline the way the class defines it, from `tokenizer_config.json`'s arguments, keeping
//! the vocabulary of `tokenizer.json`: e.g. `BertTokenizer` sets a `BertNormalizer` whose
//! `lowercase` is `do_lower_case` (default true), whatever the saved normalizer says. A
//! tokenizer saved by an older transformers can differ from that rebuild, and it is the
//! rebuild that sentence-transformers embeds with. `rebuild` reproduces it for the classes of
//! the encoders forkserve runs, by editing the JSON the `tokenizers` crate loads; any other
//! class is refused.
//!
//! Then sentence-transformers' own settings: its maximum length, `do_lower_case` (a Lowercase
//! normalizer in front), and the prompt's token count for `include_prompt: false`.

use std::collections::HashSet;
use std::str::FromStr;

use serde_json::{json, Map, Value};
use tokenizers::{PostProcessor, Tokenizer, TruncationDirection};

use super::architecture::EncoderConfig;
use super::directory::TransformerSpec;
use super::files::{read_json, read_optional_json, LoadError};
use crate::embedder::{EmbedError, Side, TokenPiece, Tokens};

pub struct SentenceTokenizer {
    inner: Tokenizer,
    max_len: usize,
    direction: TruncationDirection,
    /// Special tokens the post-processor adds around one sentence (`[CLS]`, `[SEP]`).
    added: usize,
    special_ids: HashSet<u32>,
    /// The tokenizer class whose pipeline this reproduces.
    pub class: String,
}

impl SentenceTokenizer {
    pub fn load(
        spec: &TransformerSpec,
        encoder: &EncoderConfig,
    ) -> Result<SentenceTokenizer, LoadError> {
        let dir = &spec.dir;
        let path = dir.join("tokenizer.json");
        let mut json: Value = read_json(&path)?;
        let config_path = dir.join("tokenizer_config.json");
        let config = read_optional_json(&config_path)?
            .and_then(|v| v.as_object().cloned())
            .unwrap_or_default();
        let class = tokenizer_class(&config, encoder)?;
        let from = |field: &str| match config.get(field) {
            Some(_) => config_path.display().to_string(),
            None => path.display().to_string(),
        };
        rebuild(&mut json, &class, &config)
            .map_err(|reason| LoadError::unsupported(&path, "tokenizer_class", &class, reason))?;
        // Padding is per batch and truncation is ours (below): neither comes from the file.
        json["padding"] = Value::Null;
        let saved_direction = json
            .pointer("/truncation/direction")
            .and_then(Value::as_str)
            .map(str::to_ascii_lowercase);
        json["truncation"] = Value::Null;
        if spec.do_lower_case && !lowercases(&json["normalizer"]) {
            let existing = json["normalizer"].take();
            json["normalizer"] = match existing {
                Value::Null => json!({"type": "Lowercase"}),
                other => json!({"type": "Sequence", "normalizers": [{"type": "Lowercase"}, other]}),
            };
        }
        // The parsed JSON is freed before the tokenizer is built, so that the tokenizer's many
        // small allocations reuse its heap space: what the master's heap holds after loading
        // is what every worker copies at boot (`own_inherited_heap`).
        let text = json.to_string();
        drop(json);
        let inner = Tokenizer::from_str(&text)
            .map_err(|e| LoadError::invalid(&path, format!("{e} (as rebuilt for {class})")))?;
        drop(text);

        let side = config
            .get("truncation_side")
            .and_then(Value::as_str)
            .map(str::to_ascii_lowercase)
            .or(saved_direction);
        let direction = match side.as_deref() {
            None | Some("right") => TruncationDirection::Right,
            Some("left") => TruncationDirection::Left,
            Some(other) => {
                return Err(LoadError::unsupported(
                    from("truncation_side"),
                    "truncation_side",
                    format!("{other:?}"),
                    "expected \"right\" or \"left\"",
                ))
            }
        };
        let max_len = max_length(spec, &config, encoder);
        let added = inner
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(false));
        if max_len <= added {
            return Err(LoadError::invalid(
                &path,
                format!(
                    "the maximum length {max_len} leaves no room beside {added} special tokens"
                ),
            ));
        }
        let vocab = inner.get_vocab_size(true);
        if vocab > encoder.vocab {
            return Err(LoadError::invalid(
                &path,
                format!(
                    "{vocab} tokens, more than the {} rows of the model's embeddings ({})",
                    encoder.vocab,
                    encoder.path.display()
                ),
            ));
        }
        let special_ids = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        Ok(SentenceTokenizer {
            inner,
            max_len,
            direction,
            added,
            special_ids,
            class,
        })
    }

    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Encode one sentence with its special tokens, truncated to the maximum length as the
    /// tokenizer's own truncation does (the content is cut, the special tokens stay), after
    /// counting its full length (a `truncate: false` request needs that count).
    pub fn encode(&self, text: &str) -> Result<Tokens, EmbedError> {
        self.encode_at(text, None)
    }

    /// `encode`, truncating at `side` (None: the model's `truncation_side`).
    pub fn encode_at(&self, text: &str, side: Option<Side>) -> Result<Tokens, EmbedError> {
        let mut encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| EmbedError::Tokenize(e.to_string()))?;
        let untruncated_len = encoding.len() + self.added;
        if untruncated_len > self.max_len {
            let direction = match side {
                None => self.direction,
                Some(Side::Left) => TruncationDirection::Left,
                Some(Side::Right) => TruncationDirection::Right,
            };
            encoding.truncate(self.max_len - self.added, 0, direction);
        }
        let encoding = self
            .inner
            .post_process(encoding, None, true)
            .map_err(|e| EmbedError::Tokenize(e.to_string()))?;
        Ok(Tokens {
            ids: encoding.get_ids().to_vec(),
            untruncated_len,
            prompt_len: 0,
        })
    }

    /// The pieces of `text`, not truncated.
    pub fn pieces(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<Vec<TokenPiece>, EmbedError> {
        let encoding = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| EmbedError::Tokenize(e.to_string()))?;
        Ok(encoding
            .get_ids()
            .iter()
            .zip(encoding.get_tokens())
            .zip(encoding.get_offsets())
            .zip(encoding.get_special_tokens_mask())
            .map(|(((&id, token), &(start, stop)), &mask)| {
                let special = mask == 1 || self.special_ids.contains(&id);
                let located = !(special && start == stop);
                TokenPiece {
                    id,
                    text: token.clone(),
                    special,
                    start: located.then_some(start),
                    stop: located.then_some(stop),
                }
            })
            .collect())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, EmbedError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| EmbedError::Tokenize(e.to_string()))
    }

    /// How many leading tokens of `prompt + sentence` sentence-transformers counts as the
    /// prompt: the prompt's own tokens, special ones included, without a trailing special token
    /// (`Transformer._get_prompt_length`).
    pub fn prompt_len(&self, prompt: &str) -> Result<usize, EmbedError> {
        let tokens = self.encode(prompt)?;
        let trailing_special = tokens
            .ids
            .last()
            .is_some_and(|id| self.special_ids.contains(id));
        Ok(tokens.len() - usize::from(trailing_special))
    }
}

/// The longest input, as sentence-transformers sets it: `model_max_length` passed to the
/// tokenizer, else `max_seq_length`, else the tokenizer's `model_max_length` capped by the
/// model's position embeddings. Never more than the positions the model has: longer input
/// would make sentence-transformers fail, so it is cut there with a warning.
fn max_length(
    spec: &TransformerSpec,
    config: &Map<String, Value>,
    encoder: &EncoderConfig,
) -> usize {
    let configured = spec
        .model_max_length
        .or(spec.max_seq_length)
        .unwrap_or_else(|| {
            let saved = config
                .get("model_max_length")
                .and_then(Value::as_f64)
                .filter(|n| *n >= 1.0)
                .unwrap_or(f64::MAX);
            saved.min(encoder.max_positions as f64) as usize
        });
    let usable = encoder.max_tokens();
    if configured > usable {
        tracing::warn!(
            configured,
            usable,
            model = %encoder.path.display(),
            "the maximum length is more than the model's positions; longer input is truncated to them"
        );
    }
    configured.min(usable)
}

/// Which tokenizer class transformers 5 instantiates: `tokenizer_class` of
/// `tokenizer_config.json` (an `…Fast` name means the same class), else of `config.json`, else
/// the class registered for the model type.
fn tokenizer_class(
    config: &Map<String, Value>,
    encoder: &EncoderConfig,
) -> Result<String, LoadError> {
    let from_model_config = || -> Result<Option<String>, LoadError> {
        let model_config: Value = read_json(&encoder.path)?;
        Ok(model_config
            .get("tokenizer_class")
            .and_then(Value::as_str)
            .map(str::to_string))
    };
    let named = match config.get("tokenizer_class").and_then(Value::as_str) {
        Some(name) => Some(name.to_string()),
        None => from_model_config()?,
    };
    let class = match named {
        Some(name) => name.strip_suffix("Fast").unwrap_or(&name).to_string(),
        None => match encoder.model_type.as_str() {
            "bert" => "BertTokenizer",
            "mpnet" => "MPNetTokenizer",
            "xlm-roberta" => "XLMRobertaTokenizer",
            _ => "RobertaTokenizer",
        }
        .to_string(),
    };
    Ok(class)
}

/// Make `json` the pipeline transformers 5's `class` builds, keeping the file's vocabulary.
fn rebuild(json: &mut Value, class: &str, config: &Map<String, Value>) -> Result<(), String> {
    let token = |key: &str, default: &str| -> String {
        match config.get(key) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Object(t)) => t
                .get("content")
                .and_then(Value::as_str)
                .unwrap_or(default)
                .to_string(),
            _ => default.to_string(),
        }
    };
    let flag =
        |key: &str, default: bool| config.get(key).and_then(Value::as_bool).unwrap_or(default);
    let model_type = json
        .pointer("/model/type")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let expect_model = |want: &str| -> Result<(), String> {
        match model_type == want {
            true => Ok(()),
            false => Err(format!(
                "{class} needs a {want} vocabulary, tokenizer.json has a {model_type:?} model"
            )),
        }
    };
    match class {
        // tokenizer.json as saved.
        "TokenizersBackend" | "PreTrainedTokenizer" => {}
        "BertTokenizer" | "MPNetTokenizer" => {
            expect_model("WordPiece")?;
            let bert = class == "BertTokenizer";
            let unk = token("unk_token", "[UNK]");
            let model = &mut json["model"];
            model["unk_token"] = json!(unk);
            model["continuing_subword_prefix"] = json!("##");
            model["max_input_chars_per_word"] = json!(100);
            json["normalizer"] = json!({
                "type": "BertNormalizer",
                "clean_text": true,
                "handle_chinese_chars": flag("tokenize_chinese_chars", true),
                "strip_accents": config.get("strip_accents").cloned().unwrap_or(Value::Null),
                "lowercase": flag("do_lower_case", true),
            });
            json["pre_tokenizer"] = json!({"type": "BertPreTokenizer"});
            let (cls, sep) = match bert {
                true => (token("cls_token", "[CLS]"), token("sep_token", "[SEP]")),
                false => (token("cls_token", "<s>"), token("sep_token", "</s>")),
            };
            let (cls_id, sep_id) = (
                token_id(json, &cls).unwrap_or(if bert { 2 } else { 0 }),
                token_id(json, &sep).unwrap_or(if bert { 3 } else { 2 }),
            );
            json["post_processor"] = match bert {
                true => template(&cls, cls_id, &sep, sep_id),
                false => json!({
                    "type": "RobertaProcessing",
                    "sep": [sep, sep_id],
                    "cls": [cls, cls_id],
                    "trim_offsets": true,
                    "add_prefix_space": false,
                }),
            };
        }
        "XLMRobertaTokenizer" => {
            expect_model("Unigram")?;
            json["model"]["unk_id"] = json!(3);
            json["model"]["byte_fallback"] = json!(false);
            // Only the SentencePiece character map survives the rebuild.
            json["normalizer"] = find_precompiled(&json["normalizer"]).unwrap_or(Value::Null);
            let scheme = if flag("add_prefix_space", true) {
                "always"
            } else {
                "never"
            };
            json["pre_tokenizer"] = json!({
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "WhitespaceSplit"},
                    {"type": "Metaspace", "replacement": "▁", "prepend_scheme": scheme, "split": true},
                ],
            });
            let (bos, eos) = (token("bos_token", "<s>"), token("eos_token", "</s>"));
            let (bos_id, eos_id) = (
                token_id(json, &bos).ok_or(format!("{bos} is not in the vocabulary"))?,
                token_id(json, &eos).ok_or(format!("{eos} is not in the vocabulary"))?,
            );
            json["post_processor"] = template(&bos, bos_id, &eos, eos_id);
        }
        "RobertaTokenizer" => {
            expect_model("BPE")?;
            let model = &mut json["model"];
            model["dropout"] = Value::Null;
            model["unk_token"] = Value::Null;
            model["continuing_subword_prefix"] = json!("");
            model["end_of_word_suffix"] = json!("");
            model["fuse_unk"] = json!(false);
            let prefix = flag("add_prefix_space", false);
            let trim = flag("trim_offsets", true);
            json["normalizer"] = Value::Null;
            json["pre_tokenizer"] = json!({
                "type": "ByteLevel", "add_prefix_space": prefix, "trim_offsets": trim, "use_regex": true,
            });
            let (cls, sep) = (token("cls_token", "<s>"), token("sep_token", "</s>"));
            let (cls_id, sep_id) = (
                token_id(json, &cls).ok_or(format!("{cls} is not in the vocabulary"))?,
                token_id(json, &sep).ok_or(format!("{sep} is not in the vocabulary"))?,
            );
            json["post_processor"] = json!({
                "type": "RobertaProcessing",
                "sep": [sep, sep_id],
                "cls": [cls, cls_id],
                "trim_offsets": trim,
                "add_prefix_space": prefix,
            });
        }
        _ => {
            return Err(
                "forkserve reproduces BertTokenizer, MPNetTokenizer, XLMRobertaTokenizer, \
                 RobertaTokenizer and tokenizer.json as saved (TokenizersBackend)"
                    .into(),
            )
        }
    }
    Ok(())
}

/// `first $A second`, the single-sentence template (and its pair form, which the JSON needs).
fn template(first: &str, first_id: u32, second: &str, second_id: u32) -> Value {
    let special = |t: &str, type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
    let sequence = |s: &str, type_id: u32| json!({"Sequence": {"id": s, "type_id": type_id}});
    let mut tokens = Map::new();
    for (t, id) in [(first, first_id), (second, second_id)] {
        tokens.insert(t.to_string(), json!({"id": t, "ids": [id], "tokens": [t]}));
    }
    json!({
        "type": "TemplateProcessing",
        "single": [special(first, 0), sequence("A", 0), special(second, 0)],
        "pair": [special(first, 0), sequence("A", 0), special(second, 0), sequence("B", 1), special(second, 1)],
        "special_tokens": tokens,
    })
}

/// The id of `token` in the file's vocabulary or added tokens.
fn token_id(json: &Value, token: &str) -> Option<u32> {
    let added = json["added_tokens"].as_array().and_then(|tokens| {
        tokens
            .iter()
            .find(|t| t["content"].as_str() == Some(token))
            .and_then(|t| t["id"].as_u64())
    });
    let vocab = &json["model"]["vocab"];
    let id = added.or_else(|| match vocab {
        Value::Object(map) => map.get(token).and_then(Value::as_u64),
        Value::Array(pieces) => pieces
            .iter()
            .position(|p| p[0].as_str() == Some(token))
            .map(|i| i as u64),
        _ => None,
    })?;
    u32::try_from(id).ok()
}

/// A `Precompiled` normalizer, alone or inside a `Sequence`.
fn find_precompiled(normalizer: &Value) -> Option<Value> {
    match normalizer["type"].as_str()? {
        "Precompiled" => Some(normalizer.clone()),
        "Sequence" => normalizer["normalizers"]
            .as_array()?
            .iter()
            .find_map(find_precompiled),
        _ => None,
    }
}

/// Whether the normalizer already lowercases (sentence-transformers' `_has_lowercase`).
fn lowercases(normalizer: &Value) -> bool {
    match normalizer["type"].as_str() {
        Some("Lowercase") => true,
        Some("BertNormalizer") => normalizer["lowercase"].as_bool().unwrap_or(false),
        Some("Sequence") => normalizer["normalizers"]
            .as_array()
            .is_some_and(|n| n.iter().any(lowercases)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowercase_is_found_where_sentence_transformers_looks() {
        assert!(lowercases(&json!({"type": "Lowercase"})));
        assert!(lowercases(
            &json!({"type": "BertNormalizer", "lowercase": true})
        ));
        assert!(!lowercases(
            &json!({"type": "BertNormalizer", "lowercase": false})
        ));
        assert!(lowercases(
            &json!({"type": "Sequence", "normalizers": [{"type": "NFKC"}, {"type": "Lowercase"}]})
        ));
        assert!(!lowercases(&Value::Null));
    }

    #[test]
    fn token_ids_from_vocab_or_added_tokens() {
        let wordpiece = json!({"model": {"vocab": {"[CLS]": 101}}, "added_tokens": []});
        assert_eq!(token_id(&wordpiece, "[CLS]"), Some(101));
        let unigram = json!({"model": {"vocab": [["<s>", 0.0], ["<pad>", 0.0]]}, "added_tokens": [{"id": 7, "content": "<x>"}]});
        assert_eq!(token_id(&unigram, "<pad>"), Some(1));
        assert_eq!(token_id(&unigram, "<x>"), Some(7));
        assert_eq!(token_id(&unigram, "<y>"), None);
    }
}
