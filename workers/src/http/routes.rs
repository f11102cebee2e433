//! The routes: forkserve's own, text-embeddings-inference's (what Hugging Face's
//! `InferenceClient` calls, `POST /` included) and OpenAI's. A route is what a request is counted
//! under in `/metrics`; the method then picks the handler.

use hyper::Method;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// `GET /`: the page; `POST /`: TEI's embed (what `InferenceClient` sends to a bare URL).
    Root,
    /// `POST /invocations`: TEI's (SageMaker's) embed.
    Invocations,
    Cluster,
    Embed,
    EmbedAll,
    Similarity,
    Tokenize,
    Decode,
    /// `POST /v1/embeddings`.
    OpenAiEmbeddings,
    /// `POST /embeddings`: OpenAI's route without the version prefix.
    Embeddings,
    /// `GET /v1/models`.
    Models,
    /// `GET /v1/models/{id}`.
    Model,
    Info,
    Health,
    /// `GET /ping`: TEI's (SageMaker's) health.
    Ping,
    Metrics,
    OpenApi,
    Docs,
    /// No route of ours.
    Other,
}

/// What a request asks for, once its route and method are known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handler {
    Page,
    Cluster,
    Embed,
    EmbedAll,
    Similarity,
    Tokenize,
    Decode,
    OpenAiEmbeddings,
    Models,
    Model,
    Info,
    Health,
    Metrics,
    OpenApi,
    Docs,
}

impl Route {
    /// Every route, in the order of the metrics arrays.
    pub const ALL: [Route; 19] = [
        Route::Root,
        Route::Invocations,
        Route::Cluster,
        Route::Embed,
        Route::EmbedAll,
        Route::Similarity,
        Route::Tokenize,
        Route::Decode,
        Route::OpenAiEmbeddings,
        Route::Embeddings,
        Route::Models,
        Route::Model,
        Route::Info,
        Route::Health,
        Route::Ping,
        Route::Metrics,
        Route::OpenApi,
        Route::Docs,
        Route::Other,
    ];
    pub const COUNT: usize = Route::ALL.len();

    /// The route of a path.
    pub fn of(path: &str) -> Route {
        match path {
            "/" => Route::Root,
            "/invocations" => Route::Invocations,
            "/cluster" => Route::Cluster,
            "/embed" => Route::Embed,
            "/embed_all" => Route::EmbedAll,
            "/similarity" => Route::Similarity,
            "/tokenize" => Route::Tokenize,
            "/decode" => Route::Decode,
            "/v1/embeddings" => Route::OpenAiEmbeddings,
            "/embeddings" => Route::Embeddings,
            "/v1/models" => Route::Models,
            "/info" => Route::Info,
            "/health" => Route::Health,
            "/ping" => Route::Ping,
            "/metrics" => Route::Metrics,
            "/openapi.json" => Route::OpenApi,
            "/docs" => Route::Docs,
            p if p
                .strip_prefix("/v1/models/")
                .is_some_and(|id| !id.is_empty()) =>
            {
                Route::Model
            }
            _ => Route::Other,
        }
    }

    /// The label in `/metrics` (the path, with `{id}` for a model's).
    pub fn label(self) -> &'static str {
        match self {
            Route::Root => "/",
            Route::Invocations => "/invocations",
            Route::Cluster => "/cluster",
            Route::Embed => "/embed",
            Route::EmbedAll => "/embed_all",
            Route::Similarity => "/similarity",
            Route::Tokenize => "/tokenize",
            Route::Decode => "/decode",
            Route::OpenAiEmbeddings => "/v1/embeddings",
            Route::Embeddings => "/embeddings",
            Route::Models => "/v1/models",
            Route::Model => "/v1/models/{id}",
            Route::Info => "/info",
            Route::Health => "/health",
            Route::Ping => "/ping",
            Route::Metrics => "/metrics",
            Route::OpenApi => "/openapi.json",
            Route::Docs => "/docs",
            Route::Other => "other",
        }
    }

    /// Index in the metrics arrays.
    pub fn index(self) -> usize {
        Route::ALL
            .iter()
            .position(|r| *r == self)
            .unwrap_or(Route::COUNT - 1)
    }

    /// OpenAI's routes answer errors in OpenAI's envelope.
    pub fn is_openai(self) -> bool {
        matches!(
            self,
            Route::OpenAiEmbeddings | Route::Embeddings | Route::Models | Route::Model
        )
    }

    /// Routes open without the API key: health checks must not need a secret.
    pub fn is_public(self) -> bool {
        matches!(self, Route::Health | Route::Ping)
    }

    /// The handler for this method, or the methods the route takes (for 405's `Allow`).
    pub fn handler(self, method: &Method) -> Result<Handler, &'static str> {
        let get = method == Method::GET || method == Method::HEAD;
        let post = method == Method::POST;
        let (handler, allow) = match self {
            Route::Root if post => (Some(Handler::Embed), ""),
            Route::Root => (get.then_some(Handler::Page), "GET, HEAD, POST"),
            Route::Invocations | Route::Embed => (post.then_some(Handler::Embed), "POST"),
            Route::Cluster => (post.then_some(Handler::Cluster), "POST"),
            Route::EmbedAll => (post.then_some(Handler::EmbedAll), "POST"),
            Route::Similarity => (post.then_some(Handler::Similarity), "POST"),
            Route::Tokenize => (post.then_some(Handler::Tokenize), "POST"),
            Route::Decode => (post.then_some(Handler::Decode), "POST"),
            Route::OpenAiEmbeddings | Route::Embeddings => {
                (post.then_some(Handler::OpenAiEmbeddings), "POST")
            }
            Route::Models => (get.then_some(Handler::Models), "GET, HEAD"),
            Route::Model => (get.then_some(Handler::Model), "GET, HEAD"),
            Route::Info => (get.then_some(Handler::Info), "GET, HEAD"),
            Route::Health | Route::Ping => (get.then_some(Handler::Health), "GET, HEAD"),
            Route::Metrics => (get.then_some(Handler::Metrics), "GET, HEAD"),
            Route::OpenApi => (get.then_some(Handler::OpenApi), "GET, HEAD"),
            Route::Docs => (get.then_some(Handler::Docs), "GET, HEAD"),
            Route::Other => (None, ""),
        };
        handler.ok_or(allow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_methods_and_labels() {
        assert_eq!(
            Route::of("/cluster").handler(&Method::POST),
            Ok(Handler::Cluster)
        );
        assert_eq!(Route::of("/").handler(&Method::POST), Ok(Handler::Embed));
        assert_eq!(Route::of("/").handler(&Method::GET), Ok(Handler::Page));
        assert_eq!(Route::of("/").handler(&Method::PUT), Err("GET, HEAD, POST"));
        assert_eq!(Route::of("/embed").handler(&Method::GET), Err("POST"));
        assert_eq!(Route::of("/v1/models/x").label(), "/v1/models/{id}");
        assert_eq!(Route::of("/v1/models/"), Route::Other);
        assert_eq!(Route::of("/nope").label(), "other");
        assert!(Route::of("/embeddings").is_openai());
        for (i, r) in Route::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }
}
