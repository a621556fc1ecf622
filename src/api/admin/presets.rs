//! Presets and roles as the coding CLI reads them: `/admin/presets` (its `/presets`,
//! `/preset`), `/admin/presets/reload` (a config reload: presets live in the config file) and
//! `/admin/stack` (its `/stack`: which model each role resolves to now).

use std::collections::BTreeMap;

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use crate::api::error::ApiError;
use crate::api::{ApiPath, AppState};

/// `GET /admin/presets`: `{presets, count}`.
pub async fn list(State(state): State<AppState>) -> Json<Value> {
    let config = state.config();
    Json(json!({"presets": config.presets, "count": config.presets.len()}))
}

/// `GET /admin/presets/{name}`: one preset, by name or routing alias.
pub async fn one(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let config = state.config();
    let preset = config
        .presets
        .iter()
        .find(|p| p.named_by(&name))
        .ok_or_else(|| ApiError::Other {
            status: axum::http::StatusCode::NOT_FOUND,
            message: format!("no preset `{name}` (GET /admin/presets lists them)"),
            code: "preset_not_found",
        })?;
    Ok(Json(json!(preset)))
}

/// `POST /admin/presets/reload`: the config reload, answered as the CLI reads it.
pub async fn reload(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let report = super::reload::run(&state, "http").await?;
    Ok(Json(json!({
        "success": report.success,
        "presets_loaded": state.config().presets.len(),
        "updated": report.updated,
    })))
}

/// `GET /admin/stack`: each role's preferences and the model it resolves to now.
pub async fn stack(State(state): State<AppState>) -> Json<Value> {
    let config = state.config();
    let roles: BTreeMap<&String, Value> = config
        .models
        .roles
        .iter()
        .map(|(role, prefs)| {
            let resolved = state.registry.role_choice(role);
            let loaded = resolved
                .as_deref()
                .is_some_and(|m| state.registry.get(m).is_some());
            (
                role,
                json!({"preferences": prefs, "resolved_model": resolved, "loaded": loaded}),
            )
        })
        .collect();
    let loaded: Vec<String> = state
        .registry
        .loaded()
        .iter()
        .map(|m| m.id.clone())
        .collect();
    Json(json!({
        "roles": roles,
        "helper_nodes": {},
        "loaded_models": loaded,
        "default_model": config.models.default,
        "aliases": config.models.aliases,
    }))
}
