//! Embedding and reranking models through llama.cpp: one thread per model packs the inputs of
//! every waiting request into shared batches (many sequences per forward pass, as the chat
//! scheduler shares decode steps) and answers each request when its last input is pooled.
//!
//! Inputs are taken round-robin across requests ([`Packer`]), so a request of 2,048 inputs
//! shares each batch with a one-input request that arrived after it instead of making it wait
//! for all 2,048.

use std::num::NonZeroU32;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::{mpsc, oneshot};

use super::{backend, control_texts, LoadOptions};
use crate::engine::{
    Backend, EmbedReceiver, EngineError, Event, GenerationRequest, ModelFacts, ModelInfo,
    ModelKind, SchedulerStats, TokenId,
};
use crate::metrics::RateWindow;

/// Most sequences in one forward pass (llama.cpp allows 256; 64 fills a batch of short
/// sentences without a huge output buffer).
pub const MAX_SEQS: usize = 64;

/// Tokens per forward pass: every input must fit whole in one micro-batch (the attention of
/// an encoder is not causal, so llama.cpp cannot split a sequence), so this is at least one
/// sequence's context.
pub fn batch_tokens(per_seq: u32) -> u32 {
    per_seq.max(2048)
}

/// One request: its inputs, where each one's vector goes, and the first input not yet run
/// (a batch runs every input it picks, so inputs before `next` are done).
struct Job {
    inputs: Vec<Vec<TokenId>>,
    out: Vec<Vec<f32>>,
    next: usize,
    reply: oneshot::Sender<Result<Vec<Vec<f32>>, EngineError>>,
}

/// Which inputs go into the next batch: round-robin over the requests in arrival order, one
/// input each per turn, until the batch is out of tokens or sequences. Pure, so its fairness
/// is unit-tested.
pub struct Packer {
    pub max_tokens: usize,
    pub max_seqs: usize,
}

impl Packer {
    /// `(job, input)` pairs for the next batch, given each job's remaining input lengths.
    pub fn pick(&self, remaining: &[&[usize]]) -> Vec<(usize, usize)> {
        let mut picked = Vec::new();
        let mut cursor = vec![0usize; remaining.len()];
        let mut tokens = 0;
        loop {
            let mut progressed = false;
            for (j, lens) in remaining.iter().enumerate() {
                if picked.len() == self.max_seqs {
                    return picked;
                }
                let Some(&len) = lens.get(cursor[j]) else {
                    continue;
                };
                if tokens + len > self.max_tokens {
                    // This job's next input waits; a shorter one of another job may fit.
                    cursor[j] = lens.len();
                    continue;
                }
                tokens += len;
                picked.push((j, cursor[j]));
                cursor[j] += 1;
                progressed = true;
            }
            if !progressed {
                return picked;
            }
        }
    }
}

#[derive(Default)]
struct Shared {
    shutdown: AtomicBool,
    /// Requests with inputs still to run.
    active: AtomicU32,
    requests: AtomicU64,
    tokens: AtomicU64,
    cancelled: AtomicU64,
    rates: Mutex<RateWindow>,
}

/// A loaded embedding (or cross-encoder reranking) model.
pub struct EmbedEngine {
    model: Arc<LlamaModel>,
    info: ModelInfo,
    kind: ModelKind,
    control_texts: Vec<String>,
    jobs: Mutex<Option<std_mpsc::Sender<Job>>>,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl EmbedEngine {
    /// Loads the file and starts its batching thread. Blocking.
    pub fn load(path: &Path, facts: &ModelFacts, opts: &LoadOptions) -> Result<Self, EngineError> {
        let backend = backend();
        let params = LlamaModelParams::default().with_n_gpu_layers(opts.gpu_layers);
        let model = LlamaModel::load_from_file(backend, path, &params)
            .map_err(|e| EngineError::Load(format!("{}: {e}", path.display())))?;
        let model = Arc::new(model);
        let per_seq = super::footprint::context_per_sequence(facts, opts);
        let batch = batch_tokens(per_seq);
        let threads = opts.threads.clamp(1, 1024) as i32;
        let shared = Arc::new(Shared::default());
        let (tx, rx) = std_mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = std_mpsc::channel::<Result<(), EngineError>>();
        let rank = facts.kind == ModelKind::Reranker;
        let thread = {
            let model = Arc::clone(&model);
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("llama-embed".into())
                .spawn(move || {
                    let ctx_params = LlamaContextParams::default()
                        .with_embeddings(true)
                        .with_n_ctx(NonZeroU32::new(batch))
                        .with_n_batch(batch)
                        .with_n_ubatch(batch)
                        .with_n_seq_max(MAX_SEQS as u32)
                        .with_kv_unified(true)
                        .with_n_threads(threads)
                        .with_n_threads_batch(threads);
                    let mut ctx = match model.new_context(backend, ctx_params) {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = ready_tx.send(Err(EngineError::Load(format!(
                                "could not create an embedding context of {batch} tokens: {e}"
                            ))));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    serve(&mut ctx, &rx, &shared, batch, rank);
                })
                .map_err(|e| EngineError::Load(format!("embedding thread: {e}")))?
        };
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(EngineError::Load("embedding thread failed to start".into())),
        }
        let info = ModelInfo {
            architecture: facts.architecture.clone(),
            context_per_sequence: per_seq,
            parallel: MAX_SEQS as u32,
            context_train: facts.context_train,
            parameters: model.n_params(),
            gpu_layers: opts.gpu_layers,
            threads: threads as u32,
            vocab_size: model.n_vocab().max(0) as u32,
            batch_invariant: false,
            embedding_length: facts.embedding_length,
        };
        Ok(Self {
            control_texts: control_texts(&model),
            model,
            info,
            kind: facts.kind,
            jobs: Mutex::new(Some(tx)),
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }
}

/// The batching thread's loop: takes what arrived (blocking when idle), drops requests whose
/// client left, runs one batch, answers the requests it finished. Returns at unload.
fn serve(
    ctx: &mut LlamaContext<'_>,
    rx: &std_mpsc::Receiver<Job>,
    shared: &Shared,
    batch: u32,
    rank: bool,
) {
    let packer = Packer {
        max_tokens: batch as usize,
        max_seqs: MAX_SEQS,
    };
    let mut jobs: Vec<Job> = Vec::new();
    let mut lb = LlamaBatch::new(batch as usize, MAX_SEQS as i32);
    loop {
        if jobs.is_empty() {
            match rx.recv() {
                Ok(j) => jobs.push(j),
                Err(_) => return,
            }
        }
        jobs.extend(rx.try_iter());
        if shared.shutdown.load(Ordering::Relaxed) {
            for j in jobs.drain(..) {
                let _ = j.reply.send(Err(EngineError::Unloaded));
            }
            return;
        }
        // A client that left loses its remaining inputs.
        jobs.retain(|j| {
            let gone = j.reply.is_closed();
            if gone {
                shared.cancelled.fetch_add(1, Ordering::Relaxed);
                shared.active.fetch_sub(1, Ordering::Relaxed);
            }
            !gone
        });
        if jobs.is_empty() {
            continue;
        }
        let lens: Vec<Vec<usize>> = jobs
            .iter()
            .map(|j| j.inputs[j.next..].iter().map(Vec::len).collect())
            .collect();
        let views: Vec<&[usize]> = lens.iter().map(Vec::as_slice).collect();
        let picked: Vec<(usize, usize)> = packer
            .pick(&views)
            .into_iter()
            .map(|(j, k)| (j, jobs[j].next + k))
            .collect();
        let failed = if picked.is_empty() {
            // Only an input longer than a batch is left (the API refuses those first): fail
            // its request rather than spin.
            vec![(0, "an input is longer than a batch".to_string())]
        } else {
            run_batch(ctx, &mut lb, &mut jobs, &picked, rank, shared)
        };
        // Answer what finished or failed; the rest stay for the next batch.
        let mut kept = Vec::with_capacity(jobs.len());
        for (index, mut j) in jobs.drain(..).enumerate() {
            let failure = failed.iter().find(|(f, _)| *f == index);
            if failure.is_none() && j.next < j.inputs.len() {
                kept.push(j);
                continue;
            }
            let answer = match failure {
                Some((_, e)) => Err(EngineError::Decode(e.clone())),
                None => Ok(std::mem::take(&mut j.out)),
            };
            // Uncounted before the answer goes: a client that has it may load another model
            // at once, and a busy model cannot be evicted.
            shared.active.fetch_sub(1, Ordering::Relaxed);
            let _ = j.reply.send(answer);
        }
        jobs = kept;
    }
}

/// Runs the `picked` (job, input) pairs as one forward pass, one sequence each, and stores
/// their vectors; returns the jobs that failed, with why.
fn run_batch(
    ctx: &mut LlamaContext<'_>,
    lb: &mut LlamaBatch,
    jobs: &mut [Job],
    picked: &[(usize, usize)],
    rank: bool,
    shared: &Shared,
) -> Vec<(usize, String)> {
    lb.clear();
    let mut ok = true;
    for (seq, &(j, i)) in picked.iter().enumerate() {
        for (pos, &t) in jobs[j].inputs[i].iter().enumerate() {
            // Every token is an output: pooling reads them all (llama.cpp would override it,
            // with a warning per batch).
            ok &= lb
                .add(LlamaToken(t), pos as i32, &[seq as i32], true)
                .is_ok();
        }
    }
    let result = if ok {
        ctx.clear_kv_cache();
        ctx.decode(lb).map_err(|e| e.to_string())
    } else {
        Err("an input does not fit the batch".into())
    };
    let mut failed = Vec::new();
    let mut tokens = 0u64;
    for (seq, &(j, i)) in picked.iter().enumerate() {
        tokens += jobs[j].inputs[i].len() as u64;
        let vector = match &result {
            Ok(()) => ctx
                .embeddings_seq_ith(seq as i32)
                .map(|v| if rank { v.to_vec() } else { normalized(v) })
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.clone()),
        };
        match vector {
            Ok(v) => jobs[j].out[i] = v,
            Err(e) if !failed.iter().any(|(f, _)| *f == j) => failed.push((j, e)),
            Err(_) => {}
        }
        // Inputs are picked in order within a job, so `next` moves past each.
        jobs[j].next = i + 1;
    }
    shared.tokens.fetch_add(tokens, Ordering::Relaxed);
    shared
        .rates
        .lock()
        .expect("rates lock")
        .record(Instant::now(), tokens, 0);
    failed
}

/// A vector scaled to unit length (what OpenAI's embeddings and llama-server return), so a dot
/// product is the cosine.
fn normalized(v: &[f32]) -> Vec<f32> {
    let norm = v
        .iter()
        .map(|x| f64::from(*x) * f64::from(*x))
        .sum::<f64>()
        .sqrt();
    if norm == 0.0 {
        return v.to_vec();
    }
    v.iter().map(|x| (f64::from(*x) / norm) as f32).collect()
}

impl Backend for EmbedEngine {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn chat_template_source(&self) -> Option<&str> {
        None
    }

    fn special_tokens(&self) -> (String, String) {
        (String::new(), String::new())
    }

    fn has_special_token(&self, _text: &str) -> bool {
        false
    }

    /// With `add_bos`, the model's own framing (BERT: `[CLS] … [SEP]`).
    fn tokenize(&self, text: &str, add_bos: bool, special: bool) -> Vec<TokenId> {
        self.model
            .vocab()
            .tokenize(text.as_bytes(), add_bos, special)
            .into_iter()
            .map(|t| t.0)
            .collect()
    }

    fn control_texts(&self) -> &[String] {
        &self.control_texts
    }

    fn submit(
        &self,
        _req: GenerationRequest,
    ) -> Result<mpsc::UnboundedReceiver<Event>, EngineError> {
        Err(EngineError::InvalidParam {
            param: "model",
            message: format!(
                "this is {} model; it does not generate text",
                article(self.kind)
            ),
        })
    }

    fn kind(&self) -> ModelKind {
        self.kind
    }

    fn embed(&self, inputs: Vec<Vec<TokenId>>) -> Result<EmbedReceiver, EngineError> {
        let (tx, rx) = oneshot::channel();
        if inputs.is_empty() {
            let _ = tx.send(Ok(Vec::new()));
            return Ok(rx);
        }
        let job = Job {
            out: vec![Vec::new(); inputs.len()],
            inputs,
            next: 0,
            reply: tx,
        };
        let guard = self.jobs.lock().expect("jobs lock");
        let sender = guard.as_ref().ok_or(EngineError::Unloaded)?;
        // Counted before the send: the thread may finish (and uncount) it at once.
        self.shared.active.fetch_add(1, Ordering::Relaxed);
        if sender.send(job).is_err() {
            self.shared.active.fetch_sub(1, Ordering::Relaxed);
            return Err(EngineError::Unloaded);
        }
        self.shared.requests.fetch_add(1, Ordering::Relaxed);
        Ok(rx)
    }

    fn stats(&self) -> SchedulerStats {
        let s = &self.shared;
        let (prompt_rate, _) = s.rates.lock().expect("rates lock").rates(Instant::now());
        SchedulerStats {
            active_sequences: s.active.load(Ordering::Relaxed),
            requests_total: s.requests.load(Ordering::Relaxed),
            cancelled_total: s.cancelled.load(Ordering::Relaxed),
            prompt_tokens_total: s.tokens.load(Ordering::Relaxed),
            prompt_tokens_per_second: prompt_rate,
            ..SchedulerStats::default()
        }
    }

    fn shutdown(&self) {
        self.shared.shutdown.store(true, Ordering::Relaxed);
        // Dropping the sender wakes an idle thread; a busy one sees the flag after its batch.
        self.jobs.lock().expect("jobs lock").take();
        if let Some(t) = self.thread.lock().expect("thread lock").take() {
            let _ = t.join();
        }
    }
}

/// "an embedding" / "a reranking", for messages.
pub fn article(kind: ModelKind) -> &'static str {
    match kind {
        ModelKind::Chat => "a chat",
        ModelKind::Embedding { .. } => "an embedding",
        ModelKind::Reranker => "a reranking",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_are_taken_round_robin_across_requests() {
        let p = Packer {
            max_tokens: 100,
            max_seqs: 64,
        };
        // A big request first, a one-input request after it: the small one is in the first
        // batch, not after the big one's 2,048 inputs.
        let big = vec![10usize; 2048];
        let small = vec![10usize];
        let picked = p.pick(&[&big, &small]);
        assert_eq!(picked.len(), 10);
        assert!(picked.contains(&(1, 0)), "{picked:?}");
        assert_eq!(picked.iter().filter(|x| x.0 == 0).count(), 9);
    }

    #[test]
    fn batches_stop_at_tokens_or_sequences_and_skip_what_does_not_fit() {
        let p = Packer {
            max_tokens: 50,
            max_seqs: 3,
        };
        assert_eq!(p.pick(&[&[10, 10, 10, 10]]), vec![(0, 0), (0, 1), (0, 2)]);
        // The 45-token input does not fit after the first 10; the other job's 5 still does.
        assert_eq!(p.pick(&[&[10, 45], &[5]]), vec![(0, 0), (1, 0)]);
        // A job's inputs stay in order: nothing after an input that did not fit.
        assert_eq!(p.pick(&[&[45, 10, 1]]), vec![(0, 0)]);
        assert!(p.pick(&[&[], &[]]).is_empty());
    }

    #[test]
    fn vectors_are_scaled_to_unit_length() {
        let v = normalized(&[3.0, 4.0]);
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
        assert_eq!(normalized(&[0.0, 0.0]), vec![0.0, 0.0]);
    }
}
