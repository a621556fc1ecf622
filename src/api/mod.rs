//! HTTP only: routes, the JSON extractor, authentication and the fallbacks that keep every
//! response OpenAI-shaped. Handlers live in [`chat`], [`completions`], [`models`] and [`admin`].

pub mod admin;
pub mod anthropic;
pub mod chat;
pub mod completions;
pub mod downloads;
pub mod error;
pub mod generate;
pub mod lmstudio;
pub mod models;
pub mod observe;
pub mod openapi;
pub mod page;
pub mod responses;
pub mod sse;
pub mod tls;
pub mod types;

pub mod serve;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{
    ConnectInfo, DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request, State,
};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use serde::de::DeserializeOwned;
use tokio::sync::Semaphore;
use tower_http::catch_panic::CatchPanicLayer;

use crate::audit::Audit;
use crate::config::{Config, ServerConfig};
use crate::metrics::Metrics;
use crate::models::downloads::Downloads;
use crate::models::registry::Registry;
use error::ApiError;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub registry: Arc<Registry>,
    pub downloads: Arc<Downloads>,
    pub metrics: Metrics,
    pub started: Instant,
    /// Bounds CPU work on request data (JSON parsing, templating, tokenizing) to the cores,
    /// so a flood of heavy requests queues instead of starving the engine threads.
    pub cpu: Arc<Semaphore>,
    /// A random secret of this server run (confirmation tokens are derived from it).
    pub secret: String,
    /// Responses kept for `previous_response_id` (`store: true`).
    pub responses: Arc<responses::ResponseStore>,
    /// Where admin actions are recorded.
    pub audit: Arc<Audit>,
}

impl AppState {
    /// State over a registry and downloads, sharing the registry's metrics.
    pub fn new(
        config: Arc<Config>,
        registry: Arc<Registry>,
        downloads: Arc<Downloads>,
        audit: Arc<Audit>,
    ) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self {
            metrics: registry.metrics().clone(),
            config,
            registry,
            downloads,
            audit,
            started: Instant::now(),
            cpu: Arc::new(Semaphore::new(cores)),
            secret: uuid::Uuid::new_v4().simple().to_string(),
            responses: Arc::default(),
        }
    }

    /// The model a request names (see [`Registry::resolve`]), noted as the one serving it.
    pub async fn resolve(
        &self,
        name: Option<&str>,
    ) -> Result<crate::models::registry::ModelLease, ApiError> {
        let lease = self.registry.resolve(name).await?;
        observe::note_model(&lease.id);
        Ok(lease)
    }

    /// Runs CPU-heavy work on request data on the blocking pool, at most one job per core.
    /// `work` gets a flag that turns true when the caller is dropped (the client hung up), and
    /// should stop at its next check.
    pub async fn off_runtime<T: Send + 'static>(
        &self,
        work: impl FnOnce(&AtomicBool) -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        run_cancellable(&self.cpu, work).await
    }
}

/// [`AppState::off_runtime`] over a given semaphore: waits for a permit (a dropped caller
/// never starts), then runs `work` on the blocking pool with a flag raised if the caller is
/// dropped meanwhile.
async fn run_cancellable<T: Send + 'static>(
    cpu: &Arc<Semaphore>,
    work: impl FnOnce(&AtomicBool) -> T + Send + 'static,
) -> Result<T, ApiError> {
    /// Raises the flag when the request's future is dropped before the work is done.
    struct CancelOnDrop(Arc<AtomicBool>);
    impl Drop for CancelOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let permit = Arc::clone(cpu)
        .acquire_owned()
        .await
        .map_err(|_| ApiError::Internal("the server is shutting down".into()))?;
    let flag = Arc::new(AtomicBool::new(false));
    let _cancel = CancelOnDrop(Arc::clone(&flag));
    tokio::task::spawn_blocking(move || {
        let out = work(&flag);
        drop(permit);
        out
    })
    .await
    .map_err(|e| ApiError::Internal(format!("request preparation failed: {e}")))
}

/// JSON body extractor whose failures are OpenAI errors naming the bad field (axum's own
/// rejections are plain text). The body must arrive within the body timeout, stay under the
/// size limit, and hold one JSON value with nothing after it; large bodies are parsed on the
/// blocking pool. The content type is not checked: `curl -d` sends form types.
pub struct ApiJson<T>(pub T);

/// Bodies up to this size are parsed in place; larger ones off the async runtime.
const PARSE_IN_PLACE: usize = 64 * 1024;

impl<T: DeserializeOwned + Send + 'static> FromRequest<AppState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let bytes = read_body(req, state).await?;
        if bytes.len() <= PARSE_IN_PLACE {
            return parse_json(&bytes).map(ApiJson);
        }
        state
            .off_runtime(move |_| parse_json(&bytes))
            .await?
            .map(ApiJson)
    }
}

/// The whole body, within the configured size and time.
pub async fn read_body(req: Request, state: &AppState) -> Result<Bytes, ApiError> {
    read_body_of(req.into_body(), state).await
}

/// [`read_body`] of a body already taken from its request.
pub async fn read_body_of(body: axum::body::Body, state: &AppState) -> Result<Bytes, ApiError> {
    let limits = &state.config.requests;
    let timeout = Duration::from_secs_f64(limits.body_timeout_seconds);
    let limit = limits.max_body_bytes;
    let body = axum::body::to_bytes(body, limit);
    match tokio::time::timeout(timeout, body).await {
        Err(_) => Err(ApiError::Other {
            status: StatusCode::REQUEST_TIMEOUT,
            message: format!(
                "the request body did not arrive within {} seconds",
                limits.body_timeout_seconds
            ),
            code: "request_timeout",
        }),
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) if is_too_large(&e) => Err(ApiError::PayloadTooLarge(limit)),
        Ok(Err(e)) => Err(ApiError::InvalidRequest {
            message: format!("could not read the request body: {e}"),
            param: None,
            code: None,
        }),
    }
}

fn is_too_large(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// One JSON value, and nothing but whitespace after it.
fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(body_error)?;
    de.end().map_err(|e| ApiError::InvalidRequest {
        message: format!("the request body has data after its JSON value: {e}"),
        param: None,
        code: None,
    })?;
    Ok(value)
}

/// Path parameters whose failures (bad percent-encoding, say) are OpenAI 400s.
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(v)| ApiPath(v))
            .map_err(|e| ApiError::InvalidRequest {
                message: format!("invalid path: {}", e.body_text()),
                param: None,
                code: None,
            })
    }
}

/// Query parameters whose failures (`?confirm=yes`) are OpenAI 400s.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(v)| ApiQuery(v))
            .map_err(|e| ApiError::InvalidRequest {
                message: format!("invalid query string: {}", e.body_text()),
                param: None,
                code: None,
            })
    }
}

/// Deserializes part of an already-parsed body, with the same field-naming errors.
pub fn from_value<T: DeserializeOwned>(v: &serde_json::Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(v).map_err(body_error)
}

fn body_error(e: serde_path_to_error::Error<serde_json::Error>) -> ApiError {
    let path = e.path().to_string();
    let inner = e.into_inner();
    match inner.classify() {
        serde_json::error::Category::Data => ApiError::InvalidRequest {
            message: if path == "." {
                format!("invalid request: {inner}")
            } else {
                format!("invalid value for `{path}`: {inner}")
            },
            param: (path != ".").then_some(path),
            code: None,
        },
        _ => ApiError::InvalidRequest {
            message: format!("the request body is not valid JSON: {inner}"),
            param: None,
            code: None,
        },
    }
}

/// The key a request presented, from `Authorization: Bearer` or `X-Admin-Key`.
fn presented_key(headers: &HeaderMap, admin: bool) -> Option<&str> {
    if admin {
        if let Some(k) = headers.get("x-admin-key").and_then(|v| v.to_str().ok()) {
            return Some(k);
        }
    }
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        // Anthropic's clients send their key as `x-api-key`.
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
}

/// Constant-time comparison so keys cannot be guessed byte by byte from timings.
fn keys_match(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

async fn require_api_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match &state.config.server.api_key {
        Some(key) if !presented_key(req.headers(), false).is_some_and(|k| keys_match(k, key)) => {
            observe::auth_failed(&state, &req, "api", StatusCode::UNAUTHORIZED);
            ApiError::Unauthorized("missing or invalid API key".into()).into_response()
        }
        _ => next.run(req).await,
    }
}

/// Who may use `/admin`: with an admin key, its holders; else with an API key, its holders;
/// with no key at all, loopback clients only (unless `server.admin_open`), because loading,
/// unloading and deleting models is not for anyone on the LAN.
fn admin_access(
    server: &ServerConfig,
    peer: Option<IpAddr>,
    headers: &HeaderMap,
) -> Result<(), ApiError> {
    let key = server.admin_key.as_ref().or(server.api_key.as_ref());
    match key {
        Some(key) if presented_key(headers, true).is_some_and(|k| keys_match(k, key)) => Ok(()),
        Some(_) if server.admin_key.is_some() => Err(ApiError::Unauthorized(
            "missing or invalid admin key (X-Admin-Key or Authorization: Bearer)".into(),
        )),
        Some(_) => Err(ApiError::Unauthorized(
            "missing or invalid key: with no admin key configured, /admin needs the API key".into(),
        )),
        None if server.admin_open || peer.is_some_and(is_loopback) => Ok(()),
        None => Err(ApiError::Other {
            status: StatusCode::FORBIDDEN,
            message: "the admin API answers only this machine when no key is configured; set an admin key (OPTA_LMX_ADMIN_KEY) or server.admin_open".into(),
            code: "admin_forbidden",
        }),
    }
}

/// Loopback, including IPv4 loopback mapped into IPv6 (a dual-stack listener).
fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
        IpAddr::V4(v4) => v4.is_loopback(),
    }
}

async fn require_admin_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    match admin_access(&state.config.server, peer, req.headers()) {
        Ok(()) => next.run(req).await,
        Err(e) => {
            observe::auth_failed(&state, &req, "admin", e.status());
            e.into_response()
        }
    }
}

/// `/metrics`: open when configured for a scraper, else guarded like `/admin`.
async fn require_metrics_access(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    if state.config.server.metrics_open {
        return next.run(req).await;
    }
    require_admin_key(State(state), req, next).await
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::Internal("internal error while handling the request".into()).into_response()
}

/// The whole HTTP surface.
pub fn router(state: AppState) -> Router {
    let audited = || middleware::from_fn_with_state(state.clone(), observe::audit_admin);
    let api_key = || middleware::from_fn_with_state(state.clone(), require_api_key);
    let v1 = Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/responses", post(responses::create))
        .route("/v1/responses/{id}", get(responses::get))
        .route("/v1/models", get(models::list_models))
        .route("/v1/models/{*id}", get(models::get_model))
        .route("/api/v1/models", get(lmstudio::list_v1))
        .route("/api/v0/models", get(lmstudio::list_v0))
        .route_layer(api_key());
    // LM Studio's load and unload change what is in memory: audited like /admin's.
    let lmstudio_admin = Router::new()
        .route("/api/v1/models/load", post(lmstudio::load))
        .route("/api/v1/models/unload", post(lmstudio::unload))
        .route_layer(audited())
        .route_layer(api_key());
    // Anthropic's Messages: its own error shape around everything, the key check included.
    let anthropic_routes = Router::new()
        .route("/v1/messages", post(anthropic::create))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .route_layer(api_key())
        .route_layer(middleware::from_fn(anthropic::anthropic_errors));
    let admin_routes = Router::new()
        .route("/admin/model/load", post(admin::load))
        .route("/admin/models/load", post(admin::load))
        .route("/admin/model/unload", post(admin::unload))
        .route("/admin/models/unload", post(admin::unload))
        .route("/admin/models", get(admin::models))
        .route("/admin/models/available", get(admin::available))
        .route("/admin/model/download", post(downloads::start))
        .route("/admin/models/download", post(downloads::start))
        .route("/admin/model/downloads", get(downloads::list))
        .route("/admin/models/downloads", get(downloads::list))
        .route(
            "/admin/model/download/{job}",
            get(downloads::get).delete(downloads::cancel),
        )
        .route(
            "/admin/model/download/{job}/resume",
            post(downloads::resume),
        )
        .route(
            "/admin/models/download/{job}",
            get(downloads::get).delete(downloads::cancel),
        )
        .route(
            "/admin/models/download/{job}/resume",
            post(downloads::resume),
        )
        .route(
            "/admin/model/download/{job}/progress",
            get(downloads::progress),
        )
        .route(
            "/admin/models/download/{job}/progress",
            get(downloads::progress),
        )
        .route("/admin/model/{*id}", delete(admin::delete_model))
        .route("/admin/models/{*id}", delete(admin::delete_model))
        .route("/admin/status", get(admin::status))
        .route_layer(audited())
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_admin_key,
        ));
    let scrape = Router::new()
        .route("/metrics", get(observe::metrics))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_metrics_access,
        ));
    let open = Router::new()
        .route("/admin/health", get(admin::health))
        .route("/healthz", get(admin::health))
        .route("/readyz", get(admin::ready))
        .route("/openapi.json", get(openapi::json))
        .route("/docs", get(openapi::docs))
        .route("/", get(page::status_page))
        .route("/ui", get(page::status_page));
    Router::new()
        .merge(v1)
        .merge(lmstudio_admin)
        .merge(anthropic_routes)
        .merge(admin_routes)
        .merge(scrape)
        .merge(open)
        .route_layer(middleware::from_fn(observe::note_route))
        .fallback(|req: Request| async move {
            ApiError::NotFound(format!(
                "no route for {} {}",
                req.method(),
                req.uri().path()
            ))
        })
        .method_not_allowed_fallback(|req: Request| async move {
            ApiError::MethodNotAllowed(format!(
                "method {} is not allowed on {}",
                req.method(),
                req.uri().path()
            ))
        })
        .layer(DefaultBodyLimit::max(state.config.requests.max_body_bytes))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            observe::log_requests,
        ))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_checks() {
        let mut h = HeaderMap::new();
        assert_eq!(presented_key(&h, false), None);
        h.insert(header::AUTHORIZATION, "Bearer sk-1".parse().unwrap());
        assert_eq!(presented_key(&h, false), Some("sk-1"));
        h.insert("x-admin-key", "adm".parse().unwrap());
        assert_eq!(presented_key(&h, true), Some("adm"));
        assert!(keys_match("abc", "abc"));
        assert!(!keys_match("abc", "abd"));
        assert!(!keys_match("abc", "abcd"));
    }

    fn server(api: Option<&str>, admin: Option<&str>, open: bool) -> ServerConfig {
        ServerConfig {
            api_key: api.map(String::from),
            admin_key: admin.map(String::from),
            admin_open: open,
            ..ServerConfig::default()
        }
    }

    #[test]
    fn admin_needs_a_key_when_any_is_set_and_loopback_when_none() {
        let lan: Option<IpAddr> = Some("192.0.2.7".parse().unwrap());
        let local: Option<IpAddr> = Some("127.0.0.1".parse().unwrap());
        let mapped: Option<IpAddr> = Some("::ffff:127.0.0.1".parse().unwrap());
        let none = HeaderMap::new();
        let bearer = |k: &str| {
            let mut h = HeaderMap::new();
            h.insert(
                header::AUTHORIZATION,
                format!("Bearer {k}").parse().unwrap(),
            );
            h
        };
        let (api_key, admin_key) = (bearer("api"), bearer("adm"));
        let status = |r: Result<(), ApiError>| r.err().map(|e| e.status().as_u16());

        // Only an API key: it opens /admin too; nothing else does, not even from loopback.
        let c = server(Some("api"), None, false);
        assert_eq!(status(admin_access(&c, local, &none)), Some(401));
        assert_eq!(status(admin_access(&c, local, &admin_key)), Some(401));
        assert_eq!(status(admin_access(&c, lan, &api_key)), None);
        // An admin key: only it.
        let c = server(Some("api"), Some("adm"), false);
        assert_eq!(status(admin_access(&c, local, &api_key)), Some(401));
        assert_eq!(status(admin_access(&c, lan, &admin_key)), None);
        let mut x = HeaderMap::new();
        x.insert("x-admin-key", "adm".parse().unwrap());
        assert_eq!(status(admin_access(&c, lan, &x)), None);
        // No keys: loopback only, unless configured open.
        let c = server(None, None, false);
        assert_eq!(status(admin_access(&c, lan, &none)), Some(403));
        assert_eq!(status(admin_access(&c, None, &none)), Some(403));
        assert_eq!(status(admin_access(&c, local, &none)), None);
        assert_eq!(status(admin_access(&c, mapped, &none)), None);
        let c = server(None, None, true);
        assert_eq!(status(admin_access(&c, lan, &none)), None);
    }

    #[test]
    fn json_bodies_must_end_after_their_value() {
        #[derive(serde::Deserialize, Debug)]
        struct B {
            #[allow(dead_code)]
            a: u32,
        }
        assert!(parse_json::<B>(br#"{"a": 1}  "#).is_ok());
        let e = parse_json::<B>(br#"{"a": 1} {"a": 2}"#).unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert!(e.to_string().contains("after its JSON value"), "{e}");
        let e = parse_json::<B>(br#"{"a": "x"}"#).unwrap_err();
        assert!(e.to_string().contains("`a`"), "{e}");
    }

    #[tokio::test]
    async fn work_off_the_runtime_sees_its_caller_leave_and_queued_work_never_starts() {
        let cpu = Arc::new(Semaphore::new(1));
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let (seen_tx, seen_rx) = std::sync::mpsc::channel();
        // The running job waits for its caller to go, as a long tokenization checks its flag.
        let running = tokio::spawn({
            let cpu = Arc::clone(&cpu);
            async move {
                run_cancellable(&cpu, move |cancel: &AtomicBool| {
                    started_tx.send(()).unwrap();
                    while !cancel.load(Ordering::Relaxed) {
                        std::thread::yield_now();
                    }
                    seen_tx.send(()).unwrap();
                })
                .await
            }
        });
        tokio::task::spawn_blocking(move || started_rx.recv().unwrap())
            .await
            .unwrap();
        // A second job queues for the one permit; its caller leaves before it gets it.
        let ran = Arc::new(AtomicBool::new(false));
        let queued = tokio::spawn({
            let (cpu, ran) = (Arc::clone(&cpu), Arc::clone(&ran));
            async move { run_cancellable(&cpu, move |_| ran.store(true, Ordering::SeqCst)).await }
        });
        tokio::task::yield_now().await;
        queued.abort();
        running.abort();
        // The running job saw its flag go up; the queued one never started.
        tokio::task::spawn_blocking(move || seen_rx.recv().unwrap())
            .await
            .unwrap();
        let _ = queued.await;
        let permit = cpu.acquire().await.unwrap();
        drop(permit);
        assert!(
            !ran.load(Ordering::SeqCst),
            "queued work ran after its caller left"
        );
    }
}
