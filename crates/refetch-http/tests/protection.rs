//! Protecting the source: circuit breaker, rate limit, concurrency limit, and their metrics.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use metrics_util::debugging::DebuggingRecorder;
use refetch::{FailureCause, FetchError, FetchOutcome, Fetcher};
use refetch_http::{BreakerConfig, HttpFetcher, SourceConfig};
use refetch_testkit::http_source::{Fault, HttpSource, RandomFaults};
use serde_json::json;
use support::{Metrics, fetcher, req, source, template};

const SRC: (&str, &str) = ("source", "customer");

// `#[tokio::test]` runs on one thread, so the thread-local recorder sees every metric.
#[tokio::test]
async fn breaker_opens_answers_not_attempted_and_half_opens_for_one_probe() {
    let recorder = DebuggingRecorder::new();
    let mut m = Metrics::new(recorder.snapshotter());
    let _guard = metrics::set_default_local_recorder(&recorder);

    let src = source().await;
    src.put("customer", "1", json!({}));
    let cooldown = Duration::from_millis(300);
    let f = fetcher(SourceConfig {
        breaker: BreakerConfig {
            failures: 3,
            min_calls: 3,
            cooldown,
            probes: 1,
            ..BreakerConfig::default()
        },
        ..SourceConfig::new(template(&src))
    });
    assert_eq!(m.gauge("refetch_breaker_open", &[SRC]), Some(0.0));

    src.set_fault(Some(Fault::Status(503)));
    for _ in 0..3 {
        let r = f.fetch(&req("1")).await;
        assert!(matches!(r, Err(FetchError::Transient { .. })), "{r:?}");
    }
    assert!(f.breaker_open("customer"));
    let opened = Instant::now();
    assert_eq!(m.gauge("refetch_breaker_open", &[SRC]), Some(1.0));

    let before = src.total_requests();
    let r = f.fetch(&req("1")).await;
    match &r {
        Err(e @ FetchError::NotAttempted { retry_after, .. }) => {
            assert!(!e.counts_against_budget());
            // The time until it half-opens.
            assert!(
                retry_after.is_some_and(|d| d <= cooldown && d > cooldown / 2),
                "{r:?}"
            );
        }
        other => panic!("expected NotAttempted, got {other:?}"),
    }
    assert_eq!(src.total_requests(), before, "no request while open");

    // After the cooldown one probe goes out; it fails and the breaker opens again.
    let deadline = Instant::now() + Duration::from_secs(5);
    let probe = loop {
        let r = f.fetch(&req("1")).await;
        if !matches!(r, Err(FetchError::NotAttempted { .. })) {
            break r;
        }
        assert!(Instant::now() < deadline, "breaker never half-opened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(opened.elapsed() >= cooldown);
    assert!(
        matches!(probe, Err(FetchError::Transient { .. })),
        "{probe:?}"
    );
    assert_eq!(src.total_requests(), before + 1);
    assert!(matches!(
        f.fetch(&req("1")).await,
        Err(FetchError::NotAttempted { .. })
    ));

    // The source recovers: the next probe closes the breaker.
    src.clear_faults();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match f.fetch(&req("1")).await {
            Ok(FetchOutcome::Found(_)) => break,
            Err(FetchError::NotAttempted { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => panic!("expected the probe to succeed, got {other:?}"),
        }
    }
    assert!(!f.breaker_open("customer"));
    assert_eq!(m.gauge("refetch_breaker_open", &[SRC]), Some(0.0));
    assert!(m.counter("refetch_http_not_attempted_total", &[SRC]) >= 2);
    assert_eq!(
        m.counter(
            "refetch_http_requests_total",
            &[SRC, ("outcome", "transient")]
        ),
        4
    );
    assert_eq!(
        m.counter("refetch_http_requests_total", &[SRC, ("outcome", "found")]),
        1
    );
    assert_eq!(m.histogram_len("refetch_http_request_seconds", &[SRC]), 5);
}

#[tokio::test]
async fn permanent_answers_do_not_open_the_breaker() {
    let src = source().await;
    src.put("customer", "1", json!({}));
    src.poison("customer", "1", Fault::Status(400));
    let f = fetcher(SourceConfig {
        breaker: BreakerConfig {
            failures: 2,
            min_calls: 2,
            cooldown: Duration::from_secs(60),
            ..BreakerConfig::default()
        },
        ..SourceConfig::new(template(&src))
    });
    for _ in 0..5 {
        assert!(matches!(
            f.fetch(&req("1")).await,
            Err(FetchError::Permanent { .. })
        ));
        assert_eq!(f.fetch(&req("missing")).await, Ok(FetchOutcome::Gone));
    }
    assert!(!f.breaker_open("customer"));
}

#[tokio::test]
async fn rate_limit_spaces_requests_and_counts_waits() {
    let recorder = DebuggingRecorder::new();
    let mut m = Metrics::new(recorder.snapshotter());
    let _guard = metrics::set_default_local_recorder(&recorder);

    let src = source().await;
    src.put("customer", "1", json!({}));
    let f = Arc::new(fetcher(SourceConfig {
        rate_limit: Some(20.0.into()),
        burst: Some(1),
        ..SourceConfig::new(template(&src))
    }));
    let fetches = (0..11).map(|_| {
        let f = f.clone();
        async move { f.fetch(&req("1")).await }
    });
    for r in join_all(fetches).await {
        assert!(matches!(r, Ok(FetchOutcome::Found(_))), "{r:?}");
    }
    let at: Vec<Instant> = src.recorded().iter().map(|r| r.at).collect();
    assert_eq!(at.len(), 11);
    let span = at[10] - at[0];
    // 10 intervals of 50 ms (a little slack for timer granularity).
    assert!(span >= Duration::from_millis(450), "{span:?}");
    assert!(
        m.counter("refetch_http_rate_limited_total", &[SRC]) >= 9,
        "waits are counted"
    );
}

#[tokio::test]
async fn concurrency_limit_caps_requests_in_flight() {
    let src = source().await;
    src.put("customer", "1", json!({}));
    src.set_latency(Duration::from_millis(100));
    let f = Arc::new(fetcher(SourceConfig {
        concurrency: 3,
        ..SourceConfig::new(template(&src))
    }));
    let fetches = (0..12).map(|_| {
        let f = f.clone();
        async move { f.fetch(&req("1")).await }
    });
    let started = Instant::now();
    for r in join_all(fetches).await {
        assert!(matches!(r, Ok(FetchOutcome::Found(_))), "{r:?}");
    }
    assert_eq!(src.max_concurrent_requests(), 3);
    // 12 requests, 3 at a time, 100 ms each: at least 4 rounds.
    assert!(started.elapsed() >= Duration::from_millis(390));
}

/// What a run of fetches against a flaky source came to.
#[derive(Debug, Default)]
struct Tally {
    found: usize,
    server: usize,
    throttled: usize,
    not_attempted: usize,
    other: usize,
}

/// `workers` loops fetching `n` keys in all, as fast as the source answers.
async fn hammer(f: &Arc<HttpFetcher>, workers: usize, n: usize) -> Tally {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let loops = (0..workers).map(|_| {
        let (f, next) = (f.clone(), next.clone());
        async move {
            let mut t = Tally::default();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return t;
                }
                match f.fetch(&req(&(i % 50).to_string())).await {
                    Ok(FetchOutcome::Found(_)) => t.found += 1,
                    Err(e @ FetchError::Transient { .. }) => match e.cause() {
                        Some(FailureCause::Server) => t.server += 1,
                        Some(FailureCause::Throttled) => t.throttled += 1,
                        _ => t.other += 1,
                    },
                    Err(FetchError::NotAttempted { .. }) => t.not_attempted += 1,
                    _ => t.other += 1,
                }
            }
        }
    });
    join_all(loops)
        .await
        .into_iter()
        .fold(Tally::default(), |mut a, t| {
            a.found += t.found;
            a.server += t.server;
            a.throttled += t.throttled;
            a.not_attempted += t.not_attempted;
            a.other += t.other;
            a
        })
}

async fn flaky_source(error_share: f64) -> HttpSource {
    let src = source().await;
    for i in 0..50 {
        src.put("customer", &i.to_string(), json!({}));
    }
    // Successes take 30 ms; 503s and 429s come back at once.
    src.set_latency(Duration::from_millis(30));
    src.set_random_faults(Some(RandomFaults {
        faults: vec![
            (error_share, Fault::Status(503)),
            (0.05, Fault::Status(429)),
        ],
        instant: true,
        seed: 14,
    }));
    src
}

/// Issue 14: at 10% 503 and 5% 429, instant errors complete before slower successes; a breaker
/// counting consecutive failures tripped in bursts. With the default settings this one never
/// opens, and 429s are throttling, not failures.
#[tokio::test]
async fn a_flaky_source_never_trips_the_breaker() {
    let src = flaky_source(0.10).await;
    let f = Arc::new(fetcher(SourceConfig::new(template(&src))));
    let t = hammer(&f, 32, 1500).await;
    assert_eq!(t.not_attempted, 0, "the breaker opened: {t:?}");
    assert_eq!(t.other, 0, "{t:?}");
    assert!(!f.breaker_open("customer"));
    assert_eq!(src.total_requests(), 1500, "every fetch reached the source");
    // The random draws really were flaky (about 150 and 75 of 1500).
    assert!(t.server >= 75 && t.throttled >= 30, "{t:?}");
}

/// The same source failing most calls trips it: fetches come back not attempted, without a
/// request.
#[tokio::test]
async fn a_source_failing_most_calls_trips_the_breaker() {
    let src = flaky_source(0.70).await;
    let f = Arc::new(fetcher(SourceConfig::new(template(&src))));
    let t = hammer(&f, 32, 1500).await;
    assert!(t.not_attempted > 0, "{t:?}");
    assert!(f.breaker_open("customer"));
    let status = f.breaker_status("customer").expect("a source");
    assert!(status.open, "{status:?}");
    assert_eq!(
        src.total_requests() as usize,
        1500 - t.not_attempted,
        "no request for a fetch that was not attempted"
    );
}
