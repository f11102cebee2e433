//! Wire types of the HTTP API and their validation. Requests are read from a
//! `serde_json::Value` by hand rather than derived, so that every error names the exact field
//! (`sentences[3]: expected a string, got a number`) and gets the right status.

use serde::Serialize;
use serde_json::{Map, Value};

use super::errors::ApiError;
use crate::cluster::Algorithm;
use crate::settings::ClusterDefaults;

/// Algorithms `POST /cluster` knows; the first is the default.
pub const ALGORITHMS: &[&str] = Algorithm::NAMES;

#[derive(Debug, Clone, PartialEq)]
pub struct ClusterRequest {
    pub sentences: Vec<String>,
    pub threshold: f32,
    pub min_cluster_size: usize,
    pub algorithm: Algorithm,
    /// One of the model's prompts; None applies its default prompt, as `encode` does.
    pub prompt_name: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ClusterResponse {
    /// Groups of sentences, largest first, each in input order.
    pub clusters: Vec<Vec<String>>,
    /// The same groups as indices into the request's `sentences`.
    pub indices: Vec<Vec<usize>>,
    /// Sentences in no group of at least `min_cluster_size`.
    pub unclustered: Vec<String>,
    pub unclustered_indices: Vec<usize>,
    pub algorithm: &'static str,
    pub threshold: f32,
    pub min_cluster_size: usize,
}

#[derive(Debug, Serialize)]
pub struct HealthResponse {
    pub status: &'static str,
}

/// One input to embed: a text, or token ids the client tokenized itself (TEI and OpenAI both
/// take `[int]`).
#[derive(Debug, Clone, PartialEq)]
pub enum TextInput {
    Text(String),
    Ids(Vec<u32>),
}

/// Which end of an over-long input truncation cuts (TEI's `truncation_direction`); None: the
/// model's own side (`truncation_side`, right by default).
pub type Side = Option<crate::embedder::Side>;

/// `POST /embed` (and `/`, `/invocations`), TEI's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbedRequest {
    pub inputs: Vec<TextInput>,
    pub normalize: bool,
    pub truncate: bool,
    pub side: Side,
    pub prompt_name: Option<String>,
    /// Keep the first `dimensions` values (Matryoshka), before `normalize`.
    pub dimensions: Option<usize>,
    /// `encoding_format: "base64"`: each vector as base64 of its little-endian f32 bytes.
    pub base64: bool,
}

/// `POST /embed_all`: token vectors.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbedAllRequest {
    pub inputs: Vec<TextInput>,
    pub truncate: bool,
    pub side: Side,
    pub prompt_name: Option<String>,
}

/// `POST /similarity`: `{"inputs": {"source_sentence", "sentences"}, "parameters"?}`.
#[derive(Debug, Clone, PartialEq)]
pub struct SimilarityRequest {
    pub source: String,
    pub sentences: Vec<String>,
    pub truncate: bool,
    pub side: Side,
    pub prompt_name: Option<String>,
}

/// `POST /tokenize`.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizeRequest {
    pub inputs: Vec<String>,
    pub add_special_tokens: bool,
    pub prompt_name: Option<String>,
}

/// `POST /decode`.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeRequest {
    pub ids: Vec<Vec<u32>>,
    pub skip_special_tokens: bool,
}

/// `POST /v1/embeddings` and `/embeddings`, OpenAI's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenAiRequest {
    pub input: Vec<TextInput>,
    pub model: Option<String>,
    pub base64: bool,
    /// Keep the first `dimensions` values, as `encode(truncate_dim=...)` does.
    pub dimensions: Option<usize>,
    /// Not OpenAI's: a prompt of the model, as TEI's `prompt_name`.
    pub prompt_name: Option<String>,
}

/// `GET /v1/models/{id}`, one element of `GET /v1/models`.
#[derive(Debug, Serialize)]
pub struct OpenAiModel {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
}

#[derive(Debug, Serialize)]
pub struct OpenAiModels {
    pub object: &'static str,
    pub data: Vec<OpenAiModel>,
}

#[derive(Debug, Serialize)]
pub struct OpenAiResponse {
    pub object: &'static str,
    pub data: Vec<OpenAiEmbedding>,
    pub model: String,
    pub usage: OpenAiUsage,
}

#[derive(Debug, Serialize)]
pub struct OpenAiEmbedding {
    pub object: &'static str,
    pub index: usize,
    pub embedding: EmbeddingValue,
}

/// A vector as floats, or as base64 of its little-endian f32 bytes (`encoding_format`).
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum EmbeddingValue {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Serialize)]
pub struct OpenAiUsage {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
}

#[derive(Debug, Serialize)]
pub struct InfoResponse {
    pub model_id: String,
    pub model_dtype: &'static str,
    /// The encoder family (bert, roberta, mpnet) and its `model_type`.
    pub architecture: String,
    pub model_type: String,
    /// Pooling modes joined by "+", in the order they are concatenated.
    pub pooling: String,
    /// Dense modules after the pooling, "in -> out activation".
    pub dense: Vec<String>,
    /// Whether the vectors `/v1/embeddings` returns are unit length (a Normalize module).
    pub normalized: bool,
    pub dimension: usize,
    pub max_input_length: usize,
    pub prompts: std::collections::BTreeMap<String, String>,
    pub default_prompt_name: Option<String>,
    pub similarity_fn_name: String,
    pub max_sentences: usize,
    pub max_body_bytes: usize,
    pub max_batch_tokens: usize,
    pub cluster_algorithms: &'static [&'static str],
    pub default_threshold: f32,
    pub default_min_cluster_size: usize,
    pub cluster_max_sentences: usize,
    pub cluster_max_body_bytes: usize,
    pub cluster_max_agglomerative_sentences: usize,
    pub version: &'static str,
    pub worker_pid: u32,
}

/// Limits that depend on the configuration and the model.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    pub max_sentences: usize,
    pub dimension: usize,
    /// Token ids are below this.
    pub vocab_size: usize,
}

/// `/cluster` has its own limits (`defaults.max_sentences`): the embedding routes' do not apply.
pub fn parse_cluster_request(
    body: Value,
    defaults: &ClusterDefaults,
) -> Result<ClusterRequest, ApiError> {
    let obj = as_object(body)?;
    reject_unknown(
        &obj,
        &[
            "sentences",
            "threshold",
            "min_cluster_size",
            "algorithm",
            "prompt_name",
        ],
    )?;

    let sentences = string_list(&obj, "sentences", defaults.max_sentences)?;
    let threshold = match obj.get("threshold") {
        None | Some(Value::Null) => defaults.threshold,
        Some(v) => {
            let t = v
                .as_f64()
                .ok_or_else(|| wrong_type("threshold", "a number", v))?;
            if !(t > 0.0 && t <= 1.0) {
                return Err(ApiError::validation(
                    "threshold",
                    format!("must be in (0, 1], got {t}"),
                ));
            }
            t as f32
        }
    };
    let min_cluster_size = match obj.get("min_cluster_size") {
        None | Some(Value::Null) => defaults.min_cluster_size,
        // An integer too large for u64 arrives as a float; it still means "larger than any
        // cluster".
        Some(v) => match v.as_u64().or_else(|| {
            v.as_f64()
                .filter(|f| f.is_finite() && *f >= 1.0 && f.fract() == 0.0)
                .map(|_| u64::MAX)
        }) {
            Some(n) if n >= 1 => usize::try_from(n).unwrap_or(usize::MAX),
            _ => {
                // A number is shown as sent (0, -3, 2.5); anything else by its type.
                let got = match v {
                    Value::Number(n) => n.to_string(),
                    other => describe(other).to_string(),
                };
                return Err(ApiError::validation(
                    "min_cluster_size",
                    format!("expected an integer >= 1, got {got}"),
                ));
            }
        },
    };
    let algorithm = match obj.get("algorithm") {
        None | Some(Value::Null) => Algorithm::Community,
        Some(Value::String(s)) => Algorithm::parse(s).ok_or_else(|| {
            ApiError::validation(
                "algorithm",
                format!("unknown algorithm {s:?}; expected one of {ALGORITHMS:?}"),
            )
        })?,
        Some(v) => return Err(wrong_type("algorithm", "a string", v)),
    };
    if algorithm == Algorithm::Agglomerative
        && sentences.len() > defaults.max_agglomerative_sentences
    {
        let limit = defaults.max_agglomerative_sentences;
        return Err(ApiError::validation(
            "sentences",
            format!(
                "{} sentences is more than agglomerative clustering accepts here ({limit}): it \
                 holds the similarity of every pair, {} MB for this request; use \
                 \"algorithm\": \"community\", which compares a block of sentences at a time",
                sentences.len(),
                crate::cluster::agglomerative_bytes(sentences.len()) / 1_000_000
            ),
        ));
    }
    Ok(ClusterRequest {
        sentences,
        threshold,
        min_cluster_size,
        algorithm,
        prompt_name: optional_string(&obj, "prompt_name")?,
    })
}

pub fn parse_embed_request(body: Value, limits: RequestLimits) -> Result<EmbedRequest, ApiError> {
    let obj = as_object(body)?;
    reject_unknown(
        &obj,
        &[
            "inputs",
            "normalize",
            "truncate",
            "truncation_direction",
            "prompt_name",
            "dimensions",
            "encoding_format",
        ],
    )?;
    Ok(EmbedRequest {
        inputs: inputs(&obj, "inputs", limits)?,
        normalize: optional_bool(&obj, "normalize", true)?,
        truncate: optional_bool(&obj, "truncate", true)?,
        side: side(&obj)?,
        prompt_name: optional_string(&obj, "prompt_name")?,
        dimensions: dimensions(&obj, limits)?,
        base64: encoding_format(&obj)?,
    })
}

pub fn parse_embed_all_request(
    body: Value,
    limits: RequestLimits,
) -> Result<EmbedAllRequest, ApiError> {
    let obj = as_object(body)?;
    reject_unknown(
        &obj,
        &["inputs", "truncate", "truncation_direction", "prompt_name"],
    )?;
    Ok(EmbedAllRequest {
        inputs: inputs(&obj, "inputs", limits)?,
        truncate: optional_bool(&obj, "truncate", true)?,
        side: side(&obj)?,
        prompt_name: optional_string(&obj, "prompt_name")?,
    })
}

pub fn parse_similarity_request(
    body: Value,
    limits: RequestLimits,
) -> Result<SimilarityRequest, ApiError> {
    let obj = as_object(body)?;
    reject_unknown(&obj, &["inputs", "parameters"])?;
    let inputs = match obj.get("inputs") {
        Some(Value::Object(m)) => m,
        None => return Err(ApiError::validation("inputs", "missing required field")),
        Some(v) => {
            return Err(wrong_type(
                "inputs",
                "an object with source_sentence and sentences",
                v,
            ))
        }
    };
    reject_unknown_in(inputs, "inputs", &["source_sentence", "sentences"])?;
    let source = match inputs.get("source_sentence") {
        Some(Value::String(s)) => s.clone(),
        None => {
            return Err(ApiError::validation(
                "inputs.source_sentence",
                "missing required field",
            ))
        }
        Some(v) => return Err(wrong_type("inputs.source_sentence", "a string", v)),
    };
    let sentences = string_list(inputs, "sentences", limits.max_sentences)
        .map_err(|e| e.in_field("inputs."))?;
    let empty = Map::new();
    let parameters = match obj.get("parameters") {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(p)) => p,
        Some(v) => return Err(wrong_type("parameters", "an object", v)),
    };
    reject_unknown_in(
        parameters,
        "parameters",
        &["prompt_name", "truncate", "truncation_direction"],
    )?;
    Ok(SimilarityRequest {
        source,
        sentences,
        truncate: optional_bool(parameters, "truncate", true)
            .map_err(|e| e.in_field("parameters."))?,
        side: side(parameters).map_err(|e| e.in_field("parameters."))?,
        prompt_name: optional_string(parameters, "prompt_name")
            .map_err(|e| e.in_field("parameters."))?,
    })
}

pub fn parse_tokenize_request(
    body: Value,
    limits: RequestLimits,
) -> Result<TokenizeRequest, ApiError> {
    let obj = as_object(body)?;
    reject_unknown(&obj, &["inputs", "add_special_tokens", "prompt_name"])?;
    Ok(TokenizeRequest {
        inputs: one_or_many_strings(&obj, "inputs", limits.max_sentences)?,
        add_special_tokens: optional_bool(&obj, "add_special_tokens", true)?,
        prompt_name: optional_string(&obj, "prompt_name")?,
    })
}

pub fn parse_decode_request(body: Value, limits: RequestLimits) -> Result<DecodeRequest, ApiError> {
    let obj = as_object(body)?;
    reject_unknown(&obj, &["ids", "skip_special_tokens"])?;
    let ids = match obj.get("ids") {
        None => return Err(ApiError::validation("ids", "missing required field")),
        // [int] is one sequence, [[int]] several.
        Some(Value::Array(items)) if items.iter().all(|v| !v.is_array()) => {
            vec![token_ids(items, "ids", limits)?]
        }
        Some(Value::Array(items)) => {
            at_most("ids", items.len(), limits.max_sentences)?;
            items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::Array(seq) => token_ids(seq, &format!("ids[{i}]"), limits),
                    other => Err(wrong_type(
                        &format!("ids[{i}]"),
                        "an array of token ids",
                        other,
                    )),
                })
                .collect::<Result<_, _>>()?
        }
        Some(v) => return Err(wrong_type("ids", "an array of token ids", v)),
    };
    Ok(DecodeRequest {
        ids,
        skip_special_tokens: optional_bool(&obj, "skip_special_tokens", true)?,
    })
}

pub fn parse_openai_request(body: Value, limits: RequestLimits) -> Result<OpenAiRequest, ApiError> {
    let obj = as_object(body)?;
    reject_unknown(
        &obj,
        &[
            "input",
            "model",
            "encoding_format",
            "dimensions",
            "user",
            "prompt_name",
        ],
    )?;
    let model = match obj.get("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(m)) => Some(m.clone()),
        Some(v) => return Err(wrong_type("model", "a string", v)),
    };
    let base64 = encoding_format(&obj)?;
    match obj.get("user") {
        None | Some(Value::Null) | Some(Value::String(_)) => {}
        Some(v) => return Err(wrong_type("user", "a string", v)),
    }
    Ok(OpenAiRequest {
        input: inputs(&obj, "input", limits)?,
        model,
        base64,
        dimensions: dimensions(&obj, limits)?,
        prompt_name: optional_string(&obj, "prompt_name")?,
    })
}

/// TEI's and OpenAI's input: a string, token ids (`[int]`), or a non-empty list of strings and
/// token id lists.
fn inputs(
    obj: &Map<String, Value>,
    field: &str,
    limits: RequestLimits,
) -> Result<Vec<TextInput>, ApiError> {
    let items = match obj.get(field) {
        None => return Err(ApiError::validation(field, "missing required field")),
        Some(Value::String(s)) => return Ok(vec![TextInput::Text(s.clone())]),
        Some(Value::Array(items)) => items,
        Some(v) => {
            return Err(wrong_type(
                field,
                "a string, an array of strings, or token ids",
                v,
            ))
        }
    };
    if items.is_empty() {
        return Err(ApiError::validation(field, "must not be empty"));
    }
    // [1, 2, 3]: one input given as token ids.
    if items.iter().all(Value::is_number) {
        return Ok(vec![TextInput::Ids(token_ids(items, field, limits)?)]);
    }
    at_most(field, items.len(), limits.max_sentences)?;
    items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let name = format!("{field}[{i}]");
            match v {
                Value::String(s) => Ok(TextInput::Text(s.clone())),
                Value::Array(ids) => Ok(TextInput::Ids(token_ids(ids, &name, limits)?)),
                other => Err(wrong_type(
                    &name,
                    "a string or an array of token ids",
                    other,
                )),
            }
        })
        .collect()
}

/// Token ids, each in the model's vocabulary; an id out of range is named.
fn token_ids(items: &[Value], field: &str, limits: RequestLimits) -> Result<Vec<u32>, ApiError> {
    if items.is_empty() {
        return Err(ApiError::validation(field, "must not be empty"));
    }
    items
        .iter()
        .enumerate()
        .map(|(j, v)| {
            let name = format!("{field}[{j}]");
            match v.as_u64() {
                Some(id) if id < limits.vocab_size as u64 => Ok(id as u32),
                Some(id) => Err(ApiError::validation(
                    name,
                    format!(
                        "token id {id} is not in the model's vocabulary (ids 0 to {})",
                        limits.vocab_size.saturating_sub(1)
                    ),
                )),
                None => Err(wrong_type(&name, "a token id (an integer >= 0)", v)),
            }
        })
        .collect()
}

/// `dimensions`: keep the first N values, 1 <= N <= the model's dimension.
fn dimensions(obj: &Map<String, Value>, limits: RequestLimits) -> Result<Option<usize>, ApiError> {
    match obj.get("dimensions") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 && n <= limits.dimension as u64 => Ok(Some(n as usize)),
            _ => Err(ApiError::validation(
                "dimensions",
                format!(
                    "expected an integer from 1 to {} (this model's dimension), got {v}",
                    limits.dimension
                ),
            )),
        },
    }
}

/// `encoding_format`: "float" (the default) or "base64" (true).
fn encoding_format(obj: &Map<String, Value>) -> Result<bool, ApiError> {
    match obj.get("encoding_format") {
        None | Some(Value::Null) => Ok(false),
        Some(Value::String(f)) if f == "float" => Ok(false),
        Some(Value::String(f)) if f == "base64" => Ok(true),
        Some(v) => Err(ApiError::validation(
            "encoding_format",
            format!("expected \"float\" or \"base64\", got {v}"),
        )),
    }
}

/// TEI's `truncation_direction`: "Right" or "Left" (any case).
fn side(obj: &Map<String, Value>) -> Result<Side, ApiError> {
    use crate::embedder::Side::{Left, Right};
    match obj.get("truncation_direction") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(d)) if d.eq_ignore_ascii_case("right") => Ok(Some(Right)),
        Some(Value::String(d)) if d.eq_ignore_ascii_case("left") => Ok(Some(Left)),
        Some(v) => Err(ApiError::validation(
            "truncation_direction",
            format!("expected \"Right\" or \"Left\", got {v}"),
        )),
    }
}

fn optional_string(obj: &Map<String, Value>, field: &str) -> Result<Option<String>, ApiError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(wrong_type(field, "a string", v)),
    }
}

fn optional_bool(obj: &Map<String, Value>, field: &str, default: bool) -> Result<bool, ApiError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(wrong_type(field, "a boolean", v)),
    }
}

/// A string, or a non-empty list of strings of at most `max` items.
fn one_or_many_strings(
    obj: &Map<String, Value>,
    field: &str,
    max: usize,
) -> Result<Vec<String>, ApiError> {
    match obj.get(field) {
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        _ => string_list(obj, field, max),
    }
}

fn as_object(body: Value) -> Result<Map<String, Value>, ApiError> {
    match body {
        Value::Object(m) => Ok(m),
        other => Err(wrong_type("body", "a JSON object", &other)),
    }
}

fn reject_unknown(obj: &Map<String, Value>, known: &[&str]) -> Result<(), ApiError> {
    reject_unknown_in(obj, "", known)
}

/// Like `reject_unknown`, for an object nested at `path` (`inputs`, `parameters`).
fn reject_unknown_in(obj: &Map<String, Value>, path: &str, known: &[&str]) -> Result<(), ApiError> {
    match obj.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(ApiError::validation(
            match path {
                "" => k.clone(),
                p => format!("{p}.{k}"),
            },
            format!("unknown field; expected one of {known:?}"),
        )),
        None => Ok(()),
    }
}

/// A required, non-empty list of strings of at most `max` items.
fn string_list(obj: &Map<String, Value>, field: &str, max: usize) -> Result<Vec<String>, ApiError> {
    let items = match obj.get(field) {
        None => return Err(ApiError::validation(field, "missing required field")),
        Some(Value::Array(items)) => items,
        Some(v) => return Err(wrong_type(field, "an array of strings", v)),
    };
    if items.is_empty() {
        return Err(ApiError::validation(field, "must not be empty"));
    }
    at_most(field, items.len(), max)?;
    items
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) => Ok(s.clone()),
            other => Err(wrong_type(&format!("{field}[{i}]"), "a string", other)),
        })
        .collect()
}

/// A list longer than its limit (`max_sentences`, `cluster.max_sentences`) is a 422 naming
/// the field, the count and the limit.
fn at_most(field: &str, len: usize, max: usize) -> Result<(), ApiError> {
    if len > max {
        return Err(ApiError::validation(
            field,
            format!("too many items: {len} (the limit is {max})"),
        ));
    }
    Ok(())
}

fn wrong_type(field: &str, expected: &str, got: &Value) -> ApiError {
    ApiError::validation(field, format!("expected {expected}, got {}", describe(got)))
}

fn describe(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "an integer",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LIMITS: RequestLimits = RequestLimits {
        max_sentences: 3,
        dimension: 384,
        vocab_size: 1000,
    };

    fn parse(v: Value) -> Result<ClusterRequest, ApiError> {
        let defaults = ClusterDefaults {
            max_sentences: 3,
            max_agglomerative_sentences: 2,
            ..ClusterDefaults::default()
        };
        parse_cluster_request(v, &defaults)
    }

    #[test]
    fn agglomerative_has_its_own_lower_limit() {
        let three = json!({"sentences": ["a", "b", "c"], "algorithm": "agglomerative"});
        let ApiError::Validation { field, message } = parse(three).unwrap_err() else {
            panic!("expected a validation error")
        };
        assert_eq!(field, "sentences");
        assert!(message.contains("community"), "{message}");
        assert!(parse(json!({"sentences": ["a", "b", "c"]})).is_ok());
        assert!(parse(json!({"sentences": ["a", "b"], "algorithm": "agglomerative"})).is_ok());
    }

    fn field_of(e: ApiError) -> String {
        match e {
            ApiError::Validation { field, .. } => field,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_apply() {
        let r = parse(json!({"sentences": ["a", ""]})).unwrap();
        assert_eq!(r.sentences, vec!["a", ""]);
        assert_eq!(r.threshold, 0.5);
        assert_eq!(r.min_cluster_size, 1);
        assert_eq!(r.algorithm, Algorithm::Community);
    }

    #[test]
    fn each_error_names_its_field() {
        assert_eq!(field_of(parse(json!({})).unwrap_err()), "sentences");
        assert_eq!(
            field_of(parse(json!({"sentences": []})).unwrap_err()),
            "sentences"
        );
        assert_eq!(
            field_of(parse(json!({"sentences": ["a", 1]})).unwrap_err()),
            "sentences[1]"
        );
        assert_eq!(
            field_of(parse(json!({"sentences": "a"})).unwrap_err()),
            "sentences"
        );
        assert_eq!(
            field_of(parse(json!({"sentences": ["a","b","c","d"]})).unwrap_err()),
            "sentences"
        );
        assert_eq!(
            field_of(parse(json!({"sentences": ["a"], "threshold": 0})).unwrap_err()),
            "threshold"
        );
        assert_eq!(
            field_of(parse(json!({"sentences": ["a"], "threshold": 1.5})).unwrap_err()),
            "threshold"
        );
        assert_eq!(
            field_of(parse(json!({"sentences": ["a"], "threshold": "high"})).unwrap_err()),
            "threshold"
        );
        assert_eq!(
            field_of(parse(json!({"sentences": ["a"], "min_cluster_size": 0})).unwrap_err()),
            "min_cluster_size"
        );
        // The message says what it got.
        let zero = parse(json!({"sentences": ["a"], "min_cluster_size": 0})).unwrap_err();
        assert!(zero.message().ends_with("got 0"), "{}", zero.message());
        assert_eq!(
            field_of(parse(json!({"sentences": ["a"], "algorithm": "kmeans"})).unwrap_err()),
            "algorithm"
        );
        assert_eq!(
            field_of(parse(json!({"sentences": ["a"], "treshold": 0.3})).unwrap_err()),
            "treshold"
        );
        assert_eq!(field_of(parse(json!([1, 2])).unwrap_err()), "body");
    }

    #[test]
    fn embed_requests_take_a_string_or_a_list() {
        let r = parse_embed_request(json!({"inputs": "a"}), LIMITS).unwrap();
        assert_eq!(r.inputs, vec![TextInput::Text("a".into())]);
        assert!(r.normalize && r.truncate);
        // Token ids: one input as [int], several as [[int]], or mixed with strings.
        let r = parse_embed_request(json!({"inputs": [1, 2]}), LIMITS).unwrap();
        assert_eq!(r.inputs, vec![TextInput::Ids(vec![1, 2])]);
        let r = parse_embed_request(json!({"inputs": [[1], "b"]}), LIMITS).unwrap();
        assert_eq!(r.inputs[0], TextInput::Ids(vec![1]));
        let r = parse_embed_request(
            json!({"inputs": "a", "truncation_direction": "Left", "dimensions": 8, "prompt_name": "q"}),
            LIMITS,
        )
        .unwrap();
        assert_eq!(r.side, Some(crate::embedder::Side::Left));
        assert_eq!(r.dimensions, Some(8));
        let r = parse_embed_request(
            json!({"inputs": ["a", "b"], "normalize": false, "truncate": false}),
            LIMITS,
        )
        .unwrap();
        assert_eq!(r.inputs.len(), 2);
        assert!(!r.normalize && !r.truncate);
        for (body, field) in [
            (json!({"inputs": []}), "inputs"),
            (json!({"inputs": 3}), "inputs"),
            (json!({"inputs": "a", "normalize": "yes"}), "normalize"),
            (
                json!({"inputs": "a", "truncation_direction": "Up"}),
                "truncation_direction",
            ),
            (json!({"inputs": "a", "dimensions": 0}), "dimensions"),
            (json!({"inputs": [[1, 5000]]}), "inputs[0][1]"),
            (json!({"inputs": [1.5]}), "inputs[0]"),
            (json!({"input": "a"}), "input"),
        ] {
            assert_eq!(
                field_of(parse_embed_request(body, LIMITS).unwrap_err()),
                field
            );
        }
    }

    #[test]
    fn openai_requests() {
        let r = parse_openai_request(
            json!({"input": ["a"], "model": "m", "encoding_format": "base64"}),
            LIMITS,
        )
        .unwrap();
        assert!(r.base64);
        assert_eq!(r.model.as_deref(), Some("m"));
        assert!(
            !parse_openai_request(json!({"input": "a"}), LIMITS)
                .unwrap()
                .base64
        );
        let ids = parse_openai_request(json!({"input": [[1, 2], [3]]}), LIMITS).unwrap();
        assert_eq!(
            ids.input,
            vec![TextInput::Ids(vec![1, 2]), TextInput::Ids(vec![3])]
        );
        for (body, field) in [
            (json!({"input": [1, 1000]}), "input[1]"),
            (
                json!({"input": "a", "encoding_format": "int8"}),
                "encoding_format",
            ),
            (json!({"input": "a", "dimensions": 385}), "dimensions"),
            (json!({"input": "a", "model": 5}), "model"),
        ] {
            assert_eq!(
                field_of(parse_openai_request(body, LIMITS).unwrap_err()),
                field
            );
        }
        assert!(parse_openai_request(json!({"input": "a", "dimensions": 384}), LIMITS).is_ok());
        assert!(parse_openai_request(json!({"input": "a", "dimensions": 128}), LIMITS).is_ok());
    }

    #[test]
    fn tei_routes_requests() {
        let s = parse_similarity_request(
            json!({"inputs": {"source_sentence": "a", "sentences": ["b", "c"]}, "parameters": {"truncate": false}}),
            LIMITS,
        )
        .unwrap();
        assert_eq!(
            (s.source.as_str(), s.sentences.len(), s.truncate),
            ("a", 2, false)
        );
        for (body, field) in [
            (
                json!({"inputs": {"sentences": ["b"]}}),
                "inputs.source_sentence",
            ),
            (
                json!({"inputs": {"source_sentence": "a", "sentences": [1]}}),
                "inputs.sentences[0]",
            ),
            (
                json!({"inputs": {"source_sentence": "a", "sentences": ["b"]}, "parameters": {"x": 1}}),
                "parameters.x",
            ),
        ] {
            assert_eq!(
                field_of(parse_similarity_request(body, LIMITS).unwrap_err()),
                field
            );
        }
        let t = parse_tokenize_request(json!({"inputs": "a", "add_special_tokens": false}), LIMITS)
            .unwrap();
        assert!(!t.add_special_tokens);
        let d = parse_decode_request(json!({"ids": [1, 2]}), LIMITS).unwrap();
        assert_eq!(d.ids, vec![vec![1, 2]]);
        let d = parse_decode_request(
            json!({"ids": [[1], [2, 3]], "skip_special_tokens": false}),
            LIMITS,
        )
        .unwrap();
        assert_eq!((d.ids.len(), d.skip_special_tokens), (2, false));
        assert_eq!(
            field_of(parse_decode_request(json!({"ids": [[1, 9999]]}), LIMITS).unwrap_err()),
            "ids[0][1]"
        );
    }

    #[test]
    fn huge_min_cluster_size_is_accepted() {
        let r =
            parse(json!({"sentences": ["a"], "min_cluster_size": 28425825539443154944u128 as f64}));
        assert_eq!(r.unwrap().min_cluster_size, usize::MAX);
        assert!(parse(json!({"sentences": ["a"], "min_cluster_size": 2.5})).is_err());
    }

    #[test]
    fn threshold_one_is_allowed() {
        assert_eq!(
            parse(json!({"sentences": ["a"], "threshold": 1}))
                .unwrap()
                .threshold,
            1.0
        );
    }
}
