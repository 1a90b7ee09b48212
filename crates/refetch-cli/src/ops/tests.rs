//! Tests of the operations endpoint: real HTTP requests to a bound port, in front of a real
//! pipeline (in-memory consumer, versioned source, recording sink).

use std::time::Duration;

use refetch::decode::JsonDecoder;
use refetch::{
    EngineConfig, EntityKey, GoneGuardConfig, MemoryConsumer, MemoryDeadLetters, Pipeline,
};
use refetch_testkit::memory::{RecordingSink, VersionedSource};
use refetch_testkit::process::wait_for;

use super::*;

const TOPIC: &str = "changes";

struct Harness {
    consumer: MemoryConsumer,
    source: VersionedSource,
    sink: RecordingSink,
    handle: PipelineHandle,
    server: OpsServer,
    run: Option<tokio::task::JoinHandle<Result<refetch::RunReport, refetch::PipelineError>>>,
    _control: refetch::consumer::MemoryControl,
}

async fn start(engine: EngineConfig) -> Harness {
    let consumer = MemoryConsumer::new();
    consumer.create_topic(TOPIC, 2);
    let (channels, control) = consumer.start();
    let source = VersionedSource::new();
    let sink = RecordingSink::new();
    let pipeline = Pipeline::builder::<VersionedSource, RecordingSink>()
        .fetcher(source.clone())
        .sink(sink.clone())
        .consumer(channels)
        .dead_letters(MemoryDeadLetters::new())
        .topic_decoder(TOPIC, JsonDecoder::fixed_type("customer", "/id"))
        .engine(engine)
        .build()
        .expect("builds");
    let handle = pipeline.handle();
    let server = serve(
        "127.0.0.1:0".parse().expect("addr"),
        OpsState {
            handle: handle.clone(),
            prometheus: install_recorder(),
            fetch: Arc::new(FetchStats::new(|| vec![("customer".to_owned(), false)])),
            title: "test-group <&>".to_owned(),
            started: Instant::now(),
            observed: Observed {
                kafka: None,
                sources: vec!["customer".to_owned()],
                sink: "",
            },
        },
    )
    .await
    .expect("binds");
    let run = tokio::spawn(pipeline.run(std::future::pending::<()>()));
    Harness {
        consumer,
        sink,
        source,
        handle,
        server,
        run: Some(run),
        _control: control,
    }
}

fn fast_engine() -> EngineConfig {
    EngineConfig {
        window: Duration::from_millis(20),
        max_wait: Duration::from_millis(200),
        commit_interval: Duration::from_millis(50),
        ..EngineConfig::default()
    }
}

async fn get(h: &Harness, path: &str) -> (u16, String) {
    let resp = reqwest::get(format!("http://{}{path}", h.server.addr))
        .await
        .expect("request");
    let status = resp.status().as_u16();
    (status, resp.text().await.expect("body"))
}

async fn status_json(h: &Harness) -> serde_json::Value {
    let (code, body) = get(h, "/status.json").await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("json")
}

/// Change `n` customers at the source and announce each `times` times.
fn announce(h: &Harness, n: usize, times: usize) -> usize {
    let mut produced = 0;
    for i in 0..n {
        let key = EntityKey::new("customer", i.to_string());
        h.source.change(&key);
        for _ in 0..times {
            h.consumer.produce(
                TOPIC,
                (i % 2) as i32,
                Some(key.id().as_bytes()),
                format!(r#"{{"id":"{i}"}}"#).as_bytes(),
                0,
            );
            produced += 1;
        }
    }
    produced
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_report_health_readiness_status_metrics_and_a_page() {
    let h = start(fast_engine()).await;
    assert_eq!(get(&h, "/healthz").await, (200, "ok\n".to_owned()));
    wait_for("readiness", Duration::from_secs(10), || async {
        get(&h, "/readyz").await == (200, "ready\n".to_owned())
    })
    .await
    .expect("becomes ready");

    let produced = announce(&h, 40, 3);
    wait_for(
        "every offset committed",
        Duration::from_secs(20),
        || async {
            let doc = status_json(&h).await;
            let parts = doc["status"]["engine"]["partitions"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            doc["status"]["engine"]["counters"]["notifications"] == produced
                && parts.len() == 2
                && parts.iter().all(|p| p["committed"] == 60)
        },
    )
    .await
    .expect("drains");

    let doc = status_json(&h).await;
    assert_eq!(doc["ready"], true);
    let c = &doc["status"]["engine"]["counters"];
    let fetches = c["fetches"].as_f64().expect("fetches");
    assert!(fetches >= 40.0, "{c}");
    let ratio = doc["coalescing_ratio"].as_f64().expect("ratio");
    assert!((ratio - produced as f64 / fetches).abs() < 1e-9, "{ratio}");
    assert_eq!(
        doc["fetch"]["breakers_open"],
        serde_json::json!([["customer", false]])
    );

    let (code, page) = get(&h, "/").await;
    assert_eq!(code, 200);
    assert!(
        page.contains("http-equiv=\"refresh\" content=\"2\""),
        "auto-refresh"
    );
    assert!(
        page.contains(&format!("<b id=\"notifications\">{produced}</b>")),
        "{page}"
    );
    assert!(
        page.contains(&format!("<b id=\"fetches\">{fetches}</b>")),
        "{page}"
    );
    assert!(
        page.contains("<td>changes/0</td><td>60</td><td>60</td><td>0</td>"),
        "{page}"
    );
    assert!(
        page.contains("test-group &lt;&amp;&gt;"),
        "title is escaped"
    );
    assert!(page.contains("id=ready>ready</span>"));

    let (code, metrics) = get(&h, "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("refetch_records_total") && !l.ends_with(" 0")),
        "{metrics}"
    );
    assert!(metrics.contains("refetch_committed_offset{"), "{metrics}");

    h.handle.shutdown();
    let mut h = h;
    let run = h.run.take().expect("running");
    let report = run.await.expect("joins").expect("runs");
    assert!(report.drained);
    let (code, body) = get(&h, "/healthz").await;
    assert_eq!((code, body.as_str()), (503, "pipeline stopped\n"));
    let (code, body) = get(&h, "/readyz").await;
    assert_eq!(code, 503);
    assert!(body.contains("pipeline stopped"), "{body}");
    assert_eq!(get(&h, "/status.json").await.0, 503);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_fails_with_its_reason_while_the_gone_guard_holds_deletes() {
    let engine = EngineConfig {
        gone_guard: GoneGuardConfig {
            window: 20,
            min_samples: 5,
            max_ratio: 0.2,
            ..GoneGuardConfig::default()
        },
        ..fast_engine()
    };
    let h = start(engine).await;
    wait_for("readiness", Duration::from_secs(10), || async {
        get(&h, "/readyz").await.0 == 200
    })
    .await
    .expect("becomes ready");
    // Every announced customer is gone at the source: deletes look abnormal.
    for i in 0..10 {
        let key = EntityKey::new("customer", i.to_string());
        h.source.change(&key);
        h.source.delete(&key);
        h.consumer
            .produce(TOPIC, 0, None, format!(r#"{{"id":"{i}"}}"#).as_bytes(), 0);
    }
    wait_for("readiness to fail", Duration::from_secs(20), || async {
        let (code, body) = get(&h, "/readyz").await;
        code == 503 && body.contains("gone guard of source customer tripped")
    })
    .await
    .expect("guard trips");
    let (_, page) = get(&h, "/").await;
    assert!(page.contains("id=ready>not ready</span>"), "{page}");
    assert!(page.contains("tripped: deletes held"), "{page}");
    // Liveness is unaffected: the process is healthy, just not ready.
    assert_eq!(get(&h, "/healthz").await.0, 200);
    // Nothing was deleted while the guard held the deletes.
    assert!(
        h.sink.log().iter().all(|w| !w.delete),
        "a delete passed the tripped guard"
    );
    // The operator decides the deletes of this source are real.
    let resp = reqwest::Client::new()
        .post(format!(
            "http://{}/gone-guard/reset?source=customer",
            h.server.addr
        ))
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status().as_u16(), 200);
    let text = resp.text().await.expect("body");
    assert!(text.contains("gone guard of customer reset"), "{text}");
    // Every held delete is released and written.
    wait_for(
        "the held deletes to be written",
        Duration::from_secs(20),
        || async {
            let deleted: std::collections::BTreeSet<_> = h
                .sink
                .log()
                .into_iter()
                .filter(|w| w.delete)
                .map(|w| w.key)
                .collect();
            deleted.len() == 10
        },
    )
    .await
    .expect("deletes written after the reset");
    wait_for(
        "readiness after the reset",
        Duration::from_secs(20),
        || async { get(&h, "/readyz").await.0 == 200 },
    )
    .await
    .expect("ready again");
    h.handle.shutdown();
}
