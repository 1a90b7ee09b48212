//! One end-to-end test per built-in sink through the whole pipeline on the real broker: the
//! source changes (and deletes) entities, notifications go to Kafka, refetch fetches and writes,
//! and at the end the sink equals the source for every entity (deleted ones absent or
//! tombstoned) with the committed offsets at the end of the topic.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::put;
use refetch::decode::JsonDecoder;
use refetch::{EngineConfig, EntityKey, KafkaConfig, Pipeline, Sink};
use refetch_sinks::jsonl::{JsonlSink, read_latest};
use refetch_sinks::kafka::KafkaSink;
use refetch_sinks::postgres::PostgresSink;
use refetch_sinks::sqlite::SqliteSink;
use refetch_sinks::{
    DeleteMode, HttpConfig, JsonlConfig, PostgresConfig, Secret, SqliteConfig, build_sink,
};
use refetch_testkit::kafka::{self, OutRecord};
use refetch_testkit::memory::VersionedSource;
use refetch_testkit::names::unique;
use refetch_testkit::process::wait_for;

/// What a sink holds: key -> version (deleted entities absent).
type Held = BTreeMap<EntityKey, i64>;

const ENTITIES: usize = 200;

/// Runs the pipeline into `sink` while the source changes; returns the source.
async fn run_through(sink: Arc<dyn Sink>) -> (VersionedSource, String) {
    let brokers = kafka::brokers().unwrap();
    let topic = unique("sink_e2e");
    let group = unique("sink_e2e_group");
    kafka::create_topic(&brokers, &topic, 3).await.unwrap();
    kafka::create_topic(&brokers, &format!("{group}.dlq"), 1)
        .await
        .unwrap();
    let source = VersionedSource::new();
    let mut k = KafkaConfig::new(brokers.clone(), group.clone(), vec![topic.clone()]);
    k.consumer_properties
        .insert("session.timeout.ms".into(), "6000".into());
    let pipeline = Pipeline::builder::<VersionedSource, Arc<dyn Sink>>()
        .fetcher(source.clone())
        .sink(sink)
        .kafka(k)
        .decoder(JsonDecoder::fixed_type("customer", "/id"))
        .engine(EngineConfig {
            window: Duration::from_millis(30),
            max_wait: Duration::from_millis(300),
            commit_interval: Duration::from_millis(100),
            ..EngineConfig::default()
        })
        .build()
        .unwrap();
    let handle = pipeline.handle();
    let task = tokio::spawn(pipeline.run(std::future::pending()));
    for round in 0..3 {
        let mut records = Vec::new();
        for i in 0..ENTITIES {
            let key = EntityKey::new("customer", i.to_string());
            if round == 2 && i % 10 == 0 {
                source.delete(&key);
            } else if round == 0 || i % 2 == round % 2 {
                source.change(&key);
            } else {
                continue;
            }
            records.push(OutRecord::keyed(
                i.to_string(),
                format!(r#"{{"id":"{i}"}}"#),
            ));
        }
        kafka::produce_records(&brokers, &topic, records)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ends = kafka::end_offsets(&brokers, &topic).await.unwrap();
    wait_for("commits to reach the end", Duration::from_secs(90), || {
        let (b, g, t, e) = (brokers.clone(), group.clone(), topic.clone(), ends.clone());
        async move {
            kafka::committed_offsets(&b, &g, &t)
                .await
                .is_ok_and(|c| c == e)
        }
    })
    .await
    .unwrap();
    handle.shutdown();
    let report = tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(report.status.counters.dead_letters, 0);
    (source, brokers)
}

fn expected(source: &VersionedSource) -> Held {
    source
        .snapshot()
        .into_iter()
        .filter(|(_, e)| !e.deleted)
        .map(|(k, e)| (k, e.version))
        .collect()
}

fn assert_equal(held: &Held, source: &VersionedSource, sink: &str) {
    let want = expected(source);
    let wrong: Vec<_> = want
        .iter()
        .filter(|(k, v)| held.get(*k) != Some(*v))
        .chain(held.iter().filter(|(k, _)| !want.contains_key(*k)))
        .take(3)
        .collect();
    assert!(
        wrong.is_empty(),
        "{sink}: sink differs from source, e.g. {wrong:?}"
    );
    assert_eq!(held.len(), want.len(), "{sink}");
    println!(
        "{sink}: {} entities equal the source ({} deleted)",
        want.len(),
        ENTITIES - want.len()
    );
}

fn version_of(v: Option<refetch::Version>) -> i64 {
    v.map_or(-1, |v| v.value())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker and PostgreSQL: run scripts/test"]
async fn postgres_sink_end_to_end() {
    let (_client, schema) = refetch_testkit::postgres::fresh_schema().await.unwrap();
    let cfg = PostgresConfig {
        url: Secret::new(refetch_testkit::postgres::url().unwrap()),
        schema,
        table: "customers".into(),
        create_table: true,
        deletes: DeleteMode::Tombstone,
        ..PostgresConfig::default()
    };
    let sink = PostgresSink::connect(&cfg).await.unwrap();
    let (source, _) = run_through(Arc::new(sink)).await;
    let reader = PostgresSink::connect(&cfg).await.unwrap();
    let held: Held = reader
        .list_versions(None, 100_000)
        .await
        .unwrap()
        .into_iter()
        .filter(|h| !h.deleted)
        .map(|h| (h.key, version_of(h.version)))
        .collect();
    assert_equal(&held, &source, "postgres");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn kafka_sink_end_to_end() {
    let brokers = kafka::brokers().unwrap();
    let out = unique("entities");
    kafka::create_topic(&brokers, &out, 3).await.unwrap();
    let sink = KafkaSink::new(&refetch_sinks::KafkaConfig {
        brokers: brokers.clone(),
        topic: out.clone(),
        ..refetch_sinks::KafkaConfig::default()
    })
    .unwrap();
    let (source, brokers) = run_through(Arc::new(sink)).await;
    let mut held = Held::new();
    for r in kafka::read_all(&brokers, &out, true, Duration::from_secs(5))
        .await
        .unwrap()
    {
        let key = String::from_utf8(r.key.unwrap()).unwrap();
        let (t, id) = key.split_once(':').unwrap();
        let key = EntityKey::new(t, id);
        match r.payload {
            None => {
                held.remove(&key);
            }
            Some(p) => {
                let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
                held.insert(key, v["version"].as_i64().unwrap());
            }
        }
    }
    assert_equal(&held, &source, "kafka");
}

#[derive(Clone, Default)]
struct Target(Arc<Mutex<HashMap<(String, String), i64>>>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn http_sink_end_to_end() {
    let target = Target::default();
    let app =
        axum::Router::new()
            .route(
                "/entities/{t}/{id}",
                put(
                    |State(s): State<Target>,
                     Path((t, id)): Path<(String, String)>,
                     h: HeaderMap| async move {
                        let v = h
                            .get("X-Entity-Version")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse().ok())
                            .unwrap_or(-1);
                        s.0.lock().unwrap().insert((t, id), v);
                        StatusCode::NO_CONTENT
                    },
                )
                .delete(
                    |State(s): State<Target>, Path((t, id)): Path<(String, String)>| async move {
                        s.0.lock().unwrap().remove(&(t, id));
                        StatusCode::NO_CONTENT
                    },
                ),
            )
            .with_state(target.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let sink = build_sink(&refetch_sinks::SinkConfig::Http(HttpConfig {
        url_template: format!("http://{addr}/entities/{{type}}/{{id}}"),
        ..HttpConfig::default()
    }))
    .await
    .unwrap();
    let (source, _) = run_through(sink).await;
    let held: Held = target
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|((t, id), v)| (EntityKey::new(t.as_str(), id.as_str()), *v))
        .collect();
    assert_equal(&held, &source, "http");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn sqlite_and_jsonl_sinks_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite_cfg = SqliteConfig {
        path: dir.path().join("sink.db"),
        table: "customers".into(),
        deletes: DeleteMode::Delete,
        ..SqliteConfig::default()
    };
    let sink = SqliteSink::open(&sqlite_cfg).await.unwrap();
    let (source, _) = run_through(Arc::new(sink)).await;
    let reader = SqliteSink::open(&sqlite_cfg).await.unwrap();
    let held: Held = reader
        .snapshot()
        .await
        .unwrap()
        .into_iter()
        .filter(|(_, e)| !e.deleted)
        .map(|(k, e)| (k, version_of(e.version)))
        .collect();
    assert_equal(&held, &source, "sqlite");

    let path = dir.path().join("sink.jsonl");
    let sink = JsonlSink::open(&JsonlConfig {
        path: path.clone(),
        ..JsonlConfig::default()
    })
    .await
    .unwrap();
    let (source, _) = run_through(Arc::new(sink)).await;
    let held: Held = read_latest(&path)
        .unwrap()
        .into_iter()
        .map(|(k, e)| (k, version_of(e.version)))
        .collect();
    assert_equal(&held, &source, "jsonl");
}
