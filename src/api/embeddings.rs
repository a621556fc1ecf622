//! `POST /v1/embeddings` (and LM Studio's `/api/v0/embeddings`): OpenAI's request and
//! response shapes over an embedding model's batching engine.

use axum::extract::{Request, State};
use axum::Json;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::ApiError;
use super::{from_value, parse_json, read_body, AppState};
use crate::engine::llama::embed::article;
use crate::engine::{ModelKind, TokenId};
use crate::models::registry::LoadedModel;

/// Most inputs in one request (OpenAI's limit).
pub const MAX_INPUTS: usize = 2048;
/// Most tokens over all inputs of one request (OpenAI's limit).
pub const MAX_TOTAL_TOKENS: usize = 300_000;

/// `input`: one text, several, one token array or several.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum EmbeddingInput {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<i64>),
    TokenLists(Vec<Vec<i64>>),
}

/// `POST /v1/embeddings`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub struct EmbeddingRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub input: EmbeddingInput,
    /// `float` (default) or `base64` (little-endian float32 bytes).
    #[serde(default)]
    pub encoding_format: Option<String>,
    /// Keep the first N dimensions, scaled back to unit length (Matryoshka models).
    #[serde(default)]
    pub dimensions: Option<i64>,
    #[serde(default)]
    pub user: Option<String>,
    /// opta-lmx extension: cut inputs longer than the model's context instead of refusing
    /// them (the default follows `models.embeddings_truncate`).
    #[serde(default)]
    pub truncate: Option<bool>,
}

/// One vector, as a float list or base64.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Vector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EmbeddingObject {
    pub object: &'static str,
    pub index: usize,
    pub embedding: Vector,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EmbeddingUsage {
    pub prompt_tokens: usize,
    pub total_tokens: usize,
}

/// The answer, OpenAI's shape.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EmbeddingResponse {
    pub object: &'static str,
    pub data: Vec<EmbeddingObject>,
    pub model: String,
    pub usage: EmbeddingUsage,
}

/// A model must be of the kind a route serves; otherwise a 400 that names it and says what
/// it is.
pub fn require_kind(
    model: &LoadedModel,
    route: &str,
    ok: impl Fn(ModelKind) -> bool,
) -> Result<(), ApiError> {
    let kind = model.engine.kind();
    if ok(kind) {
        return Ok(());
    }
    Err(ApiError::invalid(
        "model",
        format!(
            "`{}` is {} model; it cannot serve {route}",
            model.id,
            article(kind)
        ),
    ))
}

/// The request's inputs as token lists, checked and (if asked) truncated.
fn tokenized(
    model: &LoadedModel,
    input: EmbeddingInput,
    truncate: bool,
) -> Result<Vec<Vec<TokenId>>, ApiError> {
    let context = model.engine.info().context_per_sequence as usize;
    let vocab = i64::from(model.engine.info().vocab_size);
    let (lists, texts) = match input {
        EmbeddingInput::Text(t) => (vec![], vec![t]),
        EmbeddingInput::Texts(ts) => (vec![], ts),
        EmbeddingInput::Tokens(t) => (vec![t], vec![]),
        EmbeddingInput::TokenLists(ls) => (ls, vec![]),
    };
    let count = lists.len() + texts.len();
    if count == 0 {
        return Err(ApiError::invalid(
            "input",
            "input is empty: give at least one text",
        ));
    }
    if count > MAX_INPUTS {
        return Err(ApiError::invalid(
            "input",
            format!("input has {count} items; at most {MAX_INPUTS} are allowed per request"),
        ));
    }
    let mut out = Vec::with_capacity(count);
    for (i, t) in texts.iter().enumerate() {
        if t.is_empty() {
            return Err(ApiError::invalid(
                "input",
                format!("input[{i}] is an empty string"),
            ));
        }
        let mut toks = model.engine.tokenize(t, true, false);
        if truncate {
            cut_keeping_last(&mut toks, context);
        }
        out.push((i, toks));
    }
    for (i, l) in lists.into_iter().enumerate() {
        if l.is_empty() {
            return Err(ApiError::invalid(
                "input",
                format!("input[{i}] is an empty token list"),
            ));
        }
        if let Some(bad) = l.iter().find(|&&t| t < 0 || t >= vocab) {
            return Err(ApiError::invalid(
                "input",
                format!("input[{i}] holds token {bad}, outside this model's vocabulary of {vocab}"),
            ));
        }
        let mut toks: Vec<TokenId> = l.into_iter().map(|t| t as TokenId).collect();
        if truncate {
            toks.truncate(context);
        }
        out.push((i, toks));
    }
    let mut total = 0;
    for (i, toks) in &out {
        if toks.len() > context {
            return Err(ApiError::InvalidRequest {
                message: format!(
                    "input[{i}] has {} tokens, more than this model's maximum context length of {context} tokens; shorten it or send \"truncate\": true",
                    toks.len()
                ),
                param: Some("input".into()),
                code: Some("context_length_exceeded"),
            });
        }
        total += toks.len();
    }
    if total > MAX_TOTAL_TOKENS {
        return Err(ApiError::invalid(
            "input",
            format!("the inputs hold {total} tokens; at most {MAX_TOTAL_TOKENS} are allowed per request"),
        ));
    }
    Ok(out.into_iter().map(|(_, t)| t).collect())
}

/// Cuts `tokens` to `context`, keeping the last one (the model's closing token, BERT's
/// `[SEP]`), as llama-server does for long inputs.
pub fn cut_keeping_last(tokens: &mut Vec<TokenId>, context: usize) {
    if tokens.len() > context {
        let last = *tokens.last().expect("non-empty");
        tokens.truncate(context.saturating_sub(1));
        tokens.push(last);
    }
}

/// The first `dims` dimensions of a unit vector, scaled back to unit length.
pub fn shortened(v: &[f32], dims: usize) -> Vec<f32> {
    let cut = &v[..dims.min(v.len())];
    let norm = cut
        .iter()
        .map(|x| f64::from(*x).powi(2))
        .sum::<f64>()
        .sqrt();
    if norm == 0.0 {
        return cut.to_vec();
    }
    cut.iter().map(|x| (f64::from(*x) / norm) as f32).collect()
}

/// Little-endian float32 bytes in standard base64, as OpenAI's `encoding_format: base64`.
pub fn to_base64(v: &[f32]) -> String {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Bodies up to this size are tokenized on the runtime: microseconds of work, where the
/// blocking pool's thread hop cost a measurable share of a one-short-input request.
const INLINE_BYTES: usize = 4096;

/// `POST /v1/embeddings`.
pub async fn create(
    State(state): State<AppState>,
    request: Request,
) -> Result<Json<EmbeddingResponse>, ApiError> {
    let bytes = read_body(request, &state).await?;
    let small = bytes.len() <= INLINE_BYTES;
    let req: EmbeddingRequest = {
        let body: Value = parse_json(&bytes)?;
        from_value(&body)?
    };
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                "encoding_format",
                format!("encoding_format `{other}` is not one of float, base64"),
            ))
        }
    };
    let model = state.resolve(req.model.as_deref()).await?;
    require_kind(&model, "/v1/embeddings", |k| {
        matches!(k, ModelKind::Embedding { .. })
    })?;
    let width = model.engine.info().embedding_length as usize;
    let dims = match req.dimensions {
        None => None,
        Some(d) if d >= 1 && (d as usize) <= width => Some(d as usize),
        Some(d) => {
            return Err(ApiError::invalid(
                "dimensions",
                format!(
                    "dimensions is {d}; `{}` gives vectors of 1 to {width} dimensions",
                    model.id
                ),
            ))
        }
    };
    let truncate = req
        .truncate
        .unwrap_or(state.config().models.embeddings_truncate);
    let shared = model.shared();
    let inputs = if small {
        tokenized(&shared, req.input, truncate)?
    } else {
        state
            .off_runtime(move |_| tokenized(&shared, req.input, truncate))
            .await??
    };
    let tokens: usize = inputs.iter().map(Vec::len).sum();
    let count = inputs.len();
    model.touch();
    let rx = model.engine.embed(inputs)?;
    let vectors = rx
        .await
        .map_err(|_| ApiError::from(crate::engine::EngineError::Unloaded))??;
    state
        .metrics
        .prometheus()
        .record_embeddings(&model.id, count as u64, tokens as u64);
    let data = vectors
        .into_iter()
        .enumerate()
        .map(|(index, v)| {
            let v = match dims {
                Some(d) => shortened(&v, d),
                None => v,
            };
            EmbeddingObject {
                object: "embedding",
                index,
                embedding: if base64 {
                    Vector::Base64(to_base64(&v))
                } else {
                    Vector::Float(v)
                },
            }
        })
        .collect();
    Ok(Json(EmbeddingResponse {
        object: "list",
        data,
        model: model.id.clone(),
        usage: EmbeddingUsage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortened_vectors_are_unit_length_again() {
        let v = shortened(&[0.6, 0.0, 0.8], 2);
        assert_eq!(v, vec![1.0, 0.0]);
        assert_eq!(shortened(&[0.6, 0.8], 5), vec![0.6, 0.8]);
    }

    #[test]
    fn a_cut_keeps_the_closing_token() {
        let mut t = vec![101, 1, 2, 3, 102];
        cut_keeping_last(&mut t, 3);
        assert_eq!(t, vec![101, 1, 102]);
        let mut short = vec![101, 102];
        cut_keeping_last(&mut short, 3);
        assert_eq!(short, vec![101, 102]);
    }

    #[test]
    fn base64_is_little_endian_float32() {
        // 1.0f32 = 0x3f800000 -> bytes 00 00 80 3f.
        assert_eq!(to_base64(&[1.0]), "AACAPw==");
    }
}
