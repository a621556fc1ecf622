//! GGUF requantisation with llama.cpp's own quantizer (`llama_model_quantize`), the code
//! behind `llama-quantize`. It has no way to stop or report progress through its API, so it
//! runs in a child process (`opta-lmx quantize-worker`): a cancel kills the child, and the
//! parent reads progress from the per-tensor lines llama.cpp logs to standard error
//! (`[  12/ 290] blk.0.attn_k.weight - ...`).

use std::ffi::CString;
use std::path::Path;

/// A GGUF quantisation this server offers: llama.cpp's file type number and its rough bits
/// per weight, for the disk estimate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GgufType {
    /// The name GGUF headers and file names use (`Q4_K_M`).
    pub name: &'static str,
    /// `LLAMA_FTYPE_MOSTLY_*`.
    pub ftype: u32,
    /// Average bits per weight of a typical model in this type.
    pub bits_per_weight: f64,
}

/// The types offered, smallest first. Importance-matrix types (IQ*) are left out: they need
/// an imatrix file this server does not make.
pub const TYPES: &[GgufType] = &[
    t("Q2_K", 10, 3.0),
    t("Q3_K_S", 11, 3.5),
    t("Q3_K_M", 12, 3.9),
    t("Q3_K_L", 13, 4.3),
    t("Q4_0", 2, 4.55),
    t("Q4_K_S", 14, 4.6),
    t("Q4_K_M", 15, 4.9),
    t("Q5_0", 8, 5.5),
    t("Q5_K_S", 16, 5.55),
    t("Q5_K_M", 17, 5.7),
    t("Q6_K", 18, 6.6),
    t("Q8_0", 7, 8.5),
    t("F16", 1, 16.0),
    t("BF16", 32, 16.0),
];

const fn t(name: &'static str, ftype: u32, bits_per_weight: f64) -> GgufType {
    GgufType {
        name,
        ftype,
        bits_per_weight,
    }
}

/// The type a name means (any case, `q4_k_m` too).
pub fn type_named(name: &str) -> Option<GgufType> {
    TYPES
        .iter()
        .copied()
        .find(|t| t.name.eq_ignore_ascii_case(name))
}

/// The type a bit count asks for (the coding CLI sends `bits: 4 | 8`): the K-quant medium
/// mix where there is one, as the common choice at that size.
pub fn type_for_bits(bits: u32) -> Option<GgufType> {
    type_named(match bits {
        2 => "Q2_K",
        3 => "Q3_K_M",
        4 => "Q4_K_M",
        5 => "Q5_K_M",
        6 => "Q6_K",
        8 => "Q8_0",
        16 => "F16",
        _ => return None,
    })
}

/// The bits a type is named for (`Q4_K_M` 4, `Q8_0` 8, `F16` and `BF16` 16), as the coding
/// CLI's `bits` field reads.
pub fn nominal_bits(name: &str) -> u32 {
    let digits: String = name
        .trim_start_matches(|c: char| c.is_ascii_alphabetic())
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().unwrap_or(0)
}

/// Bits per weight of a file whose header declares `file_type` (`F32`, `Q4_K_M`, ...), for
/// scaling its size to another type; `None` when unknown.
pub fn bits_of(file_type: &str) -> Option<f64> {
    if file_type.eq_ignore_ascii_case("F32") || file_type.eq_ignore_ascii_case("ALL_F32") {
        return Some(32.0);
    }
    type_named(file_type).map(|t| t.bits_per_weight)
}

/// The progress a line of llama.cpp's quantizer log reports: `(done, total)` tensors.
pub fn progress_of(line: &str) -> Option<(u32, u32)> {
    let inner = line.trim_start().strip_prefix('[')?;
    let (counts, _) = inner.split_once(']')?;
    let (done, total) = counts.split_once('/')?;
    Some((done.trim().parse().ok()?, total.trim().parse().ok()?))
}

/// The child process's work: quantize `input` into `output` as `ftype` on `threads` threads.
/// llama.cpp's default logger writes its progress to standard error for the parent to read.
pub fn run_worker(input: &Path, output: &Path, ftype: u32, threads: u32) -> Result<(), String> {
    let path = |p: &Path| {
        CString::new(p.as_os_str().as_encoded_bytes())
            .map_err(|_| format!("{} contains a NUL byte", p.display()))
    };
    let (input, output) = (path(input)?, path(output)?);
    // SAFETY: plain C calls with valid NUL-terminated paths and a params struct llama.cpp
    // made; nothing else in this process uses llama.cpp.
    let rc = unsafe {
        llama_cpp_sys_2::llama_backend_init();
        let mut params = llama_cpp_sys_2::llama_model_quantize_default_params();
        params.nthread = threads.max(1) as i32;
        params.ftype = ftype;
        // Models on disk are mostly quantized already: going to a smaller type from one is
        // what users ask for (at some cost in quality, as with llama-quantize's flag).
        params.allow_requantize = true;
        llama_cpp_sys_2::llama_model_quantize(input.as_ptr(), output.as_ptr(), &params)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!("llama.cpp's quantizer failed (code {rc})"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_bits_and_log_lines() {
        assert_eq!(type_named("q4_k_m").map(|t| t.ftype), Some(15));
        assert_eq!(type_for_bits(8).map(|t| t.name), Some("Q8_0"));
        assert_eq!(type_for_bits(7), None);
        assert_eq!(bits_of("F32"), Some(32.0));
        assert_eq!(
            ["Q2_K", "Q3_K_M", "Q4_0", "Q8_0", "F16", "BF16"].map(nominal_bits),
            [2, 3, 4, 8, 16, 16]
        );
        assert_eq!(bits_of("Q4_0"), Some(4.55));
        assert_eq!(bits_of("IQ2_XS"), None);
        assert_eq!(
            progress_of("[  12/ 290]   blk.0.attn_k.weight - [  896,   128], type =   q8_0, "),
            Some((12, 290))
        );
        assert_eq!(
            progress_of("llama_model_quantize_impl: model size = 1 MB"),
            None
        );
        assert_eq!(progress_of("[x/2] nope"), None);
    }
}
