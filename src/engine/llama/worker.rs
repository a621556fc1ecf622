//! The scheduler thread of one loaded model: it owns the llama.cpp context, admits queued
//! requests into free sequences (reusing cached prefixes), and runs the batched decode loop.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc as std_mpsc;
use std::time::Instant;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::DecodeError;
use tokio::sync::mpsc;

use super::{Job, Shared, Ticket};
use crate::engine::sampling::argmax;
use crate::engine::scheduler::{Reuse, SlotTable};
use crate::engine::text::TextAssembler;
use crate::engine::{EngineError, Event, FinishReason, TokenId, Usage};

/// Most tokens in one decode call (generation tokens plus prompt chunks).
pub(super) const BATCH_TOKENS: usize = 512;

/// Prompt tokens prefilled per step while other sequences are generating: bounds the pause a
/// newcomer's long prompt puts into everyone else's stream (about a quarter second here).
const PREFILL_WHILE_GENERATING: usize = 128;

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
    /// When the request reached the engine: time to first token includes queueing.
    submitted: Instant,
    first_token: Option<Instant>,
    /// Index of this request's logits in the batch just decoded.
    logits_at: Option<i32>,
    /// Tokens added to the batch for this request this step.
    fed: Vec<TokenId>,
    _ticket: Ticket,
}

/// State owned by the scheduler thread.
pub(super) struct Worker<'m> {
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    shared: &'m Shared,
    n_ctx_seq: u32,
    slots: SlotTable,
    queue: VecDeque<Job>,
    active: Vec<Active>,
}

impl<'m> Worker<'m> {
    pub(super) fn new(
        model: &'m LlamaModel,
        ctx: LlamaContext<'m>,
        shared: &'m Shared,
        n_ctx_seq: u32,
        slots: SlotTable,
    ) -> Self {
        Self {
            model,
            ctx,
            shared,
            n_ctx_seq,
            slots,
            queue: VecDeque::new(),
            active: Vec::new(),
        }
    }

    /// Serves jobs until the engine shuts down or every sender is gone.
    pub(super) fn run(mut self, jobs: std_mpsc::Receiver<Job>) {
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

    /// Requests whose client hung up leave at once, queued or running; a running one's slot is
    /// free for the next request (its KV stays as an evictable cached prefix).
    fn drop_cancelled(&mut self) {
        let before = self.queue.len();
        self.queue.retain(|j| !j.events.is_closed());
        let gone = (before - self.queue.len()) as u32;
        if gone > 0 {
            tracing::debug!(count = gone, "queued requests cancelled by their clients");
            self.shared.queued.fetch_sub(gone, Ordering::SeqCst);
        }
        let before = self.active.len();
        let slots = &mut self.slots;
        self.active.retain(|a| {
            let keep = !a.events.is_closed();
            if !keep {
                tracing::debug!(slot = a.slot, "client disconnected; sequence freed");
                slots.release(a.slot);
            }
            keep
        });
        let cancelled = u64::from(gone) + (before - self.active.len()) as u64;
        self.shared
            .cancelled
            .fetch_add(cancelled, Ordering::Relaxed);
    }

    /// Moves queued requests, oldest first, into free sequences.
    fn admit(&mut self) {
        while self.slots.busy() < self.slots.len() {
            let Some(job) = self.queue.pop_front() else {
                break;
            };
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            let assignment = self.slots.assign(&job.req.prompt).expect("a slot is free");
            let reused = self.apply_reuse(assignment.slot, assignment.reuse);
            let req = job.req;
            let s = self.shared;
            s.requests.fetch_add(1, Ordering::Relaxed);
            s.prompt_tokens
                .fetch_add(req.prompt.len() as u64, Ordering::Relaxed);
            s.cached_tokens.fetch_add(reused as u64, Ordering::Relaxed);
            self.active.push(Active {
                slot: assignment.slot,
                events: job.events,
                pending_prompt: req.prompt[reused..].iter().copied().collect(),
                prompt_len: req.prompt.len() as u32,
                cached_tokens: reused as u32,
                next: None,
                picker: if req.sampling.is_plain_greedy() {
                    Picker::Greedy(req.sampling.logit_bias.clone())
                } else {
                    Picker::Chain(req.sampling.build(self.model.n_vocab()))
                },
                max_tokens: req.max_tokens,
                generated: 0,
                text: TextAssembler::new(req.stop),
                submitted: job.submitted,
                first_token: None,
                logits_at: None,
                fed: Vec::new(),
                _ticket: job.ticket,
            });
        }
    }

    /// Makes the slot's KV sequence hold exactly the reused prefix; returns its length (0 when
    /// the cache could not be trimmed and the prompt must be computed in full).
    fn apply_reuse(&mut self, slot: usize, reuse: Reuse) -> usize {
        let seq = self.slots.get(slot).seq;
        let len = match reuse {
            Reuse::None => {
                let _ = self.ctx.kv_cache_seq_rm(seq, None, None);
                return 0;
            }
            Reuse::Own { len } => {
                let _ = self.ctx.kv_cache_seq_rm(seq, Some(len as u32), None);
                len
            }
            Reuse::Copy { from, len } => {
                let src = self.slots.get(from).seq;
                let _ = self.ctx.kv_cache_seq_rm(seq, None, None);
                let _ = self
                    .ctx
                    .kv_cache_seq_cp(src, seq, Some(0), Some(len as u32));
                len
            }
        };
        // Check the cache holds what the bookkeeping says (a memory type that cannot drop a
        // tail, such as a recurrent model's, leaves more); else start this sequence afresh.
        if self.ctx.kv_cache_seq_pos_max(seq) != len as i32 - 1 {
            let _ = self.ctx.kv_cache_seq_rm(seq, None, None);
            self.slots.forget(slot);
            return 0;
        }
        len
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
        let generating = used;
        // Then prompt chunks, oldest request first, in whatever room is left; a smaller share
        // while others are generating, so their streams do not stall behind a long prompt.
        let prefill_room = if generating > 0 {
            PREFILL_WHILE_GENERATING
        } else {
            BATCH_TOKENS
        };
        let limit = BATCH_TOKENS.min(generating + prefill_room);
        for a in &mut self.active {
            if a.next.is_some() || a.pending_prompt.is_empty() {
                continue;
            }
            let seq = self.slots.get(a.slot).seq;
            let base = self.slots.get(a.slot).cached.len();
            while used < limit {
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
        if let Err(e) = self.decode(batch) {
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
        self.shared.rates.lock().expect("rates lock").record(
            Instant::now(),
            (used - generating) as u64,
            self.active.iter().filter(|a| a.logits_at.is_some()).count() as u64,
        );
        self.sample_and_emit();
    }

    /// Decodes the batch; if the KV pool is out of cells, evicts idle cached prefixes, least
    /// recently used first, and tries again.
    fn decode(&mut self, batch: &mut LlamaBatch) -> Result<(), DecodeError> {
        loop {
            match self.ctx.decode(batch) {
                Err(DecodeError::NoKvCacheSlot) => {
                    let Some(&victim) = self.slots.idle_cached_lru().first() else {
                        return Err(DecodeError::NoKvCacheSlot);
                    };
                    tracing::debug!(slot = victim, "KV pool full; evicting an idle cached prefix");
                    let seq = self.slots.get(victim).seq;
                    let _ = self.ctx.kv_cache_seq_rm(seq, None, None);
                    self.slots.forget(victim);
                }
                other => return other,
            }
        }
    }

    /// Picks each sequence's next token, streams its text, and retires finished requests.
    fn sample_and_emit(&mut self) {
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
            let a = self.active.remove(i);
            self.retire(a, reason);
        }
    }

    fn retire(&mut self, mut a: Active, reason: FinishReason) {
        let rest = a.text.finish();
        if !rest.is_empty() {
            let _ = a.events.send(Event::Text(rest));
        }
        let s = self.shared;
        s.completion_tokens
            .fetch_add(u64::from(a.generated), Ordering::Relaxed);
        let total = a.submitted.elapsed();
        let ms = total.as_millis() as u64;
        let _ = s
            .avg_request_ms
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |avg| {
                Some(if avg == 0 { ms } else { (avg * 7 + ms) / 8 })
            });
        let _ = a.events.send(Event::Done {
            finish_reason: reason,
            usage: Usage {
                prompt_tokens: a.prompt_len,
                completion_tokens: a.generated,
                cached_tokens: a.cached_tokens,
            },
            time_to_first_token: a.first_token.unwrap_or(a.submitted) - a.submitted,
            total_time: total,
        });
        self.slots.release(a.slot);
    }
}
