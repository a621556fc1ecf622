//! `/admin/model/download*`: start, watch, list, resume and cancel Hub downloads.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::error::ApiError;
use super::{ApiJson, ApiPath, AppState};
use crate::models::downloads::{DownloadRequest, JobView};

/// `POST /admin/model/download`: 202 with the job (200 when it joins an unfinished one).
pub async fn start(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<DownloadRequest>,
) -> Result<Response, ApiError> {
    let (job, created) = state.downloads.start(req).await?;
    let location = format!("/admin/model/download/{}", job.record.job_id);
    let status = if created {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((status, [(header::LOCATION, location)], Json(job)).into_response())
}

/// `GET /admin/model/download/{job}`.
pub async fn get(
    State(state): State<AppState>,
    ApiPath(job): ApiPath<String>,
) -> Result<Json<JobView>, ApiError> {
    state
        .downloads
        .get(&job)
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no download job `{job}`")))
}

/// `GET /admin/model/downloads`, newest first.
pub async fn list(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "object": "list", "data": state.downloads.list() }))
}

/// `DELETE /admin/model/download/{job}`: cancels and deletes the partial files.
pub async fn cancel(
    State(state): State<AppState>,
    ApiPath(job): ApiPath<String>,
) -> Result<Json<JobView>, ApiError> {
    Ok(Json(state.downloads.cancel(&job)?))
}

/// `POST /admin/model/download/{job}/resume`: continues an interrupted or failed job.
pub async fn resume(
    State(state): State<AppState>,
    ApiPath(job): ApiPath<String>,
) -> Result<Json<JobView>, ApiError> {
    Ok(Json(state.downloads.resume(&job)?))
}
