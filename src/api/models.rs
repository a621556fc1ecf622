//! `GET /v1/models` and `/v1/models/{id}`: every model the server can serve.

use axum::extract::State;
use axum::Json;

use super::error::ApiError;
use super::types::*;
use super::{ApiPath, AppState};

fn model_object(state: &AppState, disk: &crate::models::store::DiskModel) -> ModelObject {
    let loaded = state.registry.get(&disk.id);
    ModelObject {
        id: disk.id.clone(),
        object: "model",
        created: loaded
            .as_ref()
            .map(|m| m.loaded_at)
            .unwrap_or(std::time::UNIX_EPOCH)
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        owned_by: "opta-lmx",
        kind: match &loaded {
            Some(m) => m.engine.kind().as_str(),
            None => state.registry.kind_of(disk).as_str(),
        },
        loaded: loaded.is_some(),
        size_bytes: disk.size_bytes,
        quantization: disk.quantization.clone(),
        context_length: loaded.map(|m| m.engine.info().context_per_sequence),
    }
}
/// Every model the server can serve: loaded ones and the rest of the disk inventory.
async fn all_models(state: &AppState) -> Result<Vec<crate::models::store::DiskModel>, ApiError> {
    // A walk off the runtime that began after this request (a model copied in a moment ago
    // is listed), shared by every listing that waits for it.
    let mut disk: Vec<_> = state
        .registry
        .store()
        .fresh_index()
        .await
        .map_err(|e| ApiError::Internal(format!("models directory: {e}")))?
        .to_vec();
    // A loaded model whose file was removed since is still servable.
    for m in state.registry.loaded() {
        if !disk.iter().any(|d| d.id == m.id) {
            disk.push(m.disk.clone());
        }
    }
    Ok(disk)
}
/// `GET /v1/models`.
pub async fn list_models(State(state): State<AppState>) -> Result<Json<ModelList>, ApiError> {
    let disks = all_models(&state).await?;
    // Off the runtime: a model not listed before has its header read for its type.
    let st = state.clone();
    let data =
        tokio::task::spawn_blocking(move || disks.iter().map(|d| model_object(&st, d)).collect())
            .await
            .map_err(|e| ApiError::Internal(format!("model list: {e}")))?;
    Ok(Json(ModelList {
        object: "list",
        data,
    }))
}
/// `GET /v1/models/{id}` (ids may contain slashes).
pub async fn get_model(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ModelObject>, ApiError> {
    let target = state.config().resolve_alias(&id).to_string();
    let models = all_models(&state).await?;
    let found = models.iter().find(|d| {
        d.id.eq_ignore_ascii_case(&target)
            || d.alternate_ids
                .iter()
                .any(|a| a.eq_ignore_ascii_case(&target))
    });
    match found {
        Some(d) => {
            let (st, d) = (state.clone(), d.clone());
            tokio::task::spawn_blocking(move || Json(model_object(&st, &d)))
                .await
                .map_err(|e| ApiError::Internal(format!("model lookup: {e}")))
        }
        None => Err(ApiError::ModelNotFound(format!(
            "model `{id}` does not exist"
        ))),
    }
}
