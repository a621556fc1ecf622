//! Load-time choices that change how a model's memory is laid out or how it decodes, shared by
//! the configuration, the admin API, the memory estimate and the backends, so that each is
//! spelled once.

use serde::{Deserialize, Serialize};

/// Element type of the KV cache. Quantised types trade a little accuracy for a smaller cache
/// (q8_0 about half of f16, q4_0 about a quarter), which is what lets long contexts and many
/// sequences fit; a quantised V needs flash attention (llama.cpp keeps V transposed without).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum KvType {
    #[default]
    F16,
    Q8_0,
    Q4_0,
}

impl KvType {
    /// Bytes for `elements` cache entries: ggml stores q8_0 as 34-byte blocks of 32 and q4_0
    /// as 18-byte blocks of 32.
    pub fn bytes(self, elements: u64) -> u64 {
        match self {
            Self::F16 => elements * 2,
            Self::Q8_0 => elements.div_ceil(32) * 34,
            Self::Q4_0 => elements.div_ceil(32) * 18,
        }
    }

    /// The name llama.cpp and llama-server use (`--cache-type-k q8_0`).
    pub fn name(self) -> &'static str {
        match self {
            Self::F16 => "f16",
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
        }
    }

    /// Whether the type is block-quantised (a V cache of it needs flash attention).
    pub fn quantized(self) -> bool {
        self != Self::F16
    }
}

/// Whether attention runs as one fused kernel. `auto` lets llama.cpp decide per device; every
/// backend this server builds (CPU, CUDA, Metal) supports it, and it is what a quantised V
/// cache needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FlashAttention {
    #[default]
    Auto,
    On,
    Off,
}

impl FlashAttention {
    /// What llama.cpp will run with: `auto` resolves to on for the architectures here (its
    /// probe finds the fused kernel on CPU, CUDA and Metal).
    pub fn enabled(self) -> bool {
        self != Self::Off
    }
}

/// How a sequence proposes tokens for the target model to verify in one pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Speculation {
    /// One token per pass.
    #[default]
    Off,
    /// Draft-free: continue a repeat of the last few tokens found earlier in the prompt or the
    /// answer (prompt lookup); strong when an answer re-emits what it was given (edits).
    Ngram,
    /// A small model of the same vocabulary proposes the tokens (`draft_model`).
    Draft,
}

/// Checks the combination llama.cpp would otherwise refuse only when creating the context.
pub fn check_cache_types(v: KvType, flash: FlashAttention) -> Result<(), String> {
    if v.quantized() && flash == FlashAttention::Off {
        return Err(format!(
            "cache_type_v {} needs flash attention; set flash_attention to auto or on, or use f16",
            v.name()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_bytes_follow_ggml_block_sizes() {
        assert_eq!(KvType::F16.bytes(1024), 2048);
        assert_eq!(KvType::Q8_0.bytes(1024), 32 * 34);
        assert_eq!(KvType::Q4_0.bytes(1024), 32 * 18);
    }

    #[test]
    fn quantised_v_needs_flash_attention() {
        assert!(check_cache_types(KvType::Q8_0, FlashAttention::Off).is_err());
        assert!(check_cache_types(KvType::Q8_0, FlashAttention::Auto).is_ok());
        assert!(check_cache_types(KvType::F16, FlashAttention::Off).is_ok());
    }

    #[test]
    fn names_are_what_llama_cpp_calls_them() {
        let parsed: KvType = serde_json::from_str("\"q8_0\"").unwrap();
        assert_eq!(parsed, KvType::Q8_0);
        assert_eq!(serde_json::to_string(&KvType::Q4_0).unwrap(), "\"q4_0\"");
        assert_eq!(parsed.name(), "q8_0");
    }
}
