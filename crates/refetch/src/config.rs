//! Engine settings: coalescing window, caps, retries, deadlines.
//!
//! Every field has a sane default; [`EngineConfig::validate`] checks the relations between them
//! (for example that the rebalance drain deadline stays below `max.poll.interval.ms`).

use std::time::Duration;

use crate::action::ActionConfig;

/// What to do with notifications of entity types no fetcher serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownTypePolicy {
    /// Count them and move on (the offset is satisfied).
    #[default]
    Ignore,
    /// Send them to the dead-letter topic.
    DeadLetter,
}

/// The longest retry-after hint honoured (a longer one is capped).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Exponential backoff with full jitter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// The first delay.
    pub initial: Duration,
    /// The cap for any delay.
    pub max: Duration,
    /// Growth factor per attempt.
    pub multiplier: f64,
}

impl Backoff {
    /// The delay before attempt `attempt` (1-based), jittered into `[delay/2, delay]`, and never
    /// below `retry_after`.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>, jitter: f64) -> Duration {
        let exp = self
            .multiplier
            .powi(attempt.saturating_sub(1).min(63) as i32);
        let raw = self.initial.as_secs_f64() * exp;
        let capped = raw.min(self.max.as_secs_f64());
        let jittered = capped * (0.5 + 0.5 * jitter.clamp(0.0, 1.0));
        let d = Duration::from_secs_f64(jittered.max(0.0));
        match retry_after {
            // A source's (or a custom fetcher's) hint wins over the backoff, capped at an hour.
            Some(r) if r > d => r.min(MAX_RETRY_AFTER),
            _ => d,
        }
    }
}

/// The gone-rate guard of design-notes invariant 12.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GoneGuardConfig {
    /// How many recent fetch outcomes the sliding window holds.
    pub window: usize,
    /// The guard only judges once this many outcomes are in the window.
    pub min_samples: usize,
    /// The share of "gone" outcomes above which deletes stop.
    pub max_ratio: f64,
    /// While the guard has fewer than `min_samples` outcomes and the share of gone answers is
    /// abnormal (a fresh start whose first answers are gone), a delete waits this long for the
    /// evidence to come in; a delete still unjudged then (a lone delete on a quiet stream) is
    /// written.
    pub wait: Duration,
}

impl Default for GoneGuardConfig {
    fn default() -> Self {
        GoneGuardConfig {
            window: 200,
            min_samples: 50,
            max_ratio: 0.2,
            wait: Duration::from_secs(10),
        }
    }
}

/// Engine settings.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Trailing debounce window: a key is fetched once no new notification arrived for this long.
    pub window: Duration,
    /// A key that keeps changing is still flushed at least this often after its first pending
    /// notification.
    pub max_wait: Duration,
    /// Catch-up: a notification produced longer ago than the window (its record's timestamp,
    /// as the producer or the broker stamped it) has waited out its window already, so it
    /// waits only `catch_up_linger` (the same for `max_wait`). A backlog is then fetched as fast
    /// as it is read instead of paying the window again. A record without a timestamp, or
    /// stamped in the future, waits the full window. Off: every notification waits the window
    /// from its arrival.
    pub catch_up: bool,
    /// How long a notification that waited out its window already (catch-up) still waits for
    /// more of its key, so the records read right after it (the rest of the poll, the other
    /// partitions) merge with it.
    pub catch_up_linger: Duration,
    /// How many fetches may run at once.
    pub fetch_concurrency: usize,
    /// Largest sink batch.
    pub sink_batch_max: usize,
    /// How long a sink batch waits for more changes once it has one.
    pub sink_linger: Duration,
    /// How many sink batches may be in flight at once.
    pub sink_concurrency: usize,
    /// Retry backoff for fetches.
    pub fetch_backoff: Backoff,
    /// Attempts that reached a healthy source before a key is dead-lettered.
    pub retry_budget: u32,
    /// Retry backoff for sink writes (retried without end for batch failures).
    pub sink_backoff: Backoff,
    /// Attempts for a single record the sink keeps failing while its batch-mates succeed.
    pub sink_record_budget: u32,
    /// How far back (wall-clock time) the outcomes of a source count when its health is judged:
    /// a key's failure spends its retry budget only while other keys of the same source
    /// succeeded within this window.
    pub health_window: Duration,
    /// Outcomes a source needs within the window before it can be judged in outage.
    pub health_min_samples: usize,
    /// Share of a source's recent outcomes failing with one cause (401/403, a wrong content
    /// type, 5xx, timeouts, ...) above which the source is in outage: none of its keys is
    /// dead-lettered, readiness fails.
    pub unhealthy_ratio: f64,
    /// A "gone" answer for a key whose notification announced a version, of an entity the sink
    /// is not known to hold at all (read right after a create, from a replica behind), is
    /// retried as a stale read for this long before it counts as a delete.
    pub gone_grace: Duration,
    /// How often satisfied offsets are committed at the latest (and how often the open
    /// transaction commits, with an exactly-once sink).
    pub commit_interval: Duration,
    /// At-least-once: once a write moved a partition's commit point, its commit follows within
    /// this long instead of waiting for the next `commit_interval` tick (one commit in flight at
    /// a time; the linger gathers the writes that complete meanwhile).
    pub commit_linger: Duration,
    /// At-least-once: the satisfied offsets above each commit point go into the commit's
    /// metadata, encoded in at most this many bytes (the ranges nearest the point first). After
    /// a restart, or at the next owner, their records are taken as satisfied instead of being
    /// fetched again. 0 commits no ranges. Brokers refuse metadata over
    /// `offset.metadata.max.bytes` (4096 by default).
    pub commit_ranges_max_bytes: usize,
    /// Outstanding offsets per partition before that partition pauses.
    pub max_outstanding_per_partition: usize,
    /// Pending keys in total before every partition pauses.
    pub max_pending_keys: usize,
    /// Pending bytes (ids and keys) in total before every partition pauses.
    pub max_pending_bytes: usize,
    /// Resume when usage falls below this share of a cap.
    pub resume_ratio: f64,
    /// Ids longer than this (bytes) are dead-lettered as too long.
    pub max_id_len: usize,
    /// Notifications for entity types no fetcher serves.
    pub unknown_types: UnknownTypePolicy,
    /// Keys whose acknowledged version (and validators) are remembered.
    pub version_cache_capacity: u64,
    /// The gone-rate guard.
    pub gone_guard: GoneGuardConfig,
    /// How long a revoke waits for writes already issued before it commits and lets go. Must stay
    /// below the consumer's `max.poll.interval.ms`.
    pub rebalance_drain: Duration,
    /// How long a commit may take where something waits for it: the commit on revoke (before
    /// the partitions are let go) and the final commit at shutdown. With `rebalance_drain`, it
    /// bounds how long a revoke can hold the consumer's poll thread.
    pub commit_timeout: Duration,
    /// How long shutdown waits for in-flight work before it commits what is satisfied.
    pub shutdown_deadline: Duration,
    /// Business-action grouping of notifications that carry a correlation id.
    pub actions: ActionConfig,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            window: Duration::from_millis(200),
            max_wait: Duration::from_secs(2),
            catch_up: true,
            catch_up_linger: Duration::from_millis(20),
            fetch_concurrency: 64,
            sink_batch_max: 256,
            sink_linger: Duration::from_millis(20),
            sink_concurrency: 2,
            fetch_backoff: Backoff {
                initial: Duration::from_millis(200),
                max: Duration::from_secs(30),
                multiplier: 2.0,
            },
            retry_budget: 8,
            sink_backoff: Backoff {
                initial: Duration::from_millis(200),
                max: Duration::from_secs(15),
                multiplier: 2.0,
            },
            sink_record_budget: 8,
            health_window: Duration::from_secs(60),
            health_min_samples: 10,
            unhealthy_ratio: 0.5,
            gone_grace: Duration::from_secs(10),
            commit_interval: Duration::from_secs(1),
            commit_linger: Duration::from_millis(50),
            commit_ranges_max_bytes: 4000,
            max_outstanding_per_partition: 100_000,
            max_pending_keys: 200_000,
            max_pending_bytes: 64 * 1024 * 1024,
            resume_ratio: 0.5,
            max_id_len: 1024,
            unknown_types: UnknownTypePolicy::Ignore,
            version_cache_capacity: 100_000,
            gone_guard: GoneGuardConfig::default(),
            rebalance_drain: Duration::from_secs(10),
            commit_timeout: Duration::from_secs(5),
            shutdown_deadline: Duration::from_secs(15),
            actions: ActionConfig::default(),
        }
    }
}

/// A setting that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid engine setting `{key}`: {reason}")]
pub struct ConfigError {
    /// The setting.
    pub key: &'static str,
    /// What is wrong and what is expected.
    pub reason: String,
}

impl EngineConfig {
    /// Check the settings and their relations. `max_poll_interval` is the consumer's
    /// `max.poll.interval.ms`, when known.
    pub fn validate(&self, max_poll_interval: Option<Duration>) -> Result<(), ConfigError> {
        let err = |key, reason: String| Err(ConfigError { key, reason });
        if self.max_wait < self.window {
            return err(
                "max_wait",
                format!(
                    "{:?} is below the window {:?}; expected max_wait >= window",
                    self.max_wait, self.window
                ),
            );
        }
        for (key, v) in [
            ("fetch_concurrency", self.fetch_concurrency),
            ("sink_batch_max", self.sink_batch_max),
            ("sink_concurrency", self.sink_concurrency),
            (
                "max_outstanding_per_partition",
                self.max_outstanding_per_partition,
            ),
            ("max_pending_keys", self.max_pending_keys),
            ("max_pending_bytes", self.max_pending_bytes),
            ("max_id_len", self.max_id_len),
            ("health_min_samples", self.health_min_samples),
        ] {
            if v == 0 {
                return err(key, "must be at least 1".into());
            }
        }
        if self.retry_budget == 0 || self.sink_record_budget == 0 {
            return err("retry_budget", "must be at least 1".into());
        }
        if self.health_window < Duration::from_secs(1) {
            return err("health_window", "must be at least 1s".into());
        }
        if !(0.0..1.0).contains(&self.unhealthy_ratio) {
            return err("unhealthy_ratio", "expected a share in [0, 1)".into());
        }
        if !(0.0..1.0).contains(&self.resume_ratio) {
            return err("resume_ratio", "expected a share in [0, 1)".into());
        }
        if !(0.0..=1.0).contains(&self.gone_guard.max_ratio) {
            return err("gone_guard.max_ratio", "expected a share in [0, 1]".into());
        }
        if self.actions.max_wait < self.actions.window {
            return err(
                "actions.max_wait",
                format!(
                    "{:?} is below the action window {:?}; expected max_wait >= window",
                    self.actions.max_wait, self.actions.window
                ),
            );
        }
        if self.commit_timeout.is_zero() {
            return err("commit_timeout", "must be above zero".into());
        }
        if let Some(max_poll) = max_poll_interval {
            // The worst a revoke holds the poll thread: the drain, a margin for the engine's
            // answer to arrive, the commit, and a second of slack for the poll itself.
            let worst = self.revoke_worst_case();
            if worst >= max_poll {
                return err(
                    "rebalance_drain",
                    format!(
                        "a revoke can hold the consumer for {worst:?} (rebalance_drain {:?} + \
                         commit_timeout {:?} + 1.25 s), which must stay below \
                         max.poll.interval.ms ({max_poll:?}): the consumer is not polled while a \
                         revoke drains",
                        self.rebalance_drain, self.commit_timeout
                    ),
                );
            }
        }
        Ok(())
    }
}

impl EngineConfig {
    /// The longest a revoke can hold the consumer's poll thread: the drain deadline, 250 ms for
    /// the engine's answer to arrive, the commit timeout, and a second of slack for the poll.
    pub fn revoke_worst_case(&self) -> Duration {
        self.rebalance_drain
            + Duration::from_millis(250)
            + self.commit_timeout
            + Duration::from_secs(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_honours_retry_after() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            multiplier: 2.0,
        };
        assert_eq!(b.delay(1, None, 1.0), Duration::from_millis(100));
        assert_eq!(b.delay(3, None, 1.0), Duration::from_millis(400));
        assert_eq!(b.delay(30, None, 1.0), Duration::from_secs(1));
        assert_eq!(b.delay(1, None, 0.0), Duration::from_millis(50));
        assert_eq!(
            b.delay(1, Some(Duration::from_secs(5)), 0.3),
            Duration::from_secs(5)
        );
        assert_eq!(
            b.delay(1, Some(Duration::from_secs(86_400 * 365)), 0.3),
            MAX_RETRY_AFTER,
            "a retry-after hint is capped at an hour"
        );
    }

    #[test]
    fn drain_must_fit_in_the_poll_interval() {
        let c = EngineConfig::default();
        assert!(c.validate(Some(Duration::from_secs(300))).is_ok());
        let e = c.validate(Some(Duration::from_secs(5))).unwrap_err();
        assert_eq!(e.key, "rebalance_drain");
        // The drain alone fits, but not with the commit after it.
        let e = c.validate(Some(Duration::from_secs(12))).unwrap_err();
        assert_eq!(e.key, "rebalance_drain");
        assert!(e.reason.contains("commit_timeout"), "{e}");
        assert!(c.validate(Some(Duration::from_millis(16_251))).is_ok());
        let c = EngineConfig {
            max_wait: Duration::from_millis(1),
            ..EngineConfig::default()
        };
        assert_eq!(c.validate(None).unwrap_err().key, "max_wait");
    }
}
