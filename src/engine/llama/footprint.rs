//! How much memory a load will take, worked out from the GGUF header before anything is
//! allocated. The parts mirror what llama.cpp allocates: the weights (the file), an f16 KV
//! cache per sequence, the output buffer and the compute graph, whose worst case holds logits
//! for a whole micro-batch and attention scores over a sequence's whole context.

use super::worker::BATCH_TOKENS;
use super::LoadOptions;
use crate::engine::MemoryEstimate;
use crate::engine::ModelFacts;

/// Fixed allowance for llama.cpp's own bookkeeping and the scheduler thread.
const FIXED_OVERHEAD: u64 = 16 << 20;

/// Context tokens each sequence gets: what was asked, capped by what the model was trained for.
pub fn context_per_sequence(f: &ModelFacts, opts: &LoadOptions) -> u32 {
    opts.context.min(f.context_train.max(16))
}

/// The estimate from header facts; `gpu` says whether `gpu_layers` will really offload.
pub fn estimate(f: &ModelFacts, weights: u64, opts: &LoadOptions, gpu: bool) -> MemoryEstimate {
    let per_seq = u64::from(context_per_sequence(f, opts));
    let parallel = u64::from(opts.parallel.max(1));
    let kv =
        f.kv_heads_all_layers * u64::from(f.key_length + f.value_length) * 2 * per_seq * parallel;
    let vocab = u64::from(f.vocab_size);
    let ubatch = BATCH_TOKENS as u64;
    // Logits for a whole micro-batch, attention scores over one sequence's context, and
    // activations (fitted to llama.cpp's logged compute buffers: 521.5 MiB at 1024 tokens,
    // 582.3 MiB at 32768 for Gemma 3 270M).
    let compute = ubatch * (vocab + per_seq + 8 * u64::from(f.embedding_length)) * 4;
    let output = parallel * vocab * 4;
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
        }
    }

    #[test]
    fn matches_what_llama_cpp_reports_for_gemma() {
        // llama.cpp logged for context 4096 x 8: KV 96 + 480 MiB, output 8 MiB,
        // compute 526.28 MiB.
        let e = estimate(&gemma(), 253_113_024, &opts(4096, 8, 0), false);
        assert_eq!(e.kv_cache_bytes, 576 << 20);
        let compute_mib = (e.overhead_bytes - FIXED_OVERHEAD - (8 << 20)) as f64 / 1048576.0;
        assert!((526.0..540.0).contains(&compute_mib), "{compute_mib}");
        assert_eq!(
            e.total_bytes,
            e.weights_bytes + e.kv_cache_bytes + e.overhead_bytes
        );
        assert_eq!((e.gpu_bytes, e.ram_bytes), (0, e.total_bytes));
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
