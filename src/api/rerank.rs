//! `POST /v1/rerank` (also `/rerank`): llama-server's, Jina's and Cohere's request shape.
//!
//! A cross-encoder reranker (rank pooling) scores each (query, document) pair in one forward
//! pass through the embedding engine. A chat model scores the way Qwen3-Reranker does: asked
//! whether the document meets the query, the relevance is p(yes) / (p(yes) + p(no)) at the
//! first answer token, so any instruction model can rank where no reranker is loaded.

use axum::extract::{Request, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::embeddings::{cut_keeping_last, require_kind};
use super::error::ApiError;
use super::{from_value, parse_json, read_body, AppState};
use crate::engine::options::Speculation;
use crate::engine::{EngineError, Event, GenerationRequest, ModelKind, SamplingParams, TokenId};
use crate::models::registry::{LoadedModel, ModelLease};

/// Most documents in one request.
pub const MAX_DOCUMENTS: usize = 1024;

/// The instruction a chat model judges by when the request gives none (Qwen3-Reranker's).
const DEFAULT_INSTRUCTION: &str =
    "Given a web search query, retrieve relevant passages that answer the query";

/// A document: plain text, or an object with `text` (Cohere's and Jina's form).
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Document {
    Text(String),
    Object { text: String },
}

impl Document {
    fn text(&self) -> &str {
        match self {
            Self::Text(t) | Self::Object { text: t } => t,
        }
    }
}

/// `POST /v1/rerank`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub struct RerankRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub query: String,
    pub documents: Vec<Document>,
    /// Only the best N results (all by default).
    #[serde(default)]
    pub top_n: Option<i64>,
    /// Echo each result's document text.
    #[serde(default)]
    pub return_documents: bool,
    /// What relevance means, for a chat model's judgement (ignored by cross-encoders).
    #[serde(default)]
    pub instruction: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RerankResult {
    pub index: usize,
    pub relevance_score: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub document: Option<Value>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RerankUsage {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
}

/// The answer: results sorted by relevance, best first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RerankResponse {
    pub id: String,
    pub object: &'static str,
    pub model: String,
    pub results: Vec<RerankResult>,
    pub usage: RerankUsage,
}

/// A cross-encoder's input for one pair: the query with the model's framing (`[CLS] q
/// [SEP]`), then the document, closed by the same token that closed the query (`[SEP]`).
pub fn pair_tokens(query: &[TokenId], document: &[TokenId], closed: bool) -> Vec<TokenId> {
    let mut out = query.to_vec();
    out.extend_from_slice(document);
    if closed {
        if let Some(&last) = query.last() {
            out.push(last);
        }
    }
    out
}

/// The logistic function: a cross-encoder's logit as a relevance in (0, 1).
fn sigmoid(x: f32) -> f64 {
    1.0 / (1.0 + (-f64::from(x)).exp())
}

/// p(yes) / (p(yes) + p(no)), each summed over the answer's spellings; 0 when the model
/// considered neither.
pub fn yes_share(yes: f64, no: f64) -> f64 {
    if yes + no <= 0.0 {
        return 0.0;
    }
    yes / (yes + no)
}

/// `POST /v1/rerank`.
pub async fn rerank(
    State(state): State<AppState>,
    request: Request,
) -> Result<Json<RerankResponse>, ApiError> {
    let bytes = read_body(request, &state).await?;
    let req: RerankRequest = from_value(&parse_json::<Value>(&bytes)?)?;
    if req.query.is_empty() {
        return Err(ApiError::invalid("query", "query is empty"));
    }
    if req.documents.is_empty() || req.documents.len() > MAX_DOCUMENTS {
        return Err(ApiError::invalid(
            "documents",
            format!(
                "documents has {} items; give 1 to {MAX_DOCUMENTS}",
                req.documents.len()
            ),
        ));
    }
    let top_n = match req.top_n {
        None => req.documents.len(),
        Some(n) if n >= 1 => (n as usize).min(req.documents.len()),
        Some(n) => {
            return Err(ApiError::invalid(
                "top_n",
                format!("top_n is {n}; it must be at least 1"),
            ))
        }
    };
    let model = state.resolve(req.model.as_deref()).await?;
    require_kind(&model, "/v1/rerank", |k| {
        matches!(k, ModelKind::Reranker | ModelKind::Chat)
    })?;
    model.touch();
    let (scores, tokens) = if model.engine.kind() == ModelKind::Reranker {
        cross_encoder(&state, &model, &req).await?
    } else {
        judged(&state, &model, &req).await?
    };
    state.metrics.prometheus().record_embeddings(
        &model.id,
        req.documents.len() as u64,
        tokens as u64,
    );
    let mut results: Vec<RerankResult> = scores
        .into_iter()
        .enumerate()
        .map(|(index, relevance_score)| RerankResult {
            index,
            relevance_score,
            document: req
                .return_documents
                .then(|| json!({"text": req.documents[index].text()})),
        })
        .collect();
    results.sort_by(|a, b| b.relevance_score.total_cmp(&a.relevance_score));
    results.truncate(top_n);
    Ok(Json(RerankResponse {
        id: format!("rerank-{}", uuid::Uuid::new_v4().simple()),
        object: "list",
        model: model.id.clone(),
        results,
        usage: RerankUsage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    }))
}

/// Scores from a cross-encoder: every pair in the embedding engine's shared batches.
async fn cross_encoder(
    state: &AppState,
    model: &ModelLease,
    req: &RerankRequest,
) -> Result<(Vec<f64>, usize), ApiError> {
    let shared = model.shared();
    let (query, docs) = (req.query.clone(), req.documents.clone());
    let pairs = state
        .off_runtime(move |_| pairs_for(&shared, &query, &docs))
        .await??;
    let tokens = pairs.iter().map(Vec::len).sum();
    let scores = model
        .engine
        .embed(pairs)?
        .await
        .map_err(|_| ApiError::from(EngineError::Unloaded))??;
    Ok((
        scores
            .iter()
            .map(|s| s.first().copied().map_or(0.0, sigmoid))
            .collect(),
        tokens,
    ))
}

fn pairs_for(
    model: &LoadedModel,
    query: &str,
    docs: &[Document],
) -> Result<Vec<Vec<TokenId>>, ApiError> {
    let context = model.engine.info().context_per_sequence as usize;
    let q = model.engine.tokenize(query, true, false);
    let bare = model.engine.tokenize(query, false, false);
    // Whether the model's framing closed the query with a token (BERT's [SEP]).
    let closed = q.len() > bare.len() && q.last() != bare.last();
    if q.len() >= context {
        return Err(ApiError::invalid(
            "query",
            format!(
                "the query alone has {} tokens, more than the model's context of {context}",
                q.len()
            ),
        ));
    }
    docs.iter()
        .map(|d| {
            let mut pair = pair_tokens(&q, &model.engine.tokenize(d.text(), false, false), closed);
            // A long document is judged on its beginning.
            cut_keeping_last(&mut pair, context);
            Ok(pair)
        })
        .collect()
}

/// Scores from a chat model's yes/no judgement, every document its own sequence (the
/// scheduler batches them and shares the prompt's common prefix).
async fn judged(
    state: &AppState,
    model: &ModelLease,
    req: &RerankRequest,
) -> Result<(Vec<f64>, usize), ApiError> {
    let instruction = req
        .instruction
        .clone()
        .unwrap_or_else(|| DEFAULT_INSTRUCTION.to_string());
    let mut receivers = Vec::with_capacity(req.documents.len());
    let mut tokens = 0;
    for d in &req.documents {
        let chat = judgement(&instruction, &req.query, d.text())?;
        let (_, prompt) = super::chat::prepare_chat(state, model, chat, None).await?;
        let context = model.engine.info().context_per_sequence as usize;
        if prompt.len() >= context {
            return Err(ApiError::InvalidRequest {
                message: format!(
                    "a document's judgement prompt has {} tokens, more than this model's context of {context}",
                    prompt.len()
                ),
                param: Some("documents".into()),
                code: Some("context_length_exceeded"),
            });
        }
        tokens += prompt.len();
        let gen = GenerationRequest {
            prompt,
            max_tokens: 1,
            stop: Vec::new(),
            sampling: SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
            constraint: None,
            // The model's own distribution at the answer's first token: "yes", "Yes", " no"
            // and the rest are among its 20 most likely.
            logprobs: Some(20),
            speculation: Some(Speculation::Off),
            priority: None,
            client: None,
        };
        receivers.push(model.engine.submit(gen)?);
    }
    let mut scores = Vec::with_capacity(receivers.len());
    for mut rx in receivers {
        let (mut yes, mut no) = (0.0f64, 0.0f64);
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Logprob(lp) => {
                    for (t, p) in &lp.top {
                        match t.text.trim().to_lowercase().as_str() {
                            "yes" => yes += f64::from(*p).exp(),
                            "no" => no += f64::from(*p).exp(),
                            _ => {}
                        }
                    }
                }
                Event::Error(e) => return Err(e.into()),
                Event::Done { .. } => break,
                Event::Text(_) => {}
            }
        }
        let score = yes_share(yes, no);
        scores.push(score);
    }
    Ok((scores, tokens))
}

/// Qwen3-Reranker's judgement prompt, in the model's own chat template.
fn judgement(
    instruction: &str,
    query: &str,
    document: &str,
) -> Result<crate::chat::request::ChatRequest, ApiError> {
    let wire: super::types::ChatCompletionRequest = from_value(&json!({"messages": [
        {"role": "system", "content": "Judge whether the Document meets the requirements based on the Query and the Instruct provided. Note that the answer can only be \"yes\" or \"no\"."},
        {"role": "user", "content": format!("<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}")},
    ]}))?;
    wire.to_chat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pair_is_the_framed_query_then_the_document_closed_like_the_query() {
        // BERT: [CLS]=101 q [SEP]=102, then the document and [SEP] again.
        assert_eq!(
            pair_tokens(&[101, 7, 8, 102], &[9, 10], true),
            vec![101, 7, 8, 102, 9, 10, 102]
        );
        // A model that frames nothing: plain concatenation.
        assert_eq!(pair_tokens(&[7, 8], &[9], false), vec![7, 8, 9]);
    }

    #[test]
    fn yes_share_is_the_normalised_probability_of_yes() {
        assert!((yes_share(0.2, 0.2) - 0.5).abs() < 1e-12);
        assert!((yes_share(0.27, 0.03) - 0.9).abs() < 1e-9);
        assert_eq!(yes_share(0.0, 0.0), 0.0);
        assert!((sigmoid(0.0) - 0.5).abs() < 1e-12);
    }
}
