//! Stored benchmark results (`/admin/benchmark*`): one JSON line per run in the models
//! directory's hidden `.benchmarks/results.jsonl`, so results stay with the models they
//! measured and survive restarts; and the figures a run is summed into. The runs themselves
//! go through the scheduler like any request (see `api::admin::benchmark`).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Results kept; older lines are dropped when the file is rewritten.
const KEEP: usize = 500;

/// One measured generation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunFigures {
    /// 1-based, warm-up runs not counted.
    pub run: u32,
    pub tokens_generated: u32,
    pub prompt_tokens: u32,
    /// Prompt tokens served from the prefix cache (each run's prompt differs at its start,
    /// so only the chat template's head is).
    pub cached_tokens: u32,
    pub time_to_first_token_ms: f64,
    pub total_time_ms: f64,
    /// Decode rate: tokens after the first over the time after it.
    pub tokens_per_second: f64,
    /// Prompt tokens computed per second until the first token.
    pub prompt_tokens_per_second: f64,
    pub finish_reason: String,
}

/// The runs' summary in the first Opta-LMX's `stats` shape (the coding CLI's
/// `LmxBenchmarkPersistStats`), plus the prefill rate and every run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    pub ttft_p50_sec: f64,
    pub ttft_p95_sec: f64,
    pub ttft_mean_sec: f64,
    pub toks_per_sec_p50: f64,
    pub toks_per_sec_p95: f64,
    pub toks_per_sec_mean: f64,
    pub prefill_toks_per_sec_mean: f64,
    pub prompt_tokens: u32,
    pub output_tokens: u32,
    pub runs_completed: u32,
    pub warmup_runs_discarded: u32,
    /// The first measured run's answer, to judge it by.
    pub output_text: String,
    pub output_token_count: u32,
    /// It stopped on its own before the token limit.
    pub completed_naturally: bool,
    /// Share of repeated word triples in the answer (0 none, near 1 a loop).
    pub repetition_ratio: f64,
    /// `ok`, `truncated` (hit the limit), `repetitive`, `garbled`.
    pub coherence_flag: String,
    pub tool_call: Option<Value>,
    pub skills: Vec<Value>,
    pub runs: Vec<RunFigures>,
}

/// One stored benchmark (the CLI's `LmxBenchmarkPersistResult`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BenchmarkRecord {
    pub id: String,
    pub model_id: String,
    /// `llama.cpp` or `mlx`.
    pub backend: String,
    /// RFC 3339.
    pub timestamp: String,
    /// `ok` with two or more measured runs, else `insufficient_data`.
    pub status: String,
    pub hardware: String,
    pub lmx_version: String,
    pub prompt_preview: String,
    pub max_tokens: u32,
    pub temperature: f32,
    /// The model's settings while measured (context, parallel, threads).
    pub settings: Value,
    /// Requests other clients had running or waiting when it began: the figures were shared
    /// with them.
    pub concurrent_requests: u32,
    pub stats: Stats,
}

/// `.benchmarks/results.jsonl`, appended to under a lock.
pub struct BenchmarkStore {
    path: PathBuf,
    lock: Mutex<()>,
}

impl BenchmarkStore {
    /// The store under `models_dir`.
    pub fn new(models_dir: &std::path::Path) -> Self {
        Self {
            path: models_dir.join(".benchmarks").join("results.jsonl"),
            lock: Mutex::new(()),
        }
    }

    /// Appends one result (blocking: file IO).
    pub fn save(&self, record: &BenchmarkRecord) -> std::io::Result<()> {
        let _held = self.lock.lock().expect("benchmark store lock");
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut all = self.read();
        if all.len() >= KEEP {
            all.drain(..=all.len() - KEEP);
            all.push(record.clone());
            let text: String = all
                .iter()
                .filter_map(|r| serde_json::to_string(r).ok())
                .map(|l| l + "\n")
                .collect();
            let temp = self.path.with_extension("jsonl.tmp");
            std::fs::write(&temp, text)?;
            return std::fs::rename(temp, &self.path);
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        writeln!(f, "{}", serde_json::to_string(record)?)
    }

    /// Every stored result for `model` (all with `None`), oldest first; unreadable lines are
    /// skipped (blocking: file IO).
    pub fn load(&self, model: Option<&str>) -> Vec<BenchmarkRecord> {
        let _held = self.lock.lock().expect("benchmark store lock");
        self.read()
            .into_iter()
            .filter(|r| model.is_none_or(|m| r.model_id == m))
            .collect()
    }

    fn read(&self) -> Vec<BenchmarkRecord> {
        std::fs::read_to_string(&self.path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// The `q` quantile (0..=1) by nearest rank; 0 for none.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    let mut v = values.to_vec();
    super::rolling::quantile(&mut v, q)
}

fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        0.0
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    }
}

/// Share of word triples that repeat an earlier one.
pub fn repetition_ratio(text: &str) -> f64 {
    let words: Vec<&str> = text.split_whitespace().collect();
    if words.len() < 4 {
        return 0.0;
    }
    let triples: Vec<_> = words.windows(3).collect();
    let unique: std::collections::HashSet<_> = triples.iter().collect();
    1.0 - unique.len() as f64 / triples.len() as f64
}

/// How an answer reads: `garbled` (mostly not words), `repetitive` (a loop), `truncated`
/// (cut by the limit), else `ok`.
pub fn coherence(text: &str, completed_naturally: bool) -> &'static str {
    let chars = text.chars().count();
    let wordy = text
        .chars()
        .filter(|c| c.is_alphanumeric() || c.is_whitespace() || c.is_ascii_punctuation())
        .count();
    if chars == 0 || (wordy as f64) < chars as f64 * 0.7 || text.contains('\u{fffd}') {
        "garbled"
    } else if repetition_ratio(text) > 0.5 {
        "repetitive"
    } else if !completed_naturally {
        "truncated"
    } else {
        "ok"
    }
}

/// Sums the measured runs; `first_text` is the first measured run's answer.
pub fn summarise(runs: Vec<RunFigures>, warmups: u32, first_text: String) -> Stats {
    let ttft: Vec<f64> = runs
        .iter()
        .map(|r| r.time_to_first_token_ms / 1000.0)
        .collect();
    let tps: Vec<f64> = runs.iter().map(|r| r.tokens_per_second).collect();
    let prefill: Vec<f64> = runs.iter().map(|r| r.prompt_tokens_per_second).collect();
    let first = runs.first();
    let completed_naturally = first.is_some_and(|r| r.finish_reason == "stop");
    Stats {
        ttft_p50_sec: quantile(&ttft, 0.5),
        ttft_p95_sec: quantile(&ttft, 0.95),
        ttft_mean_sec: mean(&ttft),
        toks_per_sec_p50: quantile(&tps, 0.5),
        toks_per_sec_p95: quantile(&tps, 0.95),
        toks_per_sec_mean: mean(&tps),
        prefill_toks_per_sec_mean: mean(&prefill),
        prompt_tokens: first.map_or(0, |r| r.prompt_tokens),
        output_tokens: first.map_or(0, |r| r.tokens_generated),
        runs_completed: runs.len() as u32,
        warmup_runs_discarded: warmups,
        output_token_count: first.map_or(0, |r| r.tokens_generated),
        completed_naturally,
        repetition_ratio: repetition_ratio(&first_text),
        coherence_flag: coherence(&first_text, completed_naturally).into(),
        output_text: first_text,
        tool_call: None,
        skills: Vec::new(),
        runs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(n: u32, ttft_ms: f64, tps: f64) -> RunFigures {
        RunFigures {
            run: n,
            tokens_generated: 10,
            prompt_tokens: 40,
            cached_tokens: 5,
            time_to_first_token_ms: ttft_ms,
            total_time_ms: ttft_ms + 900.0,
            tokens_per_second: tps,
            prompt_tokens_per_second: 35.0 / (ttft_ms / 1000.0),
            finish_reason: "length".into(),
        }
    }

    #[test]
    fn runs_sum_into_percentiles_and_means() {
        let s = summarise(
            vec![
                run(1, 100.0, 10.0),
                run(2, 300.0, 20.0),
                run(3, 200.0, 30.0),
            ],
            1,
            "The quick brown fox jumps over the lazy dog".into(),
        );
        assert_eq!((s.ttft_p50_sec, s.ttft_p95_sec), (0.2, 0.3));
        assert!((s.ttft_mean_sec - 0.2).abs() < 1e-9);
        assert_eq!((s.toks_per_sec_p50, s.toks_per_sec_mean), (20.0, 20.0));
        assert_eq!((s.runs_completed, s.warmup_runs_discarded), (3, 1));
        assert_eq!(s.coherence_flag, "truncated");
        assert!(!s.completed_naturally);
    }

    #[test]
    fn answers_are_judged_by_how_they_read() {
        assert_eq!(coherence("Paris is the capital.", true), "ok");
        assert_eq!(coherence(&"a b c ".repeat(20), true), "repetitive");
        assert_eq!(coherence("\u{fffd}\u{fffd}##@@", true), "garbled");
        assert_eq!(coherence("", true), "garbled");
        assert_eq!(repetition_ratio("one two"), 0.0);
    }

    #[test]
    fn the_store_keeps_results_per_model_across_instances() {
        let dir = tempfile::tempdir().unwrap();
        let record = |model: &str| BenchmarkRecord {
            id: format!("b-{model}"),
            model_id: model.into(),
            backend: "llama.cpp".into(),
            timestamp: "2026-12-05T00:00:00Z".into(),
            status: "ok".into(),
            hardware: "cpu".into(),
            lmx_version: "0".into(),
            prompt_preview: "p".into(),
            max_tokens: 8,
            temperature: 0.0,
            settings: Value::Null,
            concurrent_requests: 0,
            stats: summarise(vec![run(1, 100.0, 10.0)], 0, "x".into()),
        };
        BenchmarkStore::new(dir.path()).save(&record("a")).unwrap();
        BenchmarkStore::new(dir.path()).save(&record("b")).unwrap();
        let store = BenchmarkStore::new(dir.path());
        assert_eq!(store.load(None).len(), 2);
        assert_eq!(store.load(Some("b")), vec![record("b")]);
    }
}
