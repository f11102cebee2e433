//! Every way a request can fail, mapped to a status code in one place. Bodies are always JSON:
//! `{"error": "<what is wrong>", "error_type": "<kind>"}`.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use hyper::{Response, StatusCode};
use serde::Serialize;

#[derive(Debug, Clone, PartialEq)]
pub enum ApiError {
    /// The body is not valid JSON (syntax, truncation, nesting too deep).
    InvalidJson(String),
    /// The body is not UTF-8.
    InvalidUtf8(String),
    /// Valid JSON with a missing field, a wrong type or an impossible value; names the field.
    Validation {
        field: String,
        message: String,
    },
    /// Body larger than `max_body_bytes`.
    PayloadTooLarge {
        limit: usize,
    },
    /// HTTP that parses but that a strict server refuses (ambiguous framing and the like).
    MalformedRequest(String),
    /// Request line longer than `limit_request_line` (400, as gunicorn).
    RequestLineTooLong {
        limit: usize,
    },
    /// A header field longer than `limit_request_field_size`.
    HeaderTooLarge {
        name: String,
        limit: usize,
    },
    /// The request does not say it carries JSON.
    UnsupportedMediaType(String),
    /// The path exists, the method does not.
    MethodNotAllowed {
        allow: &'static str,
    },
    /// CONNECT: forkserve is not a proxy.
    NotAProxy,
    /// An `Expect` other than `100-continue` (RFC 9110 §10.1.1).
    ExpectationFailed(String),
    NotFound(String),
    /// `/v1/embeddings` asked for a model this server does not serve.
    ModelNotFound(String),
    /// `api_key` is set and the request has no valid `Authorization: Bearer`.
    Unauthorized(String),
    /// The worker's queue is full (or it is shutting down): try again shortly.
    Overloaded(String),
    /// Our fault, not the client's.
    Internal(String),
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    error_type: &'static str,
}

impl ApiError {
    pub fn validation(field: impl Into<String>, message: impl Into<String>) -> ApiError {
        ApiError::Validation {
            field: field.into(),
            message: message.into(),
        }
    }

    /// A validation error of a nested object names its full path (`inputs.sentences[2]`).
    pub fn in_field(self, prefix: &str) -> ApiError {
        match self {
            ApiError::Validation { field, message } => ApiError::Validation {
                field: format!("{prefix}{field}"),
                message,
            },
            other => other,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidJson(_)
            | ApiError::InvalidUtf8(_)
            | ApiError::MalformedRequest(_)
            | ApiError::RequestLineTooLong { .. } => StatusCode::BAD_REQUEST,
            ApiError::HeaderTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ApiError::Validation { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::MethodNotAllowed { .. } | ApiError::NotAProxy => {
                StatusCode::METHOD_NOT_ALLOWED
            }
            ApiError::ExpectationFailed(_) => StatusCode::EXPECTATION_FAILED,
            ApiError::NotFound(_) | ApiError::ModelNotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Overloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn error_type(&self) -> &'static str {
        match self {
            ApiError::InvalidJson(_) => "invalid_json",
            ApiError::InvalidUtf8(_) => "invalid_utf8",
            ApiError::MalformedRequest(_) => "malformed_request",
            ApiError::RequestLineTooLong { .. } => "request_line_too_long",
            ApiError::HeaderTooLarge { .. } => "header_too_large",
            ApiError::Validation { .. } => "validation",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::MethodNotAllowed { .. } | ApiError::NotAProxy => "method_not_allowed",
            ApiError::ExpectationFailed(_) => "expectation_failed",
            ApiError::NotFound(_) => "not_found",
            ApiError::ModelNotFound(_) => "model_not_found",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Overloaded(_) => "overloaded",
            ApiError::Internal(_) => "internal",
        }
    }

    pub fn message(&self) -> String {
        match self {
            ApiError::InvalidJson(m) => format!("malformed JSON: {m}"),
            ApiError::InvalidUtf8(m) => format!("body is not valid UTF-8: {m}"),
            ApiError::Validation { field, message } => format!("{field}: {message}"),
            ApiError::MalformedRequest(m) => format!("malformed request: {m}"),
            ApiError::RequestLineTooLong { limit } => {
                format!("request line longer than {limit} bytes")
            }
            ApiError::HeaderTooLarge { name, limit } => {
                format!("header {name}: longer than {limit} bytes")
            }
            ApiError::PayloadTooLarge { limit } => {
                format!("request body is larger than the limit of {limit} bytes")
            }
            ApiError::UnsupportedMediaType(m) => m.clone(),
            ApiError::MethodNotAllowed { allow } => format!("method not allowed; use {allow}"),
            ApiError::NotAProxy => {
                "CONNECT is not supported: forkserve is an HTTP server, not a proxy".to_string()
            }
            ApiError::ExpectationFailed(m) => m.clone(),
            ApiError::NotFound(path) => format!("no route for {path}"),
            ApiError::ModelNotFound(m) => m.clone(),
            ApiError::Unauthorized(m) => m.clone(),
            ApiError::Overloaded(m) => m.clone(),
            ApiError::Internal(m) => m.clone(),
        }
    }

    /// The error as the last line of a streamed answer, whose status (200) was sent before
    /// the error happened: `{"error", "error_type", "status"}`.
    pub fn as_json_line(&self) -> serde_json::Value {
        serde_json::json!({
            "error": self.message(),
            "error_type": self.error_type(),
            "status": self.status().as_u16(),
        })
    }

    pub fn into_response(self) -> Response<Full<Bytes>> {
        let message = self.message();
        let body = serde_json::to_vec(&ErrorBody {
            error: &message,
            error_type: self.error_type(),
        })
        .unwrap_or_default();
        let status = self.status();
        self.respond(status, body)
    }

    /// On OpenAI's routes: OpenAI's envelope `{"error": {"message", "type", "param",
    /// "code"}}` and its statuses (400 for any invalid input, where forkserve's own routes
    /// say 422), so that OpenAI's clients raise the exception their users catch.
    pub fn into_openai_response(self) -> Response<Full<Bytes>> {
        let status = match self.status() {
            StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
            other => other,
        };
        let kind = match status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "invalid_request_error",
            429 => "rate_limit_error",
            s if s >= 500 => "server_error",
            _ => "invalid_request_error",
        };
        let (param, code) = match &self {
            ApiError::Validation { field, .. } => (Some(field.clone()), None),
            ApiError::ModelNotFound(_) => (Some("model".to_string()), Some("model_not_found")),
            ApiError::Unauthorized(_) => (None, Some("invalid_api_key")),
            ApiError::NotFound(_) => (None, Some("not_found")),
            ApiError::Overloaded(_) => (None, Some("overloaded")),
            ApiError::PayloadTooLarge { .. } => (None, Some("payload_too_large")),
            _ => (None, None),
        };
        let body = serde_json::to_vec(&serde_json::json!({
            "error": {"message": self.message(), "type": kind, "param": param, "code": code}
        }))
        .unwrap_or_default();
        self.respond(status, body)
    }

    fn respond(self, status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        match self {
            ApiError::MethodNotAllowed { allow } => {
                headers.insert(ALLOW, HeaderValue::from_static(allow));
            }
            ApiError::NotAProxy => {
                headers.insert(ALLOW, HeaderValue::from_static("GET, HEAD, POST"));
                // A tunnel was asked for; what follows on this connection is not HTTP to us.
                headers.insert(CONNECTION, HeaderValue::from_static("close"));
            }
            ApiError::Overloaded(_) => {
                headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ApiError::Unauthorized(_) => {
                headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            // A request refused for how it is framed or sized: whatever follows it on the
            // connection cannot be trusted to start where we think it does.
            ApiError::MalformedRequest(_)
            | ApiError::RequestLineTooLong { .. }
            | ApiError::HeaderTooLarge { .. } => {
                headers.insert(CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_field() {
        let e = ApiError::validation("sentences[2]", "expected a string, got a number");
        assert_eq!(e.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(e.message(), "sentences[2]: expected a string, got a number");
    }

    #[test]
    fn method_not_allowed_carries_allow() {
        let r = ApiError::MethodNotAllowed { allow: "POST" }.into_response();
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()[ALLOW], "POST");
    }

    #[test]
    fn overloaded_says_when_to_retry() {
        let r = ApiError::Overloaded("queue full".into()).into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[RETRY_AFTER], "1");
    }
}
