//! `GET /openapi.json`: the API described in OpenAPI 3.0, next to the wire types it documents
//! (`types.rs`) and with the same limits the server enforces. schemathesis checks in the test
//! suite that the server answers as this document says.

use serde_json::{json, Value};

use super::types::ALGORITHMS;

pub struct SpecLimits {
    pub max_sentences: usize,
    /// `/cluster`'s own limit (`cluster.max_sentences`).
    pub cluster_max_sentences: usize,
    pub dimension: usize,
    pub model: String,
    /// The model's prompt names (`prompt_name`).
    pub prompts: Vec<String>,
    /// Token ids are below this.
    pub vocab_size: usize,
    /// Whether `api_key` protects the routes (then every one but the health checks takes a
    /// bearer token).
    pub api_key: bool,
}

/// An enum that also admits null (OpenAPI 3.0: `nullable` does not extend `enum`).
fn nullable_enum(values: &[&str]) -> Value {
    let mut list: Vec<Value> = values.iter().map(|v| json!(v)).collect();
    list.push(Value::Null);
    Value::Array(list)
}

pub fn document(limits: &SpecLimits) -> Value {
    let error = json!({"$ref": "#/components/schemas/Error"});
    let openai_error = json!({"$ref": "#/components/schemas/OpenAiError"});
    let describe = |code: &str| match code {
        "400" => "Malformed JSON or body not UTF-8 (on OpenAI's routes: any invalid input)",
        "401" => "Missing or wrong API key",
        "404" => "Unknown model (OpenAI's routes)",
        "413" => "Body larger than max_body_bytes",
        "415" => "Content-Type is not application/json",
        "422" => "Valid JSON with a missing, mistyped or impossible field (named in the message)",
        "503" => "The worker's queue is full; see Retry-After",
        _ => "Internal error",
    };
    let responses = |ok: Value, codes: &[&str], schema: &Value| -> Value {
        let mut out = serde_json::Map::new();
        out.insert("200".into(), ok);
        for code in codes.iter().chain(if limits.api_key {
            &["401"][..]
        } else {
            &[][..]
        }) {
            out.insert(
                code.to_string(),
                json!({"description": describe(code), "content": {"application/json": {"schema": schema}}}),
            );
        }
        Value::Object(out)
    };
    let post_errors = ["400", "413", "415", "422", "500", "503"];
    let openai_errors = ["400", "404", "413", "415", "500", "503"];
    let json_ok = |description: &str, schema: Value| json!({"description": description, "content": {"application/json": {"schema": schema}}});
    let post = |summary: &str, request: &str, ok: Value, openai: bool| {
        let (codes, schema) = match openai {
            true => (&openai_errors[..], &openai_error),
            false => (&post_errors[..], &error),
        };
        json!({"post": {
            "summary": summary,
            "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{request}")}}}},
            "responses": responses(ok, codes, schema)
        }})
    };
    let get = |summary: &str, ok: Value| json!({"get": {"summary": summary, "responses": responses(ok, &[], &error)}});
    let page = |summary: &str| json!({"description": summary, "content": {"text/html": {"schema": {"type": "string"}}}});
    let strings = json!({"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": limits.max_sentences});
    let ids = json!({"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": limits.vocab_size.saturating_sub(1)}, "minItems": 1});
    let inputs = json!({"oneOf": [
        {"type": "string"},
        ids,
        {"type": "array", "minItems": 1, "maxItems": limits.max_sentences, "items": {"oneOf": [{"type": "string"}, ids]}}
    ]});
    let vector = json!({"type": "array", "items": {"type": "number"}, "minItems": 1, "maxItems": limits.dimension});
    let vectors = json!({"type": "array", "items": {"oneOf": [vector, {"type": "string", "description": "base64 of little-endian float32 (encoding_format base64)"}]}});
    let prompt_names: Vec<&str> = limits.prompts.iter().map(String::as_str).collect();
    let prompt_name = json!({"type": "string", "nullable": true, "enum": nullable_enum(&prompt_names), "description": "One of the model's prompts (GET /info), put in front of every sentence; null or absent: the model's default prompt, if it has one"});
    let truncate = json!({"type": "boolean", "nullable": true, "default": true, "description": "false: input longer than the model's maximum is a 422 with its token count"});
    let direction = json!({"type": "string", "nullable": true, "enum": ["Right", "Left", "right", "left", null]});
    let dimensions = json!({"type": "integer", "nullable": true, "minimum": 1, "maximum": limits.dimension, "description": "Keep the first N values of every vector"});
    let security = match limits.api_key {
        true => json!([{"bearer": []}]),
        false => json!([]),
    };

    let paths = json!({
        "/cluster": {"post": {
            "summary": "Group sentences by meaning",
            "description": "Embeds the sentences and clusters them. `community` is sentence-transformers' community_detection; `agglomerative` is average linkage on cosine similarity. Clusters come largest first, each in input order; sentences in no cluster of at least `min_cluster_size` are listed in `unclustered`.",
            "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ClusterRequest"}}}},
            "responses": responses(json_ok("The clusters", json!({"$ref": "#/components/schemas/ClusterResponse"})), &post_errors, &error)
        }},
        "/embed": post("Embed sentences (text-embeddings-inference's shape)", "EmbedRequest", json_ok("One vector per input, in input order", vectors.clone()), false),
        "/invocations": post("Embed sentences (text-embeddings-inference's SageMaker route)", "EmbedRequest", json_ok("One vector per input", vectors.clone()), false),
        "/embed_all": post("Every token's vector (text-embeddings-inference)", "EmbedAllRequest", json_ok("Per input, one vector per token", json!({"type": "array", "items": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}})), false),
        "/similarity": post("Cosine similarity of each sentence to a source sentence (text-embeddings-inference)", "SimilarityRequest", json_ok("One similarity per sentence", json!({"type": "array", "items": {"type": "number"}})), false),
        "/tokenize": post("Tokens of each input (text-embeddings-inference)", "TokenizeRequest", json_ok("Per input, its tokens", json!({"type": "array", "items": {"type": "array", "items": {"$ref": "#/components/schemas/Token"}}})), false),
        "/decode": post("Text of token ids (text-embeddings-inference)", "DecodeRequest", json_ok("One text per sequence", json!({"type": "array", "items": {"type": "string"}})), false),
        "/v1/embeddings": post("Embed sentences (OpenAI's shape)", "OpenAiRequest", json_ok("The embeddings and token usage", json!({"$ref": "#/components/schemas/OpenAiResponse"})), true),
        "/embeddings": post("Embed sentences (OpenAI's shape, unversioned path)", "OpenAiRequest", json_ok("The embeddings and token usage", json!({"$ref": "#/components/schemas/OpenAiResponse"})), true),
        "/v1/models": get("The model served (OpenAI's shape)", json_ok("A list of one model", json!({"$ref": "#/components/schemas/OpenAiModels"}))),
        "/v1/models/{model}": {"get": {
            "summary": "One model (OpenAI's shape)",
            "parameters": [{"name": "model", "in": "path", "required": true, "schema": {"type": "string"}}],
            "responses": responses(json_ok("The model", json!({"$ref": "#/components/schemas/OpenAiModel"})), &["404"], &openai_error)
        }},
        "/info": get("Model and limits", json_ok("Model and limits", json!({"$ref": "#/components/schemas/Info"}))),
        "/health": {"get": {"summary": "Liveness and readiness of the worker that answers", "security": [], "responses": {
            "200": {"description": "Serving", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}}},
            "503": {"description": "This worker is draining", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}}}
        }}},
        "/ping": {"get": {"summary": "The same as /health (text-embeddings-inference's SageMaker route)", "security": [], "responses": {
            "200": {"description": "Serving", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}}},
            "503": {"description": "This worker is draining", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Health"}}}}
        }}},
        "/metrics": get("Prometheus metrics for the whole server (all workers)", json!({"description": "Prometheus text format 0.0.4", "content": {"text/plain": {"schema": {"type": "string"}}}})),
        "/openapi.json": get("This document", json_ok("OpenAPI 3.0", json!({"type": "object"}))),
        "/docs": get("This API, as a page", page("HTML")),
        "/": {
            "get": {"summary": "A page to cluster sentences by hand", "responses": responses(page("HTML"), &[], &error)},
            "post": {
                "summary": "Embed sentences: text-embeddings-inference's route for the server's bare URL (what huggingface_hub's InferenceClient calls)",
                "requestBody": {"required": true, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/EmbedRequest"}}}},
                "responses": responses(json_ok("One vector per input", vectors.clone()), &post_errors, &error)
            }
        }
    });
    let mut schemas = json!({
            "Error": {"type": "object", "required": ["error", "error_type"], "properties": {
                "error": {"type": "string", "description": "What is wrong, starting with the field it concerns"},
                "error_type": {"type": "string"}
            }},
            "OpenAiError": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": "string", "nullable": true},
                "code": {"type": "string", "nullable": true}
            }}}},
            "ClusterRequest": {"type": "object", "additionalProperties": false, "required": ["sentences"], "properties": {
                "sentences": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": limits.cluster_max_sentences,
                    "description": "Up to cluster.max_sentences; agglomerative up to cluster.max_agglomerative_sentences (422 above)"},
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
            }}
    });
    let more = json!({
            "EmbedRequest": {"type": "object", "additionalProperties": false, "required": ["inputs"], "properties": {
                "inputs": inputs,
                "normalize": {"type": "boolean", "nullable": true, "default": true},
                "truncate": truncate,
                "truncation_direction": direction,
                "prompt_name": prompt_name,
                "dimensions": dimensions,
                "encoding_format": {"type": "string", "nullable": true, "enum": ["float", "base64", null], "description": "base64: each vector as base64 of its little-endian float32 bytes"}
            }},
            "EmbedAllRequest": {"type": "object", "additionalProperties": false, "required": ["inputs"], "properties": {
                "inputs": inputs,
                "truncate": truncate,
                "truncation_direction": direction,
                "prompt_name": prompt_name
            }},
            "SimilarityRequest": {"type": "object", "additionalProperties": false, "required": ["inputs"], "properties": {
                "inputs": {"type": "object", "additionalProperties": false, "required": ["source_sentence", "sentences"], "properties": {
                    "source_sentence": {"type": "string"},
                    "sentences": strings
                }},
                "parameters": {"type": "object", "nullable": true, "additionalProperties": false, "properties": {
                    "prompt_name": prompt_name,
                    "truncate": truncate,
                    "truncation_direction": direction
                }}
            }},
            "TokenizeRequest": {"type": "object", "additionalProperties": false, "required": ["inputs"], "properties": {
                "inputs": {"oneOf": [{"type": "string"}, strings]},
                "add_special_tokens": {"type": "boolean", "nullable": true, "default": true},
                "prompt_name": prompt_name
            }},
            "Token": {"type": "object", "required": ["id", "text", "special"], "properties": {
                "id": {"type": "integer", "minimum": 0},
                "text": {"type": "string"},
                "special": {"type": "boolean"},
                "start": {"type": "integer", "nullable": true},
                "stop": {"type": "integer", "nullable": true}
            }},
            "DecodeRequest": {"type": "object", "additionalProperties": false, "required": ["ids"], "properties": {
                "ids": {"oneOf": [ids, {"type": "array", "minItems": 1, "maxItems": limits.max_sentences, "items": ids}]},
                "skip_special_tokens": {"type": "boolean", "nullable": true, "default": true}
            }},
            "OpenAiRequest": {"type": "object", "additionalProperties": false, "required": ["input"], "properties": {
                "input": inputs,
                "model": {"type": "string", "nullable": true, "enum": [limits.model.clone(), null]},
                "encoding_format": {"type": "string", "nullable": true, "enum": ["float", "base64", null]},
                "dimensions": dimensions,
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
            "OpenAiModel": {"type": "object", "required": ["id", "object", "created", "owned_by"], "properties": {
                "id": {"type": "string"}, "object": {"type": "string", "enum": ["model"]},
                "created": {"type": "integer"}, "owned_by": {"type": "string"}
            }},
            "OpenAiModels": {"type": "object", "required": ["object", "data"], "properties": {
                "object": {"type": "string", "enum": ["list"]},
                "data": {"type": "array", "items": {"$ref": "#/components/schemas/OpenAiModel"}}
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
                "cluster_max_sentences": {"type": "integer"}, "cluster_max_body_bytes": {"type": "integer"},
                "cluster_max_agglomerative_sentences": {"type": "integer"},
                "version": {"type": "string"}, "worker_pid": {"type": "integer"}
            }},
            "Health": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string", "enum": ["ok", "draining"]}}}
    });
    if let (Some(all), Value::Object(extra)) = (schemas.as_object_mut(), more) {
        all.extend(extra);
    }
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "forkserve",
            "version": env!("CARGO_PKG_VERSION"),
            "description": format!("Sentence embeddings and clustering with {}: a prefork server whose workers share one copy of the model. text-embeddings-inference's and OpenAI's routes are served too. An optional field sent as null takes its default.", limits.model)
        },
        "security": security,
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas
        }
    })
}
