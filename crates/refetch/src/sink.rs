//! The [`Sink`] trait: write fetched states durably to the target system.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

use crate::error::ErrorClass;
use crate::fetch::Entity;
use crate::key::{EntityKey, Version};

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
}

impl<'a> WriteContext<'a> {
    /// A context for a batch whose changes were fetched at these times.
    pub fn new(fetched_at: &'a [SystemTime]) -> Self {
        WriteContext { fetched_at }
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
}
