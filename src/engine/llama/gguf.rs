//! Facts read from a GGUF header without loading any weights, so a load can be sized (and
//! refused) before it takes memory, and the inventory can name a file's quantisation. Uses
//! ggml's own reader through `llama-cpp-sys-2` rather than a second GGUF parser.

use std::ffi::{CStr, CString};
use std::path::Path;

use llama_cpp_sys_2 as sys;

use crate::engine::ModelFacts;

/// An open header; freed on drop.
struct Header(*mut sys::gguf_context);

impl Drop for Header {
    fn drop(&mut self) {
        // SAFETY: the pointer came from gguf_init_from_file and is freed once.
        unsafe { sys::gguf_free(self.0) }
    }
}

impl Header {
    fn key(&self, name: &str) -> Option<i64> {
        let c = CString::new(name).ok()?;
        // SAFETY: valid context and NUL-terminated key.
        let id = unsafe { sys::gguf_find_key(self.0, c.as_ptr()) };
        (id >= 0).then_some(id)
    }

    /// An unsigned integer of any width (writers differ in which they use).
    fn uint(&self, name: &str) -> Option<u64> {
        let id = self.key(name)?;
        // SAFETY: the getter matches the type the header declares for this key.
        unsafe {
            match sys::gguf_get_kv_type(self.0, id) {
                sys::GGUF_TYPE_UINT8 => Some(u64::from(sys::gguf_get_val_u8(self.0, id))),
                sys::GGUF_TYPE_UINT16 => Some(u64::from(sys::gguf_get_val_u16(self.0, id))),
                sys::GGUF_TYPE_UINT32 => Some(u64::from(sys::gguf_get_val_u32(self.0, id))),
                sys::GGUF_TYPE_UINT64 => Some(sys::gguf_get_val_u64(self.0, id)),
                sys::GGUF_TYPE_INT32 => u64::try_from(sys::gguf_get_val_i32(self.0, id)).ok(),
                sys::GGUF_TYPE_INT64 => u64::try_from(sys::gguf_get_val_i64(self.0, id)).ok(),
                _ => None,
            }
        }
    }

    /// A per-layer array of u32/i32 summed, or a scalar times `layers`.
    fn per_layer_sum(&self, name: &str, layers: u64) -> Option<u64> {
        let id = self.key(name)?;
        // SAFETY: array data is read with the element type and length the header declares.
        unsafe {
            if sys::gguf_get_kv_type(self.0, id) != sys::GGUF_TYPE_ARRAY {
                return self.uint(name).map(|v| v * layers);
            }
            let n = sys::gguf_get_arr_n(self.0, id);
            let data = sys::gguf_get_arr_data(self.0, id);
            match sys::gguf_get_arr_type(self.0, id) {
                sys::GGUF_TYPE_UINT32 | sys::GGUF_TYPE_INT32 => {
                    let s = std::slice::from_raw_parts(data.cast::<u32>(), n);
                    Some(s.iter().map(|&v| u64::from(v)).sum())
                }
                _ => None,
            }
        }
    }

    fn string(&self, name: &str) -> Option<String> {
        let id = self.key(name)?;
        // SAFETY: only read when the header says the value is a string.
        unsafe {
            if sys::gguf_get_kv_type(self.0, id) != sys::GGUF_TYPE_STRING {
                return None;
            }
            let p = sys::gguf_get_val_str(self.0, id);
            (!p.is_null()).then(|| CStr::from_ptr(p).to_string_lossy().into_owned())
        }
    }

    /// Bytes of the layer weights llama.cpp's CPU backend copies into its repacked layout
    /// (Q4_0, Q4_K and IQ4_NL matrices, on x86-64 with AVX2): that copy is allocated on top
    /// of the mapped file.
    fn repacked_bytes(&self) -> u64 {
        if !cfg!(target_arch = "x86_64") {
            return 0;
        }
        // SAFETY: indices come from gguf_get_n_tensors on the same live context.
        unsafe {
            (0..sys::gguf_get_n_tensors(self.0))
                .filter(|&i| {
                    let name = std::ffi::CStr::from_ptr(sys::gguf_get_tensor_name(self.0, i));
                    let t = sys::gguf_get_tensor_type(self.0, i);
                    name.to_bytes().starts_with(b"blk.")
                        && [
                            sys::GGML_TYPE_Q4_0,
                            sys::GGML_TYPE_Q4_K,
                            sys::GGML_TYPE_IQ4_NL,
                        ]
                        .contains(&t)
                })
                .map(|i| sys::gguf_get_tensor_size(self.0, i) as u64)
                .sum()
        }
    }

    fn array_len(&self, name: &str) -> Option<u64> {
        let id = self.key(name)?;
        // SAFETY: length of an array-typed key.
        unsafe {
            (sys::gguf_get_kv_type(self.0, id) == sys::GGUF_TYPE_ARRAY)
                .then(|| sys::gguf_get_arr_n(self.0, id) as u64)
        }
    }
}

/// Reads the header of `path` (metadata only; tensors are not touched).
pub fn read(path: &Path) -> Result<ModelFacts, String> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{}: path contains a NUL byte", path.display()))?;
    let params = sys::gguf_init_params {
        no_alloc: true,
        ctx: std::ptr::null_mut(),
    };
    // SAFETY: valid path string; no tensor context is requested.
    let ctx = unsafe { sys::gguf_init_from_file(c.as_ptr(), params) };
    if ctx.is_null() {
        return Err(format!("{}: not a readable GGUF file", path.display()));
    }
    let h = Header(ctx);
    let arch = h
        .string("general.architecture")
        .ok_or_else(|| format!("{}: no general.architecture", path.display()))?;
    let k = |s: &str| format!("{arch}.{s}");
    let layers = h.uint(&k("block_count")).unwrap_or(0);
    let embd = h.uint(&k("embedding_length")).unwrap_or(0);
    let heads = h.uint(&k("attention.head_count")).unwrap_or(1).max(1);
    let head_dim = embd / heads;
    let kv_heads = h
        .per_layer_sum(&k("attention.head_count_kv"), layers)
        .or_else(|| h.per_layer_sum(&k("attention.head_count"), layers))
        .unwrap_or(0);
    let clamp = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
    Ok(ModelFacts {
        layers: clamp(layers),
        kv_heads_all_layers: kv_heads,
        key_length: clamp(h.uint(&k("attention.key_length")).unwrap_or(head_dim)),
        value_length: clamp(h.uint(&k("attention.value_length")).unwrap_or(head_dim)),
        embedding_length: clamp(embd),
        context_train: clamp(h.uint(&k("context_length")).unwrap_or(4096)),
        vocab_size: clamp(h.array_len("tokenizer.ggml.tokens").unwrap_or(32_000)),
        file_type: h.uint("general.file_type").and_then(file_type_name),
        head_count: clamp(heads),
        sliding_window: h.key(&k("attention.sliding_window")).is_some(),
        repacked_bytes: h.repacked_bytes(),
        kind: crate::engine::ModelKind::from_pooling(h.uint(&k("pooling_type"))),
        architecture: arch,
    })
}

/// llama.cpp's `llama_ftype` numbers as the names quantisations go by.
fn file_type_name(t: u64) -> Option<String> {
    let name = match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        38 => "MXFP4_MOE",
        _ => return None,
    };
    Some(name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_files_that_are_not_gguf() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.gguf");
        std::fs::write(&p, b"definitely not a gguf header").unwrap();
        assert!(read(&p).is_err());
        assert!(read(&dir.path().join("missing.gguf")).is_err());
    }

    #[test]
    fn names_quantisations() {
        assert_eq!(file_type_name(15).as_deref(), Some("Q4_K_M"));
        assert_eq!(file_type_name(7).as_deref(), Some("Q8_0"));
        assert_eq!(file_type_name(999), None);
    }
}
