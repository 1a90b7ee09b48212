//! `[engine]`: the engine's settings as TOML (durations as humantime strings).
//!
//! [`refetch::EngineConfig`] is plain data without serde; this mirror adds it and converts both
//! ways, so the defaults written in the docs are the engine's own.

use std::time::Duration;

use refetch::{
    ActionConfig, ActionFailurePolicy, Backoff, EngineConfig, GoneGuardConfig, UnknownTypePolicy,
};
use serde::{Deserialize, Serialize};

/// `[engine]`: coalescing, concurrency, retries, memory caps and deadlines.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineSection {
    /// Trailing debounce window: a key is fetched once no new notification arrived for this
    /// long.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// A key that keeps changing is still fetched at least this often after its first pending
    /// notification (must be at least `window`).
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// Catch-up: a notification whose record was produced longer ago than `window` (a
    /// backlog) waits only `catch_up_linger`, not the window again.
    pub catch_up: bool,
    /// How long a caught-up notification still waits for more of its key.
    #[serde(with = "humantime_serde")]
    pub catch_up_linger: Duration,
    /// Fetches running at once (all entity types together).
    pub fetch_concurrency: usize,
    /// Largest sink batch.
    pub sink_batch_max: usize,
    /// How long a sink batch waits for more changes once it has one.
    #[serde(with = "humantime_serde")]
    pub sink_linger: Duration,
    /// Sink batches in flight at once.
    pub sink_concurrency: usize,
    /// Retry backoff of failed fetches.
    pub fetch_backoff: BackoffSection,
    /// Failed attempts against a healthy source before a key is dead-lettered. Attempts not made
    /// (open breaker, rate limit) or made while the source fails for most keys do not count.
    pub retry_budget: u32,
    /// Retry backoff of failed sink writes (a failing batch is retried without end).
    pub sink_backoff: BackoffSection,
    /// Attempts for a single record the sink keeps failing while its batch-mates succeed, before
    /// it is dead-lettered.
    pub sink_record_budget: u32,
    /// How far back the outcomes of a source count when its health is judged: a key's failure
    /// spends its retry budget only while other keys of the same source succeeded within it.
    #[serde(with = "humantime_serde")]
    pub health_window: Duration,
    /// Outcomes a source needs within the window before it can be judged in outage.
    pub health_min_samples: usize,
    /// Share of a source's recent outcomes failing with one cause (401/403, a wrong content type,
    /// 5xx, timeouts, ...) above which the source is in outage: nothing of it is dead-lettered,
    /// readiness fails.
    pub unhealthy_ratio: f64,
    /// A "gone" answer right after a notification announced a version of an entity the sink is
    /// not known to hold at all (just created) is retried as a stale read for this long before
    /// it counts as a delete.
    #[serde(with = "humantime_serde")]
    pub gone_grace: Duration,
    /// How often satisfied offsets are committed at the latest (and transactions, exactly-once).
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// At-least-once: a commit follows a moved commit point within this long.
    #[serde(with = "humantime_serde")]
    pub commit_linger: Duration,
    /// At-least-once: bytes of commit metadata naming the satisfied offsets above the commit
    /// point, so a restart does not fetch them again (0: none).
    pub commit_ranges_max_bytes: usize,
    /// Offsets held per partition before that partition pauses.
    pub max_outstanding_per_partition: usize,
    /// Pending keys in total before every partition pauses.
    pub max_pending_keys: usize,
    /// Pending bytes (ids and keys) in total before every partition pauses.
    pub max_pending_bytes: usize,
    /// Paused partitions resume once usage falls below this share of the cap.
    pub resume_ratio: f64,
    /// Ids longer than this many bytes are dead-lettered as too long.
    pub max_id_len: usize,
    /// Notifications of entity types no `[fetcher.sources]` entry serves: `ignore` (count
    /// them) or `dead_letter`.
    pub unknown_types: UnknownTypePolicy,
    /// Keys whose acknowledged version and HTTP validators are remembered (skips fetches for
    /// notifications already satisfied, enables conditional requests).
    pub version_cache_capacity: u64,
    /// The guard that stops deletes when too many fetches say "gone".
    pub gone_guard: GoneGuardSection,
    /// How long a revoked partition waits for writes already issued before it commits and lets
    /// go. Must stay below the consumer's `max.poll.interval.ms`.
    #[serde(with = "humantime_serde")]
    pub rebalance_drain: Duration,
    /// How long a commit may take where something waits for it (the commit on revoke, the final
    /// commit at shutdown). A revoke can hold the consumer for `rebalance_drain` +
    /// `commit_timeout` + 1.25 s, which must stay below `max.poll.interval.ms`.
    #[serde(with = "humantime_serde")]
    pub commit_timeout: Duration,
    /// On SIGTERM/SIGINT: how long in-flight work may take before the final commit (work not
    /// finished by then is simply not committed and is redone by the next owner).
    #[serde(with = "humantime_serde")]
    pub shutdown_deadline: Duration,
    /// Business-action grouping of notifications that carry a correlation id (see
    /// `docs/actions.md`).
    pub actions: ActionsSection,
}

/// `[engine.actions]`: how notifications of one business action (same correlation id) are
/// collected and written together.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ActionsSection {
    /// An action completes once no new member arrived for this long (unless all its announced
    /// members arrived earlier).
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// An action completes at the latest this long after its first member.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// A member that cannot be fetched: `dead_letter_all` (the whole action) or
    /// `write_succeeded` (write the others, dead-letter the failed ones).
    pub on_failure: ActionFailurePolicy,
    /// Closed correlation ids remembered, so a late member is handled as a normal notification.
    pub remember_closed: usize,
}

impl Default for ActionsSection {
    fn default() -> Self {
        ActionConfig::default().into()
    }
}

impl From<ActionConfig> for ActionsSection {
    fn from(a: ActionConfig) -> Self {
        ActionsSection {
            window: a.window,
            max_wait: a.max_wait,
            on_failure: a.on_failure,
            remember_closed: a.remember_closed,
        }
    }
}

impl From<ActionsSection> for ActionConfig {
    fn from(a: ActionsSection) -> Self {
        ActionConfig {
            window: a.window,
            max_wait: a.max_wait,
            on_failure: a.on_failure,
            remember_closed: a.remember_closed,
        }
    }
}

/// Exponential backoff with full jitter.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackoffSection {
    /// The first delay.
    #[serde(with = "humantime_serde")]
    pub initial: Duration,
    /// The longest delay.
    #[serde(with = "humantime_serde")]
    pub max: Duration,
    /// Growth factor per attempt.
    pub multiplier: f64,
}

impl Default for BackoffSection {
    fn default() -> Self {
        EngineConfig::default().fetch_backoff.into()
    }
}

impl From<Backoff> for BackoffSection {
    fn from(b: Backoff) -> Self {
        BackoffSection {
            initial: b.initial,
            max: b.max,
            multiplier: b.multiplier,
        }
    }
}

impl From<BackoffSection> for Backoff {
    fn from(b: BackoffSection) -> Self {
        Backoff {
            initial: b.initial,
            max: b.max,
            multiplier: b.multiplier,
        }
    }
}

/// `[engine.gone_guard]`: stop deletes when "gone" answers are abnormally frequent.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GoneGuardSection {
    /// Recent fetch outcomes in the sliding window.
    pub window: usize,
    /// The guard judges only once this many outcomes are in the window.
    pub min_samples: usize,
    /// Share of "gone" outcomes above which deletes are held (and readiness fails).
    pub max_ratio: f64,
    /// Before the guard has `min_samples` outcomes, a delete whose source answers mostly "gone"
    /// so far waits this long for evidence; a delete still unjudged then (a lone delete) is
    /// written.
    #[serde(with = "humantime_serde")]
    pub wait: Duration,
}

impl Default for GoneGuardSection {
    fn default() -> Self {
        let g = GoneGuardConfig::default();
        GoneGuardSection {
            window: g.window,
            min_samples: g.min_samples,
            max_ratio: g.max_ratio,
            wait: g.wait,
        }
    }
}

impl Default for EngineSection {
    fn default() -> Self {
        EngineSection::from(&EngineConfig::default())
    }
}

impl From<&EngineConfig> for EngineSection {
    fn from(e: &EngineConfig) -> Self {
        EngineSection {
            window: e.window,
            max_wait: e.max_wait,
            catch_up: e.catch_up,
            catch_up_linger: e.catch_up_linger,
            fetch_concurrency: e.fetch_concurrency,
            sink_batch_max: e.sink_batch_max,
            sink_linger: e.sink_linger,
            sink_concurrency: e.sink_concurrency,
            fetch_backoff: e.fetch_backoff.into(),
            retry_budget: e.retry_budget,
            sink_backoff: e.sink_backoff.into(),
            sink_record_budget: e.sink_record_budget,
            health_window: e.health_window,
            health_min_samples: e.health_min_samples,
            unhealthy_ratio: e.unhealthy_ratio,
            gone_grace: e.gone_grace,
            commit_interval: e.commit_interval,
            commit_linger: e.commit_linger,
            commit_ranges_max_bytes: e.commit_ranges_max_bytes,
            max_outstanding_per_partition: e.max_outstanding_per_partition,
            max_pending_keys: e.max_pending_keys,
            max_pending_bytes: e.max_pending_bytes,
            resume_ratio: e.resume_ratio,
            max_id_len: e.max_id_len,
            unknown_types: e.unknown_types,
            version_cache_capacity: e.version_cache_capacity,
            gone_guard: GoneGuardSection {
                window: e.gone_guard.window,
                min_samples: e.gone_guard.min_samples,
                max_ratio: e.gone_guard.max_ratio,
                wait: e.gone_guard.wait,
            },
            rebalance_drain: e.rebalance_drain,
            commit_timeout: e.commit_timeout,
            shutdown_deadline: e.shutdown_deadline,
            actions: e.actions.into(),
        }
    }
}

impl EngineSection {
    /// The engine's settings.
    pub fn to_engine(&self) -> EngineConfig {
        EngineConfig {
            window: self.window,
            max_wait: self.max_wait,
            catch_up: self.catch_up,
            catch_up_linger: self.catch_up_linger,
            fetch_concurrency: self.fetch_concurrency,
            sink_batch_max: self.sink_batch_max,
            sink_linger: self.sink_linger,
            sink_concurrency: self.sink_concurrency,
            fetch_backoff: self.fetch_backoff.into(),
            retry_budget: self.retry_budget,
            sink_backoff: self.sink_backoff.into(),
            sink_record_budget: self.sink_record_budget,
            health_window: self.health_window,
            health_min_samples: self.health_min_samples,
            unhealthy_ratio: self.unhealthy_ratio,
            gone_grace: self.gone_grace,
            commit_interval: self.commit_interval,
            commit_linger: self.commit_linger,
            commit_ranges_max_bytes: self.commit_ranges_max_bytes,
            max_outstanding_per_partition: self.max_outstanding_per_partition,
            max_pending_keys: self.max_pending_keys,
            max_pending_bytes: self.max_pending_bytes,
            resume_ratio: self.resume_ratio,
            max_id_len: self.max_id_len,
            unknown_types: self.unknown_types,
            version_cache_capacity: self.version_cache_capacity,
            gone_guard: GoneGuardConfig {
                window: self.gone_guard.window,
                min_samples: self.gone_guard.min_samples,
                max_ratio: self.gone_guard.max_ratio,
                wait: self.gone_guard.wait,
            },
            rebalance_drain: self.rebalance_drain,
            commit_timeout: self.commit_timeout,
            shutdown_deadline: self.shutdown_deadline,
            actions: self.actions.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn business_action_settings_and_decoder_keys() {
        let e: EngineSection = toml::from_str(
            "[actions]\nwindow = \"250ms\"\nmax_wait = \"3s\"\non_failure = \"write_succeeded\"\n",
        )
        .expect("parses");
        let a = e.to_engine().actions;
        assert_eq!(a.window, Duration::from_millis(250));
        assert_eq!(a.max_wait, Duration::from_secs(3));
        assert_eq!(a.on_failure, ActionFailurePolicy::WriteSucceeded);
        assert!(toml::from_str::<EngineSection>("[actions]\nsize = 3\n").is_err());

        let d: crate::config::DecoderSection = toml::from_str(
            "kind = \"json\"\nfixed_type = \"customer\"\ncorrelation = \"/tx\"\naction_size = \"/of\"\n",
        )
        .expect("parses");
        let payload = br#"{"id":"1","tx":"t-1","of":2}"#;
        let record = refetch::RecordView {
            topic: "t",
            partition: 0,
            offset: 0,
            key: None,
            payload: Some(payload),
            headers: &[],
            timestamp: None,
        };
        match d.build().decode(&record) {
            Ok(refetch::Decoded::Notification(n)) => {
                let tag = n.action.expect("a member of an action");
                assert_eq!((&*tag.id, tag.size), ("t-1", Some(2)));
            }
            other => panic!("expected a notification, got {other:?}"),
        }
    }

    #[test]
    fn round_trips_the_engine_defaults() {
        let e = EngineConfig::default();
        assert_eq!(EngineSection::from(&e).to_engine(), e);
        assert_eq!(
            EngineSection::default().sink_backoff.max,
            e.sink_backoff.max
        );
    }
}
