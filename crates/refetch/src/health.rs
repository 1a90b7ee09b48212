//! Source health and the gone-rate guard: sliding windows over recent fetch outcomes.
//!
//! Retry budgets must only be spent by attempts made while the source is healthy: when most keys
//! of a source fail, the source is down, and dead-lettering keys would turn an outage into data
//! loss (invariant 5). Likewise a burst of "gone" answers is more likely a misrouted URL or a
//! gateway during a deploy than a mass deletion, so deletes stop until the ratio drops or an
//! operator resets the guard (invariant 12).

use std::collections::VecDeque;

use crate::config::GoneGuardConfig;

/// A fixed-size window of boolean samples with a running count.
#[derive(Debug, Clone)]
struct Window {
    samples: VecDeque<bool>,
    hits: usize,
    capacity: usize,
}

impl Window {
    fn new(capacity: usize) -> Self {
        Window {
            samples: VecDeque::with_capacity(capacity.min(4096)),
            hits: 0,
            capacity: capacity.max(1),
        }
    }

    fn push(&mut self, hit: bool) {
        if self.samples.len() == self.capacity {
            if let Some(true) = self.samples.pop_front() {
                self.hits -= 1;
            }
        }
        self.samples.push_back(hit);
        if hit {
            self.hits += 1;
        }
    }

    fn ratio(&self) -> f64 {
        if self.samples.is_empty() {
            0.0
        } else {
            self.hits as f64 / self.samples.len() as f64
        }
    }

    fn len(&self) -> usize {
        self.samples.len()
    }

    fn clear(&mut self) {
        self.samples.clear();
        self.hits = 0;
    }
}

/// Tracks whether one source (entity type) fails for most keys.
#[derive(Debug, Clone)]
pub struct SourceHealth {
    failures: Window,
    unhealthy_ratio: f64,
    min_samples: usize,
}

impl SourceHealth {
    /// A tracker over the last `window` attempts.
    pub fn new(window: usize, unhealthy_ratio: f64) -> Self {
        SourceHealth {
            failures: Window::new(window),
            unhealthy_ratio,
            min_samples: (window / 5).max(5),
        }
    }

    /// Record an attempt that reached the source.
    pub fn record(&mut self, failed: bool) {
        self.failures.push(failed);
    }

    /// Does the source currently fail for most keys? Failures then spend no retry budget.
    pub fn is_failing(&self) -> bool {
        self.failures.len() >= self.min_samples && self.failures.ratio() > self.unhealthy_ratio
    }
}

/// The gone-rate guard.
///
/// Deletes need evidence: a "gone" outcome becomes a delete only while gone outcomes are a minority
/// of the recent window (at most `max_ratio`). With fewer than `min_samples` outcomes the guard
/// holds deletes that would push the ratio over the limit but does not yet trip; once the window
/// has `min_samples` outcomes and the ratio is abnormal it trips (readiness fails) until the ratio
/// drops or an operator resets it. A reset trusts gone outcomes again until the guard trips anew.
#[derive(Debug, Clone)]
pub struct GoneGuard {
    cfg: GoneGuardConfig,
    gone: Window,
    tripped: bool,
    trusted_after_reset: bool,
}

impl GoneGuard {
    /// A guard with `cfg`.
    pub fn new(cfg: GoneGuardConfig) -> Self {
        GoneGuard {
            cfg,
            gone: Window::new(cfg.window),
            tripped: false,
            trusted_after_reset: false,
        }
    }

    /// Record a fetch outcome. For a gone outcome, returns whether its delete must be held back.
    pub fn record(&mut self, gone: bool) -> bool {
        self.gone.push(gone);
        let abnormal = self.gone.ratio() > self.cfg.max_ratio;
        let judged = self.gone.len() >= self.cfg.min_samples;
        if judged && abnormal {
            self.tripped = true;
            self.trusted_after_reset = false;
        } else if self.tripped && judged {
            // The ratio dropped back below the threshold.
            self.tripped = false;
        }
        gone && (self.tripped || (abnormal && !self.trusted_after_reset))
    }

    /// Is the guard tripped (enough evidence of abnormal gone outcomes; readiness fails)?
    pub fn is_tripped(&self) -> bool {
        self.tripped
    }

    /// The current share of gone outcomes.
    pub fn ratio(&self) -> f64 {
        self.gone.ratio()
    }

    /// An operator's reset: forget the window and trust gone outcomes until the guard trips again.
    pub fn reset(&mut self) {
        self.gone.clear();
        self.tripped = false;
        self.trusted_after_reset = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_misrouted_template_deletes_nothing_and_trips_the_guard() {
        let mut g = GoneGuard::new(GoneGuardConfig {
            window: 100,
            min_samples: 50,
            max_ratio: 0.2,
        });
        for _ in 0..49 {
            assert!(
                g.record(true),
                "every delete is held while gone is the majority"
            );
            assert!(!g.is_tripped(), "needs min_samples before tripping");
        }
        assert!(g.record(true));
        assert!(g.is_tripped());
        for _ in 0..100 {
            assert!(!g.record(false));
        }
        assert!(!g.is_tripped());
        assert!(!g.record(true), "a rare delete among found outcomes passes");
        for _ in 0..60 {
            g.record(true);
        }
        assert!(g.is_tripped());
        g.reset();
        assert!(!g.is_tripped());
        assert!(!g.record(true), "after a reset, gone outcomes are trusted");
    }

    #[test]
    fn a_fresh_guard_holds_a_first_delete_until_there_is_evidence() {
        let mut g = GoneGuard::new(GoneGuardConfig::default());
        assert!(g.record(true), "the very first outcome is gone: held");
        for _ in 0..20 {
            g.record(false);
        }
        assert!(!g.record(true), "gone is now a minority: delete");
    }

    #[test]
    fn health_needs_a_majority_of_failures() {
        let mut h = SourceHealth::new(50, 0.5);
        for i in 0..50 {
            h.record(i % 3 == 0);
        }
        assert!(!h.is_failing());
        for _ in 0..50 {
            h.record(true);
        }
        assert!(h.is_failing());
    }
}
