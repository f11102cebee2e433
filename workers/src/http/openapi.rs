//! `GET /openapi.json`: the API described in OpenAPI 3.0, next to the wire types it documents
//! (`types.rs`) and with the same limits the server enforces. schemathesis checks in the test
//! suite that the server answers as this document says.

use serde_json::{json, Value};

use super::types::ALGORITHMS;

pub struct SpecLimits {
    pub max_sentences: usize,
    pub dimension: usize,
    pub model: String,
    /// The model's prompt names (`prompt_name`).
    pub prompts: Vec<String>,
}

/// An enum that also admits null (OpenAPI 3.0: `nullable` does not extend `enum`).
fn nullable_enum(values: &[&str]) -> Value {
    let mut list: Vec<Value> = values.iter().map(|v| json!(v)).collect();
    list.push(Value::Null);
    Value::Array(list)
}

pub fn document(limits: &SpecLimits) -> Value {
    let error = json!({"$ref": "#/components/schemas/Error"});
    let errors = |codes: &[&str]| -> Value {
        let mut out = serde_json::Map::new();
        for code in codes {
            let description = match *code {
                "400" => "Malformed JSON or body not UTF-8",
                "404" => "Unknown model (OpenAI route)",
                "413" => "Body larger than max_body_bytes",
                "415" => "Content-Type is not application/json",
                "422" => {
                    "Valid JSON with a missing, mistyped or impossible field (named in the message)"
                }
                "503" => "The worker's queue is full; see Retry-After",
                _ => "Internal error",
            };
            out.insert(
                code.to_string(),
                json!({"description": description, "content": {"application/json": {"schema": error}}}),
            );
        }
        Value::Object(out)
    };
    let post_errors = ["400", "413", "415", "422", "500", "503"];
    let with_ok = |ok: Value, codes: &[&str]| -> Value {
        let mut responses = errors(codes);
        responses["200"] = ok;
        responses
    };
    let strings = json!({"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": limits.max_sentences});
    let one_or_many = json!({"oneOf": [{"type": "string"}, strings]});
    let vector = json!({"type": "array", "items": {"type": "number"}, "minItems": limits.dimension, "maxItems": limits.dimension});
    let prompt_names: Vec<&str> = limits.prompts.iter().map(String::as_str).collect();
    let prompt_name = json!({"type": "string", "nullable": true, "enum": nullable_enum(&prompt_names), "description": "One of the model's prompts (GET /info), put in front of every sentence; null or absent: the model's default prompt, if it has one"});

    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "forkserve",
            "version": env!("CARGO_PKG_VERSION"),
            "description": format!("Sentence embeddings and clustering with {}: a prefork server whose workers share one copy of the model. An optional field sent as null takes its default.", limits.model)
        },
        "paths": {
            "/cluster": {"post": {
                "summary": "Group sentences by meaning",
                "description": "Embeds the sentences and clusters them. `community` is sentence-transformers' community_detection; `agglomerative` is average linkage on cosine similarity. Clusters come largest first, each in input order; sentences in no cluster of at least `min_cluster_size` are listed in `unclustered`.",
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ClusterRequest"}}}},
                "responses": with_ok(json!({"description": "The clusters", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ClusterResponse"}}}}), &post_errors)
            }},
            "/embed": {"post": {
                "summary": "Embed sentences (text-embeddings-inference's shape)",
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/EmbedRequest"}}}},
                "responses": with_ok(json!({"description": "One vector per input, in input order", "content": {"application/json": {"schema": {"type": "array", "items": vector}}}}), &post_errors)
            }},
            "/v1/embeddings": {"post": {
                "summary": "Embed sentences (OpenAI's shape)",
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/OpenAiRequest"}}}},
                "responses": with_ok(json!({"description": "The embeddings and token usage", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/OpenAiResponse"}}}}), &["400", "404", "413", "415", "422", "500", "503"])
            }},
            "/info": {"get": {"summary": "Model and limits", "responses": {"200": {"description": "Model and limits", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Info"}}}}}}},
            "/health": {"get": {"summary": "Liveness and readiness of the worker that answers", "responses": {
                "200": {"description": "Serving", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}}},
                "503": {"description": "This worker is draining", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}}}
            }}},
            "/metrics": {"get": {"summary": "Prometheus metrics for the whole server (all workers)", "responses": {"200": {"description": "Prometheus text format 0.0.4", "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3.0", "content": {"application/json": {"schema": {"type": "object"}}}}}}},
            "/docs": {"get": {"summary": "This API, as a page", "responses": {"200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}}}},
            "/": {"get": {"summary": "A page to cluster sentences by hand", "responses": {"200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}}}}
        },
        "components": {"schemas": {
            "Error": {"type": "object", "required": ["error", "error_type"], "properties": {
                "error": {"type": "string", "description": "What is wrong, starting with the field it concerns"},
                "error_type": {"type": "string"}
            }},
            "ClusterRequest": {"type": "object", "additionalProperties": false, "required": ["sentences"], "properties": {
                "sentences": strings,
                "threshold": {"type": "number", "nullable": true, "exclusiveMinimum": true, "minimum": 0, "maximum": 1, "description": "Cosine similarity at or above which sentences belong together (default 0.5)"},
                "min_cluster_size": {"type": "integer", "nullable": true, "minimum": 1, "description": "Smaller groups are reported as unclustered (default 1)"},
                "algorithm": {"type": "string", "nullable": true, "enum": nullable_enum(ALGORITHMS)},
                "prompt_name": prompt_name
            }},
            "ClusterResponse": {"type": "object", "required": ["clusters", "indices", "unclustered", "unclustered_indices", "algorithm", "threshold", "min_cluster_size"], "properties": {
                "clusters": {"type": "array", "items": {"type": "array", "items": {"type": "string"}}},
                "indices": {"type": "array", "items": {"type": "array", "items": {"type": "integer", "minimum": 0}}},
                "unclustered": {"type": "array", "items": {"type": "string"}},
                "unclustered_indices": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                "algorithm": {"type": "string", "enum": ALGORITHMS},
                "threshold": {"type": "number"},
                "min_cluster_size": {"type": "integer"}
            }},
            "EmbedRequest": {"type": "object", "additionalProperties": false, "required": ["inputs"], "properties": {
                "inputs": one_or_many,
                "normalize": {"type": "boolean", "nullable": true, "default": true},
                "truncate": {"type": "boolean", "nullable": true, "default": true, "description": "false: input longer than the model's maximum is a 422 with its token count"},
                "truncation_direction": {"type": "string", "enum": ["right", "Right", null], "nullable": true},
                "prompt_name": prompt_name
            }},
            "OpenAiRequest": {"type": "object", "additionalProperties": false, "required": ["input"], "properties": {
                "input": one_or_many,
                "model": {"type": "string", "nullable": true, "enum": [limits.model.clone(), null]},
                "encoding_format": {"type": "string", "nullable": true, "enum": ["float", "base64", null]},
                "dimensions": {"type": "integer", "nullable": true, "enum": [limits.dimension, null]},
                "user": {"type": "string", "nullable": true},
                "prompt_name": prompt_name
            }},
            "OpenAiResponse": {"type": "object", "required": ["object", "data", "model", "usage"], "properties": {
                "object": {"type": "string", "enum": ["list"]},
                "data": {"type": "array", "items": {"type": "object", "required": ["object", "index", "embedding"], "properties": {
                    "object": {"type": "string", "enum": ["embedding"]},
                    "index": {"type": "integer", "minimum": 0},
                    "embedding": {"oneOf": [vector, {"type": "string", "description": "base64 of little-endian float32"}]}
                }}},
                "model": {"type": "string"},
                "usage": {"type": "object", "required": ["prompt_tokens", "total_tokens"], "properties": {
                    "prompt_tokens": {"type": "integer", "minimum": 0},
                    "total_tokens": {"type": "integer", "minimum": 0}
                }}
            }},
            "Info": {"type": "object", "required": ["model_id", "dimension", "max_input_length", "version"], "properties": {
                "model_id": {"type": "string"}, "model_dtype": {"type": "string"},
                "architecture": {"type": "string"}, "model_type": {"type": "string"},
                "dimension": {"type": "integer"}, "max_input_length": {"type": "integer"},
                "pooling": {"type": "string"}, "dense": {"type": "array", "items": {"type": "string"}},
                "normalized": {"type": "boolean"},
                "prompts": {"type": "object", "additionalProperties": {"type": "string"}},
                "default_prompt_name": {"type": "string", "nullable": true},
                "similarity_fn_name": {"type": "string"},
                "max_sentences": {"type": "integer"},
                "max_body_bytes": {"type": "integer"}, "max_batch_tokens": {"type": "integer"},
                "cluster_algorithms": {"type": "array", "items": {"type": "string"}},
                "default_threshold": {"type": "number"}, "default_min_cluster_size": {"type": "integer"},
                "version": {"type": "string"}, "worker_pid": {"type": "integer"}
            }},
            "Health": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string", "enum": ["ok", "draining"]}}}
        }}
    })
}
