//! `HttpFetcher::reconfigure`, as a SIGHUP reload calls it: rate limits, concurrency and breaker
//! settings change live; anything else is refused with the settings named, and nothing changes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::future::join_all;
use refetch::{FetchError, Fetcher, OwnershipShare};
use refetch_http::{HttpFetcher, HttpFetcherConfig, ReconfigureError};
use refetch_testkit::http_source::{Fault, HttpSource};
use serde_json::json;
use support::{req, source};

/// The fetcher's configuration with `extra` lines in `[sources.customer]`.
fn config(src: &HttpSource, extra: &str) -> HttpFetcherConfig {
    toml::from_str(&format!(
        "[sources.customer]\nurl = \"{}/customer/{{id}}\"\n{extra}\n",
        src.base_url()
    ))
    .expect("valid TOML")
}

/// Requests per second the source sees over `span` with `workers` callers always waiting,
/// counted after `settle`.
async fn rate_seen(
    src: &HttpSource,
    f: &Arc<HttpFetcher>,
    settle: Duration,
    span: Duration,
) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..6)
        .map(|_| {
            let (f, stop) = (f.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    f.fetch(&req("1")).await.expect("found");
                }
            })
        })
        .collect();
    let started = Instant::now();
    tokio::time::sleep(settle + span).await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.expect("worker");
    }
    let (from, to) = (started + settle, started + settle + span);
    let n = src
        .recorded()
        .iter()
        .filter(|r| r.at >= from && r.at < to)
        .count();
    n as f64 / span.as_secs_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_change_live() {
    let src = source().await;
    src.put("customer", "1", json!({}));
    let f = Arc::new(
        HttpFetcher::from_config(config(&src, "rate_limit = 10.0\nburst = 1")).expect("valid"),
    );
    let slow = rate_seen(&src, &f, Duration::from_millis(300), Duration::from_secs(1)).await;
    assert!(slow <= 12.0, "{slow}/s at a limit of 10/s");

    let applied = f
        .reconfigure(&config(&src, "rate_limit = 40.0\nburst = 1"))
        .expect("live");
    assert_eq!(applied, ["sources.customer.rate_limit"]);
    let fast = rate_seen(&src, &f, Duration::from_millis(300), Duration::from_secs(1)).await;
    assert!(
        (30.0..=48.0).contains(&fast),
        "{fast}/s after raising the limit to 40/s"
    );

    // To a group budget: this instance owns half of the partitions.
    f.ownership_changed(OwnershipShare { owned: 2, total: 4 });
    f.reconfigure(&config(
        &src,
        "rate_limit = { per_second = 60, burst = 2, scope = \"group\" }",
    ))
    .expect("live");
    let status = f.rate_status("customer").expect("source");
    assert_eq!((status.per_second, status.burst), (Some(30.0), 1));
    // And off: unlimited.
    let applied = f.reconfigure(&config(&src, "")).expect("live");
    assert_eq!(applied, ["sources.customer.rate_limit"]);
    assert_eq!(f.rate_status("customer").and_then(|s| s.per_second), None);
}

#[tokio::test]
async fn concurrency_changes_live() {
    let src = source().await;
    src.put("customer", "1", json!({}));
    src.set_latency(Duration::from_millis(80));
    let f = Arc::new(HttpFetcher::from_config(config(&src, "concurrency = 2")).expect("valid"));
    let burst = |n: usize| {
        let f = f.clone();
        async move {
            let all = (0..n).map(|_| {
                let f = f.clone();
                async move { f.fetch(&req("1")).await.expect("found") }
            });
            join_all(all).await;
        }
    };
    burst(8).await;
    assert_eq!(src.max_concurrent_requests(), 2);

    let applied = f
        .reconfigure(&config(&src, "concurrency = 5"))
        .expect("live");
    assert_eq!(applied, ["sources.customer.concurrency"]);
    assert_eq!(f.concurrency_limit("customer"), Some(5));
    src.reset_counters();
    burst(15).await;
    assert_eq!(src.max_concurrent_requests(), 5);

    f.reconfigure(&config(&src, "concurrency = 1"))
        .expect("live");
    src.reset_counters();
    burst(4).await;
    assert_eq!(src.max_concurrent_requests(), 1);
}

#[tokio::test]
async fn breaker_settings_change_live() {
    let src = source().await;
    src.put("customer", "1", json!({}));
    src.set_fault(Some(Fault::Status(503)));
    let f = HttpFetcher::from_config(config(&src, "breaker = { failures = 0 }")).expect("valid");
    for _ in 0..20 {
        assert!(matches!(
            f.fetch(&req("1")).await,
            Err(FetchError::Transient { .. })
        ));
    }
    assert!(!f.breaker_open("customer"), "turned off");
    let applied = f
        .reconfigure(&config(
            &src,
            "breaker = { failures = 2, min_calls = 2, cooldown = \"1m\" }",
        ))
        .expect("live");
    assert_eq!(applied, ["sources.customer.breaker"]);
    // Turned on: two failures of two calls open it.
    for _ in 0..2 {
        assert!(!f.breaker_open("customer"));
        assert!(matches!(
            f.fetch(&req("1")).await,
            Err(FetchError::Transient { .. })
        ));
    }
    assert!(f.breaker_open("customer"));
    assert!(matches!(
        f.fetch(&req("1")).await,
        Err(FetchError::NotAttempted { .. })
    ));
}

#[tokio::test]
async fn settings_that_need_a_restart_are_refused_by_name_and_nothing_changes() {
    let src = source().await;
    let f = HttpFetcher::from_config(config(&src, "rate_limit = 10.0\nconcurrency = 4"))
        .expect("valid");
    let base = src.base_url();
    let cases: Vec<(HttpFetcherConfig, Vec<&str>)> = vec![
        (
            toml::from_str(&format!(
                "[sources.customer]\nurl = \"{base}/v2/customer/{{id}}\"\nrate_limit = 20.0\n"
            ))
            .unwrap(),
            vec!["sources.customer.url"],
        ),
        (
            config(
                &src,
                "rate_limit = 20.0\nconcurrency = 4\ntimeout = \"1s\"\nheaders = { X-Api-Key = \"k\" }",
            ),
            vec!["sources.customer.headers", "sources.customer.timeout"],
        ),
        (
            toml::from_str(&format!(
                "[sources.customer]\nurl = \"{base}/customer/{{id}}\"\n\
                 [sources.order]\nurl = \"{base}/order/{{id}}\"\n"
            ))
            .unwrap(),
            vec!["sources.order (added)"],
        ),
        (
            toml::from_str("user_agent = \"other\"\n").unwrap(),
            vec!["user_agent", "sources.customer (removed)"],
        ),
    ];
    for (next, expected) in cases {
        match f.reconfigure(&next) {
            Err(ReconfigureError::NeedsRestart { settings }) => {
                let mut settings = settings;
                settings.sort();
                let mut expected: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
                expected.sort();
                assert_eq!(settings, expected);
            }
            other => panic!("expected NeedsRestart, got {other:?}"),
        }
        // The live part of a refused reload (rate_limit = 20) is not applied either.
        let status = f.rate_status("customer").expect("source");
        assert_eq!(status.per_second, Some(10.0));
        assert_eq!(f.concurrency_limit("customer"), Some(4));
    }
    let e = f
        .reconfigure(&config(
            &src,
            "rate_limit = { per_second = 20, burst = 2 }\nburst = 3",
        ))
        .expect_err("burst twice");
    assert!(matches!(e, ReconfigureError::Invalid(_)), "{e:?}");
    assert!(e.to_string().contains("burst"), "{e}");
    let e = f
        .reconfigure(&config(&src, "breaker = { failure_ratio = 1.5 }"))
        .expect_err("ratio over 1");
    assert!(e.to_string().contains("failure_ratio"), "{e}");
    let e = f
        .reconfigure(&config(&src, "rate_limit = -1.0"))
        .expect_err("negative");
    assert!(e.to_string().contains("rate_limit"), "{e}");
    assert_eq!(
        f.rate_status("customer").and_then(|s| s.per_second),
        Some(10.0)
    );
    // Nothing changed: nothing applied.
    assert_eq!(
        f.reconfigure(&config(&src, "rate_limit = 10.0\nconcurrency = 4")),
        Ok(Vec::new())
    );
}
