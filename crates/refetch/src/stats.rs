//! Counters and a latency histogram kept by the engine for status pages, summaries and tests.
//!
//! Prometheus-style metrics go through the `metrics` facade (see [`crate::metrics`]); these
//! in-process figures exist so a caller can read them without installing a recorder (the demo's
//! summary table, the status page, tests).

use std::time::Duration;

/// Cumulative engine counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    /// Records received from the consumer.
    pub records: u64,
    /// Records decoded into notifications.
    pub notifications: u64,
    /// Notifications merged into a key that already had pending notifications.
    pub coalesced: u64,
    /// Notifications satisfied on arrival because the sink already holds their version.
    pub satisfied_by_version: u64,
    /// Records that were not notifications (ignored by the decoder or of an unknown type).
    pub ignored: u64,
    /// Records that could not be decoded.
    pub decode_errors: u64,
    /// Fetches started (a batched request counts once per key).
    pub fetches: u64,
    /// Fetches that found the entity.
    pub found: u64,
    /// Fetches that said the entity is gone.
    pub gone: u64,
    /// Conditional fetches that said nothing changed.
    pub unchanged: u64,
    /// Fetches skipped because the sink already held the announced version.
    pub already_held: u64,
    /// Fetches that failed transiently.
    pub fetch_transient: u64,
    /// Fetches that failed permanently.
    pub fetch_permanent: u64,
    /// Fetched states older than a notification's version.
    pub stale_reads: u64,
    /// Deletes held back by the gone guard.
    pub gone_held: u64,
    /// Changes the sink acknowledged as durable.
    pub writes: u64,
    /// Single records the sink failed.
    pub write_failures: u64,
    /// Dead letters issued.
    pub dead_letters: u64,
    /// Dead letters the broker acknowledged.
    pub dead_letters_acked: u64,
    /// Flights whose notifications all belonged to revoked or lost partitions.
    pub abandoned: u64,
    /// Records received for a partition not (or no longer) assigned.
    pub unassigned_records: u64,
    /// Records that arrived while their partition was paused.
    pub records_while_paused: u64,
    /// Notifications of a key that had notifications pending or in flight from another
    /// partition (per-key order across instances then depends on versions).
    pub keys_on_several_partitions: u64,
    /// Offsets committed successfully.
    pub commits: u64,
    /// Commit attempts that failed (retried later).
    pub commit_failures: u64,
    /// Business actions that completed because all announced members arrived.
    pub actions_completed_by_count: u64,
    /// Business actions that completed because their quiet window (or max-wait) passed.
    pub actions_completed_by_timeout: u64,
    /// Business actions whose members fell back to normal writes (split across instances, short
    /// of their announced size, or split by a revoke).
    pub actions_incomplete: u64,
    /// Business actions written in one sink batch.
    pub actions_written: u64,
    /// Business actions whose members were dead-lettered because one of them failed.
    pub actions_dead_lettered: u64,
    /// Members that arrived after their action closed (handled as normal notifications).
    pub action_late_members: u64,
    /// Records satisfied on arrival because they were covered before this assignment began: the
    /// sink stored their offset (exactly-once delivery), or the last commit's metadata named them
    /// satisfied (at-least-once; `engine.commit_ranges_max_bytes`), after a restart or a
    /// rebalance.
    pub stored_on_arrival: u64,
    /// Transactions of an exactly-once sink that committed.
    pub transactions_committed: u64,
    /// Transactions of an exactly-once sink that aborted (their notifications are fetched
    /// again).
    pub transactions_aborted: u64,
}

impl Counters {
    // Every counter that is also a metric is counted through one of these, so the status page
    // and `/metrics` can never disagree.

    /// `n` records received.
    pub(crate) fn add_records(&mut self, n: u64) {
        self.records += n;
        crate::metrics::record_batch(n as usize);
    }

    /// A notification merged into a pending key.
    pub(crate) fn add_coalesced(&mut self) {
        self.coalesced += 1;
        crate::metrics::coalesced();
    }

    /// `n` notifications satisfied because the sink holds their version.
    pub(crate) fn add_satisfied_by_version(&mut self, n: u64) {
        self.satisfied_by_version += n;
        crate::metrics::satisfied_by_version_n(n);
    }

    /// A record that is not a notification.
    pub(crate) fn add_ignored(&mut self, reason: &'static str) {
        self.ignored += 1;
        crate::metrics::ignored(reason);
    }

    /// A record that could not be decoded.
    pub(crate) fn add_decode_error(&mut self) {
        self.decode_errors += 1;
        crate::metrics::decode_error();
    }

    /// A key's notifications seen on two partitions at once.
    pub(crate) fn add_key_on_several_partitions(&mut self) {
        self.keys_on_several_partitions += 1;
        crate::metrics::key_on_several_partitions();
    }

    /// A fetch ended with `outcome` (`found`, `gone`, `unchanged`, `stale`, `permanent`,
    /// `transient`, `not_attempted`).
    pub(crate) fn add_fetch_outcome(&mut self, outcome: &'static str) {
        match outcome {
            "found" => self.found += 1,
            "gone" => self.gone += 1,
            "unchanged" => self.unchanged += 1,
            "stale" => self.stale_reads += 1,
            "permanent" => self.fetch_permanent += 1,
            _ => self.fetch_transient += 1,
        }
        crate::metrics::fetch_outcome(outcome);
    }

    /// A change the sink acknowledged as durable.
    pub(crate) fn add_write_durable(&mut self) {
        self.writes += 1;
        crate::metrics::write_durable();
    }

    /// A single record the sink failed.
    pub(crate) fn add_write_failure(&mut self, class: &'static str) {
        self.write_failures += 1;
        crate::metrics::write_failed(class);
    }

    /// A dead letter issued.
    pub(crate) fn add_dead_letter(&mut self, reason: &str) {
        self.dead_letters += 1;
        crate::metrics::dead_letter(reason);
    }

    /// A member arrived after its action closed.
    pub(crate) fn add_action_late_member(&mut self) {
        self.action_late_members += 1;
        crate::metrics::action_late_member();
    }

    /// An action's members fell back to normal writes.
    pub(crate) fn add_action_incomplete(&mut self) {
        self.actions_incomplete += 1;
        crate::metrics::action_incomplete();
    }
}

/// A log-bucketed latency histogram (about 4% resolution from 1 ms to about 20 minutes).
#[derive(Debug, Clone)]
pub struct LatencyHistogram {
    buckets: Vec<u64>,
    count: u64,
}

const BUCKETS: usize = 360;
const GROWTH: f64 = 1.04;

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: vec![0; BUCKETS],
            count: 0,
        }
    }
}

impl LatencyHistogram {
    fn bucket(ms: f64) -> usize {
        if ms <= 1.0 {
            0
        } else {
            ((ms.ln() / GROWTH.ln()).ceil() as usize).min(BUCKETS - 1)
        }
    }

    /// Record one sample.
    pub fn record(&mut self, d: Duration) {
        let i = Self::bucket(d.as_secs_f64() * 1000.0);
        if let Some(b) = self.buckets.get_mut(i) {
            *b += 1;
            self.count += 1;
        }
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The `q` quantile (0..=1), as the upper bound of its bucket.
    pub fn quantile(&self, q: f64) -> Option<Duration> {
        if self.count == 0 {
            return None;
        }
        let target = ((self.count as f64) * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= target {
                let ms = GROWTH.powi(i as i32);
                return Some(Duration::from_secs_f64(ms / 1000.0));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_within_resolution() {
        let mut h = LatencyHistogram::default();
        for ms in 1..=1000u64 {
            h.record(Duration::from_millis(ms));
        }
        let p50 = h.quantile(0.5).unwrap().as_secs_f64() * 1000.0;
        let p99 = h.quantile(0.99).unwrap().as_secs_f64() * 1000.0;
        assert!((480.0..=530.0).contains(&p50), "p50 {p50}");
        assert!((960.0..=1040.0).contains(&p99), "p99 {p99}");
        assert_eq!(LatencyHistogram::default().quantile(0.5), None);
    }
}
