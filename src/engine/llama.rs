//! llama.cpp backend: one worker thread per loaded model owns the model's context and runs the
//! decode loop. Every step decodes one token for each generating sequence and a chunk of any
//! waiting prompt in a single batch, so concurrent requests share each forward pass.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::mpsc;

use super::sampling::argmax;
use super::scheduler::SlotTable;
use super::text::TextAssembler;
use super::{
    Backend, EngineError, Event, FinishReason, GenerationRequest, ModelInfo, SchedulerStats,
    TokenId, Usage,
};

/// Most tokens in one decode call (generation tokens plus prompt chunks).
const BATCH_TOKENS: usize = 512;

/// llama.cpp's process-wide backend, initialised on first load.
fn backend() -> &'static LlamaBackend {
    static BACKEND: OnceLock<LlamaBackend> = OnceLock::new();
    BACKEND.get_or_init(|| {
        llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
        LlamaBackend::init().expect("llama.cpp backend initialises once")
    })
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Context tokens per sequence (clamped to what the model was trained for).
    pub context: u32,
    pub parallel: u32,
    pub gpu_layers: u32,
    pub threads: u32,
}

/// A loaded GGUF model with its scheduler thread.
pub struct LlamaEngine {
    model: Arc<LlamaModel>,
    info: ModelInfo,
    template: Option<String>,
    jobs: Mutex<Option<std_mpsc::Sender<Job>>>,
    worker: Mutex<Option<JoinHandle<()>>>,
    shared: Arc<Shared>,
}

/// Counters shared between the worker and the API.
#[derive(Default)]
struct Shared {
    shutdown: AtomicBool,
    active: AtomicU32,
    queued: AtomicU32,
    requests: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
}

struct Job {
    req: GenerationRequest,
    events: mpsc::UnboundedSender<Event>,
}

/// How a request chooses its next token.
enum Picker {
    /// Argmax of the biased logits: no per-token copy of the vocabulary, no state.
    Greedy(Vec<(TokenId, f32)>),
    /// llama.cpp's sampler chain, owned by this request alone.
    Chain(LlamaSampler),
}

/// A request occupying a slot.
struct Active {
    slot: usize,
    events: mpsc::UnboundedSender<Event>,
    /// Prompt tokens not yet in the KV cache.
    pending_prompt: VecDeque<TokenId>,
    prompt_len: u32,
    cached_tokens: u32,
    /// The sampled token to feed next step, once the prompt is in.
    next: Option<TokenId>,
    picker: Picker,
    max_tokens: u32,
    generated: u32,
    text: TextAssembler,
    admitted: Instant,
    first_token: Option<Instant>,
    /// Index of this request's logits in the batch just decoded.
    logits_at: Option<i32>,
    /// Tokens added to the batch for this request this step.
    fed: Vec<TokenId>,
}

fn meta_u32(model: &LlamaModel, key: &str) -> Option<u32> {
    model.meta_val_str(key).ok()?.parse().ok()
}

impl LlamaEngine {
    /// Loads the file and starts the scheduler thread. Blocking: call from a blocking task.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Self, EngineError> {
        let backend = backend();
        let params = LlamaModelParams::default().with_n_gpu_layers(opts.gpu_layers);
        let model = LlamaModel::load_from_file(backend, path, &params)
            .map_err(|e| EngineError::Load(format!("{}: {e}", path.display())))?;
        let model = Arc::new(model);

        let architecture = model
            .meta_val_str("general.architecture")
            .unwrap_or_else(|_| "unknown".into());
        let context_train = model.n_ctx_train();
        let per_seq = opts.context.min(context_train.max(16));
        let parallel = opts.parallel.max(1);
        let template = model
            .meta_val_str("tokenizer.chat_template")
            .ok()
            .filter(|t| !t.trim().is_empty());

        // Weights plus an f16 KV cache for every sequence (sliding-window layers kept full so
        // cached prefixes can be reused).
        let n_head_kv = u64::from(model.n_head_kv());
        let head_dim = u64::from(model.n_embd() as u32 / model.n_head().max(1));
        let k_len = meta_u32(&model, &format!("{architecture}.attention.key_length"))
            .map_or(head_dim, u64::from);
        let v_len = meta_u32(&model, &format!("{architecture}.attention.value_length"))
            .map_or(head_dim, u64::from);
        let kv_bytes = u64::from(model.n_layer())
            * u64::from(per_seq)
            * u64::from(parallel)
            * n_head_kv
            * (k_len + v_len)
            * 2;

        let shared = Arc::new(Shared::default());
        let (job_tx, job_rx) = std_mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = std_mpsc::channel::<Result<u32, EngineError>>();
        let worker = {
            let model = Arc::clone(&model);
            let shared = Arc::clone(&shared);
            let threads = opts.threads.max(1) as i32;
            std::thread::Builder::new()
                .name("llama-scheduler".into())
                .spawn(move || {
                    let ctx_params = LlamaContextParams::default()
                        .with_n_ctx(NonZeroU32::new(per_seq * parallel))
                        .with_n_batch(BATCH_TOKENS as u32)
                        .with_n_ubatch(BATCH_TOKENS as u32)
                        .with_n_seq_max(parallel)
                        .with_n_threads(threads)
                        .with_n_threads_batch(threads)
                        .with_swa_full(true);
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
                    let _ = ready_tx.send(Ok(n_ctx_seq));
                    Worker {
                        model: &model,
                        ctx,
                        shared: &shared,
                        n_ctx_seq,
                        slots: SlotTable::new(parallel as usize),
                        queue: VecDeque::new(),
                        active: Vec::new(),
                    }
                    .run(job_rx);
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

        let info = ModelInfo {
            architecture,
            context_per_sequence: n_ctx_seq,
            parallel,
            context_train,
            parameters: model.n_params(),
            memory_bytes: model.size() + kv_bytes,
            gpu_layers: opts.gpu_layers,
            threads: opts.threads,
        };
        Ok(Self {
            model,
            info,
            template,
            jobs: Mutex::new(Some(job_tx)),
            worker: Mutex::new(Some(worker)),
            shared,
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

    fn tokenize(&self, text: &str, add_bos: bool) -> Vec<TokenId> {
        let vocab = self.model.vocab();
        let mut toks: Vec<TokenId> = vocab
            .tokenize(text.as_bytes(), false, true)
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
        req: GenerationRequest,
    ) -> Result<mpsc::UnboundedReceiver<Event>, EngineError> {
        let n_vocab = self.model.n_vocab();
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
        let (tx, rx) = mpsc::unbounded_channel();
        let jobs = self.jobs.lock().expect("jobs lock");
        let sender = jobs.as_ref().ok_or(EngineError::Unloaded)?;
        self.shared.queued.fetch_add(1, Ordering::SeqCst);
        sender
            .send(Job { req, events: tx })
            .map_err(|_| EngineError::Unloaded)?;
        Ok(rx)
    }

    fn stats(&self) -> SchedulerStats {
        let s = &self.shared;
        SchedulerStats {
            active_sequences: s.active.load(Ordering::Relaxed),
            queued_requests: s.queued.load(Ordering::Relaxed),
            requests_total: s.requests.load(Ordering::Relaxed),
            prompt_tokens_total: s.prompt_tokens.load(Ordering::Relaxed),
            completion_tokens_total: s.completion_tokens.load(Ordering::Relaxed),
        }
    }

    fn shutdown(&self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        drop(self.jobs.lock().expect("jobs lock").take());
        if let Some(worker) = self.worker.lock().expect("worker lock").take() {
            let _ = worker.join();
        }
    }
}

impl Drop for LlamaEngine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// State owned by the scheduler thread.
struct Worker<'m> {
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    shared: &'m Shared,
    n_ctx_seq: u32,
    slots: SlotTable,
    queue: VecDeque<Job>,
    active: Vec<Active>,
}

impl Worker<'_> {
    fn run(mut self, jobs: std_mpsc::Receiver<Job>) {
        let mut batch = LlamaBatch::new(BATCH_TOKENS, 1);
        loop {
            // Wait for work when idle; otherwise just collect what arrived.
            if self.active.is_empty() && self.queue.is_empty() {
                self.publish_counts();
                match jobs.recv() {
                    Ok(job) => self.queue.push_back(job),
                    Err(_) => break,
                }
            }
            loop {
                match jobs.try_recv() {
                    Ok(job) => self.queue.push_back(job),
                    Err(std_mpsc::TryRecvError::Empty) => break,
                    Err(std_mpsc::TryRecvError::Disconnected) => {
                        self.shared.shutdown.store(true, Ordering::SeqCst);
                        break;
                    }
                }
            }
            if self.shared.shutdown.load(Ordering::SeqCst) {
                break;
            }
            self.drop_cancelled();
            self.admit();
            self.publish_counts();
            if self.active.is_empty() {
                continue;
            }
            self.step(&mut batch);
        }
        // Unloading: everyone still waiting or running gets a clean error.
        for job in self.queue.drain(..) {
            let _ = job.events.send(Event::Error(EngineError::Unloaded));
        }
        for a in self.active.drain(..) {
            let _ = a.events.send(Event::Error(EngineError::Unloaded));
        }
        self.shared.queued.store(0, Ordering::SeqCst);
        self.shared.active.store(0, Ordering::SeqCst);
    }

    fn publish_counts(&self) {
        self.shared
            .active
            .store(self.active.len() as u32, Ordering::Relaxed);
    }

    /// Requests whose client hung up leave at once; their slot is free for the next one.
    fn drop_cancelled(&mut self) {
        let before = self.queue.len();
        self.queue.retain(|j| !j.events.is_closed());
        let gone = (before - self.queue.len()) as u32;
        if gone > 0 {
            self.shared.queued.fetch_sub(gone, Ordering::SeqCst);
        }
        let slots = &mut self.slots;
        self.active.retain(|a| {
            let keep = !a.events.is_closed();
            if !keep {
                tracing::debug!(slot = a.slot, "client disconnected; sequence freed");
                slots.release(a.slot);
            }
            keep
        });
    }

    fn admit(&mut self) {
        while self.slots.busy() < self.slots.len() {
            let Some(job) = self.queue.pop_front() else {
                break;
            };
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            let assignment = self.slots.assign(&job.req.prompt).expect("a slot is free");
            let seq = self.slots.get(assignment.slot).seq;
            let mut reuse = assignment.reuse;
            if self
                .ctx
                .kv_cache_seq_rm(seq, Some(reuse as u32), None)
                .is_err()
            {
                // The cache cannot drop just a tail here: start this sequence afresh.
                let _ = self.ctx.kv_cache_seq_rm(seq, None, None);
                self.slots.forget(assignment.slot);
                reuse = 0;
            }
            let req = job.req;
            self.shared.requests.fetch_add(1, Ordering::Relaxed);
            self.shared
                .prompt_tokens
                .fetch_add(req.prompt.len() as u64, Ordering::Relaxed);
            self.active.push(Active {
                slot: assignment.slot,
                events: job.events,
                pending_prompt: req.prompt[reuse..].iter().copied().collect(),
                prompt_len: req.prompt.len() as u32,
                cached_tokens: reuse as u32,
                next: None,
                picker: if req.sampling.is_plain_greedy() {
                    Picker::Greedy(req.sampling.logit_bias.clone())
                } else {
                    Picker::Chain(req.sampling.build(self.model.n_vocab()))
                },
                max_tokens: req.max_tokens,
                generated: 0,
                text: TextAssembler::new(req.stop),
                admitted: Instant::now(),
                first_token: None,
                logits_at: None,
                fed: Vec::new(),
            });
        }
    }

    /// One forward pass for everyone, then one sampled token for each sequence that has logits.
    fn step(&mut self, batch: &mut LlamaBatch) {
        batch.clear();
        let mut used = 0usize;
        // Generating sequences first: one token each keeps every stream moving.
        for a in &mut self.active {
            a.logits_at = None;
            a.fed.clear();
            if let Some(tok) = a.next {
                let seq = self.slots.get(a.slot).seq;
                let pos = self.slots.get(a.slot).cached.len() as i32;
                batch
                    .add(LlamaToken(tok), pos, &[seq], true)
                    .expect("batch sized for every slot");
                a.logits_at = Some(used as i32);
                a.fed.push(tok);
                used += 1;
            }
        }
        // Then prompt chunks, oldest request first, in whatever room is left.
        for a in &mut self.active {
            if a.next.is_some() || a.pending_prompt.is_empty() {
                continue;
            }
            let seq = self.slots.get(a.slot).seq;
            let base = self.slots.get(a.slot).cached.len();
            while used < BATCH_TOKENS {
                let Some(tok) = a.pending_prompt.pop_front() else {
                    break;
                };
                let last = a.pending_prompt.is_empty();
                let pos = (base + a.fed.len()) as i32;
                batch
                    .add(LlamaToken(tok), pos, &[seq], last)
                    .expect("batch has room");
                if last {
                    a.logits_at = Some(used as i32);
                }
                a.fed.push(tok);
                used += 1;
            }
        }
        if used == 0 {
            return;
        }

        if let Err(e) = self.ctx.decode(batch) {
            tracing::error!(error = %e, "decode failed; failing the requests in this batch");
            for a in self.active.drain(..) {
                let seq = self.slots.get(a.slot).seq;
                let _ = self.ctx.kv_cache_seq_rm(seq, None, None);
                self.slots.forget(a.slot);
                self.slots.release(a.slot);
                let _ = a
                    .events
                    .send(Event::Error(EngineError::Decode(e.to_string())));
            }
            return;
        }

        let vocab = self.model.vocab();
        let mut finished = Vec::new();
        for (i, a) in self.active.iter_mut().enumerate() {
            self.slots.get_mut(a.slot).cached.extend_from_slice(&a.fed);
            let Some(idx) = a.logits_at else {
                continue;
            };
            let tok = match &mut a.picker {
                Picker::Greedy(biases) => LlamaToken(argmax(self.ctx.get_logits_ith(idx), biases)),
                Picker::Chain(sampler) => sampler.sample(&self.ctx, idx),
            };
            a.generated += 1;
            a.first_token.get_or_insert_with(Instant::now);
            let mut finish = None;
            if vocab.is_eog(tok) {
                finish = Some(FinishReason::Stop);
                a.next = None;
            } else {
                let piece = vocab.token_to_piece(tok, false, None);
                let out = a.text.push(&piece);
                if !out.text.is_empty() {
                    let _ = a.events.send(Event::Text(out.text));
                }
                a.next = Some(tok.0);
                if out.stopped {
                    finish = Some(FinishReason::Stop);
                } else if a.generated >= a.max_tokens
                    || self.slots.get(a.slot).cached.len() as u32 >= self.n_ctx_seq
                {
                    finish = Some(FinishReason::Length);
                }
            }
            if let Some(reason) = finish {
                finished.push((i, reason));
            }
        }
        // Remove finished requests back to front so indices stay valid.
        for (i, reason) in finished.into_iter().rev() {
            // `remove`, not `swap_remove`: arrival order decides whose prompt is prefilled first.
            let mut a = self.active.remove(i);
            let rest = a.text.finish();
            if !rest.is_empty() {
                let _ = a.events.send(Event::Text(rest));
            }
            self.shared
                .completion_tokens
                .fetch_add(u64::from(a.generated), Ordering::Relaxed);
            let _ = a.events.send(Event::Done {
                finish_reason: reason,
                usage: Usage {
                    prompt_tokens: a.prompt_len,
                    completion_tokens: a.generated,
                    cached_tokens: a.cached_tokens,
                },
                time_to_first_token: a.first_token.unwrap_or(a.admitted) - a.admitted,
                total_time: a.admitted.elapsed(),
            });
            self.slots.release(a.slot);
        }
    }
}
