//! The draft model of draft speculation: a small model of the target's vocabulary, with a
//! sequence of its own for each of the target's, proposing tokens greedily for every
//! speculating sequence in the same passes. Its KV follows the target's history lazily: before
//! proposing, each sequence drops what the target did not keep and catches up on what it
//! has not seen (the prompt the first time, then the tokens accepted since).

use std::time::Instant;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

use super::worker::BATCH_TOKENS;
use crate::engine::sampling::argmax;
use crate::engine::scheduler::common_prefix;
use crate::engine::TokenId;

/// One sequence's request for a proposal: its whole history (prompt, generated tokens and the
/// token the target feeds next) and how many tokens to propose.
pub(super) struct Want {
    pub seq: i32,
    pub history: Vec<TokenId>,
    pub max: usize,
}

/// The draft model's context and what each of its sequences holds.
pub(super) struct Drafter<'m> {
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    /// Tokens in each draft sequence's KV, by sequence id.
    cached: Vec<Vec<TokenId>>,
    batch: LlamaBatch<'m>,
    /// Moving averages of the draft's time per proposed token and per token caught up, ms.
    pub ms_per_token: Option<f64>,
    pub catch_up_ms_per_token: Option<f64>,
}

/// Folds `new` into a moving average.
fn ema(old: Option<f64>, new: f64) -> Option<f64> {
    Some(old.map_or(new, |o| 0.8 * o + 0.2 * new))
}

impl<'m> Drafter<'m> {
    pub fn new(model: &'m LlamaModel, ctx: LlamaContext<'m>, parallel: usize) -> Self {
        Self {
            model,
            ctx,
            cached: vec![Vec::new(); parallel],
            batch: LlamaBatch::new(BATCH_TOKENS, 1),
            ms_per_token: None,
            catch_up_ms_per_token: None,
        }
    }

    /// Measures what catching up and proposing cost, on a throwaway run in sequence 0, so
    /// that the first request's decision to draft (which would catch the draft up on its
    /// whole prompt: a second of a small CPU model's time for a few hundred tokens) is
    /// priced instead of paid for as a probe.
    pub fn calibrate(&mut self) {
        let vocab = self.model.n_vocab().max(2);
        let history: Vec<TokenId> = (0..64).map(|i| (i * 7919 + 1) % vocab).collect();
        let _ = self.run(&[Want {
            seq: 0,
            history,
            max: 4,
        }]);
        let _ = self.ctx.clear_kv_cache_seq(Some(0), None, None);
        self.cached[0].clear();
        tracing::debug!(
            ms_per_token = self.ms_per_token,
            catch_up_ms_per_token = self.catch_up_ms_per_token,
            "draft model calibrated"
        );
    }

    /// Tokens a sequence would have to catch up on before it can propose.
    pub fn behind(&self, seq: i32, history: &[TokenId]) -> usize {
        let have = &self.cached[seq as usize];
        history.len() - common_prefix(have, history).min(history.len().saturating_sub(1))
    }

    /// Greedy proposals for each want, in the same order. A failed decode proposes nothing
    /// (the target then decodes plainly); the draft's KV is reset so it cannot drift.
    pub fn propose(&mut self, wants: &[Want]) -> Vec<Vec<TokenId>> {
        let out = match self.run(wants) {
            Ok(out) => out,
            Err(e) => {
                tracing::warn!(error = %e, "draft model failed; proposing nothing this step");
                for w in wants {
                    let _ = self.ctx.clear_kv_cache_seq(Some(w.seq as u32), None, None);
                    self.cached[w.seq as usize].clear();
                }
                return vec![Vec::new(); wants.len()];
            }
        };
        out
    }

    fn run(&mut self, wants: &[Want]) -> Result<Vec<Vec<TokenId>>, String> {
        let mut out: Vec<Vec<TokenId>> = vec![Vec::new(); wants.len()];
        // Drop what the target did not keep; line up what each sequence must catch up on.
        let mut pending: Vec<usize> = Vec::with_capacity(wants.len());
        for w in wants {
            let have = &mut self.cached[w.seq as usize];
            let keep = common_prefix(have, &w.history).min(w.history.len().saturating_sub(1));
            let trimmed = self
                .ctx
                .clear_kv_cache_seq(Some(w.seq as u32), Some(keep as u32), None);
            if !matches!(trimmed, Ok(true)) {
                let _ = self.ctx.clear_kv_cache_seq(Some(w.seq as u32), None, None);
                have.clear();
            }
            have.truncate(keep);
            pending.push(have.len());
        }
        // Catch up in full batches; a sequence's first proposal comes from the pass that
        // holds its last history token (logits last only until the next pass).
        let started = Instant::now();
        let behind: usize = wants
            .iter()
            .zip(&pending)
            .map(|(w, &p)| w.history.len() - p)
            .sum();
        loop {
            self.batch.clear();
            let mut last_in: Vec<(usize, i32)> = Vec::new();
            let mut used = 0usize;
            for (i, w) in wants.iter().enumerate() {
                while pending[i] < w.history.len() && used < BATCH_TOKENS {
                    let pos = pending[i];
                    let last = pos + 1 == w.history.len();
                    self.batch
                        .add(LlamaToken(w.history[pos]), pos as i32, &[w.seq], last)
                        .map_err(|e| e.to_string())?;
                    if last {
                        last_in.push((i, used as i32));
                    }
                    pending[i] += 1;
                    used += 1;
                }
            }
            if used == 0 {
                break;
            }
            self.ctx
                .decode(&mut self.batch)
                .map_err(|e| e.to_string())?;
            for (i, w) in wants.iter().enumerate() {
                let have = &mut self.cached[w.seq as usize];
                let now = pending[i];
                have.extend_from_slice(&w.history[have.len()..now]);
            }
            for (i, idx) in last_in {
                if wants[i].max > 0 {
                    out[i].push(argmax(self.ctx.get_logits_ith(idx), &[]));
                }
            }
        }
        // Passes of a token or two per sequence cost what decoding does, not what catching up
        // on a prompt does: only longer catch-ups measure the latter.
        let catch_up_ms = started.elapsed().as_secs_f64() * 1000.0;
        if behind > wants.len() * 8 {
            self.catch_up_ms_per_token =
                ema(self.catch_up_ms_per_token, catch_up_ms / behind as f64);
        }
        // Then one token per pass for every sequence still proposing.
        let started = Instant::now();
        let vocab = self.model.vocab();
        loop {
            self.batch.clear();
            let mut fed: Vec<(usize, i32)> = Vec::new();
            for (i, w) in wants.iter().enumerate() {
                let Some(&tok) = out[i].last() else { continue };
                if out[i].len() >= w.max || vocab.is_eog(LlamaToken(tok)) {
                    continue;
                }
                let pos = self.cached[w.seq as usize].len();
                self.batch
                    .add(LlamaToken(tok), pos as i32, &[w.seq], true)
                    .map_err(|e| e.to_string())?;
                fed.push((i, fed.len() as i32));
            }
            if fed.is_empty() {
                break;
            }
            self.ctx
                .decode(&mut self.batch)
                .map_err(|e| e.to_string())?;
            for (i, idx) in fed {
                let tok = *out[i].last().expect("fed from a proposal");
                self.cached[wants[i].seq as usize].push(tok);
                out[i].push(argmax(self.ctx.get_logits_ith(idx), &[]));
            }
        }
        // Each first proposal rode a catch-up pass: its share of that pass counts (one token
        // in `behind`, per sequence), the rest of the catch-up is priced separately.
        let proposed: usize = out.iter().map(Vec::len).sum();
        if proposed > 0 && behind > 0 {
            let first_share = catch_up_ms * wants.len() as f64 / behind as f64;
            let ms = started.elapsed().as_secs_f64() * 1000.0 + first_share;
            self.ms_per_token = ema(self.ms_per_token, ms / proposed as f64);
        }
        Ok(out)
    }
}

/// Why `draft` cannot propose for `target`: a different vocabulary (size, any token's text,
/// or the end-of-generation and beginning tokens).
pub(super) fn vocabulary_mismatch(target: &LlamaModel, draft: &LlamaModel) -> Option<String> {
    let (n_t, n_d) = (target.n_vocab(), draft.n_vocab());
    if n_t != n_d {
        return Some(format!(
            "the draft has a vocabulary of {n_d} tokens and the target one of {n_t}"
        ));
    }
    let (vt, vd) = (target.vocab(), draft.vocab());
    if (vt.bos(), vt.eos()) != (vd.bos(), vd.eos()) {
        return Some("the draft's beginning and end tokens are not the target's".into());
    }
    (0..n_t).map(LlamaToken).find_map(|t| {
        let a = vt.token_to_piece(t, true, None);
        let b = vd.token_to_piece(t, true, None);
        (a != b).then(|| {
            format!(
                "token {} is {:?} in the target and {:?} in the draft",
                t.0,
                String::from_utf8_lossy(&a),
                String::from_utf8_lossy(&b)
            )
        })
    })
}
