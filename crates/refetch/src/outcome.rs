//! Outcome policy: what a fetch or write result means for its key.
//!
//! The engine hands every completion to [`Policy`], which answers with a verdict (write this
//! change, the notifications are satisfied, retry after a delay, dead-letter) and keeps the
//! evidence that verdicts need: source health (whether a failure reached a source that is healthy
//! for other keys, so that it spends the key's retry budget), the gone-rate guard (whether a
//! "gone" answer may become a delete), and the jitter of backoffs. It holds no key state: the
//! engine applies the verdict to the key's flight.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::coalesce::RetryState;
use crate::config::EngineConfig;
use crate::dlq::reason;
use crate::engine::FetchResult;
use crate::error::ErrorClass;
use crate::fetch::{FetchError, FetchOutcome, Validators};
use crate::health::{GoneGuard, SourceHealth};
use crate::key::{EntityKey, Version};
use crate::sink::{Change, SinkError};
use crate::stats::Counters;

/// What to do with a key after its fetch ended.
#[derive(Debug, Clone)]
pub(crate) enum FetchVerdict {
    /// Write this change (found, or gone and allowed to delete).
    Write {
        change: Change,
        validators: Option<Validators>,
    },
    /// Nothing to write: the notifications are satisfied (unchanged, or the sink holds the
    /// version already).
    Satisfied {
        /// The version the sink holds, when the sink said so.
        held: Option<Version>,
    },
    /// Keep the notifications pending and fetch again after `delay`.
    Retry { retry: RetryState, delay: Duration },
    /// Dead-letter the key's notifications.
    DeadLetter {
        reason: &'static str,
        message: String,
        class: ErrorClass,
        attempts: u32,
    },
}

/// What to do after a single record's write failed.
#[derive(Debug, Clone)]
pub(crate) enum WriteVerdict {
    /// Retry this record alone after `delay`.
    Retry { failures: u32, delay: Duration },
    /// Dead-letter the key's notifications.
    DeadLetter {
        message: String,
        class: ErrorClass,
        attempts: u32,
    },
}

/// The evidence behind verdicts.
#[derive(Debug)]
pub(crate) struct Policy {
    cfg: EngineConfig,
    health: HashMap<Arc<str>, SourceHealth>,
    gone_guard: GoneGuard,
    jitter_state: u64,
}

impl Policy {
    pub fn new(cfg: EngineConfig) -> Self {
        let gone_guard = GoneGuard::new(cfg.gone_guard);
        Policy {
            cfg,
            health: HashMap::new(),
            gone_guard,
            jitter_state: 0x9E37_79B9_7F4A_7C15,
        }
    }

    /// Judge a fetch of `key` whose notifications announced at most `min` (the highest notified
    /// version), given the key's retry state so far.
    pub fn judge_fetch(
        &mut self,
        key: &EntityKey,
        min: Option<Version>,
        result: FetchResult,
        retry: Option<RetryState>,
        counters: &mut Counters,
    ) -> FetchVerdict {
        let source = key.entity_type_arc();
        match result {
            FetchResult::Abandoned => FetchVerdict::Retry {
                // The engine drops abandoned flights before asking; should one reach here, its
                // notes go back to pending without counting an attempt.
                retry: retry.unwrap_or(RetryState {
                    counted: 0,
                    attempts: 0,
                    next_at: crate::clock::Tick(0),
                }),
                delay: Duration::ZERO,
            },
            FetchResult::AlreadyHeld(v) => {
                counters.already_held += 1;
                self.record_health(source, false);
                FetchVerdict::Satisfied { held: Some(v) }
            }
            FetchResult::Outcome(FetchOutcome::Unchanged) => {
                counters.add_fetch_outcome("unchanged");
                self.record_health(source, false);
                self.gone_guard.record(false);
                FetchVerdict::Satisfied { held: None }
            }
            FetchResult::Outcome(FetchOutcome::Found(entity)) => {
                self.record_health(source, false);
                self.gone_guard.record(false);
                if let (Some(min), Some(got)) = (min, entity.version) {
                    if !got.fetched_covers(&min) {
                        counters.add_fetch_outcome("stale");
                        let err = FetchError::transient(format!(
                            "stale read: fetched version {got} is older than notified {min}"
                        ));
                        return self.retry(key, &err, true, retry);
                    }
                }
                counters.add_fetch_outcome("found");
                let validators = entity.validators.clone();
                FetchVerdict::Write {
                    change: Change::Upsert {
                        key: key.clone(),
                        entity,
                    },
                    validators,
                }
            }
            FetchResult::Outcome(FetchOutcome::Gone) => {
                self.record_health(source, false);
                let held = self.gone_guard.record(true);
                crate::metrics::gone_guard(self.gone_guard.is_tripped(), self.gone_guard.ratio());
                if held {
                    counters.gone_held += 1;
                    tracing::warn!(key = %key, ratio = self.gone_guard.ratio(),
                        tripped = self.gone_guard.is_tripped(), "delete held back by the gone guard");
                    let err = FetchError::not_attempted(
                        "gone guard: deletes are held",
                        Some(self.cfg.fetch_backoff.max),
                    );
                    return self.retry(key, &err, false, retry);
                }
                counters.add_fetch_outcome("gone");
                FetchVerdict::Write {
                    change: Change::Delete { key: key.clone() },
                    validators: None,
                }
            }
            FetchResult::Error(e) => match e.class() {
                ErrorClass::Permanent => {
                    counters.add_fetch_outcome("permanent");
                    self.record_health(source, false);
                    FetchVerdict::DeadLetter {
                        reason: reason::FETCH,
                        message: e.message().to_owned(),
                        class: ErrorClass::Permanent,
                        attempts: retry.map_or(0, |r| r.attempts) + 1,
                    }
                }
                ErrorClass::Transient { .. } => {
                    let reached = e.counts_against_budget();
                    counters.add_fetch_outcome(if reached {
                        "transient"
                    } else {
                        "not_attempted"
                    });
                    if reached {
                        self.record_health(source, true);
                    }
                    self.retry(key, &e, reached, retry)
                }
            },
        }
    }

    fn record_health(&mut self, source: &Arc<str>, failed: bool) {
        let window = self.cfg.health_window;
        let ratio = self.cfg.unhealthy_ratio;
        self.health
            .entry(source.clone())
            .or_insert_with(|| SourceHealth::new(window, ratio))
            .record(failed);
    }

    /// A transient failure: back off; spend budget only when the attempt reached a source that
    /// is healthy for other keys.
    fn retry(
        &mut self,
        key: &EntityKey,
        err: &FetchError,
        reached: bool,
        retry: Option<RetryState>,
    ) -> FetchVerdict {
        let failing = self
            .health
            .get(key.entity_type())
            .is_none_or(SourceHealth::is_failing);
        let counts = reached && !failing;
        let mut r = retry.unwrap_or(RetryState {
            counted: 0,
            attempts: 0,
            next_at: crate::clock::Tick(0),
        });
        r.attempts += 1;
        if counts {
            r.counted += 1;
        }
        if r.counted >= self.cfg.retry_budget {
            tracing::warn!(key = %key, attempts = r.attempts, error = %err, "retry budget spent: dead-lettering");
            return FetchVerdict::DeadLetter {
                reason: reason::FETCH,
                message: err.message().to_owned(),
                class: err.class(),
                attempts: r.attempts,
            };
        }
        let jitter = self.jitter();
        let delay = self
            .cfg
            .fetch_backoff
            .delay(r.attempts, err.class().retry_after(), jitter);
        tracing::debug!(key = %key, attempts = r.attempts, counted = r.counted,
            delay_ms = delay.as_millis() as u64, error = %err, "fetch failed; retrying");
        FetchVerdict::Retry { retry: r, delay }
    }

    /// Judge a single record's failed write (its `failures`-th).
    pub fn judge_write_failure(&mut self, failures: u32, e: &SinkError) -> WriteVerdict {
        let permanent = !e.class().is_transient();
        if permanent || failures >= self.cfg.sink_record_budget {
            return WriteVerdict::DeadLetter {
                message: e.message().to_owned(),
                class: e.class(),
                attempts: failures,
            };
        }
        let jitter = self.jitter();
        let delay = self
            .cfg
            .sink_backoff
            .delay(failures, e.class().retry_after(), jitter);
        WriteVerdict::Retry { failures, delay }
    }

    fn jitter(&mut self) -> f64 {
        // xorshift64*: cheap, deterministic per engine, good enough to spread retries.
        let mut x = self.jitter_state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.jitter_state = x;
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Is the gone guard holding deletes back?
    pub fn gone_guard_tripped(&self) -> bool {
        self.gone_guard.is_tripped()
    }

    /// The share of gone outcomes in the guard's window.
    pub fn gone_ratio(&self) -> f64 {
        self.gone_guard.ratio()
    }

    /// An operator decided the gone outcomes are real.
    pub fn reset_gone_guard(&mut self) {
        self.gone_guard.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fetch::Entity;

    fn policy() -> Policy {
        Policy::new(EngineConfig {
            retry_budget: 2,
            ..EngineConfig::default()
        })
    }

    #[test]
    fn a_stale_read_is_retried_and_a_fresh_one_written() {
        let mut p = policy();
        let mut c = Counters::default();
        let key = EntityKey::new("c", "1");
        let stale = FetchResult::Outcome(FetchOutcome::Found(Entity::json(
            "{}",
            Some(Version::Int(1)),
        )));
        let v = p.judge_fetch(&key, Some(Version::Int(2)), stale, None, &mut c);
        assert!(matches!(v, FetchVerdict::Retry { .. }), "{v:?}");
        assert_eq!(c.stale_reads, 1);
        let fresh = FetchResult::Outcome(FetchOutcome::Found(Entity::json(
            "{}",
            Some(Version::Int(2)),
        )));
        let v = p.judge_fetch(&key, Some(Version::Int(2)), fresh, None, &mut c);
        assert!(matches!(v, FetchVerdict::Write { .. }), "{v:?}");
    }

    #[test]
    fn the_budget_is_spent_only_against_a_healthy_source() {
        let mut p = policy();
        let mut c = Counters::default();
        let poison = EntityKey::new("c", "poison");
        // Other keys of the source succeed: the source is healthy.
        for i in 0..20 {
            let ok = FetchResult::Outcome(FetchOutcome::Unchanged);
            p.judge_fetch(&EntityKey::new("c", i.to_string()), None, ok, None, &mut c);
        }
        let mut retry = None;
        let mut verdict = None;
        for _ in 0..3 {
            let err = FetchResult::Error(FetchError::transient("503"));
            match p.judge_fetch(&poison, None, err, retry, &mut c) {
                FetchVerdict::Retry { retry: r, .. } => retry = Some(r),
                other => {
                    verdict = Some(other);
                    break;
                }
            }
        }
        assert!(
            matches!(verdict, Some(FetchVerdict::DeadLetter { .. })),
            "{verdict:?}"
        );
        // Not attempted (breaker open): never spends budget.
        let mut retry = None;
        for _ in 0..10 {
            let err = FetchResult::Error(FetchError::not_attempted("breaker open", None));
            match p.judge_fetch(&poison, None, err, retry, &mut c) {
                FetchVerdict::Retry { retry: r, .. } => retry = Some(r),
                other => panic!("not-attempted fetches never dead-letter: {other:?}"),
            }
        }
    }
}
