//! Who is asking, and how urgently: the configured client whose key a request carries, else
//! the client it names (`X-Client-ID`, or OpenClaw's `x-openclaw-agent-id`); the priority its
//! `x-priority` header asks for, else its client's default; and, for a client with
//! `max_requests`, a place among its requests in flight, and for one with `tokens_per_minute`,
//! its tokens over the last minute (429 with `Retry-After` past either, for that client only).
//! A configured key's first request since start is audited with its client's name. Both
//! reach the
//! engine's admission (see [`crate::engine::admission`]) through [`submit_choices`], which
//! every generating dialect calls: the handler runs inside [`identify`]'s scope, so no handler
//! has to pass them along.
//!
//! Names are bounded: the first [`MAX_NAMES`] distinct ones are kept, later ones fold into
//! `other`, so ten thousand made-up ids cannot grow the server's memory or its labels.
//!
//! [`submit_choices`]: super::generate::submit_choices

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// Where its tokens are counted, for a client with `tokens_per_minute`.
    pub meter: Option<Arc<TokenMeter>>,
    /// Its `max_queued`: most of its requests waiting on one model.
    pub max_queued: Option<u32>,
}

/// The window `tokens_per_minute` counts over.
const MINUTE: Duration = Duration::from_secs(60);

/// A client's tokens over the last minute: each finished generation adds its prompt and
/// generated tokens; a request that finds the sum at the cap waits until enough age out.
#[derive(Debug, Default)]
pub struct TokenMeter(Mutex<VecDeque<(Instant, u64)>>);

impl TokenMeter {
    /// Counts `tokens` used at `now`.
    pub fn add(&self, tokens: u64, now: Instant) {
        if tokens == 0 {
            return;
        }
        let mut used = self.0.lock().expect("meter lock");
        used.push_back((now, tokens));
        while used
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) >= MINUTE)
        {
            used.pop_front();
        }
    }

    /// `None` while the last minute's tokens are under `cap`; else how long until enough
    /// of them age out that they are, and how many there are.
    pub fn wait(&self, cap: u64, now: Instant) -> Option<(Duration, u64)> {
        let used = self.0.lock().expect("meter lock");
        let recent = || {
            used.iter()
                .filter(|(t, _)| now.saturating_duration_since(*t) < MINUTE)
        };
        let total: u64 = recent().map(|(_, n)| n).sum();
        if total < cap {
            return None;
        }
        let mut left = total;
        for (t, n) in recent() {
            left -= n;
            if left < cap {
                return Some(((*t + MINUTE).saturating_duration_since(now), total));
            }
        }
        Some((MINUTE, total))
    }
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
    /// Token meters per configured client with a `tokens_per_minute`.
    meters: Mutex<HashMap<String, Arc<TokenMeter>>>,
    /// Configured clients whose key has been used since start (audited once each).
    keys_used: Mutex<HashSet<String>>,
}

/// One of a client's requests in flight; dropping it (the response's end) frees the place.
pub struct InFlight(Arc<AtomicU32>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ClientNames {
    /// The token meter of a configured client.
    pub fn meter(&self, client: &str) -> Arc<TokenMeter> {
        Arc::clone(
            self.meters
                .lock()
                .expect("meters lock")
                .entry(client.to_string())
                .or_default(),
        )
    }

    /// Whether this is the first request with `client`'s key since start.
    fn first_use(&self, client: &str) -> bool {
        self.keys_used
            .lock()
            .expect("keys lock")
            .insert(client.to_string())
    }

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
        meter: None,
        max_queued: configured.and_then(|c| c.max_queued),
    }
}

/// Route layer of every inference route: runs the handler with its [`Caller`] in scope, and
/// holds a capped client's place until the response's last byte (a stream's end).
pub async fn identify(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let config = state.config();
    let configured = super::auth::client_of_key(&config, req.headers());
    let mut caller = from_headers(&state.clients, configured, req.headers());
    super::observe::note_caller(&caller.client);
    if let Some(c) = configured.filter(|c| state.clients.first_use(&c.name)) {
        super::observe::audit_client(&state, &req, "client_key_used", "ok", &c.name, None);
    }
    // Caps gate the requests that make work; a capped client may still read its queue and
    // the model list.
    let configured_caps = configured.filter(|_| req.method() == axum::http::Method::POST);
    let refuse = |message: String, retry_after_secs: u32| {
        state
            .metrics
            .prometheus()
            .record_client(&caller.client, true);
        super::observe::audit_client(
            &state,
            &req,
            "client_limited",
            "refused",
            &caller.client,
            Some(429),
        );
        ApiError::RateLimited {
            message,
            retry_after_secs,
        }
        .into_response()
    };
    if let Some(cap) = configured_caps.and_then(|c| c.tokens_per_minute) {
        let meter = state.clients.meter(&caller.client);
        if let Some((wait, used)) = meter.wait(cap, Instant::now()) {
            let secs = wait.as_secs_f64().ceil().max(1.0) as u32;
            return refuse(
                format!(
                    "client `{}` used {used} tokens in the last minute, its limit is {cap} \
                     (clients[].tokens_per_minute); retry in {secs} s",
                    caller.client
                ),
                secs,
            );
        }
        caller.meter = Some(meter);
    }
    let place = match configured_caps.and_then(|c| c.max_requests) {
        None => None,
        Some(max) => match state.clients.enter(&caller.client, max) {
            Some(p) => Some(p),
            None => {
                return refuse(
                    format!(
                        "client `{}` has {max} requests in flight, its limit \
                         (clients[].max_requests); retry when one has finished",
                        caller.client
                    ),
                    1,
                );
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
    fn the_token_meter_counts_one_minute_and_says_when_room_comes_back() {
        let m = TokenMeter::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        m.add(40, at(0));
        m.add(30, at(10));
        assert_eq!(m.wait(100, at(20)), None);
        m.add(50, at(20));
        // 120 used; under 100 once the first 40 age out, at 60 s.
        assert_eq!(m.wait(100, at(30)), Some((Duration::from_secs(30), 120)));
        // Under 51 needs the first two gone: at 70 s.
        assert_eq!(m.wait(51, at(30)), Some((Duration::from_secs(40), 120)));
        assert_eq!(m.wait(100, at(61)), None);
        assert_eq!(m.wait(1, at(80)), None);
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
