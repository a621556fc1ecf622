//! Loaded models: which are in memory, how requests find them, and loading and unloading them
//! safely while other requests are being served.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use super::store::{DiskModel, InvalidModelId, ModelStore};
use crate::chat::template::{ChatTemplate, ModelHints};
use crate::config::{Config, ModelSettings};
use crate::engine::llama::{LlamaEngine, LoadOptions};
use crate::engine::{Backend, EngineError};
use crate::system::MemorySnapshot;

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
    #[error("not enough memory to load `{id}`: it needs about {needed_mb} MB but only {headroom_mb} MB are free under the {threshold_percent}% memory threshold")]
    InsufficientMemory {
        id: String,
        needed_mb: u64,
        headroom_mb: u64,
        threshold_percent: f64,
    },
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("models directory: {0}")]
    Io(#[from] std::io::Error),
}

/// Settings a load request may override (over the configured ones for that model).
pub type LoadOverrides = ModelSettings;

/// A model in memory, ready to serve.
pub struct LoadedModel {
    pub id: String,
    pub disk: DiskModel,
    pub engine: Arc<dyn Backend>,
    pub template: ChatTemplate,
    pub loaded_at: SystemTime,
    pub load_duration: Duration,
    requests: AtomicU64,
    /// Milliseconds since `loaded_at_instant` of the last request.
    last_used_ms: AtomicU64,
    loaded_at_instant: Instant,
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
        let ms = self.loaded_at_instant.elapsed().as_millis() as u64;
        self.last_used_ms.store(ms, Ordering::Relaxed);
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
}

/// What an unload freed.
#[derive(Debug, Serialize)]
pub struct UnloadReport {
    pub model_id: String,
    pub status: &'static str,
    pub memory_freed_bytes: u64,
}

/// All loaded models plus the store they come from.
pub struct Registry {
    store: ModelStore,
    config: Arc<Config>,
    loaded: RwLock<HashMap<String, Arc<LoadedModel>>>,
    /// One load at a time, so two loads cannot both pass the memory check.
    load_lock: tokio::sync::Mutex<()>,
}

impl Registry {
    /// An empty registry over the configured models directory.
    pub fn new(config: Arc<Config>) -> Self {
        Self {
            store: ModelStore::new(&config.models.directory),
            config,
            loaded: RwLock::new(HashMap::new()),
            load_lock: tokio::sync::Mutex::new(()),
        }
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

    /// A loaded model by id, alternate id or alias.
    pub fn get(&self, name: &str) -> Option<Arc<LoadedModel>> {
        let name = self.config.resolve_alias(name);
        self.loaded
            .read()
            .expect("registry lock")
            .values()
            .find(|m| m.answers_to(name))
            .cloned()
    }

    /// The model a request's `model` field means: exact id, alias, or the default when empty.
    /// Never substitutes another model for an unknown name.
    pub async fn resolve(
        &self,
        requested: Option<&str>,
    ) -> Result<Arc<LoadedModel>, RegistryError> {
        let name = match requested.map(str::trim).filter(|s| !s.is_empty()) {
            Some(n) => n.to_string(),
            None => match &self.config.models.default {
                Some(d) => d.clone(),
                None => {
                    let loaded = self.loaded();
                    match loaded.as_slice() {
                        [only] => return Ok(Arc::clone(only)),
                        _ => return Err(RegistryError::NoDefault),
                    }
                }
            },
        };
        if let Some(m) = self.get(&name) {
            return Ok(m);
        }
        let target = self.config.resolve_alias(&name).to_string();
        let disk = self
            .store
            .find(&target)?
            .ok_or_else(|| RegistryError::NotFound(name.clone()))?;
        if !self.config.models.load_on_demand {
            return Err(RegistryError::NotLoaded(name));
        }
        self.load(&disk.id, &LoadOverrides::default()).await?;
        self.get(&disk.id).ok_or(RegistryError::NotLoaded(name))
    }

    /// Loads a model from disk (a no-op if it is already loaded).
    pub async fn load(
        &self,
        id: &str,
        overrides: &LoadOverrides,
    ) -> Result<LoadReport, RegistryError> {
        let _guard = self.load_lock.lock().await;
        let target = self.config.resolve_alias(id);
        if let Some(m) = self.get(target) {
            return Ok(report(&m, "already_loaded"));
        }
        let disk = self
            .store
            .find(target)?
            .ok_or_else(|| RegistryError::NotFound(id.to_string()))?;

        let mem = MemorySnapshot::read();
        let threshold = self.config.memory.threshold_percent;
        let headroom = mem.headroom_bytes(threshold);
        if disk.size_bytes > headroom {
            return Err(RegistryError::InsufficientMemory {
                id: disk.id.clone(),
                needed_mb: disk.size_bytes / 1_000_000,
                headroom_mb: headroom / 1_000_000,
                threshold_percent: threshold,
            });
        }

        let opts = load_options(&self.config.settings_for(&disk.id), overrides);
        let path = disk.path.clone();
        let started = Instant::now();
        tracing::info!(event = "model_load_started", model = %disk.id, context = opts.context, parallel = opts.parallel, max_queue = opts.max_queue);
        let engine = tokio::task::spawn_blocking(move || LlamaEngine::load(&path, &opts))
            .await
            .map_err(|e| EngineError::Load(format!("loader crashed: {e}")))?;
        let engine: Arc<dyn Backend> = match engine {
            Ok(e) => Arc::new(e),
            Err(e) => {
                tracing::warn!(event = "model_load_failed", model = %disk.id, error = %e);
                return Err(e.into());
            }
        };
        let (bos, eos) = engine.special_tokens();
        let hints = ModelHints {
            architecture: &engine.info().architecture,
            has_llama3_headers: engine.has_special_token("<|start_header_id|>"),
        };
        let template = ChatTemplate::new(engine.chat_template_source(), &hints, &bos, &eos);
        let model = Arc::new(LoadedModel {
            id: disk.id.clone(),
            disk,
            engine,
            template,
            loaded_at: SystemTime::now(),
            load_duration: started.elapsed(),
            requests: AtomicU64::new(0),
            last_used_ms: AtomicU64::new(0),
            loaded_at_instant: Instant::now(),
        });
        tracing::info!(
            event = "model_loaded",
            model = %model.id,
            memory_bytes = model.engine.info().memory_bytes,
            seconds = model.load_duration.as_secs_f64(),
            template = ?model.template.source(),
        );
        self.loaded
            .write()
            .expect("registry lock")
            .insert(model.id.clone(), Arc::clone(&model));
        Ok(report(&model, "loaded"))
    }

    /// Unloads a model: it stops taking requests at once, in-flight ones end with an error,
    /// and its memory is released before this returns.
    pub async fn unload(&self, id: &str) -> Result<UnloadReport, RegistryError> {
        let model = {
            let mut map = self.loaded.write().expect("registry lock");
            let target = self.config.resolve_alias(id);
            let key = map
                .values()
                .find(|m| m.answers_to(target))
                .map(|m| m.id.clone());
            match key {
                Some(k) => map.remove(&k).expect("key present"),
                None => {
                    return Err(match self.store.find(target)? {
                        Some(d) => RegistryError::NotLoaded(d.id),
                        None => RegistryError::NotFound(id.to_string()),
                    })
                }
            }
        };
        let freed = model.engine.info().memory_bytes;
        let engine = Arc::clone(&model.engine);
        let _ = tokio::task::spawn_blocking(move || engine.shutdown()).await;
        tracing::info!(event = "model_unloaded", model = %model.id, memory_freed_bytes = freed);
        Ok(UnloadReport {
            model_id: model.id.clone(),
            status: "unloaded",
            memory_freed_bytes: freed,
        })
    }

    /// Unloads everything (server shutdown).
    pub async fn unload_all(&self) {
        for m in self.loaded() {
            let _ = self.unload(&m.id).await;
        }
    }
}

/// Engine options: the load request's overrides over the model's configured settings.
fn load_options(configured: &ModelSettings, o: &LoadOverrides) -> LoadOptions {
    let cores = std::thread::available_parallelism().map_or(4, |n| n.get() as u32);
    let d = crate::config::LoadDefaults::default();
    LoadOptions {
        context: o
            .context
            .or(configured.context)
            .unwrap_or(d.context)
            .max(16),
        parallel: o
            .parallel
            .or(configured.parallel)
            .unwrap_or(d.parallel)
            .clamp(1, 256),
        max_queue: o.max_queue.or(configured.max_queue).unwrap_or(d.max_queue),
        gpu_layers: o
            .gpu_layers
            .or(configured.gpu_layers)
            .unwrap_or(d.gpu_layers),
        threads: o.threads.or(configured.threads).unwrap_or(cores).max(1),
    }
}

fn report(m: &LoadedModel, status: &'static str) -> LoadReport {
    let info = m.engine.info();
    LoadReport {
        model_id: m.id.clone(),
        status,
        memory_bytes: info.memory_bytes,
        load_seconds: m.load_duration.as_secs_f64(),
        context: info.context_per_sequence,
        parallel: info.parallel,
    }
}
