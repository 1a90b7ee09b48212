//! Scaling out against a real broker: two `refetch run` processes in one consumer group share the
//! partitions; one is killed (SIGKILL) mid-stream, the other takes its partitions over and redoes
//! what was not committed; the survivor then stops on SIGTERM with a final commit. Nothing is
//! lost: the sink equals the source for every entity and the committed offsets reach the end
//! offsets.
//!
//! Needs a real broker: run with `scripts/test` (or `REFETCH_TEST_KAFKA=host:port cargo test -p
//! refetch-cli --test scale_out -- --include-ignored`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use refetch::{EntityKey, Version};
use refetch_sinks::SqliteConfig;
use refetch_sinks::sqlite::SqliteSink;
use refetch_sinks::stored::StoredBody;
use refetch_testkit::http_source::{HttpSource, HttpSourceOptions};
use refetch_testkit::kafka;
use refetch_testkit::names::unique;
use refetch_testkit::process::{ChildProcess, kill9, spawn, terminate, wait_for, wait_for_value};
use serde_json::json;

const ENTITIES: usize = 300;
const PARTITIONS: i32 = 6;

fn write_config(path: &Path, brokers: &str, group: &str, topic: &str, source: &str, db: &Path) {
    let text = format!(
        r#"
[kafka]
brokers = "{brokers}"
group_id = "{group}"
consumer_properties = {{ "session.timeout.ms" = "6000", "heartbeat.interval.ms" = "1000" }}

[[topics]]
name = "{topic}"
decoder = {{ kind = "json", fixed_type = "customer", id = "/id" }}

[engine]
window = "50ms"
max_wait = "500ms"
commit_interval = "200ms"
shutdown_deadline = "10s"
rebalance_drain = "5s"

[fetcher.sources.customer]
url = "{source}/customer/{{id}}"
version = {{ pointer = "/version", kind = "integer" }}
not_found = {{ pointer = "/error", equals = "not_found" }}

[sink]
kind = "sqlite"
path = "{db}"
table = "customers"
busy_timeout = "30s"

[ops]
listen = "127.0.0.1:0"

[log]
level = "info"
"#,
        db = db.display()
    );
    std::fs::write(path, text).unwrap();
}

fn start(config: &Path, log: &Path) -> ChildProcess {
    spawn(
        env!("CARGO_BIN_EXE_refetch"),
        ["run", "--config", config.to_str().unwrap()],
        [("RUST_LOG", "info,rdkafka=warn")],
        log,
    )
    .unwrap()
}

async fn joined(child: &ChildProcess) {
    wait_for(
        "the process to get partitions",
        Duration::from_secs(60),
        || {
            let log = child.log();
            async move { log.contains("partitions assigned") }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", child.log()));
}

/// Change every entity once at the source, then announce each change (outbox order).
async fn round(source: &HttpSource, brokers: &str, topic: &str, n: usize) {
    let mut records = Vec::new();
    for i in 0..ENTITIES {
        let id = i.to_string();
        source.put(
            "customer",
            &id,
            json!({"round": n, "name": format!("customer {i}")}),
        );
        records.push((
            Some(id.clone().into_bytes()),
            json!({"id": id}).to_string().into_bytes(),
        ));
        // A second notification for some: coalesced.
        if i % 3 == 0 {
            records.push((
                Some(id.clone().into_bytes()),
                json!({"id": id}).to_string().into_bytes(),
            ));
        }
    }
    kafka::produce(brokers, topic, records).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn two_processes_share_a_group_and_lose_nothing_when_one_is_killed() {
    let brokers = kafka::brokers().unwrap();
    let topic = unique("scale_out");
    let group = unique("scale_out_group");
    kafka::create_topic(&brokers, &topic, PARTITIONS)
        .await
        .unwrap();
    kafka::create_topic(&brokers, &format!("{group}.dlq"), 1)
        .await
        .unwrap();
    let source = HttpSource::start(HttpSourceOptions::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("sink.db");
    let config = dir.path().join("refetch.toml");
    write_config(&config, &brokers, &group, &topic, &source.base_url(), &db);

    // One after the other: the first opens the SQLite file and switches it to WAL mode (two
    // processes doing that at the same moment can see "database is locked").
    let mut a = start(&config, &dir.path().join("a.log"));
    joined(&a).await;
    let mut b = start(&config, &dir.path().join("b.log"));
    joined(&b).await;

    round(&source, &brokers, &topic, 1).await;
    round(&source, &brokers, &topic, 2).await;
    // Both processes commit work on their partitions before one of them dies.
    wait_for("every partition to commit", Duration::from_secs(60), || {
        let (brokers, group, topic) = (brokers.clone(), group.clone(), topic.clone());
        async move {
            kafka::committed_offsets(&brokers, &group, &topic)
                .await
                .is_ok_and(|c| c.len() == PARTITIONS as usize && c.values().all(|o| *o > 0))
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nA:\n{}\nB:\n{}", a.log(), b.log()));
    round(&source, &brokers, &topic, 3).await;
    kill9(&mut b).await.unwrap();
    round(&source, &brokers, &topic, 4).await;
    round(&source, &brokers, &topic, 5).await;

    // The survivor takes over B's partitions (after the session timeout) and catches up.
    let ends = kafka::end_offsets(&brokers, &topic).await.unwrap();
    wait_for_value(
        "committed offsets to reach the end offsets",
        Duration::from_secs(120),
        || {
            let (brokers, group, topic, ends) =
                (brokers.clone(), group.clone(), topic.clone(), ends.clone());
            async move {
                let committed = kafka::committed_offsets(&brokers, &group, &topic)
                    .await
                    .ok()?;
                (committed == ends).then_some(())
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\nA:\n{}\nB:\n{}", a.log(), b.log()));

    // SIGTERM: graceful stop with a final commit, exit 0.
    let status = terminate(&mut a, Duration::from_secs(60)).await.unwrap();
    let log_a = a.log();
    assert_eq!(status.code(), Some(0), "{log_a}");
    assert!(
        log_a.contains("final commit done") || log_a.contains("refetch stopped"),
        "{log_a}"
    );
    assert_eq!(
        kafka::committed_offsets(&brokers, &group, &topic)
            .await
            .unwrap(),
        ends,
        "nothing committed beyond the end, nothing left behind"
    );

    // The sink equals the source for every entity.
    let sink = SqliteSink::open(&SqliteConfig {
        path: db.clone(),
        table: "customers".into(),
        ..SqliteConfig::default()
    })
    .await
    .unwrap();
    let held = sink.snapshot().await.unwrap();
    let mut differences = Vec::new();
    for ((t, id), state) in source.snapshot() {
        let Some((version, body)) = state else {
            continue;
        };
        match held.get(&EntityKey::new(t.as_str(), id.as_str())) {
            Some(row)
                if row.version == Some(Version::Int(version))
                    && row.body == Some(StoredBody::Json(body.clone())) => {}
            other => differences.push(format!("{t}:{id} source v{version}, sink {other:?}")),
        }
    }
    assert_eq!(held.len(), ENTITIES, "one row per entity");
    assert!(
        differences.is_empty(),
        "{} entities differ, first: {:?}",
        differences.len(),
        differences.first()
    );
}
