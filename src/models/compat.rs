//! Whether a model can load here, for `/admin/models/compatibility` and
//! `/admin/models/probe`: what is known without loading it (its format, header, architecture,
//! memory estimate against the guard's limit) and what loads and probes found (a bounded,
//! in-memory record of outcomes since start, newest last).

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::Serialize;

/// Outcomes kept.
const KEEP: usize = 1000;

/// One load or probe of a model, as it ended.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Outcome {
    pub model_id: String,
    /// `llama.cpp` or `mlx`.
    pub backend: &'static str,
    /// The engine's version (this build's llama.cpp binding, or mlx-lm's worker protocol).
    pub backend_version: &'static str,
    /// `pass` or `fail`.
    pub outcome: &'static str,
    pub reason: String,
    /// `load` or `probe`.
    pub source: &'static str,
    /// Unix seconds.
    pub ts: f64,
}

/// The record of outcomes.
#[derive(Debug, Default)]
pub struct Outcomes {
    list: Mutex<VecDeque<Outcome>>,
}

/// The backend that serves a format.
pub fn backend_of(format: &str) -> &'static str {
    if format == "mlx" {
        "mlx"
    } else {
        "llama.cpp"
    }
}

/// The version reported for a backend.
pub fn backend_version(backend: &str) -> &'static str {
    if backend == "mlx" {
        "mlx-lm"
    } else {
        "llama-cpp-2 0.1.160"
    }
}

impl Outcomes {
    /// Notes how a load or probe of `model_id` in `format` ended.
    pub fn record(
        &self,
        model_id: &str,
        format: &str,
        ok: bool,
        reason: impl Into<String>,
        source: &'static str,
    ) {
        let backend = backend_of(format);
        let mut list = self.list.lock().expect("outcomes lock");
        list.push_back(Outcome {
            model_id: model_id.to_string(),
            backend,
            backend_version: backend_version(backend),
            outcome: if ok { "pass" } else { "fail" },
            reason: reason.into(),
            source,
            ts: crate::system::unix_time(std::time::SystemTime::now()),
        });
        while list.len() > KEEP {
            list.pop_front();
        }
    }

    /// Every outcome, oldest first.
    pub fn all(&self) -> Vec<Outcome> {
        self.list
            .lock()
            .expect("outcomes lock")
            .iter()
            .cloned()
            .collect()
    }

    /// The newest outcome for `model_id`.
    pub fn latest(&self, model_id: &str) -> Option<Outcome> {
        self.list
            .lock()
            .expect("outcomes lock")
            .iter()
            .rev()
            .find(|o| o.model_id == model_id)
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_kept_newest_last_and_bounded() {
        let o = Outcomes::default();
        o.record("a", "gguf", true, "loaded", "load");
        o.record("b", "mlx", false, "no mlx_lm", "probe");
        o.record("a", "gguf", false, "crashed", "load");
        assert_eq!(o.latest("a").unwrap().outcome, "fail");
        assert_eq!(o.latest("b").unwrap().backend, "mlx");
        assert!(o.latest("c").is_none());
        for _ in 0..KEEP + 5 {
            o.record("x", "gguf", true, "", "load");
        }
        assert_eq!(o.all().len(), KEEP);
    }
}
