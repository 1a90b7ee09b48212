//! An in-memory transactional sink (exactly-once delivery) that fails the way a database does.
//!
//! [`TransactionalSink`] holds writes in an open transaction until the engine commits it; the
//! commit stores the input offsets with them (as the PostgreSQL sink does, [`OffsetStore::Sink`]).
//! Every committed output keeps the input offsets it covers, so a test can check that no input
//! offset is covered by two committed outputs. Failures can be injected where a real database
//! fails: a write that loses the transaction (a dropped connection: the transaction can only
//! roll back), a commit that fails (its writes are gone), and slow writes.
//!
//! What it committed is shared by clones and survives the pipeline that used it, so a test can
//! "crash" a pipeline (drop its task without a shutdown: nothing more is committed) and start a
//! new one on the same sink, as a restarted process would find the same database. The open
//! transaction belongs to a session (a database connection): a restarted process uses a new
//! [`TransactionalSink::session`], and the crashed one's open transaction is gone with it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use refetch::{
    Change, Coordinate, EntityKey, OffsetStore, Sink, SinkError, StoredOffset, TopicPartition,
    TransactionCommit, TransactionError, Version, WriteContext, WriteReport,
};

/// One output as the sink holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// The entity.
    pub key: EntityKey,
    /// The version written (`None` for a delete).
    pub version: Option<i64>,
    /// The input offsets the write covers.
    pub inputs: Vec<Coordinate>,
}

#[derive(Debug, Default)]
struct State {
    committed: Vec<Output>,
    stored: BTreeMap<(String, TopicPartition), StoredOffset>,
    write_failures: u32,
    commit_failures: u32,
    commits: u64,
    aborts: u64,
}

/// One connection's open transaction.
#[derive(Debug, Default)]
struct Session {
    open: Vec<Output>,
    /// The open transaction was lost: it can only roll back.
    doomed: bool,
}

/// An in-memory transactional sink. Cheap to clone (clones share the committed state and the
/// session).
#[derive(Debug, Clone, Default)]
pub struct TransactionalSink {
    state: Arc<Mutex<State>>,
    session: Arc<Mutex<Session>>,
    delay_ms: Arc<AtomicU64>,
}

impl TransactionalSink {
    /// An empty sink.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        }
    }

    fn session_state(&self) -> std::sync::MutexGuard<'_, Session> {
        match self.session.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        }
    }

    /// The same sink over a new connection (what a restarted process gets): what was committed
    /// is there, the open transaction of the old connection is not.
    pub fn session(&self) -> Self {
        TransactionalSink {
            state: self.state.clone(),
            session: Arc::new(Mutex::new(Session::default())),
            delay_ms: self.delay_ms.clone(),
        }
    }

    /// The next `n` writes fail and lose the open transaction (a dropped connection).
    pub fn fail_writes(&self, n: u32) {
        self.state().write_failures = n;
    }

    /// The next `n` commits fail (their transactions are rolled back).
    pub fn fail_commits(&self, n: u32) {
        self.state().commit_failures = n;
    }

    /// Every write takes this long.
    pub fn set_delay(&self, d: Duration) {
        self.delay_ms.store(
            d.as_millis().min(u128::from(u64::MAX)) as u64,
            Ordering::SeqCst,
        );
    }

    /// Every committed output, in commit order.
    pub fn committed(&self) -> Vec<Output> {
        self.state().committed.clone()
    }

    /// The latest committed version per key (`None` when the last output deleted it).
    pub fn held(&self) -> BTreeMap<EntityKey, Option<i64>> {
        let mut out = BTreeMap::new();
        for o in &self.state().committed {
            out.insert(o.key.clone(), o.version);
        }
        out
    }

    /// What is stored for `tp` of `group`.
    pub fn stored(&self, group: &str, tp: &TopicPartition) -> Option<StoredOffset> {
        self.state()
            .stored
            .get(&(group.to_owned(), tp.clone()))
            .cloned()
    }

    /// Commits and aborts so far.
    pub fn transactions(&self) -> (u64, u64) {
        let s = self.state();
        (s.commits, s.aborts)
    }

    /// Input offsets covered by more than one committed output.
    pub fn covered_twice(&self) -> Vec<Coordinate> {
        let mut seen: BTreeMap<Coordinate, usize> = BTreeMap::new();
        for o in &self.state().committed {
            for c in &o.inputs {
                *seen.entry(c.clone()).or_default() += 1;
            }
        }
        seen.into_iter()
            .filter(|(_, n)| *n > 1)
            .map(|(c, _)| c)
            .collect()
    }
}

#[async_trait]
impl Sink for TransactionalSink {
    async fn write(&self, batch: &[Change]) -> Result<WriteReport, SinkError> {
        self.write_with(batch, &WriteContext::new(&[])).await
    }

    async fn write_with(
        &self,
        batch: &[Change],
        ctx: &WriteContext<'_>,
    ) -> Result<WriteReport, SinkError> {
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let mut s = self.state();
        let mut session = self.session_state();
        if session.doomed {
            return Err(SinkError::transient(
                "the transaction was lost; roll back first",
            ));
        }
        if s.write_failures > 0 {
            s.write_failures -= 1;
            session.doomed = true;
            return Err(SinkError::transient("connection lost (injected)"));
        }
        for (i, c) in batch.iter().enumerate() {
            session.open.push(Output {
                key: c.key().clone(),
                version: match c.version() {
                    Some(Version::Int(v)) => Some(v),
                    _ => None,
                }
                .filter(|_| matches!(c, Change::Upsert { .. })),
                inputs: ctx.inputs.get(i).map(|x| x.to_vec()).unwrap_or_default(),
            });
        }
        Ok(WriteReport::all_durable())
    }

    fn max_batch(&self) -> usize {
        64
    }

    fn offset_store(&self) -> Option<OffsetStore> {
        Some(OffsetStore::Sink)
    }

    fn wants_inputs(&self) -> bool {
        true
    }

    async fn commit_transaction(
        &self,
        commit: &TransactionCommit<'_>,
    ) -> Result<(), TransactionError> {
        let mut s = self.state();
        let mut session = self.session_state();
        if session.doomed {
            return Err(TransactionError::aborted("the transaction was lost"));
        }
        if s.commit_failures > 0 {
            s.commit_failures -= 1;
            session.open.clear();
            s.aborts += 1;
            return Err(TransactionError::aborted("commit failed (injected)"));
        }
        let open = std::mem::take(&mut session.open);
        s.committed.extend(open);
        for (a, stored) in commit.offsets {
            s.stored
                .insert((commit.group_id.to_owned(), a.tp.clone()), stored.clone());
        }
        s.commits += 1;
        Ok(())
    }

    async fn abort_transaction(&self) -> Result<(), TransactionError> {
        let mut session = self.session_state();
        session.open.clear();
        session.doomed = false;
        self.state().aborts += 1;
        Ok(())
    }

    async fn stored_offsets(
        &self,
        group_id: &str,
        partitions: &[TopicPartition],
    ) -> Result<Vec<(TopicPartition, StoredOffset)>, SinkError> {
        let s = self.state();
        Ok(partitions
            .iter()
            .filter_map(|tp| {
                s.stored
                    .get(&(group_id.to_owned(), tp.clone()))
                    .map(|o| (tp.clone(), o.clone()))
            })
            .collect())
    }
}
