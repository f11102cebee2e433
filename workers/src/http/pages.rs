//! The two pages served from the binary (no CDN, no build step): `/` to cluster sentences by
//! hand, `/docs` to read the API from `/openapi.json`.

pub const INDEX: &str = include_str!("static/index.html");
pub const DOCS: &str = include_str!("static/docs.html");
