//! LM Studio's own REST API, for clients written against LM Studio (OpenClaw's bundled
//! `lmstudio` provider discovers models with `GET /api/v1/models` and preloads with
//! `POST /api/v1/models/load`). Same registry as `/admin`; only the shapes are LM Studio's.

use axum::extract::State;
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::AlreadyLoaded;
use super::error::ApiError;
use super::{ApiJson, AppState};
use crate::config::check_settings;
use crate::models::registry::LoadOverrides;

/// One model on disk with what LM Studio's lists say about it.
struct Listed {
    disk: crate::models::store::DiskModel,
    architecture: Option<String>,
    quantization: Option<String>,
    max_context: Option<u32>,
    /// Context per sequence, when loaded.
    loaded: Option<u32>,
    tools: bool,
    kind: crate::engine::ModelKind,
}

/// The models directory with header facts, read on the blocking pool (it touches the disk).
async fn listed(state: &AppState) -> Result<Vec<Listed>, ApiError> {
    let registry = state.registry.clone();
    let disk = registry
        .store()
        .fresh_index()
        .await
        .map_err(|e| ApiError::Internal(format!("models directory: {e}")))?;
    tokio::task::spawn_blocking(move || {
        Ok(disk
            .iter()
            .cloned()
            .map(|d| {
                let plan = registry.plan(&d, &LoadOverrides::default()).ok();
                let loaded = registry.get(&d.id);
                Listed {
                    architecture: plan.as_ref().map(|p| p.facts.architecture.clone()),
                    quantization: plan
                        .as_ref()
                        .and_then(|p| p.facts.file_type.clone())
                        .or(d.quantization.clone()),
                    max_context: plan.as_ref().map(|p| p.facts.context_train),
                    kind: plan.as_ref().map(|p| p.facts.kind).unwrap_or_default(),
                    loaded: loaded
                        .as_ref()
                        .map(|m| m.engine.info().context_per_sequence),
                    tools: loaded
                        .as_ref()
                        .and_then(|m| m.engine.chat_template_source().map(|t| t.contains("tools")))
                        .unwrap_or(false),
                    disk: d,
                }
            })
            .collect())
    })
    .await
    .map_err(|e| ApiError::Internal(format!("models directory scan: {e}")))?
}

/// The publisher LM Studio shows: the Hub organisation the model came from, else `local`.
fn publisher(d: &crate::models::store::DiskModel) -> String {
    d.alternate_ids
        .iter()
        .find_map(|a| a.split_once('/').map(|(org, _)| org.to_string()))
        .unwrap_or_else(|| "local".into())
}

/// `GET /api/v1/models`.
pub async fn list_v1(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let models: Vec<Value> = listed(&state)
        .await?
        .into_iter()
        .map(|m| {
            let instances: Vec<Value> = m
                .loaded
                .map(|ctx| json!({"id": m.disk.id, "config": {"context_length": ctx}}))
                .into_iter()
                .collect();
            json!({
                "type": m.kind.as_str(),
                "publisher": publisher(&m.disk),
                "key": m.disk.id,
                "display_name": m.disk.id,
                "architecture": m.architecture,
                "quantization": {"name": m.quantization, "bits_per_weight": Value::Null},
                "size_bytes": m.disk.size_bytes,
                "params_string": Value::Null,
                "loaded_instances": instances,
                "max_context_length": m.max_context,
                "format": m.disk.format,
                "capabilities": {"vision": false, "trained_for_tool_use": m.tools},
            })
        })
        .collect();
    Ok(Json(json!({ "models": models })))
}

/// `GET /api/v0/models`.
pub async fn list_v0(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let data: Vec<Value> = listed(&state)
        .await?
        .into_iter()
        .map(|m| {
            json!({
                "id": m.disk.id,
                "object": "model",
                // LM Studio's v0 list says `embeddings` where v1 says `embedding`.
                "type": match m.kind {
                    crate::engine::ModelKind::Embedding { .. } => "embeddings",
                    k => k.as_str(),
                },
                "publisher": publisher(&m.disk),
                "arch": m.architecture,
                "compatibility_type": m.disk.format,
                "quantization": m.quantization,
                "state": if m.loaded.is_some() { "loaded" } else { "not-loaded" },
                "max_context_length": m.max_context,
            })
        })
        .collect();
    Ok(Json(json!({ "object": "list", "data": data })))
}

/// `POST /api/v1/models/load` body. `context_length` is each sequence's context (what one
/// request's prompt and answer may use, as an LM Studio client means it); `flash_attention`
/// applies to a fresh load. LM Studio's other llama.cpp knobs (`eval_batch_size`,
/// `num_experts`, `offload_kv_cache_to_gpu`) mean nothing here and are accepted and ignored,
/// so a client's preload never fails on them.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct LoadBody {
    pub model: String,
    pub context_length: Option<u32>,
    pub flash_attention: Option<bool>,
    /// LM Studio answers with the configuration in effect only when asked; it is always here.
    pub echo_load_config: Option<bool>,
    #[serde(flatten)]
    pub _other: serde_json::Map<String, Value>,
}

/// `POST /api/v1/models/load`: the same range checks as `/admin/model/load`. A model already
/// loaded with another context is loaded again with this one (LM Studio would start a second
/// instance; here the model's one instance is what requests naming it reach, so it must be the
/// one with the context asked for). Without the admin key only for a model already loaded
/// ([`AlreadyLoaded`]), and then it changes nothing: a context change needs the key.
pub async fn load(
    State(state): State<AppState>,
    already: Option<Extension<AlreadyLoaded>>,
    ApiJson(body): ApiJson<LoadBody>,
) -> Result<Json<Value>, ApiError> {
    use crate::engine::options::FlashAttention;
    let overrides = LoadOverrides {
        context: body.context_length,
        flash_attention: body.flash_attention.map(|on| {
            if on {
                FlashAttention::On
            } else {
                FlashAttention::Off
            }
        }),
        ..LoadOverrides::default()
    };
    if let Err((_, reason)) = check_settings("", &overrides) {
        return Err(ApiError::invalid(
            "context_length",
            format!("context_length: {reason}"),
        ));
    }
    if already.is_some() {
        let model = state.registry.get(&body.model).ok_or_else(|| {
            ApiError::Unauthorized(
                "missing or invalid admin key (X-Admin-Key or Authorization: Bearer)".into(),
            )
        })?;
        if model.differs_from(&overrides) {
            return Err(ApiError::Unauthorized(format!(
                "`{}` is loaded with a context of {} tokens; loading it with {} needs the admin \
                 key (X-Admin-Key or Authorization: Bearer)",
                model.id,
                model.engine.info().context_per_sequence,
                overrides.context.unwrap_or_default()
            )));
        }
        return Ok(Json(loaded_answer(&model, 0.0)));
    }
    let report = state.registry.load(&body.model, &overrides).await?;
    let model = state
        .registry
        .get(&report.model_id)
        .ok_or_else(|| ApiError::Internal("the model went away right after loading".into()))?;
    let seconds = if report.status == "already_loaded" {
        0.0
    } else {
        report.load_seconds
    };
    Ok(Json(loaded_answer(&model, seconds)))
}

/// LM Studio's answer to a load, with the configuration in effect.
fn loaded_answer(model: &crate::models::registry::LoadedModel, seconds: f64) -> Value {
    let info = model.engine.info();
    json!({
        "type": model.engine.kind().as_str(),
        "instance_id": model.id,
        "load_time_seconds": seconds,
        "status": "loaded",
        "load_config": {
            "context_length": info.context_per_sequence,
            "parallel": info.parallel,
        },
    })
}

/// `POST /api/v1/models/unload` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
pub struct UnloadBody {
    #[serde(alias = "model")]
    pub instance_id: String,
}

/// `POST /api/v1/models/unload`.
pub async fn unload(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<UnloadBody>,
) -> Result<Json<Value>, ApiError> {
    let report = state.registry.unload(&body.instance_id).await?;
    Ok(Json(json!({ "instance_id": report.model_id })))
}
