//! The scheduler thread of one loaded model: it owns the llama.cpp context, admits queued
//! requests into free sequences (reusing cached prefixes), and runs the batched decode loop.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use llama_cpp_2::context::session::LlamaStateSeqFlags;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::mpsc;

use super::draft::{Drafter, Want};
use super::picker::{Pending, Picked, Picker, Progress, Slice};
use super::{Job, Shared, Ticket};
use crate::engine::admission;
use crate::engine::options::Speculation;
use crate::engine::prompt_cache::DiskCache;
use crate::engine::sampling::logprobs;
use crate::engine::scheduler::{common_prefix, isolate_failures, Reuse, SlotTable};
use crate::engine::speculation::{ngram_proposal, Acceptance, SpecCosts};
use crate::engine::text::TextAssembler;
use crate::engine::{
    EngineError, Event, FinishReason, Held, TokenId, TokenLogprob, TokenText, Usage,
};

/// Most tokens in one decode call (generation tokens plus prompt chunks).
pub(super) const BATCH_TOKENS: usize = 512;

/// While other sequences are generating, a step's prompt tokens are sized so the step takes
/// about this long: long enough that prefill under load runs near the single-prompt rate
/// (each step also pays for one pass of the generating tokens), short enough that running
/// streams keep flowing. On fast hardware the cap is [`BATCH_TOKENS`].
const PREFILL_STEP_TARGET_MS: f64 = 1200.0;

/// Fewest prompt tokens a step carries while others generate, whatever the timing says.
const MIN_PREFILL_WHILE_GENERATING: usize = 128;

/// Measured step costs that size prefill under load.
#[derive(Debug, Clone, Copy)]
struct StepCosts {
    /// A step of generating tokens only, in ms (moving average).
    decode_ms: f64,
    /// Each prompt token on top of that, in ms (moving average).
    prefill_ms_per_token: f64,
}

impl Default for StepCosts {
    fn default() -> Self {
        // Guesses for a small model on two cores, replaced after the first steps.
        Self {
            decode_ms: 100.0,
            prefill_ms_per_token: 5.0,
        }
    }
}

impl StepCosts {
    /// Folds in one decode of `prompt` prompt tokens and `generating` generated ones.
    fn observe(&mut self, prompt: usize, generating: usize, ms: f64) {
        const KEEP: f64 = 0.8;
        if prompt == 0 && generating > 0 {
            self.decode_ms = KEEP * self.decode_ms + (1.0 - KEEP) * ms;
        } else if prompt >= 32 {
            let base = if generating > 0 { self.decode_ms } else { 0.0 };
            let per = ((ms - base) / prompt as f64).max(0.001);
            self.prefill_ms_per_token = KEEP * self.prefill_ms_per_token + (1.0 - KEEP) * per;
        }
    }

    /// Prompt tokens for a step that also carries generating tokens.
    fn prefill_budget(&self) -> usize {
        let room = (PREFILL_STEP_TARGET_MS - self.decode_ms).max(0.0);
        ((room / self.prefill_ms_per_token) as usize)
            .clamp(MIN_PREFILL_WHILE_GENERATING, BATCH_TOKENS)
    }
}

/// A new request waits for a running prefill that shares at least this many more prompt
/// tokens than the cache already holds, then copies them instead of computing them again.
const MIN_SHARED_TO_WAIT: usize = 32;

/// A prefix is restored from disk only when it gives this many more tokens than memory does.
const MIN_DISK_GAIN: usize = 32;

/// The disk tier of the prefix cache, once the model file's hash is known (it is computed in
/// the background at load, so a large model starts serving before it is done).
pub(super) type DiskTier = std::sync::Arc<std::sync::OnceLock<std::sync::Mutex<DiskCache>>>;

/// A prefix another request is computing right now, that this one will copy when it is in.
#[derive(Debug, Clone, Copy)]
struct Wait {
    /// The computing request's id.
    donor: u64,
    /// Prompt tokens shared with it.
    len: usize,
}

/// A request occupying a slot.
struct Active {
    id: u64,
    /// Who sent it (empty: no name), for fair shares at admission.
    client: Arc<str>,
    /// Its admission priority, shown in `/admin/status`.
    priority: admission::Priority,
    /// Its effective priority when it got its sequence (see [`admission::Running`]).
    standing: i64,
    /// When it got its sequence (admitted or resumed).
    admitted: Instant,
    /// Its prompt's length as the client sent it: a resumed request's `prompt` also holds
    /// what it generated before it was paused.
    prompt_tokens: u32,
    slot: usize,
    events: mpsc::UnboundedSender<Event>,
    prompt: Vec<TokenId>,
    /// Prompt tokens already in this sequence's KV cache (reused or computed); the rest are
    /// prefilled in chunks.
    prompt_done: usize,
    /// Set while this request waits to copy a prefix another request is prefilling.
    wait: Option<Wait>,
    /// Prompt tokens that came from the cache instead of being computed.
    cached_tokens: u32,
    /// The sampled token to feed next step, once the prompt is in.
    next: Option<TokenId>,
    picker: Picker,
    /// A grammar's pick still going through the vocabulary: the sequence sits out of the
    /// batch until it is done (see [`super::picker`]).
    pending: Option<Pending>,
    max_tokens: u32,
    generated: u32,
    /// Alternatives to report with each token's log-probability, if asked.
    logprobs: Option<u8>,
    text: TextAssembler,
    /// When the request reached the engine: time to first token includes queueing.
    submitted: Instant,
    first_token: Option<Instant>,
    /// Index of this request's logits in the batch just decoded.
    logits_at: Option<i32>,
    /// Tokens added to the batch for this request this step.
    fed: Vec<TokenId>,
    /// How this request proposes tokens (off unless the model or the request says).
    speculation: Speculation,
    /// Proposed tokens at the end of `fed`, verified this step.
    proposal: Vec<TokenId>,
    /// How often this request's proposals are accepted.
    acceptance: Acceptance,
    /// A proposal not verified (it did not pay), checked against the tokens that follow, so
    /// acceptance is still measured while speculation is off. With how many matched so far.
    shadow: Vec<TokenId>,
    shadow_matched: usize,
    _ticket: Ticket,
}

/// A request paused so a higher-priority one could run: everything it had, and its
/// sequence's KV (saved with llama.cpp's state API) so it resumes without recomputing.
struct Paused {
    a: Active,
    /// The tokens whose KV `state` holds: its prompt so far, or its prompt and its answer
    /// but the last sampled token (which is fed on resume).
    tokens: Vec<TokenId>,
    state: Option<Vec<u8>>,
}

/// What a free sequence takes next.
enum Next {
    New(Box<Job>),
    Resume(Box<Paused>),
}

/// State owned by the scheduler thread.
pub(super) struct Worker<'m> {
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    shared: &'m Shared,
    n_ctx_seq: u32,
    slots: SlotTable,
    /// Batch-invariant mode: each sequence is decoded alone, in fixed-size chunks, with no
    /// prefix reuse, so its output is bit-for-bit what it would be with nothing else running.
    invariant: bool,
    queue: VecDeque<Job>,
    active: Vec<Active>,
    /// Requests paused for higher-priority ones; they wait with the queue (counted as
    /// queued) and resume as sequences free. At most one per sequence, so their saved KV
    /// never exceeds the context's own.
    paused: Vec<Paused>,
    /// When each client last got a sequence: where its waiting requests' aging starts.
    served: admission::Served,
    next_id: u64,
    /// Jobs taken from the channel so far; with `next_id` and the two lengths, what
    /// [`Self::publish_counts`] compares to know the clients' tally is unchanged.
    received: u64,
    clients_mark: (u64, u64, usize, usize),
    /// Control tokens rendered as their text (markers the chat layer parses).
    rendered: HashSet<i32>,
    disk: DiskTier,
    /// Whether the model has sliding-window layers. llama.cpp saves a sequence's state with
    /// only the cells its window still sees from the sequence's last position, so a state
    /// saved at one length and cut shorter on restore would lack the window's oldest cells:
    /// such a model saves a prefix cut at a prompt's end and restores it only whole.
    sliding_window: bool,
    /// By slot: the length of the prompt its last request brought, where a sliding-window
    /// model's saved prefix ends (less the last token, which a request always recomputes).
    prompt_len: Vec<usize>,
    /// What steps have cost, to size prefill while others generate.
    costs: StepCosts,
    /// What verifying proposals costs, to decide when speculation pays.
    spec_costs: SpecCosts,
    /// The model's speculation mode and proposal bound.
    speculation: Speculation,
    draft_max: usize,
    /// Acceptance over the model's recent requests: a new request's starting estimate.
    model_acceptance: Acceptance,
    /// The draft model, when the model was loaded with one.
    drafter: Option<Drafter<'m>>,
    /// This step's time spent proposing (lookups, draft passes) and tokens emitted: with the
    /// decode's time, what the step cost per token.
    step_propose_ms: f64,
    step_emitted: usize,
    /// How long the last decode took: grammar work gets a share of it per sequence.
    last_decode: Duration,
}

impl Active {
    fn prefilling(&self) -> bool {
        self.prompt_done < self.prompt.len()
    }
}

/// What a worker is set up with besides the model, its context and the shared counters.
pub(super) struct Setup<'m> {
    pub n_ctx_seq: u32,
    pub slots: SlotTable,
    pub invariant: bool,
    pub rendered: HashSet<i32>,
    pub disk: DiskTier,
    pub speculation: Speculation,
    pub draft_max: usize,
    pub adaptive: bool,
    pub drafter: Option<Drafter<'m>>,
    pub sliding_window: bool,
}

impl<'m> Worker<'m> {
    pub(super) fn new(
        model: &'m LlamaModel,
        ctx: LlamaContext<'m>,
        shared: &'m Shared,
        setup: Setup<'m>,
    ) -> Self {
        let Setup {
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
        } = setup;
        let parallel = slots.len();
        Self {
            model,
            ctx,
            shared,
            n_ctx_seq,
            slots,
            invariant,
            queue: VecDeque::new(),
            active: Vec::new(),
            paused: Vec::new(),
            served: admission::Served::default(),
            next_id: 0,
            received: 0,
            clients_mark: (0, 0, 0, 0),
            rendered,
            disk,
            costs: StepCosts::default(),
            spec_costs: SpecCosts::new(parallel, adaptive),
            speculation,
            draft_max,
            model_acceptance: Acceptance::with_prior(0.5),
            drafter,
            step_propose_ms: 0.0,
            step_emitted: 0,
            last_decode: Duration::ZERO,
            sliding_window,
            prompt_len: vec![0; parallel],
        }
    }

    /// Serves jobs until the engine shuts down or every sender is gone.
    pub(super) fn run(mut self, jobs: std_mpsc::Receiver<Job>) {
        let mut batch = LlamaBatch::new(BATCH_TOKENS, 1);
        loop {
            // Wait for work when idle; otherwise just collect what arrived.
            if self.active.is_empty() && self.queue.is_empty() && self.paused.is_empty() {
                self.publish_counts();
                match jobs.recv() {
                    Ok(job) => self.receive(job),
                    Err(_) => break,
                }
            }
            loop {
                match jobs.try_recv() {
                    Ok(job) => self.receive(job),
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
            self.slots.release(a.slot);
        }
        for p in self.paused.drain(..) {
            let _ = p.a.events.send(Event::Error(EngineError::Unloaded));
        }
        self.shared.queued.store(0, Ordering::SeqCst);
        self.shared.active.store(0, Ordering::SeqCst);
        // Unload or shutdown: the prefixes worth keeping go to disk before the KV is freed.
        let writes: Vec<_> = (0..self.slots.len())
            .filter_map(|i| {
                let slot = self.slots.get(i);
                let (seq, tokens) = (slot.seq, slot.cached.clone());
                self.save_to_disk(i, seq, tokens, 0)
            })
            .collect();
        for w in writes {
            let _ = w.join();
        }
    }

    /// Writes a sequence's KV for `tokens` (what it holds) to the disk tier, if the tier is
    /// ready, the prefix is long enough and not already there. Returns the writer thread.
    /// With sliding-window layers, what is written is the slot's last prompt less its last
    /// token, the sequence cut there first: only when the slot keeps no more than that
    /// (`kept` tokens) for its next request.
    fn save_to_disk(
        &mut self,
        slot: usize,
        seq: i32,
        mut tokens: Vec<TokenId>,
        kept: usize,
    ) -> Option<std::thread::JoinHandle<()>> {
        if self.invariant {
            return None;
        }
        // Its own handle on the tier: the sequence may be cut below while the tier is held.
        let tier = std::sync::Arc::clone(&self.disk);
        let tier = tier.get()?;
        if self.sliding_window {
            let cut = self.prompt_len[slot].saturating_sub(1).min(tokens.len());
            if kept > cut {
                return None;
            }
            if cut < tokens.len() {
                self.ctx.kv_cache_seq_rm(seq, Some(cut as u32), None).ok()?;
                tokens.truncate(cut);
            }
        }
        let mut disk = tier.lock().expect("prompt cache lock");
        if tokens.len() < disk.min_tokens() || disk.holds(&tokens) {
            return None;
        }
        let state = self.copy_state(seq, tokens.len())?;
        tracing::debug!(
            tokens = tokens.len(),
            bytes = state.len(),
            "prompt cache: saving a prefix"
        );
        Some(disk.save(tokens, state))
    }

    /// A copy of sequence `seq`'s KV (llama.cpp's state API), which must hold `len` tokens;
    /// `None` when it does not (the bookkeeping and the KV disagree: keep nothing).
    fn copy_state(&mut self, seq: i32, len: usize) -> Option<Vec<u8>> {
        if self.ctx.kv_cache_seq_pos_max(seq) != len as i32 - 1 {
            return None;
        }
        let flags = LlamaStateSeqFlags::empty();
        let size = self.ctx.state_seq_get_size_ext(seq, flags);
        let mut state = vec![0u8; size];
        // SAFETY: the buffer holds the size llama.cpp just reported for this sequence.
        let n = unsafe {
            self.ctx
                .state_seq_get_data_ext(state.as_mut_ptr(), seq, flags)
        };
        if n != size {
            tracing::warn!(
                expected = size,
                written = n,
                "state size changed while copying a sequence"
            );
            return None;
        }
        Some(state)
    }

    /// Restores a longer prefix of `prompt` from the disk tier than the memory tiers gave
    /// (`reused` tokens), into the slot's sequence. Returns the tokens now reused.
    fn restore_from_disk(&mut self, slot: usize, prompt: &[TokenId], reused: usize) -> usize {
        if self.invariant {
            return reused;
        }
        let Some(disk) = self.disk.get() else {
            return reused;
        };
        let mut disk = disk.lock().expect("prompt cache lock");
        let cap = prompt.len().saturating_sub(1);
        let Some((entry, len)) = disk.best(prompt, cap) else {
            return reused;
        };
        if len < reused + MIN_DISK_GAIN || self.sliding_window && len != entry.tokens.len() {
            return reused;
        }
        let Some(state) = disk.load(&entry) else {
            return reused;
        };
        let seq = self.slots.get(slot).seq;
        let _ = self.ctx.kv_cache_seq_rm(seq, None, None);
        // SAFETY: the state was written by `state_seq_get_data_ext` under the same layout
        // (model file hash, context per sequence, cache types), and its SHA-256 checked.
        let loaded = unsafe {
            self.ctx
                .state_seq_set_data_ext(&state, seq, LlamaStateSeqFlags::empty())
        };
        if loaded {
            let _ = self.ctx.kv_cache_seq_rm(seq, Some(len as u32), None);
        }
        if !loaded || self.ctx.kv_cache_seq_pos_max(seq) != len as i32 - 1 {
            // llama.cpp refused it: this sequence starts afresh and the file goes.
            let _ = self.ctx.kv_cache_seq_rm(seq, None, None);
            self.slots.forget(slot);
            disk.drop_entry(&entry.path, "llama.cpp refused the state");
            return 0;
        }
        let s = self.slots.get_mut(slot);
        s.cached.clear();
        s.cached.extend_from_slice(&prompt[..len]);
        tracing::debug!(tokens = len, "prompt cache: restored a prefix from disk");
        len
    }

    fn publish_counts(&mut self) {
        self.shared
            .active
            .store(self.active.len() as u32, Ordering::Relaxed);
        // The clients' tally changes only when a request arrives, is admitted or leaves, and
        // each of those moves one of these: no rebuild on the decode steps in between.
        let mark = (
            self.received,
            self.next_id + self.shared.paused.load(Ordering::Relaxed),
            self.active.len(),
            self.queue.len() + self.paused.len(),
        );
        if mark == self.clients_mark {
            return;
        }
        self.clients_mark = mark;
        let served = &self.served;
        let held = |a: &Active, running| Held {
            client: Arc::clone(&a.client),
            priority: a.priority,
            since: a.submitted,
            aging_from: served.aging_from(&a.client, a.priority, a.submitted),
            running,
        };
        let held = self
            .active
            .iter()
            .map(|a| held(a, true))
            .chain(self.queue.iter().map(|j| {
                let client = job_client(j);
                let priority = j.req.priority.unwrap_or(0);
                Held {
                    aging_from: served.aging_from(&client, priority, j.submitted),
                    client,
                    priority,
                    since: j.submitted,
                    running: false,
                }
            }))
            .chain(self.paused.iter().map(|p| held(&p.a, false)))
            .collect();
        *self.shared.held.lock().expect("held lock") = held;
    }

    /// Queues a job that arrived.
    fn receive(&mut self, job: Job) {
        self.received += 1;
        self.queue.push_back(job);
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
        let before = self.paused.len();
        self.paused.retain(|p| !p.a.events.is_closed());
        let left_paused = (before - self.paused.len()) as u32;
        if left_paused > 0 {
            tracing::debug!(
                count = left_paused,
                "paused requests cancelled by their clients"
            );
            self.shared.queued.fetch_sub(left_paused, Ordering::SeqCst);
        }
        let gone = gone + left_paused;
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

    /// The queued request a free sequence takes next (see [`crate::engine::admission`]):
    /// priority, aged by waiting, then the client with fewer running sequences, then the
    /// oldest.
    /// Paused requests wait beside the queue, with their first arrival as their age.
    fn next_queued(&self) -> Option<(usize, i64)> {
        let running: Vec<&str> = self.active.iter().map(|a| &*a.client).collect();
        let waiting: Vec<admission::Waiting<'_>> = self
            .queue
            .iter()
            .map(|j| {
                let client = j.req.client.as_deref().unwrap_or("");
                let priority = j.req.priority.unwrap_or(0);
                admission::Waiting {
                    priority,
                    client,
                    since: j.submitted,
                    aging_from: self.served.aging_from(client, priority, j.submitted),
                }
            })
            .chain(self.paused.iter().map(|p| {
                admission::Waiting {
                    priority: p.a.priority,
                    client: &p.a.client,
                    since: p.a.submitted,
                    aging_from: self
                        .served
                        .aging_from(&p.a.client, p.a.priority, p.a.submitted),
                }
            }))
            .collect();
        let now = Instant::now();
        let at = admission::next(&waiting, &running, now)?;
        Some((at, waiting[at].effective(now)))
    }

    /// Takes the `at`th waiting request ([`Self::next_queued`]'s numbering).
    fn take_waiting(&mut self, at: usize) -> Next {
        if at < self.queue.len() {
            Next::New(Box::new(self.queue.remove(at).expect("in the queue")))
        } else {
            Next::Resume(Box::new(self.paused.remove(at - self.queue.len())))
        }
    }

    /// The raw priority and client of the `at`th waiting request.
    fn waiting_at(&self, at: usize) -> (admission::Priority, Arc<str>) {
        match self.queue.get(at) {
            Some(j) => (j.req.priority.unwrap_or(0), job_client(j)),
            None => {
                let a = &self.paused[at - self.queue.len()].a;
                (a.priority, Arc::clone(&a.client))
            }
        }
    }

    /// With every sequence busy, the running request to pause for the `at`th waiting one
    /// (see [`admission::victim`]).
    fn victim_for(&self, at: usize) -> Option<usize> {
        let (priority, client) = self.waiting_at(at);
        let running: Vec<admission::Running> = self
            .active
            .iter()
            .map(|a| admission::Running {
                client: &a.client,
                standing: a.standing,
                admitted: a.admitted,
                pausable: a.pending.is_none() && a.wait.is_none(),
            })
            .collect();
        admission::victim(priority, &client, &running)
    }

    /// Pauses the running request at `i` of `active`: its sequence's KV is copied out with
    /// llama.cpp's state API and the sequence freed; its client sees only a pause in the
    /// stream. Returns false (nothing changed) when the KV is not what the bookkeeping says.
    fn pause(&mut self, i: usize) -> bool {
        let slot = self.active[i].slot;
        let seq = self.slots.get(slot).seq;
        let tokens = self.slots.get(slot).cached.clone();
        let state = if tokens.is_empty() {
            None
        } else {
            let Some(state) = self.copy_state(seq, tokens.len()) else {
                return false;
            };
            Some(state)
        };
        let a = self.active.remove(i);
        self.slots.release(slot);
        tracing::info!(
            client = %a.client,
            priority = a.priority,
            tokens = tokens.len(),
            bytes = state.as_ref().map_or(0, Vec::len),
            "sequence paused for a higher-priority request"
        );
        self.shared.paused.fetch_add(1, Ordering::Relaxed);
        self.shared.queued.fetch_add(1, Ordering::SeqCst);
        self.paused.push(Paused { a, tokens, state });
        true
    }

    /// Puts a paused request back into a free sequence: the longest prefix the caches hold,
    /// else its saved state; only what neither gives is computed again (normally nothing).
    /// The token it sampled last is fed as the last of its "prompt", so it goes on exactly
    /// where it stopped.
    fn resume(&mut self, p: Paused) {
        let Paused {
            mut a,
            tokens,
            state,
        } = p;
        if let Some(next) = a.next.take() {
            let mut all = tokens.clone();
            all.push(next);
            a.prompt = all;
        }
        let assignment = self.assign(&a.prompt);
        let slot = assignment.slot;
        self.prompt_len[slot] = a.prompt_tokens as usize;
        let mut have = self.apply_reuse(slot, assignment.reuse);
        if have < tokens.len() {
            if let Some(state) = &state {
                have = self.restore_state(slot, &tokens, state).unwrap_or(have);
            }
        }
        if have < tokens.len() {
            have = self.restore_from_disk(slot, &a.prompt, have);
        }
        let s = self.shared;
        s.resumed_tokens
            .fetch_add(have.min(tokens.len()) as u64, Ordering::Relaxed);
        s.recomputed_tokens
            .fetch_add(tokens.len().saturating_sub(have) as u64, Ordering::Relaxed);
        tracing::info!(
            client = %a.client,
            restored = have.min(tokens.len()),
            recomputed = tokens.len().saturating_sub(have),
            "paused sequence resumed"
        );
        a.slot = slot;
        a.prompt_done = have;
        a.wait = None;
        let now = Instant::now();
        let aging_from = self.served.aging_from(&a.client, a.priority, a.submitted);
        a.standing = admission::effective(a.priority, aging_from, now);
        self.served.admitted(&a.client, a.priority, now);
        a.admitted = now;
        self.shared.queued.fetch_sub(1, Ordering::SeqCst);
        self.active.push(a);
    }

    /// A free sequence for `prompt` (see [`SlotTable::assign`]); the cache it replaces may
    /// be worth keeping on disk, and the KV still holds it until the reuse is applied.
    fn assign(&mut self, prompt: &[TokenId]) -> crate::engine::scheduler::Assignment {
        let assignment = self.slots.assign(prompt).expect("a slot is free");
        if let Some((slot, old)) = self.slots.take_dropped() {
            let seq = self.slots.get(slot).seq;
            let kept = match assignment.reuse {
                Reuse::Own { len } => len,
                _ => 0,
            };
            drop(self.save_to_disk(slot, seq, old, kept));
        }
        assignment
    }

    /// Loads a paused sequence's saved state into `slot`; the tokens it holds, or `None`
    /// when llama.cpp refused it (the sequence is then empty).
    fn restore_state(&mut self, slot: usize, tokens: &[TokenId], state: &[u8]) -> Option<usize> {
        let seq = self.slots.get(slot).seq;
        let _ = self.ctx.kv_cache_seq_rm(seq, None, None);
        // SAFETY: the state was written by `state_seq_get_data_ext` from this same context.
        let loaded = unsafe {
            self.ctx
                .state_seq_set_data_ext(state, seq, LlamaStateSeqFlags::empty())
        };
        if !loaded || self.ctx.kv_cache_seq_pos_max(seq) != tokens.len() as i32 - 1 {
            let _ = self.ctx.kv_cache_seq_rm(seq, None, None);
            self.slots.forget(slot);
            return None;
        }
        let cached = &mut self.slots.get_mut(slot).cached;
        cached.clear();
        cached.extend_from_slice(tokens);
        Some(tokens.len())
    }

    /// Moves queued requests into free sequences, in [`Self::next_queued`]'s order.
    /// With every sequence busy, a waiting request with a better priority than a running
    /// one's standing pauses it (see [`Self::pause`]) and takes its sequence.
    fn admit(&mut self) {
        loop {
            let full = self.slots.busy() == self.slots.len();
            // Full, and every sequence's worth of paused requests already: nothing can move.
            if full && self.paused.len() >= self.slots.len() {
                break;
            }
            let Some((at, standing)) = self.next_queued() else {
                break;
            };
            if full {
                let Some(victim) = self.victim_for(at) else {
                    break;
                };
                if !self.pause(victim) {
                    break;
                }
            }
            let mut job = match self.take_waiting(at) {
                Next::New(job) => *job,
                Next::Resume(p) => {
                    self.resume(*p);
                    continue;
                }
            };
            self.shared.queued.fetch_sub(1, Ordering::SeqCst);
            let picker = match Picker::new(&job.req.sampling, self.model, job.grammar.take()) {
                Ok(p) => p,
                // Checked at submit; a failure here still ends only this request.
                Err(e) => {
                    let _ = job.events.send(Event::Error(EngineError::Decode(e)));
                    continue;
                }
            };
            let assignment = self.assign(&job.req.prompt);
            self.prompt_len[assignment.slot] = job.req.prompt.len();
            let reused = self.apply_reuse(assignment.slot, assignment.reuse);
            let reused = self.restore_from_disk(assignment.slot, &job.req.prompt, reused);
            let req = job.req;
            let wait = self.running_prefill_to_share(&req.prompt, reused);
            let s = self.shared;
            s.requests.fetch_add(1, Ordering::Relaxed);
            s.prompt_tokens
                .fetch_add(req.prompt.len() as u64, Ordering::Relaxed);
            s.cached_tokens.fetch_add(reused as u64, Ordering::Relaxed);
            if reused > 0 || wait.is_some() {
                s.cache_hits.fetch_add(1, Ordering::Relaxed);
            }
            self.next_id += 1;
            let client = req.client.clone().unwrap_or_else(|| Arc::from(""));
            let priority = req.priority.unwrap_or(0);
            self.served.admitted(&client, priority, Instant::now());
            self.active.push(Active {
                id: self.next_id,
                client,
                priority,
                standing,
                admitted: Instant::now(),
                prompt_tokens: req.prompt.len() as u32,
                slot: assignment.slot,
                events: job.events,
                prompt: req.prompt,
                prompt_done: reused,
                wait,
                cached_tokens: reused as u32,
                next: None,
                picker,
                pending: None,
                max_tokens: req.max_tokens,
                generated: 0,
                logprobs: req.logprobs,
                text: TextAssembler::new(req.stop),
                submitted: job.submitted,
                first_token: None,
                logits_at: None,
                fed: Vec::new(),
                // Batch-invariant mode decodes one token per pass by definition.
                speculation: if self.invariant {
                    Speculation::Off
                } else {
                    req.speculation.unwrap_or(self.speculation)
                },
                proposal: Vec::new(),
                acceptance: self.model_acceptance,
                shadow: Vec::new(),
                shadow_matched: 0,
                _ticket: job.ticket,
            });
        }
    }

    /// A request still prefilling a prompt that shares clearly more with `prompt` than the
    /// `reused` tokens already cached: six bots arriving together with one system prompt then
    /// compute it once, not six times.
    fn running_prefill_to_share(&self, prompt: &[TokenId], reused: usize) -> Option<Wait> {
        if self.invariant {
            return None; // a copied prefix was computed in another request's chunks
        }
        let cap = prompt.len().saturating_sub(1);
        self.active
            .iter()
            .filter(|a| a.prefilling())
            .map(|a| (a.id, common_prefix(&a.prompt, prompt).min(cap)))
            .filter(|&(_, len)| len >= reused + MIN_SHARED_TO_WAIT)
            .max_by_key(|&(_, len)| len)
            .map(|(donor, len)| Wait { donor, len })
    }

    /// Copies the awaited prefixes that are now computed. A request whose donor went away
    /// (cancelled) computes its prompt itself.
    fn resolve_waits(&mut self) {
        for i in 0..self.active.len() {
            let Some(w) = self.active[i].wait else {
                continue;
            };
            let donor_slot = match self.active.iter().find(|d| d.id == w.donor) {
                None => {
                    self.active[i].wait = None;
                    continue;
                }
                Some(d) if self.slots.get(d.slot).cached.len() < w.len => continue,
                Some(d) => d.slot,
            };
            self.active[i].wait = None;
            let slot = self.active[i].slot;
            let len = self.apply_reuse(
                slot,
                Reuse::Copy {
                    from: donor_slot,
                    len: w.len,
                },
            );
            let a = &mut self.active[i];
            let cached = &mut self.slots.get_mut(slot).cached;
            cached.clear();
            cached.extend_from_slice(&a.prompt[..len]);
            let gained = len.saturating_sub(a.cached_tokens as usize);
            self.shared
                .cached_tokens
                .fetch_add(gained as u64, Ordering::Relaxed);
            a.cached_tokens = len as u32;
            a.prompt_done = len;
        }
    }

    /// Makes sequence `dst` hold positions `0..len` of sequence `src`. Each sequence has its
    /// own stream of cells (so a sequence's cells stay in position order and a prompt gives
    /// the same tokens whatever else is batched with it), and llama.cpp copies between
    /// streams only whole: copy all, then drop the tail. The copy runs at the next decode,
    /// before anything is written.
    fn copy_prefix(&mut self, src: i32, dst: i32, len: usize) {
        let _ = self.ctx.kv_cache_seq_rm(dst, None, None);
        let _ = self.ctx.kv_cache_seq_cp(src, dst, None, None);
        let _ = self.ctx.kv_cache_seq_rm(dst, Some(len as u32), None);
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
                self.copy_prefix(src, seq, len);
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

    /// One forward pass for everyone (one per sequence in batch-invariant mode), then one
    /// sampled token for each sequence that has logits.
    fn step(&mut self, batch: &mut LlamaBatch) {
        self.advance_pending_picks();
        self.resolve_waits();
        self.plan_feeds();
        // Into the batch in sequence-id order: with a KV stream per sequence, llama.cpp puts
        // only consecutive sequence ids into one micro-batch, so arrival order would split a
        // step into many small matrix multiplications.
        let mut fed: Vec<(i32, u64)> = self
            .active
            .iter()
            .filter(|a| !a.fed.is_empty())
            .map(|a| (self.slots.get(a.slot).seq, a.id))
            .collect();
        fed.sort_unstable();
        let ids: Vec<u64> = fed.into_iter().map(|(_, id)| id).collect();
        let groups: Vec<Vec<u64>> = if self.invariant {
            ids.into_iter().map(|id| vec![id]).collect()
        } else {
            vec![ids]
        };
        for group in groups.iter().filter(|g| !g.is_empty()) {
            let failed =
                isolate_failures(group, &mut |members| self.decode_and_sample(batch, members));
            for (id, error) in failed {
                self.fail(id, error);
            }
        }
    }

    /// Decides what each request feeds this step: one token for every generating sequence,
    /// then prompt chunks in whatever room is left (a smaller share while others are
    /// generating, so their streams do not stall behind a long prompt), in
    /// [`admission::prefill_order`]: better priority first, then one request per client, then
    /// shortest remaining prompt (aged).
    ///
    /// The last prompt token always goes alone, in a step after the rest of its prompt: its
    /// logits (what the first sampled token comes from) are then computed the same way whether
    /// the prefix was cached or not, so the same seed gives the same answer either way.
    fn plan_feeds(&mut self) {
        let mut generating = 0;
        for a in &mut self.active {
            a.logits_at = None;
            a.fed.clear();
            a.proposal.clear();
            if let Some(tok) = a.next {
                a.fed.push(tok);
                generating += 1;
            }
        }
        let proposed = self.plan_proposals(generating);
        // A prompt of better priority than every stream takes whole batches: the streams
        // slow down for the person's turn, not the other way round.
        let prefilling: Vec<usize> = (0..self.active.len())
            .filter(|&i| {
                let a = &self.active[i];
                a.next.is_none() && a.prefilling() && a.wait.is_none()
            })
            .collect();
        let best_prompt = prefilling.iter().map(|&i| self.active[i].standing).min();
        let best_stream = self
            .active
            .iter()
            .filter(|a| a.next.is_some())
            .map(|a| a.standing)
            .min();
        let urgent = match (best_prompt, best_stream) {
            (Some(p), Some(g)) => admission::outranks(p, g),
            _ => false,
        };
        let prefill_room = if generating > 0 && !urgent {
            self.costs.prefill_budget()
        } else {
            BATCH_TOKENS
        };
        let generating = generating + proposed;
        // (Batch-invariant mode: every sequence decodes alone, in chunks of the same size
        // whatever else is running, so it takes no share of this room.)
        let mut room = BATCH_TOKENS.min(generating + prefill_room) - generating;
        let keys: Vec<admission::Prefilling> = prefilling
            .iter()
            .map(|&i| {
                let a = &self.active[i];
                admission::Prefilling {
                    standing: a.standing,
                    client: &a.client,
                    since: a.submitted,
                    left: a.prompt.len() - a.prompt_done,
                }
            })
            .collect();
        let order: Vec<usize> = admission::prefill_order(&keys, Instant::now())
            .into_iter()
            .map(|k| prefilling[k])
            .collect();
        for i in order {
            let a = &mut self.active[i];
            let cap = if self.invariant { BATCH_TOKENS } else { room };
            if cap == 0 {
                continue;
            }
            let left = a.prompt.len() - a.prompt_done;
            let take = if left == 1 { 1 } else { (left - 1).min(cap) };
            a.fed
                .extend_from_slice(&a.prompt[a.prompt_done..a.prompt_done + take]);
            a.prompt_done += take;
            if !self.invariant {
                room -= take;
            }
        }
    }

    /// Appends to each generating sequence's feed the proposed tokens worth verifying this
    /// step (see [`crate::engine::speculation`]); returns how many in all. A prompt-lookup
    /// proposal that does not pay is kept as a shadow, to measure acceptance without paying
    /// for it; a draft model is asked only for the sequences where drafting pays.
    fn plan_proposals(&mut self, generating: usize) -> usize {
        let started = Instant::now();
        self.step_propose_ms = 0.0;
        let speculating = self
            .active
            .iter()
            .any(|a| a.next.is_some() && a.speculation != Speculation::Off);
        if !speculating || !self.spec_costs.step_allows(generating) {
            return 0;
        }
        // Proposals never take more than half a batch, whatever `parallel x draft_max` is.
        let mut room = BATCH_TOKENS / 2;
        // Draft-model asks, and the index in `active` of the request each is for.
        let (mut wants, mut owners): (Vec<Want>, Vec<usize>) = (Vec::new(), Vec::new());
        let mut total = 0;
        for (i, a) in self.active.iter_mut().enumerate() {
            let Some(next) = a.next else { continue };
            if a.speculation == Speculation::Off || room == 0 {
                continue;
            }
            let cached = &self.slots.get(a.slot).cached;
            // Room in the answer and the context after `next` and the token the step samples.
            let answer_left = a.max_tokens.saturating_sub(a.generated + 1) as usize;
            let context_left = (self.n_ctx_seq as usize).saturating_sub(cached.len() + 2);
            let bound = self.draft_max.min(answer_left).min(context_left).min(room);
            if bound == 0 {
                continue;
            }
            let mut history = Vec::with_capacity(cached.len() + 1);
            history.extend_from_slice(cached);
            history.push(next);
            let p = a.acceptance.rate();
            if a.speculation == Speculation::Draft {
                let Some(d) = &self.drafter else { continue };
                let seq = self.slots.get(a.slot).seq;
                let behind = d.behind(seq, &history);
                let k = match (d.ms_per_token, d.catch_up_ms_per_token) {
                    // Unmeasured: a probe, but never one that catches up on a long prompt.
                    (None, _) | (_, None) if behind > 512 && self.spec_costs.adaptive() => 0,
                    (None, _) | (_, None) => self.spec_costs.choose(generating, bound, p),
                    (Some(per), Some(catch_up)) => self.spec_costs.choose_with(
                        generating,
                        bound,
                        p,
                        per,
                        catch_up * behind.saturating_sub(1) as f64,
                    ),
                };
                if k > 0 {
                    room -= k;
                    owners.push(i);
                    wants.push(Want {
                        seq,
                        history,
                        max: k,
                    });
                }
                continue;
            }
            let proposal = ngram_proposal(&history, bound);
            let k = self.spec_costs.choose(generating, proposal.len(), p);
            if k == 0 {
                if a.shadow.is_empty() && !proposal.is_empty() {
                    a.shadow = proposal;
                    a.shadow_matched = 0;
                }
                continue;
            }
            a.shadow.clear();
            a.proposal.extend_from_slice(&proposal[..k]);
            a.fed.extend_from_slice(&proposal[..k]);
            room -= k;
            total += k;
        }
        if let (Some(d), false) = (self.drafter.as_mut(), wants.is_empty()) {
            let proposals = d.propose(&wants);
            for (i, proposal) in owners.into_iter().zip(proposals) {
                let a = &mut self.active[i];
                a.proposal.extend_from_slice(&proposal);
                a.fed.extend_from_slice(&proposal);
                total += proposal.len();
            }
        }
        self.step_propose_ms = started.elapsed().as_secs_f64() * 1000.0;
        total
    }

    /// One decode of the tokens `members` planned, then their sampling (logits are only valid
    /// until the next decode). On failure nothing is sampled; the caller retries or fails them.
    fn decode_and_sample(&mut self, batch: &mut LlamaBatch, members: &[u64]) -> Result<(), String> {
        batch.clear();
        let mut used = 0usize;
        let mut generating = 0usize;
        let mut proposed = 0usize;
        for &id in members {
            let Some(a) = self.active.iter_mut().find(|a| a.id == id) else {
                continue;
            };
            let slot = self.slots.get(a.slot);
            let wants_logits = a.next.is_some() || !a.prefilling();
            generating += usize::from(a.next.is_some());
            proposed += a.proposal.len();
            // Logits at the last token, and at every proposed token's predecessor.
            let first_logits = a.fed.len().saturating_sub(1 + a.proposal.len());
            a.logits_at = None;
            for (k, &tok) in a.fed.iter().enumerate() {
                let logits = wants_logits && k >= first_logits;
                batch
                    .add(
                        LlamaToken(tok),
                        (slot.cached.len() + k) as i32,
                        &[slot.seq],
                        logits,
                    )
                    .map_err(|e| e.to_string())?;
                if logits && a.logits_at.is_none() {
                    a.logits_at = Some(used as i32);
                }
                used += 1;
            }
        }
        if used == 0 {
            return Ok(());
        }
        let started = Instant::now();
        self.ctx.decode(batch).map_err(|e| e.to_string())?;
        let prompt = used - generating - proposed;
        self.last_decode = started.elapsed();
        let ms = self.last_decode.as_secs_f64() * 1000.0;
        if tracing::enabled!(tracing::Level::TRACE) {
            // Runs of consecutive sequence ids: each is a pass of its own in llama.cpp.
            let mut seqs: Vec<i32> = self
                .active
                .iter()
                .filter(|a| members.contains(&a.id) && !a.fed.is_empty())
                .map(|a| self.slots.get(a.slot).seq)
                .collect();
            seqs.sort_unstable();
            let runs = seqs.windows(2).filter(|w| w[1] != w[0] + 1).count() + 1;
            tracing::trace!(prompt, generating, proposed, runs, ms, "step");
        }
        if !self.invariant {
            // Proposed tokens cost what prompt tokens do: extra rows in the same pass.
            self.costs.observe(prompt + proposed, generating, ms);
            if prompt == 0 {
                self.spec_costs.observe(generating, proposed, ms);
            }
        }
        let sampled = self
            .active
            .iter()
            .filter(|a| members.contains(&a.id) && a.logits_at.is_some())
            .count() as u64;
        self.shared.rates.lock().expect("rates lock").record(
            Instant::now(),
            prompt as u64,
            sampled,
        );
        self.step_emitted = 0;
        self.sample_and_emit(members);
        if !self.invariant && prompt == 0 {
            let cost = ms + std::mem::take(&mut self.step_propose_ms);
            self.spec_costs
                .observe_outcome(generating, proposed > 0, self.step_emitted, cost);
        }
        Ok(())
    }

    /// Ends one request whose tokens llama.cpp refused even alone; the rest of the batch goes
    /// on. Its sequence's KV is dropped, since it may hold part of the failed batch.
    fn fail(&mut self, id: u64, error: String) {
        let Some(i) = self.active.iter().position(|a| a.id == id) else {
            return;
        };
        let a = self.active.remove(i);
        tracing::error!(error = %error, slot = a.slot, "decode failed for one sequence; ending that request");
        let seq = self.slots.get(a.slot).seq;
        let _ = self.ctx.kv_cache_seq_rm(seq, None, None);
        self.slots.forget(a.slot);
        self.slots.release(a.slot);
        let _ = a.events.send(Event::Error(EngineError::Decode(error)));
    }

    /// Picks the next token of each of `members` that has logits, streams its text, and
    /// retires finished requests. A sequence that verified a proposal samples each position
    /// in turn and keeps going while the sampled token is the proposed one; the rejected rest
    /// of the proposal leaves its KV.
    fn sample_and_emit(&mut self, members: &[u64]) {
        let vocab = self.model.vocab();
        let rendered = &self.rendered;
        let slice = self.grammar_slice();
        let mut ends = Vec::new();
        for (i, a) in self.active.iter_mut().enumerate() {
            if !members.contains(&a.id) {
                continue;
            }
            let proposal = std::mem::take(&mut a.proposal);
            let fed = std::mem::take(&mut a.fed);
            let slot = self.slots.get_mut(a.slot);
            let before = slot.cached.len();
            // What the KV now holds for sure: everything fed but the proposal.
            let mut kept = fed.len() - proposal.len();
            slot.cached.extend_from_slice(&fed[..kept]);
            let Some(first) = a.logits_at.take() else {
                continue;
            };
            let mut finish = None;
            let mut accepted = 0;
            for j in 0..=proposal.len() {
                let idx = first + j as i32;
                let tok = match a.picker.pick(&self.ctx, idx, slice) {
                    Picked::Token(tok) => tok,
                    // The rest of any proposal counts as rejected: this token is not known.
                    Picked::Pending(p) => {
                        a.pending = Some(p);
                        a.next = None;
                        break;
                    }
                    Picked::TooSlow(spent) => {
                        ends.push((i, Err(spent)));
                        a.next = None;
                        break;
                    }
                };
                self.step_emitted += 1;
                let position = before + kept;
                finish = emit(
                    a,
                    self.ctx.get_logits_ith(idx),
                    tok,
                    position,
                    self.n_ctx_seq,
                    &vocab,
                    rendered,
                );
                if finish.is_some() {
                    break;
                }
                match proposal.get(j) {
                    Some(&p) if p == tok.0 => {
                        // Accepted: the proposed token's KV is the right one; go on from it.
                        accepted += 1;
                        kept += 1;
                        slot.cached.push(p);
                        a.next = None;
                    }
                    _ => {
                        a.next = Some(tok.0);
                        break;
                    }
                }
            }
            if !proposal.is_empty() {
                a.acceptance.observe(accepted, proposal.len());
                self.model_acceptance.observe(accepted, proposal.len());
                let s = self.shared;
                s.proposed_tokens
                    .fetch_add(proposal.len() as u64, Ordering::Relaxed);
                s.accepted_tokens
                    .fetch_add(accepted as u64, Ordering::Relaxed);
                s.speculative_steps.fetch_add(1, Ordering::Relaxed);
                if accepted < proposal.len() {
                    let _ =
                        self.ctx
                            .kv_cache_seq_rm(slot.seq, Some(slot.cached.len() as u32), None);
                }
            }
            if let Some(reason) = finish {
                a.next = None;
                ends.push((i, Ok(reason)));
            }
        }
        self.end_finished(ends);
    }

    /// Retires the requests at these indices of `active` (in ascending order, at most once
    /// each) that finished, and fails those whose grammar was too slow; back to front so
    /// indices stay valid.
    fn end_finished(&mut self, ends: Vec<(usize, Result<FinishReason, Duration>)>) {
        for (i, end) in ends.into_iter().rev() {
            // `remove`, not `swap_remove`: arrival order decides whose prompt is prefilled first.
            let a = self.active.remove(i);
            // Counted out before its client hears it is done, so a scrape right after sees it.
            self.publish_counts();
            match end {
                Ok(reason) => self.retire(a, reason),
                Err(spent) => self.grammar_too_slow(a, spent),
            }
        }
    }

    /// How much grammar work one sequence's pick may do this step: its share of the last
    /// decode, or long slices when nothing else is running.
    fn grammar_slice(&self) -> Slice {
        if self.active.len() <= 1 {
            Slice::ALONE
        } else {
            Slice::share(self.last_decode, self.active.len())
        }
    }

    /// Gives every pick still going through the vocabulary its slice of this step, and emits
    /// the tokens of those that finish (they join the batch from the next step).
    fn advance_pending_picks(&mut self) {
        if self.active.iter().all(|a| a.pending.is_none()) {
            return;
        }
        let slice = self.grammar_slice();
        let vocab = self.model.vocab();
        let mut ends = Vec::new();
        for (i, a) in self.active.iter_mut().enumerate() {
            let Some(mut p) = a.pending.take() else {
                continue;
            };
            match a.picker.resume(&mut p, slice) {
                Progress::NotYet => a.pending = Some(p),
                Progress::TooSlow(spent) => ends.push((i, Err(spent))),
                Progress::Done(tok) => {
                    let position = self.slots.get(a.slot).cached.len();
                    let end = emit(
                        a,
                        &p.logits,
                        tok,
                        position,
                        self.n_ctx_seq,
                        &vocab,
                        &self.rendered,
                    );
                    match end {
                        Some(reason) => ends.push((i, Ok(reason))),
                        None => a.next = Some(tok.0),
                    }
                }
            }
        }
        self.end_finished(ends);
    }

    /// Ends a request whose grammar needs more than the limit of work for one token.
    fn grammar_too_slow(&mut self, a: Active, spent: Duration) {
        tracing::warn!(
            slot = a.slot,
            ms = spent.as_millis() as u64,
            "grammar too slow to enforce; ending the request"
        );
        let _ = a.events.send(Event::Error(EngineError::InvalidParam {
            param: a.picker.grammar_param(),
            message: format!(
                "the grammar for this schema is too slow to enforce: choosing one token took more than {} ms of grammar checks (requests.grammar_ms_per_token); use a smaller schema (fewer enum values or alternatives)",
                super::picker::pick_limit().as_millis()
            ),
        }));
        self.slots.release(a.slot);
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
                prompt_tokens: a.prompt_tokens,
                completion_tokens: a.generated,
                cached_tokens: a.cached_tokens,
            },
            time_to_first_token: a.first_token.unwrap_or(a.submitted) - a.submitted,
            total_time: total,
        });
        self.slots.release(a.slot);
    }
}

/// The client a queued job names (empty: none).
fn job_client(j: &Job) -> Arc<str> {
    j.req.client.clone().unwrap_or_else(|| Arc::from(""))
}

/// Streams one sampled token of `a` (its log-probabilities first, when asked), with `position`
/// the place it would take in the sequence; says why the request ends here, if it does.
#[allow(clippy::too_many_arguments)]
fn emit(
    a: &mut Active,
    logits: &[f32],
    tok: LlamaToken,
    position: usize,
    n_ctx_seq: u32,
    vocab: &llama_cpp_2::vocab::LlamaVocab<'_>,
    rendered: &HashSet<i32>,
) -> Option<FinishReason> {
    if let Some(k) = a.logprobs.filter(|_| !vocab.is_eog(tok)) {
        let (logprob, top) = logprobs(logits, tok.0 as usize, k.into());
        let text = |t: LlamaToken| {
            let bytes = vocab.token_to_piece(t, rendered.contains(&t.0), None);
            TokenText {
                text: String::from_utf8_lossy(&bytes).into_owned(),
                bytes,
            }
        };
        let _ = a.events.send(Event::Logprob(TokenLogprob {
            token: text(tok),
            logprob,
            top: top
                .into_iter()
                .map(|(t, l)| (text(LlamaToken(t)), l))
                .collect(),
        }));
    }
    a.generated += 1;
    a.first_token.get_or_insert_with(Instant::now);
    check_shadow(a, tok.0);
    if vocab.is_eog(tok) {
        return Some(FinishReason::Stop);
    }
    let piece = vocab.token_to_piece(tok, rendered.contains(&tok.0), None);
    let out = a.text.push(&piece);
    if !out.text.is_empty() {
        let _ = a.events.send(Event::Text(out.text));
    }
    if out.stopped {
        Some(FinishReason::Stop)
    } else if a.generated >= a.max_tokens || position as u32 >= n_ctx_seq {
        Some(FinishReason::Length)
    } else {
        None
    }
}

/// Compares a generated token with the unverified proposal waiting for it, and records the
/// proposal's acceptance once it is decided.
fn check_shadow(a: &mut Active, tok: TokenId) {
    if a.shadow.is_empty() {
        return;
    }
    if a.shadow[a.shadow_matched] == tok {
        a.shadow_matched += 1;
        if a.shadow_matched < a.shadow.len() {
            return;
        }
    }
    a.acceptance.observe(a.shadow_matched, a.shadow.len());
    a.shadow.clear();
    a.shadow_matched = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefill_under_load_is_sized_by_measured_step_costs() {
        let mut c = StepCosts::default();
        // A slow machine: decode steps of 100 ms, 5 ms per prompt token.
        for _ in 0..50 {
            c.observe(0, 6, 100.0);
            c.observe(200, 6, 1100.0);
        }
        assert!((c.prefill_ms_per_token - 5.0).abs() < 0.01, "{c:?}");
        assert_eq!(c.prefill_budget(), 220);
        // A fast one: everything fits, up to the batch.
        for _ in 0..50 {
            c.observe(0, 6, 5.0);
            c.observe(500, 6, 55.0);
        }
        assert_eq!(c.prefill_budget(), BATCH_TOKENS);
        // A very slow one still moves prompts forward.
        for _ in 0..50 {
            c.observe(0, 6, 1000.0);
            c.observe(100, 6, 3000.0);
        }
        assert_eq!(c.prefill_budget(), MIN_PREFILL_WHILE_GENERATING);
    }
}
