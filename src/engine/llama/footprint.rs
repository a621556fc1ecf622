//! How much memory a load will take, worked out from the GGUF header before anything is
//! allocated. The parts mirror what llama.cpp allocates: the weights (the file), a KV cache
//! per sequence of the chosen types, the output buffer and the compute graph, whose worst case
//! holds logits for a whole micro-batch and (without flash attention) attention scores over a
//! sequence's whole context.

use super::worker::BATCH_TOKENS;
use super::LoadOptions;
use crate::engine::MemoryEstimate;
use crate::engine::ModelFacts;

/// Fixed allowance for llama.cpp's own bookkeeping and the scheduler thread.
const FIXED_OVERHEAD: u64 = 16 << 20;

/// Most bytes the compute graph may reserve for one micro-batch's logits. llama.cpp reserves
/// logits for every token of a micro-batch; over Gemma 3's 262k-token vocabulary, 512 tokens
/// take 512 MiB, more than the weights. Smaller micro-batches cost no prefill speed here
/// (llama-bench pp512 on Gemma 3 270M: 594 / 645 / 617 tok/s at 128 / 256 / 512).
const LOGITS_BUDGET: u64 = 256 << 20;

/// Tokens per llama.cpp micro-batch for a vocabulary: the largest power of two from 64 to
/// [`BATCH_TOKENS`] whose logits fit [`LOGITS_BUDGET`].
pub fn micro_batch(vocab: u32) -> u32 {
    let fit = LOGITS_BUDGET / (u64::from(vocab.max(1)) * 4);
    let fit = fit.clamp(64, BATCH_TOKENS as u64);
    1 << (63 - fit.leading_zeros())
}

/// Context tokens each sequence gets: what was asked, capped by what the model was trained for.
pub fn context_per_sequence(f: &ModelFacts, opts: &LoadOptions) -> u32 {
    opts.context.min(f.context_train.max(16))
}

/// The estimate from header facts; `gpu` says whether `gpu_layers` will really offload.
pub fn estimate(f: &ModelFacts, weights: u64, opts: &LoadOptions, gpu: bool) -> MemoryEstimate {
    let per_seq = u64::from(context_per_sequence(f, opts));
    let embedder = f.kind != crate::engine::ModelKind::Chat;
    let parallel = u64::from(opts.parallel.max(1));
    // An embedding model's one context holds a batch of whole inputs (see `embed`), and it
    // computes no logits: its output is one vector per sequence.
    let (cells, vocab, ubatch) = if embedder {
        let batch = u64::from(super::embed::batch_tokens(per_seq as u32));
        (f.kv_heads_all_layers * batch, 0, batch)
    } else {
        (
            f.kv_heads_all_layers * per_seq * parallel,
            u64::from(f.vocab_size),
            u64::from(micro_batch(f.vocab_size)),
        )
    };
    let kv = opts.cache_type_k.bytes(cells * u64::from(f.key_length))
        + opts.cache_type_v.bytes(cells * u64::from(f.value_length));
    // Logits for a whole micro-batch, activations, and attention over one sequence's
    // context: with flash attention only the f16 mask (two with sliding-window layers);
    // without, the scores of every head (an upper bound: llama.cpp reuses some of it). Fitted
    // to llama.cpp's logged compute buffers for Gemma 3 270M and Qwen2.5 0.5B.
    let attention = if opts.flash_attention.enabled() {
        per_seq * 2 * if f.sliding_window { 2 } else { 1 }
    } else {
        per_seq * 4 * u64::from(f.head_count.max(1))
    };
    let compute = ubatch * ((vocab + 8 * u64::from(f.embedding_length)) * 4 + attention);
    // Offloaded layers are not repacked for the CPU.
    let weights = weights
        + if gpu && opts.gpu_layers > 0 {
            0
        } else {
            f.repacked_bytes
        };
    let output = if embedder {
        super::embed::MAX_SEQS as u64 * u64::from(f.embedding_length) * 4
    } else {
        parallel * vocab * 4
    };
    let overhead = compute + output + FIXED_OVERHEAD;
    let total = weights + kv + overhead;
    let gpu_bytes = if gpu && opts.gpu_layers > 0 && f.layers > 0 {
        let share = f64::from(opts.gpu_layers.min(f.layers)) / f64::from(f.layers);
        ((weights + kv) as f64 * share) as u64 + compute
    } else {
        0
    };
    MemoryEstimate {
        weights_bytes: weights,
        kv_cache_bytes: kv,
        overhead_bytes: overhead,
        total_bytes: total,
        gpu_bytes,
        ram_bytes: total - gpu_bytes.min(total),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::options::{FlashAttention, KvType};

    fn gemma() -> ModelFacts {
        ModelFacts {
            architecture: "gemma3".into(),
            layers: 18,
            kv_heads_all_layers: 18,
            key_length: 256,
            value_length: 256,
            embedding_length: 640,
            context_train: 32768,
            vocab_size: 262_144,
            file_type: Some("Q4_K_M".into()),
            head_count: 4,
            sliding_window: true,
            repacked_bytes: 13_271_040,
            kind: crate::engine::ModelKind::Chat,
        }
    }

    fn opts(context: u32, parallel: u32, gpu_layers: u32) -> LoadOptions {
        LoadOptions {
            context,
            parallel,
            max_queue: 0,
            gpu_layers,
            threads: 1,
            batch_invariant: false,
            rendered_markers: Vec::new(),
            prompt_cache: None,
            cache_type_k: Default::default(),
            cache_type_v: Default::default(),
            flash_attention: Default::default(),
            speculation: Default::default(),
            draft: None,
            draft_max: 8,
            speculation_adaptive: true,
        }
    }

    #[test]
    fn an_embedding_model_has_no_logits_and_one_batch_of_kv() {
        // all-MiniLM-L6-v2: 6 layers of 12 heads of 32, 30,522 tokens, 512 context.
        let minilm = ModelFacts {
            architecture: "bert".into(),
            layers: 6,
            kv_heads_all_layers: 72,
            key_length: 32,
            value_length: 32,
            embedding_length: 384,
            context_train: 512,
            vocab_size: 30_522,
            file_type: Some("F32".into()),
            head_count: 12,
            sliding_window: false,
            repacked_bytes: 0,
            kind: crate::engine::ModelKind::Embedding { pooling: 1 },
        };
        let o = opts(512, 8, 0);
        let e = estimate(&minilm, 90_894_784, &o, false);
        // KV for one 2,048-token batch (f16), whatever `parallel` says.
        assert_eq!(e.kv_cache_bytes, 72 * 2048 * 32 * 2 * 2);
        assert_eq!(estimate(&minilm, 90_894_784, &opts(512, 64, 0), false), e);
        // Without the embedding kind the same file would reserve logits over its vocabulary.
        let chat = ModelFacts {
            kind: crate::engine::ModelKind::Chat,
            ..minilm
        };
        assert!(estimate(&chat, 90_894_784, &o, false).overhead_bytes > e.overhead_bytes);
        assert!(e.total_bytes < 200 << 20, "{e:?}");
    }

    /// Buffers llama.cpp logged loading Gemma 3 270M at 4096 x 8 (MiB): model (mapped +
    /// repacked), KV, output, compute.
    const LOGGED: [(KvType, KvType, FlashAttention, f64, f64, f64); 4] = [
        (
            KvType::F16,
            KvType::F16,
            FlashAttention::Auto,
            576.0,
            8.0,
            263.14,
        ),
        (
            KvType::F16,
            KvType::F16,
            FlashAttention::Off,
            576.0,
            8.0,
            268.1,
        ),
        (
            KvType::Q8_0,
            KvType::Q8_0,
            FlashAttention::On,
            306.0,
            8.0,
            263.7,
        ),
        (
            KvType::Q4_0,
            KvType::Q4_0,
            FlashAttention::On,
            162.0,
            8.0,
            263.7,
        ),
    ];

    #[test]
    fn matches_what_llama_cpp_reports_for_gemma() {
        for (k, v, fa, kv_mib, output_mib, compute_mib) in LOGGED {
            let mut o = opts(4096, 8, 0);
            (o.cache_type_k, o.cache_type_v, o.flash_attention) = (k, v, fa);
            let e = estimate(&gemma(), 253_113_024, &o, false);
            assert_eq!(e.kv_cache_bytes as f64 / 1048576.0, kv_mib, "{k:?}/{v:?}");
            let llama = (235.16 + 12.66 + kv_mib + output_mib + compute_mib) * 1048576.0;
            let ours = (e.total_bytes - FIXED_OVERHEAD) as f64;
            assert!(
                (ours / llama - 1.0).abs() < 0.02,
                "{k:?}/{v:?}/{fa:?}: {ours} vs {llama}"
            );
            assert_eq!(
                e.total_bytes,
                e.weights_bytes + e.kv_cache_bytes + e.overhead_bytes
            );
            assert_eq!((e.gpu_bytes, e.ram_bytes), (0, e.total_bytes));
        }
    }

    #[test]
    fn micro_batches_keep_logits_in_budget() {
        assert_eq!(micro_batch(262_144), 256); // Gemma 3
        assert_eq!(micro_batch(151_936), 256); // Qwen2.5
        assert_eq!(micro_batch(128_256), 512); // Llama 3
        assert_eq!(micro_batch(32_000), 512);
        assert_eq!(micro_batch(4_000_000), 64);
    }

    #[test]
    fn context_is_capped_by_training_and_scales_kv() {
        let small = estimate(&gemma(), 1, &opts(1024, 2, 0), false);
        let capped = estimate(&gemma(), 1, &opts(1 << 20, 2, 0), false);
        assert_eq!(capped.kv_cache_bytes, small.kv_cache_bytes * 32);
    }

    #[test]
    fn offload_moves_a_share_to_the_gpu_only_when_there_is_one() {
        let cpu = estimate(&gemma(), 1_000_000, &opts(1024, 1, 9), false);
        assert_eq!(cpu.gpu_bytes, 0);
        let gpu = estimate(&gemma(), 1_000_000, &opts(1024, 1, 9), true);
        assert!(gpu.gpu_bytes > 0 && gpu.ram_bytes < gpu.total_bytes);
        assert_eq!(gpu.ram_bytes + gpu.gpu_bytes, gpu.total_bytes);
        let all = estimate(&gemma(), 1_000_000, &opts(1024, 1, 99), true);
        assert_eq!(
            all.gpu_bytes,
            all.weights_bytes
                + all.kv_cache_bytes
                + (all.overhead_bytes - FIXED_OVERHEAD - 262_144 * 4)
        );
    }
}
