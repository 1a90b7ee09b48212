//! The circuit breaker: stop asking a source that keeps failing.
//!
//! Closed, it counts consecutive transient failures; at the threshold it opens. Open, every fetch
//! is answered at once with [`refetch::FetchError::NotAttempted`] carrying the remaining cooldown,
//! so the engine neither loads the failing source nor spends the key's retry budget. After the
//! cooldown it half-opens and lets exactly one probe through: a probe that succeeds closes it, a
//! probe that fails opens it for another cooldown, a probe that is abandoned (its future dropped)
//! lets the next caller probe. Any answer that shows the source is alive (2xx, 304, 404, another
//! 4xx) counts as success; only transient failures count against it.
//!
//! Time is `tokio::time::Instant`, so tests can drive it with `tokio::time::pause`.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// A circuit breaker shared by all fetches of one source.
pub struct Breaker {
    threshold: u32,
    cooldown: Duration,
    state: Mutex<State>,
    on_change: Box<dyn Fn(bool) + Send + Sync>,
}

/// Permission to make one request; report its result with [`Pass::record`].
#[derive(Debug)]
#[must_use = "report the result with `record`"]
pub struct Pass {
    breaker: Option<Arc<Breaker>>,
    probe: bool,
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker")
            .field("threshold", &self.threshold)
            .field("cooldown", &self.cooldown)
            .field("state", &*self.lock())
            .finish()
    }
}

impl Breaker {
    /// A breaker that opens after `threshold` consecutive failures (0: never) for `cooldown`.
    /// `on_change(open)` is called whenever it opens (`true`) or closes (`false`).
    pub fn new(
        threshold: u32,
        cooldown: Duration,
        on_change: impl Fn(bool) + Send + Sync + 'static,
    ) -> Self {
        Breaker {
            threshold,
            cooldown,
            state: Mutex::new(State::Closed { failures: 0 }),
            on_change: Box::new(on_change),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ask for permission to make a request. `Err(retry_after)` when the breaker is open (or a
    /// probe is already out).
    pub fn admit(self: &Arc<Self>) -> Result<Pass, Duration> {
        if self.threshold == 0 {
            return Ok(Pass {
                breaker: None,
                probe: false,
            });
        }
        let mut state = self.lock();
        let now = Instant::now();
        match *state {
            State::Closed { .. } => Ok(Pass {
                breaker: Some(self.clone()),
                probe: false,
            }),
            State::Open { until } if now < until => Err(until - now),
            State::Open { .. } | State::HalfOpen { probing: false } => {
                *state = State::HalfOpen { probing: true };
                Ok(Pass {
                    breaker: Some(self.clone()),
                    probe: true,
                })
            }
            // A probe is out: check again after a short while.
            State::HalfOpen { probing: true } => Err(self
                .cooldown
                .min(Duration::from_secs(1))
                .max(Duration::from_millis(10))),
        }
    }

    /// Is the breaker open or half-open?
    pub fn is_open(&self) -> bool {
        !matches!(*self.lock(), State::Closed { .. })
    }

    fn settle(&self, success: bool, probe: bool) {
        let mut state = self.lock();
        let was_open = !matches!(*state, State::Closed { .. });
        let next = match (*state, success) {
            (_, true) if probe => State::Closed { failures: 0 },
            (State::Closed { .. }, true) => State::Closed { failures: 0 },
            (State::Closed { failures }, false) => {
                let failures = failures.saturating_add(1);
                if failures >= self.threshold {
                    State::Open {
                        until: Instant::now() + self.cooldown,
                    }
                } else {
                    State::Closed { failures }
                }
            }
            (State::HalfOpen { .. }, false) if probe => State::Open {
                until: Instant::now() + self.cooldown,
            },
            // Late results of requests admitted before the breaker opened do not move it.
            (other, _) => other,
        };
        *state = next;
        let is_open = !matches!(next, State::Closed { .. });
        drop(state);
        if is_open != was_open {
            (self.on_change)(is_open);
        }
    }
}

impl Pass {
    /// Report whether the source answered (`true`) or failed transiently (`false`).
    pub fn record(mut self, success: bool) {
        if let Some(b) = self.breaker.take() {
            b.settle(success, self.probe);
        }
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        // An abandoned probe: let the next caller probe.
        if let Some(b) = self.breaker.take()
            && self.probe
        {
            let mut state = b.lock();
            if *state == (State::HalfOpen { probing: true }) {
                *state = State::HalfOpen { probing: false };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn breaker(threshold: u32) -> (Arc<Breaker>, Arc<AtomicUsize>) {
        let changes = Arc::new(AtomicUsize::new(0));
        let c = changes.clone();
        let b = Breaker::new(threshold, Duration::from_secs(10), move |_| {
            c.fetch_add(1, Ordering::SeqCst);
        });
        (Arc::new(b), changes)
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_threshold_and_half_opens_for_one_probe() {
        let (b, changes) = breaker(3);
        for _ in 0..2 {
            b.admit().expect("closed").record(false);
        }
        b.admit().expect("closed").record(true);
        for _ in 0..3 {
            b.admit().expect("closed").record(false);
        }
        assert!(b.is_open());
        assert_eq!(changes.load(Ordering::SeqCst), 1);
        let wait = b.admit().expect_err("open");
        assert_eq!(wait, Duration::from_secs(10));
        tokio::time::advance(Duration::from_secs(10)).await;
        let probe = b.admit().expect("half-open probe");
        assert!(b.admit().is_err(), "only one probe at a time");
        probe.record(false);
        assert!(b.admit().is_err(), "failed probe reopens");
        tokio::time::advance(Duration::from_secs(10)).await;
        let probe = b.admit().expect("probe");
        drop(probe);
        let probe = b.admit().expect("abandoned probe lets another through");
        probe.record(true);
        assert!(!b.is_open());
        assert_eq!(changes.load(Ordering::SeqCst), 2);
        b.admit().expect("closed").record(true);
    }

    #[tokio::test]
    async fn zero_threshold_never_opens() {
        let (b, _) = breaker(0);
        for _ in 0..100 {
            b.admit().expect("always").record(false);
        }
        assert!(!b.is_open());
    }
}
