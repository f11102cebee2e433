//! The API key (`api_key`): `Authorization: Bearer <key>` on every route but the health checks,
//! as text-embeddings-inference and OpenAI-style servers ask. The comparison takes the same time
//! whatever the bytes sent, so the key cannot be guessed a byte at a time from response times.

use hyper::header::AUTHORIZATION;
use hyper::HeaderMap;

use super::errors::ApiError;

pub struct ApiKey(Vec<u8>);

impl ApiKey {
    pub fn new(key: &str) -> ApiKey {
        ApiKey(key.as_bytes().to_vec())
    }

    pub fn check(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let sent = headers
            .get(AUTHORIZATION)
            .map(|v| v.as_bytes())
            .and_then(|v| {
                let (scheme, token) = v.split_at(v.iter().position(|b| *b == b' ')?);
                scheme
                    .eq_ignore_ascii_case(b"bearer")
                    .then(|| token.trim_ascii())
            });
        match sent {
            None => Err(ApiError::Unauthorized(
                "missing API key: send `Authorization: Bearer <key>`".into(),
            )),
            Some(token) if constant_time_eq(token, &self.0) => Ok(()),
            Some(_) => Err(ApiError::Unauthorized("invalid API key".into())),
        }
    }
}

/// Equal contents, in time that depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        h
    }

    #[test]
    fn bearer_tokens() {
        let key = ApiKey::new("s3cret");
        assert!(key.check(&headers("Bearer s3cret")).is_ok());
        assert!(key.check(&headers("bearer s3cret")).is_ok());
        assert!(key.check(&headers("Bearer s3cre")).is_err());
        assert!(key.check(&headers("Bearer s3cret2")).is_err());
        assert!(key.check(&headers("Basic s3cret")).is_err());
        assert!(key.check(&headers("s3cret")).is_err());
        assert!(key.check(&HeaderMap::new()).is_err());
    }

    #[test]
    fn equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
    }
}
