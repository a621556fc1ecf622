//! Which BLAS the MLX worker's matrix products run on.
//!
//! On Linux the `mlx-cpu` wheel bundles netlib's reference BLAS, and every prefill is a chain
//! of `cblas_sgemm` calls: measured on a 2-core Xeon, 5 GFLOP/s there against 218 with
//! Debian's OpenBLAS (`libopenblas0-pthread`), the same machine. The worker is started with a
//! system OpenBLAS preloaded, so those calls resolve to it; macOS MLX runs on Metal and
//! Accelerate and gets nothing.

use std::path::{Path, PathBuf};

/// Where Debian and Fedora put OpenBLAS's plain (32-bit integer) `cblas_*` library.
const CANDIDATES: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
];

/// The library to preload for `setting` (`models.mlx.blas`): `auto` finds OpenBLAS on Linux,
/// `none` keeps the wheel's own, anything else is a path that must exist.
pub fn preload(setting: &str) -> Result<Option<PathBuf>, String> {
    match setting {
        "none" | "" => Ok(None),
        "auto" if cfg!(target_os = "linux") => Ok(CANDIDATES
            .iter()
            .map(Path::new)
            .find(|p| p.is_file())
            .map(Path::to_path_buf)),
        "auto" => Ok(None),
        path if Path::new(path).is_file() => Ok(Some(PathBuf::from(path))),
        path => Err(format!(
            "`{path}` is not a file (use auto, none or a libopenblas path)"
        )),
    }
}

/// `LD_PRELOAD` for the worker: the library first, then whatever the server itself was given.
pub fn ld_preload(lib: &Path, inherited: Option<&str>) -> String {
    match inherited.filter(|s| !s.is_empty()) {
        Some(rest) => format!("{}:{rest}", lib.display()),
        None => lib.display().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn none_keeps_the_wheels_blas_and_a_missing_path_is_an_error() {
        assert_eq!(preload("none").unwrap(), None);
        assert!(preload("/no/such/libopenblas.so")
            .unwrap_err()
            .contains("/no/such/libopenblas.so"));
        let f = tempfile::NamedTempFile::new().unwrap();
        let p = f.path().to_str().unwrap();
        assert_eq!(preload(p).unwrap().as_deref(), Some(f.path()));
    }

    #[test]
    fn the_library_goes_before_what_was_inherited() {
        let lib = Path::new("/usr/lib/libopenblas.so.0");
        assert_eq!(ld_preload(lib, None), "/usr/lib/libopenblas.so.0");
        assert_eq!(ld_preload(lib, Some("")), "/usr/lib/libopenblas.so.0");
        assert_eq!(
            ld_preload(lib, Some("/x.so")),
            "/usr/lib/libopenblas.so.0:/x.so"
        );
    }
}
