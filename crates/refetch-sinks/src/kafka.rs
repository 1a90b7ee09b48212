//! Kafka topic sink: produce each fetched entity to a (typically compacted) topic.
//!
//! Every change becomes one record keyed `type:id` (so a compacted topic keeps the latest state
//! per entity and all states of an entity land in one partition, in order). An upsert carries the
//! body as fetched; a gone entity becomes a tombstone (a null value), which compaction turns into
//! a delete. Headers: `refetch-entity-type`, `refetch-entity-id`, `refetch-version` and
//! `refetch-version-kind` (when versioned) and `content-type` (when known).
//!
//! Durability: the producer is idempotent with `acks=all` (a configuration that tries to weaken
//! either is refused), and a batch is acknowledged only after the delivery report of *every*
//! record has arrived. Record order per key is preserved by idempotence even across retries.
//!
//! Failures: a record the broker refuses as too large (or as an invalid record) is refused for
//! good and listed alone in [`WriteReport::failed`]; every other delivery error (broker down,
//! timeouts, missing topic, authorisation) fails the batch transiently, so a sink that is down
//! holds offsets instead of dead-lettering. If the idempotent producer hits a fatal error it is
//! replaced by a new one before the batch is reported as failed.
//!
//! ## Exactly-once (`delivery = "exactly_once"`)
//!
//! The producer is transactional (`transactional.id` = `<transactional_id_prefix>-<instance_id>`;
//! `init_transactions` when the sink is first used: the first stored-offsets read of an
//! assignment, a write or a commit, so a restarted instance fences its former self before it
//! reads the group's offsets, and merely building the sink fences nobody). The first write after a commit or abort begins a
//! transaction; the engine's commit sends the input offsets with `send_offsets_to_transaction`
//! and the consumer's group metadata (so the group coordinator fences a member that is no longer
//! current, Kafka 2.5 and later), then commits. The offsets go to the consumer group inside the
//! transaction: refetch makes no separate commit. Each offset's metadata holds the satisfied
//! ranges above it ([`refetch::StoredOffset::encode_ranges`]); the engine reads them back for a
//! new assignment with an `OffsetFetch` of the group ([`Sink::stored_offsets`]).
//!
//! A failed delivery aborts the open transaction (the engine fetches again what it held). A
//! producer fenced by another one with the same `transactional.id` (a second instance with the
//! same `instance_id`) cannot go on: the pipeline stops with that error. Readers must use
//! `isolation.level=read_committed` to see only committed states.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerGroupMetadata};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use refetch::{
    Change, Delivery, OffsetStore, Sink, SinkError, StoredOffset, TopicPartition,
    TransactionCommit, TransactionError, WriteContext, WriteReport,
};

use crate::body::version_parts;
use crate::config::KafkaConfig;
use crate::factory::SinkBuildError;

const SINK: &str = "kafka";

/// Header with the entity type.
pub const HEADER_TYPE: &str = "refetch-entity-type";
/// Header with the entity id.
pub const HEADER_ID: &str = "refetch-entity-id";
/// Header with the version (decimal).
pub const HEADER_VERSION: &str = "refetch-version";
/// Header with the version kind (`int` / `timestamp`).
pub const HEADER_VERSION_KIND: &str = "refetch-version-kind";
/// Header with the content type.
pub const HEADER_CONTENT_TYPE: &str = "content-type";
/// Header with the input offsets a record covers (`topic:partition:offset`, comma-separated;
/// with `input_offsets_header = true`).
pub const HEADER_INPUTS: &str = "refetch-inputs";

/// How many satisfied ranges one partition's offset metadata may hold: a Kafka offset's
/// metadata is limited (`offset.metadata.max.bytes`, 4096 by default) and a range takes up to
/// 40 bytes.
pub const MAX_STORED_RANGES: usize = 100;

/// Produces entity states to a Kafka topic.
pub struct KafkaSink {
    producer: Mutex<Arc<FutureProducer>>,
    client_config: ClientConfig,
    topic: String,
    queue_timeout: Duration,
    max_batch: usize,
    input_header: bool,
    /// Set with `delivery = "exactly_once"`.
    eos: Option<Eos>,
}

/// The transactional producer's state.
struct Eos {
    transactional_id: String,
    /// `init_transactions` succeeded.
    initialized: tokio::sync::OnceCell<()>,
    timeout: Duration,
    state: Mutex<TxnState>,
    /// The configuration of the client that reads the group's committed offsets.
    reader_config: ClientConfig,
    reader: Mutex<Option<(String, Arc<BaseConsumer>)>>,
}

#[derive(Debug, Default)]
struct TxnState {
    /// A transaction was begun and not ended.
    open: bool,
    /// A write failed: the open transaction can only abort.
    doomed: Option<String>,
    /// The producer cannot go on (fenced).
    fatal: Option<String>,
}

/// What a transactional call's error means.
enum TxnClass {
    Fatal,
    Abort,
    Retry,
    Other,
}

fn txn_class(e: &KafkaError) -> TxnClass {
    match e {
        KafkaError::Transaction(r) if r.is_fatal() => TxnClass::Fatal,
        KafkaError::Transaction(r) if r.txn_requires_abort() => TxnClass::Abort,
        KafkaError::Transaction(r) if r.is_retriable() => TxnClass::Retry,
        _ => match e.rdkafka_error_code() {
            Some(
                RDKafkaErrorCode::Fatal
                | RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch,
            ) => TxnClass::Fatal,
            _ => TxnClass::Other,
        },
    }
}

/// Run a blocking transactional call of librdkafka off the async runtime.
async fn blocking_kafka<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, KafkaError> + Send + 'static,
) -> Result<T, (TxnClass, String)> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err((txn_class(&e), e.to_string())),
        Err(e) => Err((TxnClass::Other, format!("blocking task failed: {e}"))),
    }
}

fn self_fatal_message(id: &str, why: &str) -> TransactionError {
    TransactionError::fatal(format!("transactional producer {id} cannot go on: {why}"))
}

/// Run a blocking librdkafka call off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("blocking task failed: {e}"))?
}

/// The host name, for a default `instance_id`.
fn host_name() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.trim().is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
        })
}

/// The `transactional.id` of an exactly-once sink.
pub fn transactional_id(cfg: &KafkaConfig) -> Result<String, String> {
    let prefix = cfg
        .transactional_id_prefix
        .as_deref()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .ok_or("delivery = \"exactly_once\" needs transactional_id_prefix (a stable name, for example the group's)")?;
    let instance = match cfg.instance_id.as_deref().map(str::trim) {
        Some(i) if !i.is_empty() => i.to_owned(),
        _ => host_name().ok_or(
            "delivery = \"exactly_once\" needs instance_id (the host name could not be read)",
        )?,
    };
    Ok(format!("{prefix}-{instance}"))
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink")
            .field("topic", &self.topic)
            .field("max_batch", &self.max_batch)
            .finish_non_exhaustive()
    }
}

/// The record key of an entity: `type:id`.
pub fn record_key(key: &refetch::EntityKey) -> String {
    format!("{}:{}", key.entity_type(), key.id())
}

impl KafkaSink {
    /// Build the producer (no broker request is made; see [`Sink::check`]).
    pub fn new(cfg: &KafkaConfig) -> Result<Self, SinkBuildError> {
        let bad = |m: String| SinkBuildError::config(SINK, m);
        if cfg.topic.is_empty() {
            return Err(bad("topic must not be empty".into()));
        }
        let mut client = ClientConfig::new();
        for (k, v) in &cfg.properties {
            let weakened = match k.as_str() {
                "enable.idempotence" => v != "true",
                "acks" | "request.required.acks" => v != "all" && v != "-1",
                "transactional.id" | "transaction.timeout.ms" => true,
                _ => false,
            };
            if weakened {
                return Err(bad(format!(
                    "property {k} cannot be set to {v:?}: the sink needs an idempotent producer \
                     with acks=all (transactions are set with delivery, transactional_id_prefix, \
                     instance_id and transaction_timeout)"
                )));
            }
            client.set(k, v);
        }
        client
            .set("bootstrap.servers", &cfg.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set(
                "message.timeout.ms",
                cfg.delivery_timeout.as_millis().max(1).to_string(),
            );
        if !cfg.properties.contains_key("client.id") {
            client.set("client.id", "refetch-sink");
        }
        let eos = match cfg.delivery {
            Delivery::AtLeastOnce => None,
            Delivery::ExactlyOnce => {
                let transactional_id = transactional_id(cfg).map_err(bad)?;
                if cfg.transaction_timeout < Duration::from_secs(1) {
                    return Err(bad("transaction_timeout must be at least 1s".into()));
                }
                client.set("transactional.id", &transactional_id).set(
                    "transaction.timeout.ms",
                    cfg.transaction_timeout.as_millis().to_string(),
                );
                // Deliveries must not outlive the transaction.
                if cfg.delivery_timeout > cfg.transaction_timeout {
                    client.set(
                        "message.timeout.ms",
                        cfg.transaction_timeout.as_millis().to_string(),
                    );
                }
                let mut reader_config = ClientConfig::new();
                reader_config
                    .set("bootstrap.servers", &cfg.brokers)
                    .set("enable.auto.commit", "false")
                    .set("enable.auto.offset.store", "false")
                    .set("isolation.level", "read_committed")
                    .set("client.id", "refetch-sink-offsets");
                for (k, v) in &cfg.properties {
                    let shared = [
                        "security.",
                        "sasl.",
                        "ssl.",
                        "socket.",
                        "broker.",
                        "api.version",
                    ]
                    .iter()
                    .any(|p| k.starts_with(p));
                    if shared {
                        reader_config.set(k, v);
                    }
                }
                Some(Eos {
                    initialized: tokio::sync::OnceCell::new(),
                    transactional_id,
                    timeout: cfg.transaction_timeout,
                    state: Mutex::new(TxnState::default()),
                    reader_config,
                    reader: Mutex::new(None),
                })
            }
        };
        let producer: FutureProducer = client
            .create()
            .map_err(|e| bad(format!("cannot create the producer: {e}")))?;
        Ok(KafkaSink {
            producer: Mutex::new(Arc::new(producer)),
            client_config: client,
            topic: cfg.topic.clone(),
            queue_timeout: cfg.queue_timeout,
            max_batch: cfg.max_batch.max(1),
            input_header: cfg.input_offsets_header,
            eos,
        })
    }

    /// With `delivery = "exactly_once"`: register the transactional id with the broker
    /// (`init_transactions`, once), which fences an older producer with the same id and aborts
    /// its open transaction. A no-op otherwise, and once it succeeded. The sink calls it itself
    /// before its first transactional use.
    pub async fn init_transactions(&self) -> Result<(), TransactionError> {
        let Some(eos) = &self.eos else {
            return Ok(());
        };
        eos.initialized
            .get_or_try_init(|| async {
                let producer = self
                    .producer()
                    .map_err(|e| TransactionError::aborted(e.to_string()))?;
                let timeout = eos.timeout.max(Duration::from_secs(10));
                match blocking_kafka(move || producer.init_transactions(timeout)).await {
                    Ok(()) => {
                        tracing::info!(sink = SINK, transactional_id = %eos.transactional_id, "transactional producer ready");
                        Ok(())
                    }
                    Err((TxnClass::Fatal, text)) => Err(self.fatal(text)),
                    Err((_, text)) => Err(TransactionError::aborted(format!(
                        "cannot initialise transactions for transactional.id {}: {text}",
                        eos.transactional_id
                    ))),
                }
            })
            .await
            .map(|_| ())
    }

    /// The producer's `transactional.id` (exactly-once only).
    pub fn transactional_id(&self) -> Option<&str> {
        self.eos.as_ref().map(|e| e.transactional_id.as_str())
    }

    fn state(&self) -> Option<std::sync::MutexGuard<'_, TxnState>> {
        self.eos.as_ref().and_then(|e| e.state.lock().ok())
    }

    /// Begin a transaction unless one is open. Errors when the producer cannot go on.
    fn begin_if_needed(&self, producer: &FutureProducer) -> Result<(), SinkError> {
        let Some(eos) = &self.eos else {
            return Ok(());
        };
        let mut st = eos
            .state
            .lock()
            .map_err(|_| SinkError::transient("transaction state poisoned"))?;
        if let Some(f) = &st.fatal {
            return Err(SinkError::transient(format!(
                "the producer cannot go on: {f}"
            )));
        }
        if let Some(d) = &st.doomed {
            return Err(SinkError::transient(format!(
                "the open transaction must abort first: {d}"
            )));
        }
        if st.open {
            return Ok(());
        }
        match producer.begin_transaction() {
            Ok(()) => {
                st.open = true;
                Ok(())
            }
            Err(e) => {
                if matches!(txn_class(&e), TxnClass::Fatal) {
                    st.fatal = Some(e.to_string());
                }
                Err(SinkError::transient(format!(
                    "cannot begin a transaction: {e}"
                )))
            }
        }
    }

    fn doom(&self, why: &str) {
        if let Some(mut st) = self.state() {
            if st.open && st.doomed.is_none() {
                st.doomed = Some(why.to_owned());
            }
        }
    }

    fn fatal(&self, why: String) -> TransactionError {
        if let Some(mut st) = self.state() {
            st.fatal = Some(why.clone());
        }
        TransactionError::fatal(format!(
            "transactional producer {}: {why} (another producer with the same transactional.id \
             took over, or the producer failed for good; give every instance its own instance_id)",
            self.transactional_id().unwrap_or("?")
        ))
    }

    /// A client of `group_id` that reads its committed offsets (it never joins the group).
    fn reader(&self, group_id: &str) -> Result<Arc<BaseConsumer>, SinkError> {
        let eos = self
            .eos
            .as_ref()
            .ok_or_else(|| SinkError::permanent("the sink is not transactional"))?;
        let mut slot = eos
            .reader
            .lock()
            .map_err(|_| SinkError::transient("reader lock poisoned"))?;
        if let Some((g, r)) = slot.as_ref() {
            if g == group_id {
                return Ok(r.clone());
            }
        }
        let mut c = eos.reader_config.clone();
        c.set("group.id", group_id);
        let r: BaseConsumer = c
            .create()
            .map_err(|e| SinkError::transient(format!("cannot create the offsets reader: {e}")))?;
        let r = Arc::new(r);
        *slot = Some((group_id.to_owned(), r.clone()));
        Ok(r)
    }

    /// The topic written to.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    fn producer(&self) -> Result<Arc<FutureProducer>, SinkError> {
        self.producer
            .lock()
            .map(|p| Arc::clone(&p))
            .map_err(|_| SinkError::transient("producer lock poisoned"))
    }

    /// Replace a producer that hit a fatal error (an idempotent producer cannot continue then).
    fn replace_if_fatal(&self, producer: &FutureProducer) {
        let Some((code, reason)) = producer.client().fatal_error() else {
            return;
        };
        tracing::error!(sink = SINK, ?code, %reason, "fatal producer error: replacing the producer");
        match self.client_config.create::<FutureProducer>() {
            Ok(fresh) => {
                if let Ok(mut slot) = self.producer.lock() {
                    *slot = Arc::new(fresh);
                }
            }
            Err(e) => tracing::error!(sink = SINK, error = %e, "cannot create a new producer"),
        }
    }
}

/// Is this delivery error about the record itself?
fn is_record_error(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidRecord)
    )
}

/// The `refetch-inputs` header value of one record.
fn inputs_header(inputs: &[refetch::Coordinate]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(inputs.len() * 16);
    for (i, c) in inputs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{}:{}:{}", c.topic, c.partition, c.offset);
    }
    out
}

#[async_trait]
impl Sink for KafkaSink {
    async fn write(&self, batch: &[Change]) -> Result<WriteReport, SinkError> {
        self.write_with(batch, &WriteContext::new(&[])).await
    }

    async fn write_with(
        &self,
        batch: &[Change],
        ctx: &WriteContext<'_>,
    ) -> Result<WriteReport, SinkError> {
        let started = Instant::now();
        if let Err(e) = self.init_transactions().await {
            let e = SinkError::transient(e.to_string());
            crate::metrics::record_batch(SINK, batch.len(), started, &Err(e.clone()));
            return Err(e);
        }
        let producer = self.producer()?;
        if let Err(e) = self.begin_if_needed(&producer) {
            crate::metrics::record_batch(SINK, batch.len(), started, &Err(e.clone()));
            return Err(e);
        }
        let inputs: Vec<Option<String>> = (0..batch.len())
            .map(|i| {
                ctx.inputs
                    .get(i)
                    .filter(|c| self.input_header && !c.is_empty())
                    .map(|c| inputs_header(c))
            })
            .collect();
        let keys: Vec<String> = batch.iter().map(|c| record_key(c.key())).collect();
        let versions: Vec<Option<String>> = batch
            .iter()
            .map(|c| version_parts(c.version()).0.map(|v| v.to_string()))
            .collect();
        let sends = batch.iter().enumerate().map(|(i, change)| {
            let key = change.key();
            let mut headers = OwnedHeaders::new_with_capacity(5)
                .insert(Header {
                    key: HEADER_TYPE,
                    value: Some(key.entity_type()),
                })
                .insert(Header {
                    key: HEADER_ID,
                    value: Some(key.id()),
                });
            if let Some(v) = &inputs[i] {
                headers = headers.insert(Header {
                    key: HEADER_INPUTS,
                    value: Some(v.as_str()),
                });
            }
            let mut record = FutureRecord::<str, [u8]>::to(&self.topic).key(&keys[i]);
            if let Change::Upsert { entity, .. } = change {
                if let (Some(v), (_, Some(kind))) = (&versions[i], version_parts(entity.version)) {
                    headers = headers
                        .insert(Header {
                            key: HEADER_VERSION,
                            value: Some(v.as_str()),
                        })
                        .insert(Header {
                            key: HEADER_VERSION_KIND,
                            value: Some(kind),
                        });
                }
                if let Some(ct) = &entity.content_type {
                    headers = headers.insert(Header {
                        key: HEADER_CONTENT_TYPE,
                        value: Some(ct.as_str()),
                    });
                }
                record = record.payload(&entity.body[..]);
            }
            // Enqueued in batch order when first polled; join_all polls in order.
            producer.send(record.headers(headers), Timeout::After(self.queue_timeout))
        });
        let reports = futures::future::join_all(sends).await;

        let mut failed = Vec::new();
        let mut transient = None;
        for (i, report) in reports.into_iter().enumerate() {
            if let Err((e, _msg)) = report {
                if is_record_error(&e) {
                    tracing::warn!(sink = SINK, key = %batch[i].key(), error = %e, "record refused by the broker");
                    failed.push((
                        i,
                        SinkError::permanent(format!("broker refused the record: {e}")),
                    ));
                } else if transient.is_none() {
                    transient = Some(SinkError::transient(format!("delivery failed: {e}")));
                }
            }
        }
        let result = match (transient, &self.eos) {
            (Some(e), None) => {
                self.replace_if_fatal(&producer);
                Err(e)
            }
            (Some(e), Some(_)) => {
                // A failed delivery leaves the transaction abortable only.
                self.doom(&e.to_string());
                Err(e)
            }
            // In a transaction a refused record aborts it too: the batch fails permanently and
            // the engine writes it again unit by unit, each in a new transaction.
            (None, Some(_)) if !failed.is_empty() => {
                self.doom("a record was refused");
                let (i, e) = failed.swap_remove(0);
                Err(SinkError::permanent(format!(
                    "record {i} refused: {}",
                    e.message()
                )))
            }
            (None, _) => Ok(WriteReport { failed }),
        };
        if let Err(e) = &result {
            tracing::warn!(sink = SINK, records = batch.len(), error = %e, "batch not written");
        }
        crate::metrics::record_batch(SINK, batch.len(), started, &result);
        result
    }

    fn max_batch(&self) -> usize {
        self.max_batch
    }

    fn wants_inputs(&self) -> bool {
        self.input_header
    }

    fn offset_store(&self) -> Option<OffsetStore> {
        self.eos.as_ref().map(|_| OffsetStore::Group)
    }

    fn transaction_timeout(&self) -> Option<Duration> {
        self.eos.as_ref().map(|e| e.timeout)
    }

    fn max_stored_ranges(&self) -> usize {
        MAX_STORED_RANGES
    }

    async fn commit_transaction(
        &self,
        commit: &TransactionCommit<'_>,
    ) -> Result<(), TransactionError> {
        let Some(eos) = &self.eos else {
            return Err(TransactionError::fatal("the sink is not transactional"));
        };
        self.init_transactions().await?;
        let producer = self
            .producer()
            .map_err(|e| TransactionError::aborted(e.to_string()))?;
        {
            let st = eos
                .state
                .lock()
                .map_err(|_| TransactionError::aborted("transaction state poisoned"))?;
            if let Some(f) = &st.fatal {
                return Err(self_fatal_message(&eos.transactional_id, f));
            }
            if let Some(d) = &st.doomed {
                return Err(TransactionError::aborted(d.clone()));
            }
            if !st.open && commit.offsets.is_empty() {
                return Ok(());
            }
        }
        if let Err(e) = self.begin_if_needed(&producer) {
            return Err(TransactionError::aborted(e.to_string()));
        }
        let timeout = eos.timeout;
        if !commit.offsets.is_empty() {
            let Some(gm) = commit.group_metadata.cloned() else {
                self.doom("no consumer group metadata");
                return Err(TransactionError::aborted(
                    "no consumer group metadata to commit the offsets with",
                ));
            };
            let mut tpl = TopicPartitionList::new();
            for (a, stored) in commit.offsets {
                let _ = tpl.add_partition_offset(
                    &a.tp.topic,
                    a.tp.partition,
                    Offset::Offset(stored.offset),
                );
                if let Some(mut e) = tpl.find_partition(&a.tp.topic, a.tp.partition) {
                    e.set_metadata(stored.encode_ranges());
                }
            }
            let mut tries = 0;
            loop {
                tries += 1;
                let (p, t, g) = (producer.clone(), tpl.clone(), gm.clone());
                let r = tokio::task::spawn_blocking(move || {
                    let Some(cgm) = g.downcast_ref::<ConsumerGroupMetadata>() else {
                        return Err(None);
                    };
                    p.send_offsets_to_transaction(&t, cgm, timeout)
                        .map_err(Some)
                })
                .await
                .map_err(|e| TransactionError::aborted(format!("blocking task failed: {e}")))?;
                match r {
                    Ok(()) => break,
                    Err(None) => {
                        self.doom("group metadata of another client");
                        return Err(TransactionError::aborted(
                            "the group metadata is not a librdkafka consumer's",
                        ));
                    }
                    Err(Some(e)) => match txn_class(&e) {
                        TxnClass::Fatal => return Err(self.fatal(e.to_string())),
                        TxnClass::Retry if tries < 3 => continue,
                        _ => {
                            let m = format!("sending the offsets failed: {e}");
                            self.doom(&m);
                            return Err(TransactionError::aborted(m));
                        }
                    },
                }
            }
        }
        let mut tries = 0;
        loop {
            tries += 1;
            let p = producer.clone();
            match blocking_kafka(move || p.commit_transaction(timeout)).await {
                Ok(()) => {
                    if let Some(mut st) = self.state() {
                        st.open = false;
                    }
                    return Ok(());
                }
                Err((TxnClass::Fatal, text)) => return Err(self.fatal(text)),
                Err((TxnClass::Retry, _)) if tries < 3 => continue,
                Err((_, text)) => {
                    let m = format!("commit failed: {text}");
                    self.doom(&m);
                    return Err(TransactionError::aborted(m));
                }
            }
        }
    }

    async fn abort_transaction(&self) -> Result<(), TransactionError> {
        let Some(eos) = &self.eos else {
            return Ok(());
        };
        {
            let mut st = eos
                .state
                .lock()
                .map_err(|_| TransactionError::aborted("transaction state poisoned"))?;
            if let Some(f) = &st.fatal {
                return Err(self_fatal_message(&eos.transactional_id, f));
            }
            if !st.open {
                st.doomed = None;
                return Ok(());
            }
        }
        let producer = self
            .producer()
            .map_err(|e| TransactionError::aborted(e.to_string()))?;
        let timeout = eos.timeout;
        let mut tries = 0;
        loop {
            tries += 1;
            let p = producer.clone();
            match blocking_kafka(move || p.abort_transaction(timeout)).await {
                Ok(()) => {
                    if let Some(mut st) = self.state() {
                        st.open = false;
                        st.doomed = None;
                    }
                    return Ok(());
                }
                Err((TxnClass::Retry, _)) if tries < 3 => continue,
                // A producer that cannot abort cannot be trusted with another transaction.
                Err((_, text)) => return Err(self.fatal(format!("abort failed: {text}"))),
            }
        }
    }

    async fn stored_offsets(
        &self,
        group_id: &str,
        partitions: &[TopicPartition],
    ) -> Result<Vec<(TopicPartition, StoredOffset)>, SinkError> {
        if self.eos.is_none() || partitions.is_empty() {
            return Ok(Vec::new());
        }
        // Fence a former self first: its open transaction would hold the group's offsets
        // unstable until it times out.
        self.init_transactions().await.map_err(|e| match e {
            TransactionError::Fatal { message } => SinkError::permanent(message),
            TransactionError::Aborted { message } => SinkError::transient(message),
        })?;
        let reader = self.reader(group_id)?;
        let mut tpl = TopicPartitionList::new();
        for tp in partitions {
            tpl.add_partition(&tp.topic, tp.partition);
        }
        let got = blocking(move || {
            reader
                .committed_offsets(tpl, Duration::from_secs(10))
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| SinkError::transient(format!("cannot read the group's offsets: {e}")))?;
        let mut out = Vec::new();
        for e in got.elements() {
            if let Some(err) = e.error().err() {
                return Err(SinkError::transient(format!(
                    "offset of {}/{}: {err}",
                    e.topic(),
                    e.partition()
                )));
            }
            let Offset::Offset(o) = e.offset() else {
                continue;
            };
            let stored = StoredOffset::decode(o, e.metadata()).map_err(|err| {
                SinkError::permanent(format!(
                    "offset metadata of {}/{}: {err}",
                    e.topic(),
                    e.partition()
                ))
            })?;
            out.push((TopicPartition::new(e.topic(), e.partition()), stored));
        }
        Ok(out)
    }

    /// The topic exists and has partitions with leaders (a metadata request).
    async fn check(&self) -> Result<(), SinkError> {
        let producer = self.producer()?;
        let topic = self.topic.clone();
        tokio::task::spawn_blocking(move || {
            let md = producer
                .client()
                .fetch_metadata(Some(&topic), Duration::from_secs(10))
                .map_err(|e| SinkError::transient(format!("metadata request failed: {e}")))?;
            let t = md
                .topics()
                .iter()
                .find(|t| t.name() == topic)
                .ok_or_else(|| SinkError::transient(format!("topic {topic} not in metadata")))?;
            if let Some(e) = t.error() {
                return Err(SinkError::transient(format!(
                    "topic {topic}: {:?}",
                    RDKafkaErrorCode::from(e)
                )));
            }
            if t.partitions().is_empty() || t.partitions().iter().any(|p| p.leader() < 0) {
                return Err(SinkError::transient(format!(
                    "topic {topic} has partitions without a leader"
                )));
            }
            Ok(())
        })
        .await
        .map_err(|e| SinkError::transient(format!("metadata task failed: {e}")))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weakening_the_producer_is_refused() {
        for (k, v) in [
            ("enable.idempotence", "false"),
            ("acks", "1"),
            ("request.required.acks", "0"),
            ("transactional.id", "x"),
        ] {
            let mut cfg = KafkaConfig::default();
            cfg.properties.insert(k.into(), v.into());
            let err = KafkaSink::new(&cfg).unwrap_err().to_string();
            assert!(err.contains(k), "{err}");
        }
        let mut cfg = KafkaConfig::default();
        cfg.properties.insert("acks".into(), "all".into());
        cfg.properties.insert("linger.ms".into(), "5".into());
        assert!(KafkaSink::new(&cfg).is_ok());
    }

    #[test]
    fn record_keys_are_type_colon_id() {
        assert_eq!(
            record_key(&refetch::EntityKey::new("customer", "a:b")),
            "customer:a:b"
        );
    }

    #[test]
    fn too_large_is_the_records_fault_and_the_rest_is_transient() {
        let too_large = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert!(is_record_error(&too_large));
        for code in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::UnknownTopicOrPartition,
            RDKafkaErrorCode::TopicAuthorizationFailed,
            RDKafkaErrorCode::AllBrokersDown,
        ] {
            assert!(
                !is_record_error(&KafkaError::MessageProduction(code)),
                "{code:?}"
            );
        }
    }
}
