//! Per-request sampling settings and the llama.cpp sampler chain built from them. Each
//! request owns its chain, so requests decoded in one batch never share RNG or penalty state.

use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::logit_bias::LlamaLogitBias;
use llama_cpp_2::token::LlamaToken;

use super::TokenId;

/// Sampling settings after defaults were applied and ranges checked by the API layer.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// 0 disables.
    pub top_k: i32,
    pub min_p: f32,
    /// Fixed seed for reproducible sampling; random when absent.
    pub seed: Option<u32>,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    /// llama.cpp's multiplicative repeat penalty (1 disables).
    pub repeat_penalty: f32,
    /// Additive biases on token logits.
    pub logit_bias: Vec<(TokenId, f32)>,
    /// A GBNF grammar (root rule `root`) every sampled token must follow.
    pub grammar: Option<String>,
    /// When not empty, `grammar` is lazy: it applies from the first match of one of these
    /// patterns on (see [`super::Constraint::triggers`]).
    pub grammar_triggers: Vec<String>,
}

/// Tokens looked back over for the penalties.
const PENALTY_LAST_N: i32 = 64;

impl Default for SamplingParams {
    /// llama-server's defaults: sensible output from small local models when a client sets nothing.
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_p: 0.95,
            top_k: 40,
            min_p: 0.05,
            seed: None,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            repeat_penalty: 1.0,
            logit_bias: Vec::new(),
            grammar: None,
            grammar_triggers: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Greedy decoding without penalties: the next token is the argmax of the (biased) logits,
    /// with no sampler state to keep, so the scheduler can skip the chain's per-token copy of
    /// the whole vocabulary.
    pub fn is_plain_greedy(&self) -> bool {
        self.temperature <= 0.0
            && self.grammar.is_none()
            && self.frequency_penalty == 0.0
            && self.presence_penalty == 0.0
            && self.repeat_penalty == 1.0
    }

    /// The grammar sampler, lazy when there are triggers; `None` without a grammar.
    pub fn grammar_sampler(&self, model: &LlamaModel) -> Result<Option<LlamaSampler>, String> {
        let Some(g) = &self.grammar else {
            return Ok(None);
        };
        let sampler = if self.grammar_triggers.is_empty() {
            LlamaSampler::grammar(model, g, "root")
        } else {
            LlamaSampler::grammar_lazy_patterns(model, g, "root", &self.grammar_triggers, &[])
        };
        sampler.map(Some).map_err(|e| e.to_string())
    }

    /// Builds the chain: grammar, bias, penalties, then greedy, or top-k → top-p → min-p →
    /// temperature → draw. Fails only on a grammar llama.cpp cannot parse.
    pub fn build(&self, model: &LlamaModel) -> Result<LlamaSampler, String> {
        let n_vocab = model.n_vocab();
        let mut chain = Vec::new();
        if let Some(g) = self.grammar_sampler(model)? {
            // First: tokens the grammar forbids are gone before anything else looks.
            chain.push(g);
        }
        if !self.logit_bias.is_empty() {
            let biases: Vec<_> = self
                .logit_bias
                .iter()
                .map(|&(t, b)| LlamaLogitBias::new(LlamaToken(t), b))
                .collect();
            chain.push(LlamaSampler::logit_bias(n_vocab, &biases));
        }
        if self.frequency_penalty != 0.0
            || self.presence_penalty != 0.0
            || self.repeat_penalty != 1.0
        {
            chain.push(LlamaSampler::penalties(
                n_vocab,
                PENALTY_LAST_N,
                self.repeat_penalty,
                self.frequency_penalty,
                self.presence_penalty,
            ));
        }
        if self.temperature <= 0.0 {
            chain.push(LlamaSampler::greedy());
        } else {
            if self.top_k > 0 {
                chain.push(LlamaSampler::top_k(self.top_k));
            }
            if self.top_p < 1.0 {
                chain.push(LlamaSampler::top_p(self.top_p, 1));
            }
            if self.min_p > 0.0 {
                chain.push(LlamaSampler::min_p(self.min_p, 1));
            }
            chain.push(LlamaSampler::temp(self.temperature));
            chain.push(LlamaSampler::dist(self.seed.unwrap_or_else(rand_seed)));
        }
        Ok(LlamaSampler::chain_simple(chain))
    }
}

/// The log-probability of `token` under the model's own distribution (softmax of the raw
/// logits, as OpenAI reports it), and the `k` most likely tokens with theirs, most likely first.
pub fn logprobs(logits: &[f32], token: usize, k: usize) -> (f32, Vec<(TokenId, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let lse = f64::from(max) + sum.ln();
    let lp = |l: f32| (f64::from(l) - lse) as f32;
    // A sorted list of at most k: one pass, cheap for k <= 20 over a 150k vocabulary.
    let mut top: Vec<(usize, f32)> = Vec::with_capacity(k + 1);
    for (i, &l) in logits.iter().enumerate() {
        if top.len() < k || top.last().is_some_and(|&(_, m)| l > m) {
            let at = top.partition_point(|&(_, m)| m >= l);
            top.insert(at, (i, l));
            top.truncate(k);
        }
    }
    let top = top
        .into_iter()
        .map(|(i, l)| (i as TokenId, lp(l)))
        .collect();
    (lp(logits[token]), top)
}

/// Index of the largest logit after adding `biases` (the first on ties, as llama.cpp's greedy
/// sampler picks). Runs once per generated token over the whole vocabulary (262k entries for
/// Gemma), so the common case is a branch-free scan the compiler vectorises; biases (few, and
/// usually bans) are checked against its winner afterwards.
pub fn argmax(logits: &[f32], biases: &[(TokenId, f32)]) -> TokenId {
    let best = max_index(logits);
    if !biases.iter().any(|&(t, _)| t as usize == best) {
        let mut winner = (best, logits[best]);
        for &(t, bias) in biases {
            let v = logits[t as usize] + bias;
            if v > winner.1 || (v == winner.1 && (t as usize) < winner.0) {
                winner = (t as usize, v);
            }
        }
        return winner.0 as TokenId;
    }
    // The raw winner is itself biased: scan again, skipping biased ids.
    let biased = |i: usize| biases.iter().any(|&(t, _)| t as usize == i);
    let mut best: Option<(usize, f32)> = None;
    for (i, &l) in logits.iter().enumerate() {
        if best.is_none_or(|(_, b)| l > b) && !biased(i) {
            best = Some((i, l));
        }
    }
    for &(t, bias) in biases {
        let (i, v) = (t as usize, logits[t as usize] + bias);
        if best.is_none_or(|(bi, b)| v > b || (v == b && i < bi)) {
            best = Some((i, v));
        }
    }
    best.map_or(0, |(i, _)| i as TokenId)
}

/// First index of the largest value: a 16-lane running maximum, then one search for it.
fn max_index(xs: &[f32]) -> usize {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    let max = lanes
        .iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    xs.iter().position(|&x| x == max).unwrap_or(0)
}

/// A seed from the clock and a counter: unseeded requests must differ from each other.
fn rand_seed() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ d.as_secs() as u32)
        .unwrap_or(0);
    nanos.wrapping_add(COUNTER.fetch_add(0x9E37_79B9, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_are_a_log_softmax_and_the_top_ones_come_first() {
        let logits = [1.0f32, 3.0, 2.0, -1.0, 3.0];
        let (chosen, top) = logprobs(&logits, 1, 3);
        let total: f32 = logits.iter().map(|&l| l.exp()).sum();
        assert!((chosen - (3.0f32.exp() / total).ln()).abs() < 1e-6);
        let ids: Vec<TokenId> = top.iter().map(|&(t, _)| t).collect();
        assert_eq!(ids, [1, 4, 2], "ties keep the lower id first");
        assert!(top.windows(2).all(|w| w[0].1 >= w[1].1));
        let mass: f32 = top.iter().map(|&(_, l)| l.exp()).sum();
        assert!(mass <= 1.0 + 1e-6);
        assert!(logprobs(&logits, 0, 0).1.is_empty());
    }

    #[test]
    fn argmax_first_on_ties() {
        assert_eq!(argmax(&[0.1, 0.9, 0.3, 0.9], &[]), 1);
        assert_eq!(argmax(&[-1.0], &[]), 0);
        // Longer than one 16-lane chunk, winner in the remainder and tied in a chunk.
        let mut v = vec![0.0f32; 37];
        v[36] = 2.0;
        assert_eq!(argmax(&v, &[]), 36);
        v[5] = 2.0;
        assert_eq!(argmax(&v, &[]), 5);
        assert_eq!(argmax(&v, &[(5, -1.0)]), 36);
        assert_eq!(argmax(&v, &[(20, 3.0)]), 20);
    }

    #[test]
    fn argmax_applies_biases() {
        let logits = [0.1, 0.9, 0.3, 0.8];
        assert_eq!(argmax(&logits, &[(1, -100.0)]), 3);
        assert_eq!(argmax(&logits, &[(0, 5.0)]), 0);
        assert_eq!(argmax(&logits, &[(1, -100.0), (3, -100.0)]), 2);
        // A bias that ties with an unbiased token (exact in binary): the lower id wins.
        assert_eq!(argmax(&[0.0, 1.0, 0.0, 0.5], &[(3, 0.5)]), 1);
        assert_eq!(argmax(&[0.0, 0.5, 0.0, 1.0], &[(1, 0.5)]), 1);
    }

    #[test]
    fn greedy_detection() {
        let mut p = SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        };
        assert!(p.is_plain_greedy());
        p.logit_bias.push((1, -100.0));
        assert!(p.is_plain_greedy());
        p.repeat_penalty = 1.1;
        assert!(!p.is_plain_greedy());
        assert!(!SamplingParams::default().is_plain_greedy());
    }
}
