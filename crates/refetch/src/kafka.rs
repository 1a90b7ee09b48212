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

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::assignment::{Assignment, Epoch, EpochCounter, TopicPartition};
use crate::consumer::{
    CommitMetadata, CommitResult, ConsumerChannels, ConsumerCommand, ConsumerEvent, GroupMetadata,
    GroupMetadataSource, Offsets, OwnedRecord, QueuedBytes,
};
use crate::dlq::DeadLetter;

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
        self.consumer_properties
            .get("max.poll.interval.ms")
            .or_else(|| self.properties.get("max.poll.interval.ms"))
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
            // Statistics tell the driver whether any broker is up (readiness).
            .set("statistics.interval.ms", "5000")
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
    /// The consumer thread could not be started.
    #[error("cannot start the consumer thread: {0}")]
    Thread(String),
    /// The brokers could not be reached.
    #[error("kafka brokers {brokers} not reachable: {reason}")]
    Unreachable {
        /// The bootstrap servers.
        brokers: String,
        /// What the client said.
        reason: String,
    },
    /// The dead-letter topic is missing or not writable.
    #[error("dead-letter topic `{topic}` is not usable: {reason}")]
    DeadLetterTopic {
        /// The topic.
        topic: String,
        /// Why.
        reason: String,
    },
}

/// What the driver knows about its assignments. Shared by the poll thread (rebalance callbacks)
/// and the commit path, which drops entries whose assignment is no longer current.
#[derive(Debug, Default)]
struct Ownership {
    epochs: EpochCounter,
    /// Owned partitions: the epoch of their assignment, and whether a revoke is under way.
    current: HashMap<TopicPartition, (Epoch, bool)>,
}

impl Ownership {
    fn assignment(&self, tp: &TopicPartition) -> Option<Assignment> {
        self.current
            .get(tp)
            .map(|(e, _)| Assignment::new(tp.clone(), *e))
    }

    /// Is `a` current and not being revoked?
    fn accepts(&self, a: &Assignment) -> bool {
        self.current
            .get(&a.tp)
            .is_some_and(|(e, revoking)| *e == a.epoch && !revoking)
    }
}

/// A commit for the committer thread.
enum CommitJob {
    /// A periodic (or final) commit from the engine.
    Engine {
        offsets: Offsets,
        metadata: CommitMetadata,
        reply: tokio::sync::oneshot::Sender<CommitResult>,
    },
    /// The commit of a revoke; the handler waits for it with a deadline and sets `abandoned`
    /// when it gives up (a job not started by then is skipped).
    Revoke {
        offsets: Offsets,
        reply: std::sync::mpsc::SyncSender<KafkaResult<()>>,
        abandoned: Arc<AtomicBool>,
    },
}

struct DriverContext {
    events: mpsc::UnboundedSender<ConsumerEvent>,
    /// How long a revoke waits for the engine's answer.
    drain: Duration,
    /// How long a revoke waits for its commit.
    commit_timeout: Duration,
    closing: AtomicBool,
    ownership: Mutex<Ownership>,
    /// The committer thread's queue. Every commit goes through it, in the order the poll thread
    /// accepted it, so a commit accepted before a revoke reaches the broker before the revoke's.
    committer: Mutex<Option<std::sync::mpsc::Sender<CommitJob>>>,
    /// Last reported broker reachability (`None` before the first report).
    broker_up: Mutex<Option<bool>>,
    /// Dropped when the consumer closes: the metadata thread stops.
    metadata_stop: Mutex<Option<std::sync::mpsc::Sender<()>>>,
}

impl DriverContext {
    fn report_broker(&self, reachable: bool, reason: String) {
        let Ok(mut last) = self.broker_up.lock() else {
            return;
        };
        if *last == Some(reachable) {
            return;
        }
        *last = Some(reachable);
        if reachable {
            tracing::info!(%reason, "kafka brokers reachable");
        } else {
            tracing::warn!(%reason, "kafka brokers unreachable");
        }
        let _ = self
            .events
            .send(ConsumerEvent::Broker { reachable, reason });
    }
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
        let code = error.rdkafka_error_code();
        let fatal = matches!(code, Some(RDKafkaErrorCode::Fatal));
        if matches!(code, Some(RDKafkaErrorCode::AllBrokersDown)) {
            self.report_broker(false, format!("{error}: {reason}"));
        }
        crate::client_log::client_error(&error, reason);
        let _ = self.events.send(ConsumerEvent::Error {
            message: format!("{error}: {reason}"),
            fatal,
        });
    }

    fn stats(&self, statistics: rdkafka::Statistics) {
        // Brokers with a node id (not bootstrap placeholders) that are up.
        let brokers: Vec<&rdkafka::statistics::Broker> = statistics
            .brokers
            .values()
            .filter(|b| b.nodeid >= 0)
            .collect();
        if brokers.is_empty() {
            return;
        }
        let up = brokers.iter().filter(|b| b.state == "UP").count();
        let reason = format!("{up} of {} brokers up", brokers.len());
        self.report_broker(up > 0, reason);
    }
}

/// The offsets with their commit metadata (partitions not in `metadata` commit none).
fn to_tpl_with(offsets: &Offsets, metadata: &CommitMetadata) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for (a, o) in offsets {
        let mut e = tpl.add_partition(&a.tp.topic, a.tp.partition);
        // An offset is always representable; ignore the impossible error.
        let _ = e.set_offset(Offset::Offset(*o));
        if let Some((_, m)) = metadata.iter().find(|(tp, _)| *tp == a.tp) {
            e.set_metadata(m);
        }
    }
    tpl
}

fn to_tpl(offsets: &Offsets) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for (a, o) in offsets {
        // An offset is always representable; ignore the impossible error.
        let _ = tpl.add_partition_offset(&a.tp.topic, a.tp.partition, Offset::Offset(*o));
    }
    tpl
}

impl ConsumerContext for DriverContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let tps: Vec<TopicPartition> = tpl
            .elements()
            .iter()
            .map(|e| TopicPartition::new(e.topic(), e.partition()))
            .collect();
        if tps.is_empty() {
            return;
        }
        let assignments: Vec<Assignment> = match self.ownership.lock() {
            Ok(o) => tps.iter().filter_map(|tp| o.assignment(tp)).collect(),
            Err(_) => Vec::new(),
        };
        let forget = |tps: &[TopicPartition]| {
            if let Ok(mut o) = self.ownership.lock() {
                for tp in tps {
                    o.current.remove(tp);
                }
            }
        };
        if self.closing.load(Ordering::SeqCst) {
            forget(&tps);
            return;
        }
        if consumer.assignment_lost() {
            tracing::warn!(
                partitions = tps.len(),
                "partitions lost: dropping their state without commit"
            );
            forget(&tps);
            let _ = self.events.send(ConsumerEvent::Lost(assignments));
            return;
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let deadline = std::time::Instant::now() + self.drain;
        if self
            .events
            .send(ConsumerEvent::Revoke {
                assignments: assignments.clone(),
                reply: tx,
                deadline: tokio::time::Instant::from_std(deadline),
            })
            .is_err()
        {
            forget(&tps);
            return;
        }
        // The engine answers by `deadline`; wait a moment longer for its answer.
        let answer = rx.recv_timeout(self.drain + Duration::from_millis(250));
        // From here on, commits of these assignments from the periodic path are dropped: a
        // commit queued before this revoke must not reach the broker after it.
        if let Ok(mut o) = self.ownership.lock() {
            for tp in &tps {
                if let Some(entry) = o.current.get_mut(tp) {
                    entry.1 = true;
                }
            }
        }
        match answer {
            Ok(offsets) => {
                let offsets: Offsets = offsets
                    .into_iter()
                    .filter(|(a, _)| assignments.iter().any(|r| r.same(a)))
                    .collect();
                if !offsets.is_empty() {
                    self.commit_bounded(&offsets);
                }
            }
            Err(_) => {
                tracing::warn!("engine did not answer the revoke in time; letting go uncommitted")
            }
        }
        forget(&tps);
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let assignments: Vec<Assignment> = match self.ownership.lock() {
                    Ok(mut o) => tpl
                        .elements()
                        .iter()
                        .map(|e| {
                            let tp = TopicPartition::new(e.topic(), e.partition());
                            let epoch = o.epochs.next_epoch();
                            o.current.insert(tp.clone(), (epoch, false));
                            Assignment::new(tp, epoch)
                        })
                        .collect(),
                    Err(_) => Vec::new(),
                };
                if !self.closing.load(Ordering::SeqCst) {
                    let ranges = self.committed_ranges(consumer, &assignments);
                    let _ = self.events.send(ConsumerEvent::Assigned(assignments));
                    if !ranges.is_empty() {
                        let _ = self.events.send(ConsumerEvent::CommittedRanges(ranges));
                    }
                }
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}

impl DriverContext {
    /// What the group committed for new assignments, with the ranges in its metadata. Read in
    /// the rebalance callback, so it reaches the engine before any record of the assignments.
    /// Bounded by `commit_timeout`; a failure only costs fetches (the records above the
    /// committed offset are fetched again), so it is logged and the assignment goes on.
    fn committed_ranges(
        &self,
        consumer: &BaseConsumer<Self>,
        assignments: &[Assignment],
    ) -> Vec<(Assignment, crate::offsets::StoredOffset)> {
        if assignments.is_empty() {
            return Vec::new();
        }
        let tps: Vec<TopicPartition> = assignments.iter().map(|a| a.tp.clone()).collect();
        let got = match consumer.committed_offsets(to_tpl_plain(&tps), self.commit_timeout) {
            Ok(got) => got,
            Err(e) => {
                tracing::warn!(error = %e, partitions = tps.len(),
                    "cannot read the committed offsets' ranges; records above them are fetched again");
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for e in got.elements() {
            let Offset::Offset(o) = e.offset() else {
                continue;
            };
            let Some(a) = assignments
                .iter()
                .find(|a| *a.tp.topic == *e.topic() && a.tp.partition == e.partition())
            else {
                continue;
            };
            match crate::offsets::StoredOffset::decode(o, e.metadata()) {
                Ok(s) => out.push((a.clone(), s)),
                Err(err) => tracing::warn!(partition = %a.tp, error = %err,
                    "unreadable ranges in the commit metadata; ignored (the records are fetched again)"),
            }
        }
        out
    }

    /// Commit `offsets` of a revoke through the committer thread and wait at most
    /// `commit_timeout`, so a slow coordinator cannot stall the poll thread past
    /// `max.poll.interval.ms`.
    fn commit_bounded(&self, offsets: &Offsets) {
        let n = offsets.len();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let abandoned = Arc::new(AtomicBool::new(false));
        let sent = match self.committer.lock() {
            Ok(c) => c.as_ref().is_some_and(|c| {
                c.send(CommitJob::Revoke {
                    offsets: offsets.clone(),
                    reply: tx,
                    abandoned: abandoned.clone(),
                })
                .is_ok()
            }),
            Err(_) => false,
        };
        if !sent {
            tracing::warn!("committer stopped; letting go uncommitted");
            return;
        }
        match rx.recv_timeout(self.commit_timeout) {
            Ok(Ok(())) => tracing::info!(partitions = n, "committed on revoke"),
            Ok(Err(e)) => tracing::warn!(error = %e, "commit on revoke failed"),
            Err(_) => {
                abandoned.store(true, Ordering::SeqCst);
                tracing::warn!(
                    timeout_ms = self.commit_timeout.as_millis() as u64,
                    "commit on revoke did not finish in time; letting go"
                );
            }
        }
    }
}

/// The committer thread: runs commits one after the other, synchronously, off the poll thread.
fn committer_loop(
    consumer: Arc<BaseConsumer<DriverContext>>,
    jobs: std::sync::mpsc::Receiver<CommitJob>,
) {
    while let Ok(job) = jobs.recv() {
        match job {
            CommitJob::Engine {
                offsets,
                metadata,
                reply,
            } => {
                let r = consumer
                    .commit(&to_tpl_with(&offsets, &metadata), CommitMode::Sync)
                    .map(|()| offsets)
                    .map_err(|e| e.to_string());
                let _ = reply.send(r);
            }
            CommitJob::Revoke {
                offsets,
                reply,
                abandoned,
            } => {
                if abandoned.load(Ordering::SeqCst) {
                    continue;
                }
                let _ = reply.send(consumer.commit(&to_tpl(&offsets), CommitMode::Sync));
            }
        }
    }
}

/// Start the librdkafka consumer on its own thread and subscribe. A revoke waits at most
/// `drain` for the engine's answer and then at most `commit_timeout` for its commit (the sum
/// must stay below `max.poll.interval.ms`; [`crate::EngineConfig::validate`] checks it).
pub fn start_consumer(
    cfg: &KafkaConfig,
    drain: Duration,
    commit_timeout: Duration,
) -> Result<ConsumerChannels, KafkaSetupError> {
    cfg.validate()?;
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let ctx = DriverContext {
        events: ev_tx.clone(),
        drain,
        commit_timeout,
        closing: AtomicBool::new(false),
        ownership: Mutex::new(Ownership {
            epochs: EpochCounter::new(),
            current: HashMap::new(),
        }),
        committer: Mutex::new(None),
        broker_up: Mutex::new(None),
        metadata_stop: Mutex::new(None),
    };
    let consumer: BaseConsumer<DriverContext> =
        cfg.consumer_client_config().create_with_context(ctx)?;
    let consumer = Arc::new(consumer);
    let (jobs_tx, jobs_rx) = std::sync::mpsc::channel();
    if let Ok(mut c) = consumer.context().committer.lock() {
        *c = Some(jobs_tx);
    }
    let for_committer = consumer.clone();
    std::thread::Builder::new()
        .name("refetch-committer".into())
        .spawn(move || committer_loop(for_committer, jobs_rx))
        .map_err(|e| KafkaSetupError::Thread(e.to_string()))?;
    let topics: Vec<&str> = cfg.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    // The group metadata (member, generation) for a transactional sink, read when it commits.
    let weak = Arc::downgrade(&consumer);
    let _ = ev_tx.send(ConsumerEvent::GroupMetadata(GroupMetadataSource::new(
        move || {
            weak.upgrade()
                .and_then(|c| c.group_metadata())
                .map(GroupMetadata::new)
        },
    )));
    // The partition count of the subscribed topics, for a group-wide source budget: from
    // metadata, on a thread of its own (off the poll thread).
    let (stop_tx, stop_rx) = std::sync::mpsc::channel();
    if let Ok(mut m) = consumer.context().metadata_stop.lock() {
        *m = Some(stop_tx);
    }
    let weak = Arc::downgrade(&consumer);
    let names = cfg.topics.clone();
    let events = ev_tx.clone();
    std::thread::Builder::new()
        .name("refetch-metadata".into())
        .spawn(move || partition_count_loop(weak, names, events, stop_rx))
        .map_err(|e| KafkaSetupError::Thread(e.to_string()))?;
    let queued = QueuedBytes::new();
    let q = queued.clone();
    std::thread::Builder::new()
        .name("refetch-consumer".into())
        .spawn(move || poll_loop(consumer, ev_tx, cmd_rx, q))
        .map_err(|e| KafkaSetupError::Thread(e.to_string()))?;
    Ok(ConsumerChannels {
        events: ev_rx,
        commands: cmd_tx,
        queued,
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
        timestamp: m.timestamp().to_millis(),
    }
}

/// A periodic (or final) commit from the engine: drop entries whose assignment is not current
/// (or is being revoked), and queue the rest for the committer thread. Runs on the poll thread,
/// which is also where rebalances change the ownership, so no commit accepted here can be
/// overtaken by a revoke's.
fn accept_commit(
    consumer: &BaseConsumer<DriverContext>,
    offsets: Offsets,
    metadata: CommitMetadata,
    reply: tokio::sync::oneshot::Sender<CommitResult>,
) {
    let ctx = consumer.context();
    let current: Offsets = match ctx.ownership.lock() {
        Ok(o) => offsets.into_iter().filter(|(a, _)| o.accepts(a)).collect(),
        Err(_) => Vec::new(),
    };
    if current.is_empty() {
        let _ = reply.send(Ok(Vec::new()));
        return;
    }
    let job = CommitJob::Engine {
        offsets: current,
        metadata,
        reply,
    };
    let rejected = match ctx.committer.lock() {
        Ok(c) => match c.as_ref() {
            Some(c) => c.send(job).err().map(|e| e.0),
            None => Some(job),
        },
        Err(_) => None,
    };
    if let Some(CommitJob::Engine { reply, .. }) = rejected {
        let _ = reply.send(Err("committer stopped".into()));
    }
}

/// Report positions that moved since the last report.
fn report_positions(
    consumer: &BaseConsumer<DriverContext>,
    events: &mpsc::UnboundedSender<ConsumerEvent>,
    reported: &mut HashMap<TopicPartition, i64>,
) {
    let Ok(tpl) = consumer.position() else {
        return;
    };
    let ownership = match consumer.context().ownership.lock() {
        Ok(o) => o,
        Err(_) => return,
    };
    let mut out = Vec::new();
    for e in tpl.elements() {
        let Offset::Offset(pos) = e.offset() else {
            continue;
        };
        let tp = TopicPartition::new(e.topic(), e.partition());
        let Some(a) = ownership.assignment(&tp) else {
            continue;
        };
        if reported.get(&tp) != Some(&pos) {
            reported.insert(tp, pos);
            out.push((a, pos));
        }
    }
    drop(ownership);
    reported.retain(|tp, _| tpl.find_partition(&tp.topic, tp.partition).is_some());
    if !out.is_empty() {
        let _ = events.send(ConsumerEvent::Positions(out));
    }
}

fn poll_loop(
    consumer: Arc<BaseConsumer<DriverContext>>,
    events: mpsc::UnboundedSender<ConsumerEvent>,
    mut commands: mpsc::UnboundedReceiver<ConsumerCommand>,
    queued: QueuedBytes,
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
    let mut reported: HashMap<TopicPartition, i64> = HashMap::new();
    let mut last_positions = std::time::Instant::now();
    let close = |consumer: Arc<BaseConsumer<DriverContext>>| {
        consumer.context().closing.store(true, Ordering::SeqCst);
        if let Ok(mut m) = consumer.context().metadata_stop.lock() {
            m.take();
        }
        // The committer finishes what it was given and exits, dropping its handle.
        if let Ok(mut c) = consumer.context().committer.lock() {
            c.take();
        }
        drop(consumer);
    };
    loop {
        loop {
            match commands.try_recv() {
                Ok(ConsumerCommand::Commit {
                    offsets,
                    metadata,
                    reply,
                }) => {
                    accept_commit(&consumer, offsets, metadata, reply);
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
                    close(consumer);
                    let _ = reply.send(());
                    return;
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    close(consumer);
                    return;
                }
            }
        }
        let mut batch = Vec::new();
        let mut timeout = Duration::from_millis(50);
        // Once a record arrived, the batch takes what else arrives within `BATCH_LINGER`: a
        // trickle of records then wakes the engine once per few records, not once per record.
        let mut until: Option<std::time::Instant> = None;
        while batch.len() < 1024 {
            match consumer.poll(timeout) {
                Some(Ok(m)) => {
                    let topic = intern(m.topic());
                    batch.push(owned(&m, &topic));
                    let end =
                        *until.get_or_insert_with(|| std::time::Instant::now() + BATCH_LINGER);
                    let left = end.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    // Whole milliseconds: librdkafka waits in milliseconds, and rdkafka's poll
                    // spins through a sub-millisecond remainder instead of sleeping.
                    timeout = Duration::from_millis(left.as_millis() as u64 + 1);
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "consumer error");
                    break;
                }
                None => break,
            }
        }
        if !batch.is_empty() {
            queued.add(&batch);
            if events.send(ConsumerEvent::Records(batch)).is_err() {
                close(consumer);
                return;
            }
        }
        if last_positions.elapsed() >= Duration::from_millis(500) {
            last_positions = std::time::Instant::now();
            report_positions(&consumer, &events, &mut reported);
        }
    }
}

/// How long the poll thread gathers records into one batch for the engine after the first.
const BATCH_LINGER: Duration = Duration::from_millis(5);

/// How often the partition count of the subscribed topics is read again (partitions can be
/// added to a topic).
const PARTITION_COUNT_EVERY: Duration = Duration::from_secs(30);

/// Report the partition count of `topics` when first known and whenever it changes, until the
/// consumer closes.
fn partition_count_loop(
    consumer: std::sync::Weak<BaseConsumer<DriverContext>>,
    topics: Vec<String>,
    events: mpsc::UnboundedSender<ConsumerEvent>,
    stop: std::sync::mpsc::Receiver<()>,
) {
    let mut reported = None;
    let mut wait = Duration::ZERO;
    loop {
        match stop.recv_timeout(wait) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        let Some(c) = consumer.upgrade() else {
            return;
        };
        let mut total = 0usize;
        let mut known = true;
        for t in &topics {
            match c.fetch_metadata(Some(t), Duration::from_secs(10)) {
                Ok(md) => match md.topics().first() {
                    Some(mt) if mt.error().is_none() => total += mt.partitions().len(),
                    _ => known = false,
                },
                Err(e) => {
                    tracing::debug!(topic = %t, error = %e, "partition count unknown for now");
                    known = false;
                }
            }
        }
        drop(c);
        // Retry soon while unknown, then refresh now and then.
        wait = if known {
            PARTITION_COUNT_EVERY
        } else {
            Duration::from_secs(2)
        };
        if known && reported != Some(total) {
            reported = Some(total);
            if events.send(ConsumerEvent::PartitionCount(total)).is_err() {
                return;
            }
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
    producer: FutureProducer<crate::client_log::QuietContext>,
    topic: String,
    brokers: String,
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
        let producer: FutureProducer<crate::client_log::QuietContext> = cfg
            .producer_client_config()
            .create_with_context(crate::client_log::QuietContext)?;
        Ok(DeadLetterProducer {
            producer,
            topic: cfg.dead_letter_topic.clone(),
            brokers: cfg.brokers.clone(),
        })
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Check that the brokers answer at all (a metadata request for no topic).
    pub async fn probe_brokers(&self, timeout: Duration) -> Result<(), KafkaSetupError> {
        let producer = self.producer.clone();
        let r = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, timeout)
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        r.map_err(|reason| KafkaSetupError::Unreachable {
            brokers: self.brokers.clone(),
            reason,
        })
    }

    /// Check that the dead-letter topic exists and has partitions (a metadata request: a write
    /// is not attempted, so an authorization failure shows only at the first dead letter).
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
