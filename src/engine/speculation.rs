//! Speculative decoding's arithmetic, apart from any model: where proposals come from
//! (prompt lookup), how often a sequence's proposals are accepted, what verifying them costs,
//! and so how many to verify in a step, if any.
//!
//! Verification is exact whatever is proposed: the target samples every position with the
//! request's own sampler, in order, and keeps a proposed token only when it is the token the
//! target picked. Greedy output is therefore the target's own, and a seeded sampler draws the
//! same numbers in the same order as without speculation. (For a proposer that puts all its
//! probability on one token, as prompt lookup and a greedy draft do, this is the standard
//! acceptance rule: accept with probability p(token), otherwise sample from the rest.)
//!
//! Whether to speculate is decided per sequence and step from measurements: the plain step
//! time per generated token (which falls as the batch grows), the measured cost of each extra
//! verified token (on a CPU nearly a decode of its own; on bandwidth-bound hardware almost
//! nothing), and the sequence's acceptance rate. A proposal is verified only when its expected
//! accepted tokens are worth more than its cost, so a server with speculation enabled decodes
//! as fast as one without wherever speculation does not pay.

/// Longest suffix of the history looked up earlier in it.
const NGRAM_MAX: usize = 4;
/// Shortest suffix worth trusting: a single token repeats too often by chance.
const NGRAM_MIN: usize = 2;
/// History searched for a match (recent context is where edits repeat from).
const LOOKUP_WINDOW: usize = 8192;

/// Tokens that followed the most recent earlier occurrence of the history's last few tokens
/// (the longest suffix of `NGRAM_MAX` down to `NGRAM_MIN` that occurs), at most `max`.
pub fn ngram_proposal(history: &[i32], max: usize) -> Vec<i32> {
    let n = history.len();
    if max == 0 || n < NGRAM_MIN + 1 {
        return Vec::new();
    }
    let start = n.saturating_sub(LOOKUP_WINDOW);
    for len in (NGRAM_MIN..=NGRAM_MAX.min(n - 1)).rev() {
        let suffix = &history[n - len..];
        // Most recent occurrence that ends before the suffix itself and has a continuation.
        let found = (start..n - len)
            .rev()
            .find(|&i| &history[i..i + len] == suffix);
        if let Some(i) = found {
            let from = i + len;
            let to = (from + max).min(n);
            return history[from..to].to_vec();
        }
    }
    Vec::new()
}

/// A sequence's (or a model's) rate of accepting proposed tokens: the chance that a proposed
/// token is accepted given the ones before it were. Kept as decayed counts so it follows a
/// sequence whose text changes character (an edit that starts writing new code).
#[derive(Debug, Clone, Copy)]
pub struct Acceptance {
    accepted: f64,
    rejected: f64,
}

impl Acceptance {
    /// Weight of older observations per new one.
    const DECAY: f64 = 0.9;

    /// Starts from a prior of `rate` worth two observations.
    pub fn with_prior(rate: f64) -> Self {
        Self {
            accepted: 2.0 * rate,
            rejected: 2.0 * (1.0 - rate),
        }
    }

    /// One verification: `accepted` tokens kept, then a rejection unless the whole proposal
    /// was kept.
    pub fn observe(&mut self, accepted: usize, proposed: usize) {
        let rejected = usize::from(accepted < proposed);
        self.accepted = self.accepted * Self::DECAY + accepted as f64;
        self.rejected = self.rejected * Self::DECAY + rejected as f64;
    }

    /// Per-token acceptance probability.
    pub fn rate(&self) -> f64 {
        let total = self.accepted + self.rejected;
        if total <= 0.0 {
            0.0
        } else {
            (self.accepted / total).clamp(0.0, 0.98)
        }
    }
}

/// Expected tokens kept out of `k` proposed at per-token acceptance `p`: p + p² + … + pᵏ.
pub fn expected_accepted(p: f64, k: usize) -> f64 {
    (1..=k).map(|j| p.powi(j as i32)).sum()
}

/// What steps have cost, measured on this model and machine.
#[derive(Debug, Clone)]
pub struct SpecCosts {
    /// Moving average of a generate-only step without proposals, by generating sequences.
    plain_ms: Vec<Option<f64>>,
    /// Moving average of each verified proposal token's cost on top of a plain step.
    pub per_proposed_ms: Option<f64>,
    /// Steps since a proposal was last verified (to re-measure the cost now and then).
    since_measured: u32,
    /// `false`: verify every proposal, paying or not.
    adaptive: bool,
    /// Whether `per_proposed_ms` is a measurement yet (not the probe's placeholder).
    measured: bool,
    /// The outcome, by generating sequences: moving averages of ms per emitted token of
    /// plain steps and of steps that verified proposals (their proposing included), and
    /// steps seen. The cost model above can be wrong (a kernel that changes with the number
    /// of rows, a busy machine); these say what really happened.
    plain_per_token: Vec<Option<f64>>,
    spec_per_token: Vec<Option<f64>>,
    /// By generating sequences: steps since the losing kind was last tried, how many steps
    /// apart it is tried, and, while a try's outcome is awaited, whether the try was of
    /// proposals (the losing kind) or of plain steps.
    steps: Vec<u32>,
    explore_every: Vec<u32>,
    exploring: Vec<Option<bool>>,
}

/// A step with proposals is taken only when it is expected to gain at least this share.
const MARGIN: f64 = 1.15;
/// Steps with proposals must emit tokens at least this much cheaper than plain ones.
const OUTCOME_MARGIN: f64 = 0.97;
/// One step in this many tries the arm that is not winning, so both stay measured...
const EXPLORE_EVERY: u32 = 32;
/// ...and each try that does not change the verdict doubles the distance, up to this: a try
/// of a draft that loses costs its catch-up on everything since the last one, so trying
/// every 32 steps for good cost a fifth of the decode rate in measurements.
const EXPLORE_MAX: u32 = 1024;
/// After this many steps without verifying, a short proposal is verified anyway so that a
/// cost measured under other conditions (another batch size, a busier machine) is refreshed.
const REMEASURE_EVERY: u32 = 64;

impl SpecCosts {
    /// Costs for a model with up to `parallel` sequences; nothing measured yet. Not
    /// `adaptive`: every proposal is verified.
    pub fn new(parallel: usize, adaptive: bool) -> Self {
        Self {
            plain_ms: vec![None; parallel.max(1) + 1],
            per_proposed_ms: None,
            since_measured: 0,
            adaptive,
            measured: false,
            plain_per_token: vec![None; parallel.max(1) + 1],
            spec_per_token: vec![None; parallel.max(1) + 1],
            steps: vec![0; parallel.max(1) + 1],
            explore_every: vec![EXPLORE_EVERY; parallel.max(1) + 1],
            exploring: vec![None; parallel.max(1) + 1],
        }
    }

    /// Folds in what a generate-only step of `generating` sequences emitted: `emitted`
    /// tokens in `ms` (proposing included), with or without proposals.
    pub fn observe_outcome(
        &mut self,
        generating: usize,
        speculated: bool,
        emitted: usize,
        ms: f64,
    ) {
        if generating == 0 || emitted == 0 {
            return;
        }
        let g = generating.min(self.steps.len() - 1);
        let per = ms / emitted as f64;
        let before = self.verdict(g);
        let slot = if speculated {
            &mut self.spec_per_token[g]
        } else {
            &mut self.plain_per_token[g]
        };
        *slot = Some(slot.map_or(per, |o| 0.8 * o + 0.2 * per));
        // A try of the losing kind that left the verdict as it was: try it less often. One
        // that changed it: the conditions changed, so both kinds are watched closely again.
        if self.exploring[g].take() == Some(speculated) {
            let standing = before.is_some() && self.verdict(g) == before;
            let every = &mut self.explore_every[g];
            *every = if standing {
                every.saturating_mul(2).min(EXPLORE_MAX)
            } else {
                EXPLORE_EVERY
            };
        }
    }

    /// Whether steps with proposals have been emitting tokens cheaper than plain steps at
    /// batch size `g`, once both are measured.
    fn verdict(&self, g: usize) -> Option<bool> {
        match (self.plain_per_token[g], self.spec_per_token[g]) {
            (Some(plain), Some(spec)) => Some(spec < plain * OUTCOME_MARGIN),
            _ => None,
        }
    }

    /// Whether this step of `generating` sequences may verify proposals at all: once both
    /// kinds of step are measured at this batch size, only if proposals have been emitting
    /// tokens cheaper than plain steps, apart from a step now and then that tries the other
    /// kind ([`EXPLORE_EVERY`] apart, further while the tries do not change the verdict).
    pub fn step_allows(&mut self, generating: usize) -> bool {
        if !self.adaptive || generating == 0 {
            return true;
        }
        let g = generating.min(self.steps.len() - 1);
        self.steps[g] = self.steps[g].saturating_add(1);
        let explore = self.steps[g] >= self.explore_every[g];
        let allows = match (self.verdict(g), self.spec_per_token[g]) {
            (Some(speculate), _) => speculate != explore,
            // Speculating without a plain measurement at this size: measure one now and then.
            (None, Some(_)) => !explore,
            (None, None) => true,
        };
        if explore {
            self.steps[g] = 0;
            self.exploring[g] = Some(allows);
        }
        allows
    }

    /// Whether proposals are verified only where they pay.
    pub fn adaptive(&self) -> bool {
        self.adaptive
    }

    fn plain(&self, generating: usize) -> Option<f64> {
        let g = generating.min(self.plain_ms.len() - 1);
        // Nearest measured batch size at or below, else above.
        (1..=g)
            .rev()
            .chain(g + 1..self.plain_ms.len())
            .find_map(|i| self.plain_ms[i])
    }

    /// Folds in a generate-only step (no prompt tokens) of `generating` sequences that
    /// verified `proposed` extra tokens in `ms`.
    pub fn observe(&mut self, generating: usize, proposed: usize, ms: f64) {
        const KEEP: f64 = 0.8;
        let ema =
            |old: Option<f64>, new: f64| Some(old.map_or(new, |o| KEEP * o + (1.0 - KEEP) * new));
        if generating == 0 {
            return;
        }
        if proposed == 0 {
            let g = generating.min(self.plain_ms.len() - 1);
            self.plain_ms[g] = ema(self.plain_ms[g], ms);
            self.since_measured = self.since_measured.saturating_add(1);
        } else if let Some(base) = self.plain(generating) {
            let per = ((ms - base) / proposed as f64).max(0.0);
            // The first measurement replaces the probe's pessimistic placeholder.
            let old = self.per_proposed_ms.filter(|_| self.measured);
            self.per_proposed_ms = ema(old, per);
            self.measured = true;
            self.since_measured = 0;
        }
    }

    /// How many of `available` proposed tokens a sequence should have verified this step,
    /// with `generating` sequences in the step and acceptance `p` (0: none).
    pub fn choose(&mut self, generating: usize, available: usize, p: f64) -> usize {
        self.choose_with(generating, available, p, 0.0, 0.0)
    }

    /// [`Self::choose`] for proposals that cost something to make: `per_token_ms` for each
    /// proposed token and `fixed_ms` for the step (a draft model's passes and catching up).
    pub fn choose_with(
        &mut self,
        generating: usize,
        available: usize,
        p: f64,
        per_token_ms: f64,
        fixed_ms: f64,
    ) -> usize {
        if available == 0 || generating == 0 {
            return 0;
        }
        if !self.adaptive {
            return available;
        }
        let Some(plain) = self.plain(generating) else {
            return 0; // nothing measured yet: decode plainly first
        };
        let per_token = plain / generating as f64;
        // A probe's making alone (verification free) must be worth what it could gain, or
        // there is nothing to learn: a draft that has to catch up on a long prompt first.
        let could_pay =
            |k: usize| k as f64 * per_token > MARGIN * (k as f64 * per_token_ms + fixed_ms);
        let Some(cost) = self.per_proposed_ms else {
            if !could_pay(available.min(2)) {
                return 0;
            }
            // Never measured: one short probe, once a plain step is known.
            self.since_measured = 0;
            self.per_proposed_ms = Some(plain); // pessimistic until the probe reports
            return available.min(2);
        };
        let gain = |k: usize| {
            expected_accepted(p, k) * per_token
                - MARGIN * (k as f64 * (cost + per_token_ms) + fixed_ms)
        };
        let best = (1..=available)
            .map(|k| (k, gain(k)))
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .filter(|&(_, g)| g > 0.0)
            .map_or(0, |(k, _)| k);
        if best == 0 && self.since_measured >= REMEASURE_EVERY && p > 0.5 && could_pay(1) {
            self.since_measured = 0;
            return 1;
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_continues_the_most_recent_repeat() {
        // "a b c d e ... a b c" proposes "d e".
        let h = [1, 2, 3, 4, 5, 9, 9, 1, 2, 3];
        assert_eq!(ngram_proposal(&h, 2), vec![4, 5]);
        assert_eq!(ngram_proposal(&h, 10), vec![4, 5, 9, 9, 1, 2, 3]);
        // The most recent occurrence wins.
        let h = [1, 2, 7, 0, 1, 2, 8, 0, 1, 2];
        assert_eq!(ngram_proposal(&h, 1), vec![8]);
        // No repeat of at least two tokens: nothing.
        assert!(ngram_proposal(&[1, 2, 3, 4, 5, 3], 4).is_empty());
        assert!(ngram_proposal(&[1, 2], 4).is_empty());
        assert!(ngram_proposal(&h, 0).is_empty());
    }

    #[test]
    fn acceptance_follows_what_is_observed() {
        let mut a = Acceptance::with_prior(0.5);
        for _ in 0..40 {
            a.observe(4, 4);
        }
        assert!(a.rate() > 0.9, "{}", a.rate());
        for _ in 0..40 {
            a.observe(0, 3);
        }
        assert!(a.rate() < 0.1, "{}", a.rate());
        assert!((expected_accepted(0.5, 2) - 0.75).abs() < 1e-9);
    }

    #[test]
    fn speculates_only_where_it_pays() {
        // Bandwidth-bound hardware: a step costs the same with a few more tokens.
        let mut gpu = SpecCosts::new(8, true);
        assert_eq!(gpu.choose(1, 4, 0.8), 0, "nothing measured: plain first");
        gpu.observe(1, 0, 10.0);
        assert_eq!(gpu.choose(1, 4, 0.8), 2, "then one probe");
        gpu.observe(1, 2, 10.4);
        assert!(gpu.per_proposed_ms.unwrap() < 1.0);
        assert_eq!(gpu.choose(1, 4, 0.8), 4);
        assert_eq!(
            gpu.choose(1, 4, 0.01),
            0,
            "too rare to pay even for cheap verification"
        );

        // Two CPU cores: every verified token costs almost a decode of its own.
        let mut cpu = SpecCosts::new(8, true);
        cpu.observe(1, 0, 60.0);
        assert_eq!(cpu.choose(1, 4, 0.8), 2);
        for _ in 0..20 {
            cpu.observe(1, 2, 60.0 + 2.0 * 55.0);
        }
        assert_eq!(cpu.choose(1, 4, 0.8), 0);
        // Even a perfect acceptance does not pay for 55 ms a token against 60 ms steps...
        assert_eq!(cpu.choose(1, 4, 0.9), 0);
        // ...and a large batch makes each plain token cheap, so nothing pays there either.
        cpu.observe(6, 0, 80.0);
        assert_eq!(cpu.choose(6, 4, 0.9), 0);
        // Now and then a one-token probe re-measures the cost, when acceptance is high.
        for _ in 0..REMEASURE_EVERY {
            cpu.observe(1, 0, 60.0);
        }
        assert_eq!(cpu.choose(1, 4, 0.9), 1);
        assert_eq!(cpu.choose(1, 4, 0.9), 0);
        // What really happened overrules the model: proposals that emitted tokens dearer
        // than plain steps stop, apart from one exploring step in 32.
        let mut out = SpecCosts::new(8, true);
        assert!(out.step_allows(1));
        out.observe_outcome(1, false, 1, 60.0);
        out.observe_outcome(1, true, 3, 240.0);
        let allowed = (0..64).filter(|_| out.step_allows(1)).count();
        assert_eq!(allowed, 2);
        out.observe_outcome(1, true, 4, 120.0);
        for _ in 0..10 {
            out.observe_outcome(1, true, 4, 120.0);
        }
        // (The first of these outcomes answered a try that left the verdict standing, so
        // the next try of plain steps comes 64 steps after the last, not 32.)
        let allowed = (0..64).filter(|_| out.step_allows(1)).count();
        assert_eq!(allowed, 63);
        // Tries that do not change the verdict come ever further apart, up to a limit, and
        // one that changes it brings them back to every 32 steps.
        let mut back = SpecCosts::new(8, true);
        back.observe_outcome(2, false, 2, 100.0);
        back.observe_outcome(2, true, 3, 300.0);
        let mut gaps = Vec::new();
        let mut last = 0;
        for step in 1..=4000u32 {
            if back.step_allows(2) {
                gaps.push(step - last);
                last = step;
                back.observe_outcome(2, true, 3, 300.0);
            } else {
                back.observe_outcome(2, false, 2, 100.0);
            }
        }
        assert_eq!(gaps[..6], [32, 64, 128, 256, 512, 1024], "{gaps:?}");
        assert_eq!(gaps[6], 1024);
        assert!(!back.step_allows(2));
        back.observe_outcome(2, false, 2, 100.0);
        for _ in 0..1100 {
            if back.step_allows(2) {
                break;
            }
        }
        for _ in 0..20 {
            // Proposals now pay (the tried step, then steps the new verdict allows).
            back.observe_outcome(2, true, 6, 120.0);
        }
        assert!(back.step_allows(2), "the verdict follows what happens");
        // Not adaptive: everything is verified.
        assert_eq!(SpecCosts::new(8, false).choose(6, 4, 0.0), 4);
        // What proposals cost to make counts: a draft pass of 5 ms a token on fast hardware
        // still pays at high acceptance; a long catch-up on the draft does not.
        assert_eq!(gpu.choose_with(1, 4, 0.9, 1.0, 0.0), 4);
        assert_eq!(gpu.choose_with(1, 4, 0.9, 1.0, 500.0), 0);
        // Nor is a draft probed, or re-measured, when making its proposals alone costs more
        // than they could gain (two CPU cores: the catch-up on a 250-token prompt).
        let mut fresh = SpecCosts::new(8, true);
        fresh.observe(1, 0, 63.0);
        assert_eq!(fresh.choose_with(1, 8, 0.5, 43.0, 1000.0), 0);
        assert_eq!(
            fresh.choose_with(1, 8, 0.5, 60.0, 0.0),
            0,
            "60 ms a token against 63"
        );
        assert_eq!(
            fresh.choose_with(1, 8, 0.5, 5.0, 10.0),
            2,
            "a cheap draft is probed"
        );
    }
}
