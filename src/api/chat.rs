//! `POST /v1/chat/completions`: messages through the chat layer to the engine, answers back
//! whole or as chunks (content, reasoning, tool calls, logprobs) for one or more choices.

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::error::ApiError;
use super::generate::*;
use super::sse::{stream_response, Formatter, Piece};
use super::types::*;
use super::AppState;
use crate::chat::answer::AnswerStream;
use crate::chat::prompt::chat_prompt;
use crate::chat::tools::{required_call, Delta};
use crate::engine::{FinishReason, TokenLogprob};

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
