//! `/admin/model/download*`: start, watch, list, resume and cancel Hub downloads.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::error::ApiError;
use super::{ApiJson, ApiPath, AppState};
use crate::models::downloads::{DownloadRequest, JobState, JobView};

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

/// `GET /admin/models/download/{job}/progress`: the job as server-sent events, one when it
/// changes (at most every half second), until it stops downloading; the last event carries
/// its final state.
pub async fn progress(
    State(state): State<AppState>,
    ApiPath(job): ApiPath<String>,
) -> Result<Response, ApiError> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use futures_util::stream;
    let first = state
        .downloads
        .get(&job)
        .ok_or_else(|| ApiError::NotFound(format!("no download job `{job}`")))?;
    let downloads = state.downloads.clone();
    // (the job as last sent, whether the stream is over)
    let events = stream::unfold(
        (Some(first), None::<String>, false),
        move |(next, last, done)| {
            let downloads = downloads.clone();
            let job = job.clone();
            async move {
                if done {
                    return None;
                }
                let mut view = next;
                loop {
                    let v = view.take().or_else(|| downloads.get(&job))?;
                    let text = serde_json::to_string(&v).unwrap_or_default();
                    let over = v.record.state != JobState::Downloading;
                    if last.as_deref() != Some(text.as_str()) || over {
                        let event = Event::default().data(text.clone());
                        return Some((
                            Ok::<_, std::convert::Infallible>(event),
                            (None, Some(text), over),
                        ));
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
            }
        },
    );
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}
