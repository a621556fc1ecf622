//! `POST /v1/completions`: a raw prompt (text or token ids), whole or streamed.

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::error::ApiError;
use super::generate::*;
use super::sse::{data, stream_response, Formatter, Piece, OPENAI};
use super::types::*;
use super::AppState;
use crate::chat::prompt::PromptError;
use crate::engine::{TokenId, TokenLogprob};
use crate::models::registry::ModelLease;

/// `POST /v1/completions`. The prompt is the client's own raw prompt (it does its own
/// templating), so control-token text in it is parsed, as llama-server does.
pub async fn completions(
    State(state): State<AppState>,
    request: Request,
) -> Result<Response, ApiError> {
    let (req, v) = parse_request(
        &state,
        request,
        crate::presets::COMPLETIONS,
        Ok::<CompletionRequest, ApiError>,
    )
    .await?;
    if req.echo {
        return Err(ApiError::invalid("echo", "echo is not supported"));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix", "suffix is not supported"));
    }
    let model = state.resolve(req.model.as_deref()).await?;
    let text = match req.prompt {
        PromptSpec::Text(t) => t,
        PromptSpec::Texts(mut ts) if ts.len() == 1 => ts.pop().unwrap_or_default(),
        PromptSpec::Texts(_) => {
            return Err(ApiError::invalid(
                "prompt",
                "exactly one prompt per request is supported",
            ))
        }
        PromptSpec::Tokens(t) => {
            return finish_completion(&state, &model, t, &v).await;
        }
    };
    let limit = prompt_limits(&state, &model).max_chars;
    if text.len() > limit {
        return Err(PromptError::TooLong {
            chars: text.len(),
            limit,
        }
        .into());
    }
    let shared = model.shared();
    let prompt = state
        .off_runtime(move |_| shared.engine.tokenize(&text, true, true))
        .await?;
    finish_completion(&state, &model, prompt, &v).await
}
/// Submits a text completion and answers it, whole or streamed.
async fn finish_completion(
    state: &AppState,
    model: &ModelLease,
    prompt: Vec<TokenId>,
    v: &ValidatedSampling,
) -> Result<Response, ApiError> {
    let gen = generation_request(model, prompt, v)?;
    model.touch();
    let rxs = submit_choices(state, model, gen, v.n).await?;
    let id = format!("cmpl-{}", uuid::Uuid::new_v4().simple());
    let created = now_secs();
    let model_id = model.id.clone();
    let body = move |choices: Vec<TextChoice>, usage: Option<Option<UsageBody>>| TextCompletion {
        id: id.clone(),
        object: "text_completion",
        created,
        model: model_id.clone(),
        system_fingerprint: fingerprint(),
        choices,
        usage,
    };
    let choice = |index, text, logprobs, finish_reason| TextChoice {
        text,
        index,
        logprobs,
        finish_reason,
    };
    let wants_logprobs = v.logprobs.is_some();

    if !v.stream {
        let (outs, usage) = collect_choices(rxs).await?;
        let choices = outs
            .into_iter()
            .enumerate()
            .map(|(i, o)| {
                let logprobs = wants_logprobs.then(|| TextLogprobs::value(o.logprobs, 0));
                choice(i as u32, o.text, logprobs, Some(o.finish_reason))
            })
            .collect();
        return Ok(Json(body(choices, Some(Some(usage.into())))).into_response());
    }
    let include_usage = v.include_usage;
    let usage_field = move || include_usage.then_some(None);
    // Token log-probabilities arrive before their text and ride on the choice's next chunk;
    // offsets count from the start of the choice's text.
    let mut pending: Vec<Vec<TokenLogprob>> = (0..v.n).map(|_| Vec::new()).collect();
    let mut offsets = vec![0usize; v.n as usize];
    let format: Formatter = Box::new(move |index, piece| {
        let i = index as usize;
        let mut logprobs = || {
            let tokens = std::mem::take(&mut pending[i]);
            let value = (wants_logprobs && !tokens.is_empty())
                .then(|| TextLogprobs::value(tokens.clone(), offsets[i]));
            offsets[i] += tokens.iter().map(|t| t.token.text.len()).sum::<usize>();
            value
        };
        let chunk = match piece {
            Piece::Start => return Vec::new(),
            Piece::Logprob(lp) => {
                pending[i].push(lp);
                return Vec::new();
            }
            Piece::Text(t) => body(vec![choice(index, t, logprobs(), None)], usage_field()),
            Piece::Finish(r) => body(
                vec![choice(index, String::new(), logprobs(), Some(r))],
                usage_field(),
            ),
            Piece::Usage(u) => body(Vec::new(), Some(Some(u.into()))),
        };
        serde_json::to_string(&chunk)
            .ok()
            .map(data)
            .into_iter()
            .collect()
    });
    Ok(stream_response(rxs, include_usage, format, OPENAI, state).into_response())
}
