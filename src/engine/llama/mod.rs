//! llama.cpp backend: one worker thread per loaded model owns the model's context and runs the
//! decode loop ([`worker`]). Every step decodes one token for each generating sequence and a
//! chunk of any waiting prompt in a single batch, so concurrent requests share each forward
//! pass. This module loads the model, starts the worker and is the [`Backend`] the API sees.

mod draft;
pub mod embed;
pub mod footprint;
pub mod gguf;
mod picker;
pub mod quantize;
use super::prompt_cache;
pub use picker::set_pick_limit;
mod worker;

use std::collections::HashSet;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

use llama_cpp_2::context::params::{KvCacheType, LlamaContextParams};
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::mpsc;

use super::options::{FlashAttention, KvType, Speculation};
use super::scheduler::SlotTable;
use super::{
    Backend, EngineError, Event, GenerationRequest, ModelFacts, ModelInfo, SchedulerStats,
    SpeculationStats, TokenId,
};
use crate::metrics::RateWindow;
use worker::{Worker, BATCH_TOKENS};

/// llama.cpp's process-wide backend, initialised on first load.
fn backend() -> &'static LlamaBackend {
    static BACKEND: OnceLock<LlamaBackend> = OnceLock::new();
    BACKEND.get_or_init(|| {
        llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
        LlamaBackend::init().expect("llama.cpp backend initialises once")
    })
}

/// The child process's side of a probe (`opta-lmx probe-worker`): whether this build of
/// llama.cpp reads a GGUF's architecture, hyper-parameters and vocabulary, with a load that
/// takes no weights (`vocab_only`). An architecture llama.cpp does not know fails here as it
/// would in a full load. In a child because the file is untrusted until it has loaded once,
/// and because llama.cpp says why on its log (standard error here, for the parent to read),
/// not through its API.
pub fn run_probe_worker(path: &Path) -> Result<(), String> {
    let backend = LlamaBackend::init().map_err(|e| e.to_string())?;
    let params = LlamaModelParams::default().with_vocab_only(true);
    LlamaModel::load_from_file(&backend, path, &params)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Context tokens per sequence (clamped to what the model was trained for).
    pub context: u32,
    /// Sequences decoded together; requests beyond this wait in the queue.
    pub parallel: u32,
    /// Requests that may wait for a sequence; past this a request is refused with 429.
    pub max_queue: u32,
    pub gpu_layers: u32,
    pub threads: u32,
    /// Decode each sequence alone with fixed chunking and no prefix reuse, so that output does
    /// not depend on what else runs (reproducible, at the cost of batching's throughput).
    pub batch_invariant: bool,
    /// Control tokens whose text an answer carries: the tool-call and thinking markers the
    /// chat layer parses. Other control tokens render as nothing, as in llama-server.
    pub rendered_markers: Vec<String>,
    /// The disk tier of the prefix cache; `None` keeps prefixes in memory only.
    pub prompt_cache: Option<prompt_cache::DiskCacheConfig>,
    pub cache_type_k: KvType,
    pub cache_type_v: KvType,
    pub flash_attention: FlashAttention,
    /// The speculation mode sequences use unless a request says otherwise.
    pub speculation: Speculation,
    /// The draft model's file for [`Speculation::Draft`].
    pub draft: Option<PathBuf>,
    /// Most tokens proposed per sequence per step.
    pub draft_max: u32,
    /// Verify proposals only where they pay; `false` verifies all of them.
    pub speculation_adaptive: bool,
}

/// What a context's KV looks like; the target and its draft share it.
#[derive(Clone, Copy)]
struct KvLayout {
    per_seq: u32,
    parallel: u32,
    threads: i32,
    type_k: KvType,
    type_v: KvType,
    flash: FlashAttention,
}

impl KvLayout {
    fn params(&self, ubatch: u32) -> LlamaContextParams {
        LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(self.per_seq * self.parallel))
            .with_n_batch(BATCH_TOKENS as u32)
            .with_n_ubatch(ubatch)
            .with_type_k(ggml_type(self.type_k))
            .with_type_v(ggml_type(self.type_v))
            .with_flash_attention_policy(flash_policy(self.flash))
            .with_n_seq_max(self.parallel)
            .with_n_threads(self.threads)
            .with_n_threads_batch(self.threads)
            // Sliding-window layers keep the full context so cached prefixes stay reusable.
            // Not a unified pool: a stream of cells per sequence keeps each sequence's cells
            // in position order, which is what makes greedy output independent of what else
            // shares the batch.
            .with_swa_full(true)
            .with_kv_unified(false)
    }
}

/// llama.cpp's cache type for ours.
fn ggml_type(t: KvType) -> KvCacheType {
    match t {
        KvType::F16 => KvCacheType::F16,
        KvType::Q8_0 => KvCacheType::Q8_0,
        KvType::Q4_0 => KvCacheType::Q4_0,
    }
}

/// llama.cpp's flash-attention policy for ours.
fn flash_policy(f: FlashAttention) -> llama_cpp_sys_2::llama_flash_attn_type {
    use llama_cpp_sys_2 as sys;
    match f {
        FlashAttention::Auto => sys::LLAMA_FLASH_ATTN_TYPE_AUTO,
        FlashAttention::On => sys::LLAMA_FLASH_ATTN_TYPE_ENABLED,
        FlashAttention::Off => sys::LLAMA_FLASH_ATTN_TYPE_DISABLED,
    }
}

/// A loaded GGUF model with its scheduler thread.
pub struct LlamaEngine {
    model: Arc<LlamaModel>,
    info: ModelInfo,
    template: Option<String>,
    control_texts: Vec<String>,
    max_queue: u32,
    /// The speculation mode requests get unless they name one.
    speculation: Speculation,
    jobs: Mutex<Option<std_mpsc::Sender<Job>>>,
    worker: Mutex<Option<JoinHandle<()>>>,
    shared: Arc<Shared>,
    /// The prefix cache's disk tier, shared with the worker.
    disk: worker::DiskTier,
}

/// State shared between the worker and the API: counters for the status page and the
/// admission bound.
#[derive(Default)]
struct Shared {
    shutdown: AtomicBool,
    active: AtomicU32,
    queued: AtomicU32,
    /// Requests submitted and not yet finished (queued + active); bounded by
    /// `parallel + max_queue`. Kept by [`Ticket`]s so no exit path can leak a count.
    pending: AtomicU32,
    requests: AtomicU64,
    prompt_tokens: AtomicU64,
    cached_tokens: AtomicU64,
    /// Requests that started from a reused prefix (in a slot, from another running
    /// sequence, or from the disk tier).
    cache_hits: AtomicU64,
    completion_tokens: AtomicU64,
    cancelled: AtomicU64,
    rejected: AtomicU64,
    /// Preemption: sequences paused for higher-priority requests, and on resume the tokens
    /// whose KV came back as it was and those computed again.
    paused: AtomicU64,
    resumed_tokens: AtomicU64,
    recomputed_tokens: AtomicU64,
    /// Speculation: tokens proposed and verified, those accepted, steps that verified any.
    proposed_tokens: AtomicU64,
    accepted_tokens: AtomicU64,
    speculative_steps: AtomicU64,
    /// Moving average of a request's time in the scheduler, for `Retry-After`.
    avg_request_ms: AtomicU64,
    rates: Mutex<RateWindow>,
    /// Each client's running and queued requests, as the scheduler last saw them.
    held: Mutex<Vec<super::Held>>,
}

/// One admitted-or-waiting request's share of [`Shared::pending`]; dropping it (finish,
/// cancel, error, unload) gives the place back.
struct Ticket(Arc<Shared>);

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Hashes the model file and opens its disk tier in the background: a large model serves at
/// once, and its prefixes start reaching the disk once the hash is known.
fn open_disk_tier(
    disk: worker::DiskTier,
    cfg: prompt_cache::DiskCacheConfig,
    path: PathBuf,
    n_ctx_seq: u32,
    opts: &LoadOptions,
) {
    // A V cache without flash attention is stored transposed: a different state layout.
    let type_k = opts.cache_type_k.name().to_string();
    let type_v = if opts.flash_attention.enabled() {
        opts.cache_type_v.name().to_string()
    } else {
        format!("{}/transposed", opts.cache_type_v.name())
    };
    let spawned = std::thread::Builder::new()
        .name("prompt-cache-open".into())
        .spawn(move || {
            let opened = prompt_cache::model_sha256(&cfg.root, &path).and_then(|sha| {
                let layout = prompt_cache::Layout {
                    state_format: prompt_cache::STATE_FORMAT,
                    model_sha256: sha,
                    context_per_sequence: n_ctx_seq,
                    type_k,
                    type_v,
                };
                prompt_cache::DiskCache::open(cfg, &layout)
            });
            match opened {
                Ok(c) => {
                    let _ = disk.set(Mutex::new(c));
                }
                Err(e) => {
                    tracing::warn!(model = %path.display(), error = %e, "prompt cache: disk tier unavailable; prefixes stay in memory")
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "prompt cache: could not start its thread");
    }
}

/// A request on its way to, or waiting in, the worker's queue.
struct Job {
    req: GenerationRequest,
    /// The request's grammar sampler, built at submit, and the field it came from.
    grammar: Option<(llama_cpp_2::sampling::LlamaSampler, &'static str)>,
    events: mpsc::UnboundedSender<Event>,
    submitted: Instant,
    ticket: Ticket,
}

impl LlamaEngine {
    /// Loads the file and starts the scheduler thread. Blocking: call from a blocking task.
    /// `facts` are what the registry's plan read from the file's header.
    pub fn load(path: &Path, facts: &ModelFacts, opts: &LoadOptions) -> Result<Self, EngineError> {
        let backend = backend();
        let params = LlamaModelParams::default().with_n_gpu_layers(opts.gpu_layers);
        let model = LlamaModel::load_from_file(backend, path, &params)
            .map_err(|e| EngineError::Load(format!("{}: {e}", path.display())))?;
        let model = Arc::new(model);
        let draft_model = match &opts.draft {
            None => None,
            Some(p) => {
                let d = LlamaModel::load_from_file(backend, p, &params)
                    .map_err(|e| EngineError::Load(format!("draft {}: {e}", p.display())))?;
                if let Some(why) = draft::vocabulary_mismatch(&model, &d) {
                    return Err(EngineError::InvalidParam {
                        param: "draft_model",
                        message: format!(
                            "{} cannot draft for {}: {why}",
                            p.display(),
                            path.display()
                        ),
                    });
                }
                Some(Arc::new(d))
            }
        };

        // Sliding-window layers change what a saved prefix can be restored as (see the worker).
        let sliding_window = facts.sliding_window;
        let architecture = facts.architecture.clone();
        let context_train = facts.context_train;
        // The same context per sequence the load plan estimated memory for.
        let per_seq = footprint::context_per_sequence(facts, opts);
        let parallel = opts.parallel.max(1);
        let template = model
            .meta_val_str("tokenizer.chat_template")
            .ok()
            .filter(|t| !t.trim().is_empty());

        let rendered = rendered_tokens(&model, &opts.rendered_markers);
        let shared = Arc::new(Shared::default());
        let disk: worker::DiskTier = Arc::default();
        let (job_tx, job_rx) = std_mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = std_mpsc::channel::<Result<u32, EngineError>>();
        let worker = {
            let model = Arc::clone(&model);
            let shared = Arc::clone(&shared);
            let threads = opts.threads.clamp(1, 1024) as i32;
            let invariant = opts.batch_invariant;
            let disk = Arc::clone(&disk);
            let ubatch = footprint::micro_batch(model.n_vocab().max(0) as u32);
            let kv = KvLayout {
                per_seq,
                parallel,
                threads,
                type_k: opts.cache_type_k,
                type_v: opts.cache_type_v,
                flash: opts.flash_attention,
            };
            let draft_model = draft_model.clone();
            let (speculation, draft_max) = (opts.speculation, opts.draft_max.max(1) as usize);
            let adaptive = opts.speculation_adaptive;
            std::thread::Builder::new()
                .name("llama-scheduler".into())
                .spawn(move || {
                    let ctx_params = kv.params(ubatch);
                    let ctx = match model.new_context(backend, ctx_params) {
                        Ok(ctx) => ctx,
                        Err(e) => {
                            let _ = ready_tx.send(Err(EngineError::Load(format!(
                                "could not create a context of {} tokens: {e}",
                                per_seq * parallel
                            ))));
                            return;
                        }
                    };
                    let n_ctx_seq = ctx.n_ctx() / parallel;
                    let drafter = match &draft_model {
                        None => None,
                        Some(d) => {
                            let ub = footprint::micro_batch(d.n_vocab().max(0) as u32);
                            match d.new_context(backend, kv.params(ub)) {
                                Ok(dctx) => {
                                    let mut drafter =
                                        draft::Drafter::new(d, dctx, parallel as usize);
                                    if adaptive {
                                        drafter.calibrate();
                                    }
                                    Some(drafter)
                                }
                                Err(e) => {
                                    let _ = ready_tx.send(Err(EngineError::Load(format!(
                                        "could not create the draft model's context: {e}"
                                    ))));
                                    return;
                                }
                            }
                        }
                    };
                    let _ = ready_tx.send(Ok(n_ctx_seq));
                    let slots = SlotTable::new(parallel as usize);
                    let slots = if invariant {
                        slots.without_prefix_reuse()
                    } else {
                        slots
                    };
                    let setup = worker::Setup {
                        n_ctx_seq,
                        slots,
                        invariant,
                        rendered,
                        disk,
                        speculation,
                        draft_max,
                        adaptive,
                        drafter,
                        sliding_window,
                    };
                    Worker::new(&model, ctx, &shared, setup).run(job_rx);
                })
                .map_err(|e| EngineError::Load(format!("could not start scheduler thread: {e}")))?
        };
        let n_ctx_seq = match ready_rx.recv() {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                let _ = worker.join();
                return Err(e);
            }
            Err(_) => {
                let _ = worker.join();
                return Err(EngineError::Load(
                    "scheduler thread died while starting".into(),
                ));
            }
        };

        if let (Some(cfg), false) = (opts.prompt_cache.clone(), opts.batch_invariant) {
            open_disk_tier(Arc::clone(&disk), cfg, path.to_path_buf(), n_ctx_seq, opts);
        }

        let info = ModelInfo {
            architecture,
            context_per_sequence: n_ctx_seq,
            parallel,
            context_train,
            parameters: model.n_params(),
            gpu_layers: opts.gpu_layers,
            threads: opts.threads,
            vocab_size: model.n_vocab().max(0) as u32,
            batch_invariant: opts.batch_invariant,
            embedding_length: facts.embedding_length,
        };
        let control_texts = control_texts(&model);
        Ok(Self {
            model,
            info,
            template,
            control_texts,
            max_queue: opts.max_queue,
            speculation: opts.speculation,
            jobs: Mutex::new(Some(job_tx)),
            worker: Mutex::new(Some(worker)),
            shared,
            disk,
        })
    }
}

impl Backend for LlamaEngine {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn chat_template_source(&self) -> Option<&str> {
        self.template.as_deref()
    }

    fn special_tokens(&self) -> (String, String) {
        let vocab = self.model.vocab();
        let text = |t: LlamaToken| {
            String::from_utf8_lossy(&vocab.token_to_piece(t, true, None)).into_owned()
        };
        (text(vocab.bos()), text(vocab.eos()))
    }

    fn has_special_token(&self, text: &str) -> bool {
        let toks = self.model.vocab().tokenize(text.as_bytes(), false, true);
        toks.len() == 1 && self.model.vocab().is_control(toks[0])
    }

    fn control_texts(&self) -> &[String] {
        &self.control_texts
    }

    fn tokenize(&self, text: &str, add_bos: bool, special: bool) -> Vec<TokenId> {
        let vocab = self.model.vocab();
        let mut toks: Vec<TokenId> = vocab
            .tokenize(text.as_bytes(), false, special)
            .into_iter()
            .map(|t| t.0)
            .collect();
        let bos = vocab.bos().0;
        if add_bos && vocab.should_add_bos() && toks.first() != Some(&bos) {
            toks.insert(0, bos);
        }
        toks
    }

    fn submit(
        &self,
        mut req: GenerationRequest,
    ) -> Result<mpsc::UnboundedReceiver<Event>, EngineError> {
        let mut grammar = None;
        if let Some(c) = req.constraint.take() {
            let lazy = !c.triggers.is_empty();
            let param = c.param;
            let started = Instant::now();
            let built = super::grammar::grammar_for(&c).and_then(|gbnf| {
                let mut sampling = req.sampling.clone();
                sampling.grammar = Some(gbnf);
                sampling.grammar_triggers = c.triggers;
                // Compiled here, on the caller's thread (the request's, off the async
                // runtime), so a grammar llama.cpp cannot use is the caller's 400 and the
                // scheduler thread never spends a step building one.
                let sampler = sampling
                    .grammar_sampler(&self.model)
                    .map_err(|e| EngineError::InvalidParam {
                        param,
                        message: format!("the schema gives a grammar llama.cpp cannot use: {e}"),
                    })?
                    .expect("a grammar was set");
                let took = started.elapsed();
                if took > GRAMMAR_BUILD_LIMIT {
                    return Err(EngineError::InvalidParam {
                        param,
                        message: format!(
                            "this schema's grammar took {} ms to build, more than the {} ms limit; use a smaller schema (fewer enum values or alternatives)",
                            took.as_millis(),
                            GRAMMAR_BUILD_LIMIT.as_millis()
                        ),
                    });
                }
                Ok((sampling, sampler))
            });
            if let Some((sampling, sampler)) = super::grammar::unless_lazy(built, lazy)? {
                req.sampling = sampling;
                grammar = Some((sampler, param));
            }
        }
        if req.speculation == Some(Speculation::Draft) && self.speculation != Speculation::Draft {
            return Err(super::grammar::no_draft_model());
        }
        let n_vocab = self.model.n_vocab();
        // A token id llama.cpp does not know fails the whole batch it is decoded in, so it is
        // refused here, before it can reach anyone else's batch.
        if let Some((pos, &t)) = req
            .prompt
            .iter()
            .enumerate()
            .find(|(_, &t)| t < 0 || t >= n_vocab)
        {
            return Err(EngineError::InvalidParam {
                param: "prompt",
                message: format!(
                    "prompt token id {t} at position {pos} is outside the vocabulary (0..{n_vocab})"
                ),
            });
        }
        if let Some(&(t, _)) = req
            .sampling
            .logit_bias
            .iter()
            .find(|(t, _)| *t < 0 || *t >= n_vocab)
        {
            return Err(EngineError::InvalidParam {
                param: "logit_bias",
                message: format!("token id {t} is outside the vocabulary (0..{n_vocab})"),
            });
        }
        let jobs = self.jobs.lock().expect("jobs lock");
        let sender = jobs.as_ref().ok_or(EngineError::Unloaded)?;
        let shared = &self.shared;
        let limit = self.info.parallel + self.max_queue;
        if shared
            .pending
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |p| {
                (p < limit).then_some(p + 1)
            })
            .is_err()
        {
            shared.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(EngineError::QueueFull {
                queue: self.max_queue,
                retry_after_secs: self.retry_after_secs(),
            });
        }
        let ticket = Ticket(Arc::clone(shared));
        let (tx, rx) = mpsc::unbounded_channel();
        shared.queued.fetch_add(1, Ordering::SeqCst);
        let job = Job {
            req,
            grammar,
            events: tx,
            submitted: Instant::now(),
            ticket,
        };
        if sender.send(job).is_err() {
            shared.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(EngineError::Unloaded);
        }
        Ok(rx)
    }

    fn stats(&self) -> SchedulerStats {
        let s = &self.shared;
        let (prompt_rate, decode_rate) = s.rates.lock().expect("rates lock").rates(Instant::now());
        SchedulerStats {
            active_sequences: s.active.load(Ordering::Relaxed),
            queued_requests: s.queued.load(Ordering::Relaxed),
            max_queue: self.max_queue,
            requests_total: s.requests.load(Ordering::Relaxed),
            cancelled_total: s.cancelled.load(Ordering::Relaxed),
            rejected_total: s.rejected.load(Ordering::Relaxed),
            prompt_tokens_total: s.prompt_tokens.load(Ordering::Relaxed),
            cached_prompt_tokens_total: s.cached_tokens.load(Ordering::Relaxed),
            completion_tokens_total: s.completion_tokens.load(Ordering::Relaxed),
            preemption: super::PreemptionStats {
                paused_total: s.paused.load(Ordering::Relaxed),
                restored_tokens_total: s.resumed_tokens.load(Ordering::Relaxed),
                recomputed_tokens_total: s.recomputed_tokens.load(Ordering::Relaxed),
            },
            prompt_tokens_per_second: prompt_rate,
            decode_tokens_per_second: decode_rate,
            prompt_cache_bytes: None,
            prompt_cache_hits_total: s.cache_hits.load(Ordering::Relaxed),
            prompt_cache_files: self
                .disk
                .get()
                .map(|d| d.lock().expect("prompt cache lock").len() as u32),
            speculation: SpeculationStats {
                mode: self.speculation,
                proposed_tokens_total: s.proposed_tokens.load(Ordering::Relaxed),
                accepted_tokens_total: s.accepted_tokens.load(Ordering::Relaxed),
                speculative_steps_total: s.speculative_steps.load(Ordering::Relaxed),
            },
        }
    }

    fn held(&self) -> Vec<super::Held> {
        self.shared.held.lock().expect("held lock").clone()
    }

    fn shutdown(&self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        drop(self.jobs.lock().expect("jobs lock").take());
        if let Some(worker) = self.worker.lock().expect("worker lock").take() {
            let _ = worker.join();
        }
    }
}

/// Longest a grammar may take to build (schema conversion and llama.cpp's parse): within the
/// size limits it takes milliseconds; a machine too slow for this would be too slow to use it.
const GRAMMAR_BUILD_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Ids of the control tokens whose text is one of `markers`.
fn rendered_tokens(model: &LlamaModel, markers: &[String]) -> HashSet<i32> {
    use llama_cpp_2::token_type::LlamaTokenAttr;
    let vocab = model.vocab();
    vocab
        .tokens()
        .filter(|&t| vocab.attr(t).contains(LlamaTokenAttr::Control))
        .filter(|&t| {
            vocab
                .text(t)
                .and_then(|c| c.to_str().ok())
                .is_some_and(|text| markers.iter().any(|m| m == text))
        })
        .map(|t| t.0)
        .collect()
}

/// Texts of the control and unknown tokens: what clients may write but must never turn into
/// (normal, byte and user-defined tokens are plain text to the tokenizer either way).
fn control_texts(model: &LlamaModel) -> Vec<String> {
    use llama_cpp_2::token_type::LlamaTokenAttr;
    let vocab = model.vocab();
    let mut out: Vec<String> = vocab
        .tokens()
        .filter(|&t| {
            let attr = vocab.attr(t);
            attr.contains(LlamaTokenAttr::Control) || attr.contains(LlamaTokenAttr::Unknown)
        })
        .filter_map(|t| {
            vocab
                .text(t)
                .and_then(|c| c.to_str().ok())
                .map(String::from)
        })
        .filter(|t| !t.is_empty())
        .collect();
    out.sort();
    out.dedup();
    out
}

impl LlamaEngine {
    /// When a refused client should try again: the queue ahead of it drains at about
    /// `parallel` requests per average request time.
    fn retry_after_secs(&self) -> u32 {
        let avg_ms = self.shared.avg_request_ms.load(Ordering::Relaxed).max(1000);
        let waiting = u64::from(self.max_queue) + 1;
        let secs = avg_ms * waiting / u64::from(self.info.parallel.max(1)) / 1000;
        secs.clamp(1, 60) as u32
    }
}

impl Drop for LlamaEngine {
    fn drop(&mut self) {
        self.shutdown();
    }
}
