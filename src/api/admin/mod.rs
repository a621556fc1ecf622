//! `/admin` handlers: load and unload models, inventory, status and health. JSON in and out,
//! so bots can manage models without a person.

pub mod benchmark;
pub mod compat;
pub mod events;
pub mod facts;
pub mod presets;
pub mod quantize;
pub mod reload;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::{read_body, ApiJson, ApiPath, ApiQuery, AppState};
use crate::config::check_settings;
use crate::engine::options::{FlashAttention, KvType, Speculation};
use crate::engine::MemoryEstimate;
use crate::engine::{ModelInfo, SchedulerStats};
use crate::metrics::PerformanceReport;
use crate::models::downloads::{DownloadRequest, JobState};
use crate::models::registry::{
    DeleteReport, LoadOverrides, LoadedModel, RegistryError, UnloadReport,
};
use crate::system::{process_rss_bytes, MemorySnapshot};

/// `POST /admin/model/load` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoadBody {
    #[serde(alias = "model")]
    pub model_id: String,
    /// Context tokens per sequence.
    pub context: Option<u32>,
    /// Sequences decoded together.
    pub parallel: Option<u32>,
    /// Requests that may wait for a sequence before new ones get 429.
    pub max_queue: Option<u32>,
    pub gpu_layers: Option<u32>,
    pub threads: Option<u32>,
    /// Never evict this model for another (TTL and explicit unloads still apply).
    pub pin: Option<bool>,
    /// Unload after this many idle seconds.
    #[serde(alias = "ttl")]
    pub ttl_seconds: Option<u64>,
    /// Decode each sequence alone for output that never depends on other requests.
    pub batch_invariant: Option<bool>,
    /// KV cache types: `f16`, `q8_0`, `q4_0` (a quantised V needs flash attention).
    pub cache_type_k: Option<KvType>,
    pub cache_type_v: Option<KvType>,
    /// `auto`, `on`, `off`.
    pub flash_attention: Option<FlashAttention>,
    /// `off`, `ngram`, `draft` (with `draft_model`).
    pub speculation: Option<Speculation>,
    /// A model id on disk with the same vocabulary, for `speculation: draft`.
    pub draft_model: Option<String>,
    /// Most tokens proposed per sequence per step (1..=64).
    pub draft_max: Option<u32>,
    /// `false` verifies every proposal, paying or not.
    pub speculation_adaptive: Option<bool>,
    /// The first Opta-LMX's backend choice (`auto`, `llama`, `gguf`, `llama.cpp`); GGUF is
    /// what this server loads, so anything else is refused.
    pub backend: Option<String>,
    /// A Hub model that is not on disk is downloaded, then loaded.
    #[serde(default)]
    pub auto_download: bool,
    /// The token a `download_required` answer gave: confirms that download.
    pub confirmation_token: Option<String>,
}

/// `POST /admin/model/unload` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UnloadBody {
    #[serde(alias = "model")]
    pub model_id: String,
}

/// `POST /admin/model/load`. A model that is not on disk but names a Hub repository answers
/// `download_required` with a confirmation token; sent again with the token or with
/// `auto_download: true`, the download starts (`downloading`, `download_id`) and the model is
/// loaded when it completes, as the first Opta-LMX did.
pub async fn load(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<LoadBody>,
) -> Result<Response, ApiError> {
    // The engine a load names picks that format's copy of a model on disk in both.
    let format = match body
        .backend
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None | Some("" | "auto") => None,
        Some("llama" | "llama.cpp" | "llamacpp" | "gguf") => Some("gguf"),
        Some("mlx" | "mlx-lm" | "mlx_lm") => Some("mlx"),
        Some(other) => {
            return Err(ApiError::invalid(
                "backend",
                format!("backend `{other}` is not one of auto, gguf (llama.cpp), mlx"),
            ))
        }
    };
    let options = LoadOverrides {
        context: body.context,
        parallel: body.parallel,
        max_queue: body.max_queue,
        gpu_layers: body.gpu_layers,
        threads: body.threads,
        ttl_seconds: body.ttl_seconds,
        pin: body.pin,
        batch_invariant: body.batch_invariant,
        cache_type_k: body.cache_type_k,
        cache_type_v: body.cache_type_v,
        flash_attention: body.flash_attention,
        speculation: body.speculation,
        draft_model: body.draft_model.clone(),
        draft_max: body.draft_max,
        speculation_adaptive: body.speculation_adaptive,
    };
    if let Err((key, reason)) = check_settings("", &options) {
        let param = key.trim_start_matches('.').to_string();
        return Err(ApiError::invalid(
            param.clone(),
            format!("{param}: {reason}"),
        ));
    }
    match state
        .registry
        .load_as(&body.model_id, &options, format)
        .await
    {
        Ok(report) => Ok(Json(report).into_response()),
        Err(RegistryError::NotFound(id)) if id.contains('/') => {
            download_then_load(&state, &body, options).await
        }
        Err(e) => Err(e.into()),
    }
}

/// A load of a Hub model that is not on disk: asks for confirmation, or starts the download
/// and loads the model once it is verified and installed.
async fn download_then_load(
    state: &AppState,
    body: &LoadBody,
    options: LoadOverrides,
) -> Result<Response, ApiError> {
    let token = confirmation_token(state, &body.model_id);
    let confirmed = body.auto_download || body.confirmation_token.as_deref() == Some(&token);
    if !confirmed {
        return Ok(Json(serde_json::json!({
            "status": "download_required",
            "model_id": body.model_id,
            "confirmation_token": token,
            "message": format!("`{}` is not on disk; send the load again with this confirmation_token (or auto_download: true) to download it from the Hub and load it", body.model_id),
        }))
        .into_response());
    }
    let request = DownloadRequest {
        model_id: body.model_id.clone(),
        revision: None,
        files: None,
        pattern: None,
        allow_patterns: None,
        ignore_patterns: None,
    };
    let (job, _) = state.downloads.start(request).await?;
    let download_id = job.record.job_id.clone();
    let (downloads, registry) = (state.downloads.clone(), state.registry.clone());
    let watched = download_id.clone();
    tokio::spawn(async move {
        // Waits for the job to stop; a verified one is loaded under the id it installed.
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            let Some(job) = downloads.get(&watched) else {
                return;
            };
            match job.record.state {
                JobState::Downloading => continue,
                JobState::Ready => {
                    if let Some(id) = job.record.models.first() {
                        if let Err(e) = registry.load(id, &options).await {
                            tracing::warn!(model = %id, error = %e, "load after download failed");
                        }
                    }
                    return;
                }
                _ => return,
            }
        }
    });
    Ok((
        axum::http::StatusCode::ACCEPTED,
        Json(serde_json::json!({
            "status": "downloading",
            "model_id": body.model_id,
            "download_id": download_id,
            "progress_url": format!("/admin/models/download/{download_id}/progress"),
        })),
    )
        .into_response())
}

/// The confirmation a `download_required` answer asks for: a hash of the model id and this
/// server run's secret, so it needs no storage and a token from another run is refused.
fn confirmation_token(state: &AppState, model_id: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{}\n{model_id}", state.secret).as_bytes());
    hex::encode(&digest[..16])
}

/// `POST /admin/model/unload`.
pub async fn unload(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<UnloadBody>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let report: UnloadReport = state.registry.unload(&body.model_id).await?;
    let mut v = serde_json::to_value(&report).unwrap_or_default();
    v["memory_freed_gb"] = serde_json::json!(gb(report.memory_freed_bytes));
    Ok(Json(v))
}

/// Bytes in GB (10^9), rounded to 0.01, as the first Opta-LMX reported memory.
pub(super) fn gb(bytes: u64) -> f64 {
    (bytes as f64 / 1e7).round() / 100.0
}

fn unix_seconds(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `DELETE /admin/model/{id}` confirmation, as query parameters or a JSON body.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeleteBody {
    #[serde(default)]
    pub confirm: bool,
    /// Unload first if loaded (its in-flight requests end with an error).
    #[serde(default)]
    pub force: bool,
}

/// `DELETE /admin/model/{id}`: removes the model's files after an explicit confirmation.
pub async fn delete_model(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<DeleteBody>,
    request: Request,
) -> Result<Json<DeleteReport>, ApiError> {
    let body = read_body(request, &state).await?;
    let from_body: DeleteBody = if body.iter().all(u8::is_ascii_whitespace) {
        DeleteBody::default()
    } else {
        super::from_value(&serde_json::from_slice(&body).map_err(|e| {
            ApiError::invalid("body", format!("the request body is not valid JSON: {e}"))
        })?)?
    };
    let (confirm, force) = (
        query.confirm || from_body.confirm,
        query.force || from_body.force,
    );
    if !confirm {
        return Err(RegistryError::ConfirmationRequired(id).into());
    }
    Ok(Json(state.registry.delete(&id, force).await?))
}

/// One model in `/admin/models` and `/admin/status`.
#[derive(Debug, Serialize)]
pub struct ModelEntry {
    pub id: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub alternate_ids: Vec<String>,
    pub path: String,
    pub size_bytes: u64,
    /// From the GGUF header, else from the file name.
    pub quantization: Option<String>,
    pub architecture: Option<String>,
    /// `llm`, `embedding` or `reranker` (read from the header).
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub format: &'static str,
    pub loaded: bool,
    /// Context per sequence: the loaded one, else what a load would use.
    pub context: u32,
    /// What a load with the configured settings would take (the guard's figure).
    pub estimated_memory: Option<MemoryEstimate>,
    /// Memory the loaded model is counted as.
    pub memory_bytes: Option<u64>,
    pub pinned: bool,
    pub ttl_seconds: Option<u64>,
    /// Requests since the server started (across loads).
    pub request_count: u64,
    pub last_used: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime: Option<Runtime>,
}

/// Details of a loaded model.
#[derive(Debug, Serialize)]
pub struct Runtime {
    #[serde(flatten)]
    pub info: ModelInfo,
    /// What the load was estimated to take, as the memory guard counts it.
    pub memory_bytes: u64,
    pub memory: MemoryEstimate,
    pub chat_template: crate::chat::template::TemplateSource,
    pub loaded_at: String,
    pub scheduler: SchedulerStats,
}

fn rfc3339(t: std::time::SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn runtime(m: &LoadedModel) -> Runtime {
    Runtime {
        info: m.engine.info().clone(),
        memory_bytes: m.estimate.total_bytes,
        memory: m.estimate,
        chat_template: m.template.source(),
        loaded_at: rfc3339(m.loaded_at),
        scheduler: m.engine.stats(),
    }
}

/// `GET /admin/models`: the disk inventory with loaded state.
pub async fn models(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    // Scanning the directory and reading GGUF headers touch the disk: the blocking pool.
    tokio::task::spawn_blocking(move || inventory(&state))
        .await
        .map_err(|e| ApiError::Internal(format!("models inventory: {e}")))?
        .map(Json)
}

fn inventory(state: &AppState) -> Result<serde_json::Value, ApiError> {
    let disk = state
        .registry
        .store()
        .scan()
        .map_err(|e| ApiError::Internal(format!("models directory: {e}")))?;
    let reg = &state.registry;
    let entries: Vec<ModelEntry> = disk
        .into_iter()
        .map(|d| {
            let loaded = reg.get(&d.id);
            let runtime = loaded.as_deref().map(runtime);
            let plan = reg.plan(&d, &LoadOverrides::default()).ok();
            let usage = reg.usage(&d.id);
            let configured = reg.config().settings_for(&d.id);
            let context = match (&runtime, &plan) {
                (Some(r), _) => r.info.context_per_sequence,
                (None, Some(p)) => p.context,
                (None, None) => configured.context.unwrap_or(4096),
            };
            let (facts, estimated_memory) = match plan {
                Some(p) => (Some(p.facts), Some(p.estimate)),
                None => (None, None),
            };
            ModelEntry {
                loaded: runtime.is_some(),
                path: d.path.display().to_string(),
                quantization: facts
                    .as_ref()
                    .and_then(|f| f.file_type.clone())
                    .or(d.quantization),
                kind: facts.as_ref().map_or("llm", |f| f.kind.as_str()),
                architecture: facts.map(|f| f.architecture),
                context,
                estimated_memory,
                memory_bytes: loaded.as_ref().map(|m| m.estimate.total_bytes),
                pinned: loaded
                    .as_ref()
                    .map_or(configured.pin.unwrap_or(false), |m| m.pinned()),
                ttl_seconds: loaded
                    .as_ref()
                    .map_or(configured.ttl_seconds, |m| m.ttl_seconds()),
                request_count: usage.map_or(0, |u| u.requests),
                last_used: usage
                    .filter(|u| u.requests > 0)
                    .map(|u| rfc3339(u.last_used)),
                runtime,
                id: d.id,
                alternate_ids: d.alternate_ids,
                size_bytes: d.size_bytes,
                format: d.format,
            }
        })
        .collect();
    // The loaded models in the first Opta-LMX's shape, which the coding CLI polls after a load.
    let loaded: Vec<serde_json::Value> = reg
        .loaded()
        .iter()
        .map(|m| {
            serde_json::json!({
                "id": m.id,
                "memory_gb": gb(m.estimate.total_bytes),
                "context_length": m.engine.info().context_per_sequence,
                "loaded_at": unix_seconds(m.loaded_at),
                "request_count": m.request_count(),
            })
        })
        .collect();
    Ok(serde_json::json!({
        "loaded": loaded,
        "models_directory": reg.store().root().display().to_string(),
        "max_loaded_models": reg.config().models.max_loaded_models,
        "models": entries,
        "downloads_in_progress": state.downloads.list().into_iter()
            .filter(|j| !matches!(j.record.state, crate::models::downloads::JobState::Ready | crate::models::downloads::JobState::Cancelled))
            .collect::<Vec<_>>(),
    }))
}

/// The models directory's contents, read on the blocking pool (a scan touches the disk).
async fn scan(state: &AppState) -> Result<Vec<crate::models::store::DiskModel>, ApiError> {
    let registry = state.registry.clone();
    tokio::task::spawn_blocking(move || registry.store().scan())
        .await
        .map_err(|e| ApiError::Internal(format!("models directory scan: {e}")))?
        .map_err(|e| ApiError::Internal(format!("models directory: {e}")))
}

/// `GET /admin/models/available`: every model on disk, loaded or not, as the first Opta-LMX
/// answered it and the coding CLI counts it ("On Disk: N models downloaded"; listing only the
/// unloaded ones made it say 0 while its one model served). `repo_id` is the id to load,
/// `downloaded_at` the file's modification time (unix seconds), `loaded` whether it is in
/// memory now.
pub async fn available(
    State(state): State<AppState>,
) -> Result<Json<Vec<serde_json::Value>>, ApiError> {
    let disk = scan(&state).await?;
    Ok(Json(
        disk.into_iter()
            .map(|d| {
                let downloaded_at = std::fs::metadata(&d.path)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|t| t.as_secs());
                serde_json::json!({
                    "repo_id": d.id,
                    "id": d.id,
                    "local_path": d.path.display().to_string(),
                    "size_bytes": d.size_bytes,
                    "downloaded_at": downloaded_at,
                    "format": d.format,
                    "loaded": state.registry.get(&d.id).is_some(),
                })
            })
            .collect(),
    ))
}

/// `GET /admin/status` memory section.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct MemoryStatus {
    #[serde(flatten)]
    pub snapshot: MemorySnapshot,
    /// The same figures in GB, as the coding CLI reads them.
    pub used_gb: f64,
    pub total_gb: f64,
    pub available_gb: f64,
    pub threshold_percent: f64,
    pub process_rss_bytes: u64,
    pub models_bytes: u64,
}

/// `GET /admin/status`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Status {
    pub version: &'static str,
    pub uptime_seconds: u64,
    pub memory: MemoryStatus,
    /// Ids of the loaded models.
    pub models: Vec<String>,
    pub loaded_models: Vec<serde_json::Value>,
    pub performance: PerformanceStatus,
    /// Download jobs still running.
    pub downloads: Vec<crate::models::downloads::JobView>,
}

/// Performance section: rolling per-request figures plus the schedulers' live numbers,
/// summed over loaded models.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PerformanceStatus {
    #[serde(flatten)]
    pub rolling: PerformanceReport,
    /// Sequences prefilling or generating.
    pub active_requests: u32,
    /// Requests waiting for a sequence.
    pub queued_requests: u32,
    /// Prompt tokens computed per second over the last few seconds.
    pub prompt_tokens_per_second: f64,
    /// Tokens generated per second over the last few seconds, all sequences together.
    pub decode_tokens_per_second: f64,
    /// Share of prompt tokens served from the prefix cache since the models were loaded.
    pub cache_hit_ratio: f64,
    pub cancelled_requests_total: u64,
    pub rejected_requests_total: u64,
    /// Throughput and time to first token per 10 s over the last 15 minutes.
    pub history: Vec<crate::metrics::HistoryPoint>,
}

/// Cached prompt tokens over all prompt tokens; 0 before any request.
fn hit_ratio(cached: u64, prompt: u64) -> f64 {
    if prompt == 0 {
        0.0
    } else {
        cached as f64 / prompt as f64
    }
}

/// `GET /admin/status`.
pub async fn status(State(state): State<AppState>) -> Json<Status> {
    let loaded = state.registry.loaded();
    let mut total = SchedulerStats::default();
    let mut models_bytes = 0;
    let loaded_models = loaded
        .iter()
        .map(|m| {
            let stats = m.engine.stats();
            let info = m.engine.info();
            total.active_sequences += stats.active_sequences;
            total.queued_requests += stats.queued_requests;
            total.prompt_tokens_total += stats.prompt_tokens_total;
            total.cached_prompt_tokens_total += stats.cached_prompt_tokens_total;
            total.prompt_tokens_per_second += stats.prompt_tokens_per_second;
            total.decode_tokens_per_second += stats.decode_tokens_per_second;
            total.cancelled_total += stats.cancelled_total;
            total.rejected_total += stats.rejected_total;
            models_bytes += m.estimate.total_bytes;
            serde_json::json!({
                "id": m.id,
                "memory_bytes": m.estimate.total_bytes,
                "size_bytes": m.disk.size_bytes,
                "context": info.context_per_sequence,
                "parallel": info.parallel,
                "active_sequences": stats.active_sequences,
                "queued_requests": stats.queued_requests,
                "cache_hit_ratio": hit_ratio(stats.cached_prompt_tokens_total, stats.prompt_tokens_total),
                "scheduler": stats,
                "clients": m.engine.clients(),
                "request_count": m.request_count(),
                "format": m.disk.format,
                "worker_pid": m.engine.worker().map(|w| w.0),
                "worker_rss_bytes": m.engine.worker().map(|w| w.1),
                "last_used": rfc3339(m.last_used()),
                "pinned": m.pinned(),
                "ttl_seconds": m.ttl_seconds(),
            })
        })
        .collect();
    let snapshot = MemorySnapshot::read();
    Json(Status {
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: state.started.elapsed().as_secs(),
        models: loaded.iter().map(|m| m.id.clone()).collect(),
        memory: MemoryStatus {
            used_gb: gb(snapshot.used_bytes),
            total_gb: gb(snapshot.total_bytes),
            available_gb: gb(snapshot.available_bytes),
            snapshot,
            threshold_percent: state.config().memory.threshold_percent,
            process_rss_bytes: process_rss_bytes(),
            models_bytes,
        },
        loaded_models,
        performance: PerformanceStatus {
            rolling: state.metrics.report(),
            active_requests: total.active_sequences,
            queued_requests: total.queued_requests,
            prompt_tokens_per_second: total.prompt_tokens_per_second,
            decode_tokens_per_second: total.decode_tokens_per_second,
            cache_hit_ratio: hit_ratio(total.cached_prompt_tokens_total, total.prompt_tokens_total),
            cancelled_requests_total: total.cancelled_total,
            rejected_requests_total: total.rejected_total,
            history: state.metrics.history(),
        },
        downloads: state
            .downloads
            .list()
            .into_iter()
            .filter(|j| j.status == crate::models::downloads::JobState::Downloading)
            .collect(),
    })
}

/// `GET /readyz`: 200 with `models_loaded` while a model can answer, 503 while none is
/// loaded (the coding CLI then reports the server as degraded). No auth.
pub async fn ready(State(state): State<AppState>) -> Response {
    let n = state.registry.loaded().len();
    let status = if n > 0 {
        axum::http::StatusCode::OK
    } else {
        axum::http::StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "status": if n > 0 { "ready" } else { "not_ready" },
        "models_loaded": n,
    });
    (status, Json(body)).into_response()
}

/// `GET /admin/health` and `/healthz`: liveness, no auth.
pub async fn health(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "models_loaded": state.registry.loaded().len(),
    }))
}
