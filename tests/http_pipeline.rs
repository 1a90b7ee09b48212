//! The engine with the built-in HTTP fetcher against a real HTTP source on 127.0.0.1: the gone
//! guard (a misrouted URL template deletes nothing and fails readiness), a source outage
//! (nothing dead-lettered), 429 with Retry-After, and hostile source answers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use refetch::decode::JsonDecoder;
use refetch::{EngineConfig, GoneGuardConfig};
use refetch_http::{HttpFetcher, SourceConfig};
use refetch_integration_tests::{MemoryRun, start_in_memory};
use refetch_testkit::http_source::{Fault, HttpSource, HttpSourceOptions};
use refetch_testkit::memory::RecordingSink;
use refetch_testkit::process::wait_for;
use serde_json::json;

const TOPIC: &str = "crm.customers";

type Run = MemoryRun<RecordingSink>;

fn start(source: &HttpSource, path: &str, cfg: EngineConfig) -> Run {
    let fetcher = HttpFetcher::builder()
        .source(
            "customer",
            SourceConfig {
                url: format!("{}{path}", source.base_url()),
                timeout: Duration::from_secs(2),
                ..SourceConfig::default()
            },
        )
        .build()
        .unwrap();
    start_in_memory(
        TOPIC,
        2,
        fetcher,
        RecordingSink::new(),
        JsonDecoder::fixed_type("customer", "/id"),
        cfg,
    )
}

fn cfg() -> EngineConfig {
    EngineConfig {
        window: Duration::from_millis(20),
        max_wait: Duration::from_millis(200),
        commit_interval: Duration::from_millis(50),
        ..EngineConfig::default()
    }
}

fn notify(run: &Run, ids: impl IntoIterator<Item = usize>) {
    for i in ids {
        let p = (i % 2) as i32;
        run.topics.produce(
            TOPIC,
            p,
            None,
            json!({"id": i.to_string()}).to_string().as_bytes(),
            0,
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misrouted_template_deletes_nothing_and_fails_readiness() {
    let source = HttpSource::start(HttpSourceOptions::default())
        .await
        .unwrap();
    for i in 0..100 {
        source.put("customer", &i.to_string(), json!({"n": i}));
    }
    let mut c = cfg();
    c.gone_guard = GoneGuardConfig {
        window: 100,
        min_samples: 20,
        max_ratio: 0.2,
        ..GoneGuardConfig::default()
    };
    c.fetch_backoff.max = Duration::from_millis(500);
    // Wrong path: every fetch answers 404 with the source's own not-found body.
    let run = start(&source, "/customers-v0/{id}", c);
    notify(&run, 0..100);
    wait_for("the gone guard to trip", Duration::from_secs(20), || {
        let h = run.handle.clone();
        async move {
            h.status()
                .await
                .is_some_and(|s| s.engine.gone_guard_tripped && !s.ready())
        }
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = run.handle.status().await.unwrap();
    assert!(
        status.not_ready.iter().any(|r| r.contains("gone guard")),
        "{:?}",
        status.not_ready
    );
    let deletes = run.sink.log().iter().filter(|w| w.delete).count();
    assert_eq!(deletes, 0, "a misrouted template must delete nothing");
    assert!(run.dead.records().is_empty());
    // Nothing was satisfied, so nothing past the first notification is committed.
    assert!(run.topics.committed().values().all(|o| *o == 0));
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_outage_and_429s_dead_letter_nothing_and_converge() {
    let source = HttpSource::start(HttpSourceOptions::default())
        .await
        .unwrap();
    for i in 0..60 {
        source.put("customer", &i.to_string(), json!({"n": i}));
    }
    let mut c = cfg();
    c.retry_budget = 3;
    c.fetch_backoff.max = Duration::from_millis(300);
    let run = start(&source, "/customer/{id}", c);
    source.set_down(true).await.unwrap();
    notify(&run, 0..60);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        run.dead.records().is_empty(),
        "an outage dead-letters nothing"
    );
    source.set_down(false).await.unwrap();
    // A few 429s (fewer than the breaker's threshold of consecutive failures).
    source.fail_next(
        3,
        Fault::RetryAfter {
            status: 429,
            value: "1".into(),
        },
    );
    run.committed_to_end(Duration::from_secs(60)).await;
    assert!(run.dead.records().is_empty());
    assert_eq!(run.sink.held().len(), 60);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_source_answers_have_defined_outcomes() {
    let source = HttpSource::start(HttpSourceOptions::default())
        .await
        .unwrap();
    for i in 0..6 {
        source.put("customer", &i.to_string(), json!({"n": i}));
    }
    // HTML instead of JSON and a redirect to another host are permanent: dead letters.
    source.poison("customer", "1", Fault::Html);
    source.poison(
        "customer",
        "2",
        Fault::Redirect("http://127.0.0.2:9".into()),
    );
    // A dropped connection mid-body is transient: it recovers once the fault is cleared.
    source.poison("customer", "3", Fault::DropMidBody);
    let run = start(&source, "/customer/{id}", cfg());
    notify(&run, 0..6);
    // Other keys keep succeeding meanwhile: the evidence that 1 and 2 fail on their own.
    let live = refetch_integration_tests::heartbeat(
        &run.topics,
        TOPIC,
        0,
        json!({"id": "0"}).to_string().into_bytes(),
        Duration::from_millis(200),
    );
    wait_for(
        "the permanent failures to be dead-lettered",
        Duration::from_secs(20),
        || {
            let n = run.dead.records().len();
            async move { n >= 2 }
        },
    )
    .await
    .unwrap();
    drop(live);
    source.clear_faults();
    run.committed_to_end(Duration::from_secs(60)).await;
    let dead = run.dead.records();
    let ids: Vec<_> = dead
        .iter()
        .filter_map(|d| d.header("refetch.entity.id"))
        .collect();
    assert_eq!(ids.len(), 2, "{dead:?}");
    assert!(ids.contains(&"1") && ids.contains(&"2"));
    let held = run.sink.held();
    assert!(
        held.contains_key(&refetch::EntityKey::new("customer", "3")),
        "the transient one converged"
    );
    run.stop().await;
}
