//! The [`Sink`] trait: write fetched states durably to the target system.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::assignment::{Assignment, TopicPartition};
use crate::consumer::GroupMetadata;
use crate::dlq::Coordinate;
use crate::error::ErrorClass;
use crate::fetch::Entity;
use crate::key::{EntityKey, Version};
use crate::offsets::StoredOffset;

/// One change to apply to the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Insert or replace the entity's state. Sinks that can should guard on `entity.version` so an
    /// older state never overwrites a newer one.
    Upsert {
        /// The entity.
        key: EntityKey,
        /// Its fetched state.
        entity: Entity,
    },
    /// The entity is gone at the source: delete it (or write a tombstone).
    Delete {
        /// The entity.
        key: EntityKey,
    },
}

impl Change {
    /// The key this change is about.
    pub fn key(&self) -> &EntityKey {
        match self {
            Change::Upsert { key, .. } | Change::Delete { key } => key,
        }
    }

    /// The version written, if any.
    pub fn version(&self) -> Option<Version> {
        match self {
            Change::Upsert { entity, .. } => entity.version,
            Change::Delete { .. } => None,
        }
    }
}

/// Why a sink write failed, classified for the engine.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SinkError {
    /// The target is unavailable or overloaded; the write is retried without end.
    #[error("transient sink error: {message}")]
    Transient {
        /// What happened.
        message: String,
        /// A lower bound for the next attempt, if the target gave one.
        retry_after: Option<Duration>,
    },
    /// The target refuses this record for good (constraint violation, invalid body).
    #[error("permanent sink error: {message}")]
    Permanent {
        /// What happened.
        message: String,
    },
}

impl SinkError {
    /// A transient error without a retry hint.
    pub fn transient(message: impl Into<String>) -> Self {
        SinkError::Transient {
            message: message.into(),
            retry_after: None,
        }
    }

    /// A permanent error.
    pub fn permanent(message: impl Into<String>) -> Self {
        SinkError::Permanent {
            message: message.into(),
        }
    }

    /// The classification the engine acts on.
    pub fn class(&self) -> ErrorClass {
        match self {
            SinkError::Transient { retry_after, .. } => ErrorClass::Transient {
                retry_after: *retry_after,
            },
            SinkError::Permanent { .. } => ErrorClass::Permanent,
        }
    }

    /// The message without the classification prefix.
    pub fn message(&self) -> &str {
        match self {
            SinkError::Transient { message, .. } | SinkError::Permanent { message } => message,
        }
    }
}

/// The result of a batch write that was durable as a whole except for the listed records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteReport {
    /// Records that failed on their own: (index in the batch, error). Every other record is durable.
    pub failed: Vec<(usize, SinkError)>,
}

impl WriteReport {
    /// Every record is durable.
    pub fn all_durable() -> Self {
        WriteReport::default()
    }
}

/// What the engine knows about a batch besides its changes.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct WriteContext<'a> {
    /// When each change's fetch started, on the wall clock (one entry per change, in order). A
    /// sink that cannot guard an entity on its source version (the entity has none) can guard on
    /// this instead: a state read earlier never overwrites one read later, even when a write of
    /// a former owner of the partition arrives late (a write already on the wire cannot be
    /// recalled). This assumes the clocks of the instances of a group agree to well within the
    /// time between two changes of one entity.
    pub fetched_at: &'a [SystemTime],
    /// The input offsets each change covers (one entry per change, in order): the notifications
    /// it satisfies. Filled only for sinks that ask for it ([`Sink::wants_inputs`]); empty
    /// otherwise.
    pub inputs: &'a [&'a [Coordinate]],
}

impl<'a> WriteContext<'a> {
    /// A context for a batch whose changes were fetched at these times.
    pub fn new(fetched_at: &'a [SystemTime]) -> Self {
        WriteContext {
            fetched_at,
            inputs: &[],
        }
    }

    /// The same context with the input offsets of each change.
    pub fn with_inputs(mut self, inputs: &'a [&'a [Coordinate]]) -> Self {
        self.inputs = inputs;
        self
    }
}

/// How a sink delivers what the engine writes.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// Every write is durable when acknowledged; after a crash, notifications after the last
    /// commit are written again (sinks upsert, so the target converges).
    #[default]
    AtLeastOnce,
    /// Writes are held in a transaction that commits together with the input offsets it covers:
    /// every input offset is covered by exactly one committed write (see the sink's
    /// [`Sink::offset_store`]).
    ExactlyOnce,
}

impl Delivery {
    /// The configuration name (`at_least_once`, `exactly_once`).
    pub fn name(self) -> &'static str {
        match self {
            Delivery::AtLeastOnce => "at_least_once",
            Delivery::ExactlyOnce => "exactly_once",
        }
    }
}

/// Where a transactional sink keeps the input offsets its transactions commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetStore {
    /// In the consumer group: the sink commits them to the group inside its transaction (a
    /// Kafka topic, with `send_offsets_to_transaction`); the engine commits no offsets itself.
    Group,
    /// In the target (a PostgreSQL table); the engine also commits them to the consumer group
    /// after each transaction, for lag tooling. On assignment the engine starts from the stored
    /// offset when it is ahead of the group's.
    Sink,
}

/// A transaction to commit: everything the sink wrote since the last commit or abort, with the
/// input offsets it covers.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct TransactionCommit<'a> {
    /// The consumer group.
    pub group_id: &'a str,
    /// The consumer's group metadata (member and generation), for sinks that commit offsets to
    /// the group and are fenced through it. `None` without a Kafka consumer.
    pub group_metadata: Option<&'a GroupMetadata>,
    /// What to store per partition: the next offset to consume and the satisfied ranges above
    /// it. Partitions whose stored offset did not change may be missing.
    pub offsets: &'a [(Assignment, StoredOffset)],
}

impl<'a> TransactionCommit<'a> {
    /// A commit for `group_id` of these offsets.
    pub fn new(group_id: &'a str, offsets: &'a [(Assignment, StoredOffset)]) -> Self {
        TransactionCommit {
            group_id,
            group_metadata: None,
            offsets,
        }
    }

    /// The same commit with the consumer's group metadata.
    pub fn with_group_metadata(mut self, metadata: Option<&'a GroupMetadata>) -> Self {
        self.group_metadata = metadata;
        self
    }
}

/// Why a transaction did not commit.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum TransactionError {
    /// The transaction was rolled back: none of its writes is visible. The engine fetches again
    /// what they satisfied and carries on.
    #[error("transaction aborted: {message}")]
    Aborted {
        /// What happened.
        message: String,
    },
    /// The sink cannot go on (for example a Kafka producer fenced by another instance with the
    /// same `transactional.id`). The pipeline stops with this error, committing nothing more.
    #[error("transactional sink failed for good: {message}")]
    Fatal {
        /// What happened.
        message: String,
    },
}

impl TransactionError {
    /// An aborted transaction.
    pub fn aborted(message: impl Into<String>) -> Self {
        TransactionError::Aborted {
            message: message.into(),
        }
    }

    /// A sink that cannot go on.
    pub fn fatal(message: impl Into<String>) -> Self {
        TransactionError::Fatal {
            message: message.into(),
        }
    }
}

/// Writes changes durably to a target system.
///
/// `write` returns `Ok` only when every change not listed in [`WriteReport::failed`] is durable:
/// the engine commits Kafka offsets on that promise. An `Err` means nothing of the batch can be
/// relied on; a transient one is retried without end (a sink that is down pauses consumption, it
/// never loses or dead-letters data), a permanent one dead-letters the batch's records.
///
/// Writes for one key arrive in the order their fetches ran, and never two at once.
///
/// ## Transactional sinks (exactly-once)
///
/// A sink whose [`Sink::offset_store`] is `Some` is *transactional*: a write it acknowledges is
/// provisional, held in its open transaction (begun by the first write after a commit or
/// abort), until the engine calls [`Sink::commit_transaction`] with the input offsets the
/// transaction covers. The engine calls the sink from one task at a time in that mode, so a
/// commit never overlaps a write. An `Err` from a write means the open transaction can no longer
/// commit: the engine calls [`Sink::abort_transaction`] next and fetches again what the
/// transaction's writes satisfied. `Ok` with failed records means the transaction holds every
/// other record of the batch.
///
/// ```
/// use refetch::{async_trait, Change, Sink, SinkError, WriteReport};
/// use std::sync::Mutex;
///
/// #[derive(Default)]
/// struct Memory(Mutex<Vec<Change>>);
///
/// #[async_trait]
/// impl Sink for Memory {
///     async fn write(&self, batch: &[Change]) -> Result<WriteReport, SinkError> {
///         let mut held = self.0.lock().map_err(|_| SinkError::permanent("poisoned"))?;
///         held.extend_from_slice(batch);
///         Ok(WriteReport::all_durable())
///     }
/// }
/// ```
#[async_trait]
pub trait Sink: Send + Sync + 'static {
    /// Write a batch with what the engine knows about it (see [`WriteContext`]). The default
    /// calls [`Sink::write`]; sinks that can guard unversioned entities by fetch time override
    /// it.
    async fn write_with(
        &self,
        batch: &[Change],
        ctx: &WriteContext<'_>,
    ) -> Result<WriteReport, SinkError> {
        let _ = ctx;
        self.write(batch).await
    }

    /// Write a batch durably.
    async fn write(&self, batch: &[Change]) -> Result<WriteReport, SinkError>;

    /// The version the sink holds for `key`, if it tracks versions. Used after a restart to
    /// satisfy stale notifications without a fetch. The default knows nothing.
    async fn held_version(&self, key: &EntityKey) -> Result<Option<Version>, SinkError> {
        let _ = key;
        Ok(None)
    }

    /// Whether [`Sink::held_version`] is worth calling.
    fn tracks_versions(&self) -> bool {
        false
    }

    /// The largest batch this sink wants.
    fn max_batch(&self) -> usize {
        256
    }

    /// Is the target reachable? Used by readiness checks and `refetch validate`.
    async fn check(&self) -> Result<(), SinkError> {
        Ok(())
    }

    /// Where this sink stores input offsets with its transactions; `None` (the default) for a
    /// sink that is not transactional (at-least-once).
    fn offset_store(&self) -> Option<OffsetStore> {
        None
    }

    /// Commit the open transaction (an empty one when nothing was written since the last
    /// commit) together with `commit.offsets`. `Ok` only once everything is durable.
    async fn commit_transaction(
        &self,
        commit: &TransactionCommit<'_>,
    ) -> Result<(), TransactionError> {
        let _ = commit;
        Err(TransactionError::fatal("the sink is not transactional"))
    }

    /// Roll the open transaction back (nothing to do when none is open).
    async fn abort_transaction(&self) -> Result<(), TransactionError> {
        Ok(())
    }

    /// What the sink stored for these partitions of `group_id` (partitions it stored nothing
    /// for are left out). Asked for every new assignment; its records wait for the answer.
    async fn stored_offsets(
        &self,
        group_id: &str,
        partitions: &[TopicPartition],
    ) -> Result<Vec<(TopicPartition, StoredOffset)>, SinkError> {
        let _ = (group_id, partitions);
        Ok(Vec::new())
    }

    /// How long a transaction may stay open before the target aborts it, if it does: the engine
    /// checks that its commit interval fits, and aborts a transaction it cannot commit in time.
    fn transaction_timeout(&self) -> Option<Duration> {
        None
    }

    /// The most satisfied ranges above the stored offset one partition's entry may hold (a
    /// Kafka offset's metadata is small). The engine postpones a commit whose ranges do not fit.
    fn max_stored_ranges(&self) -> usize {
        usize::MAX
    }

    /// Does the sink want the input offsets of each change in [`WriteContext::inputs`]?
    fn wants_inputs(&self) -> bool {
        false
    }
}

#[async_trait]
impl<S: Sink + ?Sized> Sink for Arc<S> {
    async fn write(&self, batch: &[Change]) -> Result<WriteReport, SinkError> {
        (**self).write(batch).await
    }
    async fn write_with(
        &self,
        batch: &[Change],
        ctx: &WriteContext<'_>,
    ) -> Result<WriteReport, SinkError> {
        (**self).write_with(batch, ctx).await
    }
    async fn held_version(&self, key: &EntityKey) -> Result<Option<Version>, SinkError> {
        (**self).held_version(key).await
    }
    fn tracks_versions(&self) -> bool {
        (**self).tracks_versions()
    }
    fn max_batch(&self) -> usize {
        (**self).max_batch()
    }
    async fn check(&self) -> Result<(), SinkError> {
        (**self).check().await
    }
    fn offset_store(&self) -> Option<OffsetStore> {
        (**self).offset_store()
    }
    async fn commit_transaction(
        &self,
        commit: &TransactionCommit<'_>,
    ) -> Result<(), TransactionError> {
        (**self).commit_transaction(commit).await
    }
    async fn abort_transaction(&self) -> Result<(), TransactionError> {
        (**self).abort_transaction().await
    }
    async fn stored_offsets(
        &self,
        group_id: &str,
        partitions: &[TopicPartition],
    ) -> Result<Vec<(TopicPartition, StoredOffset)>, SinkError> {
        (**self).stored_offsets(group_id, partitions).await
    }
    fn transaction_timeout(&self) -> Option<Duration> {
        (**self).transaction_timeout()
    }
    fn max_stored_ranges(&self) -> usize {
        (**self).max_stored_ranges()
    }
    fn wants_inputs(&self) -> bool {
        (**self).wants_inputs()
    }
}

#[async_trait]
impl<S: Sink + ?Sized> Sink for Box<S> {
    async fn write(&self, batch: &[Change]) -> Result<WriteReport, SinkError> {
        (**self).write(batch).await
    }
    async fn write_with(
        &self,
        batch: &[Change],
        ctx: &WriteContext<'_>,
    ) -> Result<WriteReport, SinkError> {
        (**self).write_with(batch, ctx).await
    }
    async fn held_version(&self, key: &EntityKey) -> Result<Option<Version>, SinkError> {
        (**self).held_version(key).await
    }
    fn tracks_versions(&self) -> bool {
        (**self).tracks_versions()
    }
    fn max_batch(&self) -> usize {
        (**self).max_batch()
    }
    async fn check(&self) -> Result<(), SinkError> {
        (**self).check().await
    }
    fn offset_store(&self) -> Option<OffsetStore> {
        (**self).offset_store()
    }
    async fn commit_transaction(
        &self,
        commit: &TransactionCommit<'_>,
    ) -> Result<(), TransactionError> {
        (**self).commit_transaction(commit).await
    }
    async fn abort_transaction(&self) -> Result<(), TransactionError> {
        (**self).abort_transaction().await
    }
    async fn stored_offsets(
        &self,
        group_id: &str,
        partitions: &[TopicPartition],
    ) -> Result<Vec<(TopicPartition, StoredOffset)>, SinkError> {
        (**self).stored_offsets(group_id, partitions).await
    }
    fn transaction_timeout(&self) -> Option<Duration> {
        (**self).transaction_timeout()
    }
    fn max_stored_ranges(&self) -> usize {
        (**self).max_stored_ranges()
    }
    fn wants_inputs(&self) -> bool {
        (**self).wants_inputs()
    }
}
