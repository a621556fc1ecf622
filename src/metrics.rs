//! Server-wide performance figures for `/admin/status`: request counts, and rolling averages
//! over the most recent completions so the numbers follow current load, not all-time history.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use crate::engine::Usage;

/// How many recent completions the rolling figures cover.
const WINDOW: usize = 64;

/// Cheap-to-clone handle to the shared figures.
#[derive(Clone, Default)]
pub struct Metrics {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    completions: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    recent: VecDeque<Sample>,
}

struct Sample {
    ttft: Duration,
    completion_tokens: u32,
    /// Time from first token to the end.
    decode_time: Duration,
}

/// Rolling performance as reported by `/admin/status`.
#[derive(Debug, Serialize, PartialEq)]
pub struct PerformanceReport {
    pub completions_total: u64,
    pub prompt_tokens_total: u64,
    pub completion_tokens_total: u64,
    /// Mean per-request decode speed over recent completions.
    pub avg_tokens_per_second: f64,
    /// Mean time to first token over recent completions, in milliseconds.
    pub avg_time_to_first_token_ms: f64,
}

impl Metrics {
    /// Records one finished generation; `ttft` is from admission to the first token and
    /// `total` from admission to the end.
    pub fn record_completion(&self, usage: &Usage, ttft: Duration, total: Duration) {
        let mut m = self.inner.lock().expect("metrics lock");
        m.completions += 1;
        m.prompt_tokens += u64::from(usage.prompt_tokens);
        m.completion_tokens += u64::from(usage.completion_tokens);
        m.recent.push_back(Sample {
            ttft,
            completion_tokens: usage.completion_tokens,
            decode_time: total.saturating_sub(ttft),
        });
        if m.recent.len() > WINDOW {
            m.recent.pop_front();
        }
    }

    /// Current figures.
    pub fn report(&self) -> PerformanceReport {
        let m = self.inner.lock().expect("metrics lock");
        let n = m.recent.len().max(1) as f64;
        let ttft = m.recent.iter().map(|s| s.ttft.as_secs_f64()).sum::<f64>() / n;
        let speeds: Vec<f64> = m
            .recent
            .iter()
            .filter(|s| s.completion_tokens > 1 && !s.decode_time.is_zero())
            .map(|s| f64::from(s.completion_tokens - 1) / s.decode_time.as_secs_f64())
            .collect();
        let tps = if speeds.is_empty() {
            0.0
        } else {
            speeds.iter().sum::<f64>() / speeds.len() as f64
        };
        PerformanceReport {
            completions_total: m.completions,
            prompt_tokens_total: m.prompt_tokens,
            completion_tokens_total: m.completion_tokens,
            avg_tokens_per_second: tps,
            avg_time_to_first_token_ms: ttft * 1000.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rolling_figures() {
        let m = Metrics::default();
        assert_eq!(m.report().completions_total, 0);
        m.record_completion(
            &Usage {
                prompt_tokens: 10,
                completion_tokens: 11,
                cached_tokens: 0,
            },
            Duration::from_millis(100),
            Duration::from_millis(1100),
        );
        let r = m.report();
        assert_eq!(r.completions_total, 1);
        assert_eq!(r.prompt_tokens_total, 10);
        assert_eq!(r.completion_tokens_total, 11);
        assert!((r.avg_time_to_first_token_ms - 100.0).abs() < 1e-6);
        // 10 tokens after the first over ~1 s of decoding.
        assert!((r.avg_tokens_per_second - 10.0).abs() < 1e-6, "{r:?}");
    }
}
