//! `/v1` handlers: chat and text completions (whole or streamed) and the model list.

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc::UnboundedReceiver;

use super::error::ApiError;
use super::sse::{stream_response, Formatter, Piece};
use super::types::*;
use super::{from_value, parse_json, read_body, ApiPath, AppState};
use crate::chat::answer::AnswerStream;
use crate::chat::prompt::{chat_prompt, PromptError, PromptLimits};
use crate::chat::tools::{required_call, Delta};
use crate::engine::{
    EngineError, Event, FinishReason, GenerationRequest, TokenId, TokenLogprob, Usage,
};
use crate::models::registry::{LoadedModel, ModelLease};

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn fingerprint() -> String {
    format!("opta-lmx-{}", env!("CARGO_PKG_VERSION"))
}

/// Checks the prompt against the context and picks the completion budget.
fn generation_request(
    model: &LoadedModel,
    prompt: Vec<TokenId>,
    v: &ValidatedSampling,
) -> Result<GenerationRequest, ApiError> {
    let context = model.engine.info().context_per_sequence;
    let prompt_len = prompt.len() as u32;
    if prompt.is_empty() {
        return Err(ApiError::invalid("prompt", "the prompt is empty"));
    }
    let too_long = |completion| EngineError::ContextLength {
        context,
        prompt: prompt_len,
        completion,
    };
    if prompt_len >= context {
        return Err(too_long(None).into());
    }
    let max_tokens = match v.max_tokens {
        Some(m) if u64::from(prompt_len) + u64::from(m) > u64::from(context) => {
            return Err(too_long(Some(m)).into())
        }
        Some(m) => m,
        None => context - prompt_len,
    };
    Ok(GenerationRequest {
        prompt,
        max_tokens,
        stop: v.stop.clone(),
        sampling: v.params.clone(),
        constraint: v.constraint.clone(),
        logprobs: v.logprobs,
    })
}

/// Everything a finished non-streaming generation produced.
struct Collected {
    text: String,
    /// Per-token log-probabilities, when asked for.
    logprobs: Vec<TokenLogprob>,
    finish_reason: FinishReason,
    usage: Usage,
}

async fn collect(
    state: &AppState,
    mut rx: UnboundedReceiver<Event>,
) -> Result<Collected, ApiError> {
    let mut text = String::new();
    let mut logprobs = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Text(t) => text.push_str(&t),
            Event::Logprob(lp) => logprobs.push(lp),
            Event::Done {
                finish_reason,
                usage,
                time_to_first_token,
                total_time,
            } => {
                state
                    .metrics
                    .record_completion(&usage, time_to_first_token, total_time);
                return Ok(Collected {
                    text,
                    logprobs,
                    finish_reason,
                    usage,
                });
            }
            Event::Error(e) => return Err(e.into()),
        }
    }
    Err(ApiError::Internal("generation ended unexpectedly".into()))
}

/// Limits for building one prompt for `model`.
fn prompt_limits(state: &AppState, model: &LoadedModel) -> PromptLimits {
    let r = &state.config.requests;
    let context = model.engine.info().context_per_sequence as usize;
    PromptLimits {
        max_messages: r.max_messages,
        max_chars: r.max_prompt_chars.unwrap_or(context * 32),
        special_in_content: r.special_tokens_in_content,
    }
}

/// Reads a completion request's body and parses it into the endpoint's own fields and the
/// validated sampling fields, then runs `check`: CPU work on request data, so off the runtime.
async fn parse_request<R: DeserializeOwned + Send + 'static>(
    state: &AppState,
    request: Request,
    check: fn(&R) -> Result<(), ApiError>,
) -> Result<(R, ValidatedSampling), ApiError> {
    let bytes = read_body(request, state).await?;
    state
        .off_runtime(move |_| {
            let body: serde_json::Value = parse_json(&bytes)?;
            let req: R = from_value(&body)?;
            let v = from_value::<SamplingFields>(&body)?.validate()?;
            check(&req)?;
            Ok((req, v))
        })
        .await?
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<AppState>,
    request: Request,
) -> Result<Response, ApiError> {
    let (req, v) = parse_request(&state, request, |r: &ChatCompletionRequest| {
        validate_messages(&r.messages)
    })
    .await?;
    let model = state.registry.resolve(req.model.as_deref()).await?;
    let limits = prompt_limits(&state, &model);
    let shared = model.shared();
    // `tool_choice: "none"`: the model is not offered the tools at all.
    let tools = req
        .tools
        .filter(|t| t.as_array().is_some_and(|a| !a.is_empty()))
        .filter(|_| req.tool_choice.as_ref().and_then(|c| c.as_str()) != Some("none"));
    let parse_calls = tools.is_some();
    let one_call = req.parallel_tool_calls == Some(false);
    // `required` or a named function: the answer is forced to be one such call.
    let forced_call = match (&tools, req.tool_choice.as_ref()) {
        (_, None) => None,
        (_, Some(c)) if matches!(c.as_str(), Some("auto" | "none")) => None,
        (tools, Some(c)) => {
            let name = match c.as_str() {
                Some("required") => None,
                Some(other) => {
                    return Err(ApiError::invalid(
                        "tool_choice",
                        format!(
                        "tool_choice `{other}` is not one of none, auto, required, or a function"
                    ),
                    ))
                }
                None => Some(
                    c.pointer("/function/name")
                        .and_then(|n| n.as_str())
                        .ok_or_else(|| {
                            ApiError::invalid(
                                "tool_choice",
                                "tool_choice object needs function.name",
                            )
                        })?,
                ),
            };
            let empty = serde_json::Value::Null;
            Some(
                required_call(tools.as_ref().unwrap_or(&empty), name)
                    .map_err(|e| ApiError::invalid("tool_choice", e))?,
            )
        }
    };
    let prompt = state
        .off_runtime(move |cancel| {
            chat_prompt(
                &shared.template,
                &shared.control,
                shared.engine.as_ref(),
                &req.messages,
                tools.as_ref(),
                &limits,
                cancel,
            )
        })
        .await??;
    let opens_thinking = prompt.opens_thinking;
    let mut gen = generation_request(&model, prompt.tokens, &v)?;
    if forced_call.is_some() {
        gen.constraint = forced_call;
    }
    model.touch();
    let rxs = submit_choices(&model, gen, v.n)?;
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    let created = now_secs();
    let model_id = model.id.clone();

    if !v.stream {
        let (outs, usage) = collect_choices(&state, rxs).await?;
        let choices = outs
            .into_iter()
            .enumerate()
            .map(|(i, out)| {
                let logprobs = v.logprobs.map(|_| ChoiceLogprobs::value(out.logprobs));
                let answer = whole_answer(&out.text, parse_calls, opens_thinking, one_call);
                let finish_reason = with_calls(out.finish_reason, answer.tool_calls.is_some());
                ChatChoice {
                    index: i as u32,
                    message: AssistantMessage {
                        role: "assistant",
                        content: answer.content,
                        reasoning_content: answer.reasoning,
                        refusal: None,
                        tool_calls: answer.tool_calls,
                    },
                    logprobs,
                    finish_reason,
                }
            })
            .collect();
        return Ok(Json(ChatCompletion {
            id,
            object: "chat.completion",
            created,
            model: model_id,
            system_fingerprint: fingerprint(),
            choices,
            usage: usage.into(),
        })
        .into_response());
    }

    let include_usage = v.include_usage;
    let chunk = move |choices: Vec<ChatChunkChoice>, usage: Option<Option<UsageBody>>| {
        serde_json::to_string(&ChatChunk {
            id: id.clone(),
            object: "chat.completion.chunk",
            created,
            model: model_id.clone(),
            system_fingerprint: fingerprint(),
            choices,
            usage: usage.or(include_usage.then_some(None)),
        })
        .ok()
    };
    let choice = |index, delta, logprobs, finish_reason| ChatChunkChoice {
        index,
        delta,
        logprobs,
        finish_reason,
    };
    // One parser per answer (choice): tool calls are found as the text streams. Token
    // log-probabilities arrive before their text and ride on the next chunk that goes out.
    let mut answers: Vec<AnswerStream> = (0..v.n)
        .map(|_| AnswerStream::new(parse_calls, opens_thinking).one_call(one_call))
        .collect();
    let mut pendings: Vec<Vec<TokenLogprob>> = (0..v.n).map(|_| Vec::new()).collect();
    let wants_logprobs = v.logprobs.is_some();
    let format: Formatter = Box::new(move |index, piece| {
        let answer = &mut answers[index as usize];
        let pending = &mut pendings[index as usize];
        if let Piece::Logprob(lp) = piece {
            pending.push(lp);
            return Vec::new();
        }
        let mut take_logprobs = || {
            (wants_logprobs && !pending.is_empty())
                .then(|| ChoiceLogprobs::value(std::mem::take(pending)))
        };
        let mut deltas = |ds: Vec<ChatDelta>| -> Vec<String> {
            ds.into_iter()
                .filter_map(|d| chunk(vec![choice(index, d, take_logprobs(), None)], None))
                .collect()
        };
        match piece {
            Piece::Start => deltas(vec![ChatDelta {
                role: Some("assistant"),
                content: Some(String::new()),
                ..ChatDelta::default()
            }]),
            Piece::Logprob(_) => Vec::new(),
            Piece::Text(t) => deltas(wire_deltas(answer.push(&t))),
            Piece::Finish(r) => {
                let mut out = deltas(wire_deltas(answer.finish()));
                let calls = answer.calls() > 0;
                out.extend(chunk(
                    vec![choice(
                        index,
                        ChatDelta::default(),
                        take_logprobs(),
                        Some(with_calls(r, calls)),
                    )],
                    None,
                ));
                out
            }
            Piece::Usage(u) => chunk(vec![], Some(Some(u.into()))).into_iter().collect(),
        }
    });
    Ok(stream_response(rxs, include_usage, format, &state).into_response())
}

/// Submits the `n` choices of one request: the same prompt (the scheduler shares its KV
/// between them), each its own sequence, seeds `seed + i` so seeded choices differ and
/// repeat. If one cannot be queued the others are dropped (and so cancelled) with it.
fn submit_choices(
    model: &ModelLease,
    gen: GenerationRequest,
    n: u32,
) -> Result<Vec<UnboundedReceiver<Event>>, ApiError> {
    let parallel = model.engine.info().parallel;
    if n > parallel {
        return Err(ApiError::invalid(
            "n",
            format!("n is {n}, more than the {parallel} sequences this model is loaded with"),
        ));
    }
    (0..n)
        .map(|i| {
            let mut g = gen.clone();
            g.sampling.seed = g.sampling.seed.map(|s| s.wrapping_add(i));
            model.engine.submit(g).map_err(ApiError::from)
        })
        .collect()
}

/// Collects every choice whole; usage counts the prompt once and every choice's tokens.
async fn collect_choices(
    state: &AppState,
    rxs: Vec<UnboundedReceiver<Event>>,
) -> Result<(Vec<Collected>, Usage), ApiError> {
    let outs = futures_util::future::join_all(rxs.into_iter().map(|rx| collect(state, rx)))
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    let mut usage = outs.first().map(|o| o.usage).unwrap_or_default();
    usage.completion_tokens = outs.iter().map(|o| o.usage.completion_tokens).sum();
    Ok((outs, usage))
}

/// A whole answer, split: content (`null` when there are only calls), reasoning, calls.
struct WholeAnswer {
    content: Option<String>,
    reasoning: Option<String>,
    tool_calls: Option<Vec<ToolCallOut>>,
}

/// Runs a whole answer through the same [`AnswerStream`] a streamed one goes through.
fn whole_answer(
    text: &str,
    parse_calls: bool,
    opens_thinking: bool,
    one_call: bool,
) -> WholeAnswer {
    let mut answer = AnswerStream::new(parse_calls, opens_thinking).one_call(one_call);
    let mut all = answer.push(text);
    all.extend(answer.finish());
    let mut content = String::new();
    let mut reasoning = String::new();
    let mut calls: Vec<ToolCallOut> = Vec::new();
    for d in all {
        match d {
            Delta::Content(c) => content.push_str(&c),
            Delta::Reasoning(r) => reasoning.push_str(&r),
            Delta::CallStart { id, name, .. } => calls.push(ToolCallOut {
                id,
                kind: "function",
                function: FunctionCall {
                    name,
                    arguments: String::new(),
                },
            }),
            Delta::CallArgs { index, fragment } => {
                calls[index].function.arguments.push_str(&fragment)
            }
        }
    }
    let has_calls = !calls.is_empty();
    WholeAnswer {
        content: (!has_calls || !content.is_empty()).then_some(content),
        reasoning: (!reasoning.is_empty()).then_some(reasoning),
        tool_calls: has_calls.then_some(calls),
    }
}

/// The parser's deltas in OpenAI's streamed shape.
fn wire_deltas(deltas: Vec<Delta>) -> Vec<ChatDelta> {
    let call = |index, id: Option<String>, name: Option<String>, arguments| ChatDelta {
        tool_calls: Some(vec![ToolCallDelta {
            index,
            kind: id.as_ref().map(|_| "function"),
            id,
            function: FunctionDelta { name, arguments },
        }]),
        ..ChatDelta::default()
    };
    deltas
        .into_iter()
        .map(|d| match d {
            Delta::Content(c) => ChatDelta {
                content: Some(c),
                ..ChatDelta::default()
            },
            Delta::Reasoning(r) => ChatDelta {
                reasoning_content: Some(r.clone()),
                reasoning: Some(r),
                ..ChatDelta::default()
            },
            Delta::CallStart { index, id, name } => {
                call(index, Some(id), Some(name), String::new())
            }
            Delta::CallArgs { index, fragment } => call(index, None, None, fragment),
        })
        .collect()
}

/// An answer that stopped after tool calls finished because of them.
fn with_calls(reason: FinishReason, calls: bool) -> FinishReason {
    match reason {
        FinishReason::Stop if calls => FinishReason::ToolCalls,
        other => other,
    }
}

/// `POST /v1/completions`. The prompt is the client's own raw prompt (it does its own
/// templating), so control-token text in it is parsed, as llama-server does.
pub async fn completions(
    State(state): State<AppState>,
    request: Request,
) -> Result<Response, ApiError> {
    let (req, v) = parse_request(&state, request, |_: &CompletionRequest| Ok(())).await?;
    if req.echo {
        return Err(ApiError::invalid("echo", "echo is not supported"));
    }
    if v.logprobs.is_some() {
        return Err(ApiError::invalid(
            "logprobs",
            "logprobs are supported on /v1/chat/completions, not yet on /v1/completions",
        ));
    }
    if req.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::invalid("suffix", "suffix is not supported"));
    }
    let model = state.registry.resolve(req.model.as_deref()).await?;
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
    let rxs = submit_choices(model, gen, v.n)?;
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
    let choice = |index, text, finish_reason| TextChoice {
        text,
        index,
        logprobs: None,
        finish_reason,
    };

    if !v.stream {
        let (outs, usage) = collect_choices(state, rxs).await?;
        let choices = outs
            .into_iter()
            .enumerate()
            .map(|(i, o)| choice(i as u32, o.text, Some(o.finish_reason)))
            .collect();
        return Ok(Json(body(choices, Some(Some(usage.into())))).into_response());
    }
    let include_usage = v.include_usage;
    let usage_field = move || include_usage.then_some(None);
    let format: Formatter = Box::new(move |index, piece| {
        let chunk = match piece {
            Piece::Start | Piece::Logprob(_) => return Vec::new(),
            Piece::Text(t) => body(vec![choice(index, t, None)], usage_field()),
            Piece::Finish(r) => body(vec![choice(index, String::new(), Some(r))], usage_field()),
            Piece::Usage(u) => body(Vec::new(), Some(Some(u.into()))),
        };
        serde_json::to_string(&chunk).ok().into_iter().collect()
    });
    Ok(stream_response(rxs, include_usage, format, state).into_response())
}

fn model_object(state: &AppState, disk: &crate::models::store::DiskModel) -> ModelObject {
    let loaded = state.registry.get(&disk.id);
    ModelObject {
        id: disk.id.clone(),
        object: "model",
        created: loaded
            .as_ref()
            .map(|m| m.loaded_at)
            .unwrap_or(std::time::UNIX_EPOCH)
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        owned_by: "opta-lmx",
        loaded: loaded.is_some(),
        size_bytes: disk.size_bytes,
        quantization: disk.quantization.clone(),
        context_length: loaded.map(|m| m.engine.info().context_per_sequence),
    }
}

/// Every model the server can serve: loaded ones and the rest of the disk inventory.
async fn all_models(state: &AppState) -> Result<Vec<crate::models::store::DiskModel>, ApiError> {
    // A scan walks folders: blocking I/O, so not on the async runtime.
    let store = state.registry.store().clone();
    let mut disk = tokio::task::spawn_blocking(move || store.scan())
        .await
        .map_err(|e| ApiError::Internal(format!("models directory: {e}")))?
        .map_err(|e| ApiError::Internal(format!("models directory: {e}")))?;
    // A loaded model whose file was removed since is still servable.
    for m in state.registry.loaded() {
        if !disk.iter().any(|d| d.id == m.id) {
            disk.push(m.disk.clone());
        }
    }
    Ok(disk)
}

/// `GET /v1/models`.
pub async fn list_models(State(state): State<AppState>) -> Result<Json<ModelList>, ApiError> {
    let data = all_models(&state)
        .await?
        .iter()
        .map(|d| model_object(&state, d))
        .collect();
    Ok(Json(ModelList {
        object: "list",
        data,
    }))
}

/// `GET /v1/models/{id}` (ids may contain slashes).
pub async fn get_model(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ModelObject>, ApiError> {
    let target = state.config.resolve_alias(&id).to_string();
    let models = all_models(&state).await?;
    let found = models.iter().find(|d| {
        d.id.eq_ignore_ascii_case(&target)
            || d.alternate_ids
                .iter()
                .any(|a| a.eq_ignore_ascii_case(&target))
    });
    match found {
        Some(d) => Ok(Json(model_object(&state, d))),
        None => Err(ApiError::ModelNotFound(format!(
            "model `{id}` does not exist"
        ))),
    }
}
