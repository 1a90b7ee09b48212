//! The Kafka topic sink against a real broker (`REFETCH_TEST_KAFKA`, started by `scripts/test`):
//! records are read back from the output topic.
#![cfg(feature = "kafka")]

use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use refetch::{Change, Entity, EntityKey, Sink, SinkError, Version};
use refetch_sinks::KafkaConfig;
use refetch_sinks::kafka::{
    HEADER_CONTENT_TYPE, HEADER_ID, HEADER_TYPE, HEADER_VERSION, KafkaSink,
};
use refetch_testkit::kafka;

/// Bytes that do not compress, so a size limit really bites.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test]
#[ignore = "needs a real broker: run scripts/test"]
async fn entities_tombstones_and_headers_reach_the_topic() -> anyhow::Result<()> {
    let brokers = kafka::brokers()?;
    let topic = refetch_testkit::names::unique("sink_out");
    // Compacted, and small enough that a 64 KiB record is refused by the broker.
    kafka::create_topic_with_config(
        &brokers,
        &topic,
        3,
        &[
            ("cleanup.policy", "compact"),
            ("max.message.bytes", "16384"),
        ],
    )
    .await?;
    let sink = KafkaSink::new(&KafkaConfig {
        brokers: brokers.clone(),
        topic: topic.clone(),
        delivery_timeout: Duration::from_secs(20),
        ..KafkaConfig::default()
    })?;
    sink.check().await.context("the topic is reachable")?;

    let batch = vec![
        Change::Upsert {
            key: EntityKey::new("customer", "1"),
            entity: Entity::json(r#"{"n":1}"#, Some(Version::Int(4))),
        },
        Change::Upsert {
            key: EntityKey::new("customer", "big"),
            entity: Entity {
                body: Bytes::from(noise(64 * 1024)),
                content_type: Some("application/octet-stream".into()),
                version: None,
                validators: None,
            },
        },
        Change::Delete {
            key: EntityKey::new("customer", "2"),
        },
        Change::Upsert {
            key: EntityKey::new("order", "x/y"),
            entity: Entity::json("{}", Some(Version::Timestamp(1_700_000_000_000_000))),
        },
    ];
    let report = sink.write(&batch).await?;
    assert_eq!(report.failed.len(), 1, "{report:?}");
    assert_eq!(report.failed[0].0, 1);
    assert!(
        matches!(report.failed[0].1, SinkError::Permanent { .. }),
        "{report:?}"
    );

    let records = kafka::read_all(&brokers, &topic, false, Duration::from_secs(30)).await?;
    let by_key = |k: &str| {
        records
            .iter()
            .find(|r| r.key.as_deref() == Some(k.as_bytes()))
            .with_context(|| format!("record {k} in {records:?}"))
    };
    assert_eq!(records.len(), 3, "{records:?}");
    let one = by_key("customer:1")?;
    assert_eq!(one.payload.as_deref(), Some(&br#"{"n":1}"#[..]));
    assert_eq!(one.header(HEADER_TYPE), Some(&b"customer"[..]));
    assert_eq!(one.header(HEADER_ID), Some(&b"1"[..]));
    assert_eq!(one.header(HEADER_VERSION), Some(&b"4"[..]));
    assert_eq!(
        one.header(HEADER_CONTENT_TYPE),
        Some(&b"application/json"[..])
    );
    let tombstone = by_key("customer:2")?;
    assert_eq!(tombstone.payload, None, "a gone entity is a tombstone");
    assert_eq!(tombstone.header(HEADER_VERSION), None);
    let order = by_key("order:x/y")?;
    assert_eq!(order.header(HEADER_ID), Some(&b"x/y"[..]));
    assert_eq!(
        order.header("refetch-version-kind"),
        Some(&b"timestamp"[..])
    );
    Ok(())
}

#[tokio::test]
#[ignore = "needs a real broker: run scripts/test"]
async fn an_unreachable_broker_fails_transiently() -> anyhow::Result<()> {
    // A port nothing listens on: delivery times out, which must never dead-letter anything.
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let closed = listener.local_addr()?.to_string();
    drop(listener);
    let sink = KafkaSink::new(&KafkaConfig {
        brokers: closed,
        topic: "nowhere".into(),
        delivery_timeout: Duration::from_secs(2),
        ..KafkaConfig::default()
    })?;
    let err = sink
        .write(&[Change::Delete {
            key: EntityKey::new("customer", "1"),
        }])
        .await
        .err()
        .context("nothing can be delivered")?;
    assert!(matches!(err, SinkError::Transient { .. }), "{err:?}");
    // Also make sure the real broker is configured, as every broker test must.
    kafka::brokers()?;
    Ok(())
}
