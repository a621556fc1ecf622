//! `/admin/quantize`: the coding CLI's `models quantize` (start, poll, list) and a cancel.
//! The work is [`crate::models::quantize`]'s; this is its HTTP face.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::api::error::ApiError;
use crate::api::{ApiJson, ApiPath, AppState};
use crate::models::quantize::{JobView, QuantizeRequest};

/// `POST /admin/quantize`: checks the request and the disk, then answers with the queued job
/// (`job_id` to poll). A request the disk cannot hold is a 507 with the numbers.
pub async fn start(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<QuantizeRequest>,
) -> Result<Json<JobView>, ApiError> {
    let q = state.quantize.clone();
    // The source's header and the disk are read: the blocking pool.
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let _runtime = handle.enter();
        q.start(&body)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("quantize: {e}")))?
    .map(Json)
    .map_err(Into::into)
}

/// `GET /admin/quantize`: `{jobs, count}`, oldest first.
pub async fn list(State(state): State<AppState>) -> Json<Value> {
    let jobs = state.quantize.list();
    Json(json!({"count": jobs.len(), "jobs": jobs}))
}

/// `GET /admin/quantize/{job}`.
pub async fn get(
    State(state): State<AppState>,
    ApiPath(job): ApiPath<String>,
) -> Result<Json<JobView>, ApiError> {
    state
        .quantize
        .get(&job)
        .map(Json)
        .ok_or_else(|| crate::models::quantize::QuantizeError::NoSuchJob(job).into())
}

/// `POST /admin/quantize/{job}/cancel`: 202 with the job, which ends as `cancelled` with
/// nothing left on disk.
pub async fn cancel(
    State(state): State<AppState>,
    ApiPath(job): ApiPath<String>,
) -> Result<Response, ApiError> {
    let view = state.quantize.cancel(&job)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"cancelled": true, "job_id": view.job_id, "job": view})),
    )
        .into_response())
}
