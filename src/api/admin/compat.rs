//! `/admin/models/compatibility` and `/admin/models/probe`: whether a model on disk or on the
//! Hub can load here. Compatibility lists what is known of every model on disk without
//! loading anything (format, header, architecture, memory estimate against the guard's
//! limit) with the latest load or probe outcome; a probe checks one model actively: for a
//! GGUF, llama.cpp reads its architecture, hyper-parameters and vocabulary (no weights); for
//! an MLX folder, the configured Python imports mlx-lm's module for its architecture; for a
//! Hub repository, the files a download would fetch are listed and sized.

use std::time::{Duration, Instant};

use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::error::ApiError;
use crate::api::{ApiJson, ApiQuery, AppState};
use crate::models::compat::{backend_of, backend_version};
use crate::models::registry::LoadOverrides;
use crate::models::store::DiskModel;
use crate::system::MemorySnapshot;

/// `GET /admin/models/compatibility` query (the coding CLI's filters).
#[derive(Debug, Deserialize)]
pub struct CompatQuery {
    pub model_id: Option<String>,
    pub backend: Option<String>,
    pub outcome: Option<String>,
    /// Rows with an outcome at or after this Unix time.
    pub since_ts: Option<f64>,
    pub limit: Option<usize>,
    #[serde(default)]
    pub include_summary: bool,
}

/// `GET /admin/models/compatibility`: `{total, rows[, summary]}`, one row per model on disk.
pub async fn compatibility(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<CompatQuery>,
) -> Result<Json<Value>, ApiError> {
    let st = state.clone();
    let rows = tokio::task::spawn_blocking(move || -> Result<Vec<Value>, ApiError> {
        let disk = st
            .registry
            .store()
            .scan()
            .map_err(|e| ApiError::Internal(format!("models directory: {e}")))?;
        let limit = memory_limit(&st);
        Ok(disk.iter().map(|d| row(&st, d, limit)).collect())
    })
    .await
    .map_err(|e| ApiError::Internal(format!("compatibility: {e}")))??;
    let rows: Vec<Value> = rows
        .into_iter()
        .filter(|r| q.model_id.as_deref().is_none_or(|m| r["model_id"] == m))
        .filter(|r| q.backend.as_deref().is_none_or(|b| r["backend"] == b))
        .filter(|r| q.outcome.as_deref().is_none_or(|o| r["outcome"] == o))
        .filter(|r| {
            q.since_ts
                .is_none_or(|t| r["ts"].as_f64().is_some_and(|ts| ts >= t))
        })
        .take(q.limit.unwrap_or(200).clamp(1, 2000))
        .collect();
    let mut body = json!({"total": rows.len(), "rows": rows});
    if q.include_summary {
        let count = |o: &str| rows.iter().filter(|r| r["outcome"] == o).count();
        let by_model: serde_json::Map<String, Value> = rows
            .iter()
            .map(|r| {
                (
                    r["model_id"].as_str().unwrap_or_default().to_string(),
                    json!({"outcome": r["outcome"], "reason": r["reason"], "backend": r["backend"]}),
                )
            })
            .collect();
        body["summary"] = json!({"total": rows.len(), "pass": count("pass"),
            "fail": count("fail"), "unknown": count("unknown"), "by_model": by_model});
    }
    Ok(Json(body))
}

/// The most memory the guard would ever let models take (its threshold of all RAM).
fn memory_limit(state: &AppState) -> u64 {
    MemorySnapshot::read().limit_bytes(state.config().memory.threshold_percent)
}

/// What is known of a model on disk without loading it, with its latest outcome.
/// Blocking: reads the header.
fn row(state: &AppState, d: &DiskModel, limit: u64) -> Value {
    let reg = &state.registry;
    let backend = backend_of(d.format);
    let latest = reg.outcomes().latest(&d.id);
    let loaded = reg.get(&d.id).is_some();
    let (facts, estimate) = match reg.plan(d, &LoadOverrides::default()) {
        Ok(p) => (Some(p.facts), Some(p.estimate.total_bytes)),
        Err(_) => (reg.facts(d).ok(), None),
    };
    let (outcome, reason) = match (&facts, estimate) {
        (None, _) => ("fail", format!("its {} header cannot be read", d.format)),
        (Some(_), Some(e)) if e > limit => (
            "fail",
            format!(
                "needs about {} MB, more than the {} MB the memory guard allows all models",
                e / 1_000_000,
                limit / 1_000_000
            ),
        ),
        _ if loaded => ("pass", "loaded now".to_string()),
        _ => match &latest {
            Some(o) => (o.outcome, o.reason.clone()),
            None => (
                "unknown",
                "not loaded or probed since start (POST /admin/models/probe checks it)".into(),
            ),
        },
    };
    json!({
        "model_id": d.id,
        "backend": backend,
        "backend_version": backend_version(backend),
        "format": d.format,
        "architecture": facts.as_ref().map(|f| f.architecture.clone()),
        "quantization": facts.as_ref().and_then(|f| f.file_type.clone()).or(d.quantization.clone()),
        "size_bytes": d.size_bytes,
        "estimated_memory_bytes": estimate,
        "memory_limit_bytes": limit,
        "fits_memory": estimate.map(|e| e <= limit),
        "loaded": loaded,
        "outcome": outcome,
        "reason": reason,
        "ts": latest.as_ref().map(|o| o.ts),
        "last_outcome": latest,
    })
}

/// `POST /admin/models/probe` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProbeBody {
    #[serde(alias = "model")]
    pub model_id: String,
    /// How long the active check may take (1..=600 s, default 60).
    pub timeout_sec: Option<f64>,
    /// Accepted for the coding CLI; every runtime here is a supported one.
    pub allow_unsupported_runtime: Option<bool>,
}

/// One check a probe made.
fn check(name: &str, ok: bool, detail: impl Into<String>) -> Value {
    json!({"check": name, "ok": ok, "detail": detail.into()})
}

/// `POST /admin/models/probe`: checks one model actively and answers whether it can load
/// here, each check with its finding (`success`, `outcome`, `reason`, `checks`).
pub async fn probe(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<ProbeBody>,
) -> Result<Json<Value>, ApiError> {
    let started = Instant::now();
    crate::models::store::validate_id(&body.model_id)
        .map_err(|e| ApiError::invalid("model_id", e.to_string()))?;
    let timeout = body.timeout_sec.unwrap_or(60.0);
    if !(1.0..=600.0).contains(&timeout) {
        return Err(ApiError::invalid(
            "timeout_sec",
            format!("timeout_sec is {timeout}; it must be 1 to 600"),
        ));
    }
    let timeout = Duration::from_secs_f64(timeout);
    let id = state.config().resolve_alias(&body.model_id).to_string();
    let reg = state.registry.clone();
    let name = id.clone();
    let disk = tokio::task::spawn_blocking(move || reg.store().find(&name))
        .await
        .map_err(|e| ApiError::Internal(format!("probe: {e}")))?
        .map_err(|e| ApiError::invalid("model_id", e.to_string()))?;
    let mut answer = match disk {
        Some(d) => probe_disk(&state, d, timeout).await?,
        None if id.contains('/') => probe_hub(&state, &id).await?,
        None => {
            return Err(ApiError::ModelNotFound(format!(
                "model `{id}` is neither on disk nor an `org/repo` Hub id"
            )))
        }
    };
    answer["model_id"] = json!(body.model_id);
    answer["duration_ms"] = json!(started.elapsed().as_secs_f64() * 1000.0);
    Ok(Json(answer))
}

/// The answer's common part from its checks: the first failed check is the reason.
fn verdict(checks: Vec<Value>, backend: &'static str) -> Value {
    let failed = checks.iter().find(|c| c["ok"] == false);
    let success = failed.is_none();
    let reason = failed.map_or("every check passed".to_string(), |c| {
        c["detail"].as_str().unwrap_or_default().to_string()
    });
    let outcome = if success { "pass" } else { "fail" };
    json!({
        "success": success,
        "outcome": outcome,
        "reason": reason,
        "backend": backend,
        "recommended_backend": success.then_some(backend),
        "candidates": [{"backend": backend, "backend_version": backend_version(backend),
                        "outcome": outcome, "reason": reason}],
        "checks": checks,
    })
}

async fn probe_disk(state: &AppState, d: DiskModel, timeout: Duration) -> Result<Value, ApiError> {
    let backend = backend_of(d.format);
    let st = state.clone();
    let disk = d.clone();
    // Header and memory plan: blocking reads.
    let (facts, estimate, limit) = tokio::task::spawn_blocking(move || {
        let facts = st.registry.facts(&disk);
        let estimate = st
            .registry
            .plan(&disk, &LoadOverrides::default())
            .map(|p| p.estimate.total_bytes);
        (facts, estimate, memory_limit(&st))
    })
    .await
    .map_err(|e| ApiError::Internal(format!("probe: {e}")))?;
    let mut checks = vec![check("format", true, format!("{} ({})", d.format, backend))];
    let facts = match facts {
        Ok(f) => {
            checks.push(check(
                "header",
                true,
                format!(
                    "{} with {} layers, trained context {}",
                    f.architecture, f.layers, f.context_train
                ),
            ));
            Some(f)
        }
        Err(e) => {
            checks.push(check(
                "header",
                false,
                format!("its header cannot be read: {e}"),
            ));
            None
        }
    };
    match &estimate {
        Ok(e) => checks.push(check(
            "memory",
            *e <= limit,
            format!(
                "needs about {} MB with its configured settings; the memory guard allows {} MB for all models",
                e / 1_000_000,
                limit / 1_000_000
            ),
        )),
        Err(e) => checks.push(check("memory", false, e.to_string())),
    }
    if let Some(f) = &facts {
        let (ok, detail) = if state.registry.get(&d.id).is_some() {
            (true, "loaded now".to_string())
        } else if d.format == "mlx" {
            mlx_runtime(state, &f.architecture, timeout).await
        } else {
            gguf_runtime(&d, &f.architecture, timeout).await
        };
        checks.push(check("runtime", ok, detail));
    }
    let mut v = verdict(checks, backend);
    state.registry.outcomes().record(
        &d.id,
        d.format,
        v["success"] == true,
        v["reason"].as_str().unwrap_or_default(),
        "probe",
    );
    v["location"] = json!("disk");
    v["format"] = json!(d.format);
    v["architecture"] = json!(facts.as_ref().map(|f| f.architecture.clone()));
    v["quantization"] = json!(facts.and_then(|f| f.file_type).or(d.quantization));
    v["size_bytes"] = json!(d.size_bytes);
    v["estimated_memory_bytes"] = json!(estimate.ok());
    v["memory_limit_bytes"] = json!(limit);
    Ok(v)
}

/// Runs a check's child process with nothing on its standard input and output, its
/// standard error kept, killed if it takes longer than `timeout`.
async fn run_check(
    mut cmd: tokio::process::Command,
    timeout: Duration,
) -> Result<std::process::Output, String> {
    let run = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(timeout, run).await {
        Ok(Ok(out)) => Ok(out),
        Ok(Err(e)) => Err(format!("cannot start the check: {e}")),
        Err(_) => Err(format!("no answer within {} s", timeout.as_secs_f64())),
    }
}

/// Whether llama.cpp reads the file's architecture and vocabulary: this binary's
/// `probe-worker` in a child process, whose log says why not.
async fn gguf_runtime(d: &DiskModel, architecture: &str, timeout: Duration) -> (bool, String) {
    let mut cmd =
        tokio::process::Command::new(std::env::current_exe().unwrap_or_else(|_| "opta-lmx".into()));
    cmd.arg("probe-worker").arg("--input").arg(&d.path);
    match run_check(cmd, timeout).await {
        Ok(out) if out.status.success() => (
            true,
            format!("llama.cpp reads the `{architecture}` architecture and its vocabulary"),
        ),
        Ok(out) => {
            let said = String::from_utf8_lossy(&out.stderr);
            // llama.cpp's own words: "error loading model: unknown model architecture: 'x'".
            let why = said
                .lines()
                .find_map(|l| l.split_once("error loading model: ").map(|(_, w)| w.trim()))
                .or_else(|| said.lines().rev().find(|l| !l.trim().is_empty()))
                .unwrap_or("no reason given");
            (false, format!("llama.cpp cannot load it: {why}"))
        }
        Err(e) => (false, e),
    }
}

/// Whether the configured Python's mlx-lm has a module for `architecture`.
async fn mlx_runtime(state: &AppState, architecture: &str, timeout: Duration) -> (bool, String) {
    if architecture.is_empty()
        || !architecture
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return (
            false,
            format!("`{architecture}` is not an architecture name mlx-lm could have"),
        );
    }
    let python = state.config().models.mlx.python.clone();
    let mut cmd = tokio::process::Command::new(&python);
    cmd.arg("-c")
        .arg(format!("import mlx_lm.models.{architecture}"));
    match run_check(cmd, timeout).await {
        Ok(out) if out.status.success() => (
            true,
            format!(
                "mlx-lm ({}) has the `{architecture}` architecture",
                python.display()
            ),
        ),
        Ok(out) => {
            let said = String::from_utf8_lossy(&out.stderr);
            let last = said.lines().last().unwrap_or_default();
            (
                false,
                format!(
                    "mlx-lm ({}) cannot serve `{architecture}`: {last}",
                    python.display()
                ),
            )
        }
        Err(e) => (false, e),
    }
}

async fn probe_hub(state: &AppState, id: &str) -> Result<Value, ApiError> {
    let (commit, files) = state.downloads.preview(id).await?;
    let size: u64 = files.iter().map(|f| f.size).sum();
    let has = |suffix: &str| files.iter().any(|f| f.path.ends_with(suffix));
    let format = if has(".gguf") {
        Some("gguf")
    } else if has("config.json") && has(".safetensors") {
        Some("mlx")
    } else {
        None
    };
    let limit = memory_limit(state);
    let mut checks = vec![match format {
        Some(f) => check("format", true, format!("{f} files in {id} at {commit}")),
        None => check(
            "format",
            false,
            format!("{id} has no GGUF file and no safetensors model this server loads"),
        ),
    }];
    checks.push(check(
        "memory",
        size <= limit,
        format!(
            "its weights are {} MB (the context adds more); the memory guard allows {} MB for all models",
            size / 1_000_000,
            limit / 1_000_000
        ),
    ));
    let backend = backend_of(format.unwrap_or("gguf"));
    let mut v = verdict(checks, backend);
    v["location"] = json!("hub");
    v["format"] = json!(format);
    v["commit"] = json!(commit);
    v["files"] = json!(files
        .iter()
        .map(|f| json!({"path": f.path, "size": f.size}))
        .collect::<Vec<_>>());
    v["size_bytes"] = json!(size);
    v["memory_limit_bytes"] = json!(limit);
    v["note"] = json!("the architecture is read from the header once downloaded");
    Ok(v)
}
