//! Who is asking, and how urgently: the configured client whose key a request carries, else
//! the client it names (`X-Client-ID`, or OpenClaw's `x-openclaw-agent-id`); the priority its
//! `x-priority` header asks for, else its client's default; and, for a client with
//! `max_requests`, a place among its requests in flight (429 with `Retry-After` past it, for
//! that client only). Both reach the
//! engine's admission (see [`crate::engine::admission`]) through [`submit_choices`], which
//! every generating dialect calls: the handler runs inside [`identify`]'s scope, so no handler
//! has to pass them along.
//!
//! Names are bounded: the first [`MAX_NAMES`] distinct ones are kept, later ones fold into
//! `other`, so ten thousand made-up ids cannot grow the server's memory or its labels.
//!
//! [`submit_choices`]: super::generate::submit_choices

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;

use super::error::ApiError;
use super::AppState;
use crate::config::ClientConfig;
use crate::engine::admission::{parse_priority, Priority};

/// Distinct client names kept before the rest fold into [`OTHER`].
pub const MAX_NAMES: usize = 64;
/// The client of requests that name none.
pub const ANONYMOUS: &str = "anonymous";
/// The client of names past [`MAX_NAMES`] or not fit to be a name.
pub const OTHER: &str = "other";

/// The caller of the request being handled.
#[derive(Debug, Clone)]
pub struct Caller {
    pub client: Arc<str>,
    /// From `x-priority`, when present and readable, else the client's configured default.
    pub priority: Option<Priority>,
    /// The best (lowest) priority this client may use; better requests get this.
    pub best: Option<Priority>,
}

impl Caller {
    /// A request's priority: what its body asked for, else [`Caller::priority`], no better
    /// than [`Caller::best`].
    pub fn priority_for(&self, asked: Option<Priority>) -> Option<Priority> {
        let p = asked.or(self.priority);
        match (p, self.best) {
            (Some(p), Some(best)) => Some(p.max(best)),
            (None, Some(best)) if best > 0 => Some(best),
            (p, _) => p,
        }
    }
}

tokio::task_local! {
    static CALLER: Caller;
}

/// The caller of the request this task is handling, if it is inside [`identify`].
pub fn current() -> Option<Caller> {
    CALLER.try_with(Caller::clone).ok()
}

/// The names seen so far, bounded.
#[derive(Debug, Default)]
pub struct ClientNames {
    seen: Mutex<HashSet<Arc<str>>>,
    /// Requests in flight per configured client with a `max_requests`.
    in_flight: Mutex<HashMap<String, Arc<AtomicU32>>>,
}

/// One of a client's requests in flight; dropping it (the response's end) frees the place.
pub struct InFlight(Arc<AtomicU32>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ClientNames {
    /// A place for one more of `client`'s requests, or `None` with `max` in flight.
    pub fn enter(&self, client: &str, max: u32) -> Option<InFlight> {
        let counter = Arc::clone(
            self.in_flight
                .lock()
                .expect("in-flight lock")
                .entry(client.to_string())
                .or_default(),
        );
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| InFlight(counter))
    }

    /// The name to use for `raw`: itself while fewer than [`MAX_NAMES`] are known (or it is
    /// known), else [`OTHER`]; also [`OTHER`] for anything longer than 64 bytes or with
    /// characters outside `[A-Za-z0-9._:@-]`, which logs and labels should not carry.
    pub fn intern(&self, raw: &str) -> Arc<str> {
        let fit = !raw.is_empty()
            && raw.len() <= 64
            && raw
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._:@-".contains(&b));
        if !fit {
            return Arc::from(OTHER);
        }
        let mut seen = self.seen.lock().expect("client names lock");
        if let Some(known) = seen.get(raw) {
            return Arc::clone(known);
        }
        if seen.len() >= MAX_NAMES {
            return Arc::from(OTHER);
        }
        let name: Arc<str> = Arc::from(raw);
        seen.insert(Arc::clone(&name));
        name
    }
}

/// The caller a request describes: the `configured` client its key belongs to, else the one
/// its headers name.
pub fn from_headers(
    names: &ClientNames,
    configured: Option<&ClientConfig>,
    headers: &HeaderMap,
) -> Caller {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let client = match configured {
        Some(c) => Arc::from(c.name.as_str()),
        None => header("x-client-id")
            .or_else(|| header("x-openclaw-agent-id"))
            .map_or_else(|| Arc::from(ANONYMOUS), |raw| names.intern(raw.trim())),
    };
    Caller {
        client,
        priority: header("x-priority")
            .and_then(parse_priority)
            .or(configured.and_then(|c| c.priority)),
        best: configured.and_then(|c| c.best_priority),
    }
}

/// Route layer of every inference route: runs the handler with its [`Caller`] in scope, and
/// holds a capped client's place until the response's last byte (a stream's end).
pub async fn identify(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let configured = super::auth::client_of_key(&state.config, req.headers());
    let caller = from_headers(&state.clients, configured, req.headers());
    super::observe::note_caller(&caller.client);
    let place = match configured.and_then(|c| c.max_requests) {
        None => None,
        Some(max) => match state.clients.enter(&caller.client, max) {
            Some(p) => Some(p),
            None => {
                state
                    .metrics
                    .prometheus()
                    .record_client(&caller.client, true);
                return ApiError::RateLimited {
                    message: format!(
                        "client `{}` has {max} requests in flight, its limit \
                         (clients[].max_requests); retry when one has finished",
                        caller.client
                    ),
                    retry_after_secs: 1,
                }
                .into_response();
            }
        },
    };
    state
        .metrics
        .prometheus()
        .record_client(&caller.client, false);
    let resp = CALLER.scope(caller, next.run(req)).await;
    match place {
        None => resp,
        Some(place) => {
            let (parts, body) = resp.into_parts();
            let body = body.into_data_stream().map(move |chunk| {
                let _held = &place;
                chunk
            });
            Response::from_parts(parts, Body::from_stream(body))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_bounded_and_odd_ones_fold_into_other() {
        let names = ClientNames::default();
        assert_eq!(&*names.intern("bot-1"), "bot-1");
        assert_eq!(&*names.intern("a b"), OTHER);
        assert_eq!(&*names.intern(&"x".repeat(65)), OTHER);
        for i in 0..200 {
            names.intern(&format!("id{i}"));
        }
        assert_eq!(names.seen.lock().unwrap().len(), MAX_NAMES);
        // Known names keep working; new ones fold.
        assert_eq!(&*names.intern("bot-1"), "bot-1");
        assert_eq!(&*names.intern("id199"), OTHER);
    }

    #[test]
    fn headers_name_the_client_and_the_priority() {
        let names = ClientNames::default();
        let mut h = HeaderMap::new();
        let c = from_headers(&names, None, &h);
        assert_eq!((&*c.client, c.priority), (ANONYMOUS, None));
        h.insert("x-openclaw-agent-id", "main".parse().unwrap());
        h.insert("x-priority", "high".parse().unwrap());
        let c = from_headers(&names, None, &h);
        assert_eq!((&*c.client, c.priority), ("main", Some(-10)));
        h.insert("x-client-id", "opta-cli".parse().unwrap());
        assert_eq!(&*from_headers(&names, None, &h).client, "opta-cli");
        // A configured client (by its key) is that client whatever the headers say, with its
        // default priority unless the header asks, and never better than its best.
        let bot = ClientConfig {
            name: "bot".into(),
            priority: Some(5),
            best_priority: Some(0),
            ..ClientConfig::default()
        };
        let c = from_headers(&names, Some(&bot), &h);
        assert_eq!((&*c.client, c.priority), ("bot", Some(-10)));
        assert_eq!(c.priority_for(None), Some(0));
        assert_eq!(c.priority_for(Some(7)), Some(7));
        h.remove("x-priority");
        assert_eq!(
            from_headers(&names, Some(&bot), &h).priority_for(None),
            Some(5)
        );
    }

    #[test]
    fn a_client_holds_at_most_its_places() {
        let names = ClientNames::default();
        let a = names.enter("bot", 2).unwrap();
        let _b = names.enter("bot", 2).unwrap();
        assert!(names.enter("bot", 2).is_none());
        assert!(names.enter("other-bot", 2).is_some());
        drop(a);
        assert!(names.enter("bot", 2).is_some());
    }
}
