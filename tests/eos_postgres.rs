//! Exactly-once into PostgreSQL, on the real broker and the real server: a process dies with
//! SIGKILL after the database committed its writes and offsets but before the consumer group's
//! offsets followed (the Kafka commit for lag tooling), and a restart re-applies nothing.
//!
//! A trigger counts the writes of every row (`writes`). The dying process is this test binary
//! re-executed as a child: it runs the pipeline on the real consumer, whose Kafka commits it
//! drops (as if it died right after each database commit), and prints a line once the database
//! stored offsets for half of the notifications; the parent kills it with SIGKILL then. A
//! `refetch run` process finishes the work. Every row must have been written once, and the
//! table must equal the source. The same restart without the stored offsets (at-least-once)
//! writes the rows after the group's offset again: the check is what fails then.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use refetch::Delivery;
use refetch::consumer::{ConsumerChannels, ConsumerCommand};
use refetch::decode::JsonDecoder;
use refetch::kafka::{DeadLetterProducer, KafkaConfig, start_consumer};
use refetch::{EngineConfig, Pipeline};
use refetch_integration_tests::refetch_binary;
use refetch_sinks::postgres::PostgresSink;
use refetch_sinks::{PostgresConfig, Secret};
use refetch_testkit::http_source::{HttpSource, HttpSourceOptions};
use refetch_testkit::kafka;
use refetch_testkit::names::unique;
use refetch_testkit::process::{spawn, terminate};
use serde_json::json;

const CHILD_ENV: &str = "REFETCH_EOS_PG_CHILD";
const ACKED: &str = "REFETCH-EOS-CHILD-STORED";
const KEYS: usize = 2_000;

/// What the child needs, passed as JSON in `CHILD_ENV`.
#[derive(serde::Serialize, serde::Deserialize)]
struct ChildSetup {
    brokers: String,
    pg_url: String,
    topic: String,
    group: String,
    schema: String,
    source: String,
    stop_at: i64,
}

fn fetcher_toml(source: &str) -> String {
    format!(
        r#"
[sources.customer]
url = "{source}/customer/{{id}}"
timeout = "2s"
version = {{ pointer = "/version", kind = "integer" }}
not_found = {{ pointer = "/error", equals = "not_found" }}
"#
    )
}

fn engine() -> EngineConfig {
    EngineConfig {
        window: Duration::from_millis(20),
        max_wait: Duration::from_millis(300),
        commit_interval: Duration::from_millis(200),
        fetch_concurrency: 16,
        ..EngineConfig::default()
    }
}

fn pg_config(url: &str, schema: &str, delivery: Delivery) -> PostgresConfig {
    PostgresConfig {
        url: Secret::new(url.to_owned()),
        schema: schema.to_owned(),
        table: "customers".into(),
        create_table: true,
        delivery,
        ..PostgresConfig::default()
    }
}

/// The child: the pipeline with its Kafka commits dropped; reports once half is stored.
async fn run_child(setup: ChildSetup) -> ! {
    let kcfg = KafkaConfig {
        consumer_properties: [
            ("session.timeout.ms".to_owned(), "6000".to_owned()),
            ("heartbeat.interval.ms".to_owned(), "500".to_owned()),
        ]
        .into(),
        ..KafkaConfig::new(
            setup.brokers.clone(),
            setup.group.clone(),
            vec![setup.topic.clone()],
        )
    };
    let cfg = engine();
    let channels = start_consumer(&kcfg, cfg.rebalance_drain, cfg.commit_timeout).unwrap();
    // Every Kafka commit is dropped: the process "dies" right after each database commit.
    let (cmd_tx, mut cmd_rx) = tokio::sync::mpsc::unbounded_channel();
    let inner = channels.commands.clone();
    tokio::spawn(async move {
        while let Some(c) = cmd_rx.recv().await {
            match c {
                ConsumerCommand::Commit { reply, .. } => {
                    let _ = reply.send(Ok(Vec::new()));
                }
                other => {
                    let _ = inner.send(other);
                }
            }
        }
    });
    let channels = ConsumerChannels {
        events: channels.events,
        commands: cmd_tx,
        queued: channels.queued,
    };
    let fetcher_cfg: refetch_http::HttpFetcherConfig =
        toml::from_str(&fetcher_toml(&setup.source)).unwrap();
    let fetcher = refetch_http::HttpFetcher::from_config(fetcher_cfg).unwrap();
    let sink = PostgresSink::connect(&pg_config(
        &setup.pg_url,
        &setup.schema,
        Delivery::ExactlyOnce,
    ))
    .await
    .unwrap();
    let pipeline = Pipeline::builder::<refetch_http::HttpFetcher, PostgresSink>()
        .fetcher(fetcher)
        .sink(sink)
        .consumer(channels)
        .group_id(setup.group.clone())
        .dead_letters(DeadLetterProducer::new(&kcfg).unwrap())
        .decoder(JsonDecoder::fixed_type("customer", "/id"))
        .engine(cfg)
        .build()
        .unwrap();
    tokio::spawn(pipeline.run(std::future::pending()));
    let client = refetch_testkit::postgres::connect().await.unwrap();
    loop {
        let stored: i64 = client
            .query_one(
                &format!(
                    "SELECT coalesce(sum(next_offset), 0)::bigint FROM {}.refetch_offsets WHERE group_id = $1",
                    setup.schema
                ),
                &[&setup.group],
            )
            .await
            .map(|r| r.get(0))
            .unwrap_or(0);
        if stored >= setup.stop_at {
            println!("\n{ACKED}");
            loop {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Run this test binary as the child until it prints `ACKED`, then SIGKILL it.
fn run_child_until_stored(test: &str, setup: &ChildSetup) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            test,
            "--exact",
            "--nocapture",
            "--include-ignored",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, serde_json::to_string(setup).unwrap())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if line.trim() == ACKED {
                let _ = tx.send(());
                break;
            }
        }
    });
    let stored = rx.recv_timeout(Duration::from_secs(120));
    // SIGKILL: no destructors, no final commit, no leaving the group.
    child.kill().unwrap();
    child.wait().unwrap();
    stored.expect("the child stored offsets for half of the notifications");
}

async fn sigkill_between_commits(delivery_after: &str) -> Vec<String> {
    let brokers = kafka::brokers().unwrap();
    let pg_url = refetch_testkit::postgres::url().unwrap();
    let topic = unique("eos_pg");
    let group = unique("eos_pg_group");
    kafka::create_topic(&brokers, &topic, 4).await.unwrap();
    kafka::create_topic(&brokers, &format!("{group}.dlq"), 1)
        .await
        .unwrap();
    let source = HttpSource::start(HttpSourceOptions::default())
        .await
        .unwrap();
    // The table, with a trigger counting every row's writes.
    let (client, schema) = refetch_testkit::postgres::fresh_schema().await.unwrap();
    drop(
        PostgresSink::connect(&pg_config(&pg_url, &schema, Delivery::AtLeastOnce))
            .await
            .unwrap(),
    );
    client
        .batch_execute(&format!(
            "ALTER TABLE {schema}.customers ADD COLUMN writes integer NOT NULL DEFAULT 0;
             CREATE FUNCTION {schema}.count_writes() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF TG_OP = 'INSERT' THEN NEW.writes := 1; ELSE NEW.writes := OLD.writes + 1; END IF;
               RETURN NEW;
             END $$;
             CREATE TRIGGER count_writes BEFORE INSERT OR UPDATE ON {schema}.customers
               FOR EACH ROW EXECUTE FUNCTION {schema}.count_writes();"
        ))
        .await
        .unwrap();
    // One notification per key, without a version: only a write satisfies it.
    let mut records = Vec::new();
    for i in 0..KEYS {
        let id = i.to_string();
        let v = source.put("customer", &id, json!({"name": format!("customer {i}")}));
        records.push((
            Some(id.clone().into_bytes()),
            json!({"id": id, "v": v}).to_string().into_bytes(),
        ));
    }
    kafka::produce(&brokers, &topic, records).await.unwrap();
    let setup = ChildSetup {
        brokers: brokers.clone(),
        pg_url: pg_url.clone(),
        topic: topic.clone(),
        group: group.clone(),
        schema: schema.clone(),
        source: source.base_url(),
        stop_at: (KEYS / 2) as i64,
    };
    run_child_until_stored(
        "sigkill_between_the_database_commit_and_the_kafka_commit_reapplies_nothing",
        &setup,
    );
    // The database is ahead of the group: the group committed nothing.
    let committed = kafka::committed_offsets(&brokers, &group, &topic)
        .await
        .unwrap();
    assert!(
        committed.is_empty(),
        "the child's Kafka commits were dropped: {committed:?}"
    );
    let stored: i64 = client
        .query_one(
            &format!("SELECT coalesce(sum(next_offset), 0)::bigint FROM {schema}.refetch_offsets"),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(stored >= (KEYS / 2) as i64, "stored {stored}");

    // The restart: `refetch run`.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("refetch.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[kafka]
brokers = "{brokers}"
group_id = "{group}"
group_protocol = "classic"
consumer_properties = {{ "session.timeout.ms" = "6000", "heartbeat.interval.ms" = "500" }}

[[topics]]
name = "{topic}"
decoder = {{ kind = "json", fixed_type = "customer", id = "/id" }}

[engine]
window = "20ms"
max_wait = "300ms"
commit_interval = "200ms"

[fetcher]
{fetcher}

[sink]
kind = "postgres"
url = "{pg_url}"
schema = "{schema}"
table = "customers"
delivery = "{delivery_after}"

[ops]
listen = "127.0.0.1:0"
"#,
            fetcher = fetcher_toml(&source.base_url()).replace("[sources.", "[fetcher.sources."),
        ),
    )
    .unwrap();
    let mut run = spawn(
        refetch_binary().unwrap(),
        ["run", "--config", config.to_str().unwrap()],
        [("RUST_LOG", "info,rdkafka=warn")],
        dir.path().join("restart.log"),
    )
    .unwrap();
    refetch_integration_tests::until_committed(
        &brokers,
        &group,
        &topic,
        Duration::from_secs(120),
        &[&run],
    )
    .await
    .unwrap();
    let status = terminate(&mut run, Duration::from_secs(60)).await.unwrap();
    assert_eq!(status.code(), Some(0), "{}", run.log());

    // Every row written once, and the table equals the source.
    let rows = client
        .query(
            &format!("SELECT entity_id, version, writes FROM {schema}.customers"),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), KEYS, "every key has a row");
    let mut problems = Vec::new();
    let snapshot = source.snapshot();
    for r in rows {
        let id: String = r.get(0);
        let version: Option<i64> = r.get(1);
        let writes: i32 = r.get(2);
        if writes != 1 {
            problems.push(format!("{id}: written {writes} times"));
        }
        let want = snapshot
            .get(&("customer".to_owned(), id.clone()))
            .and_then(|s| s.as_ref().map(|(v, _)| *v));
        if version != want {
            problems.push(format!("{id}: version {version:?}, source {want:?}"));
        }
    }
    println!(
        "postgres exactly-once restart ({delivery_after}): {} keys, {} stored before the SIGKILL, {} problems",
        KEYS,
        stored,
        problems.len()
    );
    problems
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker and PostgreSQL: run scripts/test"]
async fn sigkill_between_the_database_commit_and_the_kafka_commit_reapplies_nothing() {
    if let Ok(setup) = std::env::var(CHILD_ENV) {
        run_child(serde_json::from_str(&setup).unwrap()).await;
    }
    let problems = tokio::time::timeout(
        Duration::from_secs(240),
        sigkill_between_commits("exactly_once"),
    )
    .await
    .expect("wall-clock cap");
    assert!(
        problems.is_empty(),
        "{} rows wrong, first: {:?}",
        problems.len(),
        &problems[..problems.len().min(10)]
    );
}
