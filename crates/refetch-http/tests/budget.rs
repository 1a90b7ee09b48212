//! A group-wide source budget (`rate_limit = { per_second = N, scope = "group" }`): instances
//! of one consumer group split it by the partitions they own, against a real local source that
//! counts every request.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use refetch::{FetchError, Fetcher, OwnershipShare};
use refetch_http::{HttpFetcher, HttpFetcherConfig, RateScope};
use refetch_testkit::http_source::HttpSource;
use serde_json::json;
use support::{req, source};

/// The group's budget, requests per second.
const N: f64 = 30.0;

fn config(src: &HttpSource) -> HttpFetcherConfig {
    toml::from_str(&format!(
        r#"
        [sources.customer]
        url = "{}/customer/{{id}}"
        rate_limit = {{ per_second = {N}, burst = 3, scope = "group" }}
        "#,
        src.base_url()
    ))
    .expect("valid TOML")
}

/// An instance: a fetcher and workers that keep fetching until told to stop.
struct Instance {
    fetcher: Arc<HttpFetcher>,
    stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Instance {
    fn start(cfg: &HttpFetcherConfig, share: OwnershipShare) -> Instance {
        let fetcher = Arc::new(HttpFetcher::from_config(cfg.clone()).expect("valid"));
        fetcher.ownership_changed(share);
        let stop = Arc::new(AtomicBool::new(false));
        let workers = (0..4)
            .map(|w| {
                let (f, stop) = (fetcher.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut i = w;
                    while !stop.load(Ordering::Relaxed) {
                        let r = f.fetch(&req(&(i % 60).to_string())).await;
                        assert!(r.is_ok(), "{r:?}");
                        i += 4;
                    }
                })
            })
            .collect();
        Instance {
            fetcher,
            stop,
            workers,
        }
    }

    async fn leave(self) {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers {
            w.await.expect("worker");
        }
    }
}

/// Requests the source received in `[from, to)`.
fn requests_between(src: &HttpSource, from: Instant, to: Instant) -> usize {
    src.recorded()
        .iter()
        .filter(|r| r.at >= from && r.at < to)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_share_the_budget_and_two_take_all_of_it_when_one_leaves() {
    let src = source().await;
    for i in 0..60 {
        src.put("customer", &i.to_string(), json!({}));
    }
    let cfg = config(&src);
    let third = OwnershipShare { owned: 2, total: 6 };
    let a = Instance::start(&cfg, third);
    let b = Instance::start(&cfg, third);
    let c = Instance::start(&cfg, third);
    let status = a.fetcher.rate_status("customer").expect("source");
    assert_eq!(status.configured.map(|r| r.scope), Some(RateScope::Group));
    assert!((status.share - 1.0 / 3.0).abs() < 1e-9, "{status:?}");
    assert_eq!(status.per_second, Some(N / 3.0));

    // A steady window after the first second: at most N x 1.2 per second in all.
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (from, to) = (
        started + Duration::from_secs(1),
        started + Duration::from_secs(3),
    );
    let seen = requests_between(&src, from, to);
    let secs = 2.0;
    assert!(
        seen as f64 <= N * 1.2 * secs,
        "three instances sent {seen} in {secs} s, over the budget of {N}/s"
    );
    assert!(
        seen as f64 >= N * 0.8 * secs,
        "three instances sent only {seen} in {secs} s of a {N}/s budget"
    );

    // One instance leaves; the rebalance gives the other two half of the partitions each.
    c.leave().await;
    let half = OwnershipShare { owned: 3, total: 6 };
    a.fetcher.ownership_changed(half);
    b.fetcher.ownership_changed(half);
    let changed = Instant::now();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (from, to) = (
        changed + Duration::from_millis(500),
        changed + Duration::from_millis(2500),
    );
    let seen = requests_between(&src, from, to);
    assert!(
        seen as f64 >= N * 0.8 * secs,
        "two instances reached only {seen} in {secs} s of the whole {N}/s budget"
    );
    assert!(
        seen as f64 <= N * 1.2 * secs,
        "two instances sent {seen} in {secs} s, over the budget of {N}/s"
    );
    a.leave().await;
    b.leave().await;
}

#[tokio::test]
async fn an_instance_that_owns_no_partition_sends_nothing() {
    let src = source().await;
    src.put("customer", "1", json!({}));
    let f = HttpFetcher::from_config(config(&src)).expect("valid");
    f.ownership_changed(OwnershipShare { owned: 0, total: 6 });
    for _ in 0..3 {
        match f.fetch(&req("1")).await {
            Err(e @ FetchError::NotAttempted { retry_after, .. }) => {
                assert_eq!(retry_after, Some(Duration::from_secs(1)));
                assert!(!e.counts_against_budget());
            }
            other => panic!("expected NotAttempted, got {other:?}"),
        }
    }
    assert_eq!(src.total_requests(), 0);
    assert_eq!(
        f.rate_status("customer").and_then(|s| s.per_second),
        Some(0.0)
    );
    // Assigned a partition again: it sends.
    f.ownership_changed(OwnershipShare { owned: 1, total: 6 });
    assert!(f.fetch(&req("1")).await.is_ok());
    assert_eq!(src.total_requests(), 1);
}

#[tokio::test]
async fn a_per_instance_limit_ignores_ownership_and_the_old_shape_still_reads() {
    let src = source().await;
    src.put("customer", "1", json!({}));
    let cfg: HttpFetcherConfig = toml::from_str(&format!(
        "[sources.customer]\nurl = \"{}/customer/{{id}}\"\nrate_limit = 50.0\nburst = 5\n",
        src.base_url()
    ))
    .expect("the old shape");
    let f = HttpFetcher::from_config(cfg).expect("valid");
    f.ownership_changed(OwnershipShare { owned: 0, total: 6 });
    let status = f.rate_status("customer").expect("source");
    assert_eq!((status.per_second, status.burst), (Some(50.0), 5));
    assert!(f.fetch(&req("1")).await.is_ok());
}
