//! Engine time: compact millisecond ticks on a monotonic clock.
//!
//! Debounce deadlines run on the wall clock (not on stream time, which stops when traffic stops).
//! The engine takes `now` from its caller, so tests drive it with a paused tokio clock or plain
//! numbers.

use std::time::Duration;

/// Milliseconds since the engine started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Tick(pub u64);

impl Tick {
    /// `self` plus `ms` milliseconds, saturating.
    pub fn plus(self, ms: u64) -> Tick {
        Tick(self.0.saturating_add(ms))
    }

    /// `self` plus a duration.
    pub fn after(self, d: Duration) -> Tick {
        self.plus(millis(d))
    }

    /// Time from `earlier` to `self` (zero if `earlier` is later).
    pub fn since(self, earlier: Tick) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

/// A duration in whole milliseconds, saturating.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Maps tokio instants to ticks.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: tokio::time::Instant,
}

impl Clock {
    /// A clock starting now.
    pub fn start() -> Self {
        Clock {
            origin: tokio::time::Instant::now(),
        }
    }

    /// The current tick.
    pub fn now(&self) -> Tick {
        Tick(millis(self.origin.elapsed()))
    }

    /// The instant of a tick.
    pub fn instant(&self, t: Tick) -> tokio::time::Instant {
        self.origin + Duration::from_millis(t.0)
    }
}
