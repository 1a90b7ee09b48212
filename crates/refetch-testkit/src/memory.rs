//! An in-memory versioned source (a [`Fetcher`]) and a recording sink with failure injection.
//!
//! [`VersionedSource`] holds entities whose versions go up on every change; tests change entities
//! while the pipeline runs and publish a notification per change. Its fetch returns the state at
//! the moment of the fetch (optionally after a delay, so changes can land while a fetch is in
//! flight), and counts fetches per key.
//!
//! [`RecordingSink`] keeps the latest state per key with a version guard, records every write in
//! order, and can be told to fail: the whole sink down for a while, or single keys rejected.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use refetch::{
    Change, Entity, EntityKey, FailureCause, FetchError, FetchOutcome, FetchRequest, Fetcher, Sink,
    SinkError, Version, WriteReport,
};

/// One entity's state at the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceEntity {
    /// Current version.
    pub version: i64,
    /// Deleted at the source.
    pub deleted: bool,
}

#[derive(Debug, Default)]
struct SourceState {
    entities: BTreeMap<EntityKey, SourceEntity>,
    fetches: HashMap<EntityKey, u64>,
    transient_failures_left: u64,
    poisoned: HashSet<EntityKey>,
}

/// An in-memory source of versioned entities. Cheap to clone (shared state).
#[derive(Debug, Clone, Default)]
pub struct VersionedSource {
    state: Arc<Mutex<SourceState>>,
    delay: Arc<AtomicU64>,
    down: Arc<AtomicBool>,
    total: Arc<AtomicU64>,
}

fn body(key: &EntityKey, version: i64) -> String {
    format!(
        r#"{{"type":{:?},"id":{:?},"version":{version}}}"#,
        key.entity_type(),
        key.id()
    )
}

impl VersionedSource {
    /// An empty source.
    pub fn new() -> Self {
        Self::default()
    }

    /// Change `key` (create it at version 1 or bump its version); returns the new version.
    pub fn change(&self, key: &EntityKey) -> i64 {
        let Ok(mut s) = self.state.lock() else {
            return -1;
        };
        let e = s.entities.entry(key.clone()).or_insert(SourceEntity {
            version: 0,
            deleted: false,
        });
        e.version += 1;
        e.deleted = false;
        e.version
    }

    /// Delete `key` at the source (its version still goes up).
    pub fn delete(&self, key: &EntityKey) -> i64 {
        let Ok(mut s) = self.state.lock() else {
            return -1;
        };
        let e = s.entities.entry(key.clone()).or_insert(SourceEntity {
            version: 0,
            deleted: true,
        });
        e.version += 1;
        e.deleted = true;
        e.version
    }

    /// Delay every fetch by `d`.
    pub fn set_delay(&self, d: Duration) {
        self.delay.store(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// Make every fetch fail transiently (an outage) until set back.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Fail the next `n` fetches transiently.
    pub fn fail_next(&self, n: u64) {
        if let Ok(mut s) = self.state.lock() {
            s.transient_failures_left = n;
        }
    }

    /// Make `key` fail transiently forever (a poison entity).
    pub fn poison(&self, key: EntityKey) {
        if let Ok(mut s) = self.state.lock() {
            s.poisoned.insert(key);
        }
    }

    /// Stop failing `key` (see [`VersionedSource::poison`]).
    pub fn unpoison(&self, key: &EntityKey) {
        if let Ok(mut s) = self.state.lock() {
            s.poisoned.remove(key);
        }
    }

    /// The source's state: key -> (version, deleted).
    pub fn snapshot(&self) -> BTreeMap<EntityKey, SourceEntity> {
        self.state
            .lock()
            .map(|s| s.entities.clone())
            .unwrap_or_default()
    }

    /// Fetches of one key so far.
    pub fn fetches_of(&self, key: &EntityKey) -> u64 {
        self.state
            .lock()
            .ok()
            .and_then(|s| s.fetches.get(key).copied())
            .unwrap_or(0)
    }

    /// Fetches so far.
    pub fn total_fetches(&self) -> u64 {
        self.total.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Fetcher for VersionedSource {
    async fn fetch(&self, req: &FetchRequest) -> Result<FetchOutcome, FetchError> {
        let delay = self.delay.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        self.total.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(FetchError::transient("source is down").with_cause(FailureCause::Connect));
        }
        let mut s = self
            .state
            .lock()
            .map_err(|_| FetchError::permanent("source state poisoned"))?;
        *s.fetches.entry(req.key.clone()).or_default() += 1;
        if s.poisoned.contains(&req.key) {
            return Err(FetchError::transient("poisoned entity keeps failing")
                .with_cause(FailureCause::Server));
        }
        if s.transient_failures_left > 0 {
            s.transient_failures_left -= 1;
            return Err(FetchError::transient("injected failure").with_cause(FailureCause::Server));
        }
        match s.entities.get(&req.key) {
            None => Ok(FetchOutcome::Gone),
            Some(e) if e.deleted => Ok(FetchOutcome::Gone),
            Some(e) => Ok(FetchOutcome::Found(Entity::json(
                body(&req.key, e.version),
                Some(Version::Int(e.version)),
            ))),
        }
    }
}

/// One write as the sink saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedWrite {
    /// The key.
    pub key: EntityKey,
    /// The version written (`None` for deletes).
    pub version: Option<i64>,
    /// A delete.
    pub delete: bool,
}

#[derive(Debug, Default)]
struct SinkState {
    held: BTreeMap<EntityKey, i64>,
    log: Vec<RecordedWrite>,
    rejected: HashSet<EntityKey>,
    batches: u64,
}

/// A sink that records every write, with injected failures. By default it guards on version
/// (an older state never overwrites a newer one, as the PostgreSQL sink does for versioned
/// entities); [`RecordingSink::last_write_wins`] makes one that does not, as a Kafka topic, an
/// HTTP endpoint or a JSON Lines file does, so that a write landing out of order shows.
#[derive(Debug, Clone, Default)]
pub struct RecordingSink {
    state: Arc<Mutex<SinkState>>,
    down: Arc<AtomicBool>,
    delay: Arc<AtomicU64>,
    last_write_wins: bool,
}

impl RecordingSink {
    /// An empty sink that guards on version.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty sink without a version guard: the last write of a key wins, whatever its
    /// version. It does not report held versions either (it could not know which is newest).
    pub fn last_write_wins() -> Self {
        RecordingSink {
            last_write_wins: true,
            ..Self::default()
        }
    }

    /// Fail every batch transiently until set back.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Delay every batch.
    pub fn set_delay(&self, d: Duration) {
        self.delay.store(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// Reject `key` permanently (its batch-mates succeed).
    pub fn reject(&self, key: EntityKey) {
        if let Ok(mut s) = self.state.lock() {
            s.rejected.insert(key);
        }
    }

    /// The latest version held per key (deleted keys are absent).
    pub fn held(&self) -> BTreeMap<EntityKey, i64> {
        self.state
            .lock()
            .map(|s| s.held.clone())
            .unwrap_or_default()
    }

    /// Every durable write in order.
    pub fn log(&self) -> Vec<RecordedWrite> {
        self.state.lock().map(|s| s.log.clone()).unwrap_or_default()
    }

    /// Batches written.
    pub fn batches(&self) -> u64 {
        self.state.lock().map(|s| s.batches).unwrap_or(0)
    }

    /// Keys whose sink state differs from the source's (missing, stale, or present though
    /// deleted at the source). Empty when the sink equals the source.
    pub fn diff(&self, source: &VersionedSource) -> Vec<String> {
        let held = self.held();
        let mut wrong = Vec::new();
        for (key, e) in source.snapshot() {
            match (held.get(&key), e.deleted) {
                (Some(v), false) if *v == e.version => {}
                (None, true) => {}
                (got, _) => wrong.push(format!(
                    "{key}: sink {got:?}, source v{} deleted={}",
                    e.version, e.deleted
                )),
            }
        }
        wrong
    }
}

#[async_trait]
impl Sink for RecordingSink {
    async fn write(&self, batch: &[Change]) -> Result<WriteReport, SinkError> {
        let delay = self.delay.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if self.down.load(Ordering::SeqCst) {
            return Err(SinkError::transient("sink is down"));
        }
        let mut s = self
            .state
            .lock()
            .map_err(|_| SinkError::permanent("sink state poisoned"))?;
        s.batches += 1;
        let mut report = WriteReport::default();
        for (i, change) in batch.iter().enumerate() {
            if s.rejected.contains(change.key()) {
                report
                    .failed
                    .push((i, SinkError::permanent("rejected by the test")));
                continue;
            }
            match change {
                Change::Upsert { key, entity } => {
                    let v = entity.version.map_or(0, |v| v.value());
                    let current = s.held.get(key).copied();
                    // Version guard: an older state never overwrites a newer one (unless this
                    // sink is last-write-wins).
                    if self.last_write_wins || current.is_none_or(|c| c <= v) {
                        s.held.insert(key.clone(), v);
                    }
                    s.log.push(RecordedWrite {
                        key: key.clone(),
                        version: Some(v),
                        delete: false,
                    });
                }
                Change::Delete { key } => {
                    s.held.remove(key);
                    s.log.push(RecordedWrite {
                        key: key.clone(),
                        version: None,
                        delete: true,
                    });
                }
            }
        }
        Ok(report)
    }

    async fn held_version(&self, key: &EntityKey) -> Result<Option<Version>, SinkError> {
        if self.last_write_wins {
            return Ok(None);
        }
        Ok(self
            .state
            .lock()
            .map_err(|_| SinkError::permanent("sink state poisoned"))?
            .held
            .get(key)
            .map(|v| Version::Int(*v)))
    }

    fn tracks_versions(&self) -> bool {
        !self.last_write_wins
    }
}
