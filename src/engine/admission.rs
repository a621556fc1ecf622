//! Which waiting request a free sequence takes next, kept free of I/O so every rule is
//! unit-tested: the person at the keyboard goes before the bots' heartbeats, a request that has
//! waited long enough is aged up so nothing starves, and within one priority the client with
//! the fewest running sequences goes first, so a client sending twenty requests at once does
//! not take every sequence from another one. Oldest first among equals (what FIFO did).
//!
//! Aging counts from a request's arrival or from the last time its client got a sequence at
//! that priority, whichever is later: a client being served is not starving, so a flood of
//! its requests does not age past a quiet client's one.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
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

/// Whether priorities, client shares and preemption apply (`requests.priorities`); off, every
/// scheduler is first come, first served (the baseline the priority benchmark measures).
static PRIORITIES_ON: AtomicBool = AtomicBool::new(true);

/// Turns priorities on or off (at startup, from the config).
pub fn set_priorities(on: bool) {
    PRIORITIES_ON.store(on, Ordering::Relaxed);
}

fn priorities_on() -> bool {
    PRIORITIES_ON.load(Ordering::Relaxed)
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
    /// When it arrived: the oldest goes first among equals.
    pub since: Instant,
    /// Where its aging counts from (see [`Served::aging_from`]).
    pub aging_from: Instant,
}

impl Waiting<'_> {
    /// The priority after aging (see [`effective`]).
    pub fn effective(&self, now: Instant) -> i64 {
        effective(self.priority, self.aging_from, now)
    }
}

/// A priority after aging from `aging_from` until `now`: one step better per aging step.
/// What orders the queue, and a request's standing when it gets its sequence.
pub fn effective(priority: Priority, aging_from: Instant, now: Instant) -> i64 {
    let waited = now.saturating_duration_since(aging_from).as_millis() as u64;
    let steps = waited / age_step_ms();
    i64::from(priority) - steps as i64
}

/// When each client last got a sequence, by priority: where its waiting requests' aging
/// starts. One per scheduler; looked up by name, so ordering the queue clones nothing.
#[derive(Debug, Default)]
pub struct Served {
    by_priority: HashMap<Priority, HashMap<Arc<str>, Instant>>,
    entries: usize,
}

impl Served {
    /// Clients are bounded upstream (64 names, `other`, the configured ones); this bounds the
    /// map whatever the priorities asked.
    const MOST: usize = 4096;

    /// Notes that `client` got a sequence for a request of `priority` at `now`.
    pub fn admitted(&mut self, client: &Arc<str>, priority: Priority, now: Instant) {
        if self.entries >= Self::MOST {
            self.by_priority.clear();
            self.entries = 0;
        }
        let clients = self.by_priority.entry(priority).or_default();
        if clients.insert(Arc::clone(client), now).is_none() {
            self.entries += 1;
        }
    }

    /// Where aging starts for a request of `client` at `priority` that arrived at `since`.
    pub fn aging_from(&self, client: &str, priority: Priority, since: Instant) -> Instant {
        match self.by_priority.get(&priority).and_then(|c| c.get(client)) {
            Some(&last) => last.max(since),
            None => since,
        }
    }
}

/// The index in `queue` to admit next, or `None` when it is empty. `running` names the
/// client of every running sequence.
pub fn next(queue: &[Waiting<'_>], running: &[&str], now: Instant) -> Option<usize> {
    if !priorities_on() {
        return queue
            .iter()
            .enumerate()
            .min_by_key(|(i, w)| (w.since, *i))
            .map(|(i, _)| i);
    }
    let share = |client: &str| running.iter().filter(|c| **c == client).count();
    queue
        .iter()
        .enumerate()
        .min_by_key(|(i, w)| (w.effective(now), share(w.client), w.since, *i))
        .map(|(i, _)| i)
}

/// The order in which `queue` would be admitted as sequences free, if nothing else arrived:
/// indices into `queue`, first to go first. Each admitted one counts as running for the
/// client shares of the rest. What `GET /v1/queue` reports as positions.
pub fn order(queue: &[Waiting<'_>], running: &[&str], now: Instant) -> Vec<usize> {
    let mut left: Vec<usize> = (0..queue.len()).collect();
    let mut running: Vec<&str> = running.to_vec();
    let mut out = Vec::with_capacity(queue.len());
    while !left.is_empty() {
        let rest: Vec<Waiting<'_>> = left.iter().map(|&i| queue[i]).collect();
        let Some(k) = next(&rest, &running, now) else {
            break;
        };
        let i = left.remove(k);
        running.push(queue[i].client);
        out.push(i);
    }
    out
}

/// One running sequence, as preemption sees it.
#[derive(Debug, Clone, Copy)]
pub struct Running<'a> {
    pub client: &'a str,
    /// Its effective priority when it was admitted (or resumed): a request that got its
    /// sequence by aging keeps that standing, so fresh requests of the priority it aged to
    /// cannot take the sequence back from it.
    pub standing: i64,
    /// When it was admitted or resumed: among equals, the latest is paused (it has the least
    /// of its answer out, so its client notices least).
    pub admitted: Instant,
    /// Whether it can be paused now (not mid-way through a grammar pick or a prefix copy).
    pub pausable: bool,
}

/// The running sequence to pause so a waiting request of `client` at `priority` (its own, not
/// aged: aging orders the queue but never takes a sequence from anyone) can run now. First by
/// priority: the one with the worst standing, if that is strictly worse than `priority`.
/// Else by share: a sequence of no better standing whose client runs at least two more than
/// `client` does (so the move cannot be undone by the same rule), from the client running the
/// most. The latest admitted among equals. `None` with priorities off.
pub fn victim(priority: Priority, client: &str, running: &[Running<'_>]) -> Option<usize> {
    if !priorities_on() {
        return None;
    }
    let by_priority = running
        .iter()
        .enumerate()
        .filter(|(_, r)| r.pausable && r.standing > i64::from(priority))
        .max_by_key(|(_, r)| (r.standing, r.admitted))
        .map(|(i, _)| i);
    if by_priority.is_some() {
        return by_priority;
    }
    let share = |c: &str| running.iter().filter(|r| r.client == c).count();
    let mine = share(client);
    running
        .iter()
        .enumerate()
        .filter(|(_, r)| {
            r.pausable && r.standing >= i64::from(priority) && share(r.client) >= mine + 2
        })
        .max_by_key(|(_, r)| (share(r.client), r.admitted))
        .map(|(i, _)| i)
}

/// Whether a request of `standing` goes before every stream of `than` (the best standing
/// among them), so its prompt may take whole steps. Never with priorities off.
pub fn outranks(standing: i64, than: i64) -> bool {
    priorities_on() && standing < than
}

/// A request with prompt left to compute, as [`prefill_order`] sees it.
#[derive(Debug, Clone, Copy)]
pub struct Prefilling<'a> {
    pub standing: i64,
    pub client: &'a str,
    pub since: Instant,
    /// Prompt tokens still to compute (a mostly cached prompt has few).
    pub left: usize,
}

/// Prompt tokens a waiting prefill is credited per second it has waited: shortest first
/// would leave a long cold prompt behind every short one that keeps arriving; with this, one
/// that has waited `left / AGING_TOKENS_PER_S` seconds goes before any newcomer.
pub const AGING_TOKENS_PER_S: usize = 256;

impl Prefilling<'_> {
    /// Shortest remaining prefill first, less what waiting has earned.
    fn aged_left(&self, now: Instant) -> usize {
        let waited_ms = now.saturating_duration_since(self.since).as_millis() as usize;
        self.left
            .saturating_sub(waited_ms.saturating_mul(AGING_TOKENS_PER_S) / 1000)
    }
}

/// The order in which requests that are prefilling share a step's prompt budget: better
/// standing first; within one, each client's shortest before anyone's second (prefill is
/// shared between clients, not between requests); then shortest remaining prefill, aged (a
/// request whose prompt is mostly cached, or short, starts decoding within a step or two even
/// beside long cold prompts, and those still get their turn); then the oldest. With priorities
/// off: oldest first, as before.
pub fn prefill_order(prefilling: &[Prefilling], now: Instant) -> Vec<usize> {
    let mut order: Vec<usize> = (0..prefilling.len()).collect();
    if !priorities_on() {
        order.sort_by_key(|&i| (prefilling[i].since, i));
        return order;
    }
    let key = |i: usize| (prefilling[i].aged_left(now), prefilling[i].since, i);
    // Each request's rank among its client's prefilling requests.
    let rank = |i: usize| {
        prefilling
            .iter()
            .enumerate()
            .filter(|&(j, p)| p.client == prefilling[i].client && key(j) < key(i))
            .count()
    };
    order.sort_by_cached_key(|&i| (prefilling[i].standing, rank(i), key(i)));
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(priority: Priority, client: &str, age_s: u64, now: Instant) -> Waiting<'_> {
        Waiting {
            priority,
            client,
            since: now - Duration::from_secs(age_s),
            aging_from: now - Duration::from_secs(age_s),
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

    fn r(standing: i64, admitted_s_ago: u64, pausable: bool, now: Instant) -> Running<'static> {
        rc("bot", standing, admitted_s_ago, pausable, now)
    }

    fn rc(
        client: &str,
        standing: i64,
        admitted_s_ago: u64,
        pausable: bool,
        now: Instant,
    ) -> Running<'_> {
        Running {
            client,
            standing,
            admitted: now - Duration::from_secs(admitted_s_ago),
            pausable,
        }
    }

    #[test]
    fn the_worst_running_standing_is_paused_only_for_a_strictly_better_priority() {
        let now = Instant::now();
        let running = [
            r(0, 50, true, now),
            r(10, 40, true, now),
            r(10, 5, true, now),
            r(-10, 1, true, now),
        ];
        // The two lows: the one admitted last.
        assert_eq!(victim(-10, "me", &running), Some(2));
        assert_eq!(victim(0, "me", &running), Some(2));
        // Nothing is worse than a low request's own priority, and its client runs them all.
        assert_eq!(victim(10, "bot", &running), None);
        // A sequence mid-way through a grammar pick is left alone.
        let running = [r(0, 50, true, now), r(10, 5, false, now)];
        assert_eq!(victim(-10, "me", &running), Some(0));
        // A low request that aged to -10 before it got its sequence keeps it against a fresh
        // high one.
        assert_eq!(victim(-10, "me", &[r(-10, 3, true, now)]), None);
        assert_eq!(victim(-10, "me", &[]), None);
    }

    #[test]
    fn a_client_running_two_more_than_another_gives_it_a_sequence() {
        let now = Instant::now();
        let running = [
            rc("flood", 0, 9, true, now),
            rc("flood", 0, 8, true, now),
            rc("flood", 0, 7, true, now),
            rc("one", 0, 6, true, now),
        ];
        // A quiet client running none takes the flooder's latest.
        assert_eq!(victim(0, "quiet", &running), Some(2));
        // A client running one is two behind the flooder: it takes one too.
        assert_eq!(victim(0, "one", &running), Some(2));
        // The flooder itself takes nothing; a worse priority takes nothing by share.
        assert_eq!(victim(0, "flood", &running), None);
        assert_eq!(victim(5, "quiet", &running), None);
        // Two against one: no move (it would only swap who runs more).
        let running = [rc("a", 0, 9, true, now), rc("b", 0, 8, true, now)];
        assert_eq!(victim(0, "a", &running), None);
        // A flood request that aged into its sequence keeps it.
        let running = [rc("flood", -1, 9, true, now), rc("flood", -1, 8, true, now)];
        assert_eq!(victim(0, "quiet", &running), None);
    }

    #[test]
    fn a_client_being_served_does_not_age() {
        let now = Instant::now();
        let mut served = Served::default();
        let (flood, quiet): (Arc<str>, Arc<str>) = (Arc::from("flood"), Arc::from("quiet"));
        let long_ago = now - Duration::from_secs(300);
        // The flooder got a sequence a second ago: its 300 s old request ages from then.
        served.admitted(&flood, 0, now - Duration::from_secs(1));
        assert_eq!(
            served.aging_from(&flood, 0, long_ago),
            now - Duration::from_secs(1)
        );
        // Not at another priority, and not another client.
        assert_eq!(served.aging_from(&flood, 10, long_ago), long_ago);
        assert_eq!(served.aging_from(&quiet, 0, long_ago), long_ago);
        // A request that arrived after the last admission ages from its arrival.
        assert_eq!(served.aging_from(&flood, 0, now), now);
    }

    #[test]
    fn prefill_goes_by_standing_then_one_request_per_client_then_shortest() {
        let now = Instant::now();
        let p = |standing, client, age_s: u64, left| Prefilling {
            standing,
            client,
            since: now - Duration::from_secs(age_s),
            left,
        };
        let q = [
            p(0, "flood", 3, 800),
            p(0, "flood", 2, 900),
            p(0, "flood", 1, 1000),
            p(0, "quiet", 1, 2000),
            p(-10, "me", 0, 5000),
        ];
        // The person first; then each client's first (the flooder's shortest, then the quiet
        // one's); then the flooder's others.
        assert_eq!(prefill_order(&q, now), [4, 0, 3, 1, 2]);
        // Between clients at one standing: a mostly cached prompt (1 token left) and a short
        // one go before two cold 8k prompts that came first.
        let q = [
            p(0, "bot1", 4, 8000),
            p(0, "bot2", 3, 8000),
            p(0, "bot3", 0, 1),
            p(0, "bot4", 0, 226),
        ];
        assert_eq!(prefill_order(&q, now), [2, 3, 0, 1]);
        // Aging: a cold prompt that has waited long enough goes before a fresh short one.
        let waited = 8000 / AGING_TOKENS_PER_S as u64 + 1;
        let q = [p(0, "bot1", waited, 8000), p(0, "bot2", 0, 226)];
        assert_eq!(prefill_order(&q, now), [0, 1]);
    }

    #[test]
    fn the_queue_order_interleaves_clients_within_a_priority() {
        let now = Instant::now();
        let q = [
            w(0, "flood", 9, now),
            w(0, "flood", 8, now),
            w(0, "flood", 7, now),
            w(0, "quiet", 1, now),
            w(-10, "me", 0, now),
        ];
        // The person; then the flooder's oldest (nobody runs yet), the quiet client's one
        // (it runs none), then the flooder's others.
        assert_eq!(order(&q, &[], now), [4, 0, 3, 1, 2]);
        // With the flooder already running two, the quiet one goes before its first.
        assert_eq!(order(&q, &["flood", "flood"], now), [4, 3, 0, 1, 2]);
        assert!(order(&[], &["x"], now).is_empty());
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
