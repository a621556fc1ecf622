//! Facts about an MLX model folder read from its `config.json` (no weights touched), so a load
//! can be sized by the memory guard like a GGUF one, and the inventory can describe it.

use std::path::Path;

use crate::engine::ModelFacts;

/// Whether `dir` holds an MLX (Hugging Face safetensors) model: a `config.json`, weights and a
/// `tokenizer.json`.
pub fn is_model_dir(dir: &Path) -> bool {
    let has = |name: &str| dir.join(name).is_file();
    has("config.json")
        && has("tokenizer.json")
        && std::fs::read_dir(dir).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
        })
}

/// Reads `config.json`: architecture, sizes, trained context, and the quantisation mlx-lm
/// records (`quantization.bits`), else the stored dtype.
pub fn read(dir: &Path) -> Result<ModelFacts, String> {
    let path = dir.join("config.json");
    let text = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let c: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    // Multimodal configs keep the language model's numbers under `text_config`.
    let t = c.get("text_config").unwrap_or(&c);
    let num = |k: &str| t.get(k).and_then(serde_json::Value::as_u64);
    let clamp = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
    let layers = num("num_hidden_layers").unwrap_or(0);
    let hidden = num("hidden_size").unwrap_or(0);
    let heads = num("num_attention_heads").unwrap_or(1).max(1);
    let kv_heads = num("num_key_value_heads").unwrap_or(heads);
    let head_dim = num("head_dim").unwrap_or(hidden / heads);
    let quant = c
        .get("quantization")
        .and_then(|q| q.get("bits"))
        .and_then(serde_json::Value::as_u64)
        .map(|b| format!("{b}bit"))
        .or_else(|| {
            c.get("torch_dtype")
                .or_else(|| c.get("dtype"))
                .and_then(|d| d.as_str())
                .map(String::from)
        });
    Ok(ModelFacts {
        architecture: t
            .get("model_type")
            .or_else(|| c.get("model_type"))
            .and_then(|m| m.as_str())
            .unwrap_or("unknown")
            .to_string(),
        layers: clamp(layers),
        kv_heads_all_layers: layers * kv_heads,
        key_length: clamp(head_dim),
        value_length: clamp(head_dim),
        embedding_length: clamp(hidden),
        context_train: clamp(num("max_position_embeddings").unwrap_or(4096)),
        vocab_size: clamp(num("vocab_size").unwrap_or(32_000)),
        file_type: quant,
        head_count: clamp(num("num_attention_heads").unwrap_or(1)),
        sliding_window: false,
        repacked_bytes: 0,
        kind: crate::engine::ModelKind::Chat,
    })
}

/// Parameters counted from the safetensors headers (the JSON each file starts with; no weights
/// read). Quantised weights are packed several to a `U32`, so they count `32 / bits` each;
/// quantisation scales and biases are not parameters.
pub fn parameters(dir: &Path) -> u64 {
    use std::io::Read;
    let bits = std::fs::read(dir.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|c| c.pointer("/quantization/bits").and_then(|b| b.as_u64()));
    let mut total = 0u64;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    for e in entries.flatten() {
        if !e.file_name().to_string_lossy().ends_with(".safetensors") {
            continue;
        }
        let Ok(mut f) = std::fs::File::open(e.path()) else {
            continue;
        };
        let mut len = [0u8; 8];
        if f.read_exact(&mut len).is_err() {
            continue;
        }
        let n = u64::from_le_bytes(len);
        if n > 100 << 20 {
            continue;
        }
        let mut header = vec![0u8; n as usize];
        if f.read_exact(&mut header).is_err() {
            continue;
        }
        let Ok(serde_json::Value::Object(tensors)) = serde_json::from_slice(&header) else {
            continue;
        };
        for (name, t) in &tensors {
            if name == "__metadata__" || name.ends_with(".scales") || name.ends_with(".biases") {
                continue;
            }
            let elements: u64 = t["shape"]
                .as_array()
                .map_or(0, |s| s.iter().filter_map(|d| d.as_u64()).product());
            let packed = match (t["dtype"].as_str(), bits) {
                (Some("U32"), Some(b)) if b > 0 => 32 / b,
                _ => 1,
            };
            total += elements * packed;
        }
    }
    total
}

/// What loading takes: the weights (the folder's size), a KV cache in the weights' dtype
/// (float32 when unquantised-float32, else 16-bit), logits for each sequence, and the worker
/// process's Python and MLX runtime.
pub fn estimate(
    f: &ModelFacts,
    weights: u64,
    context: u32,
    parallel: u32,
) -> crate::engine::MemoryEstimate {
    const WORKER_RUNTIME: u64 = 400 << 20;
    let kv_bytes = if f.file_type.as_deref() == Some("float32") {
        4
    } else {
        2
    };
    let parallel = u64::from(parallel.max(1));
    let kv = f.kv_heads_all_layers
        * u64::from(f.key_length + f.value_length)
        * kv_bytes
        * u64::from(context)
        * parallel;
    let overhead = WORKER_RUNTIME + parallel * u64::from(f.vocab_size) * 4;
    let total = weights + kv + overhead;
    crate::engine::MemoryEstimate {
        weights_bytes: weights,
        kv_cache_bytes: kv,
        overhead_bytes: overhead,
        total_bytes: total,
        gpu_bytes: 0,
        ram_bytes: total,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_an_mlx_community_config() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24,
                "num_attention_heads": 14, "num_key_value_heads": 2,
                "max_position_embeddings": 32768, "vocab_size": 151936,
                "quantization": {"group_size": 64, "bits": 4}}"#,
        )
        .unwrap();
        assert!(!is_model_dir(dir.path()), "no weights or tokenizer yet");
        std::fs::write(dir.path().join("tokenizer.json"), "{}").unwrap();
        std::fs::write(dir.path().join("model.safetensors"), "").unwrap();
        assert!(is_model_dir(dir.path()));
        let f = read(dir.path()).unwrap();
        assert_eq!(f.architecture, "qwen2");
        assert_eq!(
            (f.layers, f.kv_heads_all_layers, f.key_length),
            (24, 48, 64)
        );
        assert_eq!(f.context_train, 32768);
        assert_eq!(f.file_type.as_deref(), Some("4bit"));
    }
}
