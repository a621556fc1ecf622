//! Per-request sampling settings and the llama.cpp sampler chain built from them. Each
//! request owns its chain, so requests decoded in one batch never share RNG or penalty state.

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
        }
    }
}

impl SamplingParams {
    /// Builds the chain: bias, penalties, then greedy, or top-k → top-p → min-p → temperature → draw.
    pub fn build(&self, n_vocab: i32) -> LlamaSampler {
        let mut chain = Vec::new();
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
        LlamaSampler::chain_simple(chain)
    }
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
