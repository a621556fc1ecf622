//! HTTP only: routes, the JSON extractor, authentication and the fallbacks that keep every
//! response OpenAI-shaped. Handlers live in [`chat`], [`completions`], [`models`] and [`admin`].

pub mod admin;
pub mod anthropic;
pub mod auth;
pub mod caller;
pub mod chat;
pub mod completions;
pub mod discovery;
pub mod downloads;
pub mod embeddings;
pub mod error;
pub mod generate;
pub mod http;
pub mod lmstudio;
pub mod models;
pub mod observe;
pub mod openapi;
pub mod page;
pub mod queue;
pub mod rerank;
pub mod responses;
pub mod routes;
pub mod sse;
pub mod types;
pub mod websocket;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde::de::DeserializeOwned;
use tokio::sync::Semaphore;
use tower_http::catch_panic::CatchPanicLayer;

use crate::audit::Audit;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::models::downloads::Downloads;
use crate::models::registry::Registry;
use error::ApiError;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
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
    /// Client names seen in requests' headers, bounded.
    pub clients: Arc<caller::ClientNames>,
    /// Reads the configuration again as the server was started (file, environment, flags),
    /// for `POST /admin/config/reload` and SIGHUP; `None` when there is nothing to re-read.
    pub reread: Option<Arc<admin::reload::Reread>>,
    /// The mDNS instance this server is advertised as on the LAN, when it is.
    pub mdns: Option<String>,
    /// Quantisation jobs (`/admin/quantize`).
    pub quantize: Arc<crate::models::quantize::Quantizer>,
    /// Stored benchmark results (`/admin/benchmark*`), kept beside the models.
    pub benchmarks: Arc<crate::metrics::benchmarks::BenchmarkStore>,
}

impl AppState {
    /// State over a registry and downloads, sharing the registry's metrics.
    pub fn new(registry: Arc<Registry>, downloads: Arc<Downloads>, audit: Arc<Audit>) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        // The GGUF quantizer runs as this binary's `quantize-worker`.
        let quantize = Arc::new(crate::models::quantize::Quantizer::new(
            Arc::clone(&registry),
            std::env::current_exe().unwrap_or_else(|_| "opta-lmx".into()),
        ));
        let benchmarks = Arc::new(crate::metrics::benchmarks::BenchmarkStore::new(
            registry.store().root(),
        ));
        Self {
            benchmarks,
            metrics: registry.metrics().clone(),
            registry,
            downloads,
            audit,
            started: Instant::now(),
            cpu: Arc::new(Semaphore::new(cores)),
            secret: uuid::Uuid::new_v4().simple().to_string(),
            responses: Arc::default(),
            clients: Arc::default(),
            reread: None,
            mdns: None,
            quantize,
        }
    }

    /// The configuration in effect now (the registry's: one place a reload swaps it).
    pub fn config(&self) -> Arc<Config> {
        self.registry.config()
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
    let limits = &state.config().requests;
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
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
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

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::Internal("internal error while handling the request".into()).into_response()
}

/// The whole HTTP surface, from [`routes::ROUTES`]: each route behind the key check its row
/// names (audited when it may change what is loaded or on disk), Anthropic's routes inside
/// their own error shape, then the fallbacks, limits and request log around everything.
pub fn router(state: AppState) -> Router {
    use routes::Access;
    let mut router = Router::new();
    for r in routes::ROUTES {
        let mut route = (r.handler)();
        let audited = || middleware::from_fn_with_state(state.clone(), observe::audit_admin);
        route = match r.access {
            Access::Open => route,
            Access::Api => route
                .route_layer(middleware::from_fn_with_state(
                    state.clone(),
                    caller::identify,
                ))
                .route_layer(middleware::from_fn_with_state(
                    state.clone(),
                    auth::require_api_key,
                )),
            Access::Admin => {
                route
                    .route_layer(audited())
                    .route_layer(middleware::from_fn_with_state(
                        state.clone(),
                        auth::require_admin_key,
                    ))
            }
            Access::AdminUnlessLoaded => {
                route
                    .route_layer(audited())
                    .route_layer(middleware::from_fn_with_state(
                        state.clone(),
                        auth::require_admin_unless_loaded,
                    ))
            }
            Access::Metrics => route.route_layer(middleware::from_fn_with_state(
                state.clone(),
                auth::require_metrics_access,
            )),
        };
        if r.anthropic {
            route = route.route_layer(middleware::from_fn(anthropic::anthropic_errors));
        }
        router = router.route(r.path, route);
    }
    router
        .route_layer(middleware::from_fn(observe::note_route))
        .fallback(|req: Request| async move {
            ApiError::NotFound(format!(
                "no route for {} {}",
                observe::method_label(req.method()),
                observe::bounded(req.uri().path(), observe::LOGGED_PATH_CHARS)
            ))
        })
        .method_not_allowed_fallback(|req: Request| async move {
            ApiError::MethodNotAllowed(format!(
                "method {} is not allowed on {}",
                observe::method_label(req.method()),
                observe::bounded(req.uri().path(), observe::LOGGED_PATH_CHARS)
            ))
        })
        .layer(DefaultBodyLimit::max(
            state.config().requests.max_body_bytes,
        ))
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
