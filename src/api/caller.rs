//! Who is asking, and how urgently: the client a request names (`X-Client-ID`, or OpenClaw's
//! `x-openclaw-agent-id`) and the priority its `x-priority` header asks for. Both reach the
//! engine's admission (see [`crate::engine::admission`]) through [`submit_choices`], which
//! every generating dialect calls: the handler runs inside [`identify`]'s scope, so no handler
//! has to pass them along.
//!
//! Names are bounded: the first [`MAX_NAMES`] distinct ones are kept, later ones fold into
//! `other`, so ten thousand made-up ids cannot grow the server's memory or its labels.
//!
//! [`submit_choices`]: super::generate::submit_choices

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::Response;

use super::AppState;
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
    /// From `x-priority`, when present and readable.
    pub priority: Option<Priority>,
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
}

impl ClientNames {
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

/// The caller a request's headers describe.
pub fn from_headers(names: &ClientNames, headers: &HeaderMap) -> Caller {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let client = header("x-client-id")
        .or_else(|| header("x-openclaw-agent-id"))
        .map_or_else(|| Arc::from(ANONYMOUS), |raw| names.intern(raw.trim()));
    Caller {
        client,
        priority: header("x-priority").and_then(parse_priority),
    }
}

/// Route layer of every inference route: runs the handler with its [`Caller`] in scope.
pub async fn identify(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let caller = from_headers(&state.clients, req.headers());
    super::observe::note_caller(&caller.client);
    CALLER.scope(caller, next.run(req)).await
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
        let c = from_headers(&names, &h);
        assert_eq!((&*c.client, c.priority), (ANONYMOUS, None));
        h.insert("x-openclaw-agent-id", "main".parse().unwrap());
        h.insert("x-priority", "high".parse().unwrap());
        let c = from_headers(&names, &h);
        assert_eq!((&*c.client, c.priority), ("main", Some(-10)));
        h.insert("x-client-id", "opta-cli".parse().unwrap());
        assert_eq!(&*from_headers(&names, &h).client, "opta-cli");
    }
}
