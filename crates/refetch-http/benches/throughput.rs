//! Sustained fetch throughput against a local source with fixed latency `L` and a concurrency
//! limit `C`, compared with the ideal `C / L` requests per second.
//!
//! Run with `cargo bench -p refetch-http --bench throughput`. Besides criterion's report it
//! prints one line per configuration: `achieved/ideal` close to 1.0 means the fetcher adds
//! little overhead to the source's own latency. The same line gives a baseline measured in the
//! same run: a bare `reqwest` client keeping `C` requests in flight against the same server
//! (`raw/ideal`), and the fetcher relative to it (`fetcher/raw`), which separates the fetcher's
//! own cost from the test server's and the machine's.
//!
//! The last configuration (`guarded`) runs the same load with every protection switched on: the
//! default circuit breaker (its window counts every call) and a rate limit far above the load
//! (every call passes through the limiter), so its `fetcher/raw` against the plain one shows what
//! the protections cost.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::future::join_all;
use refetch::{EntityKey, FetchOutcome, FetchRequest, Fetcher};
use refetch_http::{BreakerConfig, HttpFetcher, RateLimit, SourceConfig};
use refetch_testkit::http_source::{HttpSource, HttpSourceOptions};
use serde_json::json;

const KEYS: usize = 256;

struct Setup {
    runtime: tokio::runtime::Runtime,
    source: HttpSource,
    fetcher: Arc<HttpFetcher>,
    requests: Arc<Vec<FetchRequest>>,
}

fn setup(latency: Duration, concurrency: usize, guarded: bool) -> Setup {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let source = runtime.block_on(async {
        HttpSource::start(HttpSourceOptions {
            latency,
            ..HttpSourceOptions::default()
        })
        .await
        .expect("source")
    });
    for i in 0..KEYS {
        source.put("customer", &i.to_string(), json!({"name": format!("c{i}")}));
    }
    let fetcher = HttpFetcher::builder()
        .source(
            "customer",
            SourceConfig {
                concurrency,
                breaker: if guarded {
                    BreakerConfig::default()
                } else {
                    BreakerConfig {
                        failures: 0,
                        ..BreakerConfig::default()
                    }
                },
                rate_limit: guarded.then(|| RateLimit::per_instance(1_000_000.0)),
                ..SourceConfig::new(format!("{}/customer/{{id}}", source.base_url()))
            },
        )
        .build()
        .expect("fetcher");
    let requests = (0..KEYS)
        .map(|i| FetchRequest::new(EntityKey::new("customer", i.to_string())))
        .collect();
    Setup {
        runtime,
        source,
        fetcher: Arc::new(fetcher),
        requests: Arc::new(requests),
    }
}

/// Fetch every key once, all at once (the fetcher's limit keeps `C` in flight).
async fn round(fetcher: &HttpFetcher, requests: &[FetchRequest]) {
    let results = join_all(requests.iter().map(|r| fetcher.fetch(r))).await;
    for r in results {
        assert!(matches!(r, Ok(FetchOutcome::Found(_))), "{r:?}");
    }
}

/// The baseline: a bare client with `concurrency` requests in flight, no fetcher logic.
async fn raw_round(client: &reqwest::Client, base: &str, concurrency: usize) {
    let permits = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let calls = (0..KEYS).map(|i| {
        let permits = permits.clone();
        let url = format!("{base}/customer/{i}");
        async move {
            let _permit = permits.acquire().await.unwrap();
            let r = client.get(url).send().await.unwrap();
            assert!(r.status().is_success());
            r.bytes().await.unwrap();
        }
    });
    join_all(calls).await;
}

fn throughput(c: &mut Criterion) {
    let mut group = c.benchmark_group("http_fetch");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(8));
    group.throughput(Throughput::Elements(KEYS as u64));
    for (latency_ms, concurrency, guarded) in
        [(10u64, 8usize, false), (20, 32, false), (20, 32, true)]
    {
        let latency = Duration::from_millis(latency_ms);
        let s = setup(latency, concurrency, guarded);
        let name = format!(
            "L{latency_ms}ms_C{concurrency}{}",
            if guarded { "_guarded" } else { "" }
        );
        // Warm the connection pool, then measure one round for the printed ratio.
        s.runtime.block_on(round(&s.fetcher, &s.requests));
        let started = Instant::now();
        s.runtime.block_on(round(&s.fetcher, &s.requests));
        let elapsed = started.elapsed();
        let achieved = KEYS as f64 / elapsed.as_secs_f64();
        let ideal = concurrency as f64 / latency.as_secs_f64();
        let client = reqwest::Client::new();
        let base = s.source.base_url();
        s.runtime.block_on(raw_round(&client, &base, concurrency));
        let started = Instant::now();
        s.runtime.block_on(raw_round(&client, &base, concurrency));
        let raw = KEYS as f64 / started.elapsed().as_secs_f64();
        println!(
            "{name}: {achieved:.0} req/s, ideal C/L = {ideal:.0} req/s, achieved/ideal = {:.2}; bare client {raw:.0} req/s (raw/ideal = {:.2}), fetcher/raw = {:.2}",
            achieved / ideal,
            raw / ideal,
            achieved / raw
        );
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let started = Instant::now();
                for _ in 0..iters {
                    s.runtime.block_on(round(&s.fetcher, &s.requests));
                }
                started.elapsed()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, throughput);
criterion_main!(benches);
