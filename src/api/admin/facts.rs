//! What the coding CLI shows about the machine and the server beside its models: the device
//! (`status` lines, `deviceIdentity`), the memory guard's view (`status --full`, `/memory`) and
//! the metrics as JSON (`/metrics` in its chat), in the first Opta-LMX's shapes with this
//! server's own figures beside them.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use super::gb;
use crate::api::error::ApiError;
use crate::api::AppState;
use crate::system::{process_rss_bytes, Hardware, MemorySnapshot};

/// `GET /admin/device`: the hardware (`LmxDeviceIdentity.hardware`), what this server is
/// (`identity`), and the engines built in.
pub async fn device(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let hw = tokio::task::spawn_blocking(Hardware::read)
        .await
        .map_err(|e| ApiError::Internal(format!("reading the hardware: {e}")))?;
    // MLX models are served through this Python (it exists where mlx-lm was set up).
    let mlx_python = state.config().models.mlx.python.clone();
    let mlx = mlx_python.exists();
    Ok(Json(json!({
        "hardware": {
            "hostname": hw.hostname,
            "chip_name": hw.chip_name,
            "memory_gb": gb(hw.memory_bytes),
            "cpu_cores": hw.cpu_cores,
            "logical_cores": hw.logical_cores,
            "metal_available": hw.metal_available,
            "architecture": hw.architecture,
            "gpu_family": hw.gpu_backends.first(),
            "gpu_memory_bytes": hw.gpu_memory_bytes,
            "os": hw.os,
        },
        "identity": {
            "name": hw.hostname,
            "purpose": "local inference",
            "role": "opta-lmx",
        },
        "engines": {
            "gguf": {
                "library": "llama.cpp (llama-cpp-2)",
                "gpu_backends": hw.gpu_backends,
                "default_threads": crate::system::default_threads(),
            },
            "mlx": {"available": mlx, "python": mlx_python},
        },
        "version": env!("CARGO_PKG_VERSION"),
    })))
}

/// `GET /admin/memory`: the guard's view. `LmxMemoryResponse`'s fields (gigabytes), then the
/// same in bytes with the budget the guard keeps loads under and what each model holds,
/// its cached prefixes included.
pub async fn memory(State(state): State<AppState>) -> Json<Value> {
    let snap = MemorySnapshot::read();
    let threshold = state.config().memory.threshold_percent;
    let loaded = state.registry.loaded();
    let mut models = BTreeMap::new();
    let mut detail = Vec::new();
    for m in &loaded {
        let stats = m.engine.stats();
        models.insert(
            m.id.clone(),
            json!({"memory_gb": gb(m.estimate.total_bytes), "loaded": true}),
        );
        detail.push(json!({
            "id": m.id,
            "format": m.disk.format,
            "memory_bytes": m.estimate.total_bytes,
            "estimate": m.estimate,
            "pinned": m.pinned(),
            "worker_rss_bytes": m.engine.worker().map(|w| w.1),
            "prompt_cache_bytes": stats.prompt_cache_bytes,
            "prompt_cache_files": stats.prompt_cache_files,
            "cached_prompt_tokens_total": stats.cached_prompt_tokens_total,
        }));
    }
    let models_bytes: u64 = loaded.iter().map(|m| m.estimate.total_bytes).sum();
    Json(json!({
        "total_unified_memory_gb": gb(snap.total_bytes),
        "used_gb": gb(snap.used_bytes),
        "available_gb": gb(snap.available_bytes),
        "threshold_percent": threshold,
        "models": models,
        "total_bytes": snap.total_bytes,
        "used_bytes": snap.used_bytes,
        "available_bytes": snap.available_bytes,
        "budget_bytes": snap.limit_bytes(threshold),
        "headroom_bytes": snap.headroom_bytes(threshold),
        "models_bytes": models_bytes,
        "process_rss_bytes": process_rss_bytes(),
        "max_loaded_models": state.config().models.max_loaded_models,
        "loaded": detail,
    }))
}

/// `GET /admin/metrics/json`: `LmxMetricsSummary`'s four figures, then every family `/metrics`
/// exposes, read from the same exposition so the two never disagree.
pub async fn metrics_json(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let text = state
        .metrics
        .prometheus()
        .render(&state.registry, state.config().memory.threshold_percent);
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .map_err(|e| ApiError::Internal(format!("reading the metrics: {e}")))?;
    let mut families: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let sum = |name: &str| -> f64 {
        scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .map(|s| scalar(&s.value))
            .sum()
    };
    for s in &scrape.samples {
        let labels: BTreeMap<&str, &str> = s
            .labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        families
            .entry(s.metric.clone())
            .or_default()
            .push(json!({"labels": labels, "value": value(&s.value)}));
    }
    let completions = sum("opta_lmx_completions_total");
    let cancelled = sum("opta_lmx_cancelled_requests_total");
    let rejected = sum("opta_lmx_rejected_requests_total");
    let requests = completions + cancelled + rejected;
    let e2e_count = sum("opta_lmx_request_duration_seconds_count");
    let e2e_sum = sum("opta_lmx_request_duration_seconds_sum");
    Ok(Json(json!({
        "totalRequests": requests as u64,
        "totalTokens": (sum("opta_lmx_prompt_tokens_total") + sum("opta_lmx_generated_tokens_total")) as u64,
        "avgLatencyMs": if e2e_count > 0.0 { e2e_sum / e2e_count * 1000.0 } else { 0.0 },
        // Requests that did not finish: refused for a full queue, or cancelled by the client.
        "errorRate": if requests > 0.0 { (cancelled + rejected) / requests } else { 0.0 },
        "uptime_seconds": state.started.elapsed().as_secs(),
        "performance": state.metrics.report(),
        "families": families,
    })))
}

/// One sample's number (histograms and summaries count as their total count).
fn scalar(v: &prometheus_parse::Value) -> f64 {
    use prometheus_parse::Value as V;
    match v {
        V::Counter(x) | V::Gauge(x) | V::Untyped(x) => *x,
        V::Histogram(b) => b.iter().map(|b| b.count).fold(0.0, f64::max),
        V::Summary(_) => 0.0,
    }
}

/// A sample as JSON: a number, or a histogram's buckets.
fn value(v: &prometheus_parse::Value) -> Value {
    use prometheus_parse::Value as V;
    match v {
        V::Histogram(b) => Value::Array(
            b.iter()
                .map(|b| json!({"le": b.less_than, "count": b.count}))
                .collect(),
        ),
        other => json!(scalar(other)),
    }
}
