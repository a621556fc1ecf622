//! `POST /v1/responses` and `GET /v1/responses/{id}`: OpenAI's Responses dialect, for bots
//! configured with `api: "openai-responses"`. The input items become the chat layer's
//! [`ChatRequest`]; the answer goes out as output items (reasoning, message, function calls),
//! whole or as Responses events. `store` keeps the conversation so `previous_response_id`
//! can continue it.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use axum::extract::{Request, State};
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::chat::prepare_chat;
use super::error::ApiError;
use super::generate::*;
use super::sse::{named, stream_response, Framing, Named, Piece};
use super::types::{parse_tool_choice, parse_tools, text_of, type_of, SamplingFields};
use super::{from_value, parse_json, read_body, ApiPath, AppState};
use crate::chat::answer::{AnswerStream, WholeAnswer};
use crate::chat::request::{ChatRequest, Message, Role, ToolCall};
use crate::chat::tools::Delta;
use crate::engine::{FinishReason, Usage};

/// Stored responses kept for `previous_response_id` and `GET /v1/responses/{id}`; the oldest
/// go first past this many, or past [`STORE_BYTES`] of text.
const STORE_CAPACITY: usize = 512;

/// Text the store may hold in all (a conversation can be as large as a request body).
const STORE_BYTES: usize = 64 << 20;

/// A stored response and the conversation up to and including its answer.
#[derive(Clone)]
struct Stored {
    response: Value,
    conversation: Vec<Message>,
}

impl Stored {
    /// About what it takes in memory: its text.
    fn bytes(&self) -> usize {
        let text = |m: &Message| {
            m.content.len()
                + m.tool_calls
                    .iter()
                    .map(|c| c.arguments.len() + c.name.len())
                    .sum::<usize>()
        };
        self.response.to_string().len() + self.conversation.iter().map(text).sum::<usize>()
    }
}

/// The bounded in-memory store behind `store: true`: the latest responses within the bounds.
/// When it is full, room is made from the client holding the most (its oldest first), so one
/// client storing in a loop pushes out its own responses, not everyone's.
#[derive(Default)]
pub struct ResponseStore {
    inner: Mutex<StoreInner>,
}

#[derive(Default)]
struct StoreInner {
    /// id -> (response, its size, its client).
    map: HashMap<String, (Stored, usize, String)>,
    order: VecDeque<String>,
    bytes: usize,
    /// Bytes and entries held per client (clients holding nothing are not listed).
    held: HashMap<String, (usize, usize)>,
}

impl StoreInner {
    fn remove(&mut self, id: &str) {
        if let Some((_, n, client)) = self.map.remove(id) {
            self.bytes -= n;
            if let Some(h) = self.held.get_mut(&client) {
                h.0 -= n;
                h.1 -= 1;
                if h.1 == 0 {
                    self.held.remove(&client);
                }
            }
        }
    }

    /// The oldest response of the client holding the most bytes (then the most entries).
    fn victim(&self) -> Option<String> {
        let (client, _) = self.held.iter().max_by_key(|(c, &h)| (h, *c))?;
        self.order
            .iter()
            .find(|id| self.map.get(*id).is_some_and(|e| &e.2 == client))
            .cloned()
    }
}

impl ResponseStore {
    fn put(&self, id: String, client: String, stored: Stored) {
        let size = stored.bytes();
        let mut s = self.inner.lock().expect("response store lock");
        s.remove(&id);
        s.order.retain(|o| o != &id);
        let h = s.held.entry(client.clone()).or_default();
        h.0 += size;
        h.1 += 1;
        s.map.insert(id.clone(), (stored, size, client));
        s.order.push_back(id);
        s.bytes += size;
        while s.map.len() > STORE_CAPACITY || (s.bytes > STORE_BYTES && s.map.len() > 1) {
            let Some(victim) = s.victim() else { break };
            s.remove(&victim);
            s.order.retain(|o| o != &victim);
        }
    }

    fn get(&self, id: &str) -> Option<Stored> {
        let s = self.inner.lock().expect("response store lock");
        s.map.get(id).map(|(stored, _, _)| stored.clone())
    }
}

/// The request fields this dialect reads (others, such as `reasoning`, `prompt_cache_key`,
/// `metadata` or `truncation`, are accepted and ignored).
#[derive(Debug, Deserialize)]
struct ResponsesRequest {
    model: Option<String>,
    input: Value,
    instructions: Option<String>,
    max_output_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
    text: Option<Value>,
    #[serde(default)]
    stream: bool,
    store: Option<bool>,
    previous_response_id: Option<String>,
    seed: Option<i64>,
    stop: Option<super::types::StopSpec>,
}

/// Text of a content given as a string or as parts (`input_text`, `output_text`, `text`).
fn content_text(content: Option<&Value>, at: &str) -> Result<String, ApiError> {
    let refuse = |at: String, other: &str| {
        ApiError::invalid(
            at,
            format!("content part type `{other}` is not supported here (input_text); no model served here can see images or read files"),
        )
    };
    text_of(
        content,
        &["input_text", "output_text", "text", "reasoning_text"],
        &format!("{at}.content"),
        refuse,
    )
}

/// `input` (a string, or message / function_call / function_call_output items) as turns.
fn input_messages(input: &Value) -> Result<Vec<Message>, ApiError> {
    let items = match input {
        Value::String(s) => return Ok(vec![Message::text(Role::User, s.clone())]),
        Value::Array(items) => items,
        _ => {
            return Err(ApiError::invalid(
                "input",
                "input must be a string or a list of items",
            ))
        }
    };
    let mut out: Vec<Message> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let at = format!("input[{i}]");
        let text_field = |k: &str| item.get(k).and_then(Value::as_str).map(String::from);
        match type_of(item) {
            "message" | "" if item.get("role").is_some() => {
                let role = match item["role"].as_str().unwrap_or_default() {
                    "system" | "developer" => Role::System,
                    "user" => Role::User,
                    "assistant" => Role::Assistant,
                    other => {
                        return Err(ApiError::invalid(
                            format!("{at}.role"),
                            format!("role `{other}` is not one of system, developer, user, assistant"),
                        ))
                    }
                };
                out.push(Message::text(role, content_text(item.get("content"), &at)?));
            }
            "function_call" => {
                let call = ToolCall {
                    id: text_field("call_id").unwrap_or_default(),
                    name: text_field("name").ok_or_else(|| {
                        ApiError::invalid(&at, format!("{at}.name is required"))
                    })?,
                    arguments: text_field("arguments").unwrap_or_else(|| "{}".into()),
                };
                // Calls in a row belong to one assistant turn.
                match out.last_mut() {
                    Some(m) if m.role == Role::Assistant && !m.tool_calls.is_empty() => {
                        m.tool_calls.push(call)
                    }
                    _ => {
                        let mut m = Message::text(Role::Assistant, "");
                        m.tool_calls.push(call);
                        out.push(m);
                    }
                }
            }
            "function_call_output" => {
                let output = match item.get("output") {
                    Some(Value::String(s)) => s.clone(),
                    other => content_text(other, &at)?,
                };
                let mut m = Message::text(Role::Tool, output);
                m.tool_call_id = text_field("call_id");
                out.push(m);
            }
            // Earlier reasoning is not shown to the model again (as chat templates do).
            "reasoning" => {}
            other => {
                return Err(ApiError::invalid(
                    format!("{at}.type"),
                    format!("input item type `{other}` is not supported (message, function_call, function_call_output)"),
                ))
            }
        }
    }
    Ok(out)
}

/// `text.format` in chat's `response_format` shape.
fn response_format(text: Option<&Value>) -> Option<Value> {
    let format = text?.get("format")?;
    Some(match type_of(format) {
        "json_schema" => json!({"type": "json_schema", "json_schema": {
            "name": format.get("name"), "schema": format.get("schema"), "strict": format.get("strict")}}),
        _ => format.clone(),
    })
}

/// Everything a Responses request turns into before the engine.
struct Parsed {
    req: ResponsesRequest,
    chat: ChatRequest,
    /// The conversation before this turn's answer (previous turns included), for the store.
    conversation: Vec<Message>,
    sampling: SamplingFields,
}

fn parse(body: &Value, store: &ResponseStore) -> Result<Parsed, ApiError> {
    let req: ResponsesRequest = from_value(body)?;
    let mut conversation = match &req.previous_response_id {
        None => Vec::new(),
        Some(id) => {
            store
                .get(id)
                .ok_or_else(|| {
                    ApiError::NotFound(format!(
                        "previous response `{id}` is not stored here (responses are kept only with store: true, and only the latest {STORE_CAPACITY})"
                    ))
                })?
                .conversation
        }
    };
    conversation.extend(input_messages(&req.input)?);
    let mut messages = conversation.clone();
    if let Some(instructions) = &req.instructions {
        messages.insert(0, Message::text(Role::System, instructions.clone()));
    }
    if messages.is_empty() {
        return Err(ApiError::invalid("input", "input must not be empty"));
    }
    let chat = ChatRequest {
        messages,
        tools: parse_tools(req.tools.as_ref())?,
        tool_choice: parse_tool_choice(req.tool_choice.as_ref())?,
        parallel_tool_calls: req.parallel_tool_calls.unwrap_or(true),
    };
    let sampling = SamplingFields {
        max_tokens: req.max_output_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        seed: req.seed,
        stop: req.stop.clone(),
        stream: req.stream,
        response_format: response_format(req.text.as_ref()),
        ..SamplingFields::default()
    };
    Ok(Parsed {
        req,
        chat,
        conversation,
        sampling,
    })
}

/// `POST /v1/responses`.
pub async fn create(State(state): State<AppState>, request: Request) -> Result<Response, ApiError> {
    let client = super::auth::client_of(&request);
    let bytes = read_body(request, &state).await?;
    let store = state.responses.clone();
    let config = state.config();
    let parsed = state
        .off_runtime(move |_| {
            let body: Value = parse_json(&bytes)?;
            let body = crate::presets::apply(&config.presets, body, crate::presets::RESPONSES);
            parse(&body, &store)
        })
        .await??;
    let v = parsed.sampling.validate().map_err(rename_param)?;
    let model = state.resolve(parsed.req.model.as_deref()).await?;
    let (plan, prompt) = prepare_chat(&state, &model, parsed.chat, v.constraint.clone()).await?;
    let mut gen = generation_request(&model, prompt, &v)?;
    gen.constraint = plan.constraint;
    model.touch();
    let rxs = submit_choices(&state, &model, gen, 1).await?;
    let rxs = reading_calls(rxs, &plan.answer);
    let base = json!({
        "id": format!("resp_{}", uuid::Uuid::new_v4().simple()),
        "object": "response",
        "created_at": now_secs(),
        "model": model.id,
        "instructions": parsed.req.instructions,
        "max_output_tokens": parsed.req.max_output_tokens,
        "temperature": parsed.req.temperature,
        "top_p": parsed.req.top_p,
        "tools": parsed.req.tools.clone().unwrap_or(json!([])),
        "tool_choice": parsed.req.tool_choice.clone().unwrap_or(json!("auto")),
        "parallel_tool_calls": parsed.req.parallel_tool_calls.unwrap_or(true),
        "previous_response_id": parsed.req.previous_response_id,
        "store": parsed.req.store.unwrap_or(true),
        "text": parsed.req.text.clone().unwrap_or(json!({"format": {"type": "text"}})),
        "truncation": "disabled",
        "metadata": {},
        "error": null,
        "incomplete_details": null,
    });
    let keep = parsed.req.store.unwrap_or(true).then(|| KeepTurn {
        store: state.responses.clone(),
        client,
        conversation: parsed.conversation,
    });

    if !v.stream {
        let (mut outs, usage) = collect_choices(rxs).await?;
        let out = outs.remove(0);
        let answer = plan.answer.whole(&out.text);
        let mut response = base;
        let assistant = assistant_turn(&answer);
        finish_response(
            &mut response,
            output_items(&answer),
            out.finish_reason,
            usage,
        );
        if let Some(k) = keep {
            k.save(&response, assistant);
        }
        return Ok(Json(response).into_response());
    }
    let mut encoder = EventEncoder {
        response: base,
        answer: plan.answer.stream(),
        seq: 0,
        output: Vec::new(),
        open: None,
        finish: FinishReason::Stop,
        whole: WholeAnswer::default(),
        keep,
    };
    let format = Box::new(move |_: u32, piece| encoder.encode(piece));
    Ok(stream_response(rxs, true, format, RESPONSES, &state).into_response())
}

/// Sampling errors name the Responses field, not chat's.
fn rename_param(e: ApiError) -> ApiError {
    match e {
        ApiError::InvalidRequest {
            message,
            param: Some(p),
            code,
        } if p == "max_tokens" || p == "response_format" => ApiError::InvalidRequest {
            message: message.replace("max_tokens", "max_output_tokens"),
            param: Some(if p == "max_tokens" {
                "max_output_tokens".into()
            } else {
                "text.format".into()
            }),
            code,
        },
        other => other,
    }
}

/// `GET /v1/responses/{id}`.
pub async fn get(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    state
        .responses
        .get(&id)
        .map(|s| Json(s.response))
        .ok_or_else(|| ApiError::NotFound(format!("no stored response `{id}`")))
}

/// What `store: true` keeps once the answer is complete.
struct KeepTurn {
    store: std::sync::Arc<ResponseStore>,
    /// Who asked (see [`super::auth::client_of`]), for the store's fair share.
    client: String,
    conversation: Vec<Message>,
}

impl KeepTurn {
    fn save(mut self, response: &Value, assistant: Message) {
        self.conversation.push(assistant);
        let id = response["id"].as_str().unwrap_or_default().to_string();
        self.store.put(
            id,
            self.client,
            Stored {
                response: response.clone(),
                conversation: self.conversation,
            },
        );
    }
}

/// The answer as the assistant turn a later `previous_response_id` continues from.
fn assistant_turn(a: &WholeAnswer) -> Message {
    let mut m = Message::text(Role::Assistant, a.content.clone());
    m.tool_calls = a.calls.clone();
    m
}

fn item_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({"id": id, "type": "message", "status": status, "role": "assistant",
           "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]})
}

fn reasoning_item(id: &str, text: &str) -> Value {
    json!({"id": id, "type": "reasoning", "summary": [],
           "content": [{"type": "reasoning_text", "text": text}]})
}

fn call_item(id: &str, call: &ToolCall, status: &str) -> Value {
    json!({"id": id, "type": "function_call", "status": status, "call_id": call.id,
           "name": call.name, "arguments": call.arguments})
}

/// A whole answer's output items: reasoning, the message (when there is text or nothing
/// else), then the calls.
fn output_items(a: &WholeAnswer) -> Vec<Value> {
    let mut out = Vec::new();
    if !a.reasoning.is_empty() {
        out.push(reasoning_item(&item_id("rs"), &a.reasoning));
    }
    if !a.content.is_empty() || a.calls.is_empty() {
        out.push(message_item(&item_id("msg"), &a.content, "completed"));
    }
    for c in &a.calls {
        out.push(call_item(&item_id("fc"), c, "completed"));
    }
    out
}

/// Fills in status, output and usage; `length` makes the response `incomplete`.
fn finish_response(response: &mut Value, output: Vec<Value>, finish: FinishReason, u: Usage) {
    let incomplete = finish == FinishReason::Length;
    response["status"] = json!(if incomplete {
        "incomplete"
    } else {
        "completed"
    });
    if incomplete {
        response["incomplete_details"] = json!({"reason": "max_output_tokens"});
    }
    response["output"] = Value::Array(output);
    response["usage"] = json!({
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    });
}

/// Responses streams name every event and have no `[DONE]`; a failure is an `error` event.
const RESPONSES: Framing = Framing {
    done_marker: false,
    error: |e| {
        let d = e.detail();
        let body = json!({"type": "error", "code": d.code, "message": d.message, "param": d.param});
        SseEvent::default().event("error").data(body.to_string())
    },
};

/// The output item being streamed.
enum Open {
    Message { id: String, text: String },
    Reasoning { id: String, text: String },
    Call { id: String, call: ToolCall },
}

/// Turns one answer's pieces into OpenAI's Responses events: items open and close around
/// their deltas, each with its output index, and `response.completed` carries usage.
struct EventEncoder {
    response: Value,
    answer: AnswerStream,
    seq: u64,
    /// Finished output items.
    output: Vec<Value>,
    open: Option<Open>,
    finish: FinishReason,
    /// The answer so far, for the store.
    whole: WholeAnswer,
    keep: Option<KeepTurn>,
}

impl EventEncoder {
    fn event(&mut self, name: &'static str, mut body: Value) -> Named {
        body["type"] = json!(name);
        body["sequence_number"] = json!(self.seq);
        self.seq += 1;
        (name, body)
    }

    fn encode(&mut self, piece: Piece) -> Vec<SseEvent> {
        named(self.events(piece))
    }

    /// The events for one piece, named.
    fn events(&mut self, piece: Piece) -> Vec<Named> {
        let mut out = Vec::new();
        match piece {
            Piece::Start => {
                let mut r = self.response.clone();
                r["status"] = json!("in_progress");
                r["output"] = json!([]);
                r["usage"] = Value::Null;
                out.push(self.event("response.created", json!({"response": r})));
                out.push(self.event("response.in_progress", json!({"response": r})));
            }
            Piece::Logprob(_) => {}
            Piece::Text(t) => {
                let deltas = self.answer.push(&t);
                self.deltas(deltas, &mut out);
            }
            Piece::Finish(reason) => {
                let deltas = self.answer.finish();
                self.deltas(deltas, &mut out);
                if self.output.is_empty() && self.open.is_none() {
                    self.open_message(&mut out);
                }
                self.close(&mut out);
                self.finish = reason;
            }
            Piece::Usage(u) => {
                let mut r = self.response.clone();
                finish_response(&mut r, self.output.clone(), self.finish, u);
                let name = if self.finish == FinishReason::Length {
                    "response.incomplete"
                } else {
                    "response.completed"
                };
                out.push(self.event(name, json!({"response": r})));
                if let Some(k) = self.keep.take() {
                    k.save(&r, assistant_turn(&self.whole));
                }
            }
        }
        out
    }

    fn deltas(&mut self, deltas: Vec<Delta>, out: &mut Vec<Named>) {
        // The open item's output index is the count of finished items, taken after any
        // item a delta closes.
        for d in deltas {
            match d {
                Delta::Content(t) => {
                    if !matches!(self.open, Some(Open::Message { .. })) {
                        self.close(out);
                        self.open_message(out);
                    }
                    self.whole.content.push_str(&t);
                    let index = self.output.len();
                    if let Some(Open::Message { id, text }) = &mut self.open {
                        text.push_str(&t);
                        let body = json!({"item_id": id, "output_index": index, "content_index": 0,
                                          "delta": t, "logprobs": []});
                        out.push(self.event("response.output_text.delta", body));
                    }
                }
                Delta::Reasoning(t) => {
                    if !matches!(self.open, Some(Open::Reasoning { .. })) {
                        self.close(out);
                        let index = self.output.len();
                        let id = item_id("rs");
                        let item =
                            json!({"id": id, "type": "reasoning", "summary": [], "content": []});
                        out.push(self.event(
                            "response.output_item.added",
                            json!({"output_index": index, "item": item}),
                        ));
                        self.open = Some(Open::Reasoning {
                            id,
                            text: String::new(),
                        });
                    }
                    self.whole.reasoning.push_str(&t);
                    let index = self.output.len();
                    if let Some(Open::Reasoning { id, text }) = &mut self.open {
                        text.push_str(&t);
                        let body = json!({"item_id": id, "output_index": index, "content_index": 0, "delta": t});
                        out.push(self.event("response.reasoning_text.delta", body));
                    }
                }
                Delta::CallStart { id, name, .. } => {
                    self.close(out);
                    let index = self.output.len();
                    let call = ToolCall {
                        id,
                        name,
                        arguments: String::new(),
                    };
                    let fc = item_id("fc");
                    let item = call_item(&fc, &call, "in_progress");
                    out.push(self.event(
                        "response.output_item.added",
                        json!({"output_index": index, "item": item}),
                    ));
                    self.open = Some(Open::Call { id: fc, call });
                }
                Delta::CallArgs { fragment, .. } => {
                    let index = self.output.len();
                    if let Some(Open::Call { id, call }) = &mut self.open {
                        call.arguments.push_str(&fragment);
                        let body = json!({"item_id": id, "output_index": index, "delta": fragment});
                        out.push(self.event("response.function_call_arguments.delta", body));
                    }
                }
            }
        }
    }

    fn open_message(&mut self, out: &mut Vec<Named>) {
        let index = self.output.len();
        let id = item_id("msg");
        let item = json!({"id": id, "type": "message", "status": "in_progress", "role": "assistant", "content": []});
        out.push(self.event(
            "response.output_item.added",
            json!({"output_index": index, "item": item}),
        ));
        let part = json!({"type": "output_text", "text": "", "annotations": []});
        out.push(self.event(
            "response.content_part.added",
            json!({"item_id": id, "output_index": index, "content_index": 0, "part": part}),
        ));
        self.open = Some(Open::Message {
            id,
            text: String::new(),
        });
    }

    /// Ends the open item with its `.done` events (the full text or arguments included).
    fn close(&mut self, out: &mut Vec<Named>) {
        let index = self.output.len();
        let item = match self.open.take() {
            None => return,
            Some(Open::Message { id, text }) => {
                let at = json!({"item_id": id, "output_index": index, "content_index": 0});
                let mut done = at.clone();
                done["text"] = json!(text);
                done["logprobs"] = json!([]);
                out.push(self.event("response.output_text.done", done));
                let mut part = at;
                part["part"] = json!({"type": "output_text", "text": text, "annotations": []});
                out.push(self.event("response.content_part.done", part));
                message_item(&id, &text, "completed")
            }
            Some(Open::Reasoning { id, text }) => {
                let body =
                    json!({"item_id": id, "output_index": index, "content_index": 0, "text": text});
                out.push(self.event("response.reasoning_text.done", body));
                reasoning_item(&id, &text)
            }
            Some(Open::Call { id, call }) => {
                let body = json!({"item_id": id, "output_index": index, "name": call.name,
                                  "arguments": call.arguments});
                out.push(self.event("response.function_call_arguments.done", body));
                self.whole.calls.push(call.clone());
                call_item(&id, &call, "completed")
            }
        };
        out.push(self.event(
            "response.output_item.done",
            json!({"output_index": index, "item": item}),
        ));
        self.output.push(item);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::answer::AnswerSpec;

    fn encoder(spec: AnswerSpec) -> EventEncoder {
        EventEncoder {
            response: json!({"id": "resp_1", "object": "response"}),
            answer: spec.stream(),
            seq: 0,
            output: Vec::new(),
            open: None,
            finish: FinishReason::Stop,
            whole: WholeAnswer::default(),
            keep: None,
        }
    }

    fn run(spec: AnswerSpec, pieces: &[&str]) -> Vec<Named> {
        let mut e = encoder(spec);
        let mut out = e.events(Piece::Start);
        for p in pieces {
            out.extend(e.events(Piece::Text(p.to_string())));
        }
        out.extend(e.events(Piece::Finish(FinishReason::Stop)));
        out.extend(e.events(Piece::Usage(Usage {
            prompt_tokens: 7,
            completion_tokens: 5,
            cached_tokens: 2,
        })));
        out
    }

    #[test]
    fn a_thinking_model_streams_a_reasoning_item_then_a_call_in_order() {
        let spec = AnswerSpec {
            tools: Some(crate::chat::toolset::ToolSet::declared(&["read_file"])),
            ..AnswerSpec::default()
        };
        let events = run(
            spec,
            &[
                "<think>Need the",
                " file.</think>\n<tool_call>{\"name\": \"read_file\", ",
                "\"arguments\": {\"path\": \"a\"}}</tool_call>",
            ],
        );
        let names: Vec<&str> = events.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.reasoning_text.delta",
                "response.reasoning_text.delta",
                "response.reasoning_text.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        // Sequence numbers count every event; output indexes follow the items.
        for (i, (_, body)) in events.iter().enumerate() {
            assert_eq!(body["sequence_number"], i);
        }
        assert_eq!(events[5].1["text"], "Need the file.");
        assert_eq!(events[7].1["output_index"], 1);
        assert_eq!(events[9].1["arguments"], r#"{"path": "a"}"#);
        let done = &events[11].1["response"];
        assert_eq!(done["status"], "completed");
        assert_eq!(done["output"][0]["type"], "reasoning");
        assert_eq!(done["output"][1]["call_id"], events[7].1["item"]["call_id"]);
        assert_eq!(done["usage"]["input_tokens_details"]["cached_tokens"], 2);
        assert_eq!(done["usage"]["total_tokens"], 12);
    }

    #[test]
    fn only_calls_to_declared_tools_with_json_arguments_become_function_calls() {
        let spec = AnswerSpec {
            tools: Some(crate::chat::toolset::ToolSet::declared(&["ls"])),
            ..AnswerSpec::default()
        };
        // Recorded shapes: a tool's description as its name with arguments that are not JSON,
        // then two bare calls on two lines.
        let events = run(
            spec,
            &[
                "<tool_call>{\"name\": \"list directory entries in binary filename order\", ",
                "\"arguments\": path=.}</tool_call>\n{\"name\": \"ls\", \"arguments\": {\"path\": \"a\"}}",
                "\n{\"name\": \"ls\", \"arguments\": {}}",
            ],
        );
        let done = &events.last().unwrap().1["response"];
        let output = done["output"].as_array().unwrap();
        let kinds: Vec<&str> = output.iter().map(|o| o["type"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            ["message", "function_call", "function_call"],
            "{output:?}"
        );
        assert!(output[0]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("list directory entries"));
        assert_eq!(output[1]["name"], "ls");
        assert_eq!(output[1]["arguments"], r#"{"path": "a"}"#);
        assert_eq!(output[2]["arguments"], "{}");
    }

    #[test]
    fn text_comes_after_its_item_and_part_and_an_empty_answer_is_an_empty_message() {
        let events = run(AnswerSpec::default(), &["Hel", "lo"]);
        let names: Vec<&str> = events.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            &names[2..9],
            [
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
            ]
        );
        assert_eq!(events[6].1["text"], "Hello");
        let empty = run(AnswerSpec::default(), &[]);
        let last = &empty.last().unwrap().1["response"];
        assert_eq!(last["output"][0]["content"][0]["text"], "");
    }

    #[test]
    fn the_store_keeps_the_latest_within_its_bounds() {
        let store = ResponseStore::default();
        let stored = |n: usize| Stored {
            response: json!({}),
            conversation: vec![Message::text(Role::User, "x".repeat(n))],
        };
        for i in 0..(STORE_CAPACITY + 10) {
            store.put(format!("r{i}"), "a".into(), stored(10));
        }
        assert!(store.get("r0").is_none() && store.get("r9").is_none());
        assert!(store.get("r10").is_some());
        // Big conversations push out the oldest by size.
        store.put("big1".into(), "a".into(), stored(STORE_BYTES / 3));
        store.put("big2".into(), "a".into(), stored(STORE_BYTES / 3));
        // (each put past the count pushed out one small one)
        assert!(
            store.get("r12").is_some(),
            "two thirds fit beside the small ones"
        );
        store.put("big3".into(), "a".into(), stored(STORE_BYTES / 3));
        assert!(store.get("r521").is_none() && store.get("big1").is_none());
        assert!(store.get("big2").is_some() && store.get("big3").is_some());
        assert!(store.inner.lock().unwrap().bytes <= STORE_BYTES);
    }

    #[test]
    fn a_client_that_fills_the_store_pushes_out_its_own_responses() {
        let store = ResponseStore::default();
        let stored = || Stored {
            response: json!({}),
            conversation: vec![Message::text(Role::User, "x".repeat(10))],
        };
        for i in 0..20 {
            store.put(format!("bot{i}"), "127.0.0.1 sha256:b".into(), stored());
        }
        for i in 0..(STORE_CAPACITY * 3) {
            store.put(format!("flood{i}"), "10.0.0.9 -".into(), stored());
        }
        assert!((0..20).all(|i| store.get(&format!("bot{i}")).is_some()));
        assert!(store.get("flood0").is_none());
        assert!(store
            .get(&format!("flood{}", STORE_CAPACITY * 3 - 1))
            .is_some());
        assert_eq!(store.inner.lock().unwrap().map.len(), STORE_CAPACITY);
    }

    #[test]
    fn input_items_become_turns() {
        let input = json!([
            {"role": "developer", "content": "Be brief."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "read a"}]},
            {"type": "reasoning", "summary": []},
            {"type": "function_call", "call_id": "call_1", "name": "read_file", "arguments": "{\"path\":\"a\"}"},
            {"type": "function_call", "call_id": "call_2", "name": "read_file", "arguments": "{\"path\":\"b\"}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "A"},
            {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "B"}]},
        ]);
        let turns = input_messages(&input).unwrap();
        assert_eq!(turns.len(), 5);
        assert_eq!(turns[0].role, Role::System);
        assert_eq!(turns[1].content, "read a");
        assert_eq!(turns[2].tool_calls.len(), 2, "calls in a row are one turn");
        assert_eq!(turns[4].tool_call_id.as_deref(), Some("call_2"));
        assert_eq!(turns[4].content, "B");
        assert!(input_messages(&json!([{"type": "computer_call"}])).is_err());
        assert!(input_messages(&json!(5)).is_err());
    }
}
