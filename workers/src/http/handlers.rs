//! The handlers that compute: clustering, TEI's embedding routes (`/embed`, `/`,
//! `/invocations`, `/embed_all`, `/similarity`, `/tokenize`, `/decode`) and OpenAI's
//! (`/v1/embeddings`, `/embeddings`, `/v1/models`). Each parses its wire type, then runs its
//! work on the compute thread through the `Embedder` seam.

use base64::Engine;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};
use serde_json::Value;

use std::sync::Arc;

use super::app::{json_response, App, LineStream, ResponseBody};
use super::errors::ApiError;
use super::types::{
    parse_decode_request, parse_embed_all_request, parse_embed_request, parse_openai_request,
    parse_similarity_request, parse_tokenize_request, ClusterRequest, ClusterResponse,
    EmbeddingValue, OpenAiEmbedding, OpenAiModel, OpenAiModels, OpenAiResponse, OpenAiUsage, Side,
    TextInput,
};
use crate::cluster::{Clusterer, Clustering, Vectors};
use crate::compute::{ComputeError, Embedded, Progress, Stepwise};
use crate::embedder::{unit_length, EmbedError, Embedder, Tokens};

type Reply = Result<Response<Full<Bytes>>, ApiError>;

/// How `encode` runs for one request.
#[derive(Clone)]
pub(super) struct EncodeOptions {
    /// Text prepended to every sentence (the resolved prompt).
    prompt: Option<String>,
    /// false: an input longer than the model's maximum is a 422 instead of being cut.
    truncate: bool,
    side: Side,
    /// Scale every vector to unit length.
    normalize: bool,
    /// Keep the first values only (Matryoshka), before normalising.
    dimensions: Option<usize>,
}

impl App {
    /// How to encode for a request: the prompt it names (or the model's default prompt),
    /// truncation, normalisation and the batch budget.
    fn options(
        &self,
        prompt_name: Option<&str>,
        truncate: bool,
        side: Side,
        normalize: bool,
    ) -> Result<EncodeOptions, ApiError> {
        let prompt = self
            .model
            .prompt(prompt_name)
            .map_err(|e| ApiError::validation("prompt_name", e))?;
        Ok(EncodeOptions {
            prompt: prompt.map(str::to_string),
            truncate,
            side,
            normalize,
            dimensions: None,
        })
    }

    /// Tokenize (on the compute thread, refusing over-long input unless `truncate`), embed in
    /// passes shared with other requests, cut to `dimensions`, optionally normalise. Returns
    /// the vectors and the number of tokens the model saw.
    async fn encode(
        &self,
        inputs: Vec<TextInput>,
        field: &'static str,
        options: EncodeOptions,
    ) -> Result<(Vec<Vec<f32>>, usize), ApiError> {
        self.encode_reporting(inputs, field, options, None).await
    }

    /// `encode`, telling `progress` how many sentences are done after each forward pass.
    async fn encode_reporting(
        &self,
        inputs: Vec<TextInput>,
        field: &'static str,
        options: EncodeOptions,
        progress: Option<Progress>,
    ) -> Result<(Vec<Vec<f32>>, usize), ApiError> {
        let tokenizing = options.clone();
        let Embedded {
            mut vectors,
            tokens: seen,
        } = self
            .compute
            .embed(
                move |embedder| tokenize_inputs(embedder, &inputs, field, &tokenizing),
                progress,
            )
            .await
            .map_err(compute_error)??;
        // Never `null` in JSON, nor a silently wrong answer: a vector with NaN or infinity
        // (weights damaged after the probe, or a numeric overflow) is our failure.
        if let Some(i) = vectors
            .iter()
            .position(|v| v.iter().any(|x| !x.is_finite()))
        {
            tracing::error!(
                input = i,
                "the model gave a vector with NaN or infinite values"
            );
            return Err(ApiError::Internal(format!(
                "the model gave a vector with NaN or infinite values for {field}[{i}]"
            )));
        }
        for v in &mut vectors {
            if let Some(d) = options.dimensions {
                v.truncate(d);
            }
            if options.normalize {
                unit_length(v);
            }
        }
        Ok((vectors, seen))
    }

    /// `POST /cluster`: embed the sentences (in passes shared with other requests), then
    /// cluster them in steps on the compute thread. `progress`, if any, gets one JSON line
    /// after each pass (`{"embedded": k, "total": n}`) and each clustering step
    /// (`{"clustering": {"algorithm", "compared", "total"}}`).
    pub(super) async fn cluster(
        &self,
        request: ClusterRequest,
        progress: Option<Lines>,
    ) -> Result<ClusterResponse, ApiError> {
        // Cosine similarity, as community_detection computes it: unit vectors.
        let options = self.options(request.prompt_name.as_deref(), true, None, true)?;
        let total = request.sentences.len();
        let inputs = request
            .sentences
            .iter()
            .map(|s| TextInput::Text(s.clone()))
            .collect();
        let embedded: Option<Progress> = progress.clone().map(|lines| {
            Box::new(move |done: usize| {
                let _ = lines.send(json_line(
                    &serde_json::json!({"embedded": done, "total": total}),
                ));
            }) as Progress
        });
        let (vectors, _) = self
            .encode_reporting(inputs, "sentences", options, embedded)
            .await?;
        let algorithm = request.algorithm.name();
        let clustering_line = move |compared: usize| {
            json_line(&serde_json::json!({
                "clustering": {"algorithm": algorithm, "compared": compared, "total": total}
            }))
        };
        if let Some(lines) = &progress {
            let _ = lines.send(clustering_line(0));
        }
        let report = move |clusterer: &Clusterer| {
            if let Some(lines) = &progress {
                let _ = lines.send(clustering_line(clusterer.progress().0));
            }
        };
        let clusterer = Clusterer::new(
            request.algorithm,
            Vectors::from_rows(vectors),
            request.threshold,
            request.min_cluster_size,
        );
        let clustering = self
            .compute
            .run_stepwise(clusterer, report)
            .await
            .map_err(compute_error)?;
        let response = cluster_response(clustering, request);
        if total >= LARGE_REQUEST {
            crate::heap::trim_soon();
        }
        Ok(response)
    }

    /// `POST /cluster` with `Accept: application/x-ndjson`: a 200 at once, then progress
    /// lines, then the result (or `{"error", "error_type", "status"}`) as the last line. A
    /// client that disconnects cancels the work: no further pass or step runs for it.
    pub(super) fn cluster_stream(
        self: &Arc<Self>,
        request: ClusterRequest,
    ) -> Response<ResponseBody> {
        let (lines, body) = LineStream::channel();
        let app = self.clone();
        tokio::spawn(async move {
            let work = app.cluster(request, Some(lines.clone()));
            let last = tokio::select! {
                result = work => match result {
                    Ok(response) => json_line(&response),
                    Err(e) => json_line(&e.as_json_line()),
                },
                // Dropping `work` drops its place in the compute queue: cancelled.
                () = lines.closed() => return,
            };
            let _ = lines.send(last);
        });
        let mut response = Response::new(http_body_util::Either::Right(body));
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/x-ndjson"),
        );
        response
    }

    /// TEI's `POST /embed` (and `/`, `/invocations`): a list of vectors. `normalize` keeps
    /// TEI's meaning: true scales to unit length; false gives the vector before any
    /// normalisation, the model's own Normalize module included.
    pub(super) async fn embed(&self, body: Value) -> Reply {
        let request = parse_embed_request(body, self.limits())?;
        let mut options = self.options(
            request.prompt_name.as_deref(),
            request.truncate,
            request.side,
            request.normalize,
        )?;
        options.dimensions = request.dimensions;
        let (vectors, _) = self.encode(request.inputs, "inputs", options).await?;
        if request.base64 {
            let encoded: Vec<String> = vectors.iter().map(|v| base64_f32(v)).collect();
            return Ok(json_response(StatusCode::OK, &encoded));
        }
        Ok(json_response(StatusCode::OK, &vectors))
    }

    /// TEI's `POST /embed_all`: every token's vector.
    pub(super) async fn embed_all(&self, body: Value) -> Reply {
        let request = parse_embed_all_request(body, self.limits())?;
        let options = self.options(
            request.prompt_name.as_deref(),
            request.truncate,
            request.side,
            false,
        )?;
        let inputs = request.inputs;
        let tokens = self
            .compute
            .run(move |embedder| -> Result<_, ApiError> {
                let tokens = tokenize_inputs(embedder, &inputs, "inputs", &options)?;
                let refs: Vec<&Tokens> = tokens.iter().collect();
                embedder.embed_tokens(&refs).map_err(embed_error)
            })
            .await
            .map_err(compute_error)??;
        Ok(json_response(StatusCode::OK, &tokens))
    }

    /// TEI's `POST /similarity`: the cosine similarity of each sentence to the source.
    pub(super) async fn similarity(&self, body: Value) -> Reply {
        let request = parse_similarity_request(body, self.limits())?;
        let options = self.options(
            request.prompt_name.as_deref(),
            request.truncate,
            request.side,
            true,
        )?;
        let mut texts = vec![TextInput::Text(request.source)];
        texts.extend(request.sentences.into_iter().map(TextInput::Text));
        let (vectors, _) = self.encode(texts, "inputs.sentences", options).await?;
        let (source, others) = vectors
            .split_first()
            .ok_or(ApiError::Internal("no vector".into()))?;
        let scores: Vec<f32> = others
            .iter()
            .map(|v| v.iter().zip(source).map(|(a, b)| a * b).sum())
            .collect();
        Ok(json_response(StatusCode::OK, &scores))
    }

    /// TEI's `POST /tokenize`: the pieces of every input.
    pub(super) async fn tokenize(&self, body: Value) -> Reply {
        let request = parse_tokenize_request(body, self.limits())?;
        let prompt = self
            .model
            .prompt(request.prompt_name.as_deref())
            .map_err(|e| ApiError::validation("prompt_name", e))?
            .map(str::to_string);
        let pieces = self
            .compute
            .run(move |embedder| -> Result<Vec<_>, ApiError> {
                request
                    .inputs
                    .iter()
                    .enumerate()
                    .map(|(i, text)| {
                        embedder
                            .pieces(text, prompt.as_deref(), request.add_special_tokens)
                            .map_err(|e| {
                                ApiError::validation(format!("inputs[{i}]"), e.to_string())
                            })
                    })
                    .collect()
            })
            .await
            .map_err(compute_error)??;
        Ok(json_response(StatusCode::OK, &pieces))
    }

    /// TEI's `POST /decode`: text from token ids.
    pub(super) async fn decode(&self, body: Value) -> Reply {
        let request = parse_decode_request(body, self.limits())?;
        let texts = self
            .compute
            .run(move |embedder| -> Result<Vec<String>, ApiError> {
                request
                    .ids
                    .iter()
                    .enumerate()
                    .map(|(i, ids)| {
                        embedder
                            .decode(ids, request.skip_special_tokens)
                            .map_err(|e| ApiError::validation(format!("ids[{i}]"), e.to_string()))
                    })
                    .collect()
            })
            .await
            .map_err(compute_error)??;
        Ok(json_response(StatusCode::OK, &texts))
    }

    /// OpenAI's `POST /v1/embeddings` (and `/embeddings`): exactly what `encode` returns,
    /// unit length only if the model ends with Normalize; `dimensions` keeps the first values,
    /// as `encode(truncate_dim=...)` does.
    pub(super) async fn openai(&self, body: Value) -> Reply {
        let request = parse_openai_request(body, self.limits())?;
        if let Some(asked) = &request.model {
            if !self.serves(asked) {
                return Err(ApiError::ModelNotFound(format!(
                    "The model `{asked}` does not exist: this server serves `{}`",
                    self.settings.model_name
                )));
            }
        }
        let mut options = self.options(
            request.prompt_name.as_deref(),
            true,
            None,
            self.model.normalized,
        )?;
        options.dimensions = request.dimensions;
        let (vectors, tokens) = self.encode(request.input, "input", options).await?;
        let data = vectors
            .into_iter()
            .enumerate()
            .map(|(index, v)| OpenAiEmbedding {
                object: "embedding",
                index,
                embedding: match request.base64 {
                    true => EmbeddingValue::Base64(base64_f32(&v)),
                    false => EmbeddingValue::Float(v),
                },
            })
            .collect();
        Ok(json_response(
            StatusCode::OK,
            &OpenAiResponse {
                object: "list",
                data,
                model: self.settings.model_name.clone(),
                usage: OpenAiUsage {
                    prompt_tokens: tokens,
                    total_tokens: tokens,
                },
            },
        ))
    }

    /// `GET /v1/models`: the one model this server serves.
    pub(super) fn models(&self) -> Response<Full<Bytes>> {
        json_response(
            StatusCode::OK,
            &OpenAiModels {
                object: "list",
                data: vec![self.openai_model()],
            },
        )
    }

    /// `GET /v1/models/{id}`: the served model under any of its names, else 404
    /// `model_not_found`.
    pub(super) fn model(&self, path: &str) -> Reply {
        let id = percent_decode(path.trim_start_matches("/v1/models/"));
        let id = id.as_str();
        match self.serves(id) {
            true => Ok(json_response(StatusCode::OK, &self.openai_model())),
            false => Err(ApiError::ModelNotFound(format!(
                "The model `{id}` does not exist: this server serves `{}`",
                self.settings.model_name
            ))),
        }
    }

    fn openai_model(&self) -> OpenAiModel {
        OpenAiModel {
            id: self.settings.model_name.clone(),
            object: "model",
            created: 0,
            owned_by: "forkserve",
        }
    }

    /// The served model answers to its name, with or without an organisation prefix
    /// ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2").
    fn serves(&self, asked: &str) -> bool {
        let short = |n: &str| n.rsplit('/').next().unwrap_or(n).to_ascii_lowercase();
        short(asked) == short(&self.settings.model_name)
    }
}

/// Texts through the tokenizer (with the prompt), token ids as given (cut to the model's
/// maximum); over-long input is a 422 naming it unless `truncate`.
fn tokenize_inputs(
    embedder: &dyn Embedder,
    inputs: &[TextInput],
    field: &str,
    options: &EncodeOptions,
) -> Result<Vec<Tokens>, ApiError> {
    let max = embedder.max_tokens();
    let tokens: Vec<Tokens> = inputs
        .iter()
        .enumerate()
        .map(|(i, input)| match input {
            TextInput::Text(s) => embedder
                .tokenize_at(s, options.prompt.as_deref(), options.side)
                .map_err(|e| ApiError::validation(format!("{field}[{i}]"), e.to_string())),
            TextInput::Ids(ids) => {
                let kept = match options.side {
                    Some(crate::embedder::Side::Left) => &ids[ids.len().saturating_sub(max)..],
                    _ => &ids[..ids.len().min(max)],
                };
                Ok(Tokens {
                    ids: kept.to_vec(),
                    untruncated_len: ids.len(),
                    prompt_len: 0,
                })
            }
        })
        .collect::<Result<_, _>>()?;
    if !options.truncate {
        if let Some((i, t)) = tokens.iter().enumerate().find(|(_, t)| t.was_truncated()) {
            return Err(ApiError::validation(
                format!("{field}[{i}]"),
                format!(
                    "{} tokens, more than the model's maximum of {max}; shorten it or send \"truncate\": true",
                    t.untruncated_len
                ),
            ));
        }
    }
    Ok(tokens)
}

/// Cluster unit vectors; runs on the compute thread.
/// Sentences from which a request gives its freed heap back to the kernel when done.
const LARGE_REQUEST: usize = 1000;

/// Where `/cluster` sends its progress lines.
pub(super) type Lines = tokio::sync::mpsc::UnboundedSender<Bytes>;

fn json_line<T: serde::Serialize>(value: &T) -> Bytes {
    let mut line = serde_json::to_vec(value).unwrap_or_default();
    line.push(b'\n');
    line.into()
}

impl Stepwise for Clusterer {
    type Output = Clustering;

    fn step(&mut self) -> bool {
        Clusterer::step(self)
    }

    fn finish(self) -> Clustering {
        Clusterer::finish(self)
    }
}

fn cluster_response(clustering: Clustering, request: ClusterRequest) -> ClusterResponse {
    let texts = |idx: &[usize]| -> Vec<String> {
        idx.iter().map(|&i| request.sentences[i].clone()).collect()
    };
    ClusterResponse {
        clusters: clustering.clusters.iter().map(|c| texts(c)).collect(),
        unclustered: texts(&clustering.unclustered),
        indices: clustering.clusters,
        unclustered_indices: clustering.unclustered,
        algorithm: request.algorithm.name(),
        threshold: request.threshold,
        min_cluster_size: request.min_cluster_size,
    }
}

/// `%2F` and friends as the characters they stand for (a model id such as
/// `sentence-transformers/all-MiniLM-L6-v2` arrives percent-encoded in the path).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// OpenAI's base64 encoding: the vector's little-endian f32 bytes.
fn base64_f32(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn embed_error(e: EmbedError) -> ApiError {
    match e {
        EmbedError::Tokenize(m) => ApiError::validation("sentences", m),
        EmbedError::Inference(m) => ApiError::Internal(m),
    }
}

fn compute_error(e: ComputeError) -> ApiError {
    match e {
        ComputeError::QueueFull => {
            ApiError::Overloaded("this worker's queue is full; retry shortly".into())
        }
        ComputeError::Failed => ApiError::Internal("internal error while computing".into()),
        ComputeError::Inference(m) => ApiError::Internal(format!("inference failed: {m}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_ids_are_percent_decoded() {
        assert_eq!(percent_decode("org%2Fname"), "org/name");
        assert_eq!(percent_decode("a%zz%2"), "a%zz%2");
    }

    #[test]
    fn base64_is_little_endian_f32() {
        assert_eq!(base64_f32(&[1.0]), "AACAPw==");
    }
}
