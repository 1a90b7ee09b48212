//! Smoke tests of the real services the integration tests run against: the single-node Kafka broker
//! from `scripts/kafka` and the PostgreSQL server from `scripts/postgres`.
//!
//! They prove the services and the testkit helpers work end to end before any refetch test relies on
//! them: a consumer group of each protocol (`classic` and KIP-848 `consumer`) reads everything a
//! producer wrote and commits exactly the end offsets; the broker keeps topics and committed offsets
//! across `scripts/kafka kill9` + `up` and `restart`; PostgreSQL stores and returns rows in a per-test
//! schema. Run them with `scripts/test`, or against running services with
//! `cargo test -p refetch-integration-tests --test broker_smoke -- --include-ignored`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use anyhow::Context;
use rdkafka::Message;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use refetch_testkit::names::unique;
use refetch_testkit::process::{kafka_script, wait_for_value};
use refetch_testkit::{kafka, postgres};
use tokio::sync::RwLock;
use tokio::time::{Instant, timeout_at};

/// Tests in this binary that use the broker hold this for reading; the restart test holds it for
/// writing, so no other test here sees the broker go away.
static BROKER: RwLock<()> = RwLock::const_new(());

const RECORDS: usize = 1_000;
const KEYS: usize = 97;

async fn group_reads_everything_and_commits_the_end(protocol: &str) -> anyhow::Result<()> {
    let _broker = BROKER.read().await;
    let brokers = kafka::brokers()?;
    let topic = unique(&format!("smoke_{protocol}"));
    let group = unique(&format!("smoke_{protocol}_group"));
    kafka::create_topic(&brokers, &topic, 3).await?;

    let records = (0..RECORDS).map(|i| {
        (
            Some(format!("key-{}", i % KEYS).into_bytes()),
            format!("{i}").into_bytes(),
        )
    });
    let last = kafka::produce(&brokers, &topic, records).await?;
    let end = kafka::end_offsets(&brokers, &topic).await?;
    assert_eq!(end.len(), 3, "three partitions");
    assert_eq!(end.values().sum::<i64>(), RECORDS as i64);
    assert!(
        end.values().all(|&n| n > 0),
        "97 keys spread over every partition: {end:?}"
    );
    for (partition, offset) in &last {
        assert_eq!(end.get(partition), Some(&(offset + 1)));
    }

    let mut config = kafka::client_config(&brokers);
    config
        .set("group.id", &group)
        .set("group.protocol", protocol)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest");
    if protocol == "classic" {
        config
            .set("session.timeout.ms", "6000")
            .set("partition.assignment.strategy", "cooperative-sticky");
    }
    let consumer: StreamConsumer = config.create().context("creating the group consumer")?;
    consumer.subscribe(&[&topic])?;

    let deadline = Instant::now() + Duration::from_secs(90);
    let mut seen = HashSet::new();
    let mut last_value_per_key: HashMap<Vec<u8>, usize> = HashMap::new();
    while seen.len() < RECORDS {
        let message = timeout_at(deadline, consumer.recv())
            .await
            .with_context(|| {
                format!(
                    "group {protocol}: only {} of {RECORDS} records arrived",
                    seen.len()
                )
            })??;
        assert!(
            seen.insert((message.partition(), message.offset())),
            "duplicate delivery of {}/{}",
            message.partition(),
            message.offset()
        );
        let key = message.key().context("every record has a key")?.to_vec();
        let value: usize = std::str::from_utf8(message.payload().context("payload")?)?.parse()?;
        if let Some(previous) = last_value_per_key.insert(key, value) {
            assert!(
                previous < value,
                "records of one key arrive in production order"
            );
        }
    }
    assert_eq!(last_value_per_key.len(), KEYS);

    consumer.commit_consumer_state(CommitMode::Async)?;
    let committed = wait_for_value(
        "the group's committed offsets to reach the end offsets",
        Duration::from_secs(30),
        || async {
            match kafka::committed_offsets(&brokers, &group, &topic).await {
                Ok(committed) if committed == end => Some(committed),
                _ => None,
            }
        },
    )
    .await?;
    assert_eq!(committed, end);
    consumer.unsubscribe();
    Ok(())
}

#[tokio::test]
#[ignore = "needs a real broker: run scripts/test"]
async fn classic_group_reads_everything_and_commits_the_end_offsets() -> anyhow::Result<()> {
    group_reads_everything_and_commits_the_end("classic").await
}

#[tokio::test]
#[ignore = "needs a real broker: run scripts/test"]
async fn consumer_protocol_group_reads_everything_and_commits_the_end_offsets() -> anyhow::Result<()>
{
    group_reads_everything_and_commits_the_end("consumer").await
}

async fn commit(brokers: &str, group: &str, topic: &str, offset: i64) -> anyhow::Result<()> {
    kafka::commit_offsets(brokers, group, topic, &BTreeMap::from([(0, offset)])).await
}

/// What the broker must still hold after it was killed or restarted.
async fn assert_broker_kept(
    brokers: &str,
    topic: &str,
    group: &str,
    records: usize,
    committed: i64,
) -> anyhow::Result<()> {
    let read = kafka::read_all(brokers, topic, true, Duration::from_secs(60)).await?;
    assert_eq!(read.len(), records, "records survive");
    assert_eq!(
        kafka::committed_offsets(brokers, group, topic).await?,
        BTreeMap::from([(0, committed)]),
        "committed offsets survive"
    );
    Ok(())
}

#[tokio::test]
#[ignore = "needs a real broker: run scripts/test"]
async fn broker_keeps_topics_and_committed_offsets_across_kill9_and_restart() -> anyhow::Result<()>
{
    let _broker = BROKER.write().await;
    let brokers = kafka::brokers()?;
    let topic = unique("smoke_restart");
    let group = unique("smoke_restart_group");
    kafka::create_topic(&brokers, &topic, 1).await?;
    kafka::produce(&brokers, &topic, (0..10).map(|i| (None, vec![i]))).await?;
    commit(&brokers, &group, &topic, 4).await?;
    assert_broker_kept(&brokers, &topic, &group, 10, 4).await?;

    kafka_script(&["kill9"]).await?;
    let status = kafka_script(&["status"]).await;
    assert!(status.is_err(), "status fails once the broker is killed");
    kafka_script(&["up"]).await?;
    assert_broker_kept(&brokers, &topic, &group, 10, 4).await?;

    kafka_script(&["restart"]).await?;
    // The broker accepts writes again and still has everything.
    kafka::produce(&brokers, &topic, [(None, vec![10])]).await?;
    commit(&brokers, &group, &topic, 11).await?;
    assert_broker_kept(&brokers, &topic, &group, 11, 11).await?;
    Ok(())
}

#[tokio::test]
#[ignore = "needs a real PostgreSQL: run scripts/test"]
async fn postgres_stores_and_returns_rows_in_a_fresh_schema() -> anyhow::Result<()> {
    let (client, schema) = postgres::fresh_schema().await?;
    client
        .batch_execute(
            "CREATE TABLE entity (id text PRIMARY KEY, version bigint NOT NULL, body text NOT NULL)",
        )
        .await?;
    for (id, version) in [("b", 2_i64), ("a", 1), ("c", 3)] {
        client
            .execute(
                "INSERT INTO entity (id, version, body) VALUES ($1, $2, $3)",
                &[&id, &version, &format!("body of {id}")],
            )
            .await?;
    }
    let rows = client
        .query("SELECT id, version, body FROM entity ORDER BY id", &[])
        .await?;
    let got: Vec<(String, i64, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        got,
        vec![
            ("a".to_owned(), 1, "body of a".to_owned()),
            ("b".to_owned(), 2, "body of b".to_owned()),
            ("c".to_owned(), 3, "body of c".to_owned()),
        ]
    );
    let table_schema: String = client
        .query_one(
            "SELECT table_schema::text FROM information_schema.tables WHERE table_name = 'entity' AND table_schema = $1",
            &[&schema],
        )
        .await?
        .get(0);
    assert_eq!(table_schema, schema);

    // Another session sees the committed rows.
    let other = postgres::connect().await?;
    let count: i64 = other
        .query_one(&format!("SELECT count(*) FROM {schema}.entity"), &[])
        .await?
        .get(0);
    assert_eq!(count, 3);
    Ok(())
}
