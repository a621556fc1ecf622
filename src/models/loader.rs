//! One loader per model format: how a model on disk is read without loading it (facts for the
//! memory guard and the inventory), sized, and loaded into a running [`Backend`]. The registry
//! picks the loader by the format the store found, so memory guard, LRU, TTL, pins and the
//! admin API treat every format alike.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::engine::llama::embed::EmbedEngine;
use crate::engine::llama::{footprint, gguf, LlamaEngine, LoadOptions};
use crate::engine::mlx::{self, MlxEngine, MlxOptions};
use crate::engine::{Backend, EngineError, MemoryEstimate, ModelFacts};
use crate::models::store::DiskModel;

/// How one format is planned and loaded.
pub trait Loader: Send + Sync {
    /// Facts read from the model's header or config (cheap; the registry caches them).
    fn facts(&self, disk: &DiskModel) -> Result<ModelFacts, String>;
    /// Context per sequence and the memory a load with `opts` would take.
    fn size(
        &self,
        facts: &ModelFacts,
        disk: &DiskModel,
        opts: &LoadOptions,
    ) -> (u32, MemoryEstimate);
    /// Loads the model, given the facts the plan read from it (the header is not read
    /// again). Blocking: called on the blocking pool.
    fn load(
        &self,
        disk: &DiskModel,
        facts: &ModelFacts,
        opts: &LoadOptions,
    ) -> Result<Arc<dyn Backend>, EngineError>;
}

/// GGUF files through llama.cpp.
pub struct GgufLoader {
    /// Whether a GPU backend was built in (offloaded layers then count as GPU memory).
    pub gpu: bool,
}

impl Loader for GgufLoader {
    fn facts(&self, disk: &DiskModel) -> Result<ModelFacts, String> {
        gguf::read(&disk.path)
    }

    fn size(&self, f: &ModelFacts, disk: &DiskModel, opts: &LoadOptions) -> (u32, MemoryEstimate) {
        (
            footprint::context_per_sequence(f, opts),
            footprint::estimate(f, disk.size_bytes, opts, self.gpu),
        )
    }

    fn load(
        &self,
        disk: &DiskModel,
        facts: &ModelFacts,
        opts: &LoadOptions,
    ) -> Result<Arc<dyn Backend>, EngineError> {
        if facts.kind != crate::engine::ModelKind::Chat {
            return Ok(Arc::new(EmbedEngine::load(&disk.path, facts, opts)?));
        }
        Ok(Arc::new(LlamaEngine::load(&disk.path, facts, opts)?))
    }
}

/// MLX folders through a supervised `mlx-lm` worker process.
pub struct MlxLoader {
    pub python: PathBuf,
    pub heartbeat: Duration,
    /// Each model's in-memory prefix-cache bound.
    pub prefix_cache_bytes: u64,
    /// The BLAS preloaded into workers (`models.mlx.blas`, resolved).
    pub blas: Option<PathBuf>,
}

impl Loader for MlxLoader {
    fn facts(&self, disk: &DiskModel) -> Result<ModelFacts, String> {
        mlx::config::read(&disk.path)
    }

    fn size(&self, f: &ModelFacts, disk: &DiskModel, opts: &LoadOptions) -> (u32, MemoryEstimate) {
        let context = opts.context.min(f.context_train.max(16));
        (
            context,
            mlx::config::estimate(f, disk.size_bytes, context, opts.parallel),
        )
    }

    fn load(
        &self,
        disk: &DiskModel,
        _facts: &ModelFacts,
        opts: &LoadOptions,
    ) -> Result<Arc<dyn Backend>, EngineError> {
        let options = MlxOptions {
            python: self.python.clone(),
            heartbeat: self.heartbeat,
            context: opts.context,
            parallel: opts.parallel,
            max_queue: opts.max_queue,
            rendered_markers: opts.rendered_markers.clone(),
            prefix_cache_bytes: self.prefix_cache_bytes,
            disk: opts.prompt_cache.clone(),
            speculation: opts.speculation,
            draft: opts.draft.clone(),
            draft_max: opts.draft_max,
            blas: self.blas.clone(),
        };
        Ok(Arc::new(MlxEngine::load(&disk.path, &options)?))
    }
}
