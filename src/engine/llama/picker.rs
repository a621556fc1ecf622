//! How one request chooses its next token, and how a grammar's cost is kept to that request.
//!
//! A grammar is checked against the token the sampler chain would pick anyway; only when it
//! refuses does the whole vocabulary go through it (as llama.cpp's own common sampler does).
//! That full pass costs the number of the grammar's live alternatives times the vocabulary:
//! milliseconds for a JSON schema, minutes for an enum of 20,000 strings. It is therefore
//! done in slices, each a share of a scheduler step ([`Slice`]), with the logits copied aside;
//! the request sits out of the batch until its token is chosen, and every other sequence
//! decodes on. A pick that needs more than [`pick_limit`] of grammar work ends its request
//! with a 400-class error naming the limit (a lazy tool-call grammar, which the client did not
//! ask for, is dropped instead and the answer goes on unconstrained).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::LlamaToken;

use crate::engine::sampling::argmax;
use crate::engine::{SamplingParams, TokenId};

/// Grammar work one token may take, all slices together, before the request is ended, in
/// milliseconds (`requests.grammar_ms_per_token`, set once at start): far above what a schema
/// a client can enforce costs (a JSON schema's full pass over a 262k vocabulary is
/// milliseconds), far below what would let one request hold a sequence.
static PICK_LIMIT_MS: AtomicU64 = AtomicU64::new(5000);

/// Sets the grammar work one token may take (the server's configuration, at start).
pub fn set_pick_limit(limit: Duration) {
    PICK_LIMIT_MS.store(limit.as_millis() as u64, Ordering::Relaxed);
}

/// The grammar work one token may take.
pub(super) fn pick_limit() -> Duration {
    Duration::from_millis(PICK_LIMIT_MS.load(Ordering::Relaxed))
}

/// Vocabulary entries put through the grammar before the first look at the clock; later
/// chunks are sized from the measured cost per entry to end near the slice's end (an entry
/// costs one check per live alternative: nanoseconds for a JSON schema, microseconds for an
/// enum of thousands).
const FIRST_CHUNK: usize = 256;
/// Bounds of a chunk.
const MIN_CHUNK: usize = 16;
const MAX_CHUNK: usize = 32_768;

/// How one request chooses its next token.
pub(super) enum Picker {
    /// Argmax of the biased logits: no per-token copy of the vocabulary, no state.
    Greedy(Vec<(TokenId, f32)>),
    /// llama.cpp's sampler chain, owned by this request alone.
    Chain(LlamaSampler),
    /// A grammar, checked against the token the chain would pick; when it refuses, the
    /// vocabulary goes through the grammar in slices ([`Pending`]).
    Constrained {
        grammar: LlamaSampler,
        chain: LlamaSampler,
        /// A tool-call grammar under `tool_choice: auto`: a safety net the client did not ask
        /// for, dropped (not failed) when it costs too much.
        lazy: bool,
        /// The request field the grammar came from, for the error when it is too slow.
        param: &'static str,
    },
}

/// What a pick came to.
pub(super) enum Picked {
    Token(LlamaToken),
    /// The grammar's pass did not fit its slice: go on with [`Picker::resume`] next step.
    Pending(Pending),
    /// The grammar costs more than [`pick_limit`] for one token: end the request.
    TooSlow(Duration),
}

/// How far [`Picker::resume`] got.
pub(super) enum Progress {
    Done(LlamaToken),
    NotYet,
    TooSlow(Duration),
}

/// A constrained pick in progress: the step's logits, and how far the grammar got.
pub(super) struct Pending {
    pub(super) logits: Vec<f32>,
    scanned: usize,
    allowed: Vec<LlamaTokenData>,
    spent: Duration,
}

/// How much grammar work a pick may do now.
#[derive(Debug, Clone, Copy)]
pub(super) struct Slice(pub(super) Duration);

impl Slice {
    /// Nobody else is decoding: work in long slices (still short enough to notice a
    /// cancelled request or a new one).
    pub(super) const ALONE: Slice = Slice(Duration::from_millis(200));
    /// Least a slice is, however short the steps.
    const MIN: Duration = Duration::from_millis(10);

    /// A pick's share of a step that took `step` for `sequences` sequences: the others' steps
    /// then grow by about one share for each sequence doing grammar work, never more.
    pub(super) fn share(step: Duration, sequences: usize) -> Slice {
        Slice((step / sequences.max(1) as u32).max(Self::MIN))
    }
}

impl Picker {
    /// The picker for a request's sampling settings; `grammar` is the request's grammar
    /// sampler, built at submit (off the scheduler thread), and the field it came from.
    pub(super) fn new(
        sampling: &SamplingParams,
        model: &LlamaModel,
        grammar: Option<(LlamaSampler, &'static str)>,
    ) -> Result<Self, String> {
        let Some((grammar, param)) = grammar else {
            if sampling.is_plain_greedy() {
                return Ok(Self::Greedy(sampling.logit_bias.clone()));
            }
            return sampling.build(model).map(Self::Chain);
        };
        let free = SamplingParams {
            grammar: None,
            grammar_triggers: Vec::new(),
            ..sampling.clone()
        };
        Ok(Self::Constrained {
            grammar,
            chain: free.build(model)?,
            lazy: !sampling.grammar_triggers.is_empty(),
            param,
        })
    }

    /// The request field a constrained picker's grammar came from.
    pub(super) fn grammar_param(&self) -> &'static str {
        match self {
            Self::Constrained { param, .. } => param,
            _ => "response_format",
        }
    }

    /// The next token from the logits at `idx`, with at most `slice` of grammar work now.
    pub(super) fn pick(&mut self, ctx: &LlamaContext<'_>, idx: i32, slice: Slice) -> Picked {
        match self {
            Self::Greedy(biases) => {
                Picked::Token(LlamaToken(argmax(ctx.get_logits_ith(idx), biases)))
            }
            Self::Chain(sampler) => Picked::Token(sampler.sample(ctx, idx)),
            Self::Constrained { grammar, chain, .. } => {
                let logits = ctx.get_logits_ith(idx);
                let mut candidates = all(logits);
                candidates.apply_sampler(chain);
                let allowed = candidates.selected_token().filter(|&t| {
                    let mut one =
                        LlamaTokenDataArray::new(vec![LlamaTokenData::new(t, 1.0, 0.0)], false);
                    one.apply_sampler(grammar);
                    one.data[0].logit().is_finite()
                });
                if let Some(tok) = allowed {
                    grammar.accept(tok);
                    chain.accept(tok);
                    return Picked::Token(tok);
                }
                let mut pending = Pending {
                    logits: logits.to_vec(),
                    scanned: 0,
                    allowed: Vec::new(),
                    spent: Duration::ZERO,
                };
                match self.resume(&mut pending, slice) {
                    Progress::Done(tok) => Picked::Token(tok),
                    Progress::NotYet => Picked::Pending(pending),
                    Progress::TooSlow(spent) => Picked::TooSlow(spent),
                }
            }
        }
    }

    /// Goes on with a pending pick for at most `slice`.
    pub(super) fn resume(&mut self, p: &mut Pending, slice: Slice) -> Progress {
        let Self::Constrained {
            grammar,
            chain,
            lazy,
            ..
        } = self
        else {
            unreachable!("only a grammar's pick is ever pending");
        };
        let started = Instant::now();
        let mut chunk = FIRST_CHUNK;
        while p.scanned < p.logits.len() {
            let end = (p.scanned + chunk).min(p.logits.len());
            let chunk_started = Instant::now();
            let mut part = LlamaTokenDataArray::from_iter(
                (p.scanned..end)
                    .map(|i| LlamaTokenData::new(LlamaToken(i as i32), p.logits[i], 0.0)),
                false,
            );
            part.apply_sampler(grammar);
            p.allowed
                .extend(part.data.iter().filter(|d| d.logit().is_finite()).copied());
            let per_entry = chunk_started.elapsed().as_secs_f64() / (end - p.scanned) as f64;
            p.scanned = end;
            let left = slice.0.saturating_sub(started.elapsed()).as_secs_f64();
            chunk = ((left / per_entry.max(1e-9)) as usize).clamp(MIN_CHUNK, MAX_CHUNK);
            let spent = p.spent + started.elapsed();
            if spent > pick_limit() && p.scanned < p.logits.len() {
                if *lazy {
                    // Not the client's constraint: go on without it.
                    tracing::warn!(
                        ms = spent.as_millis() as u64,
                        "tool-call grammar too slow to enforce; dropped for this request"
                    );
                    let mut free = all(&p.logits);
                    free.apply_sampler(chain);
                    let tok = free.selected_token().unwrap_or(LlamaToken(0));
                    chain.accept(tok);
                    let chain = std::mem::replace(chain, LlamaSampler::greedy());
                    *self = Self::Chain(chain);
                    return Progress::Done(tok);
                }
                return Progress::TooSlow(spent);
            }
            if started.elapsed() >= slice.0 && p.scanned < p.logits.len() {
                p.spent = spent;
                return Progress::NotYet;
            }
        }
        let mut allowed = LlamaTokenDataArray::new(std::mem::take(&mut p.allowed), false);
        allowed.apply_sampler(chain);
        let tok = allowed.selected_token().unwrap_or(LlamaToken(0));
        grammar.accept(tok);
        chain.accept(tok);
        Progress::Done(tok)
    }
}

/// Every vocabulary entry with its logit, in token order.
fn all(logits: &[f32]) -> LlamaTokenDataArray {
    LlamaTokenDataArray::from_iter(
        logits
            .iter()
            .enumerate()
            .map(|(i, &l)| LlamaTokenData::new(LlamaToken(i as i32), l, 0.0)),
        false,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slice_is_a_share_of_the_step_with_a_floor() {
        assert_eq!(
            Slice::share(Duration::from_millis(120), 4).0,
            Duration::from_millis(30)
        );
        assert_eq!(Slice::share(Duration::from_millis(20), 8).0, Slice::MIN);
        assert_eq!(
            Slice::share(Duration::from_millis(50), 0).0,
            Duration::from_millis(50)
        );
    }
}
