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

/// The wall-clock time now, in milliseconds since the Unix epoch (0 if the clock is before it).
pub fn wall_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Maps tokio instants to ticks.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: tokio::time::Instant,
    /// The wall-clock time of the origin, in milliseconds since the Unix epoch.
    wall_origin_ms: i64,
}

impl Clock {
    /// A clock starting now.
    pub fn start() -> Self {
        Clock {
            origin: tokio::time::Instant::now(),
            wall_origin_ms: wall_now_ms(),
        }
    }

    /// The wall-clock time of `Tick(0)`, in milliseconds since the Unix epoch. Under a paused
    /// tokio clock, ticks advance with tokio's time and the wall time they stand for with them.
    pub fn wall_origin_ms(&self) -> i64 {
        self.wall_origin_ms
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
