//! `GET /admin/events`: the admin event stream as server-sent events (the coding CLI's
//! `/events`). Each event is named by its type and carries `{event_type, timestamp, data}`;
//! the first, `connected`, says the subscription is live; a client that falls more than
//! [`crate::metrics::events::CAPACITY`] events behind gets `events_missed` with the count
//! instead of the events, so a slow reader never holds more than that.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::{stream, Stream, StreamExt};
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;

use crate::api::AppState;

/// `GET /admin/events`.
pub async fn events(
    State(state): State<AppState>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let rx = state.metrics.events().subscribe();
    let connected = Event::default()
        .event("connected")
        .data(serde_json::json!({"event_type": "connected"}).to_string());
    let live = BroadcastStream::new(rx).map(|r| {
        Ok(match r {
            Ok(e) => Event::default()
                .event(e.event_type)
                .data(serde_json::to_string(&e).unwrap_or_default()),
            Err(BroadcastStreamRecvError::Lagged(n)) => Event::default()
                .event("events_missed")
                .data(serde_json::json!({"event_type": "events_missed", "missed": n}).to_string()),
        })
    });
    Sse::new(stream::once(async { Ok(connected) }).chain(live))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
