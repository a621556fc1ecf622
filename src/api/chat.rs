//! `POST /v1/chat/completions`: the OpenAI chat dialect. Parses the wire request into the
//! chat layer's [`ChatRequest`], runs the chat pipeline, and encodes the answers whole or as
//! chunks (content, reasoning, tool calls, logprobs) for one or more choices.

use axum::extract::{Request, State};
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::error::ApiError;
use super::generate::*;
use super::sse::{data, stream_response, Piece, OPENAI};
use super::types::*;
use super::AppState;
use crate::chat::answer::{finish_reason, AnswerSpec, AnswerStream};
use crate::chat::pipeline::{self, ChatPlan};
use crate::chat::request::ChatRequest;
use crate::chat::tools::Delta;
use crate::engine::TokenLogprob;

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<AppState>,
    request: Request,
) -> Result<Response, ApiError> {
    let ((model_name, chat), v) = parse_request(
        &state,
        request,
        crate::presets::CHAT,
        |r: ChatCompletionRequest| Ok((r.model.clone(), r.to_chat()?)),
    )
    .await?;
    let model = state.resolve(model_name.as_deref()).await?;
    let (plan, prompt) = prepare_chat(&state, &model, chat, v.constraint.clone()).await?;
    let mut gen = generation_request(&model, prompt, &v)?;
    gen.constraint = plan.constraint;
    model.touch();
    let rxs = submit_choices(&state, &model, gen, v.n).await?;
    let rxs = reading_calls(rxs, &plan.answer);
    let head = ChunkHead {
        id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        created: now_secs(),
        model: model.id.clone(),
    };
    let spec = plan.answer;

    if !v.stream {
        let (outs, usage) = collect_choices(rxs).await?;
        let choices = outs
            .into_iter()
            .enumerate()
            .map(|(i, out)| {
                let answer = spec.whole(&out.text);
                let calls = !answer.calls.is_empty();
                ChatChoice {
                    index: i as u32,
                    message: AssistantMessage::from_answer(answer),
                    logprobs: v.logprobs.map(|_| ChoiceLogprobs::value(out.logprobs)),
                    finish_reason: finish_reason(out.finish_reason, calls),
                }
            })
            .collect();
        return Ok(Json(ChatCompletion {
            id: head.id,
            object: "chat.completion",
            created: head.created,
            model: head.model,
            system_fingerprint: fingerprint(),
            choices,
            usage: usage.into(),
        })
        .into_response());
    }
    let mut encoder = ChunkEncoder::new(head, spec, v.n, v.logprobs.is_some(), v.include_usage);
    let format = Box::new(move |index, piece| encoder.encode(index, piece));
    Ok(stream_response(rxs, v.include_usage, format, OPENAI, &state).into_response())
}

/// Decides the plan and builds the prompt for a chat request: the part every chat dialect
/// shares between parsing its request and submitting to the engine.
pub(super) async fn prepare_chat(
    state: &AppState,
    model: &crate::models::registry::ModelLease,
    chat: ChatRequest,
    response_format: Option<crate::engine::Constraint>,
) -> Result<(ChatPlan, Vec<crate::engine::TokenId>), ApiError> {
    super::embeddings::require_kind(model, "chat or text generation", |k| {
        k == crate::engine::ModelKind::Chat
    })?;
    let mut plan = ChatPlan::new(&chat, model, response_format)
        .map_err(|e| ApiError::invalid("tool_choice", e))?;
    let limits = prompt_limits(state, model);
    let shared = model.shared();
    state
        .off_runtime(move |cancel| {
            let tokens = pipeline::render(&shared, &chat, &mut plan, &limits, cancel)?;
            Ok::<_, ApiError>((plan, tokens))
        })
        .await?
}

/// What every chunk of one response repeats.
struct ChunkHead {
    id: String,
    created: u64,
    model: String,
}

/// Turns one streamed response's pieces into `chat.completion.chunk` JSON: one answer parser
/// per choice (tool calls and reasoning are found as the text streams), and each choice's
/// token log-probabilities, which arrive before their text, carried on its next chunk.
struct ChunkEncoder {
    head: ChunkHead,
    answers: Vec<AnswerStream>,
    pending: Vec<Vec<TokenLogprob>>,
    wants_logprobs: bool,
    include_usage: bool,
}

impl ChunkEncoder {
    fn new(head: ChunkHead, spec: AnswerSpec, n: u32, logprobs: bool, usage: bool) -> Self {
        Self {
            head,
            answers: (0..n).map(|_| spec.stream()).collect(),
            pending: (0..n).map(|_| Vec::new()).collect(),
            wants_logprobs: logprobs,
            include_usage: usage,
        }
    }

    fn encode(&mut self, index: u32, piece: Piece) -> Vec<SseEvent> {
        let i = index as usize;
        let finished = match &piece {
            Piece::Finish(r) => Some(*r),
            _ => None,
        };
        let deltas = match piece {
            Piece::Logprob(lp) => {
                self.pending[i].push(lp);
                return Vec::new();
            }
            Piece::Usage(u) => return self.chunk(Vec::new(), Some(Some(u.into()))),
            Piece::Start => vec![ChatDelta {
                role: Some("assistant"),
                content: Some(String::new()),
                ..ChatDelta::default()
            }],
            Piece::Text(t) => self.answers[i].push(&t).into_iter().map(wire).collect(),
            Piece::Finish(_) => self.answers[i].finish().into_iter().map(wire).collect(),
        };
        let mut out = Vec::new();
        for delta in deltas {
            let choice = self.choice(index, delta, None);
            out.extend(self.chunk(vec![choice], None));
        }
        if let Some(r) = finished {
            let reason = finish_reason(r, self.answers[i].calls() > 0);
            let choice = self.choice(index, ChatDelta::default(), Some(reason));
            out.extend(self.chunk(vec![choice], None));
        }
        out
    }

    fn choice(
        &mut self,
        index: u32,
        delta: ChatDelta,
        finish_reason: Option<crate::engine::FinishReason>,
    ) -> ChatChunkChoice {
        let pending = &mut self.pending[index as usize];
        let logprobs = (self.wants_logprobs && !pending.is_empty())
            .then(|| ChoiceLogprobs::value(std::mem::take(pending)));
        ChatChunkChoice {
            index,
            delta,
            logprobs,
            finish_reason,
        }
    }

    fn chunk(
        &self,
        choices: Vec<ChatChunkChoice>,
        usage: Option<Option<UsageBody>>,
    ) -> Vec<SseEvent> {
        serde_json::to_string(&ChatChunk {
            id: self.head.id.clone(),
            object: "chat.completion.chunk",
            created: self.head.created,
            model: self.head.model.clone(),
            system_fingerprint: fingerprint(),
            choices,
            usage: usage.or(self.include_usage.then_some(None)),
        })
        .ok()
        .map(data)
        .into_iter()
        .collect()
    }
}

/// A parser delta in OpenAI's streamed shape.
fn wire(delta: Delta) -> ChatDelta {
    let call = |index, id: Option<String>, name: Option<String>, arguments| ChatDelta {
        tool_calls: Some(vec![ToolCallDelta {
            index,
            kind: id.as_ref().map(|_| "function"),
            id,
            function: FunctionDelta { name, arguments },
        }]),
        ..ChatDelta::default()
    };
    match delta {
        Delta::Content(c) => ChatDelta {
            content: Some(c),
            ..ChatDelta::default()
        },
        Delta::Reasoning(r) => ChatDelta {
            reasoning_content: Some(r.clone()),
            reasoning: Some(r),
            ..ChatDelta::default()
        },
        Delta::CallStart { index, id, name } => call(index, Some(id), Some(name), String::new()),
        Delta::CallArgs { index, fragment } => call(index, None, None, fragment),
    }
}
