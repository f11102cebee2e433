//! Wire types of the HTTP API and their validation. Requests are read from a
//! `serde_json::Value` by hand rather than derived, so that every error names the exact field
//! (`sentences[3]: expected a string, got a number`) and gets the right status.

use serde::Serialize;
use serde_json::{Map, Value};

use super::errors::ApiError;
use crate::settings::ClusterDefaults;

/// Algorithms `POST /cluster` knows.
pub const ALGORITHMS: &[&str] = &["community"];

#[derive(Debug, Clone, PartialEq)]
pub struct ClusterRequest {
    pub sentences: Vec<String>,
    pub threshold: f32,
    pub min_cluster_size: usize,
    pub algorithm: &'static str,
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

/// Limits that depend on the configuration.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    pub max_sentences: usize,
}

pub fn parse_cluster_request(
    body: Value,
    limits: RequestLimits,
    defaults: &ClusterDefaults,
) -> Result<ClusterRequest, ApiError> {
    let obj = as_object(body)?;
    reject_unknown(
        &obj,
        &["sentences", "threshold", "min_cluster_size", "algorithm"],
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
        Some(v) => match v.as_u64() {
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
    })
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

    const LIMITS: RequestLimits = RequestLimits { max_sentences: 3 };

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
    fn threshold_one_is_allowed() {
        assert_eq!(
            parse(json!({"sentences": ["a"], "threshold": 1}))
                .unwrap()
                .threshold,
            1.0
        );
    }
}
