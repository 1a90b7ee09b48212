//! Exactly-once delivery: the engine's side of a transactional sink.
//!
//! A write acknowledged by a transactional sink is *provisional*: the sink holds it in its open
//! transaction. Its notifications are marked provisional in their partitions' trackers, and what
//! a durable write would put in the acknowledged-version and validator caches is kept aside.
//!
//! - The sink writer reports every write with the transaction it joined; transactions are
//!   numbered by the commits and aborts since the start, on both sides, in one order.
//! - A commit plan ([`Engine::transaction_plan`]) offers, per current assignment, what the
//!   transaction should store: the oldest offset neither satisfied nor provisional, and the
//!   satisfied or provisional ranges above it ([`crate::offsets::StoredOffset`]). It is taken when
//!   the writer reached the commit, after every write of the transaction was reported, so the
//!   offsets match the writes exactly.
//! - On commit, provisional notifications become satisfied and the caches are filled (caches
//!   are filled only from durable acknowledgements).
//! - On abort (or a failed commit), provisional notifications become unsatisfied again and
//!   their keys get pending entries again: they are fetched again. Caches are untouched.
//! - An assignment that ends drops its provisional notifications with it.
//! - A new assignment starts from what the sink stored ([`Engine::start_from_stored`]): records
//!   below the stored offset and in its ranges are satisfied on arrival, so a restart or a new
//!   owner never covers an offset twice.

use std::time::Duration;

use crate::acked::Acked;
use crate::assignment::Assignment;
use crate::clock::Tick;
use crate::coalesce::{KeyState, Pending, Phase};
use crate::key::EntityKey;
use crate::offsets::StoredOffset;
use crate::partitions::PartRef;
use crate::sink::{Change, OffsetStore};

use super::{Engine, RefreshOutcome, WriteResult};

/// What a committed write puts in the acknowledged cache.
#[derive(Debug, Clone)]
enum CacheUpdate {
    Put(Acked),
    Forget,
}

/// A write the sink holds in its open transaction.
#[derive(Debug)]
struct ProvisionalWrite {
    key: EntityKey,
    /// The notifications it satisfies once the transaction commits.
    batch: Pending,
    cache: CacheUpdate,
}

/// The engine's transaction state.
#[derive(Debug)]
pub(crate) struct Transactions {
    store: OffsetStore,
    /// The transaction writes join now (commits and aborts since the start).
    open: u64,
    writes: Vec<ProvisionalWrite>,
    /// When the open transaction got its first provisional write.
    since: Option<Tick>,
    max_ranges: usize,
    /// The open transaction holds writes of an assignment that ended: it must not commit (the
    /// partition's next owner writes them again), only abort.
    doomed: bool,
}

/// What a transaction commit should store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransactionPlan {
    /// The transaction the plan is for.
    pub transaction: u64,
    /// Per current assignment whose stored offset changed: what to store.
    pub offsets: Vec<(Assignment, StoredOffset)>,
    /// Provisional writes the transaction holds.
    pub writes: usize,
    /// Every entry's ranges fit the sink's limit (see [`crate::Sink::max_stored_ranges`]).
    pub fits: bool,
    /// The transaction holds writes of an assignment that ended (revoked past its drain
    /// deadline, or lost): it must abort, not commit, since the partition's next owner writes
    /// them again.
    pub must_abort: bool,
}

impl TransactionPlan {
    /// Is there anything to commit?
    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty() && self.writes == 0
    }
}

impl Engine {
    /// Work with a transactional sink that stores offsets in `store`, holding at most
    /// `max_ranges` satisfied ranges per partition entry. Call before the first assignment.
    pub fn enable_transactions(&mut self, store: OffsetStore, max_ranges: usize) {
        self.txn = Some(Transactions {
            store,
            open: 0,
            writes: Vec::new(),
            since: None,
            max_ranges: max_ranges.max(1),
            doomed: false,
        });
    }

    /// Where the transactional sink stores offsets, if the engine works with one.
    pub fn offset_store(&self) -> Option<OffsetStore> {
        self.txn.as_ref().map(|t| t.store)
    }

    /// The transaction writes join now (`None` without a transactional sink).
    pub fn open_transaction(&self) -> Option<u64> {
        self.txn.as_ref().map(|t| t.open)
    }

    /// Provisional writes in the open transaction.
    pub fn provisional_writes(&self) -> usize {
        self.txn.as_ref().map_or(0, |t| t.writes.len())
    }

    /// How long the open transaction has held provisional writes.
    pub fn transaction_age(&self, now: Tick) -> Option<Duration> {
        let since = self.txn.as_ref()?.since?;
        Some(now.since(since))
    }

    /// A new assignment starts from what the sink stored for it: records below the stored
    /// offset and in its ranges are satisfied on arrival. Ignored unless `a` is current.
    pub fn start_from_stored(&mut self, a: &Assignment, stored: StoredOffset) {
        if let Some(p) = self
            .parts
            .current(a)
            .and_then(|r| self.parts.resolve_mut(r))
        {
            tracing::debug!(assignment = %a, offset = stored.offset, ranges = stored.covered.len(),
                "starting from the offset the sink stored");
            p.tracker.start_from(stored);
        }
    }

    /// A write of a transactional sink ended in transaction `txn`. A durable write is
    /// provisional until that transaction commits; a durable write in a transaction that ended
    /// already (aborted) satisfies nothing: its notifications are fetched again.
    pub fn on_transactional_write_done(
        &mut self,
        key: &EntityKey,
        flight: u64,
        result: WriteResult,
        txn: u64,
        now: Tick,
    ) {
        let Some(open) = self.txn.as_ref().map(|t| t.open) else {
            self.on_write_done(key, flight, result, now);
            return;
        };
        if !matches!(result, WriteResult::Durable) {
            self.on_write_done(key, flight, result, now);
            return;
        }
        let Some(id) = self.keys.find(key) else {
            return;
        };
        let Some(f) = self.keys.get(id).and_then(|e| e.state.flight.as_ref()) else {
            return;
        };
        if f.id != flight || f.phase != Phase::Writing {
            return;
        }
        let held = Self::held_of(&f.batch.notes);
        self.parts.release(&held);
        if f.abandoned {
            self.abandon_flight(id, now);
            return;
        }
        let cache = {
            let (version, validators) = match (&f.change, &f.validators) {
                (Some(Change::Upsert { entity, .. }), v) => (entity.version, v.clone()),
                _ => (None, None),
            };
            let deleted = matches!(f.change, Some(Change::Delete { .. }));
            let owner = self.owner_of(id);
            if deleted {
                match f.batch.max_version {
                    Some(v) => CacheUpdate::Put(Acked {
                        version: Some(v),
                        validators: None,
                        deleted: true,
                        owner,
                    }),
                    None => CacheUpdate::Forget,
                }
            } else {
                CacheUpdate::Put(Acked {
                    version,
                    validators,
                    deleted: false,
                    owner,
                })
            }
        };
        self.counters.add_write_durable();
        let Some(f) = self.keys.take_flight(id) else {
            return;
        };
        if let Some(e) = self.keys.get_mut(id) {
            e.state.clear_retry();
        }
        let action = f.action;
        let batch = f.batch;
        if txn == open {
            for n in &batch.notes {
                if !n.is_refresh() {
                    if let Some(p) = self.parts.resolve_mut(n.part) {
                        p.tracker.provisional(n.offset);
                    }
                }
            }
            if let Some(t) = &mut self.txn {
                t.since.get_or_insert(now);
                t.writes.push(ProvisionalWrite {
                    key: key.clone(),
                    batch,
                    cache,
                });
            }
        } else {
            tracing::debug!(key = %key, flight, txn, open, "write landed in an aborted transaction: fetching again");
            crate::metrics::transaction_refetched(batch.notes.len());
            self.pend_again(key.clone(), batch, now);
        }
        if let Some(a) = action {
            self.action_member_ended(key, a, false, now);
        }
        self.after_flight(id, now);
    }

    /// What the open transaction should commit now. Includes assignments being revoked (their
    /// transaction commits before they go).
    pub fn transaction_plan(&self) -> TransactionPlan {
        let Some(t) = &self.txn else {
            return TransactionPlan::default();
        };
        let mut offsets = Vec::new();
        let mut fits = true;
        for p in self.parts.iter() {
            if let Some(s) = p.tracker.pending_store() {
                fits &= s.covered.len() <= t.max_ranges;
                offsets.push((p.assignment.clone(), s));
            }
        }
        TransactionPlan {
            transaction: t.open,
            offsets,
            writes: t.writes.len(),
            fits,
            must_abort: t.doomed,
        }
    }

    /// Transaction `txn` committed with `offsets` stored: its provisional notifications are
    /// satisfied and the caches filled with what its writes acknowledged.
    pub fn transaction_committed(
        &mut self,
        txn: u64,
        offsets: &[(Assignment, StoredOffset)],
        now: Tick,
    ) {
        let Some(t) = &mut self.txn else {
            return;
        };
        if t.open != txn {
            tracing::warn!(
                txn,
                open = t.open,
                "commit of a transaction that is not open; ignored"
            );
            return;
        }
        t.open += 1;
        t.since = None;
        t.doomed = false;
        let writes = std::mem::take(&mut t.writes);
        for w in writes {
            match w.cache {
                CacheUpdate::Put(acked) => self.acked.put(w.key, acked),
                CacheUpdate::Forget => self.acked.forget(&w.key),
            }
            self.latency.record(now.since(w.batch.first_at));
            crate::metrics::latency(now.since(w.batch.first_at));
            for n in &w.batch.notes {
                self.satisfy(n, RefreshOutcome::Done);
            }
        }
        for (a, s) in offsets {
            if let Some(p) = self
                .parts
                .current(a)
                .and_then(|r| self.parts.resolve_mut(r))
            {
                p.tracker.stored(s.clone());
            }
        }
        self.counters.transactions_committed += 1;
        crate::metrics::transaction("committed");
    }

    /// Transaction `txn` aborted (or its commit failed): its provisional notifications are open
    /// again and their keys are fetched again. Caches are untouched.
    pub fn transaction_aborted(&mut self, txn: u64, now: Tick) {
        let Some(t) = &mut self.txn else {
            return;
        };
        if t.open != txn {
            tracing::warn!(
                txn,
                open = t.open,
                "abort of a transaction that is not open; ignored"
            );
            return;
        }
        t.open += 1;
        t.since = None;
        t.doomed = false;
        let writes = std::mem::take(&mut t.writes);
        let notes: usize = writes.iter().map(|w| w.batch.notes.len()).sum();
        self.counters.transactions_aborted += 1;
        crate::metrics::transaction("aborted");
        crate::metrics::transaction_refetched(notes);
        for w in writes {
            for n in &w.batch.notes {
                if !n.is_refresh() {
                    if let Some(p) = self.parts.resolve_mut(n.part) {
                        p.tracker.revert(n.offset);
                    }
                }
            }
            self.pend_again(w.key, w.batch, now);
        }
    }

    /// Give `batch`'s notifications (those still live) to `key` again as pending, due now.
    fn pend_again(&mut self, key: EntityKey, mut batch: Pending, now: Tick) {
        batch
            .notes
            .retain(|n| n.is_refresh() || self.parts.resolve(n.part).is_some());
        if batch.notes.is_empty() {
            return;
        }
        batch.deadline = now;
        let id = match self.keys.find(&key) {
            Some(id) => {
                let Some(entry) = self.keys.get_mut(id) else {
                    return;
                };
                match &mut entry.state.pending {
                    Some(p) => {
                        p.absorb(batch);
                        p.deadline = p.deadline.min(now);
                    }
                    None => entry.state.pending = Some(batch),
                }
                id
            }
            None => self.keys.insert(key, KeyState::with_pending(batch)),
        };
        self.keys.schedule(id);
    }

    /// Assignments ended: drop their provisional notifications. If the open transaction held
    /// any, it must abort: committing it would commit writes whose offsets the partition's next
    /// owner reads (and writes) again.
    pub(super) fn forget_provisional_of(&mut self, refs: &[PartRef]) {
        let Some(t) = &mut self.txn else {
            return;
        };
        for w in &mut t.writes {
            let before = w.batch.notes.len();
            w.batch.notes.retain(|n| !refs.contains(&n.part));
            if w.batch.notes.len() != before {
                t.doomed = true;
            }
        }
        if t.doomed {
            tracing::warn!(
                "an assignment ended while the open transaction held its writes: the transaction aborts"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::assignment::{Epoch, TopicPartition};
    use crate::clock::Tick;
    use crate::config::EngineConfig;
    use crate::decode::{JsonDecoder, RecordView};
    use crate::engine::{Action, Decoders, FetchResult};
    use crate::fetch::{Entity, FetchOutcome};
    use crate::key::Version;

    fn engine() -> (Engine, Assignment) {
        let cfg = EngineConfig {
            window: Duration::from_millis(10),
            max_wait: Duration::from_millis(100),
            ..EngineConfig::default()
        };
        let decoders =
            Decoders::new().default_decoder(Arc::new(JsonDecoder::fixed_type("customer", "/id")));
        let mut e = Engine::new(cfg, decoders, Box::new(|_: &str| true), false);
        e.enable_transactions(OffsetStore::Sink, 10);
        let a = Assignment::new(TopicPartition::new("t", 0), Epoch(1));
        e.assign(std::slice::from_ref(&a));
        (e, a)
    }

    fn record(e: &mut Engine, offset: i64, id: &str, now: Tick) {
        let payload = format!(r#"{{"id":"{id}"}}"#);
        e.on_record(
            &RecordView {
                topic: "t",
                partition: 0,
                offset,
                key: None,
                payload: Some(payload.as_bytes()),
                headers: &[],
                timestamp: None,
            },
            now,
        );
    }

    /// Poll until the key's fetch and write are issued; returns the flight.
    fn fetch_and_write(e: &mut Engine, now: Tick) -> (EntityKey, u64) {
        e.poll(now);
        let Some(Action::Fetch(job)) = e.take_actions().into_iter().next() else {
            panic!("a fetch");
        };
        let key = job.request.key.clone();
        e.on_fetch_done(
            &key,
            job.flight,
            FetchResult::Outcome(FetchOutcome::Found(Entity::json(
                "{}",
                Some(Version::Int(1)),
            ))),
            now,
        );
        let writes: Vec<Action> = e.take_actions();
        assert!(
            writes.iter().any(|a| matches!(a, Action::Write(_))),
            "a write: {writes:?}"
        );
        (key, job.flight)
    }

    #[test]
    fn a_durable_write_is_provisional_until_its_transaction_commits() {
        let (mut e, a) = engine();
        record(&mut e, 0, "c1", Tick(0));
        let (key, flight) = fetch_and_write(&mut e, Tick(50));
        e.on_transactional_write_done(&key, flight, WriteResult::Durable, 0, Tick(60));
        let plan = e.transaction_plan();
        assert_eq!(plan.writes, 1);
        assert_eq!(plan.offsets, vec![(a.clone(), StoredOffset::at(1))]);
        assert_eq!(
            e.commits(),
            vec![(a.clone(), 0)],
            "a provisional offset holds the group commit"
        );
        e.transaction_committed(0, &plan.offsets, Tick(70));
        assert_eq!(e.commits(), vec![(a.clone(), 1)]);
        assert_eq!(e.transaction_plan().offsets, vec![], "stored already");
        assert_eq!(e.open_transaction(), Some(1));
    }

    #[test]
    fn a_write_in_a_transaction_that_ended_already_is_fetched_again() {
        let (mut e, a) = engine();
        record(&mut e, 0, "c1", Tick(0));
        let (key, flight) = fetch_and_write(&mut e, Tick(50));
        // The writer aborted transaction 0 before it reported this write (a later unit of the
        // batch failed): the write is in the aborted transaction.
        e.transaction_aborted(0, Tick(55));
        e.on_transactional_write_done(&key, flight, WriteResult::Durable, 0, Tick(60));
        assert_eq!(e.transaction_plan().writes, 0);
        assert_eq!(e.commits(), vec![(a, 0)]);
        e.poll(Tick(60));
        assert!(
            e.take_actions()
                .iter()
                .any(|x| matches!(x, Action::Fetch(j) if j.request.key == key)),
            "fetched again"
        );
    }

    #[test]
    fn an_abort_fetches_again_and_an_ended_assignment_dooms_the_transaction() {
        let (mut e, a) = engine();
        record(&mut e, 0, "c1", Tick(0));
        let (key, flight) = fetch_and_write(&mut e, Tick(50));
        e.on_transactional_write_done(&key, flight, WriteResult::Durable, 0, Tick(60));
        e.transaction_aborted(0, Tick(70));
        assert_eq!(e.pending_keys(), 1, "pending again");
        let (key, flight) = fetch_and_write(&mut e, Tick(80));
        e.on_transactional_write_done(&key, flight, WriteResult::Durable, 1, Tick(90));
        assert!(!e.transaction_plan().must_abort);
        e.lose(std::slice::from_ref(&a));
        let plan = e.transaction_plan();
        assert!(
            plan.must_abort,
            "the transaction holds a write of the lost assignment"
        );
        e.transaction_aborted(1, Tick(100));
        assert!(!e.transaction_plan().must_abort);
        assert_eq!(e.pending_keys(), 0, "the lost assignment's notes are gone");
    }
}
