//! Server-sent events in OpenAI's framing: `data: {json}\n\n` per chunk, `data: [DONE]\n\n` at
//! the end, a structured `{"error":{...}}` event if generation fails mid-stream, and comment
//! keep-alives so proxies and SDK timeouts do not cut a stream that is waiting on a long prefill.
//!
//! The stream reads the engine's channel directly: when the client hangs up, axum drops the
//! stream, the channel closes, and the scheduler frees the sequence on its next step.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::stream::{self, Stream, StreamExt};
use tokio::sync::mpsc::UnboundedReceiver;

use super::error::ApiError;
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

/// Formats one response's pieces into chunk JSON, zero or more chunks a piece. Stateful: a
/// chat answer's tool calls are parsed as its text streams.
pub type Formatter = Box<dyn FnMut(Piece) -> Vec<String> + Send>;

enum State {
    Start(UnboundedReceiver<Event>, Formatter),
    Running(UnboundedReceiver<Event>, Formatter),
    Ended,
}

/// Builds the SSE response for a running generation.
pub fn stream_response(
    events: UnboundedReceiver<Event>,
    include_usage: bool,
    format: Formatter,
    state: &AppState,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let metrics = state.metrics.clone();
    let keepalive = Duration::from_secs_f64(state.config.server.sse_keepalive_seconds);
    let data = |s: String| SseEvent::default().data(s);
    let s = stream::unfold(State::Start(events, format), move |state| {
        let metrics = metrics.clone();
        async move {
            match state {
                State::Start(rx, mut format) => {
                    let out: Vec<_> = format(Piece::Start).into_iter().map(data).collect();
                    Some((out, State::Running(rx, format)))
                }
                State::Running(mut rx, mut format) => match rx.recv().await {
                    Some(Event::Text(t)) => {
                        let out = format(Piece::Text(t)).into_iter().map(data).collect();
                        Some((out, State::Running(rx, format)))
                    }
                    Some(Event::Logprob(lp)) => {
                        let out = format(Piece::Logprob(lp)).into_iter().map(data).collect();
                        Some((out, State::Running(rx, format)))
                    }
                    Some(Event::Done {
                        finish_reason,
                        usage,
                        time_to_first_token,
                        total_time,
                    }) => {
                        metrics.record_completion(&usage, time_to_first_token, total_time);
                        let mut out: Vec<_> = format(Piece::Finish(finish_reason))
                            .into_iter()
                            .map(data)
                            .collect();
                        if include_usage {
                            out.extend(format(Piece::Usage(usage)).into_iter().map(data));
                        }
                        out.push(data("[DONE]".into()));
                        Some((out, State::Ended))
                    }
                    Some(Event::Error(e)) => {
                        Some((vec![error_event(ApiError::from(e))], State::Ended))
                    }
                    None => Some((
                        vec![error_event(ApiError::Internal(
                            "generation ended unexpectedly".into(),
                        ))],
                        State::Ended,
                    )),
                },
                State::Ended => None,
            }
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
