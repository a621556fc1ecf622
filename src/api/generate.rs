//! What chat and text completions share: the generation request from validated fields, the
//! `n` choices submitted together, and collecting whole answers.

use axum::extract::Request;
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc::UnboundedReceiver;

use super::error::ApiError;
use super::types::*;
use super::{from_value, parse_json, read_body, AppState};
use crate::chat::prompt::PromptLimits;
use crate::engine::{
    EngineError, Event, FinishReason, GenerationRequest, TokenId, TokenLogprob, Usage,
};
use crate::models::registry::{LoadedModel, ModelLease};

pub(super) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
pub(super) fn fingerprint() -> String {
    format!("opta-lmx-{}", env!("CARGO_PKG_VERSION"))
}
/// Checks the prompt against the context and picks the completion budget. A `max_tokens`
/// beyond what the context has left is clamped, as LM Studio and llama-server do: clients
/// (the coding CLI among them) compute it from an estimate of the prompt, and the generation
/// simply stops at the context's end with `finish_reason: "length"`. Only a prompt that does
/// not fit at all is refused.
pub(super) fn generation_request(
    model: &LoadedModel,
    prompt: Vec<TokenId>,
    v: &ValidatedSampling,
) -> Result<GenerationRequest, ApiError> {
    super::embeddings::require_kind(model, "chat or text generation", |k| {
        k == crate::engine::ModelKind::Chat
    })?;
    let context = model.engine.info().context_per_sequence;
    let prompt_len = prompt.len() as u32;
    if prompt.is_empty() {
        return Err(ApiError::invalid("prompt", "the prompt is empty"));
    }
    if prompt_len >= context {
        return Err(EngineError::ContextLength {
            context,
            prompt: prompt_len,
            completion: None,
        }
        .into());
    }
    let left = context - prompt_len;
    let max_tokens = v.max_tokens.map_or(left, |m| m.min(left));
    Ok(GenerationRequest {
        prompt,
        max_tokens,
        stop: v.stop.clone(),
        sampling: v.params.clone(),
        constraint: v.constraint.clone(),
        logprobs: v.logprobs,
        speculation: v.speculation,
        priority: v.priority,
        client: None,
    })
}
/// Everything a finished non-streaming generation produced.
pub(super) struct Collected {
    pub(super) text: String,
    /// Per-token log-probabilities, when asked for.
    pub(super) logprobs: Vec<TokenLogprob>,
    pub(super) finish_reason: FinishReason,
    pub(super) usage: Usage,
}
pub(super) async fn collect(mut rx: ChoiceEvents) -> Result<Collected, ApiError> {
    let mut text = String::new();
    let mut logprobs = Vec::new();
    while let Some(ev) = rx.next().await {
        match ev {
            Event::Text(t) => text.push_str(&t),
            Event::Logprob(lp) => logprobs.push(lp),
            Event::Done {
                finish_reason,
                usage,
                ..
            } => {
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
pub(super) fn prompt_limits(state: &AppState, model: &LoadedModel) -> PromptLimits {
    let r = &state.config().requests;
    let context = model.engine.info().context_per_sequence as usize;
    PromptLimits {
        max_messages: r.max_messages,
        max_chars: r.max_prompt_chars.unwrap_or(context * 32),
        special_in_content: r.special_tokens_in_content,
    }
}
/// Reads a completion request's body and parses it into the endpoint's own fields and the
/// validated sampling fields, then runs `convert` on the former: CPU work on request data, so
/// off the runtime.
/// A body whose `model` names a preset becomes the preset's request first, in the dialect's
/// `fields` (see [`crate::presets::apply`]).
pub(super) async fn parse_request<R: DeserializeOwned + Send + 'static, T: Send + 'static>(
    state: &AppState,
    request: Request,
    fields: crate::presets::Fields,
    convert: fn(R) -> Result<T, ApiError>,
) -> Result<(T, ValidatedSampling), ApiError> {
    let bytes = read_body(request, state).await?;
    let config = state.config();
    state
        .off_runtime(move |_| {
            let body: serde_json::Value = parse_json(&bytes)?;
            parse_value(&config, body, fields, convert)
        })
        .await?
}

/// [`parse_request`] of a body already read as JSON (the WebSocket's `chat.request`).
pub(super) fn parse_value<R: DeserializeOwned, T>(
    config: &crate::config::Config,
    body: serde_json::Value,
    fields: crate::presets::Fields,
    convert: fn(R) -> Result<T, ApiError>,
) -> Result<(T, ValidatedSampling), ApiError> {
    let body = crate::presets::apply(&config.presets, body, fields);
    let req: R = from_value(&body)?;
    let v = from_value::<SamplingFields>(&body)?.validate()?;
    Ok((convert(req)?, v))
}
/// Submits the `n` choices of one request: the same prompt (the scheduler shares its KV
/// between them), each its own sequence, seeds `seed + i` so seeded choices differ and
/// repeat. If one cannot be queued the others are dropped (and so cancelled) with it. A
/// request with constrained output builds its grammar in `submit`: CPU work that grows with
/// the schema, so on the blocking pool, never on the async runtime.
pub(super) async fn submit_choices(
    state: &AppState,
    model: &ModelLease,
    gen: GenerationRequest,
    n: u32,
) -> Result<Vec<ChoiceEvents>, ApiError> {
    let parallel = model.engine.info().parallel;
    if n > parallel {
        return Err(ApiError::invalid(
            "n",
            format!("n is {n}, more than the {parallel} sequences this model is loaded with"),
        ));
    }
    // Who asked and how urgently: the body's `priority` first, then `x-priority`.
    let mut gen = gen;
    let mut meter = None;
    if let Some(caller) = super::caller::current() {
        if let Some(cap) = caller.max_queued {
            let held = model.engine.held();
            let running = held.iter().filter(|h| h.running).count() as u32;
            let queued = held
                .iter()
                .filter(|h| !h.running && h.client == caller.client)
                .count() as u32;
            // With every sequence busy this one would wait too: past its cap, the client
            // hears so at once.
            if queued >= cap && running >= parallel {
                state
                    .metrics
                    .prometheus()
                    .record_client_refused(&caller.client);
                return Err(ApiError::RateLimited {
                    message: format!(
                        "client `{}` has {queued} requests waiting for `{}`, its limit is {cap} \
                         (clients[].max_queued); retry when one has started",
                        caller.client, model.id
                    ),
                    retry_after_secs: 1,
                });
            }
        }
        gen.priority = caller.priority_for(gen.priority);
        gen.client = Some(caller.client);
        meter = caller.meter;
    }
    let constrained = gen.constraint.is_some();
    let engine = std::sync::Arc::clone(&model.engine);
    let (metrics, id) = (state.metrics.clone(), model.id.clone());
    let submit = move || -> Result<Vec<ChoiceEvents>, ApiError> {
        (0..n)
            .map(|i| {
                let mut g = gen.clone();
                g.sampling.seed = g.sampling.seed.map(|s| s.wrapping_add(i));
                let rx = engine.submit(g).map_err(|e| {
                    if matches!(e, EngineError::QueueFull { .. }) {
                        metrics.prometheus().record_rejected(&id);
                    }
                    ApiError::from(e)
                })?;
                Ok(ChoiceEvents {
                    rx,
                    metrics: metrics.clone(),
                    model: id.clone(),
                    ended: false,
                    // The prompt is counted once, with the first choice.
                    meter: meter.clone().map(|m| (m, i == 0)),
                    answer: None,
                })
            })
            .collect()
    };
    if constrained {
        state.off_runtime(move |_| submit()).await?
    } else {
        submit()
    }
}

/// One choice's engine events. Every finished generation passes through here, streamed or
/// not, so this is the one place completions are counted in the metrics. Dropping it closes
/// the channel, which cancels the choice's sequence (counted as a cancellation unless the
/// generation had ended).
pub(super) struct ChoiceEvents {
    rx: UnboundedReceiver<Event>,
    metrics: crate::metrics::Metrics,
    model: String,
    /// A `Done` or `Error` was seen: dropping now cancels nothing.
    ended: bool,
    /// The client's token meter (`tokens_per_minute`), and whether this choice counts the
    /// prompt too.
    meter: Option<(std::sync::Arc<super::caller::TokenMeter>, bool)>,
    /// The answer read as the dialect reads it, when tools were offered: an answer that ended
    /// in calls is counted as `tool_calls`, the finish the client was sent.
    answer: Option<crate::chat::answer::AnswerStream>,
}

impl ChoiceEvents {
    /// Reads the answer's tool calls as `spec` does, for the finish reason counted.
    pub(super) fn reading_calls(mut self, spec: &crate::chat::answer::AnswerSpec) -> Self {
        self.answer = spec.tools.is_some().then(|| spec.stream());
        self
    }
}

/// Every choice of a chat request reads its calls as `spec` does (see
/// [`ChoiceEvents::reading_calls`]).
pub(super) fn reading_calls(
    rxs: Vec<ChoiceEvents>,
    spec: &crate::chat::answer::AnswerSpec,
) -> Vec<ChoiceEvents> {
    rxs.into_iter().map(|r| r.reading_calls(spec)).collect()
}

impl Drop for ChoiceEvents {
    fn drop(&mut self) {
        if !self.ended {
            self.metrics.prometheus().record_cancelled(&self.model);
        }
    }
}

impl futures_util::Stream for ChoiceEvents {
    type Item = Event;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Event>> {
        let polled = self.rx.poll_recv(cx);
        match &polled {
            std::task::Poll::Ready(Some(Event::Text(t))) => {
                if let Some(a) = self.answer.as_mut() {
                    a.push(t);
                }
            }
            std::task::Poll::Ready(Some(Event::Done {
                usage,
                time_to_first_token,
                total_time,
                finish_reason,
            })) => {
                let calls = self.answer.as_mut().is_some_and(|a| {
                    a.finish();
                    a.calls() > 0
                });
                let finish = crate::chat::answer::finish_reason(*finish_reason, calls);
                self.metrics.record_completion(
                    &self.model,
                    finish.as_str(),
                    usage,
                    *time_to_first_token,
                    *total_time,
                );
                if let Some((meter, with_prompt)) = &self.meter {
                    let prompt = if *with_prompt { usage.prompt_tokens } else { 0 };
                    let tokens = u64::from(prompt) + u64::from(usage.completion_tokens);
                    meter.add(tokens, std::time::Instant::now());
                }
                self.ended = true;
            }
            std::task::Poll::Ready(Some(Event::Error(_)) | None) => self.ended = true,
            _ => {}
        }
        polled
    }
}
/// Collects every choice whole; usage counts the prompt once and every choice's tokens.
pub(super) async fn collect_choices(
    rxs: Vec<ChoiceEvents>,
) -> Result<(Vec<Collected>, Usage), ApiError> {
    let outs = futures_util::future::join_all(rxs.into_iter().map(collect))
        .await
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    let mut usage = outs.first().map(|o| o.usage).unwrap_or_default();
    usage.completion_tokens = outs.iter().map(|o| o.usage.completion_tokens).sum();
    Ok((outs, usage))
}
