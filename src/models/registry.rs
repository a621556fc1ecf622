//! Loaded models: which are in memory, how requests find them, and loading and unloading them
//! safely while other requests are being served.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use super::guard::{self, Refusal, Resident, Room, Step};
use super::store::{DeleteError, DiskModel, InvalidModelId, LookupError, ModelStore};
use crate::chat::prompt::ControlText;
use crate::chat::template::{ChatTemplate, ModelHints};
use crate::config::{Config, ModelSettings};
use crate::engine::llama::LoadOptions;
use crate::engine::options::{check_cache_types, Speculation};
use crate::engine::ModelFacts;
use crate::engine::{Backend, EngineError, MemoryEstimate};
use crate::metrics::Metrics;
use crate::models::loader::{GgufLoader, Loader, MlxLoader};
use crate::system::{
    gpu_memory, process_anon_bytes, process_rss_bytes, worker_anon_bytes, MemorySnapshot,
};

impl From<LookupError> for RegistryError {
    fn from(e: LookupError) -> Self {
        match e {
            LookupError::Invalid(e) => Self::InvalidId(e),
            LookupError::Io(e) => Self::Io(e),
        }
    }
}

/// Why a model could not be found, loaded or unloaded.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    InvalidId(#[from] InvalidModelId),
    /// No such model on disk (or alias target).
    #[error("model `{0}` does not exist")]
    NotFound(String),
    /// On disk but not in memory, and loading on demand is off.
    #[error("model `{0}` is not loaded; load it with POST /admin/model/load")]
    NotLoaded(String),
    /// A request named no model and there is no default to use.
    #[error("no model was named and no default model is configured")]
    NoDefault,
    #[error("not enough {resource} to load `{id}`: it needs about {needed_mb} MB but at most {obtainable_mb} MB can be had under the {threshold_percent}% memory threshold (RAM {total_mb} MB, {used_mb} MB in use){}", held_note(held))]
    InsufficientMemory {
        id: String,
        resource: &'static str,
        needed_mb: u64,
        total_mb: u64,
        used_mb: u64,
        /// Free under the threshold plus what evicting every evictable model would free.
        obtainable_mb: u64,
        threshold_percent: f64,
        held: Vec<String>,
    },
    /// `max_loaded_models` is reached and nothing may be evicted.
    #[error("cannot load `{id}`: {max} model(s) are loaded, the max_loaded_models limit, and none can be evicted{}", held_note(held))]
    TooManyModels {
        id: String,
        max: u32,
        held: Vec<String>,
    },
    /// An automatic unload found the model in use again and left it loaded.
    #[error("model `{0}` is in use")]
    Busy(String),
    /// Deleting needs an explicit confirmation.
    #[error("deleting `{0}` needs \"confirm\": true (or ?confirm=true)")]
    ConfirmationRequired(String),
    /// Deleting a loaded model needs `force`.
    #[error("`{0}` is loaded; unload it first or pass \"force\": true")]
    Loaded(String),
    /// Load settings that cannot work together (a quantised V cache without flash
    /// attention, a draft that is not on disk or does not share the target's vocabulary).
    #[error("{param}: {message}")]
    Settings {
        param: &'static str,
        message: String,
    },
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("models directory: {0}")]
    Io(#[from] std::io::Error),
    /// A delete that would reach outside the models directory or past a shared link.
    #[error(transparent)]
    DeleteRefused(DeleteError),
}

fn held_note(held: &[String]) -> String {
    if held.is_empty() {
        String::new()
    } else {
        format!(
            "; loaded models that cannot be evicted: {}",
            held.join(", ")
        )
    }
}

/// Why a model is unloaded: logged, and deciding whether a request in flight keeps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unload {
    /// Asked for (unload, or a forced delete): in-flight requests end with an error.
    Request,
    /// Made room for another load.
    Evicted,
    /// Idle past its TTL.
    Ttl,
    /// The server is stopping.
    Shutdown,
    /// Its engine failed (a worker died): replaced by a fresh load.
    Failed,
    /// Loaded again with a different context (LM Studio's load with `context_length`).
    Reload,
}

impl Unload {
    fn as_str(self) -> &'static str {
        match self {
            Self::Request => "request",
            Self::Evicted => "evicted",
            Self::Ttl => "ttl",
            Self::Shutdown => "shutdown",
            Self::Failed => "failed",
            Self::Reload => "reload",
        }
    }

    /// Automatic unloads lose to a request that arrived meanwhile.
    fn yields_to_requests(self) -> bool {
        matches!(self, Self::Evicted | Self::Ttl)
    }
}

/// Settings a load request may override (over the configured ones for that model).
pub type LoadOverrides = ModelSettings;

/// A model in memory, ready to serve.
pub struct LoadedModel {
    pub id: String,
    pub disk: DiskModel,
    pub engine: Arc<dyn Backend>,
    pub template: ChatTemplate,
    /// Finds control-token text in client strings, so it is tokenized as text.
    pub control: ControlText,
    pub loaded_at: SystemTime,
    pub load_duration: Duration,
    /// What the load was estimated to take (what the guard counts it as).
    pub estimate: MemoryEstimate,
    requests: AtomicU64,
    /// Milliseconds since `loaded_at_instant` of the last request.
    last_used_ms: AtomicU64,
    loaded_at_instant: Instant,
    pinned: AtomicBool,
    /// Idle seconds before unloading; 0 for never.
    ttl_seconds: AtomicU64,
    /// Requests between routing and the engine's queue (see [`ModelLease`]).
    leases: AtomicUsize,
    /// What the load that started it asked for, so a restart after a crash or a hang comes
    /// back with the same context, parallel, speculation and the rest.
    load_overrides: LoadOverrides,
}

/// A request's hold on a model from routing until the engine has it queued, so the model is
/// not evicted in between. Dropping it releases the hold.
pub struct ModelLease(Arc<LoadedModel>);

impl std::ops::Deref for ModelLease {
    type Target = LoadedModel;
    fn deref(&self) -> &LoadedModel {
        &self.0
    }
}

impl Drop for ModelLease {
    fn drop(&mut self) {
        self.0.leases.fetch_sub(1, Ordering::SeqCst);
    }
}

impl ModelLease {
    /// The model itself, for work that must outlive a borrow (prompt building on the blocking
    /// pool). It does not extend the lease: the lease still ends when this guard drops.
    pub fn shared(&self) -> Arc<LoadedModel> {
        Arc::clone(&self.0)
    }

    fn new(m: Arc<LoadedModel>) -> Self {
        m.leases.fetch_add(1, Ordering::SeqCst);
        Self(m)
    }
}

impl LoadedModel {
    /// Whether `name` is this model's id or alternate id (case-insensitive, as clients vary).
    pub fn answers_to(&self, name: &str) -> bool {
        self.id.eq_ignore_ascii_case(name)
            || self
                .disk
                .alternate_ids
                .iter()
                .any(|a| a.eq_ignore_ascii_case(name))
    }

    /// Records a request for the last-use and request-count figures.
    pub fn touch(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.mark_used();
    }

    fn mark_used(&self) {
        let ms = self.loaded_at_instant.elapsed().as_millis() as u64;
        self.last_used_ms.store(ms, Ordering::Relaxed);
    }

    fn last_used_instant(&self) -> Instant {
        self.loaded_at_instant + Duration::from_millis(self.last_used_ms.load(Ordering::Relaxed))
    }

    /// Whether a request is running, queued, or on its way to the queue.
    pub fn busy(&self) -> bool {
        let s = self.engine.stats();
        self.leases.load(Ordering::SeqCst) > 0 || s.active_sequences + s.queued_requests > 0
    }

    /// Whether memory pressure may never evict this model.
    pub fn pinned(&self) -> bool {
        self.pinned.load(Ordering::Relaxed)
    }

    /// Idle seconds before the model is unloaded, if it has a TTL.
    pub fn ttl_seconds(&self) -> Option<u64> {
        Some(self.ttl_seconds.load(Ordering::Relaxed)).filter(|&t| t > 0)
    }

    /// The overrides a restart loads with: its load's, with the pin and TTL as they are now.
    /// What the load that started it asked for, with its pin and TTL as they are now.
    pub fn restart_overrides(&self) -> LoadOverrides {
        LoadOverrides {
            pin: Some(self.pinned()),
            ttl_seconds: Some(self.ttl_seconds.load(Ordering::Relaxed)),
            ..self.load_overrides.clone()
        }
    }

    /// Whether a load asking for `o` needs this model loaded again: a context other than the
    /// one in effect and the one it was asked for (the memory guard may have given less). The
    /// other settings apply to the next fresh load; only the context decides what prompts fit.
    pub fn differs_from(&self, o: &LoadOverrides) -> bool {
        o.context.is_some_and(|c| {
            c != self.engine.info().context_per_sequence && Some(c) != self.load_overrides.context
        })
    }

    fn apply(&self, o: &LoadOverrides) {
        if let Some(p) = o.pin {
            self.pinned.store(p, Ordering::Relaxed);
        }
        if let Some(t) = o.ttl_seconds {
            self.ttl_seconds.store(t, Ordering::Relaxed);
        }
    }

    /// Requests served since load.
    pub fn request_count(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Wall-clock time of the last request, or of the load when none came yet.
    pub fn last_used(&self) -> SystemTime {
        self.loaded_at + Duration::from_millis(self.last_used_ms.load(Ordering::Relaxed))
    }
}

/// What a load did, for the admin API.
#[derive(Debug, Serialize)]
pub struct LoadReport {
    pub model_id: String,
    /// `loaded`, or `already_loaded` when nothing had to be done.
    pub status: &'static str,
    pub memory_bytes: u64,
    pub load_seconds: f64,
    pub context: u32,
    pub parallel: u32,
    pub pinned: bool,
    pub ttl_seconds: Option<u64>,
    /// The load's estimate by part.
    pub memory: MemoryEstimate,
    /// Models unloaded to make room, least recently used first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub evicted: Vec<String>,
}

/// What an unload freed.
#[derive(Debug, Serialize)]
pub struct UnloadReport {
    pub model_id: String,
    pub status: &'static str,
    pub memory_freed_bytes: u64,
}

/// What a delete removed.
#[derive(Debug, Serialize)]
pub struct DeleteReport {
    pub model_id: String,
    pub status: &'static str,
    pub files: Vec<String>,
    pub bytes_freed: u64,
    /// Whether it had to be unloaded first (`force`).
    pub unloaded: bool,
}

/// Use figures that outlive a load, for the inventory.
#[derive(Debug, Clone, Copy)]
pub struct UsageRecord {
    pub requests: u64,
    pub last_used: SystemTime,
}

/// Header facts cached by file identity, so the inventory does not reread headers.
type FactsCache = HashMap<PathBuf, (u64, Option<SystemTime>, Result<ModelFacts, String>)>;

/// What loading a model on disk would be, worked out from its header alone: the guard
/// decides on `estimate`, the engine loads with `opts`, the inventory shows both.
pub struct LoadPlan {
    pub facts: ModelFacts,
    /// The request's settings over the model's configured ones.
    pub settings: ModelSettings,
    pub opts: LoadOptions,
    /// Context tokens per sequence the load would get.
    pub context: u32,
    pub estimate: MemoryEstimate,
}

/// All loaded models plus the store they come from.
pub struct Registry {
    store: ModelStore,
    /// The configuration in effect; a reload swaps it whole (see [`Registry::set_config`]).
    config: arc_swap::ArcSwap<Config>,
    loaded: RwLock<HashMap<String, Arc<LoadedModel>>>,
    /// One load at a time, so two loads cannot both pass the memory check, and concurrent
    /// requests for a model being loaded on demand wait for that one load.
    load_lock: tokio::sync::Mutex<()>,
    /// Requests and last use of models unloaded since start.
    history: Mutex<HashMap<String, UsageRecord>>,
    facts: Mutex<FactsCache>,
    /// Loaders by format.
    gguf: Arc<dyn Loader>,
    mlx: Arc<dyn Loader>,
    /// Loads, unloads and evictions are counted here (the server shares this handle).
    metrics: Metrics,
    /// How loads and probes ended, for `/admin/models/compatibility`.
    outcomes: super::compat::Outcomes,
}

impl Registry {
    /// An empty registry over the configured models directory.
    pub fn new(config: Arc<Config>) -> Self {
        Self {
            store: ModelStore::new(&config.models.directory)
                .preferring(config.models.prefer.as_str()),
            loaded: RwLock::new(HashMap::new()),
            load_lock: tokio::sync::Mutex::new(()),
            history: Mutex::new(HashMap::new()),
            facts: Mutex::new(HashMap::new()),
            gguf: Arc::new(GgufLoader {
                gpu: gpu_memory().is_some(),
            }),
            mlx: Arc::new(MlxLoader {
                python: config.models.mlx.python.clone(),
                heartbeat: Duration::from_secs_f64(config.models.mlx.heartbeat_seconds.max(0.5)),
                prefix_cache_bytes: (config.models.mlx.prefix_cache_gb.max(0.0) * 1e9) as u64,
                // Checked when the configuration was read.
                blas: crate::engine::mlx::blas::preload(&config.models.mlx.blas)
                    .unwrap_or_default(),
            }),
            config: arc_swap::ArcSwap::new(config),
            metrics: Metrics::default(),
            outcomes: Default::default(),
        }
    }

    /// How loads and probes ended since start.
    pub fn outcomes(&self) -> &super::compat::Outcomes {
        &self.outcomes
    }

    /// The server's metrics, which the registry feeds with loads, unloads and evictions.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The loader for a model's format.
    fn loader(&self, disk: &DiskModel) -> Arc<dyn Loader> {
        match disk.format {
            "mlx" => Arc::clone(&self.mlx),
            _ => Arc::clone(&self.gguf),
        }
    }

    /// The configuration in effect now: one snapshot per use, so a request or a load sees one
    /// configuration even when a reload lands meanwhile.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// Puts a reloaded configuration in effect: aliases, per-model settings and limits apply
    /// from the next lookup or load; what is loaded stays as it was loaded.
    pub fn set_config(&self, config: Arc<Config>) {
        self.config.store(config);
    }

    /// The disk store.
    pub fn store(&self) -> &ModelStore {
        &self.store
    }

    /// Loaded models, sorted by id.
    pub fn loaded(&self) -> Vec<Arc<LoadedModel>> {
        let mut v: Vec<_> = self
            .loaded
            .read()
            .expect("registry lock")
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// The model a role name (`models.roles`) means now: its first preference that is
    /// loaded, else its first; `None` for a name that is not a role.
    pub fn role_choice(&self, name: &str) -> Option<String> {
        let config = self.config();
        let prefs = config.models.roles.get(name)?;
        prefs
            .iter()
            .find(|p| self.get(p).is_some())
            .or(prefs.first())
            .cloned()
    }

    /// A loaded model by id, alternate id or alias.
    pub fn get(&self, name: &str) -> Option<Arc<LoadedModel>> {
        let config = self.config();
        let name = config.resolve_alias(name);
        let map = self.loaded.read().expect("registry lock");
        // A model's own id before another's alternate name (one folder, both formats).
        map.get(name)
            .or_else(|| map.values().find(|m| m.answers_to(name)))
            .cloned()
    }

    /// A loaded model with a hold taken while the map is locked, so an eviction (which checks
    /// for holds under the write lock) cannot slip in between finding and holding it.
    fn lease(&self, name: &str) -> Option<ModelLease> {
        let config = self.config();
        let name = config.resolve_alias(name);
        let map = self.loaded.read().expect("registry lock");
        // A model's own id before another's alternate name (one folder, both formats).
        map.get(name)
            .or_else(|| map.values().find(|m| m.answers_to(name)))
            .map(|m| ModelLease::new(Arc::clone(m)))
    }

    /// The model a request's `model` field means: exact id, alias, or the default when empty.
    /// Never substitutes another model for an unknown name.
    pub async fn resolve(&self, requested: Option<&str>) -> Result<ModelLease, RegistryError> {
        let name = match requested.map(str::trim).filter(|s| !s.is_empty()) {
            Some(n) => self.role_choice(n).unwrap_or_else(|| n.to_string()),
            None => match self.config().models.default.clone() {
                Some(d) => d,
                None => {
                    let loaded = self.loaded();
                    match loaded.as_slice() {
                        [only] => {
                            if let Some(l) = self.lease(&only.id) {
                                return Ok(l);
                            }
                            return Err(RegistryError::NoDefault);
                        }
                        _ => return Err(RegistryError::NoDefault),
                    }
                }
            },
        };
        if let Some(l) = self.lease(&name) {
            if l.engine.failed().is_none() {
                return Ok(l);
            }
            // A failed engine (its worker died) is replaced on the next request for it.
            let id = l.id.clone();
            drop(l);
            self.load(&id, &LoadOverrides::default()).await?;
            return self.lease(&id).ok_or(RegistryError::NotLoaded(name));
        }
        let target = self.config().resolve_alias(&name).to_string();
        let disk = self
            .store
            .lookup(&target, None)
            .await?
            .ok_or_else(|| RegistryError::NotFound(name.clone()))?;
        if !self.config().models.load_on_demand {
            return Err(RegistryError::NotLoaded(name));
        }
        tracing::info!(event = "model_load_on_demand", model = %disk.id);
        self.load(&disk.id, &LoadOverrides::default()).await?;
        self.lease(&disk.id).ok_or(RegistryError::NotLoaded(name))
    }

    /// Loads a model from disk (a no-op apart from pin and TTL if it is already loaded),
    /// first making room under the memory threshold and `max_loaded_models` by evicting least
    /// recently used idle, unpinned models, or refusing when that cannot be done.
    pub async fn load(
        &self,
        id: &str,
        overrides: &LoadOverrides,
    ) -> Result<LoadReport, RegistryError> {
        self.load_as(id, overrides, None).await
    }

    /// [`Self::load`] of the copy in one format (`gguf`, `mlx`) when `format` names one, for
    /// a model on disk in both.
    pub async fn load_as(
        &self,
        id: &str,
        overrides: &LoadOverrides,
        format: Option<&str>,
    ) -> Result<LoadReport, RegistryError> {
        let _guard = self.load_lock.lock().await;
        let config = self.config();
        let target = config.resolve_alias(id);
        let loaded = self
            .get(target)
            .filter(|m| format.is_none_or(|f| m.disk.format == f));
        let mut restart = None;
        if let Some(m) = loaded {
            match m.engine.failed() {
                None if m.differs_from(overrides) => {
                    tracing::info!(event = "model_reload", model = %m.id, context = ?overrides.context, was = m.engine.info().context_per_sequence);
                    restart = Some(overrides.over(&m.restart_overrides()));
                    let id = m.id.clone();
                    drop(m);
                    self.unload_reason(&id, Unload::Reload).await?;
                }
                None => {
                    m.apply(overrides);
                    return Ok(report(&m, "already_loaded", Vec::new()));
                }
                Some(why) => {
                    tracing::warn!(event = "model_reload_after_failure", model = %m.id, error = %why);
                    restart = Some(overrides.over(&m.restart_overrides()));
                    let id = m.id.clone();
                    drop(m);
                    self.unload_reason(&id, Unload::Failed).await?;
                }
            }
        }
        let overrides = restart.as_ref().unwrap_or(overrides);
        // A fresh walk (an admin load may name a file copied in a moment ago), off the runtime.
        let (name, fmt) = (target.to_string(), format.map(String::from));
        let disk = self
            .on_store(move |store| store.find_as(&name, fmt.as_deref()))
            .await??
            .ok_or_else(|| RegistryError::NotFound(id.to_string()))?;

        let LoadPlan {
            settings,
            opts,
            estimate,
            facts,
            ..
        } = self.plan(&disk, overrides)?;
        let evicted = self.make_room(&disk.id, &estimate).await?;

        let started = Instant::now();
        tracing::info!(event = "model_load_started", model = %disk.id, context = opts.context, parallel = opts.parallel, max_queue = opts.max_queue, estimated_bytes = estimate.total_bytes);
        // The control-token finder is built here too: thousands of patterns, CPU work.
        let engine = {
            let loader = self.loader(&disk);
            let disk = disk.clone();
            tokio::task::spawn_blocking(move || {
                loader.load(&disk, &facts, &opts).map(|e| {
                    let control = ControlText::new(e.control_texts());
                    (e, control)
                })
            })
            .await
            .map_err(|e| EngineError::Load(format!("loader crashed: {e}")))?
        };
        let (engine, control): (Arc<dyn Backend>, ControlText) = match engine {
            Ok((e, c)) => (e, c),
            Err(e) => {
                tracing::warn!(event = "model_load_failed", model = %disk.id, error = %e);
                self.metrics.prometheus().record_load(&disk.id, "failed");
                self.outcomes
                    .record(&disk.id, disk.format, false, e.to_string(), "load");
                self.metrics.events().emit(
                    "model_load_failed",
                    serde_json::json!({"model_id": disk.id, "error": e.to_string()}),
                );
                return Err(e.into());
            }
        };
        let (bos, eos) = engine.special_tokens();
        let hints = ModelHints {
            architecture: &engine.info().architecture,
            has_llama3_headers: engine.has_special_token("<|start_header_id|>"),
        };
        let template = ChatTemplate::new(engine.chat_template_source(), &hints, &bos, &eos);
        let prior = self.history.lock().expect("history lock").remove(&disk.id);
        let model = Arc::new(LoadedModel {
            id: disk.id.clone(),
            disk,
            engine,
            template,
            control,
            loaded_at: SystemTime::now(),
            load_duration: started.elapsed(),
            estimate,
            requests: AtomicU64::new(prior.map_or(0, |p| p.requests)),
            last_used_ms: AtomicU64::new(0),
            loaded_at_instant: Instant::now(),
            pinned: AtomicBool::new(settings.pin.unwrap_or(false)),
            ttl_seconds: AtomicU64::new(settings.ttl_seconds.unwrap_or(0)),
            leases: AtomicUsize::new(0),
            load_overrides: overrides.clone(),
        });
        tracing::info!(
            event = "model_loaded",
            model = %model.id,
            memory_bytes = model.estimate.total_bytes,
            seconds = model.load_duration.as_secs_f64(),
            pinned = model.pinned(),
            ttl_seconds = model.ttl_seconds().unwrap_or(0),
            template = ?model.template.source(),
        );
        self.loaded
            .write()
            .expect("registry lock")
            .insert(model.id.clone(), Arc::clone(&model));
        self.metrics.prometheus().record_load(&model.id, "loaded");
        self.outcomes
            .record(&model.id, model.disk.format, true, "loaded", "load");
        let info = model.engine.info();
        self.metrics.events().emit(
            "model_loaded",
            serde_json::json!({
                "model_id": model.id,
                "format": model.disk.format,
                "memory_bytes": model.estimate.total_bytes,
                "load_seconds": model.load_duration.as_secs_f64(),
                "context": info.context_per_sequence,
                "parallel": info.parallel,
                "evicted": evicted,
            }),
        );
        Ok(report(&model, "loaded", evicted))
    }

    /// Memory left under the threshold now. Other programs are measured by the OS; this
    /// process and its model workers count as the larger of their resident size and their
    /// models' estimates, because mapped weights show as reclaimable cache rather than used
    /// memory. A worker's memory is ours, not another program's: counted in both it was
    /// counted twice, and an MLX model seemed to hold double its size.
    fn room(&self) -> Room {
        let mem = MemorySnapshot::read();
        let threshold = self.config().memory.threshold_percent;
        let budget = mem.limit_bytes(threshold);
        let loaded = self.loaded();
        let workers: u64 = loaded
            .iter()
            .filter_map(|m| m.engine.worker())
            .map(|(pid, _)| worker_anon_bytes(pid))
            .sum();
        let others = mem
            .used_bytes
            .saturating_sub(process_anon_bytes() + workers);
        let estimated: u64 = loaded.iter().map(|m| m.estimate.ram_bytes).sum();
        let ours = (process_rss_bytes() + workers).max(estimated);
        let gpu_headroom = gpu_memory()
            .map(|(total, free)| MemorySnapshot::from_parts(total, free).headroom_bytes(threshold));
        Room {
            ram_headroom: budget.saturating_sub(others + ours),
            gpu_headroom,
            ram_total: mem.total_bytes,
            ram_used: mem.used_bytes,
        }
    }

    /// Evicts until `need` fits, or says why it cannot. Returns the evicted ids.
    async fn make_room(
        &self,
        id: &str,
        need: &MemoryEstimate,
    ) -> Result<Vec<String>, RegistryError> {
        let mut evicted = Vec::new();
        // Prefixes are dropped once per load; after that they count as nothing to reclaim.
        let mut dropped_prefixes = false;
        loop {
            let resident: Vec<Resident> = self
                .loaded()
                .iter()
                .map(|m| Resident {
                    id: m.id.clone(),
                    last_used: m.last_used_instant(),
                    estimate: m.estimate,
                    pinned: m.pinned(),
                    busy: m.busy(),
                    prefix_cache_bytes: if dropped_prefixes {
                        0
                    } else {
                        m.engine.prefix_cache_bytes()
                    },
                })
                .collect();
            let room = self.room();
            match guard::next_step(
                need,
                room,
                &resident,
                self.config().models.max_loaded_models,
            ) {
                Step::Load => return Ok(evicted),
                Step::DropPrefixes => {
                    dropped_prefixes = true;
                    let held: u64 = resident.iter().map(|r| r.prefix_cache_bytes).sum();
                    tracing::info!(event = "prefix_cache_dropped", for_model = %id, bytes = held, needed_bytes = need.ram_bytes, headroom_bytes = room.ram_headroom);
                    let engines: Vec<_> = self
                        .loaded()
                        .iter()
                        .map(|m| Arc::clone(&m.engine))
                        .collect();
                    let _ = tokio::task::spawn_blocking(move || {
                        for e in engines {
                            e.release_prefix_cache();
                        }
                    })
                    .await;
                }
                Step::Evict { id: victim, reason } => {
                    tracing::info!(event = "model_evicted", model = %victim, reason, for_model = %id, needed_bytes = need.ram_bytes, headroom_bytes = room.ram_headroom);
                    match self.unload_reason(&victim, Unload::Evicted).await {
                        Ok(_) => {
                            self.metrics.prometheus().record_eviction(&victim, reason);
                            evicted.push(victim)
                        }
                        Err(RegistryError::Busy(_)) => continue,
                        Err(e) => return Err(e),
                    }
                }
                Step::Refuse(r) => {
                    let threshold_percent = self.config().memory.threshold_percent;
                    let err = match r {
                        Refusal::Memory {
                            resource,
                            needed,
                            obtainable,
                            held,
                        } => RegistryError::InsufficientMemory {
                            id: id.to_string(),
                            resource,
                            needed_mb: needed.div_ceil(1_000_000),
                            total_mb: room.ram_total / 1_000_000,
                            used_mb: room.ram_used / 1_000_000,
                            obtainable_mb: obtainable / 1_000_000,
                            threshold_percent,
                            held,
                        },
                        Refusal::Count { max, held } => RegistryError::TooManyModels {
                            id: id.to_string(),
                            max,
                            held,
                        },
                    };
                    tracing::warn!(event = "model_load_refused", model = %id, reason = %err);
                    self.metrics.prometheus().record_load(id, "refused");
                    self.metrics.events().emit(
                        "memory_warning",
                        serde_json::json!({"model_id": id, "action": "load_refused", "reason": err.to_string()}),
                    );
                    return Err(err);
                }
            }
        }
    }

    /// Unloads a model: it stops taking requests at once, in-flight ones end with an error,
    /// and its memory is released before this returns.
    pub async fn unload(&self, id: &str) -> Result<UnloadReport, RegistryError> {
        self.unload_reason(id, Unload::Request).await
    }

    async fn unload_reason(&self, id: &str, reason: Unload) -> Result<UnloadReport, RegistryError> {
        let target = self.config().resolve_alias(id).to_string();
        let removed = {
            let mut map = self.loaded.write().expect("registry lock");
            let target = target.as_str();
            // A model's own id before another's alternate name, as in `get`.
            let key = if map.contains_key(target) {
                Some(target.to_string())
            } else {
                map.values()
                    .find(|m| m.answers_to(target))
                    .map(|m| m.id.clone())
            };
            match key {
                Some(k) if reason.yields_to_requests() && map[&k].busy() => {
                    // An eviction or TTL expiry lost a race with a new request: keep it.
                    return Err(RegistryError::Busy(k));
                }
                Some(k) => map.remove(&k),
                None => None,
            }
        };
        // Not loaded: say whether it is on disk at all, looked up outside the lock.
        let Some(model) = removed else {
            return Err(match self.store.lookup(&target, None).await? {
                Some(d) => RegistryError::NotLoaded(d.id),
                None => RegistryError::NotFound(id.to_string()),
            });
        };
        let freed = model.estimate.total_bytes;
        let engine = Arc::clone(&model.engine);
        let _ = tokio::task::spawn_blocking(move || engine.shutdown()).await;
        self.history.lock().expect("history lock").insert(
            model.id.clone(),
            UsageRecord {
                requests: model.request_count(),
                last_used: model.last_used(),
            },
        );
        tracing::info!(event = "model_unloaded", model = %model.id, reason = reason.as_str(), memory_freed_bytes = freed);
        self.metrics
            .prometheus()
            .record_unload(&model.id, reason.as_str());
        self.metrics.events().emit(
            "model_unloaded",
            serde_json::json!({"model_id": model.id, "reason": reason.as_str(), "memory_freed_bytes": freed}),
        );
        let report = UnloadReport {
            model_id: model.id.clone(),
            status: "unloaded",
            memory_freed_bytes: freed,
        };
        // The weights and KV are freed with the last handle (this one, unless a request still
        // ends on it); then what the allocator kept goes back to the system.
        drop(model);
        let _ = tokio::task::spawn_blocking(crate::system::release_freed_memory).await;
        Ok(report)
    }

    /// Unloads everything (server shutdown).
    pub async fn unload_all(&self) {
        for m in self.loaded() {
            let _ = self.unload_reason(&m.id, Unload::Shutdown).await;
        }
    }

    /// Requests and last use of a model, loaded or unloaded since start.
    pub fn usage(&self, id: &str) -> Option<UsageRecord> {
        match self.loaded.read().expect("registry lock").get(id) {
            Some(m) => Some(UsageRecord {
                requests: m.request_count(),
                last_used: m.last_used(),
            }),
            None => self.history.lock().expect("history lock").get(id).copied(),
        }
    }

    /// Header facts of a model file, read once per file version.
    pub fn facts(&self, disk: &DiskModel) -> Result<ModelFacts, String> {
        let meta =
            std::fs::metadata(&disk.path).map_err(|e| format!("{}: {e}", disk.path.display()))?;
        let key = (meta.len(), meta.modified().ok());
        if let Some((len, mtime, f)) = self.facts.lock().expect("facts lock").get(&disk.path) {
            if (*len, *mtime) == key {
                return f.clone();
            }
        }
        let f = self.loader(disk).facts(disk);
        self.facts
            .lock()
            .expect("facts lock")
            .insert(disk.path.clone(), (key.0, key.1, f.clone()));
        f
    }

    /// Whether a model on disk is for chat, embeddings or reranking (its header, cached);
    /// chat when it cannot be read. Blocking: it may read the header.
    pub fn kind_of(&self, disk: &DiskModel) -> crate::engine::ModelKind {
        self.facts(disk).map(|f| f.kind).unwrap_or_default()
    }

    /// What loading a model on disk with `overrides` over its configured settings would be,
    /// its draft model (for draft speculation) included.
    pub fn plan(
        &self,
        disk: &DiskModel,
        overrides: &LoadOverrides,
    ) -> Result<LoadPlan, RegistryError> {
        let facts = self.facts(disk).map_err(EngineError::Load)?;
        let settings = overrides.over(&self.config().settings_for(&disk.id));
        let mut opts = load_options(&settings);
        check_cache_types(opts.cache_type_v, opts.flash_attention).map_err(|message| {
            RegistryError::Settings {
                param: "cache_type_v",
                message,
            }
        })?;
        opts.prompt_cache = self.config().models.prompt_cache.disk_config();
        if overrides.context.is_none() && !self.config().sets_context_for(&disk.id) {
            self.fit_default_context(&facts, disk, &mut opts);
        }
        let (context, mut estimate) = self.loader(disk).size(&facts, disk, &opts);
        if opts.speculation == Speculation::Draft {
            let draft = self.draft_for(disk, &facts, settings.draft_model.as_deref())?;
            let draft_facts = self.facts(&draft).map_err(EngineError::Load)?;
            let (_, d) = self.loader(&draft).size(&draft_facts, &draft, &opts);
            estimate = estimate.plus(&d);
            opts.draft = Some(draft.path);
        }
        Ok(LoadPlan {
            settings,
            context,
            estimate,
            facts,
            opts,
        })
    }

    /// The context of a model loaded with no context setting (config, CLI, request): the one
    /// it was trained for where memory allows, because agents need it (the coding CLI's system
    /// prompt and 25 tools alone take 3,000+ tokens and it assumes 32,768; at the old fixed
    /// 4,096 its second turn of an edit task ran out). Halved until the load fits the memory
    /// guard's headroom now, never below the built-in 4,096; any reduction is logged with the
    /// numbers, at warning level when it leaves less than an agent's turn needs.
    fn fit_default_context(&self, facts: &ModelFacts, disk: &DiskModel, opts: &mut LoadOptions) {
        let floor = opts.context;
        let trained = facts.context_train.max(floor);
        let headroom =
            MemorySnapshot::read().headroom_bytes(self.config().memory.threshold_percent);
        let loader = self.loader(disk);
        let mut context = trained;
        let mut bytes;
        loop {
            opts.context = context;
            bytes = loader.size(facts, disk, opts).1.total_bytes;
            if bytes <= headroom || context <= floor {
                break;
            }
            context = (context / 2).max(floor);
        }
        if context < trained {
            let gb = |b: u64| b as f64 / 1e9;
            if context < AGENT_CONTEXT {
                tracing::warn!(model = %disk.id, context, trained, parallel = opts.parallel, estimated_gb = gb(bytes), headroom_gb = gb(headroom), "default context reduced below what a coding agent's turn needs ({AGENT_CONTEXT} tokens) to fit memory; set `context` (and fewer `parallel` sequences) to choose");
            } else {
                tracing::info!(model = %disk.id, context, trained, parallel = opts.parallel, estimated_gb = gb(bytes), headroom_gb = gb(headroom), "default context reduced from the trained one to fit memory");
            }
        }
    }

    /// The draft model named for `target`: one on disk in its format whose vocabulary is the
    /// target's (same size; the tokens themselves are compared when both are loaded).
    fn draft_for(
        &self,
        target: &DiskModel,
        target_facts: &ModelFacts,
        draft_id: Option<&str>,
    ) -> Result<DiskModel, RegistryError> {
        let bad = |message: String| RegistryError::Settings {
            param: "draft_model",
            message,
        };
        let Some(id) = draft_id.filter(|id| !id.is_empty()) else {
            return Err(RegistryError::Settings {
                param: "speculation",
                message: "`draft` speculation needs a `draft_model`".into(),
            });
        };
        // A draft runs in the target's engine: a GGUF file for llama.cpp, an MLX folder for
        // the MLX worker.
        let draft = self
            .store
            .find_as(
                self.config().resolve_alias(id).to_string().as_str(),
                Some(target.format),
            )?
            .ok_or_else(|| {
                bad(format!(
                    "draft model `{id}` is not on disk as a {} model",
                    target.format.to_uppercase()
                ))
            })?;
        if draft.id == target.id {
            return Err(bad(format!("`{id}` cannot be its own draft")));
        }
        let facts = self.facts(&draft).map_err(EngineError::Load)?;
        if facts.vocab_size != target_facts.vocab_size {
            return Err(bad(format!(
                "draft model `{}` has a vocabulary of {} tokens and `{}` one of {}: a draft must share the target's vocabulary",
                draft.id, facts.vocab_size, target.id, target_facts.vocab_size
            )));
        }
        Ok(draft)
    }

    /// Removes a model's files from disk. A loaded model is refused unless `force`, which
    /// unloads it first (its in-flight requests end with an error).
    pub async fn delete(&self, id: &str, force: bool) -> Result<DeleteReport, RegistryError> {
        let target = self.config().resolve_alias(id).to_string();
        let disk = self
            .on_store(move |store| store.find(&target))
            .await??
            .ok_or_else(|| RegistryError::NotFound(id.to_string()))?;
        let _guard = self.load_lock.lock().await;
        let unloaded = if self.get(&disk.id).is_some() {
            if !force {
                return Err(RegistryError::Loaded(disk.id));
            }
            self.unload_reason(&disk.id, Unload::Request).await?;
            true
        } else {
            false
        };
        let files = {
            let disk = disk.clone();
            self.on_store(move |store| store.delete(&disk))
                .await?
                .map_err(|e| match e {
                    DeleteError::Io(e) => RegistryError::Io(e),
                    e => RegistryError::DeleteRefused(e),
                })?
        };
        self.history.lock().expect("history lock").remove(&disk.id);
        let report = DeleteReport {
            model_id: disk.id.clone(),
            status: "deleted",
            files: files
                .iter()
                .map(|p| {
                    p.strip_prefix(self.store.root())
                        .unwrap_or(p)
                        .display()
                        .to_string()
                })
                .collect(),
            bytes_freed: disk.size_bytes,
            unloaded,
        };
        tracing::info!(event = "model_deleted", model = %report.model_id, bytes = report.bytes_freed, unloaded);
        Ok(report)
    }

    /// Runs a disk operation of the store on the blocking pool (scans walk folders).
    async fn on_store<T: Send + 'static>(
        &self,
        op: impl FnOnce(&ModelStore) -> T + Send + 'static,
    ) -> Result<T, RegistryError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || op(&store))
            .await
            .map_err(|e| RegistryError::Io(std::io::Error::other(e.to_string())))
    }

    /// Unloads models idle past their TTL and restarts failed ones, checking every half
    /// second until the registry is dropped. A model seen busy counts as used at that moment, so a long request does not
    /// leave it looking idle since its start.
    pub fn spawn_reaper(self: &Arc<Self>) {
        let weak: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                let Some(reg) = weak.upgrade() else { return };
                for m in reg.loaded() {
                    // A failed engine (its worker died or stopped answering) is restarted.
                    if let Some(why) = m.engine.failed() {
                        tracing::warn!(event = "model_restart", model = %m.id, error = %why);
                        let format = m.disk.format;
                        let id = m.id.clone();
                        drop(m);
                        if let Err(e) = reg
                            .load_as(&id, &LoadOverrides::default(), Some(format))
                            .await
                        {
                            tracing::error!(event = "model_restart_failed", model = %id, error = %e);
                        }
                        continue;
                    }
                    if m.busy() {
                        m.mark_used();
                        continue;
                    }
                    let Some(ttl) = m.ttl_seconds() else { continue };
                    if m.last_used_instant().elapsed() >= Duration::from_secs(ttl) {
                        tracing::info!(event = "model_evicted", model = %m.id, reason = "ttl", ttl_seconds = ttl);
                        if reg.unload_reason(&m.id, Unload::Ttl).await.is_ok() {
                            reg.metrics.prometheus().record_eviction(&m.id, "ttl");
                        }
                    }
                }
            }
        });
    }
}

/// Context per sequence below which a coding agent's turn does not fit: the CLI's 3,500-token
/// system prompt and tools plus 4,000 tokens of history, with room to answer.
const AGENT_CONTEXT: u32 = 16384;

/// Engine options from layered settings; what no layer set is [`ModelSettings::builtin`].
fn load_options(s: &ModelSettings) -> LoadOptions {
    let cores = std::thread::available_parallelism().map_or(4, |n| n.get() as u32);
    let s = s.over(&ModelSettings::builtin());
    LoadOptions {
        context: s.context.unwrap_or(4096).max(16),
        parallel: s.parallel.unwrap_or(8).clamp(1, 256),
        max_queue: s.max_queue.unwrap_or(32),
        gpu_layers: s.gpu_layers.unwrap_or(0),
        // More threads than cores only makes them wait for each other.
        threads: s
            .threads
            .unwrap_or_else(crate::system::default_threads)
            .clamp(1, cores),
        batch_invariant: s.batch_invariant.unwrap_or(false),
        rendered_markers: crate::chat::dialect::MARKERS.map(String::from).to_vec(),
        prompt_cache: None,
        cache_type_k: s.cache_type_k.unwrap_or_default(),
        cache_type_v: s.cache_type_v.unwrap_or_default(),
        flash_attention: s.flash_attention.unwrap_or_default(),
        speculation: s.speculation.unwrap_or_default(),
        draft: None,
        draft_max: s.draft_max.unwrap_or(8),
        speculation_adaptive: s.speculation_adaptive.unwrap_or(true),
    }
}

fn report(m: &LoadedModel, status: &'static str, evicted: Vec<String>) -> LoadReport {
    let info = m.engine.info();
    LoadReport {
        pinned: m.pinned(),
        ttl_seconds: m.ttl_seconds(),
        memory: m.estimate,
        evicted,
        model_id: m.id.clone(),
        status,
        memory_bytes: m.estimate.total_bytes,
        load_seconds: m.load_duration.as_secs_f64(),
        context: info.context_per_sequence,
        parallel: info.parallel,
    }
}
