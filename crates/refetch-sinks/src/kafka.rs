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

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;
use refetch::{Change, Sink, SinkError, WriteReport};

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

/// Produces entity states to a Kafka topic.
pub struct KafkaSink {
    producer: Mutex<Arc<FutureProducer>>,
    client_config: ClientConfig,
    topic: String,
    queue_timeout: Duration,
    max_batch: usize,
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
                "transactional.id" => true,
                _ => false,
            };
            if weakened {
                return Err(bad(format!(
                    "property {k} cannot be set to {v:?}: the sink needs an idempotent producer \
                     with acks=all (and no transactions)"
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
        let producer: FutureProducer = client
            .create()
            .map_err(|e| bad(format!("cannot create the producer: {e}")))?;
        Ok(KafkaSink {
            producer: Mutex::new(Arc::new(producer)),
            client_config: client,
            topic: cfg.topic.clone(),
            queue_timeout: cfg.queue_timeout,
            max_batch: cfg.max_batch.max(1),
        })
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

#[async_trait]
impl Sink for KafkaSink {
    async fn write(&self, batch: &[Change]) -> Result<WriteReport, SinkError> {
        let started = Instant::now();
        let producer = self.producer()?;
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
        let result = match transient {
            Some(e) => {
                self.replace_if_fatal(&producer);
                Err(e)
            }
            None => Ok(WriteReport { failed }),
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
