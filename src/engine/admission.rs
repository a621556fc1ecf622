//! Which waiting request a free sequence takes next, kept free of I/O so every rule is
//! unit-tested: the person at the keyboard goes before the bots' heartbeats, a request that has
//! waited long enough is aged up so nothing starves, and within one priority the client with
//! the fewest running sequences goes first, so a client sending twenty requests at once does
//! not take every sequence from another one. Oldest first among equals (what FIFO did).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A request's priority as vLLM reads it: lower runs first; 0 when nothing says otherwise.
pub type Priority = i32;

/// Waiting this long betters a request's effective priority by one step, so under constant
/// higher-priority load a low one is admitted within the step times the gap between them.
/// One process-wide setting (`requests.priority_aging_seconds`), read by every scheduler.
static AGE_STEP_MS: AtomicU64 = AtomicU64::new(10_000);

/// Sets the aging step (at startup, from the config).
pub fn set_age_step(step: Duration) {
    AGE_STEP_MS.store((step.as_millis() as u64).max(1), Ordering::Relaxed);
}

fn age_step_ms() -> u64 {
    AGE_STEP_MS.load(Ordering::Relaxed)
}

/// Priority named by the `x-priority` header (the first Python Opta-LMX's lanes) or a number.
pub fn parse_priority(text: &str) -> Option<Priority> {
    match text.trim().to_ascii_lowercase().as_str() {
        "high" | "interactive" => Some(-10),
        "normal" | "default" => Some(0),
        "low" | "background" | "batch" => Some(10),
        n => n.parse::<i64>().ok().map(clamp),
    }
}

/// A body's `priority` (any JSON integer) in the engine's range.
pub fn clamp(p: i64) -> Priority {
    p.clamp(-1_000_000, 1_000_000) as Priority
}

/// One waiting request, as admission sees it.
#[derive(Debug, Clone, Copy)]
pub struct Waiting<'a> {
    pub priority: Priority,
    pub client: &'a str,
    pub since: Instant,
}

impl Waiting<'_> {
    /// The priority after aging: one step better per aging step waited.
    pub fn effective(&self, now: Instant) -> i64 {
        let waited = now.saturating_duration_since(self.since).as_millis() as u64;
        let steps = waited / age_step_ms();
        i64::from(self.priority) - steps as i64
    }
}

/// The index in `queue` to admit next, or `None` when it is empty. `running` names the
/// client of every running sequence.
pub fn next(queue: &[Waiting<'_>], running: &[&str], now: Instant) -> Option<usize> {
    let share = |client: &str| running.iter().filter(|c| **c == client).count();
    queue
        .iter()
        .enumerate()
        .min_by_key(|(i, w)| (w.effective(now), share(w.client), w.since, *i))
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(priority: Priority, client: &str, age_s: u64, now: Instant) -> Waiting<'_> {
        Waiting {
            priority,
            client,
            since: now - Duration::from_secs(age_s),
        }
    }

    #[test]
    fn lower_priority_numbers_go_first_then_the_oldest() {
        let now = Instant::now();
        let q = [
            w(0, "bot", 5, now),
            w(-10, "me", 1, now),
            w(0, "bot", 6, now),
        ];
        assert_eq!(next(&q, &[], now), Some(1));
        let q = [w(0, "bot", 5, now), w(0, "bot", 6, now)];
        assert_eq!(next(&q, &[], now), Some(1));
        assert_eq!(next(&[], &[], now), None);
    }

    #[test]
    fn a_request_that_waited_is_aged_up() {
        let now = Instant::now();
        // Priority 10 waiting 105 s counts as 0, ahead of a fresh 0 that is younger.
        let q = [w(0, "me", 0, now), w(10, "cron", 105, now)];
        assert_eq!(next(&q, &[], now), Some(1));
        // Waiting 95 s it is still behind.
        let q = [w(0, "me", 0, now), w(10, "cron", 95, now)];
        assert_eq!(next(&q, &[], now), Some(0));
    }

    #[test]
    fn within_a_priority_the_client_with_fewer_running_sequences_goes_first() {
        let now = Instant::now();
        // The flooder's request is older, but it already runs three sequences.
        let q = [w(0, "flood", 9, now), w(0, "quiet", 1, now)];
        assert_eq!(next(&q, &["flood", "flood", "flood"], now), Some(1));
        // Equal shares: the oldest.
        assert_eq!(next(&q, &["flood", "quiet"], now), Some(0));
        // Priority still comes before share.
        let q = [w(-1, "flood", 0, now), w(0, "quiet", 9, now)];
        assert_eq!(next(&q, &["flood", "flood"], now), Some(0));
    }

    #[test]
    fn header_names_and_numbers_parse() {
        assert_eq!(parse_priority("High"), Some(-10));
        assert_eq!(parse_priority(" low "), Some(10));
        assert_eq!(parse_priority("normal"), Some(0));
        assert_eq!(parse_priority("-3"), Some(-3));
        assert_eq!(parse_priority("99999999999"), Some(1_000_000));
        assert_eq!(parse_priority("urgent!"), None);
    }
}
