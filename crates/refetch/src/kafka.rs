//! Kafka: the librdkafka consumer driver and the dead-letter producer.
//!
//! The consumer is polled on a thread of its own. rdkafka runs rebalance callbacks synchronously
//! inside `poll`, so the revoke handler can hand the partitions to the engine and wait for its
//! answer (with a deadline below `max.poll.interval.ms`) without stalling the engine, and the
//! engine never stops the poll loop: backpressure pauses partitions instead (a consumer that stops
//! polling is evicted from its group).
//!
//! Settings that the engine's guarantees depend on are forced whatever the user passes:
//! `enable.auto.commit=false` and `enable.auto.offset.store=false` (offsets are committed only by
//! the engine). `auto.offset.reset` defaults to `earliest` and `isolation.level` to
//! `read_committed`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::consumer::{ConsumerChannels, ConsumerCommand, ConsumerEvent, Offsets, OwnedRecord};
use crate::dlq::DeadLetter;
use crate::engine::TopicPartition;

/// The consumer group protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupProtocol {
    /// The classic protocol with the `cooperative-sticky` assignor.
    #[default]
    Classic,
    /// The KIP-848 `consumer` protocol (the broker assigns; incremental by design).
    Consumer,
}

/// Properties that would turn on automatic offset storing or committing.
pub const FORBIDDEN_ALWAYS: &[&str] = &["enable.auto.commit", "enable.auto.offset.store"];

/// Properties that the `consumer` group protocol does not accept from clients.
pub const FORBIDDEN_WITH_CONSUMER_PROTOCOL: &[&str] = &[
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "partition.assignment.strategy",
    "group.protocol.type",
];

/// Connection and group settings.
#[derive(Debug, Clone, PartialEq)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// The consumer group.
    pub group_id: String,
    /// The notification topics.
    pub topics: Vec<String>,
    /// The group protocol.
    pub group_protocol: GroupProtocol,
    /// Where dead letters go.
    pub dead_letter_topic: String,
    /// librdkafka properties for every client (consumer and producer), for example security.
    pub properties: BTreeMap<String, String>,
    /// librdkafka properties for the consumer only.
    pub consumer_properties: BTreeMap<String, String>,
    /// librdkafka properties for the dead-letter producer only.
    pub producer_properties: BTreeMap<String, String>,
}

impl KafkaConfig {
    /// Settings with defaults for everything but the brokers, group and topics. The dead-letter
    /// topic defaults to `<group>.dlq`.
    pub fn new(
        brokers: impl Into<String>,
        group_id: impl Into<String>,
        topics: Vec<String>,
    ) -> Self {
        let group_id = group_id.into();
        KafkaConfig {
            brokers: brokers.into(),
            dead_letter_topic: format!("{group_id}.dlq"),
            group_id,
            topics,
            group_protocol: GroupProtocol::Classic,
            properties: BTreeMap::new(),
            consumer_properties: BTreeMap::new(),
            producer_properties: BTreeMap::new(),
        }
    }

    /// Check the passthrough properties: nothing may turn on automatic offset storing, and the
    /// `consumer` protocol's forbidden client settings are refused. Names the offending key.
    pub fn validate(&self) -> Result<(), KafkaSetupError> {
        for (k, v) in self.properties.iter().chain(&self.consumer_properties) {
            if FORBIDDEN_ALWAYS.contains(&k.as_str()) && v.trim() != "false" {
                return Err(KafkaSetupError::Property {
                    key: k.clone(),
                    reason: "refetch commits offsets itself, only after writes are durable; \
                             automatic offset storing or committing must stay off"
                        .into(),
                });
            }
            if self.group_protocol == GroupProtocol::Consumer
                && FORBIDDEN_WITH_CONSUMER_PROTOCOL.contains(&k.as_str())
            {
                return Err(KafkaSetupError::Property {
                    key: k.clone(),
                    reason: "not allowed with group.protocol=consumer (the broker owns it)".into(),
                });
            }
        }
        if self.topics.is_empty() {
            return Err(KafkaSetupError::Property {
                key: "topics".into(),
                reason: "at least one notification topic is needed".into(),
            });
        }
        Ok(())
    }

    /// The consumer's `max.poll.interval.ms`, as configured or librdkafka's default (300 s).
    pub fn max_poll_interval(&self) -> Duration {
        self.properties
            .get("max.poll.interval.ms")
            .or_else(|| self.consumer_properties.get("max.poll.interval.ms"))
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(Duration::from_secs(300), Duration::from_millis)
    }

    /// The librdkafka configuration of the consumer.
    pub fn consumer_client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("group.id", &self.group_id)
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .set("queued.max.messages.kbytes", "16384")
            .set("enable.partition.eof", "false");
        match self.group_protocol {
            GroupProtocol::Classic => {
                c.set("partition.assignment.strategy", "cooperative-sticky");
            }
            GroupProtocol::Consumer => {
                c.set("group.protocol", "consumer");
            }
        }
        for (k, v) in self.properties.iter().chain(&self.consumer_properties) {
            c.set(k, v);
        }
        // Forced last: the engine's guarantees depend on these.
        c.set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        c.set_log_level(RDKafkaLogLevel::Warning);
        c
    }

    /// The librdkafka configuration of the dead-letter producer.
    pub fn producer_client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("linger.ms", "5")
            .set("message.timeout.ms", "30000");
        for (k, v) in self.properties.iter().chain(&self.producer_properties) {
            c.set(k, v);
        }
        c.set("enable.idempotence", "true").set("acks", "all");
        c
    }
}

/// Kafka setup failed.
#[derive(Debug, thiserror::Error)]
pub enum KafkaSetupError {
    /// A passthrough property is not allowed.
    #[error("librdkafka property `{key}` is not allowed: {reason}")]
    Property {
        /// The property.
        key: String,
        /// Why.
        reason: String,
    },
    /// The client could not be created or subscribed.
    #[error("kafka client error: {0}")]
    Client(#[from] KafkaError),
    /// The dead-letter topic is missing or not writable.
    #[error("dead-letter topic `{topic}` is not usable: {reason}")]
    DeadLetterTopic {
        /// The topic.
        topic: String,
        /// Why.
        reason: String,
    },
}

struct DriverContext {
    events: mpsc::UnboundedSender<ConsumerEvent>,
    drain_deadline: Duration,
    closing: AtomicBool,
}

impl ClientContext for DriverContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        // An automatic offset reset means notifications were skipped (`latest`) or will be
        // re-read (`earliest`) without the engine asking: always worth an error and a count.
        if log_message.contains("reset")
            && (fac.contains("OFFSET") || log_message.contains("offset reset"))
        {
            crate::metrics::offset_reset();
            tracing::error!(
                facility = fac,
                message = log_message,
                "automatic offset reset"
            );
            return;
        }
        // Repeated lines (an unreachable broker) are de-duplicated and rate-limited.
        crate::client_log::client_line(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let fatal = matches!(error.rdkafka_error_code(), Some(RDKafkaErrorCode::Fatal));
        crate::client_log::client_error(&error, reason);
        let _ = self.events.send(ConsumerEvent::Error {
            message: format!("{error}: {reason}"),
            fatal,
        });
    }
}

fn to_tps(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements()
        .iter()
        .map(|e| TopicPartition::new(e.topic(), e.partition()))
        .collect()
}

fn to_tpl(offsets: &Offsets) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for (tp, o) in offsets {
        // An offset is always representable; ignore the impossible error.
        let _ = tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*o));
    }
    tpl
}

impl ConsumerContext for DriverContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let tps = to_tps(tpl);
        if self.closing.load(Ordering::SeqCst) || tps.is_empty() {
            return;
        }
        if consumer.assignment_lost() {
            tracing::warn!(
                partitions = tps.len(),
                "partitions lost: dropping their state without commit"
            );
            let _ = self.events.send(ConsumerEvent::Lost(tps));
            return;
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        if self
            .events
            .send(ConsumerEvent::Revoke {
                partitions: tps.clone(),
                reply: tx,
            })
            .is_err()
        {
            return;
        }
        // The engine drains within its own deadline; wait a little longer for its answer.
        match rx.recv_timeout(self.drain_deadline + Duration::from_secs(2)) {
            Ok(offsets) if !offsets.is_empty() => {
                let tpl = to_tpl(&offsets);
                match consumer.commit(&tpl, CommitMode::Sync) {
                    Ok(()) => tracing::info!(partitions = tps.len(), "committed on revoke"),
                    Err(e) => tracing::warn!(error = %e, "commit on revoke failed"),
                }
            }
            Ok(_) => {}
            Err(_) => {
                tracing::warn!("engine did not answer the revoke in time; letting go uncommitted")
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                if !self.closing.load(Ordering::SeqCst) {
                    let _ = self.events.send(ConsumerEvent::Assigned(to_tps(tpl)));
                }
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}

/// Start the librdkafka consumer on its own thread and subscribe. `drain_deadline` is the
/// engine's revoke drain deadline (the rebalance handler waits slightly longer for its answer).
pub fn start_consumer(
    cfg: &KafkaConfig,
    drain_deadline: Duration,
) -> Result<ConsumerChannels, KafkaSetupError> {
    cfg.validate()?;
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let ctx = DriverContext {
        events: ev_tx.clone(),
        drain_deadline,
        closing: AtomicBool::new(false),
    };
    let consumer: BaseConsumer<DriverContext> =
        cfg.consumer_client_config().create_with_context(ctx)?;
    let topics: Vec<&str> = cfg.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    std::thread::Builder::new()
        .name("refetch-consumer".into())
        .spawn(move || poll_loop(consumer, ev_tx, cmd_rx))
        .map_err(|e| KafkaSetupError::DeadLetterTopic {
            topic: String::new(),
            reason: format!("cannot start the consumer thread: {e}"),
        })?;
    Ok(ConsumerChannels {
        events: ev_rx,
        commands: cmd_tx,
    })
}

fn owned(m: &rdkafka::message::BorrowedMessage<'_>, topic: &Arc<str>) -> OwnedRecord {
    let headers = m
        .headers()
        .map(|hs| {
            hs.iter()
                .map(|h: Header<'_, &[u8]>| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                .collect()
        })
        .unwrap_or_default();
    OwnedRecord {
        topic: topic.clone(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key().map(<[u8]>::to_vec),
        payload: m.payload().map(<[u8]>::to_vec),
        headers,
    }
}

fn poll_loop(
    consumer: BaseConsumer<DriverContext>,
    events: mpsc::UnboundedSender<ConsumerEvent>,
    mut commands: mpsc::UnboundedReceiver<ConsumerCommand>,
) {
    let mut topic_names: Vec<Arc<str>> = Vec::new();
    let mut intern = |name: &str| -> Arc<str> {
        if let Some(t) = topic_names.iter().find(|t| ***t == *name) {
            return t.clone();
        }
        let t: Arc<str> = Arc::from(name);
        topic_names.push(t.clone());
        t
    };
    loop {
        loop {
            match commands.try_recv() {
                Ok(ConsumerCommand::Commit { offsets, reply }) => {
                    let r = if offsets.is_empty() {
                        Ok(())
                    } else {
                        consumer
                            .commit(&to_tpl(&offsets), CommitMode::Sync)
                            .map_err(|e| e.to_string())
                    };
                    let _ = reply.send(r);
                }
                Ok(ConsumerCommand::Pause(tps)) => {
                    if let Err(e) = consumer.pause(&to_tpl_plain(&tps)) {
                        tracing::warn!(error = %e, "pause failed");
                    }
                }
                Ok(ConsumerCommand::Resume(tps)) => {
                    if let Err(e) = consumer.resume(&to_tpl_plain(&tps)) {
                        tracing::warn!(error = %e, "resume failed");
                    }
                }
                Ok(ConsumerCommand::Close { reply }) => {
                    consumer.context().closing.store(true, Ordering::SeqCst);
                    drop(consumer);
                    let _ = reply.send(());
                    return;
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    consumer.context().closing.store(true, Ordering::SeqCst);
                    return;
                }
            }
        }
        let mut batch = Vec::new();
        let mut timeout = Duration::from_millis(50);
        while batch.len() < 1024 {
            match consumer.poll(timeout) {
                Some(Ok(m)) => {
                    let topic = intern(m.topic());
                    batch.push(owned(&m, &topic));
                    timeout = Duration::ZERO;
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "consumer error");
                    break;
                }
                None => break,
            }
        }
        if !batch.is_empty() && events.send(ConsumerEvent::Records(batch)).is_err() {
            consumer.context().closing.store(true, Ordering::SeqCst);
            return;
        }
    }
}

fn to_tpl_plain(tps: &[TopicPartition]) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for tp in tps {
        tpl.add_partition(&tp.topic, tp.partition);
    }
    tpl
}

pub use crate::dlq::DeadLetterFailure;

/// The dead-letter producer: idempotent, `acks=all`; the delivery report is the acknowledgement.
#[derive(Clone)]
pub struct DeadLetterProducer {
    producer: FutureProducer,
    topic: String,
}

impl std::fmt::Debug for DeadLetterProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetterProducer")
            .field("topic", &self.topic)
            .finish()
    }
}

impl DeadLetterProducer {
    /// A producer for `cfg.dead_letter_topic`.
    pub fn new(cfg: &KafkaConfig) -> Result<Self, KafkaSetupError> {
        let producer: FutureProducer = cfg.producer_client_config().create()?;
        Ok(DeadLetterProducer {
            producer,
            topic: cfg.dead_letter_topic.clone(),
        })
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Check that the topic exists and is writable (metadata without errors).
    pub async fn check(&self, timeout: Duration) -> Result<(), KafkaSetupError> {
        let producer = self.producer.clone();
        let topic = self.topic.clone();
        let r = tokio::task::spawn_blocking(move || {
            let md = producer
                .client()
                .fetch_metadata(Some(&topic), timeout)
                .map_err(|e| e.to_string())?;
            match md.topics().first() {
                Some(t) if t.error().is_none() && !t.partitions().is_empty() => Ok(()),
                Some(t) => Err(match t.error() {
                    Some(e) => format!("{:?}", RDKafkaErrorCode::from(e)),
                    None => "topic has no partitions".into(),
                }),
                None => Err("topic not found".into()),
            }
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        r.map_err(|reason| KafkaSetupError::DeadLetterTopic {
            topic: self.topic.clone(),
            reason,
        })
    }

    /// Produce one dead letter and wait for its delivery report.
    pub async fn send(&self, record: &DeadLetter) -> Result<(), DeadLetterFailure> {
        let mut headers = OwnedHeaders::new();
        for (k, v) in &record.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v.as_bytes()),
            });
        }
        let mut fr: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic).headers(headers);
        if let Some(k) = &record.key {
            fr = fr.key(k.as_slice());
        }
        if let Some(p) = &record.payload {
            fr = fr.payload(p.as_slice());
        }
        match self.producer.send(fr, Duration::from_secs(30)).await {
            Ok(_) => Ok(()),
            Err((e, _)) => Err(classify_produce_error(&e)),
        }
    }
}

/// Classifies a produce error for dead letters and the Kafka sink.
pub fn classify_produce_error(e: &KafkaError) -> DeadLetterFailure {
    use RDKafkaErrorCode as C;
    match e.rdkafka_error_code() {
        Some(C::MessageSizeTooLarge | C::InvalidMessageSize) => {
            DeadLetterFailure::TooLarge(e.to_string())
        }
        Some(
            C::UnknownTopicOrPartition
            | C::UnknownTopic
            | C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::InvalidTopic,
        ) => DeadLetterFailure::Permanent(e.to_string()),
        _ => DeadLetterFailure::Transient(e.to_string()),
    }
}

#[async_trait::async_trait]
impl crate::dispatch::DeadLetterWriter for DeadLetterProducer {
    async fn send(&self, record: &DeadLetter) -> Result<(), DeadLetterFailure> {
        DeadLetterProducer::send(self, record).await
    }
}
