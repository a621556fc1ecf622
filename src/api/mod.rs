//! HTTP only: routes, the JSON extractor, authentication and the fallbacks that keep every
//! response OpenAI-shaped. Handlers live in [`openai`] and [`admin`].

pub mod admin;
pub mod downloads;
pub mod error;
pub mod openai;
pub mod sse;
pub mod types;

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use serde::de::DeserializeOwned;
use tower_http::catch_panic::CatchPanicLayer;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::models::downloads::Downloads;
use crate::models::registry::Registry;
use error::ApiError;

/// Largest request body accepted (long prompts are big, but not this big).
pub const BODY_LIMIT: usize = 32 * 1024 * 1024;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub registry: Arc<Registry>,
    pub downloads: Arc<Downloads>,
    pub metrics: Metrics,
    pub started: Instant,
}

/// JSON body extractor whose failures are OpenAI 400s naming the bad field (axum's own
/// rejections are plain text). The content type is not checked: `curl -d` sends form types.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge(BODY_LIMIT)
            } else {
                ApiError::InvalidRequest {
                    message: format!("could not read the request body: {e}"),
                    param: None,
                    code: None,
                }
            }
        })?;
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        serde_path_to_error::deserialize(&mut de)
            .map(ApiJson)
            .map_err(body_error)
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
            ApiError::Unauthorized("missing or invalid API key".into()).into_response()
        }
        _ => next.run(req).await,
    }
}

async fn require_admin_key(State(state): State<AppState>, req: Request, next: Next) -> Response {
    match &state.config.server.admin_key {
        Some(key) if !presented_key(req.headers(), true).is_some_and(|k| keys_match(k, key)) => {
            ApiError::Unauthorized("missing or invalid admin key (X-Admin-Key)".into())
                .into_response()
        }
        _ => next.run(req).await,
    }
}

/// Logs method, path, status and time; never bodies or headers (they carry prompts and keys).
async fn log_requests(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let started = Instant::now();
    let resp = next.run(req).await;
    tracing::info!(
        target: "opta_lmx::http",
        %method,
        path,
        status = resp.status().as_u16(),
        ms = started.elapsed().as_millis() as u64,
    );
    resp
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::Internal("internal error while handling the request".into()).into_response()
}

/// The whole HTTP surface.
pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/models", get(openai::list_models))
        .route("/v1/models/{*id}", get(openai::get_model))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    let admin_routes = Router::new()
        .route("/admin/model/load", post(admin::load))
        .route("/admin/models/load", post(admin::load))
        .route("/admin/model/unload", post(admin::unload))
        .route("/admin/models/unload", post(admin::unload))
        .route("/admin/models", get(admin::models))
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
        .route("/admin/model/{*id}", delete(admin::delete_model))
        .route("/admin/models/{*id}", delete(admin::delete_model))
        .route("/admin/status", get(admin::status))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_admin_key,
        ));
    let open = Router::new()
        .route("/admin/health", get(admin::health))
        .route("/healthz", get(admin::health));
    Router::new()
        .merge(v1)
        .merge(admin_routes)
        .merge(open)
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
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(middleware::from_fn(log_requests))
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
}
