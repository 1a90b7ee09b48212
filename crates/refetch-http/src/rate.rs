//! The rate limit of a source, with a budget the consumer group may share, changeable live.
//!
//! A source's `rate_limit` is either this process's own (`rate_limit = 50.0`) or the whole
//! group's (`rate_limit = { per_second = 100, scope = "group" }`). A group budget is split by
//! ownership: each instance takes `owned / total` of it, the share of the subscribed topics'
//! partitions it is assigned, which the engine reports through
//! [`refetch::Fetcher::ownership_changed`] after every assignment and revoke. There is no
//! coordinator: the shares add up to the whole budget because the partitions do.
//!
//! **The approximation**: shares follow partitions, not load. An instance whose partitions carry
//! more changes than others' waits for its own share while the others' shares go unused, and
//! during a rebalance the shares are briefly out of step (an instance that lost partitions may
//! not have heard yet while another already took them over). The budget is a ceiling that holds
//! in the steady state; under skewed load the group sends less than it could.
//!
//! An instance whose share is zero (it owns none of the partitions) sends nothing: a call is
//! answered at once with `Err(retry_after)` ([`ZERO_SHARE_RETRY`]), which the fetcher returns as
//! [`refetch::FetchError::NotAttempted`], so the key is retried later without spending its retry
//! budget. Before the first report the share is unknown and counts as the whole budget (a
//! process that never joins a group, such as `refetch backfill`, takes all of it).
//!
//! `governor` cannot change a limiter's quota, so a change (a new share, a live
//! reconfiguration) builds a new limiter and swaps it in. Callers waiting on the old one are woken
//! and queue on the new one; a swapped-in limiter starts with its burst used up, so a swap never
//! lets an extra burst through. Waits sleep on the tokio clock (the limiter reads it too), so
//! paused-time tests drive the limiter like everything else.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use refetch::OwnershipShare;
use tokio::sync::Notify;

use crate::config::{RateLimit, RateScope};

/// The retry hint of a call refused because this instance owns no partition.
pub const ZERO_SHARE_RETRY: Duration = Duration::from_secs(1);

/// The tokio clock as a governor clock (nanoseconds since the limiter was built).
#[derive(Debug, Clone, Copy)]
struct TokioClock {
    base: tokio::time::Instant,
}

impl Clock for TokioClock {
    type Instant = Nanos;
    fn now(&self) -> Nanos {
        Nanos::from(tokio::time::Instant::now().saturating_duration_since(self.base))
    }
}

type Limiter = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Nanos>>;

/// The limit in force: its generation tells waiters that it was replaced.
struct Current {
    generation: u64,
    limit: Limit,
}

enum Limit {
    Unlimited,
    /// This instance's share is zero.
    Paused,
    Limited {
        limiter: Limiter,
        clock: TokioClock,
    },
}

/// What a source's rate is now, for status pages and tests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateStatus {
    /// The configured limit, if any.
    pub configured: Option<RateLimit>,
    /// The share of the group budget this instance takes (1 for a per-instance limit).
    pub share: f64,
    /// Requests per second this instance may send now (`None`: unlimited).
    pub per_second: Option<f64>,
    /// Burst of this instance now.
    pub burst: u32,
}

/// Why a call may not go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// This instance owns no partition of a group budget: try again after this long.
    ZeroShare(Duration),
}

/// A source's rate limit (see the [module docs](self)).
pub struct RateBudget {
    name: Arc<str>,
    config: Mutex<(Option<RateLimit>, OwnershipShare)>,
    current: RwLock<Arc<Current>>,
    changed: Notify,
}

impl std::fmt::Debug for RateBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateBudget")
            .field("name", &self.name)
            .field("status", &self.status())
            .finish()
    }
}

/// Why a rate limit is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    /// Not a positive, finite number.
    #[error("rate_limit must be a positive number")]
    NotPositive,
    /// Too high for the limiter (more than one request per nanosecond).
    #[error("rate_limit is too high")]
    TooHigh,
    /// A burst of zero.
    #[error("burst must be at least 1")]
    ZeroBurst,
}

/// Check a limit (with the source-level `burst`) and return it with its burst resolved.
pub(crate) fn resolve(
    limit: Option<RateLimit>,
    burst: Option<u32>,
) -> Result<Option<RateLimit>, RateError> {
    let Some(mut limit) = limit else {
        return Ok(None);
    };
    if !(limit.per_second.is_finite() && limit.per_second > 0.0) {
        return Err(RateError::NotPositive);
    }
    if limit.per_second > 1e9 {
        return Err(RateError::TooHigh);
    }
    let burst = limit
        .burst
        .or(burst)
        .unwrap_or(limit.per_second.ceil().max(1.0) as u32);
    if burst == 0 {
        return Err(RateError::ZeroBurst);
    }
    limit.burst = Some(burst);
    Ok(Some(limit))
}

fn share_of(limit: &RateLimit, share: OwnershipShare) -> f64 {
    match limit.scope {
        RateScope::Instance => 1.0,
        RateScope::Group => share.ratio(),
    }
}

/// This instance's rate and burst for `limit` at `share` (`None`: paused).
fn effective(limit: &RateLimit, share: OwnershipShare) -> Option<(f64, u32)> {
    let s = share_of(limit, share);
    if s <= 0.0 {
        return None;
    }
    let burst = limit.burst.unwrap_or(1);
    let rate = limit.per_second * s;
    let burst = ((f64::from(burst) * s).round() as u32).max(1);
    Some((rate, burst))
}

fn build(limit: Option<&RateLimit>, share: OwnershipShare, drained: bool) -> Limit {
    let Some(limit) = limit else {
        return Limit::Unlimited;
    };
    let Some((rate, burst)) = effective(limit, share) else {
        return Limit::Paused;
    };
    let period = Duration::from_secs_f64(1.0 / rate).max(Duration::from_nanos(1));
    let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
    let Some(quota) = Quota::with_period(period) else {
        return Limit::Unlimited;
    };
    let clock = TokioClock {
        base: tokio::time::Instant::now(),
    };
    let limiter = RateLimiter::direct_with_clock(quota.allow_burst(burst), clock);
    if drained {
        // A swapped-in limiter starts with its burst spent: a swap is no occasion for a burst.
        let _ = limiter.check_n(burst);
    }
    Limit::Limited { limiter, clock }
}

impl RateBudget {
    /// A budget for source `name`; `limit` must have passed [`resolve`].
    pub(crate) fn new(name: Arc<str>, limit: Option<RateLimit>) -> Self {
        let share = OwnershipShare::default();
        RateBudget {
            current: RwLock::new(Arc::new(Current {
                generation: 0,
                limit: build(limit.as_ref(), share, false),
            })),
            config: Mutex::new((limit, share)),
            changed: Notify::new(),
            name,
        }
    }

    fn config(&self) -> MutexGuard<'_, (Option<RateLimit>, OwnershipShare)> {
        self.config.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn current(&self) -> Arc<Current> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn swap(&self, limit: Option<RateLimit>, share: OwnershipShare) {
        let mut cfg = self.config();
        let before = effective_of(cfg.0.as_ref(), cfg.1);
        *cfg = (limit, share);
        let after = effective_of(limit.as_ref(), share);
        if before == after {
            return;
        }
        {
            let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
            let generation = current.generation + 1;
            *current = Arc::new(Current {
                generation,
                limit: build(limit.as_ref(), share, true),
            });
        }
        drop(cfg);
        tracing::info!(
            source = %self.name,
            per_second = after.map(|(r, _)| r),
            burst = after.map(|(_, b)| b),
            owned = share.owned,
            total = share.total,
            "source rate limit changed"
        );
        self.changed.notify_waiters();
    }

    /// This instance's share of the group changed.
    pub(crate) fn set_share(&self, share: OwnershipShare) {
        let limit = self.config().0;
        self.swap(limit, share);
    }

    /// The configured limit changed (live reconfiguration); `limit` must have passed
    /// [`resolve`].
    pub(crate) fn set_limit(&self, limit: Option<RateLimit>) {
        let share = self.config().1;
        self.swap(limit, share);
    }

    /// The rate now.
    pub fn status(&self) -> RateStatus {
        let (limit, share) = *self.config();
        let eff = effective_of(limit.as_ref(), share);
        RateStatus {
            configured: limit,
            share: limit.as_ref().map_or(1.0, |l| share_of(l, share)),
            per_second: match (limit, eff) {
                (None, _) => None,
                (Some(_), Some((r, _))) => Some(r),
                (Some(_), None) => Some(0.0),
            },
            burst: eff.map_or(0, |(_, b)| b),
        }
    }

    /// Wait until one call may go out. `Ok(true)` when it had to wait (for the metric),
    /// `Err` when this instance may send nothing now. Cancel-safe.
    pub(crate) async fn acquire(&self) -> Result<bool, Refusal> {
        let mut waited = false;
        loop {
            let current = self.current();
            let wait = match &current.limit {
                Limit::Unlimited => return Ok(waited),
                Limit::Paused => return Err(Refusal::ZeroShare(ZERO_SHARE_RETRY)),
                Limit::Limited { limiter, clock } => match limiter.check() {
                    Ok(()) => return Ok(waited),
                    Err(not_until) => not_until.wait_time_from(clock.now()),
                },
            };
            waited = true;
            // Register for a swap before checking that none happened since the limit was read,
            // so a swap in between is not missed.
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.current().generation != current.generation {
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(wait.max(Duration::from_micros(100))) => {}
                _ = &mut notified => {
                    tracing::trace!(source = %self.name, from = current.generation, "rate limiter swapped while waiting");
                }
            }
        }
    }
}

fn effective_of(limit: Option<&RateLimit>, share: OwnershipShare) -> Option<(f64, u32)> {
    match limit {
        None => Some((f64::INFINITY, 0)),
        Some(l) => effective(l, share),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    fn budget(limit: RateLimit) -> Arc<RateBudget> {
        Arc::new(RateBudget::new(
            "t".into(),
            resolve(Some(limit), None).expect("valid"),
        ))
    }

    /// How many calls get through in `span` with callers always waiting.
    async fn through_in(b: &Arc<RateBudget>, span: Duration) -> usize {
        let end = Instant::now() + span;
        let mut n = 0;
        while Instant::now() < end {
            tokio::select! {
                r = b.acquire() => { r.expect("not paused"); n += 1; }
                _ = tokio::time::sleep_until(end) => break,
            }
        }
        n
    }

    #[tokio::test(start_paused = true)]
    async fn group_budget_follows_the_share_and_a_zero_share_sends_nothing() {
        let b = budget(RateLimit {
            per_second: 30.0,
            burst: Some(3),
            scope: RateScope::Group,
        });
        assert_eq!(
            b.status().per_second,
            Some(30.0),
            "share unknown: all of it"
        );
        b.set_share(OwnershipShare { owned: 2, total: 6 });
        let s = b.status();
        assert_eq!((s.per_second, s.burst), (Some(10.0), 1));
        // 10 s at 10/s, drained at the swap: 100 calls (one more for the first conforming cell).
        let n = through_in(&b, Duration::from_secs(10)).await;
        assert!((99..=101).contains(&n), "{n}");
        b.set_share(OwnershipShare { owned: 0, total: 6 });
        assert_eq!(b.acquire().await, Err(Refusal::ZeroShare(ZERO_SHARE_RETRY)));
        assert_eq!(b.status().per_second, Some(0.0));
        b.set_share(OwnershipShare { owned: 3, total: 6 });
        let n = through_in(&b, Duration::from_secs(10)).await;
        assert!((149..=151).contains(&n), "{n}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_instance_budget_ignores_the_share() {
        let b = budget(RateLimit::per_instance(5.0));
        b.set_share(OwnershipShare { owned: 0, total: 6 });
        assert_eq!(b.status().per_second, Some(5.0));
        assert!(b.acquire().await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_move_to_the_new_limiter_without_an_extra_burst() {
        let b = budget(RateLimit {
            per_second: 1.0,
            burst: Some(1),
            scope: RateScope::Instance,
        });
        assert_eq!(b.acquire().await, Ok(false), "the first call is free");
        // A waiter on the slow limiter (1/s) ...
        let waiter = tokio::spawn({
            let b = b.clone();
            async move {
                let started = Instant::now();
                b.acquire().await.expect("ok");
                started.elapsed()
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        // ... is moved to the faster one (10/s) at once, which starts drained.
        b.set_limit(resolve(Some(RateLimit::per_instance(10.0)), Some(1)).expect("valid"));
        let waited = waiter.await.expect("joined");
        assert!(
            waited >= Duration::from_millis(190) && waited < Duration::from_millis(300),
            "{waited:?}"
        );
        // Over 5 s at 10/s: 50 calls, not 50 plus a burst.
        let n = through_in(&b, Duration::from_secs(5)).await;
        assert!((49..=51).contains(&n), "{n}");
    }

    #[test]
    fn limits_are_checked() {
        assert_eq!(
            resolve(Some(RateLimit::per_instance(0.0)), None),
            Err(RateError::NotPositive)
        );
        assert_eq!(
            resolve(Some(RateLimit::per_instance(f64::NAN)), None),
            Err(RateError::NotPositive)
        );
        assert_eq!(
            resolve(Some(RateLimit::per_instance(2.0)), Some(0)),
            Err(RateError::ZeroBurst)
        );
        let r = resolve(Some(RateLimit::per_instance(2.5)), None).expect("ok");
        assert_eq!(r.and_then(|r| r.burst), Some(3), "one second's worth");
    }
}
