//! Measuring a contender from the inside: notification-to-durable latency and durable versions.
//!
//! Every contender reports the moment it *received* a notification `(id, version)` and the moment
//! a write of `id` at a version `w` became *durable* (the sink acknowledged it, after `fsync` for
//! JSON Lines). A notification's latency is the time from its receipt to the first durable write
//! of its entity at a version `>= its version`; a notification that arrives when such a write is
//! already durable counts as zero. The same definition applies to every contender.
//!
//! Latencies go into a log-bucketed histogram (2% resolution, fixed size), so the probe's memory
//! does not grow with N; what does grow is the list of notifications still waiting for a write,
//! which is bounded by what the contender holds in flight.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

const GROWTH: f64 = 1.02;
const BUCKETS: usize = 1200;

/// A fixed-size latency histogram (microseconds, 2% buckets).
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
        }
    }
}

impl Histogram {
    /// Record one latency.
    pub fn record(&mut self, micros: u64) {
        let i = ((micros as f64 + 1.0).ln() / GROWTH.ln()) as usize;
        self.counts[i.min(BUCKETS - 1)] += 1;
        self.total += 1;
    }

    /// How many latencies were recorded.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// The `q` quantile (0..=1) in milliseconds, `None` when empty.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                // Upper edge of the bucket.
                let micros = GROWTH.powi(i as i32 + 1) - 1.0;
                return Some(micros / 1000.0);
            }
        }
        None
    }
}

#[derive(Debug, Default)]
struct State {
    durable: HashMap<String, i64>,
    waiting: HashMap<String, Vec<(i64, Instant)>>,
    latency: Histogram,
    first_receive: Option<Instant>,
    received: u64,
}

/// Receipts and durable writes of one contender.
#[derive(Debug, Default)]
pub struct Probe {
    state: Mutex<State>,
    /// Keep no per-notification state (no latency): for peak-RSS runs, where the probe's own
    /// memory (one entry per notification awaiting its write) would be counted as the contender's.
    no_latency: bool,
}

/// What a probe measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProbeSummary {
    /// Notifications received.
    pub received: u64,
    /// Latencies recorded (notifications covered by a durable write).
    pub satisfied: u64,
    /// p50 notification-to-durable latency, ms.
    pub p50_ms: Option<f64>,
    /// p99, ms.
    pub p99_ms: Option<f64>,
    /// Notifications still waiting for a covering write.
    pub waiting: u64,
}

impl Probe {
    /// A probe that only counts receipts and records durable versions (no latency figures).
    pub fn without_latency() -> Self {
        Probe {
            no_latency: true,
            ..Probe::default()
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A notification for `id` at `version` was received now.
    pub fn received(&self, id: &str, version: i64) {
        let now = Instant::now();
        let mut s = self.lock();
        s.received += 1;
        s.first_receive.get_or_insert(now);
        if self.no_latency {
            return;
        }
        if s.durable.get(id).is_some_and(|&d| d >= version) {
            s.latency.record(0);
            return;
        }
        s.waiting
            .entry(id.to_owned())
            .or_default()
            .push((version, now));
    }

    /// A write of `id` at `version` is durable now.
    pub fn durable(&self, id: &str, version: i64) {
        let now = Instant::now();
        let mut s = self.lock();
        let d = s.durable.entry(id.to_owned()).or_insert(version);
        *d = (*d).max(version);
        if self.no_latency {
            return;
        }
        let State {
            waiting, latency, ..
        } = &mut *s;
        if let Some(list) = waiting.get_mut(id) {
            list.retain(|&(v, at)| {
                if v <= version {
                    latency.record(now.duration_since(at).as_micros() as u64);
                    false
                } else {
                    true
                }
            });
            if list.is_empty() {
                waiting.remove(id);
            }
        }
    }

    /// When the first notification was received.
    pub fn first_receive(&self) -> Option<Instant> {
        self.lock().first_receive
    }

    /// The highest durable version per id.
    pub fn durable_versions(&self) -> HashMap<String, i64> {
        self.lock().durable.clone()
    }

    /// The figures so far.
    pub fn summary(&self) -> ProbeSummary {
        let s = self.lock();
        ProbeSummary {
            received: s.received,
            satisfied: s.latency.count(),
            p50_ms: s.latency.quantile_ms(0.5),
            p99_ms: s.latency.quantile_ms(0.99),
            waiting: s.waiting.values().map(|v| v.len() as u64).sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn quantiles_within_two_percent() {
        let mut h = Histogram::default();
        for ms in 1..=100u64 {
            h.record(ms * 1000);
        }
        let p50 = h.quantile_ms(0.5).unwrap();
        let p99 = h.quantile_ms(0.99).unwrap();
        assert!((50.0..=51.0).contains(&p50), "{p50}");
        assert!((99.0..=101.0).contains(&p99), "{p99}");
    }

    #[test]
    fn a_write_covers_older_notifications_only() {
        let p = Probe::default();
        p.received("a", 1);
        p.received("a", 3);
        p.durable("a", 2);
        let s = p.summary();
        assert_eq!((s.received, s.satisfied, s.waiting), (2, 1, 1));
        p.durable("a", 3);
        p.received("a", 2); // already durable: zero latency
        let s = p.summary();
        assert_eq!((s.satisfied, s.waiting), (3, 0));
        assert_eq!(p.durable_versions().get("a"), Some(&3));
    }

    #[test]
    fn without_latency_keeps_versions_only() {
        let p = Probe::without_latency();
        p.received("a", 1);
        p.durable("a", 1);
        let s = p.summary();
        assert_eq!(
            (s.received, s.satisfied, s.waiting, s.p50_ms),
            (1, 0, 0, None)
        );
        assert_eq!(p.durable_versions().get("a"), Some(&1));
    }
}
