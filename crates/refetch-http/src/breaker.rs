//! The circuit breaker: stop asking a source that fails most of the calls it gets.
//!
//! It judges *rates, not bursts*. Every call's outcome is put in a time window (`window`, split in
//! [`BUCKETS`] buckets) and the breaker opens only when, within that window,
//!
//! - at least `failures` calls failed,
//! - at least `min_calls` calls were made, counting the calls still in flight, and
//! - the failed share of those calls is at least `failure_ratio`.
//!
//! Counting the calls in flight is what keeps a flaky source from tripping it: when errors come
//! back at once and successes take their time, the first answers after a quiet spell are mostly
//! errors, yet the calls still out are mostly successes-to-be. A run of consecutive failures
//! (what this breaker replaced) is exactly that burst.
//!
//! What counts (see [`CallOutcome::of`]):
//!
//! | outcome | counts as |
//! |---|---|
//! | a 5xx, a timeout, a connection/DNS/TLS error, a gateway's 404 | failure |
//! | 401/403 (`Auth`), a `200 text/html` where JSON is expected (`ContentType`) | failure: every key meets it, the source is not serving |
//! | 429 (`Throttled`) | neither: throttling is not failure (its `Retry-After` goes on the key's error) |
//! | 2xx, 304, 404/410, another 4xx, an undecodable body | success: the source answered |
//!
//! Open, every call is answered at once with `Err(retry_after)`, the time until it half-opens,
//! which the fetcher turns into [`refetch::FetchError::NotAttempted`]: the engine retries those
//! keys then, without spending their retry budget. After `cooldown` it half-opens and lets
//! `probes` calls through (at most that many at once): when that many succeed it closes with an
//! empty window, one failure opens it for another `cooldown`, a throttled or abandoned probe
//! (its future dropped) frees its slot. Results of calls admitted before it opened do not move
//! it.
//!
//! Time is `tokio::time::Instant`, so tests can drive it with `tokio::time::pause`.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use refetch::{FailureCause, FetchError};
use tokio::time::Instant;

use crate::config::BreakerConfig;

/// How many buckets the window is split into: outcomes leave the window one bucket at a time.
pub const BUCKETS: u32 = 10;

/// The retry hint while every probe slot is taken (capped by the cooldown).
const PROBING_HINT: Duration = Duration::from_secs(1);

/// What one call tells the breaker about its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOutcome {
    /// The source answered (whatever the answer meant for the key).
    Success,
    /// The source failed.
    Failure,
    /// The source asked to slow down: counted neither way.
    Throttled,
}

impl CallOutcome {
    /// How the breaker counts a call's result.
    pub fn of<T>(result: &Result<T, FetchError>) -> CallOutcome {
        match result {
            Ok(_) => CallOutcome::Success,
            Err(FetchError::NotAttempted { .. }) => CallOutcome::Throttled,
            Err(e) => match e.cause() {
                Some(FailureCause::Throttled) => CallOutcome::Throttled,
                Some(
                    FailureCause::Server
                    | FailureCause::Timeout
                    | FailureCause::Connect
                    | FailureCause::Auth
                    | FailureCause::ContentType,
                ) => CallOutcome::Failure,
                // Another transient failure the fetcher could not name: the source did not
                // serve the call.
                _ if matches!(e, FetchError::Transient { .. }) => CallOutcome::Failure,
                _ => CallOutcome::Success,
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Settings {
    failures: u32,
    ratio: f64,
    min_calls: u32,
    window: Duration,
    cooldown: Duration,
    probes: u32,
}

impl From<&BreakerConfig> for Settings {
    fn from(c: &BreakerConfig) -> Self {
        Settings {
            failures: c.failures,
            ratio: c.failure_ratio,
            min_calls: c.min_calls.max(1),
            window: c.window.max(Duration::from_millis(BUCKETS as u64)),
            cooldown: c.cooldown,
            probes: c.probes.max(1),
        }
    }
}

impl Settings {
    fn enabled(&self) -> bool {
        self.failures > 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed,
    Open { until: Instant },
    HalfOpen { out: u32, succeeded: u32 },
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    index: u64,
    calls: u32,
    failures: u32,
}

/// Outcomes of the last `window`, in buckets.
#[derive(Debug)]
struct Window {
    base: Instant,
    buckets: VecDeque<Bucket>,
}

impl Window {
    fn new() -> Self {
        Window {
            base: Instant::now(),
            buckets: VecDeque::with_capacity(BUCKETS as usize + 1),
        }
    }

    fn index(&self, now: Instant, window: Duration) -> u64 {
        let width = (window / BUCKETS).as_nanos().max(1);
        (now.saturating_duration_since(self.base).as_nanos() / width) as u64
    }

    fn prune(&mut self, current: u64) {
        while let Some(b) = self.buckets.front() {
            if b.index + u64::from(BUCKETS) <= current {
                self.buckets.pop_front();
            } else {
                break;
            }
        }
    }

    fn add(&mut self, now: Instant, window: Duration, failed: bool) {
        let current = self.index(now, window);
        self.prune(current);
        match self.buckets.back_mut() {
            Some(b) if b.index == current => {
                b.calls = b.calls.saturating_add(1);
                b.failures = b.failures.saturating_add(u32::from(failed));
            }
            _ => self.buckets.push_back(Bucket {
                index: current,
                calls: 1,
                failures: u32::from(failed),
            }),
        }
    }

    /// (calls, failures) in the window ending `now`.
    fn totals(&mut self, now: Instant, window: Duration) -> (u64, u64) {
        let current = self.index(now, window);
        self.prune(current);
        self.buckets.iter().fold((0, 0), |(c, f), b| {
            (c + u64::from(b.calls), f + u64::from(b.failures))
        })
    }

    fn clear(&mut self) {
        self.buckets.clear();
    }
}

#[derive(Debug)]
struct Inner {
    settings: Settings,
    state: State,
    window: Window,
    /// Calls admitted while closed whose result is not in yet.
    in_flight: u64,
}

/// A snapshot of a breaker, for status pages and tests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerStatus {
    /// Open or half-open.
    pub open: bool,
    /// Calls in the window, in flight included.
    pub calls: u64,
    /// Failed calls in the window.
    pub failures: u64,
}

type OnChange = Box<dyn Fn(bool) + Send + Sync>;

/// A circuit breaker shared by all calls to one source.
pub struct Breaker {
    name: Arc<str>,
    inner: Mutex<Inner>,
    on_change: OnChange,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Admitted while closed: its outcome goes into the window.
    Counted,
    /// A half-open probe.
    Probe,
}

/// Permission to make one call; report its outcome with [`Pass::record`]. Dropping it without a
/// report (the call was abandoned) frees its place.
#[derive(Debug)]
#[must_use = "report the outcome with `record`"]
pub struct Pass {
    breaker: Option<Arc<Breaker>>,
    kind: Kind,
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.lock();
        f.debug_struct("Breaker")
            .field("name", &self.name)
            .field("settings", &inner.settings)
            .field("state", &inner.state)
            .finish()
    }
}

impl Breaker {
    /// A breaker for source `name` configured by `config` (`failures = 0`: never opens).
    /// `on_change(open)` is called whenever it opens (`true`) or closes (`false`).
    pub fn new(
        name: impl Into<Arc<str>>,
        config: &BreakerConfig,
        on_change: impl Fn(bool) + Send + Sync + 'static,
    ) -> Self {
        Breaker {
            name: name.into(),
            inner: Mutex::new(Inner {
                settings: Settings::from(config),
                state: State::Closed,
                window: Window::new(),
                in_flight: 0,
            }),
            on_change: Box::new(on_change),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Apply new settings live. The window and the state are kept; a breaker that is turned
    /// off closes.
    pub fn update(&self, config: &BreakerConfig) {
        let mut inner = self.lock();
        let was_open = inner.state != State::Closed;
        inner.settings = Settings::from(config);
        if !inner.settings.enabled() {
            inner.state = State::Closed;
        }
        let open = inner.state != State::Closed;
        drop(inner);
        if was_open != open {
            (self.on_change)(open);
        }
    }

    /// Ask for permission to make a call. `Err(retry_after)` while open (the time until it
    /// half-opens) or while every probe slot is taken.
    pub fn admit(self: &Arc<Self>) -> Result<Pass, Duration> {
        let mut inner = self.lock();
        if !inner.settings.enabled() {
            return Ok(Pass {
                breaker: None,
                kind: Kind::Counted,
            });
        }
        let now = Instant::now();
        if let State::Open { until } = inner.state {
            if now < until {
                return Err(until - now);
            }
            inner.state = State::HalfOpen {
                out: 0,
                succeeded: 0,
            };
            tracing::info!(source = %self.name, "circuit breaker half-open: probing");
        }
        match inner.state {
            State::Closed => {
                inner.in_flight += 1;
                Ok(Pass {
                    breaker: Some(self.clone()),
                    kind: Kind::Counted,
                })
            }
            State::HalfOpen { out, succeeded } if out + succeeded < inner.settings.probes => {
                inner.state = State::HalfOpen {
                    out: out + 1,
                    succeeded,
                };
                Ok(Pass {
                    breaker: Some(self.clone()),
                    kind: Kind::Probe,
                })
            }
            State::HalfOpen { .. } | State::Open { .. } => Err(inner
                .settings
                .cooldown
                .min(PROBING_HINT)
                .max(Duration::from_millis(10))),
        }
    }

    /// Would [`Breaker::admit`] refuse now? `Some(retry_after)` when it is open (its cooldown not
    /// over yet) or every probe slot is taken. Changes nothing.
    pub fn refusal(&self) -> Option<Duration> {
        let inner = self.lock();
        if !inner.settings.enabled() {
            return None;
        }
        match inner.state {
            State::Closed => None,
            State::Open { until } => {
                let now = Instant::now();
                (now < until).then(|| until - now)
            }
            State::HalfOpen { out, succeeded } => {
                (out + succeeded >= inner.settings.probes).then(|| {
                    inner
                        .settings
                        .cooldown
                        .min(PROBING_HINT)
                        .max(Duration::from_millis(10))
                })
            }
        }
    }

    /// Is the breaker open or half-open?
    pub fn is_open(&self) -> bool {
        self.lock().state != State::Closed
    }

    /// The breaker's state and the window's counts now.
    pub fn status(&self) -> BreakerStatus {
        let mut inner = self.lock();
        let window = inner.settings.window;
        let (calls, failures) = inner.window.totals(Instant::now(), window);
        BreakerStatus {
            open: inner.state != State::Closed,
            calls: calls + inner.in_flight,
            failures,
        }
    }

    fn settle(&self, kind: Kind, outcome: Option<CallOutcome>) {
        let mut inner = self.lock();
        let was_open = inner.state != State::Closed;
        let now = Instant::now();
        match kind {
            Kind::Counted => {
                inner.in_flight = inner.in_flight.saturating_sub(1);
                // Late results of calls admitted before the breaker opened do not move it.
                if inner.state == State::Closed {
                    let window = inner.settings.window;
                    match outcome {
                        Some(CallOutcome::Success) => inner.window.add(now, window, false),
                        Some(CallOutcome::Failure) => {
                            inner.window.add(now, window, true);
                            self.judge(&mut inner, now);
                        }
                        Some(CallOutcome::Throttled) | None => {}
                    }
                }
            }
            Kind::Probe => {
                if let State::HalfOpen { out, succeeded } = inner.state {
                    let out = out.saturating_sub(1);
                    inner.state = match outcome {
                        Some(CallOutcome::Success) if succeeded + 1 >= inner.settings.probes => {
                            inner.window.clear();
                            State::Closed
                        }
                        Some(CallOutcome::Success) => State::HalfOpen {
                            out,
                            succeeded: succeeded + 1,
                        },
                        Some(CallOutcome::Failure) => State::Open {
                            until: now + inner.settings.cooldown,
                        },
                        Some(CallOutcome::Throttled) | None => State::HalfOpen { out, succeeded },
                    };
                }
            }
        }
        let open = inner.state != State::Closed;
        drop(inner);
        if open != was_open {
            (self.on_change)(open);
        }
    }

    fn judge(&self, inner: &mut Inner, now: Instant) {
        let s = inner.settings;
        let (completed, failures) = inner.window.totals(now, s.window);
        let calls = completed + inner.in_flight;
        if failures >= u64::from(s.failures)
            && calls >= u64::from(s.min_calls)
            && failures as f64 >= s.ratio * calls as f64
        {
            inner.state = State::Open {
                until: now + s.cooldown,
            };
            tracing::warn!(
                source = %self.name,
                failures,
                calls,
                window_ms = s.window.as_millis() as u64,
                cooldown_ms = s.cooldown.as_millis() as u64,
                "circuit breaker opened: most calls to the source fail"
            );
        }
    }
}

impl Pass {
    /// Report how the call went.
    pub fn record(mut self, outcome: CallOutcome) {
        if let Some(b) = self.breaker.take() {
            b.settle(self.kind, Some(outcome));
        }
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        // An abandoned call: free its place, count nothing.
        if let Some(b) = self.breaker.take() {
            b.settle(self.kind, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn config(failures: u32, min_calls: u32) -> BreakerConfig {
        BreakerConfig {
            failures,
            failure_ratio: 0.5,
            min_calls,
            window: Duration::from_secs(10),
            cooldown: Duration::from_secs(10),
            probes: 2,
        }
    }

    fn breaker(cfg: BreakerConfig) -> (Arc<Breaker>, Arc<AtomicUsize>) {
        let changes = Arc::new(AtomicUsize::new(0));
        let c = changes.clone();
        let b = Breaker::new("test", &cfg, move |_| {
            c.fetch_add(1, Ordering::SeqCst);
        });
        (Arc::new(b), changes)
    }

    fn calls(b: &Arc<Breaker>, outcomes: &[CallOutcome]) {
        for o in outcomes {
            b.admit().expect("admitted").record(*o);
        }
    }

    use CallOutcome::{Failure as F, Success as S, Throttled as T};

    #[tokio::test(start_paused = true)]
    async fn opens_on_a_failed_share_with_enough_calls_and_half_opens_for_probes() {
        let (b, changes) = breaker(config(3, 6));
        // 5 failures of 5 calls: fewer calls than min_calls.
        calls(&b, &[F, F, F, F, F]);
        assert!(!b.is_open());
        // 6 calls, 5 failed: open.
        calls(&b, &[F]);
        assert!(b.is_open());
        assert_eq!(changes.load(Ordering::SeqCst), 1);
        assert_eq!(b.admit().expect_err("open"), Duration::from_secs(10));
        tokio::time::advance(Duration::from_secs(4)).await;
        assert_eq!(b.admit().expect_err("open"), Duration::from_secs(6));
        tokio::time::advance(Duration::from_secs(6)).await;

        let p1 = b.admit().expect("probe 1");
        let p2 = b.admit().expect("probe 2");
        assert!(b.admit().is_err(), "two probes at most");
        p1.record(F);
        assert!(b.admit().is_err(), "a failed probe reopens");
        drop(p2);
        tokio::time::advance(Duration::from_secs(10)).await;
        let p1 = b.admit().expect("probe");
        drop(p1);
        let p1 = b.admit().expect("an abandoned probe frees its slot");
        p1.record(T);
        let p1 = b.admit().expect("a throttled probe frees its slot");
        p1.record(S);
        assert!(b.is_open(), "one success of two");
        b.admit().expect("second probe").record(S);
        assert!(!b.is_open());
        assert_eq!(changes.load(Ordering::SeqCst), 2);
        // The window starts empty after closing.
        calls(&b, &[F, F]);
        assert!(!b.is_open());
    }

    #[tokio::test(start_paused = true)]
    async fn failures_leave_the_window_with_time() {
        let (b, _) = breaker(config(3, 6));
        calls(&b, &[F, F, F, F, F]);
        tokio::time::advance(Duration::from_secs(11)).await;
        calls(&b, &[S, S, S, F]);
        assert_eq!(
            b.status(),
            BreakerStatus {
                open: false,
                calls: 4,
                failures: 1
            }
        );
        assert!(!b.is_open());
    }

    #[tokio::test(start_paused = true)]
    async fn throttling_is_not_failure() {
        let (b, _) = breaker(config(1, 2));
        calls(&b, &[T; 50]);
        calls(&b, &[S, S, F]);
        assert!(!b.is_open(), "1 of 3 failed; 429s count neither way");
    }

    #[tokio::test(start_paused = true)]
    async fn calls_in_flight_count_as_not_failed() {
        let (b, _) = breaker(config(3, 10));
        // 30 calls go out; 12 fail at once, the rest are still in flight: 12 of 30 is below
        // half (12 of the 12 answered so far would be all).
        let mut out: Vec<Pass> = (0..30).map(|_| b.admit().expect("closed")).collect();
        for p in out.drain(..12) {
            p.record(F);
        }
        assert!(!b.is_open(), "12 failed of 30 made");
        assert_eq!(b.status().calls, 30);
        for p in out.drain(..) {
            p.record(S);
        }
        assert!(!b.is_open());
    }

    /// The workload of issue 14: 10% 503 and 5% 429 answered at once, successes after 50 ms,
    /// 32 calls in flight, for two minutes of paused time. It must never open; the same source
    /// failing 70% of its calls must.
    #[tokio::test(start_paused = true)]
    async fn a_flaky_source_with_slow_successes_never_trips_it_a_failing_one_does() {
        use rand::{Rng, SeedableRng};
        for (error_share, expect_open) in [(0.10, false), (0.70, true)] {
            let (b, _) = breaker(BreakerConfig::default());
            let mut rng = rand::rngs::StdRng::seed_from_u64(14);
            // (completes at, pass, outcome)
            let mut out: Vec<(Instant, Pass, CallOutcome)> = Vec::new();
            let end = Instant::now() + Duration::from_secs(120);
            let mut opened = false;
            while Instant::now() < end && !opened {
                while out.len() < 32 {
                    let Ok(pass) = b.admit() else { break };
                    let r: f64 = rng.random();
                    let (outcome, latency) = if r < error_share {
                        (F, Duration::from_millis(1))
                    } else if r < error_share + 0.05 {
                        (T, Duration::from_millis(1))
                    } else {
                        (S, Duration::from_millis(50))
                    };
                    out.push((Instant::now() + latency, pass, outcome));
                }
                let Some(next) = out.iter().map(|(at, ..)| *at).min() else {
                    break;
                };
                tokio::time::advance(next.saturating_duration_since(Instant::now())).await;
                let now = Instant::now();
                let (done, rest): (Vec<_>, Vec<_>) =
                    out.into_iter().partition(|(at, ..)| *at <= now);
                out = rest;
                for (_, pass, outcome) in done {
                    pass.record(outcome);
                }
                opened = b.is_open();
            }
            assert_eq!(opened, expect_open, "error share {error_share}");
        }
    }

    #[tokio::test]
    async fn zero_failures_never_opens_and_update_applies_live() {
        let (b, changes) = breaker(config(0, 1));
        calls(&b, &[F; 100]);
        assert!(!b.is_open());
        b.update(&config(2, 2));
        calls(&b, &[F, F]);
        assert!(b.is_open());
        b.update(&config(0, 2));
        assert!(!b.is_open(), "turned off: closed");
        assert_eq!(changes.load(Ordering::SeqCst), 2);
    }
}
