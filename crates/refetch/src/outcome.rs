//! Outcome policy: what a fetch or write result means for its key.
//!
//! The engine hands every completion to [`Policy`], which answers with a verdict (write this
//! change, the notifications are satisfied, retry after a delay, dead-letter) and keeps the
//! evidence verdicts need, per source (the source serving the key's type, see
//! [`crate::Fetcher::source_name`]):
//!
//! - **Source health** on the wall clock ([`crate::health::SourceHealth`]). A failure spends the
//!   key's retry budget only when, since the key's previous failed attempt, the source mostly
//!   succeeded for other keys (it keeps failing while others succeed in the same period; a first
//!   failure alone is never evidence). When
//!   most recent outcomes of the source fail with one cause (401/403, a maintenance page, 5xx,
//!   timeouts, ...), the source is in outage: its keys are held, none is dead-lettered, however
//!   permanent each answer looks. With no evidence either way (a quiet stream, a single key), the
//!   key keeps retrying with capped backoff and counts as blocked. A permanent error of a single key
//!   while its source is healthy dead-letters that key at once.
//! - **Not attempted** (a breaker open, a group budget with no share) and **throttled** (429)
//!   answers are no evidence at all: the key is retried after the hint, its backoff does not grow,
//!   and no budget is spent.
//! - **The gone guard**, per source ([`crate::health::GoneGuard`]): a "gone" answer becomes a
//!   delete unless the source's share of gone answers is abnormal. A held key's retries are no
//!   new evidence; a reset releases every delete the guard holds. A gone answer for a key whose
//!   notification announced a version the sink does not hold yet is first retried as a stale
//!   read for `gone_grace` (a replica behind the API, right after a create).
//!
//! The policy holds no key state: the engine applies the verdict to the key's flight.

use std::sync::Arc;
use std::time::Duration;

use crate::clock::Tick;
use crate::coalesce::RetryState;
use crate::config::EngineConfig;
use crate::dlq::reason;
use crate::engine::FetchResult;
use crate::error::ErrorClass;
use crate::fetch::{FailureCause, FetchError, FetchOutcome, Validators};
use crate::health::{GoneGuard, GoneVerdict, HealthConfig, Judgement, PerSource, SourceHealth};
use crate::key::{EntityKey, Version};
use crate::sink::{Change, SinkError};
use crate::stats::Counters;

/// How many sources the policy keeps state for (least recently heard of forgotten first).
const MAX_SOURCES: usize = 1024;

/// What the policy needs to know about a fetch besides its result.
#[derive(Debug, Clone)]
pub(crate) struct FetchContext<'a> {
    pub key: &'a EntityKey,
    /// The source serving the key.
    pub source: &'a Arc<str>,
    /// The highest version the flight's notifications announced.
    pub min: Option<Version>,
    /// The version the sink is known to hold.
    pub held: Option<Version>,
    /// Since the flight's first notification arrived.
    pub age: Duration,
    /// The key's retry state so far.
    pub retry: Option<RetryState>,
    pub now: Tick,
}

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
    /// Keep the notifications pending and fetch again after `delay`. With `refresh_failure`,
    /// on-demand refreshes waiting for this key are answered now with that message instead of
    /// waiting (a delete held by the gone guard).
    Retry {
        retry: RetryState,
        delay: Duration,
        refresh_failure: Option<String>,
    },
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

/// A source in outage, for readiness and the status page.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SourceOutage {
    /// The source.
    pub source: String,
    /// The failure most outcomes share ([`FailureCause::label`]).
    pub cause: &'static str,
    /// Outcomes in the health window.
    pub outcomes: u64,
    /// The share of the most common failure among them.
    pub share: f64,
}

/// A source's gone guard, for readiness and the status page.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GuardState {
    /// The source.
    pub source: String,
    /// Deletes are held.
    pub tripped: bool,
    /// The share of gone answers in the window.
    pub ratio: f64,
    /// Outcomes in the window.
    pub samples: usize,
}

/// The evidence behind verdicts.
#[derive(Debug)]
pub(crate) struct Policy {
    cfg: EngineConfig,
    health: PerSource<SourceHealth>,
    guards: PerSource<GoneGuard>,
    jitter_state: u64,
}

impl Policy {
    pub fn new(cfg: EngineConfig) -> Self {
        Policy {
            cfg,
            health: PerSource::new(MAX_SOURCES),
            guards: PerSource::new(MAX_SOURCES),
            jitter_state: 0x9E37_79B9_7F4A_7C15,
        }
    }

    fn health_cfg(&self) -> HealthConfig {
        HealthConfig {
            window: self.cfg.health_window,
            min_samples: self.cfg.health_min_samples,
            outage_ratio: self.cfg.unhealthy_ratio,
        }
    }

    fn health(&mut self, source: &Arc<str>) -> &mut SourceHealth {
        let cfg = self.health_cfg();
        self.health.entry(source, || SourceHealth::new(cfg))
    }

    fn guard(&mut self, source: &Arc<str>) -> &mut GoneGuard {
        let cfg = self.cfg.gone_guard;
        self.guards.entry(source, || GoneGuard::new(cfg))
    }

    /// Judge a fetch.
    pub fn judge_fetch(
        &mut self,
        ctx: &FetchContext<'_>,
        result: FetchResult,
        counters: &mut Counters,
    ) -> FetchVerdict {
        let now = ctx.now;
        match result {
            FetchResult::Abandoned => FetchVerdict::Retry {
                // The engine drops abandoned flights before asking; should one reach here, its
                // notes go back to pending without counting an attempt.
                retry: ctx.retry.unwrap_or_default(),
                delay: Duration::ZERO,
                refresh_failure: None,
            },
            FetchResult::AlreadyHeld(v) => {
                // No request reached the source: no evidence about its health. It is evidence
                // that the entity exists, for the gone guard.
                counters.already_held += 1;
                self.guard(ctx.source).record_present();
                FetchVerdict::Satisfied { held: Some(v) }
            }
            FetchResult::Outcome(FetchOutcome::Unchanged) => {
                counters.add_fetch_outcome("unchanged");
                self.health(ctx.source).record_ok(now);
                self.guard(ctx.source).record_present();
                FetchVerdict::Satisfied { held: None }
            }
            FetchResult::Outcome(FetchOutcome::Found(entity)) => {
                if let (Some(min), Some(got)) = (ctx.min, entity.version) {
                    if !got.fetched_covers(&min) {
                        counters.add_fetch_outcome("stale");
                        let err = FetchError::transient(format!(
                            "stale read: fetched version {got} is older than notified {min}"
                        ))
                        .with_cause(FailureCause::Stale);
                        return self.failed(ctx, &err);
                    }
                }
                self.health(ctx.source).record_ok(now);
                self.guard(ctx.source).record_present();
                counters.add_fetch_outcome("found");
                let validators = entity.validators.clone();
                FetchVerdict::Write {
                    change: Change::Upsert {
                        key: ctx.key.clone(),
                        entity,
                    },
                    validators,
                }
            }
            FetchResult::Outcome(FetchOutcome::Gone) => self.gone(ctx, counters),
            FetchResult::Error(e) => {
                let label = match (&e, e.class()) {
                    (FetchError::NotAttempted { .. }, _) => "not_attempted",
                    (_, ErrorClass::Permanent) => "permanent",
                    _ => "transient",
                };
                counters.add_fetch_outcome(label);
                self.failed(ctx, &e)
            }
        }
    }

    fn gone(&mut self, ctx: &FetchContext<'_>, counters: &mut Counters) -> FetchVerdict {
        let now = ctx.now;
        self.health(ctx.source).record_ok(now);
        // Not yet visible is not gone: the notification announced a version the sink does not
        // hold, and the answer came soon after it.
        let unseen = ctx
            .min
            .is_some_and(|v| ctx.held.is_none_or(|h| !h.held_covers(&v)));
        if unseen && ctx.age < self.cfg.gone_grace {
            counters.add_fetch_outcome("stale");
            let mut r = ctx.retry.unwrap_or_default();
            r.attempts += 1;
            // Never past the end of the grace by more than a moment: then it is judged as gone.
            let left = self.cfg.gone_grace.saturating_sub(ctx.age);
            let delay = self
                .backoff(r.attempts, None)
                .min(left + Duration::from_millis(10));
            tracing::debug!(key = %ctx.key, age_ms = ctx.age.as_millis() as u64,
                "gone right after the notification of an unseen version: retried as a stale read");
            return FetchVerdict::Retry {
                retry: r,
                delay,
                refresh_failure: None,
            };
        }
        let held_before = ctx.retry.is_some_and(|r| r.gone_held);
        let waiting_since = ctx.retry.and_then(|r| r.gone_waiting_since);
        let released = ctx.retry.is_some_and(|r| r.released);
        let wait = self.cfg.gone_guard.wait;
        let guard = self.guard(ctx.source);
        let verdict = if released {
            GoneVerdict::Delete
        } else {
            guard.record_gone(held_before || waiting_since.is_some())
        };
        let ratio = guard.ratio();
        let verdict = match (verdict, waiting_since) {
            // Waited long enough for evidence that never came (a lone delete): write it.
            (GoneVerdict::Wait, Some(since)) if now.since(since) >= wait => GoneVerdict::Delete,
            (v, _) => v,
        };
        match verdict {
            GoneVerdict::Wait => {
                let mut r = ctx.retry.unwrap_or_default();
                let since = *r.gone_waiting_since.get_or_insert(now);
                let left = wait.saturating_sub(now.since(since));
                FetchVerdict::Retry {
                    retry: r,
                    delay: left.min(Duration::from_secs(1)),
                    refresh_failure: None,
                }
            }
            GoneVerdict::Delete => {
                counters.add_fetch_outcome("gone");
                FetchVerdict::Write {
                    change: Change::Delete {
                        key: ctx.key.clone(),
                    },
                    validators: None,
                }
            }
            GoneVerdict::Hold => {
                counters.gone_held += 1;
                if !held_before {
                    tracing::warn!(key = %ctx.key, source = %ctx.source, ratio,
                        "gone guard tripped: delete held back");
                }
                let mut r = ctx.retry.unwrap_or_default();
                r.gone_held = true;
                r.blocked = true;
                FetchVerdict::Retry {
                    retry: r,
                    delay: self.cfg.fetch_backoff.max,
                    refresh_failure: Some(format!(
                        "the delete of {} is held: the gone guard of source {} is tripped ({:.0}% \
                         of recent fetches said gone); reset the guard if the deletes are real",
                        ctx.key,
                        ctx.source,
                        ratio * 100.0
                    )),
                }
            }
        }
    }

    /// A failed fetch: judge it against the source's health.
    fn failed(&mut self, ctx: &FetchContext<'_>, err: &FetchError) -> FetchVerdict {
        let mut r = ctx.retry.unwrap_or_default();
        let cause = match err.cause() {
            // Not attempted: no evidence; retry when the hint says, without growing the backoff.
            None => {
                r.blocked = true;
                let delay = err.class().retry_after().map_or_else(
                    || self.backoff(r.attempts.max(1), None),
                    |d| d.min(crate::config::MAX_RETRY_AFTER),
                );
                return FetchVerdict::Retry {
                    retry: r,
                    delay,
                    refresh_failure: None,
                };
            }
            // Throttled: the source asked to slow down; honour it, spend nothing.
            Some(FailureCause::Throttled) => {
                let delay = err.class().retry_after().map_or_else(
                    || self.backoff(r.attempts.max(1), None),
                    |d| d.min(crate::config::MAX_RETRY_AFTER),
                );
                return FetchVerdict::Retry {
                    retry: r,
                    delay,
                    refresh_failure: None,
                };
            }
            // The key itself cannot be fetched: no request was made, nothing about the source.
            Some(FailureCause::Key) => {
                return FetchVerdict::DeadLetter {
                    reason: reason::FETCH,
                    message: err.message().to_owned(),
                    class: err.class(),
                    attempts: r.attempts + 1,
                };
            }
            Some(c) => c,
        };
        r.attempts += 1;
        let previous = r.last_failure;
        let (judgement, mark) = self
            .health(ctx.source)
            .record_failure(ctx.now, cause, previous);
        r.last_failure = Some(mark);
        match judgement {
            Judgement::Healthy => {
                r.blocked = false;
                r.counted += 1;
                if !err.class().is_transient() {
                    return FetchVerdict::DeadLetter {
                        reason: reason::FETCH,
                        message: err.message().to_owned(),
                        class: ErrorClass::Permanent,
                        attempts: r.attempts,
                    };
                }
                if r.counted >= self.cfg.retry_budget {
                    tracing::warn!(key = %ctx.key, attempts = r.attempts, error = %err,
                        "retry budget spent while the source serves other keys: dead-lettering");
                    return FetchVerdict::DeadLetter {
                        reason: reason::FETCH,
                        message: err.message().to_owned(),
                        class: err.class(),
                        attempts: r.attempts,
                    };
                }
            }
            Judgement::Outage(c) => {
                r.blocked = true;
                tracing::debug!(key = %ctx.key, source = %ctx.source, cause = c.label(),
                    "source in outage: the key is held, not dead-lettered");
            }
            Judgement::NoEvidence => {
                r.blocked = true;
                tracing::debug!(key = %ctx.key, source = %ctx.source,
                    "no other key of the source succeeded lately: the key is held, not dead-lettered");
            }
        }
        let delay = self.backoff(r.attempts, err.class().retry_after());
        tracing::debug!(key = %ctx.key, attempts = r.attempts, counted = r.counted,
            delay_ms = delay.as_millis() as u64, error = %err, "fetch failed; retrying");
        FetchVerdict::Retry {
            retry: r,
            delay,
            refresh_failure: None,
        }
    }

    fn backoff(&mut self, attempts: u32, retry_after: Option<Duration>) -> Duration {
        let jitter = self.jitter();
        self.cfg
            .fetch_backoff
            .delay(attempts.max(1), retry_after, jitter)
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

    /// Is any source's gone guard holding deletes back?
    pub fn gone_guard_tripped(&self) -> bool {
        self.guards.iter().any(|(_, g)| g.is_tripped())
    }

    /// The highest share of gone answers over the sources.
    pub fn gone_ratio(&self) -> f64 {
        self.guards
            .iter()
            .map(|(_, g)| g.ratio())
            .fold(0.0, f64::max)
    }

    /// Every source's gone guard.
    pub fn guards(&self) -> Vec<GuardState> {
        let mut out: Vec<GuardState> = self
            .guards
            .iter()
            .map(|(s, g)| GuardState {
                source: s.to_string(),
                tripped: g.is_tripped(),
                ratio: g.ratio(),
                samples: g.samples(),
            })
            .collect();
        out.sort_by(|a, b| a.source.cmp(&b.source));
        out
    }

    /// Sources in outage now.
    pub fn outages(&self, now: Tick) -> Vec<SourceOutage> {
        let mut out: Vec<SourceOutage> = self
            .health
            .iter()
            .filter_map(|(s, h)| {
                let cause = h.outage()?;
                let (outcomes, share) = h.summary(now);
                Some(SourceOutage {
                    source: s.to_string(),
                    cause: cause.label(),
                    outcomes,
                    share,
                })
            })
            .collect();
        out.sort_by(|a, b| a.source.cmp(&b.source));
        out
    }

    /// Is `source` in outage?
    #[cfg(test)]
    pub fn in_outage(&self, source: &str) -> bool {
        self.health
            .get(source)
            .is_some_and(|h| h.outage().is_some())
    }

    /// An operator decided the gone answers of `source` (every source with `None`) are real.
    pub fn reset_gone_guard(&mut self, source: Option<&str>) {
        for (s, g) in self.guards.iter_mut() {
            if source.is_none_or(|want| **s == *want) {
                g.reset();
            }
        }
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

    fn ctx<'a>(key: &'a EntityKey, source: &'a Arc<str>, now: u64) -> FetchContext<'a> {
        FetchContext {
            key,
            source,
            min: None,
            held: None,
            age: Duration::from_secs(60),
            retry: None,
            now: Tick(now),
        }
    }

    #[test]
    fn a_stale_read_is_retried_and_a_fresh_one_written() {
        let mut p = policy();
        let mut c = Counters::default();
        let key = EntityKey::new("c", "1");
        let src: Arc<str> = Arc::from("crm");
        let stale = FetchResult::Outcome(FetchOutcome::Found(Entity::json(
            "{}",
            Some(Version::Int(1)),
        )));
        let mut cx = ctx(&key, &src, 0);
        cx.min = Some(Version::Int(2));
        let v = p.judge_fetch(&cx, stale, &mut c);
        assert!(matches!(v, FetchVerdict::Retry { .. }), "{v:?}");
        assert_eq!(c.stale_reads, 1);
        let fresh = FetchResult::Outcome(FetchOutcome::Found(Entity::json(
            "{}",
            Some(Version::Int(2)),
        )));
        let v = p.judge_fetch(&cx, fresh, &mut c);
        assert!(matches!(v, FetchVerdict::Write { .. }), "{v:?}");
    }

    #[test]
    fn the_budget_is_spent_only_while_other_keys_succeed() {
        let mut p = policy();
        let mut c = Counters::default();
        let src: Arc<str> = Arc::from("crm");
        let poison = EntityKey::new("c", "poison");
        for i in 0..20 {
            let k = EntityKey::new("c", i.to_string());
            let ok = FetchResult::Outcome(FetchOutcome::Unchanged);
            p.judge_fetch(&ctx(&k, &src, i), ok, &mut c);
        }
        let mut retry = None;
        let mut verdict = None;
        for t in 0..4 {
            // Other keys keep succeeding while the poison key fails.
            let k = EntityKey::new("c", format!("ok{t}"));
            let ok = FetchResult::Outcome(FetchOutcome::Unchanged);
            p.judge_fetch(&ctx(&k, &src, 100 + 2 * t), ok, &mut c);
            let err =
                FetchResult::Error(FetchError::transient("503").with_cause(FailureCause::Server));
            let mut cx = ctx(&poison, &src, 101 + 2 * t);
            cx.retry = retry;
            match p.judge_fetch(&cx, err, &mut c) {
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
    }

    #[test]
    fn nothing_is_dead_lettered_without_evidence_or_in_an_outage() {
        let mut p = policy();
        let mut c = Counters::default();
        let src: Arc<str> = Arc::from("crm");
        let only = EntityKey::new("c", "only");
        // A quiet stream: the only key of a source that is down, for two minutes.
        let mut retry = None;
        for t in 0..120 {
            let err = FetchResult::Error(
                FetchError::transient("refused").with_cause(FailureCause::Connect),
            );
            let mut cx = ctx(&only, &src, t * 1000);
            cx.retry = retry;
            match p.judge_fetch(&cx, err, &mut c) {
                FetchVerdict::Retry { retry: r, .. } => {
                    assert!(r.blocked);
                    assert_eq!(r.counted, 0);
                    retry = Some(r);
                }
                other => panic!("dead-lettered during an outage: {other:?}"),
            }
        }
        assert!(p.in_outage("crm"));
        // Every key answers 401 (an expired credential): permanent answers, but an outage.
        let mut p = policy();
        for i in 0..10 {
            let k = EntityKey::new("c", i.to_string());
            p.judge_fetch(
                &ctx(&k, &src, i),
                FetchResult::Outcome(FetchOutcome::Unchanged),
                &mut c,
            );
        }
        for i in 0..40 {
            let k = EntityKey::new("c", format!("k{i}"));
            let err = FetchResult::Error(
                FetchError::permanent("HTTP 401").with_cause(FailureCause::Auth),
            );
            let v = p.judge_fetch(&ctx(&k, &src, 100 + i), err, &mut c);
            if i >= 15 {
                assert!(matches!(v, FetchVerdict::Retry { .. }), "key {i}: {v:?}");
            }
        }
        let outages = p.outages(Tick(200));
        assert_eq!(outages.len(), 1);
        assert_eq!(outages[0].cause, "auth");
    }

    #[test]
    fn a_single_keys_permanent_error_on_a_healthy_source_dead_letters_it() {
        let mut p = policy();
        let mut c = Counters::default();
        let src: Arc<str> = Arc::from("crm");
        for i in 0..30 {
            let k = EntityKey::new("c", i.to_string());
            p.judge_fetch(
                &ctx(&k, &src, i),
                FetchResult::Outcome(FetchOutcome::Unchanged),
                &mut c,
            );
        }
        let bad = EntityKey::new("c", "bad");
        let err = || FetchResult::Error(FetchError::permanent("HTTP 400"));
        // The first failure waits for evidence: did the others succeed meanwhile?
        let first = p.judge_fetch(&ctx(&bad, &src, 50), err(), &mut c);
        let FetchVerdict::Retry { retry, .. } = first else {
            panic!("the first failure is held for evidence: {first:?}");
        };
        let other = EntityKey::new("c", "other");
        p.judge_fetch(
            &ctx(&other, &src, 51),
            FetchResult::Outcome(FetchOutcome::Unchanged),
            &mut c,
        );
        let mut cx = ctx(&bad, &src, 52);
        cx.retry = Some(retry);
        assert!(matches!(
            p.judge_fetch(&cx, err(), &mut c),
            FetchVerdict::DeadLetter { .. }
        ));
    }

    #[test]
    fn not_attempted_fetches_never_grow_the_backoff_or_spend_budget() {
        let mut p = policy();
        let mut c = Counters::default();
        let src: Arc<str> = Arc::from("crm");
        let k = EntityKey::new("c", "1");
        let mut retry = None;
        for _ in 0..10 {
            let err = FetchResult::Error(FetchError::not_attempted(
                "breaker open",
                Some(Duration::from_millis(700)),
            ));
            let mut cx = ctx(&k, &src, 0);
            cx.retry = retry;
            match p.judge_fetch(&cx, err, &mut c) {
                FetchVerdict::Retry {
                    retry: r, delay, ..
                } => {
                    assert_eq!(
                        delay,
                        Duration::from_millis(700),
                        "retried when it half-opens"
                    );
                    assert_eq!(r.attempts, 0);
                    retry = Some(r);
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn gone_right_after_an_unseen_version_is_a_stale_read_first() {
        let mut p = policy();
        let mut c = Counters::default();
        let src: Arc<str> = Arc::from("crm");
        // Other entities of the source exist: a delete among them is judged normal.
        for i in 0..10 {
            let k = EntityKey::new("c", i.to_string());
            p.judge_fetch(
                &ctx(&k, &src, i),
                FetchResult::Outcome(FetchOutcome::Unchanged),
                &mut c,
            );
        }
        let k = EntityKey::new("c", "new");
        let mut cx = ctx(&k, &src, 0);
        cx.min = Some(Version::Int(1));
        cx.age = Duration::from_millis(200);
        assert!(matches!(
            p.judge_fetch(&cx, FetchResult::Outcome(FetchOutcome::Gone), &mut c),
            FetchVerdict::Retry { .. }
        ));
        cx.age = Duration::from_secs(11);
        assert!(matches!(
            p.judge_fetch(&cx, FetchResult::Outcome(FetchOutcome::Gone), &mut c),
            FetchVerdict::Write {
                change: Change::Delete { .. },
                ..
            }
        ));
    }
}
