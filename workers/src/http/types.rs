//! Wire types of the HTTP API and their validation. Requests are read from a
//! `serde_json::Value` by hand rather than derived, so that every error names the exact field
//! (`sentences[3]: expected a string, got a number`) and gets the right status.

use serde::Serialize;
use serde_json::{Map, Value};

use super::errors::ApiError;
use crate::settings::ClusterDefaults;

/// Algorithms `POST /cluster` knows; the first is the default.
pub const ALGORITHMS: &[&str] = &["community", "agglomerative"];

#[derive(Debug, Clone, PartialEq)]
pub struct ClusterRequest {
    pub sentences: Vec<String>,
    pub threshold: f32,
    pub min_cluster_size: usize,
    pub algorithm: &'static str,
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

/// `POST /embed`, TEI's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbedRequest {
    pub inputs: Vec<String>,
    pub normalize: bool,
    pub truncate: bool,
    pub prompt_name: Option<String>,
}

/// `POST /v1/embeddings`, OpenAI's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenAiRequest {
    pub input: Vec<String>,
    pub model: Option<String>,
    pub base64: bool,
    /// Not OpenAI's: a prompt of the model, as TEI's `prompt_name`.
    pub prompt_name: Option<String>,
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
    pub version: &'static str,
    pub worker_pid: u32,
}

/// Limits that depend on the configuration and the model.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    pub max_sentences: usize,
    pub dimension: usize,
}

pub fn parse_cluster_request(
    body: Value,
    limits: RequestLimits,
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

    let sentences = string_list(&obj, "sentences", limits.max_sentences)?;
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
                return Err(ApiError::validation(
                    "min_cluster_size",
                    format!("expected an integer >= 1, got {}", describe(v)),
                ))
            }
        },
    };
    let algorithm = match obj.get("algorithm") {
        None | Some(Value::Null) => ALGORITHMS[0],
        Some(Value::String(s)) => ALGORITHMS.iter().copied().find(|a| a == s).ok_or_else(|| {
            ApiError::validation(
                "algorithm",
                format!("unknown algorithm {s:?}; expected one of {ALGORITHMS:?}"),
            )
        })?,
        Some(v) => return Err(wrong_type("algorithm", "a string", v)),
    };
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
        ],
    )?;
    let inputs = one_or_many_strings(&obj, "inputs", limits.max_sentences)?;
    let normalize = optional_bool(&obj, "normalize", true)?;
    let truncate = optional_bool(&obj, "truncate", true)?;
    match obj.get("truncation_direction") {
        None | Some(Value::Null) => {}
        Some(Value::String(d)) if d.eq_ignore_ascii_case("right") => {}
        Some(v) => {
            return Err(ApiError::validation(
                "truncation_direction",
                format!("only \"right\" is supported, got {v}"),
            ))
        }
    }
    Ok(EmbedRequest {
        inputs,
        normalize,
        truncate,
        prompt_name: optional_string(&obj, "prompt_name")?,
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
    if let Some(Value::Array(items)) = obj.get("input") {
        if items.iter().any(|v| v.is_number() || v.is_array()) {
            return Err(ApiError::validation(
                "input",
                "token arrays are not supported; send strings",
            ));
        }
    }
    let input = one_or_many_strings(&obj, "input", limits.max_sentences)?;
    let model = match obj.get("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(m)) => Some(m.clone()),
        Some(v) => return Err(wrong_type("model", "a string", v)),
    };
    let base64 = match obj.get("encoding_format") {
        None | Some(Value::Null) => false,
        Some(Value::String(f)) if f == "float" => false,
        Some(Value::String(f)) if f == "base64" => true,
        Some(v) => {
            return Err(ApiError::validation(
                "encoding_format",
                format!("expected \"float\" or \"base64\", got {v}"),
            ))
        }
    };
    match obj.get("dimensions") {
        None | Some(Value::Null) => {}
        Some(v) if v.as_u64() == Some(limits.dimension as u64) => {}
        Some(v) => {
            return Err(ApiError::validation(
                "dimensions",
                format!("this model has {} dimensions, got {v}", limits.dimension),
            ))
        }
    }
    match obj.get("user") {
        None | Some(Value::Null) | Some(Value::String(_)) => {}
        Some(v) => return Err(wrong_type("user", "a string", v)),
    }
    Ok(OpenAiRequest {
        input,
        model,
        base64,
        prompt_name: optional_string(&obj, "prompt_name")?,
    })
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
    match obj.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(ApiError::validation(
            k.clone(),
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
    if items.len() > max {
        return Err(ApiError::validation(
            field,
            format!("too many items: {} (the limit is {max})", items.len()),
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            Value::String(s) => Ok(s.clone()),
            other => Err(wrong_type(&format!("{field}[{i}]"), "a string", other)),
        })
        .collect()
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
    };

    fn parse(v: Value) -> Result<ClusterRequest, ApiError> {
        parse_cluster_request(v, LIMITS, &ClusterDefaults::default())
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
        assert_eq!(r.algorithm, "community");
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
        assert_eq!(r.inputs, vec!["a"]);
        assert!(r.normalize && r.truncate);
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
                json!({"inputs": "a", "truncation_direction": "Left"}),
                "truncation_direction",
            ),
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
        for (body, field) in [
            (json!({"input": [1, 2]}), "input"),
            (
                json!({"input": "a", "encoding_format": "int8"}),
                "encoding_format",
            ),
            (json!({"input": "a", "dimensions": 128}), "dimensions"),
            (json!({"input": "a", "model": 5}), "model"),
        ] {
            assert_eq!(
                field_of(parse_openai_request(body, LIMITS).unwrap_err()),
                field
            );
        }
        assert!(parse_openai_request(json!({"input": "a", "dimensions": 384}), LIMITS).is_ok());
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
