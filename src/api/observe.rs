//! Watching the HTTP surface: one structured log line and one Prometheus count per request,
//! the audit line of every admin action, and `/metrics` itself.
//!
//! The route pattern and the serving model are known only deep inside routing and the
//! handlers, while the line is written outside them, so both are left in a per-request
//! [`Notes`] slot held in a task-local: the handler future runs inside the logging
//! middleware's future, on the same task.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::auth::presented_key;
use super::{read_body_of, AppState};
use crate::audit::{fingerprint, AuditEvent};
use crate::metrics::exporter::RequestLabels;

/// What routing and the handler learned about one request.
#[derive(Default)]
struct Notes {
    route: Option<String>,
    model: Option<String>,
    /// The client the request named (see [`super::caller`]), bounded.
    caller: Option<Arc<str>>,
}

tokio::task_local! {
    static NOTES: Arc<Mutex<Notes>>;
}

/// Records the model that serves the current request (for its log line and metrics).
pub fn note_model(id: &str) {
    let _ = NOTES.try_with(|n| n.lock().expect("notes lock").model = Some(id.to_string()));
}

/// Records who sent the current request (for its log line).
pub fn note_caller(name: &Arc<str>) {
    let _ = NOTES.try_with(|n| n.lock().expect("notes lock").caller = Some(Arc::clone(name)));
}

/// Route layer: records the matched route pattern.
pub async fn note_route(req: Request, next: Next) -> Response {
    if let Some(p) = req.extensions().get::<MatchedPath>() {
        let route = p.as_str().to_string();
        let _ = NOTES.try_with(|n| n.lock().expect("notes lock").route = Some(route));
    }
    next.run(req).await
}

/// The client's address, from the listener.
pub(super) fn peer(req: &Request) -> Option<SocketAddr> {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
}

/// Longest path a request log line carries; longer ones are cut (a client chooses them).
pub(crate) const LOGGED_PATH_CHARS: usize = 256;

/// A method as a metric label and in log lines: one of HTTP's own methods, or `other`.
/// hyper accepts any token as a method (100 KB ones too), and every distinct label value is a
/// series kept for good, so a client's invention must fold into one value.
pub(crate) fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "other",
    }
}

/// `s` cut to at most `max` characters, marked when cut.
pub(crate) fn bounded(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_string(),
    }
}

/// Logs method, route, path, status, model, client and time, and counts the request; never
/// bodies or headers (they carry prompts and keys). Every value a client chooses is bounded:
/// the method folds into [`method_label`], the path is cut, the route is a pattern.
pub async fn log_requests(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let method = method_label(req.method());
    let path = bounded(req.uri().path(), LOGGED_PATH_CHARS);
    let client = peer(&req).map(|p| p.ip().to_string()).unwrap_or_default();
    let started = Instant::now();
    let notes = Arc::new(Mutex::new(Notes::default()));
    let resp = NOTES.scope(Arc::clone(&notes), next.run(req)).await;
    let Notes {
        route,
        model,
        caller,
    } = std::mem::take(&mut *notes.lock().expect("notes lock"));
    let route = route.unwrap_or_else(|| "unmatched".into());
    let status = resp.status().as_u16();
    tracing::info!(
        target: "opta_lmx::http",
        method,
        route,
        path,
        status,
        model = model.as_deref().unwrap_or(""),
        client,
        caller = caller.as_deref().unwrap_or(""),
        ms = started.elapsed().as_millis() as u64,
    );
    state.metrics.prometheus().record_request(RequestLabels {
        route,
        method: method.to_string(),
        status,
        model: model.unwrap_or_default(),
    });
    resp
}

/// The audited action a state-changing admin route performs.
fn action_of(method: &Method, route: &str) -> Option<&'static str> {
    let post = method == Method::POST;
    let delete = method == Method::DELETE;
    Some(match route {
        r if post && r.ends_with("/load") => "model_load",
        r if post && r.ends_with("/unload") => "model_unload",
        r if post && r.ends_with("/download") => "download_start",
        r if post && r.ends_with("/resume") => "download_resume",
        r if delete && r.ends_with("/download/{job}") => "download_cancel",
        r if delete && r.ends_with("/{*id}") => "model_delete",
        r if post && (r.ends_with("/config/reload") || r.ends_with("/presets/reload")) => {
            "config_reload"
        }
        _ => return None,
    })
}

/// The model a body names, under the names the admin APIs use for it.
fn model_in_body(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    ["model_id", "model", "instance_id", "repo_id", "repo"]
        .iter()
        .find_map(|k| v.get(k).and_then(|m| m.as_str()).map(String::from))
}

/// `ok` for 2xx, `refused` for 4xx, `failed` otherwise.
fn outcome(status: StatusCode) -> &'static str {
    if status.is_success() {
        "ok"
    } else if status.is_client_error() {
        "refused"
    } else {
        "failed"
    }
}

/// Route layer on admin routes: writes the audit line of each state-changing call, with the
/// model named in its path or body. The body is read here within the usual limits and handed
/// on unchanged.
pub async fn audit_admin(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let Some(action) = action_of(req.method(), &route) else {
        return next.run(req).await;
    };
    let client = peer(&req).map(|p| p.ip().to_string());
    let key = presented_key(req.headers(), true).map(fingerprint);
    let path_model = match action {
        "model_delete" => req
            .uri()
            .path()
            .split_once("/model/")
            .or_else(|| req.uri().path().split_once("/models/"))
            .map(|(_, id)| id.to_string()),
        _ => None,
    };
    let (parts, body) = req.into_parts();
    let bytes = match read_body_of(body, &state).await {
        Ok(b) => b,
        Err(e) => {
            let resp = e.into_response();
            write_audit(&state, action, None, &resp, &route, client, key);
            return resp;
        }
    };
    let model = path_model.or_else(|| model_in_body(&bytes)).or_else(|| {
        // A download job's routes name the job; its repository is what the audit wants.
        let job = parts.uri.path().split('/').nth(4)?;
        state.downloads.repo_of(job)
    });
    let resp = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    write_audit(&state, action, model, &resp, &route, client, key);
    resp
}

fn write_audit(
    state: &AppState,
    action: &'static str,
    model: Option<String>,
    resp: &Response,
    route: &str,
    client: Option<String>,
    key: Option<String>,
) {
    let mut e = AuditEvent::now(action, outcome(resp.status()));
    e.model = model;
    e.status = Some(resp.status().as_u16());
    e.route = Some(route.to_string());
    e.client = client;
    e.key = key;
    state.audit.record(&e);
}

/// Audits a configured client's key at its first use since start (which client it is) or a
/// request refused by its client's caps (rate-limited per address like key refusals).
pub fn audit_client(
    state: &AppState,
    req: &Request,
    action: &'static str,
    outcome: &'static str,
    caller: &str,
    status: Option<u16>,
) {
    let mut e = AuditEvent::now(action, outcome);
    e.status = status;
    e.route = Some(bounded(req.uri().path(), LOGGED_PATH_CHARS));
    e.client = peer(req).map(|p| p.ip().to_string());
    e.key = presented_key(req.headers(), false).map(fingerprint);
    e.caller = Some(caller.to_string());
    if status.is_some() {
        state.audit.record_refusal(e);
    } else {
        state.audit.record(&e);
    }
}

/// Counts and audits a request refused for its key (`scope`: `api` or `admin`).
pub fn auth_failed(state: &AppState, req: &Request, scope: &'static str, status: StatusCode) {
    state.metrics.prometheus().record_auth_failure(scope);
    let mut e = AuditEvent::now("auth_failure", "refused");
    e.status = Some(status.as_u16());
    e.route = Some(bounded(req.uri().path(), LOGGED_PATH_CHARS));
    e.client = peer(req).map(|p| p.ip().to_string());
    e.key = presented_key(req.headers(), scope == "admin").map(fingerprint);
    state.audit.record_refusal(e);
}

/// `GET /metrics`: the Prometheus text exposition.
pub async fn metrics(State(state): State<AppState>) -> Response {
    let text = state
        .metrics
        .prometheus()
        .render(&state.registry, state.config().memory.threshold_percent);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_routes_map_to_actions() {
        let p = Method::POST;
        let d = Method::DELETE;
        assert_eq!(action_of(&p, "/admin/models/load"), Some("model_load"));
        assert_eq!(action_of(&p, "/api/v1/models/unload"), Some("model_unload"));
        assert_eq!(
            action_of(&p, "/admin/models/download"),
            Some("download_start")
        );
        assert_eq!(
            action_of(&d, "/admin/model/download/{job}"),
            Some("download_cancel")
        );
        assert_eq!(action_of(&d, "/admin/models/{*id}"), Some("model_delete"));
        assert_eq!(action_of(&Method::GET, "/admin/models"), None);
        assert_eq!(action_of(&Method::GET, "/admin/status"), None);
        assert_eq!(
            model_in_body(br#"{"model_id": "a/b", "model": "c"}"#).as_deref(),
            Some("a/b")
        );
        assert_eq!(model_in_body(b"not json"), None);
    }
}
