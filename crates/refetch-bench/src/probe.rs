//! Measuring a contender from the inside: receipt-to-durable latency, durable versions and the
//! durable log.
//!
//! Every contender reports the moment it *received* a versioned notification `(id, version)` and
//! the moment a write of `id` at a version `w` became *durable* (the sink acknowledged it, after
//! `fsync` for JSON Lines). A notification's receipt latency is the time from its receipt to the
//! first durable write of its entity at a version `>= its version`; a notification that arrives
//! when such a write is already durable counts as zero. The same definition applies to every
//! contender. (Freshness, measured from the save, is computed by the driver from the
//! [`DurableLog`]: see [`crate::freshness`].)
//!
//! Latencies go into a log-bucketed histogram (2% resolution, fixed size), so the probe's memory
//! does not grow with N; what does grow is the list of notifications still waiting for a write,
//! which is bounded by what the contender holds in flight.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

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

    /// The non-empty buckets as `(bucket, count)`, to ship to the driver.
    pub fn sparse(&self) -> Vec<(u32, u64)> {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(i, c)| (i as u32, *c))
            .collect()
    }

    /// Add buckets made by [`Histogram::sparse`] (of this or another process).
    pub fn merge_sparse(&mut self, buckets: &[(u32, u64)]) {
        for &(i, c) in buckets {
            self.counts[(i as usize).min(BUCKETS - 1)] += c;
            self.total += c;
        }
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
    /// The histogram's non-empty buckets (to merge the figures of several processes).
    #[serde(default)]
    pub buckets: Vec<(u32, u64)>,
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

    /// A notification for `id` (at `version`, when it carries one) was received now.
    pub fn received(&self, id: &str, version: Option<i64>) {
        let now = Instant::now();
        let mut s = self.lock();
        s.received += 1;
        s.first_receive.get_or_insert(now);
        let Some(version) = version else {
            return;
        };
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
            buckets: s.latency.sparse(),
        }
    }
}

/// Microseconds since the Unix epoch (the wall clock every process of a run shares).
pub fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The durable log: one line `id version unix-micros` per acknowledged write, appended with one
/// unbuffered `write` per sink batch, so the lines survive a SIGKILL of the process. The driver
/// reads every instance's log to judge completion and freshness.
#[derive(Debug)]
pub struct DurableLog {
    file: Mutex<File>,
}

impl DurableLog {
    /// Open (create, append) the log at `path`.
    pub fn open(path: &Path) -> std::io::Result<DurableLog> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(DurableLog {
            file: Mutex::new(file),
        })
    }

    /// Record writes that are durable now.
    pub fn record<'a>(&self, writes: impl IntoIterator<Item = (&'a str, i64)>) {
        let now = unix_micros();
        let mut buf = String::new();
        for (id, v) in writes {
            use std::fmt::Write as _;
            let _ = writeln!(buf, "{id} {v} {now}");
        }
        if buf.is_empty() {
            return;
        }
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = f.write_all(buf.as_bytes()) {
            tracing::error!(error = %e, "writing the durable log");
        }
    }
}

/// Parse one durable-log line.
pub fn parse_durable_line(line: &str) -> Option<(&str, i64, u64)> {
    let mut it = line.split_ascii_whitespace();
    let id = it.next()?;
    let v = it.next()?.parse().ok()?;
    let t = it.next()?.parse().ok()?;
    Some((id, v, t))
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
        let mut merged = Histogram::default();
        merged.merge_sparse(&h.sparse());
        merged.merge_sparse(&h.sparse());
        assert_eq!(merged.count(), 200);
        assert_eq!(merged.quantile_ms(0.99), h.quantile_ms(0.99));
    }

    #[test]
    fn durable_log_lines_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.log");
        let log = DurableLog::open(&path).unwrap();
        log.record([("e1", 3), ("e2", 1)]);
        log.record([]);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<_> = text.lines().filter_map(parse_durable_line).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!((lines[0].0, lines[0].1), ("e1", 3));
        assert!(lines[1].2 >= lines[0].2 && lines[0].2 > 1_700_000_000_000_000);
    }

    #[test]
    fn a_write_covers_older_notifications_only() {
        let p = Probe::default();
        p.received("a", Some(1));
        p.received("a", Some(3));
        p.received("a", None); // unversioned: counted, no latency
        p.durable("a", 2);
        let s = p.summary();
        assert_eq!((s.received, s.satisfied, s.waiting), (3, 1, 1));
        p.durable("a", 3);
        p.received("a", Some(2)); // already durable: zero latency
        let s = p.summary();
        assert_eq!((s.satisfied, s.waiting), (3, 0));
        assert_eq!(p.durable_versions().get("a"), Some(&3));
    }

    #[test]
    fn without_latency_keeps_versions_only() {
        let p = Probe::without_latency();
        p.received("a", Some(1));
        p.durable("a", 1);
        let s = p.summary();
        assert_eq!(
            (s.received, s.satisfied, s.waiting, s.p50_ms),
            (1, 0, 0, None)
        );
        assert_eq!(p.durable_versions().get("a"), Some(&1));
    }
}
