//! `POST /v1/messages` and `/v1/messages/count_tokens`: Anthropic's Messages dialect, so
//! Claude-style agents and the official `anthropic` SDKs can use local models. Content blocks
//! become the chat layer's [`ChatRequest`]; the answer goes out as `thinking`, `text` and
//! `tool_use` blocks, whole or as Anthropic's stream events. Errors are Anthropic-shaped.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::chat::prepare_chat;
use super::error::ApiError;
use super::generate::*;
use super::sse::{named, stream_response, Framing, Named, Piece};
use super::types::{text_of, type_of, SamplingFields, StopSpec};
use super::{from_value, parse_json, read_body, AppState};
use crate::chat::answer::{finish_reason, AnswerStream, WholeAnswer};
use crate::chat::request::{ChatRequest, Message, Role, Tool, ToolCall, ToolChoice};
use crate::chat::tools::Delta;
use crate::engine::{FinishReason, Usage};

/// The request fields this dialect reads (`metadata`, `thinking`, `service_tier` and the like
/// are accepted and ignored).
#[derive(Debug, Deserialize)]
struct MessagesRequest {
    model: Option<String>,
    max_tokens: Option<i64>,
    system: Option<Value>,
    messages: Vec<Value>,
    tools: Option<Vec<Value>>,
    tool_choice: Option<Value>,
    stop_sequences: Option<Vec<String>>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    #[serde(default)]
    stream: bool,
}

/// Text of a string or of `text` blocks (tool results, system prompts).
fn blocks_text(v: Option<&Value>, at: &str) -> Result<String, ApiError> {
    text_of(v, &["text"], at, |at, other| unsupported_block(&at, other))
}

fn unsupported_block(at: &str, kind: &str) -> ApiError {
    ApiError::invalid(
        at,
        format!("content block type `{kind}` is not supported here (text, tool_use, tool_result, thinking); no model served here can see images or read documents"),
    )
}

/// Anthropic turns as chat turns: a user turn's `tool_result` blocks become tool messages
/// (before its text), an assistant turn's `tool_use` blocks become its calls.
fn turns(req: &MessagesRequest) -> Result<Vec<Message>, ApiError> {
    let mut out = Vec::new();
    let system = blocks_text(req.system.as_ref(), "system")?;
    if !system.is_empty() {
        out.push(Message::text(Role::System, system));
    }
    if req.messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    for (i, m) in req.messages.iter().enumerate() {
        let at = format!("messages.{i}");
        let role = match m.get("role").and_then(Value::as_str) {
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            other => {
                return Err(ApiError::invalid(
                    format!("{at}.role"),
                    format!("role {other:?} is not one of user, assistant"),
                ))
            }
        };
        let blocks = match m.get("content") {
            Some(Value::String(s)) => {
                out.push(Message::text(role, s.clone()));
                continue;
            }
            Some(Value::Array(b)) => b,
            _ => {
                return Err(ApiError::invalid(
                    format!("{at}.content"),
                    "content must be a string or a list of content blocks",
                ))
            }
        };
        let mut text = Vec::new();
        let mut message = Message::text(role, "");
        for (j, b) in blocks.iter().enumerate() {
            let bat = format!("{at}.content.{j}");
            match (type_of(b), role) {
                ("text", _) => text.push(
                    b.get("text")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                ),
                // Earlier thinking is not shown to the model again.
                ("thinking" | "redacted_thinking", _) => {}
                ("tool_use", Role::Assistant) => message.tool_calls.push(ToolCall {
                    id: b
                        .get("id")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .into(),
                    name: b
                        .get("name")
                        .and_then(Value::as_str)
                        .ok_or_else(|| ApiError::invalid(&bat, format!("{bat}.name is required")))?
                        .into(),
                    arguments: b.get("input").cloned().unwrap_or(json!({})).to_string(),
                }),
                ("tool_result", Role::User) => {
                    let mut content = blocks_text(b.get("content"), &format!("{bat}.content"))?;
                    if b.get("is_error").and_then(Value::as_bool) == Some(true) {
                        content = format!("Error: {content}");
                    }
                    let mut result = Message::text(Role::Tool, content);
                    result.tool_call_id = b
                        .get("tool_use_id")
                        .and_then(Value::as_str)
                        .map(String::from);
                    out.push(result);
                }
                (other, _) => return Err(unsupported_block(&bat, other)),
            }
        }
        message.content = text.join("\n");
        if !message.content.is_empty() || !message.tool_calls.is_empty() {
            out.push(message);
        }
    }
    Ok(out)
}

fn tools(req: &MessagesRequest) -> Result<Vec<Tool>, ApiError> {
    req.tools
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, t)| {
            let at = format!("tools.{i}");
            if !matches!(type_of(t), "" | "custom") {
                return Err(ApiError::invalid(
                    &at,
                    format!("tool type `{}` is a server tool of Anthropic's; only custom tools (name, input_schema) run here", type_of(t)),
                ));
            }
            let name = t.get("name").and_then(Value::as_str).filter(|n| !n.is_empty());
            Ok(Tool {
                name: name.ok_or_else(|| ApiError::invalid(&at, format!("{at}.name is required")))?.into(),
                description: t.get("description").and_then(Value::as_str).map(String::from),
                parameters: t
                    .get("input_schema")
                    .filter(|s| s.is_object())
                    .cloned()
                    .unwrap_or_else(|| json!({"type": "object"})),
            })
        })
        .collect()
}

/// `tool_choice`: `auto`, `any` (some tool), `tool` (that one), `none`.
fn tool_choice(req: &MessagesRequest) -> Result<(ToolChoice, bool), ApiError> {
    let Some(c) = &req.tool_choice else {
        return Ok((ToolChoice::Auto, true));
    };
    let parallel = c.get("disable_parallel_tool_use").and_then(Value::as_bool) != Some(true);
    let choice = match type_of(c) {
        "auto" => ToolChoice::Auto,
        "any" => ToolChoice::Required,
        "none" => ToolChoice::None,
        "tool" => ToolChoice::Function(
            c.get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    ApiError::invalid("tool_choice", "tool_choice of type tool needs a name")
                })?
                .into(),
        ),
        other => {
            return Err(ApiError::invalid(
                "tool_choice",
                format!("tool_choice type `{other}` is not one of auto, any, tool, none"),
            ))
        }
    };
    Ok((choice, parallel))
}

fn chat_request(req: &MessagesRequest) -> Result<ChatRequest, ApiError> {
    let (tool_choice, parallel_tool_calls) = tool_choice(req)?;
    Ok(ChatRequest {
        messages: turns(req)?,
        tools: tools(req)?,
        tool_choice,
        parallel_tool_calls,
    })
}

async fn parse(
    state: &AppState,
    request: Request,
) -> Result<(MessagesRequest, ChatRequest), ApiError> {
    let bytes = read_body(request, state).await?;
    let config = state.config();
    state
        .off_runtime(move |_| {
            let body: Value = parse_json(&bytes)?;
            let body = crate::presets::apply(&config.presets, body, crate::presets::ANTHROPIC);
            let req: MessagesRequest = from_value(&body)?;
            let chat = chat_request(&req)?;
            Ok((req, chat))
        })
        .await?
}

/// `POST /v1/messages`.
pub async fn create(State(state): State<AppState>, request: Request) -> Result<Response, ApiError> {
    let (req, chat) = parse(&state, request).await?;
    let Some(max_tokens) = req.max_tokens else {
        return Err(ApiError::invalid(
            "max_tokens",
            "max_tokens: field required",
        ));
    };
    let v = SamplingFields {
        max_tokens: Some(max_tokens),
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        stop: req.stop_sequences.clone().map(StopSpec::Many),
        stream: req.stream,
        ..SamplingFields::default()
    }
    .validate()?;
    let model = state.resolve(req.model.as_deref()).await?;
    let (plan, prompt) = prepare_chat(&state, &model, chat, None).await?;
    let prompt_tokens = prompt.len();
    let mut gen = generation_request(&model, prompt, &v)?;
    gen.constraint = plan.constraint;
    model.touch();
    let rxs = submit_choices(&state, &model, gen, 1).await?;
    let rxs = reading_calls(rxs, &plan.answer);
    let id = format!("msg_{}", uuid::Uuid::new_v4().simple());

    if !v.stream {
        let (mut outs, usage) = collect_choices(rxs).await?;
        let out = outs.remove(0);
        let answer = plan.answer.whole(&out.text);
        let stop = stop_reason(finish_reason(out.finish_reason, !answer.calls.is_empty()));
        return Ok(Json(json!({
            "id": id,
            "type": "message",
            "role": "assistant",
            "model": model.id,
            "content": blocks(&answer),
            "stop_reason": stop,
            "stop_sequence": null,
            "usage": usage_body(usage),
        }))
        .into_response());
    }
    let mut encoder = EventEncoder {
        message: json!({"id": id, "type": "message", "role": "assistant", "model": model.id,
                        "content": [], "stop_reason": null, "stop_sequence": null,
                        "usage": {"input_tokens": prompt_tokens, "output_tokens": 0}}),
        answer: plan.answer.stream(),
        blocks: 0,
        open: None,
        stop: "end_turn",
    };
    let format = Box::new(move |_: u32, piece| encoder.encode(piece));
    Ok(stream_response(rxs, true, format, ANTHROPIC, &state).into_response())
}

/// `POST /v1/messages/count_tokens`: the prompt the request would make, counted.
pub async fn count_tokens(
    State(state): State<AppState>,
    request: Request,
) -> Result<Json<Value>, ApiError> {
    let (req, chat) = parse(&state, request).await?;
    let model = state.resolve(req.model.as_deref()).await?;
    let (_, prompt) = prepare_chat(&state, &model, chat, None).await?;
    Ok(Json(json!({ "input_tokens": prompt.len() })))
}

fn stop_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Length => "max_tokens",
        FinishReason::ToolCalls => "tool_use",
        _ => "end_turn",
    }
}

fn usage_body(u: Usage) -> Value {
    json!({
        "input_tokens": u.prompt_tokens,
        "output_tokens": u.completion_tokens,
        "cache_read_input_tokens": u.cached_tokens,
        "cache_creation_input_tokens": 0,
    })
}

/// A call's id as Anthropic spells tool ids.
fn tool_id(call_id: &str) -> String {
    format!("toolu_{}", call_id.trim_start_matches("call_"))
}

/// A call's arguments as the `input` object (the text when it is not JSON).
fn input(arguments: &str) -> Value {
    serde_json::from_str(arguments).unwrap_or_else(|_| json!({}))
}

fn blocks(a: &WholeAnswer) -> Vec<Value> {
    let mut out = Vec::new();
    if !a.reasoning.is_empty() {
        out.push(json!({"type": "thinking", "thinking": a.reasoning, "signature": ""}));
    }
    if !a.content.is_empty() || (a.calls.is_empty() && out.is_empty()) {
        out.push(json!({"type": "text", "text": a.content}));
    }
    for c in &a.calls {
        out.push(
            json!({"type": "tool_use", "id": tool_id(&c.id), "name": c.name,
                        "input": input(&c.arguments)}),
        );
    }
    out
}

/// Anthropic's error body: `{"type": "error", "error": {"type", "message"}}`, the type named
/// after the status as Anthropic names them.
fn error_body(status: u16, message: &str) -> Value {
    let kind = match status {
        400 | 405 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        408 => "timeout_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        _ => "api_error",
    };
    json!({"type": "error", "error": {"type": kind, "message": message}})
}

/// Rewrites the OpenAI-shaped errors of everything under the Anthropic routes (the key check,
/// body parsing, the handlers) into Anthropic's shape, keeping status and headers.
pub async fn anthropic_errors(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    if !status.is_client_error() && !status.is_server_error() {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 1 << 20).await else {
        return (status, Json(error_body(status.as_u16(), "error"))).into_response();
    };
    let message = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .and_then(Value::as_str)
                .map(String::from)
        })
        .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
    let body = error_body(status.as_u16(), &message).to_string();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        "application/json".parse().expect("header"),
    );
    Response::from_parts(parts, Body::from(body))
}

/// Anthropic streams name every event and end with `message_stop`; a failure is `error`.
const ANTHROPIC: Framing = Framing {
    done_marker: false,
    error: |e| {
        let body = error_body(e.status().as_u16(), &e.to_string());
        SseEvent::default().event("error").data(body.to_string())
    },
};

/// The content block being streamed.
#[derive(PartialEq)]
enum Open {
    Text,
    Thinking,
    ToolUse,
}

/// Turns one answer's pieces into Anthropic's stream: `message_start`, content blocks opened,
/// filled by deltas and stopped in order, then `message_delta` (stop reason, usage) and
/// `message_stop`.
struct EventEncoder {
    message: Value,
    answer: AnswerStream,
    /// Blocks started so far (the next block's index).
    blocks: usize,
    open: Option<Open>,
    stop: &'static str,
}

fn event(name: &'static str, mut body: Value) -> Named {
    body["type"] = json!(name);
    (name, body)
}

impl EventEncoder {
    fn encode(&mut self, piece: Piece) -> Vec<SseEvent> {
        named(self.events(piece))
    }

    /// The events for one piece, named.
    fn events(&mut self, piece: Piece) -> Vec<Named> {
        let mut out = Vec::new();
        match piece {
            Piece::Start => {
                out.push(event("message_start", json!({"message": self.message})));
                out.push(event("ping", json!({})));
            }
            Piece::Logprob(_) => {}
            Piece::Text(t) => {
                let deltas = self.answer.push(&t);
                self.deltas(deltas, &mut out);
            }
            Piece::Finish(reason) => {
                let deltas = self.answer.finish();
                self.deltas(deltas, &mut out);
                if self.blocks == 0 {
                    self.start(Open::Text, json!({"type": "text", "text": ""}), &mut out);
                }
                self.stop_block(&mut out);
                self.stop = stop_reason(finish_reason(reason, self.answer.calls() > 0));
            }
            Piece::Usage(u) => {
                out.push(event(
                    "message_delta",
                    json!({"delta": {"stop_reason": self.stop, "stop_sequence": null},
                           "usage": usage_body(u)}),
                ));
                out.push(event("message_stop", json!({})));
            }
        }
        out
    }

    fn deltas(&mut self, deltas: Vec<Delta>, out: &mut Vec<Named>) {
        for d in deltas {
            let delta = match d {
                Delta::Content(t) => {
                    if self.open != Some(Open::Text) {
                        self.start(Open::Text, json!({"type": "text", "text": ""}), out);
                    }
                    json!({"type": "text_delta", "text": t})
                }
                Delta::Reasoning(t) => {
                    if self.open != Some(Open::Thinking) {
                        self.start(
                            Open::Thinking,
                            json!({"type": "thinking", "thinking": "", "signature": ""}),
                            out,
                        );
                    }
                    json!({"type": "thinking_delta", "thinking": t})
                }
                Delta::CallStart { id, name, .. } => {
                    let block =
                        json!({"type": "tool_use", "id": tool_id(&id), "name": name, "input": {}});
                    self.start(Open::ToolUse, block, out);
                    continue;
                }
                Delta::CallArgs { fragment, .. } => {
                    json!({"type": "input_json_delta", "partial_json": fragment})
                }
            };
            let index = self.blocks - 1;
            out.push(event(
                "content_block_delta",
                json!({"index": index, "delta": delta}),
            ));
        }
    }

    fn start(&mut self, open: Open, block: Value, out: &mut Vec<Named>) {
        self.stop_block(out);
        out.push(event(
            "content_block_start",
            json!({"index": self.blocks, "content_block": block}),
        ));
        self.blocks += 1;
        self.open = Some(open);
    }

    fn stop_block(&mut self, out: &mut Vec<Named>) {
        if self.open.take().is_some() {
            out.push(event(
                "content_block_stop",
                json!({"index": self.blocks - 1}),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::answer::AnswerSpec;

    fn request(body: Value) -> MessagesRequest {
        serde_json::from_value(body).unwrap()
    }

    #[test]
    fn blocks_become_turns_with_tool_results_before_text() {
        let req = request(
            json!({"max_tokens": 5, "system": [{"type": "text", "text": "Be brief."}],
            "messages": [
                {"role": "user", "content": "read a"},
                {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm"},
                    {"type": "text", "text": "Reading."},
                    {"type": "tool_use", "id": "toolu_1", "name": "read_file", "input": {"path": "a"}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "A"}]},
                    {"type": "tool_result", "tool_use_id": "toolu_2", "content": "boom", "is_error": true},
                    {"type": "text", "text": "Summarise."}]}]}),
        );
        let t = turns(&req).unwrap();
        let roles: Vec<Role> = t.iter().map(|m| m.role).collect();
        assert_eq!(
            roles,
            [
                Role::System,
                Role::User,
                Role::Assistant,
                Role::Tool,
                Role::Tool,
                Role::User
            ]
        );
        assert_eq!(t[2].content, "Reading.");
        assert_eq!(t[2].tool_calls[0].arguments, r#"{"path":"a"}"#);
        assert_eq!(t[4].content, "Error: boom");
        assert_eq!(t[4].tool_call_id.as_deref(), Some("toolu_2"));
        let image =
            request(json!({"messages": [{"role": "user", "content": [{"type": "image"}]}]}));
        assert!(turns(&image).unwrap_err().to_string().contains("`image`"));
        let server_tool = request(
            json!({"messages": [], "tools": [{"type": "web_search_20250305", "name": "w"}]}),
        );
        assert!(tools(&server_tool).is_err());
        let any = request(
            json!({"messages": [], "tool_choice": {"type": "any", "disable_parallel_tool_use": true}}),
        );
        assert_eq!(tool_choice(&any).unwrap(), (ToolChoice::Required, false));
    }

    #[test]
    fn a_thinking_answer_streams_thinking_then_tool_use_blocks() {
        let mut e = EventEncoder {
            message: json!({"id": "msg_1"}),
            answer: AnswerSpec {
                tools: Some(crate::chat::toolset::ToolSet::declared(&["f"])),
                ..AnswerSpec::default()
            }
            .stream(),
            blocks: 0,
            open: None,
            stop: "end_turn",
        };
        let mut names = Vec::new();
        let mut bodies = Vec::new();
        let mut take = |evs: Vec<(&'static str, Value)>| {
            for (n, b) in evs {
                names.push(n);
                bodies.push(b);
            }
        };
        take(e.events(Piece::Start));
        take(e.events(Piece::Text("<think>plan</think>Sure.<tool_call>{\"name\": \"f\", \"arguments\": {\"x\": 1}}</tool_call>".into())));
        take(e.events(Piece::Finish(FinishReason::Stop)));
        take(e.events(Piece::Usage(Usage {
            prompt_tokens: 3,
            completion_tokens: 4,
            cached_tokens: 0,
        })));
        assert_eq!(
            names,
            [
                "message_start",
                "ping",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ]
        );
        assert_eq!(
            bodies[3]["delta"],
            json!({"type": "thinking_delta", "thinking": "plan"})
        );
        assert_eq!(
            bodies[6]["delta"],
            json!({"type": "text_delta", "text": "Sure."})
        );
        assert_eq!(bodies[8]["content_block"]["type"], "tool_use");
        assert_eq!(bodies[8]["index"], 2);
        assert_eq!(bodies[9]["delta"]["partial_json"], r#"{"x": 1}"#);
        assert_eq!(bodies[11]["delta"]["stop_reason"], "tool_use");
        assert_eq!(bodies[11]["usage"]["output_tokens"], 4);
    }

    #[test]
    fn a_call_to_an_undeclared_tool_is_text_and_two_bare_calls_are_two_tool_uses() {
        let mut e = EventEncoder {
            message: json!({"id": "msg_1"}),
            answer: AnswerSpec {
                tools: Some(crate::chat::toolset::ToolSet::declared(&["ls"])),
                ..AnswerSpec::default()
            }
            .stream(),
            blocks: 0,
            open: None,
            stop: "end_turn",
        };
        let mut blocks = Vec::new();
        for piece in [
            Piece::Start,
            Piece::Text("<tool_call>{\"name\": \"session:agent:bot1:load1\", \"arguments\": {}}</tool_call>\n".into()),
            Piece::Text("{\"name\": \"ls\", \"arguments\": {\"path\": \"a\"}}\n{\"name\": \"ls\", \"arguments\": \"\"}".into()),
            Piece::Finish(FinishReason::Stop),
        ] {
            for (name, body) in e.events(piece) {
                if name == "content_block_start" {
                    blocks.push(body["content_block"].clone());
                }
            }
        }
        let kinds: Vec<&str> = blocks.iter().map(|b| b["type"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["text", "tool_use", "tool_use"], "{blocks:?}");
        assert!(blocks.iter().skip(1).all(|b| b["name"] == "ls"));
    }

    #[test]
    fn errors_take_anthropics_names() {
        assert_eq!(error_body(404, "x")["error"]["type"], "not_found_error");
        assert_eq!(error_body(429, "x")["error"]["type"], "rate_limit_error");
        assert_eq!(error_body(500, "x")["error"]["type"], "api_error");
        assert_eq!(
            error_body(400, "m"),
            json!({"type": "error", "error": {"type": "invalid_request_error", "message": "m"}})
        );
    }
}
