//! OpenAI wire types for `/v1`: requests as clients send them, responses shaped exactly like
//! OpenAI's, and the validation that turns request fields into engine settings.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::ApiError;
use crate::chat::request::{ChatRequest, Message, Role, Tool, ToolCall, ToolChoice};
use crate::engine::options::Speculation;
use crate::engine::{Constraint, FinishReason, SamplingParams, TokenLogprob, Usage};

/// `stop` may be one string or a list.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum StopSpec {
    One(String),
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling fields shared by chat and text completions, parsed from the same body as the
/// endpoint's own fields (not flattened into them, so errors can name the bad field).
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
pub struct SamplingFields {
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub seed: Option<i64>,
    pub stop: Option<StopSpec>,
    pub frequency_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub repeat_penalty: Option<f64>,
    pub logit_bias: Option<BTreeMap<String, f64>>,
    pub n: Option<i64>,
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub response_format: Option<Value>,
    /// opta-lmx extension: this request's speculation (`off`, `ngram`, `draft`) instead of
    /// the model's; `draft` needs a model loaded with a draft.
    pub speculation: Option<Speculation>,
    /// vLLM's scheduling priority (lower runs first), which OpenClaw sends to local servers.
    pub priority: Option<i64>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub struct ChatCompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<Value>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    /// `false`: at most one tool call per answer.
    pub parallel_tool_calls: Option<bool>,
}

/// `prompt` of a text completion: text or token ids.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum PromptSpec {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<i32>),
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub struct CompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub prompt: PromptSpec,
    #[serde(default)]
    pub echo: bool,
    pub suffix: Option<String>,
}

/// What the engine needs from the sampling fields, validated.
#[derive(Debug, Clone)]
pub struct ValidatedSampling {
    pub params: SamplingParams,
    /// Explicit completion limit, if the client set one.
    pub max_tokens: Option<u32>,
    pub stop: Vec<String>,
    /// JSON output the client asked for with `response_format`.
    pub constraint: Option<Constraint>,
    /// Alternatives per token when log-probabilities were asked for.
    pub logprobs: Option<u8>,
    /// The request's own speculation mode, if it names one.
    pub speculation: Option<Speculation>,
    /// The body's `priority`, if it names one (the `x-priority` header and the client's
    /// default apply otherwise).
    pub priority: Option<crate::engine::admission::Priority>,
    /// Choices to generate for the one prompt.
    pub n: u32,
    pub stream: bool,
    pub include_usage: bool,
}

fn range(param: &str, v: Option<f64>, lo: f64, hi: f64) -> Result<Option<f32>, ApiError> {
    match v {
        None => Ok(None),
        Some(x) if x.is_finite() && x >= lo && x <= hi => Ok(Some(x as f32)),
        Some(x) => Err(ApiError::invalid(
            param,
            format!("{param} must be between {lo} and {hi}, got {x}"),
        )),
    }
}

impl SamplingFields {
    /// Checks ranges and unsupported options; defaults come from [`SamplingParams::default`].
    pub fn validate(&self) -> Result<ValidatedSampling, ApiError> {
        let d = SamplingParams::default();
        // Checked against the model's sequences once the model is known.
        let n = match self.n {
            None => 1,
            Some(n) if (1..=256).contains(&n) => n as u32,
            Some(n) => {
                return Err(ApiError::invalid(
                    "n",
                    format!("n must be between 1 and the model's parallel sequences, got {n}"),
                ))
            }
        };
        // Chat: `logprobs: true` and `top_logprobs: k`. Legacy completions: `logprobs: k`.
        let legacy = match &self.logprobs {
            Some(Value::Number(k)) => match k.as_u64().filter(|k| *k <= 20) {
                Some(k) => Some(k as u8),
                None => {
                    return Err(ApiError::invalid(
                        "logprobs",
                        format!("logprobs must be between 0 and 20, got {k}"),
                    ))
                }
            },
            _ => None,
        };
        let wants_logprobs = match &self.logprobs {
            None | Some(Value::Null) | Some(Value::Bool(false)) => false,
            Some(Value::Bool(true)) | Some(Value::Number(_)) => true,
            Some(_) => {
                return Err(ApiError::invalid(
                    "logprobs",
                    "logprobs must be a boolean (or, for /v1/completions, an integer)",
                ))
            }
        };
        let logprobs = match (wants_logprobs, self.top_logprobs) {
            (false, None) => None,
            (false, Some(_)) => {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    "top_logprobs needs logprobs: true",
                ))
            }
            (true, None) => Some(legacy.unwrap_or(0)),
            (true, Some(n)) if (0..=20).contains(&n) => Some(n as u8),
            (true, Some(n)) => {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    format!("top_logprobs must be between 0 and 20, got {n}"),
                ))
            }
        };
        let constraint = response_format(self.response_format.as_ref())?;
        let max_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            None => None,
            Some(m) if m >= 1 && m <= u32::MAX as i64 => Some(m as u32),
            Some(m) => {
                let param = if self.max_completion_tokens.is_some() {
                    "max_completion_tokens"
                } else {
                    "max_tokens"
                };
                return Err(ApiError::invalid(
                    param,
                    format!("{param} must be a positive integer, got {m}"),
                ));
            }
        };
        let top_k = match self.top_k {
            None => d.top_k,
            Some(k) if (0..=i32::MAX as i64).contains(&k) => k as i32,
            Some(k) => {
                return Err(ApiError::invalid(
                    "top_k",
                    format!("top_k must be 0 or more, got {k}"),
                ))
            }
        };
        let top_p = range("top_p", self.top_p, 0.0, 1.0)?.unwrap_or(d.top_p);
        if top_p <= 0.0 {
            return Err(ApiError::invalid("top_p", "top_p must be greater than 0"));
        }
        let repeat_penalty =
            range("repeat_penalty", self.repeat_penalty, 0.0, 10.0)?.unwrap_or(d.repeat_penalty);
        if repeat_penalty <= 0.0 {
            return Err(ApiError::invalid(
                "repeat_penalty",
                "repeat_penalty must be greater than 0",
            ));
        }
        let stop = match &self.stop {
            None => Vec::new(),
            Some(StopSpec::One(s)) => vec![s.clone()],
            Some(StopSpec::Many(v)) => v.clone(),
        };
        if stop.len() > 16 {
            return Err(ApiError::invalid("stop", "at most 16 stop sequences"));
        }
        let mut logit_bias = Vec::new();
        for (k, v) in self.logit_bias.iter().flatten() {
            let tok: i32 = k.parse().map_err(|_| {
                ApiError::invalid(
                    "logit_bias",
                    format!("logit_bias key `{k}` is not a token id"),
                )
            })?;
            let bias = range("logit_bias", Some(*v), -100.0, 100.0)?.unwrap_or(0.0);
            logit_bias.push((tok, bias));
        }
        Ok(ValidatedSampling {
            params: SamplingParams {
                temperature: range("temperature", self.temperature, 0.0, 2.0)?
                    .unwrap_or(d.temperature),
                top_p,
                top_k,
                min_p: range("min_p", self.min_p, 0.0, 1.0)?.unwrap_or(d.min_p),
                // Any integer is a valid seed; llama.cpp takes 32 bits.
                seed: self.seed.map(|s| s as u32),
                frequency_penalty: range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)?
                    .unwrap_or(d.frequency_penalty),
                presence_penalty: range("presence_penalty", self.presence_penalty, -2.0, 2.0)?
                    .unwrap_or(d.presence_penalty),
                repeat_penalty,
                logit_bias,
                grammar: None,
                grammar_triggers: Vec::new(),
            },
            max_tokens,
            stop,
            constraint,
            logprobs,
            speculation: self.speculation,
            priority: self.priority.map(crate::engine::admission::clamp),
            n,
            stream: self.stream,
            include_usage: self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
        })
    }
}

/// `response_format`: plain text, any JSON object, or JSON matching a schema (enforced by the
/// engine while sampling, so the answer always parses).
fn response_format(rf: Option<&Value>) -> Result<Option<Constraint>, ApiError> {
    let Some(rf) = rf.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let json = |schema| {
        Ok(Some(Constraint {
            schema,
            prefix: String::new(),
            suffix: String::new(),
            param: "response_format",
            repeat: false,
            triggers: Vec::new(),
        }))
    };
    match rf.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => json(serde_json::json!({"type": "object"})),
        Some("json_schema") => match rf.pointer("/json_schema/schema") {
            Some(schema) if schema.is_object() => json(schema.clone()),
            _ => Err(ApiError::invalid(
                "response_format",
                "response_format of type json_schema needs json_schema.schema (an object)",
            )),
        },
        other => Err(ApiError::invalid(
            "response_format",
            format!(
                "response_format type {} is not one of text, json_object, json_schema",
                other.map_or("(missing)".to_string(), |t| format!("`{t}`"))
            ),
        )),
    }
}

impl ChatCompletionRequest {
    /// The chat layer's request, checked field by field (errors name the field).
    pub fn to_chat(&self) -> Result<ChatRequest, ApiError> {
        Ok(ChatRequest {
            messages: parse_messages(&self.messages)?,
            tools: parse_tools(self.tools.as_ref())?,
            tool_choice: parse_tool_choice(self.tool_choice.as_ref())?,
            parallel_tool_calls: self.parallel_tool_calls.unwrap_or(true),
        })
    }
}

/// A JSON object's `type` field, or `""`.
pub fn type_of(v: &Value) -> &str {
    v.get("type").and_then(Value::as_str).unwrap_or("")
}

/// The text of a content given as a string or as a list of typed parts (Responses' items,
/// Anthropic's blocks): parts whose type is in `text_types` are joined by newlines, any other
/// is refused by `refuse(where, its type)`; `null` is empty.
pub fn text_of(
    content: Option<&Value>,
    text_types: &[&str],
    at: &str,
    refuse: fn(String, &str) -> ApiError,
) -> Result<String, ApiError> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut out = Vec::with_capacity(parts.len());
            for (j, p) in parts.iter().enumerate() {
                match type_of(p) {
                    t if text_types.contains(&t) => {
                        out.push(p.get("text").and_then(Value::as_str).unwrap_or_default())
                    }
                    other => return Err(refuse(format!("{at}[{j}]"), other)),
                }
            }
            Ok(out.join("\n"))
        }
        Some(_) => Err(ApiError::invalid(
            at,
            format!("{at} must be a string or a list of content parts"),
        )),
    }
}

fn kind_of(v: Option<&Value>) -> String {
    v.and_then(Value::as_str)
        .map_or("(missing)".into(), |t| format!("`{t}`"))
}

/// OpenAI messages as the chat layer's turns: `developer` is `system`, content parts are
/// joined, parts no model here can take are refused with the part named.
pub fn parse_messages(messages: &[Value]) -> Result<Vec<Message>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| parse_message(i, m))
        .collect()
}

fn parse_message(i: usize, m: &Value) -> Result<Message, ApiError> {
    let param = format!("messages[{i}]");
    let role_text = m
        .get("role")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid(&param, format!("{param}.role is required")))?;
    let role = match role_text {
        "system" | "developer" => Role::System,
        "user" => Role::User,
        "assistant" => Role::Assistant,
        // `function` is the old name of a tool result.
        "tool" | "function" => Role::Tool,
        other => {
            return Err(ApiError::invalid(
                format!("{param}.role"),
                format!(
                    "{param}.role `{other}` is not one of system, developer, user, assistant, tool"
                ),
            ))
        }
    };
    let content = match m.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                let at = format!("{param}.content[{j}]");
                match part.get("type").and_then(Value::as_str) {
                    Some("text") => match part.get("text").and_then(Value::as_str) {
                        Some(t) => texts.push(t),
                        None => {
                            return Err(ApiError::invalid(
                                at.clone(),
                                format!("{at}.text must be a string"),
                            ))
                        }
                    },
                    Some(kind @ ("image_url" | "input_image" | "image" | "input_audio")) => {
                        return Err(ApiError::invalid(
                            at,
                            format!("`{kind}` content parts are not supported: no model served here can see or hear yet; send text parts"),
                        ))
                    }
                    _ => {
                        return Err(ApiError::invalid(
                            at.clone(),
                            format!(
                                "{at}.type {} is not a content part type (text)",
                                kind_of(part.get("type"))
                            ),
                        ))
                    }
                }
            }
            texts.join("\n")
        }
        Some(Value::Null) | None if role == Role::Assistant => String::new(),
        _ => {
            return Err(ApiError::invalid(
                format!("{param}.content"),
                format!("{param}.content must be a string or a list of content parts"),
            ))
        }
    };
    let mut message = Message::text(role, content);
    let text_field = |key: &str| m.get(key).and_then(Value::as_str).map(String::from);
    message.tool_call_id = text_field("tool_call_id");
    message.name = text_field("name").filter(|_| role == Role::Tool);
    if let Some(calls) = m.get("tool_calls").filter(|c| !c.is_null()) {
        let at = format!("{param}.tool_calls");
        let calls = calls
            .as_array()
            .ok_or_else(|| ApiError::invalid(&at, format!("{at} must be a list")))?;
        for (j, c) in calls.iter().enumerate() {
            let f = c.get("function");
            let name = f.and_then(|f| f.get("name")).and_then(Value::as_str);
            let Some(name) = name else {
                return Err(ApiError::invalid(
                    format!("{at}[{j}]"),
                    format!("{at}[{j}].function.name is required"),
                ));
            };
            // Arguments are JSON text; some clients send the object itself.
            let arguments = match f.and_then(|f| f.get("arguments")) {
                Some(Value::String(a)) => a.clone(),
                None | Some(Value::Null) => "{}".into(),
                Some(other) => other.to_string(),
            };
            message.tool_calls.push(ToolCall {
                id: c
                    .get("id")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .into(),
                name: name.into(),
                arguments,
            });
        }
    }
    Ok(message)
}

/// `tools`: function tools, each with a name.
pub fn parse_tools(tools: Option<&Value>) -> Result<Vec<Tool>, ApiError> {
    let Some(tools) = tools.filter(|t| !t.is_null()) else {
        return Ok(Vec::new());
    };
    let list = tools
        .as_array()
        .ok_or_else(|| ApiError::invalid("tools", "tools must be a list"))?;
    list.iter()
        .enumerate()
        .map(|(i, t)| {
            let at = format!("tools[{i}]");
            if t.get("type")
                .and_then(Value::as_str)
                .is_some_and(|k| k != "function")
            {
                return Err(ApiError::invalid(
                    &at,
                    format!(
                        "{at}.type {} is not supported (function)",
                        kind_of(t.get("type"))
                    ),
                ));
            }
            let f = t.get("function").unwrap_or(t);
            let name = f
                .get("name")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty());
            let Some(name) = name else {
                return Err(ApiError::invalid(
                    &at,
                    format!("{at}.function.name is required"),
                ));
            };
            Ok(Tool {
                name: name.into(),
                description: f
                    .get("description")
                    .and_then(Value::as_str)
                    .map(String::from),
                parameters: f
                    .get("parameters")
                    .filter(|p| p.is_object())
                    .cloned()
                    .unwrap_or_else(|| serde_json::json!({"type": "object", "properties": {}})),
            })
        })
        .collect()
}

/// `tool_choice`: `none`, `auto`, `required`, or `{"type":"function","function":{"name":…}}`.
pub fn parse_tool_choice(choice: Option<&Value>) -> Result<ToolChoice, ApiError> {
    let invalid = |m: String| ApiError::invalid("tool_choice", m);
    match choice {
        None | Some(Value::Null) => Ok(ToolChoice::Auto),
        Some(Value::String(s)) => match s.as_str() {
            "none" => Ok(ToolChoice::None),
            "auto" => Ok(ToolChoice::Auto),
            "required" => Ok(ToolChoice::Required),
            other => Err(invalid(format!(
                "tool_choice `{other}` is not one of none, auto, required, or a function"
            ))),
        },
        Some(obj) => obj
            .pointer("/function/name")
            .or_else(|| obj.get("name"))
            .and_then(Value::as_str)
            .map(|n| ToolChoice::Function(n.into()))
            .ok_or_else(|| invalid("tool_choice object needs function.name".into())),
    }
}

/// `choices[].logprobs` of a chat completion (whole, or the tokens of one chunk).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ChoiceLogprobs {
    pub content: Vec<LogprobEntry>,
    pub refusal: Option<Vec<LogprobEntry>>,
}

/// One token's entry in `logprobs.content`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LogprobEntry {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
    pub top_logprobs: Vec<TopLogprob>,
}

/// One alternative in `top_logprobs`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f32,
    pub bytes: Vec<u8>,
}

impl ChoiceLogprobs {
    /// The wire form of the engine's per-token reports, as a JSON value for `logprobs`.
    pub fn value(tokens: Vec<TokenLogprob>) -> Value {
        let content = tokens
            .into_iter()
            .map(|t| LogprobEntry {
                token: t.token.text,
                logprob: t.logprob,
                bytes: t.token.bytes,
                top_logprobs: t
                    .top
                    .into_iter()
                    .map(|(tok, logprob)| TopLogprob {
                        token: tok.text,
                        logprob,
                        bytes: tok.bytes,
                    })
                    .collect(),
            })
            .collect();
        serde_json::to_value(ChoiceLogprobs {
            content,
            refusal: None,
        })
        .unwrap_or(Value::Null)
    }
}

/// `choices[].logprobs` of a legacy text completion: parallel lists per token, and each
/// token's offset in the choice's text.
#[derive(Debug, Default, Serialize, utoipa::ToSchema)]
pub struct TextLogprobs {
    pub tokens: Vec<String>,
    pub token_logprobs: Vec<f32>,
    pub top_logprobs: Vec<BTreeMap<String, f32>>,
    pub text_offset: Vec<usize>,
}

impl TextLogprobs {
    /// The wire form of `tokens`, whose text starts at byte `offset` of the choice's text.
    pub fn value(tokens: Vec<TokenLogprob>, mut offset: usize) -> Value {
        let mut out = TextLogprobs::default();
        for t in tokens {
            out.text_offset.push(offset);
            offset += t.token.text.len();
            out.top_logprobs
                .push(t.top.into_iter().map(|(tok, lp)| (tok.text, lp)).collect());
            out.tokens.push(t.token.text);
            out.token_logprobs.push(t.logprob);
        }
        serde_json::to_value(out).unwrap_or(Value::Null)
    }
}

/// OpenAI's `usage` object.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct UsageBody {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    pub prompt_tokens_details: PromptTokensDetails,
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct PromptTokensDetails {
    pub cached_tokens: u32,
}

impl From<Usage> for UsageBody {
    fn from(u: Usage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.prompt_tokens + u.completion_tokens,
            prompt_tokens_details: PromptTokensDetails {
                cached_tokens: u.cached_tokens,
            },
        }
    }
}

/// The assistant message of a chat completion.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AssistantMessage {
    pub role: &'static str,
    /// `null` when the answer is only tool calls, as OpenAI sends it.
    pub content: Option<String>,
    /// A thinking model's reasoning, kept out of `content`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    /// The same reasoning under the newer name some clients read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<String>,
    pub refusal: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallOut>>,
}

impl AssistantMessage {
    /// The message for a whole answer: `content` is `null` when there are only calls.
    pub fn from_answer(a: crate::chat::answer::WholeAnswer) -> Self {
        let has_calls = !a.calls.is_empty();
        let reasoning = (!a.reasoning.is_empty()).then_some(a.reasoning);
        Self {
            role: "assistant",
            content: (!has_calls || !a.content.is_empty()).then_some(a.content),
            reasoning_content: reasoning.clone(),
            reasoning,
            refusal: None,
            tool_calls: has_calls.then(|| {
                a.calls
                    .into_iter()
                    .map(|c| ToolCallOut {
                        id: c.id,
                        kind: "function",
                        function: FunctionCall {
                            name: c.name,
                            arguments: c.arguments,
                        },
                    })
                    .collect()
            }),
        }
    }
}

/// One tool call of a whole answer.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct ToolCallOut {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub function: FunctionCall,
}

/// A called function: its name and its arguments as JSON text.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct FunctionCall {
    pub name: String,
    pub arguments: String,
}

/// One tool call's part in a streamed chunk: the first carries id, type and name; later ones
/// only argument fragments, under the same index.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ToolCallDelta {
    pub index: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    pub function: FunctionDelta,
}

/// The function part of a [`ToolCallDelta`].
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FunctionDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub arguments: String,
}

/// One choice of a non-streaming chat completion.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ChatChoice {
    pub index: u32,
    pub message: AssistantMessage,
    pub logprobs: Option<Value>,
    pub finish_reason: FinishReason,
}

/// Non-streaming chat completion response.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<ChatChoice>,
    pub usage: UsageBody,
}

/// `delta` of a streamed chat chunk.
#[derive(Debug, Default, Serialize, utoipa::ToSchema)]
pub struct ChatDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Reasoning, under the two names clients read it by.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

/// One choice of a streamed chat chunk.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ChatChunkChoice {
    pub index: u32,
    pub delta: ChatDelta,
    pub logprobs: Option<Value>,
    pub finish_reason: Option<FinishReason>,
}

/// One `chat.completion.chunk` event.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ChatChunk {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<ChatChunkChoice>,
    /// Present (as `null` until the last chunk) only when `include_usage` was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<UsageBody>>,
}

/// One choice of a text completion (whole or streamed).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TextChoice {
    pub text: String,
    pub index: u32,
    pub logprobs: Option<Value>,
    pub finish_reason: Option<FinishReason>,
}

/// `text_completion` response or stream chunk.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TextCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub system_fingerprint: String,
    pub choices: Vec<TextChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<UsageBody>>,
}

/// One entry of `/v1/models`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelObject {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// `llm`, `embedding` or `reranker` (an extension, as LM Studio's lists have it).
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Whether the model is in memory now (an extension; SDKs ignore unknown fields).
    pub loaded: bool,
    pub size_bytes: u64,
    pub quantization: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context_length: Option<u32>,
}

/// `/v1/models` response.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelObject>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(v: Value) -> SamplingFields {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn defaults_and_ranges() {
        let v = fields(json!({})).validate().unwrap();
        assert_eq!(v.params, SamplingParams::default());
        assert_eq!(v.max_tokens, None);
        for bad in [
            json!({"temperature": 3}),
            json!({"top_p": 0}),
            json!({"max_tokens": 0}),
            json!({"max_tokens": -5}),
            json!({"max_completion_tokens": 99999999999i64}),
            json!({"frequency_penalty": 9}),
            json!({"n": 0}),
            json!({"logprobs": 21}),
            json!({"logprobs": -1}),
            json!({"logprobs": "yes"}),
            json!({"top_logprobs": 2}),
            json!({"logprobs": true, "top_logprobs": 21}),
            json!({"logit_bias": {"abc": 1}}),
            json!({"logit_bias": {"5": 500}}),
            json!({"response_format": {"type": "xml"}}),
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
        ] {
            assert!(fields(bad.clone()).validate().is_err(), "{bad}");
        }
        let v = fields(json!({"max_tokens": 5, "max_completion_tokens": 7, "stop": "x", "seed": -1, "stream": true, "stream_options": {"include_usage": true}}))
            .validate()
            .unwrap();
        assert_eq!(v.max_tokens, Some(7));
        assert_eq!(v.stop, ["x"]);
        assert_eq!(v.params.seed, Some(u32::MAX));
        assert!(v.stream && v.include_usage);
        // The legacy completions form: `logprobs: k`.
        assert_eq!(
            fields(json!({"logprobs": 3})).validate().unwrap().logprobs,
            Some(3)
        );
        let v = fields(json!({"response_format": {"type": "json_object"}}))
            .validate()
            .unwrap();
        assert_eq!(v.constraint.unwrap().schema, json!({"type": "object"}));
        let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let v = fields(json!({"response_format": {"type": "json_schema",
            "json_schema": {"name": "s", "strict": true, "schema": schema}}}))
        .validate()
        .unwrap();
        assert_eq!(v.constraint.unwrap().schema, schema);
    }

    #[test]
    fn message_checks() {
        let parse = parse_messages;
        assert!(parse(&[]).is_err());
        assert!(parse(&[json!({"role": "wizard", "content": "x"})]).is_err());
        assert!(parse(&[json!({"role": "user"})]).is_err());
        assert!(parse(&[json!({"role": "user", "content": 5})]).is_err());
        let image = json!({"role": "user", "content": [{"type": "text", "text": "what is this"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]});
        let e = parse(&[image]).unwrap_err();
        assert!(
            e.to_string()
                .contains("`image_url` content parts are not supported"),
            "{e}"
        );
        assert_eq!(e.detail().param.as_deref(), Some("messages[0].content[1]"));
        assert!(parse(&[json!({"role": "user", "content": [{"type": "text"}]})]).is_err());
        assert!(parse(&[json!({"role": "user", "content": [{"type": "video"}]})]).is_err());
        let ok = parse(&[
            json!({"role": "developer", "content": "s"}),
            json!({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}),
            json!({"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "read_file", "arguments": {"path": "x"}}}]}),
            json!({"role": "tool", "tool_call_id": "call_1", "content": "file"}),
        ])
        .unwrap();
        assert_eq!(ok[0], Message::text(Role::System, "s"));
        assert_eq!(ok[1].content, "a\nb");
        assert_eq!(ok[2].tool_calls[0].arguments, r#"{"path":"x"}"#);
        assert_eq!(ok[3].tool_call_id.as_deref(), Some("call_1"));
    }

    #[test]
    fn tools_and_tool_choice() {
        let tools = json!([{"type": "function", "function": {"name": "f", "description": "d"}}]);
        let t = parse_tools(Some(&tools)).unwrap();
        assert_eq!(
            (t[0].name.as_str(), t[0].parameters["type"].as_str()),
            ("f", Some("object"))
        );
        let e = parse_tools(Some(&json!([{"type": "function", "function": {}}]))).unwrap_err();
        assert_eq!(e.detail().param.as_deref(), Some("tools[0]"));
        assert_eq!(parse_tool_choice(None).unwrap(), ToolChoice::Auto);
        assert_eq!(
            parse_tool_choice(Some(&json!("none"))).unwrap(),
            ToolChoice::None
        );
        assert_eq!(
            parse_tool_choice(Some(
                &json!({"type": "function", "function": {"name": "f"}})
            ))
            .unwrap(),
            ToolChoice::Function("f".into())
        );
        assert!(parse_tool_choice(Some(&json!("sometimes"))).is_err());
        assert!(parse_tool_choice(Some(&json!({"type": "function"}))).is_err());
    }

    #[test]
    fn usage_and_chunk_shapes() {
        let u: UsageBody = Usage {
            prompt_tokens: 3,
            completion_tokens: 4,
            cached_tokens: 1,
        }
        .into();
        assert_eq!(
            serde_json::to_value(&u).unwrap(),
            json!({"prompt_tokens":3,"completion_tokens":4,"total_tokens":7,"prompt_tokens_details":{"cached_tokens":1}})
        );
        let chunk = ChatChunk {
            id: "c".into(),
            object: "chat.completion.chunk",
            created: 1,
            model: "m".into(),
            system_fingerprint: "fp".into(),
            choices: vec![],
            usage: Some(None),
        };
        assert_eq!(serde_json::to_value(&chunk).unwrap()["usage"], Value::Null);
    }
}
