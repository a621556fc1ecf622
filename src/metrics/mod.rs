//! What the server measures about itself, in two views: the rolling figures and history that
//! `/admin/status` and the status page show ([`rolling`]), and the Prometheus families that
//! `/metrics` exposes ([`exporter`]). Both are fed from the same few places (one finished
//! generation, one HTTP request, one load or unload), so they cannot disagree.

pub mod benchmarks;
pub mod events;
pub mod exporter;
pub mod rolling;

use std::sync::Arc;
use std::time::Duration;

pub use exporter::Prometheus;
pub use rolling::{HistoryPoint, PerformanceReport, RateWindow, RATE_WINDOW_SECS};

use crate::engine::Usage;

/// Cheap-to-clone handle to every figure the server keeps.
#[derive(Clone, Default)]
pub struct Metrics {
    rolling: Arc<rolling::Rolling>,
    prom: Arc<Prometheus>,
    events: Arc<events::Events>,
}

impl Metrics {
    /// Records one finished generation of `model`; `ttft` is from admission to the first
    /// token and `total` from admission to the end.
    pub fn record_completion(
        &self,
        model: &str,
        finish_reason: &str,
        usage: &Usage,
        ttft: Duration,
        total: Duration,
    ) {
        self.rolling.record(usage, ttft, total);
        self.prom
            .record_completion(model, finish_reason, usage, ttft, total);
    }

    /// Current rolling figures.
    pub fn report(&self) -> PerformanceReport {
        self.rolling.report()
    }

    /// Throughput and time to first token per interval over the last minutes, oldest first.
    pub fn history(&self) -> Vec<HistoryPoint> {
        self.rolling.history()
    }

    /// The Prometheus families.
    pub fn prometheus(&self) -> &Prometheus {
        &self.prom
    }

    /// The admin event stream.
    pub fn events(&self) -> &events::Events {
        &self.events
    }
}
