//! Server-wide performance figures for `/admin/status`: request counts, and rolling averages
//! over the most recent completions so the numbers follow current load, not all-time history.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// Mean time to first token over recent completions, in milliseconds (queueing included).
    pub avg_time_to_first_token_ms: f64,
    /// Median and 95th percentile of the same.
    pub p50_time_to_first_token_ms: f64,
    pub p95_time_to_first_token_ms: f64,
}

/// The `q` quantile (0..=1) of `values` by nearest rank; 0 for none.
fn quantile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((q * values.len() as f64).ceil() as usize).clamp(1, values.len());
    values[rank - 1]
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
        let mut ttfts: Vec<f64> = m
            .recent
            .iter()
            .map(|s| s.ttft.as_secs_f64() * 1000.0)
            .collect();
        let ttft = ttfts.iter().sum::<f64>() / n;
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
            avg_time_to_first_token_ms: ttft,
            p50_time_to_first_token_ms: quantile(&mut ttfts, 0.5),
            p95_time_to_first_token_ms: quantile(&mut ttfts, 0.95),
        }
    }
}

/// Seconds the rolling token rates cover.
pub const RATE_WINDOW_SECS: u64 = 10;

/// Prompt and generated tokens per second over the last [`RATE_WINDOW_SECS`], kept in
/// one-second buckets: "how fast is it going now", which all-time totals cannot say.
#[derive(Debug)]
pub struct RateWindow {
    start: Instant,
    /// (second since `start`, prompt tokens, generated tokens), oldest first.
    buckets: VecDeque<(u64, u64, u64)>,
}

impl Default for RateWindow {
    fn default() -> Self {
        Self::new(Instant::now())
    }
}

impl RateWindow {
    /// An empty window whose clock starts at `start`.
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            buckets: VecDeque::new(),
        }
    }

    fn second(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.start).as_secs()
    }

    /// Adds tokens computed at `at`: prompt tokens prefilled and tokens generated.
    pub fn record(&mut self, at: Instant, prompt: u64, generated: u64) {
        let sec = self.second(at);
        match self.buckets.back_mut() {
            Some(b) if b.0 == sec => {
                b.1 += prompt;
                b.2 += generated;
            }
            _ => self.buckets.push_back((sec, prompt, generated)),
        }
        while self
            .buckets
            .front()
            .is_some_and(|b| b.0 + RATE_WINDOW_SECS <= sec)
        {
            self.buckets.pop_front();
        }
    }

    /// (prompt tokens/s, generated tokens/s) over the window ending at `now`; a window younger
    /// than its span is divided by its age so a fresh server does not under-report.
    pub fn rates(&self, now: Instant) -> (f64, f64) {
        let sec = self.second(now);
        let (p, g) = self
            .buckets
            .iter()
            .filter(|b| b.0 + RATE_WINDOW_SECS > sec)
            .fold((0, 0), |(p, g), b| (p + b.1, g + b.2));
        let age = now.saturating_duration_since(self.start).as_secs_f64();
        let span = age.clamp(1.0, RATE_WINDOW_SECS as f64);
        (p as f64 / span, g as f64 / span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_window_forgets_old_seconds() {
        let t0 = Instant::now();
        let at = |s: f64| t0 + Duration::from_secs_f64(s);
        let mut w = RateWindow::new(t0);
        w.record(at(0.5), 100, 10);
        w.record(at(0.7), 100, 10);
        // Half a second in, the window spans one second.
        assert_eq!(w.rates(at(0.9)), (200.0, 20.0));
        w.record(at(5.2), 0, 30);
        assert_eq!(w.rates(at(6.0)), (200.0 / 6.0, 50.0 / 6.0));
        // Ten seconds later the first bucket has left the window.
        let (p, g) = w.rates(at(10.5));
        assert_eq!((p, g), (0.0, 3.0));
        w.record(at(30.0), 7, 7);
        assert_eq!(w.buckets.len(), 1);
        assert_eq!(w.rates(at(40.0)), (0.0, 0.0));
    }

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
        assert_eq!(r.p50_time_to_first_token_ms, 100.0);
    }

    #[test]
    fn quantiles_by_nearest_rank() {
        let mut v: Vec<f64> = (1..=20).rev().map(f64::from).collect();
        assert_eq!(quantile(&mut v, 0.5), 10.0);
        assert_eq!(quantile(&mut v, 0.95), 19.0);
        assert_eq!(quantile(&mut v, 1.0), 20.0);
        assert_eq!(quantile(&mut [], 0.5), 0.0);
        assert_eq!(quantile(&mut [3.0], 0.95), 3.0);
    }
}
