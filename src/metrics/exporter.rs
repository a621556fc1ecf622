//! The Prometheus families behind `/metrics`, all named `opta_lmx_*` with their unit in the
//! name. Counters and histograms are fed as things happen; gauges (queues, memory, loaded
//! models) are read from the registry at scrape time, so they can never drift from it.

use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry as PromRegistry, Unit};

use crate::engine::Usage;
use crate::models::registry::Registry;
use crate::system::{process_rss_bytes, MemorySnapshot};

/// Labels of an HTTP request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route pattern (`/v1/models/{*id}`), never the raw path: raw paths are unbounded.
    pub route: String,
    pub method: String,
    pub status: u16,
    /// The model that served it; empty when none did (errors before routing, admin calls).
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabel {
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelReason {
    model: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelOutcome {
    model: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FinishLabels {
    model: String,
    finish_reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ScopeLabel {
    scope: String,
}

/// A client's name: configured, or one of the first names seen (the rest fold into `other`,
/// see `api::caller`), so the label's values stay bounded.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClientLabel {
    client: String,
}

type F64Gauge = Gauge<f64, AtomicU64>;

/// Latency buckets from 5 ms to about 80 s, doubling.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

/// Per-token gaps: 1 ms to about 4 s.
fn token_gap_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 13))
}

type HistFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every family, registered once.
pub struct Prometheus {
    registry: PromRegistry,
    http_requests: Family<RequestLabels, Counter>,
    prompt_tokens: Family<ModelLabel, Counter>,
    cached_tokens: Family<ModelLabel, Counter>,
    generated_tokens: Family<ModelLabel, Counter>,
    completions: Family<FinishLabels, Counter>,
    ttft: HistFamily<ModelLabel>,
    inter_token: HistFamily<ModelLabel>,
    e2e: HistFamily<ModelLabel>,
    rejected: Family<ModelReason, Counter>,
    cancelled: Family<ModelLabel, Counter>,
    embedding_inputs: Family<ModelLabel, Counter>,
    embedding_tokens: Family<ModelLabel, Counter>,
    loads: Family<ModelOutcome, Counter>,
    unloads: Family<ModelReason, Counter>,
    evictions: Family<ModelReason, Counter>,
    download_bytes: Counter,
    downloads: Family<OutcomeLabel, Counter>,
    verification_failures: Counter,
    auth_failures: Family<ScopeLabel, Counter>,
    client_requests: Family<ClientLabel, Counter>,
    client_rejected: Family<ClientLabel, Counter>,
    // Read at scrape time.
    queue_depth: Family<ModelLabel, Gauge>,
    active_sequences: Family<ModelLabel, Gauge>,
    model_memory: Family<ModelLabel, Gauge>,
    spec_proposed: Family<ModelLabel, Gauge>,
    preemptions: Family<ModelLabel, Gauge>,
    spec_accepted: Family<ModelLabel, Gauge>,
    prefix_hits: Family<ModelLabel, Gauge>,
    prefix_bytes: Family<ModelLabel, Gauge>,
    prefix_files: Family<ModelLabel, Gauge>,
    loaded_models: Gauge,
    process_rss: Gauge,
    system_total: Gauge,
    system_used: Gauge,
    system_available: Gauge,
    memory_threshold: F64Gauge,
}

impl Default for Prometheus {
    fn default() -> Self {
        let mut r = PromRegistry::with_prefix("opta_lmx");
        let me = Self {
            http_requests: Family::default(),
            prompt_tokens: Family::default(),
            cached_tokens: Family::default(),
            generated_tokens: Family::default(),
            completions: Family::default(),
            ttft: Family::new_with_constructor(latency_histogram),
            inter_token: Family::new_with_constructor(token_gap_histogram),
            e2e: Family::new_with_constructor(latency_histogram),
            rejected: Family::default(),
            cancelled: Family::default(),
            embedding_inputs: Family::default(),
            embedding_tokens: Family::default(),
            loads: Family::default(),
            unloads: Family::default(),
            evictions: Family::default(),
            download_bytes: Counter::default(),
            downloads: Family::default(),
            verification_failures: Counter::default(),
            auth_failures: Family::default(),
            client_requests: Family::default(),
            client_rejected: Family::default(),
            queue_depth: Family::default(),
            active_sequences: Family::default(),
            model_memory: Family::default(),
            spec_proposed: Family::default(),
            preemptions: Family::default(),
            spec_accepted: Family::default(),
            prefix_hits: Family::default(),
            prefix_bytes: Family::default(),
            prefix_files: Family::default(),
            loaded_models: Gauge::default(),
            process_rss: Gauge::default(),
            system_total: Gauge::default(),
            system_used: Gauge::default(),
            system_available: Gauge::default(),
            memory_threshold: F64Gauge::default(),
            registry: PromRegistry::default(),
        };
        r.register(
            "http_requests",
            "HTTP requests by route pattern, method, status and serving model",
            me.http_requests.clone(),
        );
        r.register(
            "prompt_tokens",
            "Prompt tokens of finished generations (cached ones included)",
            me.prompt_tokens.clone(),
        );
        r.register(
            "cached_prompt_tokens",
            "Prompt tokens served from the prefix cache instead of being computed",
            me.cached_tokens.clone(),
        );
        r.register(
            "generated_tokens",
            "Tokens generated by finished generations",
            me.generated_tokens.clone(),
        );
        r.register(
            "completions",
            "Finished generations (one per choice) by finish reason",
            me.completions.clone(),
        );
        r.register_with_unit(
            "time_to_first_token",
            "Time from admission (queueing included) to the first generated token",
            Unit::Seconds,
            me.ttft.clone(),
        );
        r.register_with_unit(
            "inter_token_latency",
            "Mean gap between consecutive generated tokens, one observation per generation",
            Unit::Seconds,
            me.inter_token.clone(),
        );
        r.register_with_unit(
            "request_duration",
            "Time from admission to the last token of a generation",
            Unit::Seconds,
            me.e2e.clone(),
        );
        r.register(
            "rejected_requests",
            "Requests refused with 429 because every sequence was busy and the queue full",
            me.rejected.clone(),
        );
        r.register(
            "cancelled_requests",
            "Generations whose client left before the end",
            me.cancelled.clone(),
        );
        r.register(
            "embedding_inputs",
            "Inputs embedded (or scored by a reranker)",
            me.embedding_inputs.clone(),
        );
        r.register(
            "embedding_tokens",
            "Tokens of embedded (or reranked) inputs",
            me.embedding_tokens.clone(),
        );
        r.register(
            "model_loads",
            "Model loads by outcome (loaded, failed, refused)",
            me.loads.clone(),
        );
        r.register(
            "model_unloads",
            "Models unloaded by reason (request, evicted, ttl, failed, shutdown)",
            me.unloads.clone(),
        );
        r.register(
            "model_evictions",
            "Models evicted to make room, by reason (memory, max_loaded_models, ttl)",
            me.evictions.clone(),
        );
        r.register_with_unit(
            "download",
            "Bytes received from the Hub",
            Unit::Bytes,
            me.download_bytes.clone(),
        );
        r.register(
            "downloads",
            "Download jobs that ended, by outcome",
            me.downloads.clone(),
        );
        r.register(
            "download_verification_failures",
            "Downloaded files whose hash did not match the Hub's",
            me.verification_failures.clone(),
        );
        r.register(
            "auth_failures",
            "Requests refused for a missing or wrong key, by scope (api, admin)",
            me.auth_failures.clone(),
        );
        r.register(
            "client_requests",
            "Inference requests by client (bounded names; see clients in the config)",
            me.client_requests.clone(),
        );
        r.register(
            "client_rejected",
            "Requests refused with 429 because their client had max_requests in flight",
            me.client_rejected.clone(),
        );
        r.register(
            "queue_depth",
            "Requests waiting for a sequence",
            me.queue_depth.clone(),
        );
        r.register(
            "active_sequences",
            "Sequences prefilling or generating",
            me.active_sequences.clone(),
        );
        r.register(
            "speculation_proposed_tokens",
            "Proposed tokens the model verified since it was loaded (speculative decoding)",
            me.spec_proposed.clone(),
        );
        r.register(
            "speculation_accepted_tokens",
            "Of those, the tokens the model kept",
            me.spec_accepted.clone(),
        );
        r.register(
            "preemptions",
            "Sequences paused since the model was loaded so a higher-priority request could run",
            me.preemptions.clone(),
        );
        r.register(
            "prompt_cache_hits",
            "Requests since the model was loaded that reused a cached prefix",
            me.prefix_hits.clone(),
        );
        r.register_with_unit(
            "prompt_cache",
            "Memory held by cached prefixes outside the fixed KV cache (MLX models)",
            Unit::Bytes,
            me.prefix_bytes.clone(),
        );
        r.register(
            "prompt_cache_files",
            "Prefixes of the model in the prompt cache's disk tier",
            me.prefix_files.clone(),
        );
        r.register_with_unit(
            "model_memory",
            "Memory a loaded model is counted as (weights, KV cache, buffers)",
            Unit::Bytes,
            me.model_memory.clone(),
        );
        r.register(
            "loaded_models",
            "Models in memory",
            me.loaded_models.clone(),
        );
        r.register_with_unit(
            "process_resident_memory",
            "Resident memory of the server process",
            Unit::Bytes,
            me.process_rss.clone(),
        );
        r.register_with_unit(
            "system_memory_total",
            "Physical memory of the machine",
            Unit::Bytes,
            me.system_total.clone(),
        );
        r.register_with_unit(
            "system_memory_used",
            "Memory in use on the machine",
            Unit::Bytes,
            me.system_used.clone(),
        );
        r.register_with_unit(
            "system_memory_available",
            "Memory available to new allocations",
            Unit::Bytes,
            me.system_available.clone(),
        );
        r.register(
            "memory_threshold_ratio",
            "Share of memory that loads may not push usage past",
            me.memory_threshold.clone(),
        );
        Self { registry: r, ..me }
    }
}

fn model(m: &str) -> ModelLabel {
    ModelLabel {
        model: m.to_string(),
    }
}

fn model_reason(m: &str, reason: &str) -> ModelReason {
    ModelReason {
        model: m.to_string(),
        reason: reason.to_string(),
    }
}

impl Prometheus {
    /// One finished generation.
    pub fn record_completion(
        &self,
        m: &str,
        finish_reason: &str,
        usage: &Usage,
        ttft: Duration,
        total: Duration,
    ) {
        let l = model(m);
        self.prompt_tokens
            .get_or_create(&l)
            .inc_by(u64::from(usage.prompt_tokens));
        self.cached_tokens
            .get_or_create(&l)
            .inc_by(u64::from(usage.cached_tokens));
        self.generated_tokens
            .get_or_create(&l)
            .inc_by(u64::from(usage.completion_tokens));
        self.completions
            .get_or_create(&FinishLabels {
                model: m.to_string(),
                finish_reason: finish_reason.to_string(),
            })
            .inc();
        self.ttft.get_or_create(&l).observe(ttft.as_secs_f64());
        self.e2e.get_or_create(&l).observe(total.as_secs_f64());
        if usage.completion_tokens > 1 {
            let gap =
                total.saturating_sub(ttft).as_secs_f64() / f64::from(usage.completion_tokens - 1);
            self.inter_token.get_or_create(&l).observe(gap);
        }
    }

    /// One HTTP request answered.
    pub fn record_request(&self, labels: RequestLabels) {
        self.http_requests.get_or_create(&labels).inc();
    }

    /// A request refused because the model's queue was full.
    pub fn record_rejected(&self, m: &str) {
        self.rejected
            .get_or_create(&model_reason(m, "queue_full"))
            .inc();
    }

    /// One embedding (or cross-encoder rerank) request's inputs and their tokens.
    pub fn record_embeddings(&self, m: &str, inputs: u64, tokens: u64) {
        self.embedding_inputs
            .get_or_create(&model(m))
            .inc_by(inputs);
        self.embedding_tokens
            .get_or_create(&model(m))
            .inc_by(tokens);
    }

    /// A generation whose client left.
    pub fn record_cancelled(&self, m: &str) {
        self.cancelled.get_or_create(&model(m)).inc();
    }

    /// A load attempt: `loaded`, `failed` (the engine refused it) or `refused` (no room).
    pub fn record_load(&self, m: &str, outcome: &str) {
        self.loads
            .get_or_create(&ModelOutcome {
                model: m.to_string(),
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// A model left memory; evictions (`evicted`, `ttl`) are counted with their cause too.
    pub fn record_unload(&self, m: &str, reason: &str) {
        self.unloads.get_or_create(&model_reason(m, reason)).inc();
    }

    /// A model evicted: `memory`, `max_loaded_models` or `ttl`.
    pub fn record_eviction(&self, m: &str, reason: &str) {
        self.evictions.get_or_create(&model_reason(m, reason)).inc();
    }

    /// Bytes received from the Hub.
    pub fn record_download_bytes(&self, n: u64) {
        self.download_bytes.inc_by(n);
    }

    /// A download job ended: `ready`, `error`, `cancelled`, `verification_failed`.
    pub fn record_download(&self, outcome: &str) {
        self.downloads
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    /// A downloaded file failed its hash check.
    pub fn record_verification_failure(&self) {
        self.verification_failures.inc();
    }

    /// A request from `client` already counted, refused later at one of its caps
    /// (`clients[].max_queued`, checked against the model it names).
    pub fn record_client_refused(&self, client: &str) {
        let label = ClientLabel {
            client: client.to_string(),
        };
        self.client_rejected.get_or_create(&label).inc();
    }

    /// One inference request from `client`; `rejected` when its client was at its cap.
    pub fn record_client(&self, client: &str, rejected: bool) {
        let label = ClientLabel {
            client: client.to_string(),
        };
        self.client_requests.get_or_create(&label).inc();
        if rejected {
            self.client_rejected.get_or_create(&label).inc();
        }
    }

    /// A request with a missing or wrong key: `api` or `admin`.
    pub fn record_auth_failure(&self, scope: &str) {
        self.auth_failures
            .get_or_create(&ScopeLabel {
                scope: scope.to_string(),
            })
            .inc();
    }

    /// The exposition text, with the gauges read from `models` and the system now.
    pub fn render(&self, models: &Registry, threshold_percent: f64) -> String {
        self.queue_depth.clear();
        self.active_sequences.clear();
        self.model_memory.clear();
        self.spec_proposed.clear();
        self.preemptions.clear();
        self.spec_accepted.clear();
        self.prefix_hits.clear();
        self.prefix_bytes.clear();
        self.prefix_files.clear();
        let loaded = models.loaded();
        for m in &loaded {
            let stats = m.engine.stats();
            let l = model(&m.id);
            self.queue_depth
                .get_or_create(&l)
                .set(i64::from(stats.queued_requests));
            self.active_sequences
                .get_or_create(&l)
                .set(i64::from(stats.active_sequences));
            self.model_memory
                .get_or_create(&l)
                .set(clamp_i64(m.estimate.total_bytes));
            let spec = stats.speculation;
            self.spec_proposed
                .get_or_create(&l)
                .set(clamp_i64(spec.proposed_tokens_total));
            self.spec_accepted
                .get_or_create(&l)
                .set(clamp_i64(spec.accepted_tokens_total));
            self.preemptions
                .get_or_create(&l)
                .set(clamp_i64(stats.preemption.paused_total));
            self.prefix_hits
                .get_or_create(&l)
                .set(clamp_i64(stats.prompt_cache_hits_total));
            if let Some(b) = stats.prompt_cache_bytes {
                self.prefix_bytes.get_or_create(&l).set(clamp_i64(b));
            }
            if let Some(n) = stats.prompt_cache_files {
                self.prefix_files.get_or_create(&l).set(i64::from(n));
            }
        }
        self.loaded_models.set(loaded.len() as i64);
        let mem = MemorySnapshot::read();
        self.process_rss.set(clamp_i64(process_rss_bytes()));
        self.system_total.set(clamp_i64(mem.total_bytes));
        self.system_used.set(clamp_i64(mem.used_bytes));
        self.system_available.set(clamp_i64(mem.available_bytes));
        self.memory_threshold.set(threshold_percent / 100.0);
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            // Writing into a String cannot fail; keep the scrape valid regardless.
            out.clear();
            let _ = writeln!(out, "# EOF");
        }
        out
    }
}

fn clamp_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_prefix_and_units() {
        let p = Prometheus::default();
        p.record_completion(
            "m",
            "stop",
            &Usage {
                prompt_tokens: 7,
                completion_tokens: 3,
                cached_tokens: 2,
            },
            Duration::from_millis(100),
            Duration::from_millis(300),
        );
        p.record_download_bytes(10);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &p.registry).unwrap();
        for line in [
            "opta_lmx_prompt_tokens_total{model=\"m\"} 7",
            "opta_lmx_cached_prompt_tokens_total{model=\"m\"} 2",
            "opta_lmx_generated_tokens_total{model=\"m\"} 3",
            "opta_lmx_time_to_first_token_seconds_count{model=\"m\"} 1",
            "opta_lmx_inter_token_latency_seconds_sum{model=\"m\"} 0.1",
            "opta_lmx_download_bytes_total 10",
            "opta_lmx_completions_total{model=\"m\",finish_reason=\"stop\"} 1",
        ] {
            assert!(out.contains(line), "missing `{line}` in\n{out}");
        }
    }
}
