//! Server-sent events for a running generation: each dialect's formatter turns engine pieces
//! into events, and its [`Framing`] says how a stream ends (OpenAI's `data: [DONE]`) and how a
//! mid-stream failure is told. Comment keep-alives stop proxies and SDK timeouts from cutting
//! a stream that is waiting on a long prefill.
//!
//! The stream reads the engine's channel directly: when the client hangs up, axum drops the
//! stream, the channel closes, and the scheduler frees the sequence on its next step.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::stream::{self, Stream, StreamExt};

use super::error::ApiError;
use super::generate::ChoiceEvents;
use super::AppState;
use crate::engine::{Event, FinishReason, TokenLogprob, Usage};

/// A moment in a stream that a chunk formatter turns into JSON.
pub enum Piece {
    /// Before any text (chat sends the assistant role here).
    Start,
    Text(String),
    /// A generated token's log-probability (before its text), when asked for.
    Logprob(TokenLogprob),
    Finish(FinishReason),
    /// Final usage, only when the client asked for it.
    Usage(Usage),
}

/// Formats one response's pieces into events, zero or more a piece, for the choice with the
/// given index. Stateful: a chat answer's tool calls are parsed as its text streams.
pub type Formatter = Box<dyn FnMut(u32, Piece) -> Vec<SseEvent> + Send>;

/// How a dialect's stream ends and fails.
#[derive(Clone, Copy)]
pub struct Framing {
    /// OpenAI's chat and completions end with `data: [DONE]`.
    pub done_marker: bool,
    /// The event that tells the client the generation failed.
    pub error: fn(ApiError) -> SseEvent,
}

/// OpenAI chat and completions: `[DONE]` at the end, `data: {"error": {...}}` on failure.
pub const OPENAI: Framing = Framing {
    done_marker: true,
    error: error_event,
};

/// A named event's name and JSON body (Responses and Anthropic name every event).
pub type Named = (&'static str, serde_json::Value);

/// Named events as `event: NAME` / `data: JSON` pairs.
pub fn named(events: Vec<Named>) -> Vec<SseEvent> {
    events
        .into_iter()
        .map(|(name, body)| SseEvent::default().event(name).data(body.to_string()))
        .collect()
}

/// A `data:`-only event.
pub fn data(json: String) -> SseEvent {
    SseEvent::default().data(json)
}

/// Every choice's events, tagged with the choice's index. Dropping it drops every receiver,
/// which cancels every choice's sequence.
type Merged = stream::SelectAll<stream::BoxStream<'static, (u32, Event)>>;

enum State {
    Start(Merged, Formatter),
    Running {
        events: Merged,
        format: Formatter,
        /// Choices still generating.
        left: u32,
        /// Usage over the choices: the prompt once, completions added up.
        usage: Option<Usage>,
    },
    Ended,
}

/// Builds the SSE response for a running generation of one or more choices.
pub(super) fn stream_response(
    choices: Vec<ChoiceEvents>,
    include_usage: bool,
    format: Formatter,
    framing: Framing,
    state: &AppState,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let keepalive = Duration::from_secs_f64(state.config().server.sse_keepalive_seconds);
    let count = choices.len() as u32;
    let merged: Merged = stream::select_all(
        choices
            .into_iter()
            .enumerate()
            .map(|(i, rx)| rx.map(move |ev| (i as u32, ev)).boxed()),
    );
    let s = stream::unfold(State::Start(merged, format), move |state| async move {
        match state {
            State::Start(events, mut format) => {
                let out: Vec<_> = (0..count).flat_map(|i| format(i, Piece::Start)).collect();
                let next = State::Running {
                    events,
                    format,
                    left: count,
                    usage: None,
                };
                Some((out, next))
            }
            State::Running {
                mut events,
                mut format,
                left,
                usage,
            } => match events.next().await {
                Some((i, ev @ (Event::Text(_) | Event::Logprob(_)))) => {
                    let piece = match ev {
                        Event::Text(t) => Piece::Text(t),
                        Event::Logprob(lp) => Piece::Logprob(lp),
                        _ => unreachable!("matched above"),
                    };
                    let out = format(i, piece);
                    Some((
                        out,
                        State::Running {
                            events,
                            format,
                            left,
                            usage,
                        },
                    ))
                }
                Some((
                    i,
                    Event::Done {
                        finish_reason,
                        usage: u,
                        ..
                    },
                )) => {
                    let usage = Some(match usage {
                        None => u,
                        Some(sum) => Usage {
                            completion_tokens: sum.completion_tokens + u.completion_tokens,
                            ..sum
                        },
                    });
                    let mut out = format(i, Piece::Finish(finish_reason));
                    if left > 1 {
                        return Some((
                            out,
                            State::Running {
                                events,
                                format,
                                left: left - 1,
                                usage,
                            },
                        ));
                    }
                    if let (true, Some(u)) = (include_usage, usage) {
                        out.extend(format(0, Piece::Usage(u)));
                    }
                    if framing.done_marker {
                        out.push(data("[DONE]".into()));
                    }
                    Some((out, State::Ended))
                }
                Some((_, Event::Error(e))) => {
                    Some((vec![(framing.error)(ApiError::from(e))], State::Ended))
                }
                None => Some((
                    vec![(framing.error)(ApiError::Internal(
                        "generation ended unexpectedly".into(),
                    ))],
                    State::Ended,
                )),
            },
            State::Ended => None,
        }
    })
    .flat_map(|events| stream::iter(events.into_iter().map(Ok)));
    Sse::new(s).keep_alive(KeepAlive::new().interval(keepalive).text("keep-alive"))
}

/// The mid-stream error event: the same `error` object as an error response body.
fn error_event(e: ApiError) -> SseEvent {
    let body = serde_json::json!({ "error": e.detail() });
    SseEvent::default().data(body.to_string())
}
