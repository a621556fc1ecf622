//! `GET /v1/chat/stream`: chat over a WebSocket in the first Opta-LMX's protocol, for the
//! coding CLI (which otherwise falls back to SSE and loses `chat.cancel`). Several requests may
//! run on one socket; each is the chat completions path (presets, templates, tool calls,
//! priorities) with its answer sent as messages:
//!
//! - client: `{"type": "chat.request", ...chat completion fields}`,
//!   `{"type": "chat.cancel", "request_id"}`
//! - server: `chat.token {request_id, content}`, `chat.reasoning {request_id, content}`,
//!   `chat.tool_call {request_id, tool_call: {index, id, name, arguments}}`,
//!   `chat.done {request_id, finish_reason, usage}` (`cancelled` after a cancel),
//!   `chat.error {request_id, error, code}`
//!
//! A request's id (`chatcmpl-…`) comes with its first message; a cancel frees its sequence at
//! once, as a dropped HTTP stream does. Closing the socket cancels everything on it.

use std::collections::HashMap;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::chat::prepare_chat;
use super::error::ApiError;
use super::generate::*;
use super::types::ChatCompletionRequest;
use super::AppState;
use crate::chat::answer::finish_reason;
use crate::chat::tools::Delta;
use crate::engine::Event;

/// Messages the server sends, queued for the one writer of the socket.
type Outbox = mpsc::UnboundedSender<Value>;

/// `GET /v1/chat/stream` (upgraded to a WebSocket). A request that is no WebSocket
/// handshake gets a 400 in the OpenAI error shape, as every other mistake does.
pub async fn chat_stream(
    State(state): State<AppState>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let ws = ws.map_err(|e| {
        ApiError::InvalidRequest {
            message: format!(
                "/v1/chat/stream is a WebSocket: connect with a WebSocket client (ws:// or wss://), or use POST /v1/chat/completions with stream: true ({e})"
            ),
            param: None,
            code: Some("websocket_required"),
        }
    })?;
    Ok(ws.on_upgrade(move |socket| serve(state, socket)))
}

async fn serve(state: AppState, socket: WebSocket) {
    let (mut sink, mut incoming) = socket.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Value>();
    let writer = tokio::spawn(async move {
        while let Some(v) = rx.recv().await {
            if sink
                .send(Message::Text(v.to_string().into()))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let mut running: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    while let Some(Ok(msg)) = incoming.next().await {
        let text = match msg {
            Message::Text(t) => t.to_string(),
            Message::Close(_) => break,
            _ => continue,
        };
        running.retain(|_, task| !task.is_finished());
        let data: Value = match serde_json::from_str(&text) {
            Ok(v) => v,
            Err(e) => {
                let _ = tx.send(error(None, &format!("not JSON: {e}"), "invalid_json"));
                continue;
            }
        };
        match data["type"].as_str() {
            Some("chat.request") => {
                let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
                let task = tokio::spawn(run(state.clone(), id.clone(), data, tx.clone()));
                running.insert(id, task);
            }
            Some("chat.cancel") => {
                let id = data["request_id"].as_str().unwrap_or_default();
                if let Some(task) = running.remove(id) {
                    // Dropping the request's events cancels its sequence.
                    task.abort();
                    let _ = tx.send(json!({"type": "chat.done", "request_id": id,
                        "finish_reason": "cancelled",
                        "usage": {"prompt_tokens": 0, "completion_tokens": 0}}));
                }
            }
            other => {
                let _ = tx.send(error(
                    None,
                    &format!("unknown message type {other:?} (chat.request, chat.cancel)"),
                    "unknown_message_type",
                ));
            }
        }
    }
    for task in running.values() {
        task.abort();
    }
    drop(tx);
    let _ = writer.await;
}

fn error(id: Option<&str>, message: &str, code: &str) -> Value {
    json!({"type": "chat.error", "request_id": id, "error": message, "code": code})
}

/// One `chat.request`, start to end.
async fn run(state: AppState, id: String, mut body: Value, out: Outbox) {
    if let Err(e) = generate(&state, &id, &mut body, &out).await {
        let (message, code) = match &e {
            ApiError::InvalidRequest { message, code, .. } => {
                (message.clone(), code.unwrap_or("invalid_request_error"))
            }
            other => (other.to_string(), "server_error"),
        };
        let _ = out.send(error(Some(&id), &message, code));
    }
}

async fn generate(
    state: &AppState,
    id: &str,
    body: &mut Value,
    out: &Outbox,
) -> Result<(), ApiError> {
    if let Some(obj) = body.as_object_mut() {
        obj.remove("type");
        obj.remove("stream");
    }
    let config = state.config();
    let ((model_name, chat), v) = parse_value(
        &config,
        body.take(),
        crate::presets::CHAT,
        |r: ChatCompletionRequest| Ok((r.model.clone(), r.to_chat()?)),
    )?;
    let model = state.resolve(model_name.as_deref()).await?;
    let (plan, prompt) = prepare_chat(state, &model, chat, v.constraint.clone()).await?;
    let mut gen = generation_request(&model, prompt, &v)?;
    gen.constraint = plan.constraint;
    model.touch();
    let mut events = submit_choices(state, &model, gen, 1)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::Internal("no choice was submitted".into()))?
        .reading_calls(&plan.answer);
    let mut answer = plan.answer.stream();
    let send = |deltas: Vec<Delta>| {
        for d in deltas {
            let msg = match d {
                Delta::Content(c) => json!({"type": "chat.token", "request_id": id, "content": c}),
                Delta::Reasoning(r) => {
                    json!({"type": "chat.reasoning", "request_id": id, "content": r})
                }
                Delta::CallStart {
                    index,
                    id: call,
                    name,
                } => json!({"type": "chat.tool_call",
                    "request_id": id,
                    "tool_call": {"index": index, "id": call, "name": name, "arguments": ""}}),
                Delta::CallArgs { index, fragment } => json!({"type": "chat.tool_call",
                    "request_id": id,
                    "tool_call": {"index": index, "id": null, "name": null, "arguments": fragment}}),
            };
            let _ = out.send(msg);
        }
    };
    while let Some(ev) = events.next().await {
        match ev {
            Event::Text(t) => send(answer.push(&t)),
            Event::Logprob(_) => {}
            Event::Done {
                finish_reason: reason,
                usage,
                ..
            } => {
                send(answer.finish());
                let reason = finish_reason(reason, answer.calls() > 0);
                let _ = out.send(json!({"type": "chat.done", "request_id": id,
                    "finish_reason": reason.as_str(),
                    "usage": {"prompt_tokens": usage.prompt_tokens,
                              "completion_tokens": usage.completion_tokens,
                              "total_tokens": usage.prompt_tokens + usage.completion_tokens,
                              "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}}));
                return Ok(());
            }
            Event::Error(e) => return Err(e.into()),
        }
    }
    Err(ApiError::Internal("generation ended unexpectedly".into()))
}
