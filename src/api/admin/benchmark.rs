//! `/admin/benchmark` (the coding CLI's `models benchmark`), `/admin/benchmark/run` (its
//! persisted form) and `/admin/benchmark/results`; `/admin/models/{id}/performance`.
//!
//! A benchmark is a few greedy chat requests to a loaded model through the scheduler, under
//! a client of its own (`admin-benchmark`): it takes its fair share of the model like any
//! client and disturbs nobody beyond that. Each run's prompt starts with its run number, so
//! the prefix cache cannot answer it and the prefill is measured, not remembered. It runs in
//! a task of its own: a caller that hangs up still gets its result stored.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};

use super::gb;
use crate::api::chat::prepare_chat;
use crate::api::error::ApiError;
use crate::api::generate::{generation_request, parse_value, submit_choices};
use crate::api::types::ChatCompletionRequest;
use crate::api::{ApiJson, ApiPath, ApiQuery, AppState};
use crate::engine::Event;
use crate::metrics::benchmarks::{summarise, BenchmarkRecord, RunFigures};
use crate::models::compat::backend_of;

/// The client name benchmark requests are scheduled under.
const CLIENT: &str = "admin-benchmark";

const DEFAULT_PROMPT: &str = "Write a detailed explanation of how transformer neural networks \
work, covering attention mechanisms, positional encoding, and the encoder-decoder architecture.";

/// Both benchmark routes' body (the CLI sends `max_tokens` to one, `num_output_tokens` to
/// the other).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BenchmarkBody {
    #[serde(alias = "model")]
    pub model_id: String,
    pub prompt: Option<String>,
    /// Tokens to generate per run (1..=2048).
    #[serde(alias = "max_tokens")]
    pub num_output_tokens: Option<u32>,
    /// Measured runs (1..=20).
    pub runs: Option<u32>,
    /// 0..=2; default 0 (greedy), so runs are comparable.
    pub temperature: Option<f32>,
    /// Runs made first and not counted (0..=3).
    pub warmup_runs: Option<u32>,
}

/// What a route defaults to.
struct Defaults {
    runs: u32,
    tokens: u32,
    warmup: u32,
}

/// `POST /admin/benchmark`: runs (default 3 of 128 tokens) answered in the CLI's
/// `RawBenchmarkResponse` shape, and stored.
pub async fn quick(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<BenchmarkBody>,
) -> Result<Json<Value>, ApiError> {
    let prompt = body.prompt.clone().unwrap_or_else(|| DEFAULT_PROMPT.into());
    let r = measure(
        &state,
        body,
        Defaults {
            runs: 3,
            tokens: 128,
            warmup: 0,
        },
    )
    .await?;
    let runs = &r.stats.runs;
    let avg =
        |f: fn(&RunFigures) -> f64| runs.iter().map(f).sum::<f64>() / runs.len().max(1) as f64;
    Ok(Json(json!({
        "id": r.id,
        "model_id": r.model_id,
        "backend_type": r.backend,
        "prompt": prompt,
        "max_tokens": r.max_tokens,
        "runs": runs.len(),
        "results": runs,
        "avg_tokens_per_second": avg(|r| r.tokens_per_second),
        "avg_time_to_first_token_ms": avg(|r| r.time_to_first_token_ms),
        "avg_total_time_ms": avg(|r| r.total_time_ms),
        "avg_prompt_tokens_per_second": avg(|r| r.prompt_tokens_per_second),
        "status": r.status,
        "concurrent_requests": r.concurrent_requests,
    })))
}

/// `POST /admin/benchmark/run`: runs (default 1 warm-up, then 5 of 200 tokens) answered and
/// stored as the first Opta-LMX's `BenchmarkResult`.
pub async fn run(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<BenchmarkBody>,
) -> Result<Json<BenchmarkRecord>, ApiError> {
    let defaults = Defaults {
        runs: 5,
        tokens: 200,
        warmup: 1,
    };
    measure(&state, body, defaults).await.map(Json)
}

/// `GET /admin/benchmark/results` query.
#[derive(Debug, Deserialize)]
pub struct ResultsQuery {
    pub model_id: Option<String>,
}

/// `GET /admin/benchmark/results[?model_id=]`: stored results, oldest first.
pub async fn results(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<ResultsQuery>,
) -> Result<Json<Vec<BenchmarkRecord>>, ApiError> {
    let store = state.benchmarks.clone();
    tokio::task::spawn_blocking(move || store.load(q.model_id.as_deref()))
        .await
        .map(Json)
        .map_err(|e| ApiError::Internal(format!("benchmark results: {e}")))
}

async fn measure(
    state: &AppState,
    body: BenchmarkBody,
    d: Defaults,
) -> Result<BenchmarkRecord, ApiError> {
    let range = |param: &'static str, v: Option<u32>, default: u32, lo: u32, hi: u32| {
        let v = v.unwrap_or(default);
        if (lo..=hi).contains(&v) {
            Ok(v)
        } else {
            Err(ApiError::invalid(
                param,
                format!("{param} is {v}; it must be {lo} to {hi}"),
            ))
        }
    };
    let runs = range("runs", body.runs, d.runs, 1, 20)?;
    let tokens = range(
        "num_output_tokens",
        body.num_output_tokens,
        d.tokens,
        1,
        2048,
    )?;
    let warmup = range("warmup_runs", body.warmup_runs, d.warmup, 0, 3)?;
    let temperature = body.temperature.unwrap_or(0.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            "temperature",
            format!("temperature is {temperature}; it must be 0 to 2"),
        ));
    }
    let prompt = body.prompt.unwrap_or_else(|| DEFAULT_PROMPT.into());
    if prompt.trim().is_empty() {
        return Err(ApiError::invalid("prompt", "the prompt is empty"));
    }
    let config = state.config();
    let id = config.resolve_alias(&body.model_id).to_string();
    // A benchmark measures a model as it is served: it never loads one (nor evicts another).
    let model = state.registry.get(&id).ok_or_else(|| ApiError::Other {
        status: StatusCode::CONFLICT,
        message: format!(
            "model `{}` is not loaded; load it first (POST /admin/models/load): a benchmark measures a model as it is served",
            body.model_id
        ),
        code: "model_not_loaded",
    })?;
    let info = model.engine.info().clone();
    let concurrent = model.engine.held().len() as u32;
    let (model_id, backend) = (model.id.clone(), backend_of(model.disk.format));
    drop(model);
    let hardware = tokio::task::spawn_blocking(crate::system::Hardware::read)
        .await
        .map(|h| h.chip_name.unwrap_or(h.architecture))
        .unwrap_or_default();

    // The runs, the summary and the store in a task of their own: a caller that hangs up
    // still gets its benchmark stored.
    let state = state.clone();
    tokio::spawn(async move {
        let mut figures = Vec::new();
        let mut first_text = String::new();
        for i in 0..warmup + runs {
            let content = format!("(Benchmark run {}.) {prompt}", i + 1);
            let (f, text) = one_run(&state, &model_id, &content, tokens, temperature).await?;
            if i >= warmup {
                if figures.is_empty() {
                    first_text = text;
                }
                figures.push(RunFigures {
                    run: i - warmup + 1,
                    ..f
                });
            }
        }
        let stats = summarise(figures, warmup, first_text);
        let record = BenchmarkRecord {
            id: format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
            model_id,
            backend: backend.into(),
            timestamp: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            status: if stats.runs_completed >= 2 {
                "ok"
            } else {
                "insufficient_data"
            }
            .into(),
            hardware,
            lmx_version: env!("CARGO_PKG_VERSION").into(),
            prompt_preview: prompt.chars().take(100).collect(),
            max_tokens: tokens,
            temperature,
            settings: json!({"context": info.context_per_sequence, "parallel": info.parallel,
                             "threads": info.threads, "gpu_layers": info.gpu_layers}),
            concurrent_requests: concurrent,
            stats,
        };
        let store = state.benchmarks.clone();
        let saved = record.clone();
        tokio::task::spawn_blocking(move || store.save(&saved))
            .await
            .map_err(|e| ApiError::Internal(format!("storing the benchmark: {e}")))?
            .map_err(|e| ApiError::Internal(format!("storing the benchmark: {e}")))?;
        tracing::info!(event = "benchmark_stored", id = %record.id, model = %record.model_id, runs = record.stats.runs_completed, decode_tps = record.stats.toks_per_sec_mean, ttft_s = record.stats.ttft_mean_sec);
        Ok(record)
    })
    .await
    .map_err(|e| ApiError::Internal(format!("benchmark task: {e}")))?
}

/// One greedy chat request through the chat path, timed by the engine.
async fn one_run(
    state: &AppState,
    model_id: &str,
    content: &str,
    max_tokens: u32,
    temperature: f32,
) -> Result<(RunFigures, String), ApiError> {
    let body = json!({"model": model_id, "max_tokens": max_tokens, "temperature": temperature,
                      "messages": [{"role": "user", "content": content}]});
    let config = state.config();
    let ((name, chat), v) = parse_value(
        &config,
        body,
        crate::presets::CHAT,
        |r: ChatCompletionRequest| Ok((r.model.clone(), r.to_chat()?)),
    )?;
    let model = state.resolve(name.as_deref()).await?;
    let (plan, prompt) = prepare_chat(state, &model, chat, v.constraint.clone()).await?;
    let mut gen = generation_request(&model, prompt, &v)?;
    gen.constraint = plan.constraint;
    gen.client = Some(CLIENT.into());
    model.touch();
    let mut events = submit_choices(state, &model, gen, 1)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::Internal("no choice was submitted".into()))?;
    drop(model);
    let mut text = String::new();
    while let Some(ev) = events.next().await {
        match ev {
            Event::Text(t) => text.push_str(&t),
            Event::Logprob(_) => {}
            Event::Done {
                finish_reason,
                usage,
                time_to_first_token,
                total_time,
            } => {
                let ttft = time_to_first_token.as_secs_f64();
                let decode = (total_time.as_secs_f64() - ttft).max(0.0);
                let after_first = usage.completion_tokens.saturating_sub(1);
                let computed = usage.prompt_tokens.saturating_sub(usage.cached_tokens);
                let rate = |n: u32, secs: f64| if secs > 0.0 { f64::from(n) / secs } else { 0.0 };
                return Ok((
                    RunFigures {
                        run: 0,
                        tokens_generated: usage.completion_tokens,
                        prompt_tokens: usage.prompt_tokens,
                        cached_tokens: usage.cached_tokens,
                        time_to_first_token_ms: ttft * 1000.0,
                        total_time_ms: total_time.as_secs_f64() * 1000.0,
                        tokens_per_second: rate(after_first, decode),
                        prompt_tokens_per_second: rate(computed, ttft),
                        finish_reason: crate::chat::answer::finish_reason(finish_reason, false)
                            .as_str()
                            .into(),
                    },
                    text,
                ));
            }
            Event::Error(e) => return Err(e.into()),
        }
    }
    Err(ApiError::Internal("generation ended unexpectedly".into()))
}

/// `GET /admin/models/{id}/performance`: a loaded model's settings and what it has measured,
/// in the first Opta-LMX's fields (the CLI's `models info`): load settings as `performance`,
/// the configured defaults as `global_defaults`, the scheduler's live rates and totals as
/// `measured`, and its latest stored benchmark.
pub async fn performance(
    State(state): State<AppState>,
    ApiPath(path): ApiPath<String>,
) -> Result<Json<Value>, ApiError> {
    let Some(id) = path.strip_suffix("/performance") else {
        return Err(ApiError::NotFound(format!(
            "no admin route /admin/models/{path}; a model's facts are at /admin/models/{{id}}/performance"
        )));
    };
    let m = state
        .registry
        .get(id)
        .ok_or_else(|| ApiError::ModelNotFound(format!("model `{id}` is not loaded")))?;
    let config = state.config();
    let info = m.engine.info().clone();
    let s = m.engine.stats();
    let store = state.benchmarks.clone();
    let key = m.id.clone();
    let latest = tokio::task::spawn_blocking(move || store.load(Some(&key)).pop())
        .await
        .map_err(|e| ApiError::Internal(format!("benchmark results: {e}")))?;
    let unix = crate::system::unix_time;
    let requests = m.request_count();
    let effective = m.restart_overrides().over(&config.settings_for(&m.id));
    Ok(Json(json!({
        "model_id": m.id,
        "backend_type": backend_of(m.disk.format),
        "loaded_at": unix(m.loaded_at),
        "request_count": requests,
        "last_used_at": (requests > 0).then(|| unix(m.last_used())),
        "memory_gb": gb(m.estimate.total_bytes),
        "context_length": info.context_per_sequence,
        // Continuous batching serves the sequences together unless batch invariance asks
        // for one at a time.
        "use_batching": info.parallel > 1 && !info.batch_invariant,
        "performance": effective,
        "global_defaults": config.settings_for(""),
        "measured": {
            "prompt_tokens_per_second": s.prompt_tokens_per_second,
            "decode_tokens_per_second": s.decode_tokens_per_second,
            "requests_total": s.requests_total,
            "prompt_tokens_total": s.prompt_tokens_total,
            "cached_prompt_tokens_total": s.cached_prompt_tokens_total,
            "completion_tokens_total": s.completion_tokens_total,
            "active_sequences": s.active_sequences,
            "queued_requests": s.queued_requests,
        },
        "benchmark": latest,
    })))
}
