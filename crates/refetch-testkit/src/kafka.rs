//! The real Apache Kafka broker that integration tests talk to, and the admin, produce and read-back
//! helpers they use to set up input and check results.
//!
//! The broker's address comes from `REFETCH_TEST_KAFKA` (`host:port`), which `scripts/test` exports
//! after starting a single-node broker with `scripts/kafka up`. When it is unset, [`brokers`] fails
//! with a message saying how to run the test: a real-broker test never passes by skipping.
//!
//! Everything here is async. The rdkafka calls that block (metadata, watermarks, committed offsets,
//! transactions, the read-back consumer) run on tokio's blocking pool, so a test can use these helpers
//! while the pipeline under test runs on the same runtime.
//!
//! The helpers are deliberately independent of the engine: they use their own clients, so a check
//! made with [`committed_offsets`] or [`read_all`] sees what the broker holds, not what the engine
//! believes.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use futures::future::join_all;
use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, FutureProducer, FutureRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio::task::spawn_blocking;
use tokio::time::Instant;

/// The environment variable naming the broker (`host:port[,host:port...]`).
pub const BROKERS_ENV: &str = "REFETCH_TEST_KAFKA";

/// How long a single broker request made by these helpers may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The broker address from `REFETCH_TEST_KAFKA`. Fails, naming `scripts/test`, when it is unset or
/// empty: tests that need a broker must not silently pass without one.
pub fn brokers() -> anyhow::Result<String> {
    match std::env::var(BROKERS_ENV) {
        Ok(v) if !v.trim().is_empty() => Ok(v.trim().to_owned()),
        _ => bail!(
            "{BROKERS_ENV} is not set: this test needs a real Kafka broker. Run the suite with \
             scripts/test, or start one with `eval \"$(scripts/kafka up)\"` and run \
             `cargo test -- --include-ignored` in that shell"
        ),
    }
}

/// The client settings every helper starts from: the bootstrap servers and a client id. The place to
/// add security settings when the broker gets an authenticated listener.
pub fn client_config(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("client.id", "refetch-testkit")
        .set("broker.address.family", "v4");
    config
}

/// Creates `name` with `partitions` partitions (replication factor 1) and waits until the broker's
/// metadata shows every partition with a leader.
pub async fn create_topic(brokers: &str, name: &str, partitions: i32) -> anyhow::Result<()> {
    create_topic_with_config(brokers, name, partitions, &[]).await
}

/// [`create_topic`] with topic configs, e.g. `[("cleanup.policy", "compact")]` for a compacted topic.
pub async fn create_topic_with_config(
    brokers: &str,
    name: &str,
    partitions: i32,
    config: &[(&str, &str)],
) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = client_config(brokers)
        .create()
        .context("creating the Kafka admin client")?;
    let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    for (key, value) in config {
        topic = topic.set(key, value);
    }
    let options = AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT));
    let results = admin
        .create_topics([&topic], &options)
        .await
        .with_context(|| format!("creating topic {name} on {brokers}"))?;
    for result in results {
        result.map_err(|(topic, code)| anyhow!("creating topic {topic} on {brokers}: {code}"))?;
    }

    let (brokers, name) = (brokers.to_owned(), name.to_owned());
    spawn_blocking(move || wait_for_topic(&brokers, &name, partitions))
        .await
        .context("the topic metadata task panicked")?
}

fn wait_for_topic(brokers: &str, name: &str, partitions: i32) -> anyhow::Result<()> {
    let consumer = metadata_consumer(brokers)?;
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    loop {
        let last = match consumer.fetch_metadata(Some(name), Duration::from_secs(5)) {
            Ok(metadata) => {
                let ready = metadata.topics().iter().any(|t| {
                    t.name() == name
                        && t.error().is_none()
                        && t.partitions().len() == partitions as usize
                        && t.partitions().iter().all(|p| p.leader() >= 0)
                });
                if ready {
                    return Ok(());
                }
                let seen = metadata
                    .topics()
                    .first()
                    .map(|t| (t.error(), t.partitions().len()));
                format!("(error, partitions) = {seen:?}")
            }
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            bail!(
                "topic {name} was created but its metadata did not show {partitions} partitions with leaders within {REQUEST_TIMEOUT:?} (last: {last})"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A record to produce with [`produce_records`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutRecord {
    /// The record key; `None` produces an unkeyed record (spread over partitions by the producer).
    pub key: Option<Vec<u8>>,
    /// The value; `None` produces a tombstone.
    pub payload: Option<Vec<u8>>,
    /// A fixed partition, or `None` to let the producer's partitioner choose from the key.
    pub partition: Option<i32>,
    /// Record headers, in order.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl OutRecord {
    /// A record with a key and a payload, partitioned by key.
    pub fn keyed(key: impl Into<Vec<u8>>, payload: impl Into<Vec<u8>>) -> Self {
        OutRecord {
            key: Some(key.into()),
            payload: Some(payload.into()),
            ..OutRecord::default()
        }
    }
}

/// Produces `(key, payload)` records to `topic` with an idempotent producer (`acks=all`), in order,
/// and returns the offset of the last record written to each partition. Records with the same key land
/// on the same partition in the order given.
pub async fn produce(
    brokers: &str,
    topic: &str,
    records: impl IntoIterator<Item = (Option<Vec<u8>>, Vec<u8>)>,
) -> anyhow::Result<BTreeMap<i32, i64>> {
    let records = records.into_iter().map(|(key, payload)| OutRecord {
        key,
        payload: Some(payload),
        ..OutRecord::default()
    });
    produce_records(brokers, topic, records).await
}

/// [`produce`] for records with headers, fixed partitions or tombstones.
pub async fn produce_records(
    brokers: &str,
    topic: &str,
    records: impl IntoIterator<Item = OutRecord>,
) -> anyhow::Result<BTreeMap<i32, i64>> {
    let records: Vec<OutRecord> = records.into_iter().collect();
    let producer: FutureProducer = client_config(brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "60000")
        .create()
        .context("creating the Kafka producer")?;

    let mut pending = Vec::with_capacity(records.len());
    let mut last = BTreeMap::new();
    for record in &records {
        let headers = owned_headers(&record.headers);
        let mut future_record = FutureRecord::<[u8], [u8]>::to(topic);
        if let Some(key) = &record.key {
            future_record = future_record.key(key.as_slice());
        }
        if let Some(payload) = &record.payload {
            future_record = future_record.payload(payload.as_slice());
        }
        if let Some(partition) = record.partition {
            future_record = future_record.partition(partition);
        }
        if let Some(headers) = headers {
            future_record = future_record.headers(headers);
        }
        loop {
            match producer.send_result(future_record) {
                Ok(delivery) => {
                    pending.push(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // The local queue is full: let what is queued be delivered, then retry.
                    collect_deliveries(std::mem::take(&mut pending), topic, &mut last).await?;
                    future_record = back;
                }
                Err((e, _)) => return Err(e).with_context(|| format!("producing to {topic}")),
            }
        }
    }
    collect_deliveries(pending, topic, &mut last).await?;
    Ok(last)
}

async fn collect_deliveries(
    pending: Vec<rdkafka::producer::DeliveryFuture>,
    topic: &str,
    last: &mut BTreeMap<i32, i64>,
) -> anyhow::Result<()> {
    for result in join_all(pending).await {
        let delivery = result
            .map_err(|_| anyhow!("the producer was dropped before delivering to {topic}"))?
            .map_err(|(e, _)| anyhow!("delivering a record to {topic}: {e}"))?;
        let entry = last.entry(delivery.partition).or_insert(delivery.offset);
        *entry = (*entry).max(delivery.offset);
    }
    Ok(())
}

fn owned_headers(headers: &[(String, Vec<u8>)]) -> Option<OwnedHeaders> {
    if headers.is_empty() {
        return None;
    }
    let mut owned = OwnedHeaders::new_with_capacity(headers.len());
    for (key, value) in headers {
        owned = owned.insert(Header {
            key,
            value: Some(value.as_slice()),
        });
    }
    Some(owned)
}

/// How a transaction opened by [`produce_in_transaction`] ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionEnd {
    /// Commit: read-committed consumers see the records.
    Commit,
    /// Abort: the records stay in the log but read-committed consumers skip them.
    Abort,
}

/// Produces `records` inside one transaction of a fresh transactional producer, then ends it as `end`
/// says. Returns the offset of the last record written to each partition. Either way the log gets a
/// transaction marker after the records, so offsets have gaps that no consumer ever receives.
pub async fn produce_in_transaction(
    brokers: &str,
    topic: &str,
    records: impl IntoIterator<Item = OutRecord>,
    end: TransactionEnd,
) -> anyhow::Result<BTreeMap<i32, i64>> {
    let records: Vec<OutRecord> = records.into_iter().collect();
    let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
    spawn_blocking(move || transaction_blocking(&brokers, &topic, &records, end))
        .await
        .context("the transactional producer task panicked")?
}

/// Produces `records` in a transaction and aborts it: the records occupy offsets (plus an abort marker)
/// that a read-committed consumer steps over. Used to prove that committed offsets move past aborted
/// transactions. Returns the offset of the last aborted record per partition.
pub async fn produce_aborted_transaction(
    brokers: &str,
    topic: &str,
    records: impl IntoIterator<Item = (Option<Vec<u8>>, Vec<u8>)>,
) -> anyhow::Result<BTreeMap<i32, i64>> {
    let records = records.into_iter().map(|(key, payload)| OutRecord {
        key,
        payload: Some(payload),
        ..OutRecord::default()
    });
    produce_in_transaction(brokers, topic, records, TransactionEnd::Abort).await
}

fn transaction_blocking(
    brokers: &str,
    topic: &str,
    records: &[OutRecord],
    end: TransactionEnd,
) -> anyhow::Result<BTreeMap<i32, i64>> {
    use rdkafka::producer::{DeliveryResult, ProducerContext};
    use std::sync::{Arc, Mutex};

    /// One delivery report: (partition, offset), or the error text.
    type Report = Result<(i32, i64), String>;
    // Deliveries are reported to the producer's context; collect them there.
    #[derive(Default)]
    struct Deliveries(Arc<Mutex<Vec<Report>>>);
    impl rdkafka::ClientContext for Deliveries {}
    impl ProducerContext for Deliveries {
        type DeliveryOpaque = ();
        fn delivery(&self, result: &DeliveryResult<'_>, _: Self::DeliveryOpaque) {
            let entry = match result {
                Ok(m) => Ok((m.partition(), m.offset())),
                Err((e, _)) => Err(e.to_string()),
            };
            if let Ok(mut list) = self.0.lock() {
                list.push(entry);
            }
        }
    }

    let delivered = Arc::new(Mutex::new(Vec::new()));
    let producer: BaseProducer<Deliveries> = client_config(brokers)
        .set(
            "transactional.id",
            crate::names::unique("refetch_testkit_txn"),
        )
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create_with_context(Deliveries(Arc::clone(&delivered)))
        .context("creating the transactional producer")?;
    producer
        .init_transactions(REQUEST_TIMEOUT)
        .context("init_transactions")?;
    producer.begin_transaction().context("begin_transaction")?;
    for record in records {
        let mut base = BaseRecord::<[u8], [u8]>::to(topic);
        if let Some(key) = &record.key {
            base = base.key(key.as_slice());
        }
        if let Some(payload) = &record.payload {
            base = base.payload(payload.as_slice());
        }
        if let Some(partition) = record.partition {
            base = base.partition(partition);
        }
        if let Some(headers) = owned_headers(&record.headers) {
            base = base.headers(headers);
        }
        loop {
            match producer.send(base) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    producer.poll(Duration::from_millis(100));
                    base = back;
                }
                Err((e, _)) => {
                    return Err(e)
                        .with_context(|| format!("producing to {topic} in a transaction"));
                }
            }
        }
    }
    producer
        .flush(REQUEST_TIMEOUT)
        .context("flushing the transaction's records")?;
    match end {
        TransactionEnd::Commit => producer
            .commit_transaction(REQUEST_TIMEOUT)
            .context("commit_transaction")?,
        TransactionEnd::Abort => producer
            .abort_transaction(REQUEST_TIMEOUT)
            .context("abort_transaction")?,
    }

    let results = delivered
        .lock()
        .map_err(|_| anyhow!("the delivery list lock was poisoned"))?
        .clone();
    if results.len() != records.len() {
        bail!(
            "{} of {} transactional records were reported delivered",
            results.len(),
            records.len()
        );
    }
    let mut last = BTreeMap::new();
    for result in results {
        let (partition, offset) =
            result.map_err(|e| anyhow!("delivering a transactional record to {topic}: {e}"))?;
        let entry = last.entry(partition).or_insert(offset);
        *entry = (*entry).max(offset);
    }
    Ok(last)
}

/// The offsets `group` has committed on `topic`, per partition; partitions without a committed offset
/// are left out. Read with a separate client that does not join the group, so it works for groups of
/// both the `classic` and the `consumer` protocol while their members run.
pub async fn committed_offsets(
    brokers: &str,
    group: &str,
    topic: &str,
) -> anyhow::Result<BTreeMap<i32, i64>> {
    let (brokers, group, topic) = (brokers.to_owned(), group.to_owned(), topic.to_owned());
    spawn_blocking(move || {
        let consumer: BaseConsumer = client_config(&brokers)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()
            .context("creating the offset-reading consumer")?;
        let mut list = TopicPartitionList::new();
        for partition in partition_ids(&consumer, &topic)? {
            list.add_partition(&topic, partition);
        }
        let committed =
            retry_coordinator(|| consumer.committed_offsets(list.clone(), REQUEST_TIMEOUT))
                .with_context(|| {
                    format!("reading the offsets group {group} committed on {topic}")
                })?;
        let mut offsets = BTreeMap::new();
        for element in committed.elements() {
            if let Offset::Offset(offset) = element.offset() {
                offsets.insert(element.partition(), offset);
            }
        }
        Ok(offsets)
    })
    .await
    .context("the committed-offsets task panicked")?
}

/// Commits `offsets` (partition -> next offset to read) for `group` on `topic`, as a member of the
/// group would, without joining it: sets up a group's starting position for a test. Fails if the group
/// has live members of the `classic` protocol (the broker rejects commits from non-members then).
pub async fn commit_offsets(
    brokers: &str,
    group: &str,
    topic: &str,
    offsets: &BTreeMap<i32, i64>,
) -> anyhow::Result<()> {
    let mut list = TopicPartitionList::new();
    for (&partition, &offset) in offsets {
        list.add_partition_offset(topic, partition, Offset::Offset(offset))
            .with_context(|| format!("{topic}/{partition} at {offset}"))?;
    }
    let (brokers, group, topic) = (brokers.to_owned(), group.to_owned(), topic.to_owned());
    spawn_blocking(move || {
        let consumer: BaseConsumer = client_config(&brokers)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()
            .context("creating the committing consumer")?;
        retry_coordinator(|| consumer.commit(&list, rdkafka::consumer::CommitMode::Sync))
            .with_context(|| format!("committing offsets of {topic} for group {group}"))
    })
    .await
    .context("the commit task panicked")?
}

/// Retries `request` while the group coordinator is not ready: on a fresh broker the offsets topic is
/// created by the first group request, and until it is loaded the broker answers "not coordinator" or
/// "coordinator load in progress", which librdkafka passes through for one-off requests.
fn retry_coordinator<T>(mut request: impl FnMut() -> KafkaResult<T>) -> KafkaResult<T> {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    loop {
        match request() {
            Err(e)
                if Instant::now() < deadline
                    && matches!(
                        e.rdkafka_error_code(),
                        Some(
                            RDKafkaErrorCode::NotCoordinator
                                | RDKafkaErrorCode::CoordinatorNotAvailable
                                | RDKafkaErrorCode::CoordinatorLoadInProgress
                        )
                    ) =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

/// The end offset (high watermark: the offset the next record will get) of every partition of `topic`.
/// Transaction markers count, so after a transaction the end is past the last record.
pub async fn end_offsets(brokers: &str, topic: &str) -> anyhow::Result<BTreeMap<i32, i64>> {
    let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
    spawn_blocking(move || {
        let consumer = metadata_consumer(&brokers)?;
        let mut offsets = BTreeMap::new();
        for partition in partition_ids(&consumer, &topic)? {
            let (_low, high) = consumer
                .fetch_watermarks(&topic, partition, REQUEST_TIMEOUT)
                .with_context(|| format!("reading the watermarks of {topic}/{partition}"))?;
            offsets.insert(partition, high);
        }
        Ok(offsets)
    })
    .await
    .context("the end-offsets task panicked")?
}

/// A record read back by [`read_all`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRecord {
    /// The record key, if any.
    pub key: Option<Vec<u8>>,
    /// The value; `None` for a tombstone.
    pub payload: Option<Vec<u8>>,
    /// The headers in order; a header may have no value.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// The partition the record is in.
    pub partition: i32,
    /// The record's offset in its partition.
    pub offset: i64,
}

impl ReadRecord {
    /// The value of the first header called `name`, if there is one and it has a value.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(key, _)| key == name)
            .and_then(|(_, value)| value.as_deref())
    }
}

/// Reads every record of `topic` from the beginning up to the end of each partition as it is when the
/// read gets there (at least the end when called), without joining a group or committing. With
/// `isolation_read_committed` records of aborted (and still open) transactions are skipped, as a
/// read-committed consumer sees the topic; otherwise they are included. Records come sorted by
/// partition, then offset. Fails when the end is not reached within `timeout`.
pub async fn read_all(
    brokers: &str,
    topic: &str,
    isolation_read_committed: bool,
    timeout: Duration,
) -> anyhow::Result<Vec<ReadRecord>> {
    let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
    spawn_blocking(move || read_all_blocking(&brokers, &topic, isolation_read_committed, timeout))
        .await
        .context("the read-back task panicked")?
}

fn read_all_blocking(
    brokers: &str,
    topic: &str,
    read_committed: bool,
    timeout: Duration,
) -> anyhow::Result<Vec<ReadRecord>> {
    let consumer: BaseConsumer = client_config(brokers)
        // A group id is required by the client, but the consumer never joins or commits.
        .set("group.id", crate::names::unique("refetch_testkit_read"))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "true")
        .set(
            "isolation.level",
            if read_committed {
                "read_committed"
            } else {
                "read_uncommitted"
            },
        )
        .create()
        .context("creating the read-back consumer")?;
    let partitions = partition_ids(&consumer, topic)?;
    let mut assignment = TopicPartitionList::new();
    for &partition in &partitions {
        assignment
            .add_partition_offset(topic, partition, Offset::Beginning)
            .with_context(|| format!("assigning {topic}/{partition}"))?;
    }
    consumer
        .assign(&assignment)
        .context("assigning the topic's partitions")?;

    // Partition EOF is reported when a fetch reaches the partition's end (the last stable offset
    // under read_committed), whether the last offsets are records or transaction markers.
    let mut at_end: BTreeMap<i32, bool> = partitions.iter().map(|&p| (p, false)).collect();
    let mut records = Vec::new();
    let deadline = Instant::now() + timeout;
    while at_end.values().any(|done| !done) {
        let now = Instant::now();
        if now >= deadline {
            let missing: Vec<i32> = at_end
                .iter()
                .filter(|(_, done)| !**done)
                .map(|(p, _)| *p)
                .collect();
            bail!(
                "reading {topic}: partitions {missing:?} did not reach their end within {timeout:?} \
                 ({} records read)",
                records.len()
            );
        }
        match consumer.poll(deadline - now) {
            None => {}
            Some(Ok(message)) => {
                let headers = message
                    .headers()
                    .map(|headers| {
                        headers
                            .iter()
                            .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                            .collect()
                    })
                    .unwrap_or_default();
                records.push(ReadRecord {
                    key: message.key().map(<[u8]>::to_vec),
                    payload: message.payload().map(<[u8]>::to_vec),
                    headers,
                    partition: message.partition(),
                    offset: message.offset(),
                });
            }
            Some(Err(KafkaError::PartitionEOF(partition))) => {
                at_end.insert(partition, true);
            }
            Some(Err(e)) => return Err(e).with_context(|| format!("reading {topic}")),
        }
    }
    records.sort_by_key(|r| (r.partition, r.offset));
    Ok(records)
}

fn metadata_consumer(brokers: &str) -> anyhow::Result<BaseConsumer> {
    client_config(brokers)
        .create()
        .context("creating a Kafka metadata client")
}

fn partition_ids(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<Vec<i32>> {
    let metadata = consumer
        .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
        .with_context(|| format!("reading the metadata of {topic}"))?;
    let topic_metadata = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or_else(|| anyhow!("topic {topic} is not in the broker's metadata"))?;
    if let Some(error) = topic_metadata.error() {
        bail!("topic {topic}: {:?}", RDKafkaErrorCode::from(error));
    }
    let mut ids: Vec<i32> = topic_metadata.partitions().iter().map(|p| p.id()).collect();
    if ids.is_empty() {
        bail!("topic {topic} has no partitions");
    }
    ids.sort_unstable();
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::unique;

    const READ_TIMEOUT: Duration = Duration::from_secs(60);

    #[test]
    fn missing_broker_address_fails_naming_the_test_command() {
        // Only meaningful when the variable is unset in this process (as in a plain `cargo test`);
        // under scripts/test it is set and `brokers()` must return it instead.
        match std::env::var(BROKERS_ENV) {
            Ok(v) if !v.trim().is_empty() => assert_eq!(brokers().ok(), Some(v.trim().to_owned())),
            _ => {
                let message = brokers().err().map(|e| e.to_string()).unwrap_or_default();
                assert!(message.contains("scripts/test"), "{message}");
                assert!(message.contains(BROKERS_ENV), "{message}");
            }
        }
    }

    #[tokio::test]
    #[ignore = "needs a real broker: run scripts/test"]
    async fn produced_records_are_read_back_with_their_keys_headers_and_offsets()
    -> anyhow::Result<()> {
        let brokers = brokers()?;
        let topic = unique("testkit_roundtrip");
        create_topic(&brokers, &topic, 2).await?;
        let last = produce_records(
            &brokers,
            &topic,
            [
                OutRecord {
                    partition: Some(0),
                    headers: vec![("h".into(), b"1".to_vec())],
                    ..OutRecord::keyed("a", "first")
                },
                OutRecord {
                    partition: Some(0),
                    ..OutRecord::keyed("a", "second")
                },
                OutRecord {
                    partition: Some(1),
                    payload: None,
                    ..OutRecord::keyed("b", "")
                },
            ],
        )
        .await?;
        assert_eq!(last, BTreeMap::from([(0, 1), (1, 0)]));
        assert_eq!(
            end_offsets(&brokers, &topic).await?,
            BTreeMap::from([(0, 2), (1, 1)])
        );

        let read = read_all(&brokers, &topic, true, READ_TIMEOUT).await?;
        assert_eq!(read.len(), 3);
        assert_eq!((read[0].partition, read[0].offset), (0, 0));
        assert_eq!(read[0].payload.as_deref(), Some(&b"first"[..]));
        assert_eq!(read[0].header("h"), Some(&b"1"[..]));
        assert_eq!(read[1].payload.as_deref(), Some(&b"second"[..]));
        assert_eq!(
            (read[2].partition, read[2].key.as_deref()),
            (1, Some(&b"b"[..]))
        );
        assert_eq!(
            read[2].payload, None,
            "a tombstone reads back as no payload"
        );
        Ok(())
    }

    #[tokio::test]
    #[ignore = "needs a real broker: run scripts/test"]
    async fn aborted_transactions_occupy_offsets_that_read_committed_skips() -> anyhow::Result<()> {
        let brokers = brokers()?;
        let topic = unique("testkit_txn");
        create_topic(&brokers, &topic, 1).await?;
        let before = produce(
            &brokers,
            &topic,
            (0..3).map(|i| (None, format!("before-{i}").into_bytes())),
        )
        .await?;
        assert_eq!(before, BTreeMap::from([(0, 2)]));
        let aborted = produce_aborted_transaction(
            &brokers,
            &topic,
            (0..5).map(|i| (Some(b"k".to_vec()), format!("aborted-{i}").into_bytes())),
        )
        .await?;
        assert_eq!(
            aborted,
            BTreeMap::from([(0, 7)]),
            "offsets 3..=7 hold the aborted records"
        );
        let committed = produce_in_transaction(
            &brokers,
            &topic,
            [OutRecord::keyed("k", "committed")],
            TransactionEnd::Commit,
        )
        .await?;
        // Offset 8 is the abort marker.
        assert_eq!(committed, BTreeMap::from([(0, 9)]));
        let after = produce(&brokers, &topic, [(None, b"after".to_vec())]).await?;
        // Offset 10 is the commit marker.
        assert_eq!(after, BTreeMap::from([(0, 11)]));
        assert_eq!(
            end_offsets(&brokers, &topic).await?,
            BTreeMap::from([(0, 12)])
        );

        let visible = read_all(&brokers, &topic, true, READ_TIMEOUT).await?;
        let offsets: Vec<i64> = visible.iter().map(|r| r.offset).collect();
        assert_eq!(
            offsets,
            vec![0, 1, 2, 9, 11],
            "read_committed skips aborted records and markers"
        );

        let everything = read_all(&brokers, &topic, false, READ_TIMEOUT).await?;
        let offsets: Vec<i64> = everything.iter().map(|r| r.offset).collect();
        assert_eq!(
            offsets,
            vec![0, 1, 2, 3, 4, 5, 6, 7, 9, 11],
            "markers are never delivered"
        );
        Ok(())
    }

    #[tokio::test]
    #[ignore = "needs a real broker: run scripts/test"]
    async fn committed_offsets_show_only_what_the_group_committed() -> anyhow::Result<()> {
        let brokers = brokers()?;
        let topic = unique("testkit_commit");
        let group = unique("testkit_group");
        create_topic(&brokers, &topic, 3).await?;
        assert!(
            committed_offsets(&brokers, &group, &topic)
                .await?
                .is_empty()
        );

        commit_offsets(&brokers, &group, &topic, &BTreeMap::from([(1, 42)])).await?;
        assert_eq!(
            committed_offsets(&brokers, &group, &topic).await?,
            BTreeMap::from([(1, 42)])
        );
        Ok(())
    }

    #[tokio::test]
    #[ignore = "needs a real broker: run scripts/test"]
    async fn creating_an_existing_topic_fails() -> anyhow::Result<()> {
        let brokers = brokers()?;
        let topic = unique("testkit_twice");
        create_topic_with_config(&brokers, &topic, 1, &[("cleanup.policy", "compact")]).await?;
        let err = create_topic(&brokers, &topic, 1)
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("already exists") || err.contains("TopicAlreadyExists"),
            "{err}"
        );
        Ok(())
    }
}
