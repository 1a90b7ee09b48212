//! Property tests of the engine's state machine against a reference model.
//!
//! Random interleavings of notifications (with and without versions, with offset gaps), fetch
//! completions (current, stale, failing), sink acknowledgements and failures, dead-letter
//! acknowledgements, clock advances, revokes (instant, or begun and finished later with writes
//! still in flight), losses during writes, partitions assigned back before their revoke finished,
//! commits queued before a revoke and delivered after it, and re-assignments with redelivery from
//! the committed offset. The model plays the consumer driver (epochs, the epoch check on commits,
//! a broker that accepts any commit it is sent) and the dispatcher (a job whose fence ended is
//! dropped, never applied). It decides, for every delivered notification, whether it is
//! satisfied (design notes, rules (a)-(c)); the checks are:
//! - commit safety: a commit point never passes a delivered notification of the current
//!   assignment that the model does not consider satisfied (so completions of an older
//!   assignment cannot move offsets: they started before the redelivery);
//! - single flight: at most one fetch or write per key at a time, writes in flight order;
//! - convergence: after the input stops and every job succeeds, each partition's commit point
//!   reaches the end of what it received, and every key's last notification was followed by a
//!   fetch that started after it (or is satisfied by version or by a dead letter);
//! - no zombie writes: the sink is last-write-wins (it does not guard on version), and no write
//!   lands after a write of the same key whose fetch started later;
//! - the broker's committed offset of a partition never moves backwards.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use proptest::prelude::*;
use refetch::clock::Tick;
use refetch::decode::{JsonDecoder, RecordView};
use refetch::engine::{Action, Decoders, Engine, FetchResult, TopicPartition, WriteResult};
use refetch::{
    Assignment, Change, EngineConfig, Entity, Epoch, Fence, FetchError, FetchOutcome, SinkError,
    Version, VersionKind,
};

const TOPIC: &str = "notes";
const PARTITIONS: i32 = 2;
const KEYS: usize = 4;

#[derive(Debug, Clone)]
enum Op {
    /// A source change of key `key` and its notification on `partition` (versioned or not),
    /// skipping `gap` offsets first.
    Notify {
        key: usize,
        partition: i32,
        versioned: bool,
        gap: u8,
    },
    Advance(u16),
    Poll,
    FinishFetch {
        pick: usize,
        how: FetchHow,
    },
    FinishWrite {
        pick: usize,
        how: WriteHow,
    },
    AckDeadLetter(usize),
    Commit,
    Revoke(i32),
    Lose(i32),
    /// A revoke begins: the engine drains; the partition is let go by `RevokeFinish`.
    RevokeBegin(i32),
    /// The revoke's deadline passed (writes may still be in flight): the engine answers, the
    /// offsets are committed, the partition is let go and assigned back in a new epoch.
    RevokeFinish(i32),
    /// The handler gave up on a revoke and the partition is assigned straight back, before the
    /// engine finished the old revoke (which finishes late, on the old epoch).
    AssignBack(i32),
    /// A periodic commit is computed and queued in the driver.
    QueueCommit,
    /// The driver takes the oldest queued commit (dropping entries of assignments no longer
    /// current) and the broker applies it.
    DeliverCommit,
}

#[derive(Debug, Clone, Copy)]
enum FetchHow {
    Current,
    Stale,
    Transient,
    Permanent,
}

#[derive(Debug, Clone, Copy)]
enum WriteHow {
    Durable,
    Transient,
    Permanent,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..KEYS, 0..PARTITIONS, any::<bool>(), 0u8..3)
            .prop_map(|(key, partition, versioned, gap)| Op::Notify { key, partition, versioned, gap }),
        3 => (1u16..40).prop_map(Op::Advance),
        3 => Just(Op::Poll),
        4 => (any::<usize>(), prop_oneof![
                6 => Just(FetchHow::Current), 1 => Just(FetchHow::Stale),
                2 => Just(FetchHow::Transient), 1 => Just(FetchHow::Permanent)])
            .prop_map(|(pick, how)| Op::FinishFetch { pick, how }),
        4 => (any::<usize>(), prop_oneof![
                6 => Just(WriteHow::Durable), 2 => Just(WriteHow::Transient), 1 => Just(WriteHow::Permanent)])
            .prop_map(|(pick, how)| Op::FinishWrite { pick, how }),
        2 => any::<usize>().prop_map(Op::AckDeadLetter),
        2 => Just(Op::Commit),
        1 => (0..PARTITIONS).prop_map(Op::Revoke),
        1 => (0..PARTITIONS).prop_map(Op::Lose),
        1 => (0..PARTITIONS).prop_map(Op::RevokeBegin),
        1 => (0..PARTITIONS).prop_map(Op::RevokeFinish),
        1 => (0..PARTITIONS).prop_map(Op::AssignBack),
        2 => Just(Op::QueueCommit),
        2 => Just(Op::DeliverCommit),
    ]
}

/// One delivery of a notification (a redelivery after a rebalance is another delivery).
#[derive(Debug, Clone)]
struct Delivery {
    key: usize,
    partition: i32,
    offset: i64,
    version: Option<i64>,
    /// Model time of receipt (a strictly increasing step counter).
    seq: u64,
    /// The epoch of the partition's assignment when delivered.
    generation: Epoch,
}

#[derive(Debug, Clone)]
struct OpenFetch {
    flight: u64,
    key: usize,
    started: u64,
    version_at_start: i64,
    fence: Fence,
}

#[derive(Debug, Clone)]
struct OpenWrite {
    flight: u64,
    key: usize,
    started: u64,
    version: i64,
    change: Change,
    fence: Fence,
}

struct World {
    engine: Engine,
    now: u64,
    seq: u64,
    /// The log per partition: (offset, key, version).
    log: BTreeMap<i32, Vec<(i64, usize, Option<i64>)>>,
    /// The broker's committed offset per partition.
    committed: BTreeMap<i32, i64>,
    /// Next offset to deliver per owned partition.
    position: BTreeMap<i32, i64>,
    /// The driver's current epoch per owned partition.
    generation: BTreeMap<i32, Epoch>,
    next_epoch: u64,
    /// Revokes begun and not finished: the assignment being revoked.
    revoking: BTreeMap<i32, Assignment>,
    /// Commits queued in the driver.
    queued_commits: Vec<Vec<(Assignment, i64)>>,
    /// The last-write-wins sink: per key, the fetch start and version of the last write applied.
    sink: HashMap<usize, (u64, i64)>,
    /// Handovers so far (every other one, the other member also commits the partition's end).
    handovers: u32,
    source_version: Vec<i64>,
    deliveries: Vec<Delivery>,
    fetches: Vec<OpenFetch>,
    writes: Vec<OpenWrite>,
    dead_letters: Vec<(u64, Vec<(i32, i64)>)>,
    /// Durable writes: (key, fetch start seq, version).
    durable: Vec<(usize, u64, i64)>,
    /// Acknowledged dead letters: (partition, offset).
    dead_lettered: HashSet<(i32, i64)>,
    /// Flight ids started per key, in order, and the last written flight per key.
    last_written_flight: HashMap<usize, u64>,
    /// Flights per key whose fetch started (for ordering checks).
    flight_started: HashMap<u64, (usize, u64, i64)>,
}

fn key_name(k: usize) -> String {
    format!("k{k}")
}

fn key_index(id: &str) -> usize {
    id.trim_start_matches('k').parse().unwrap_or(usize::MAX)
}

impl World {
    fn new() -> Self {
        let cfg = EngineConfig {
            window: std::time::Duration::from_millis(10),
            max_wait: std::time::Duration::from_millis(50),
            retry_budget: 3,
            sink_record_budget: 3,
            fetch_concurrency: 3,
            ..EngineConfig::default()
        };
        let decoder = JsonDecoder::fixed_type("c", "/id").with_version("/v", VersionKind::Integer);
        let engine = Engine::new(
            cfg,
            Decoders::new().default_decoder(Arc::new(decoder)),
            Box::new(|_| true),
            false,
        );
        let mut w = World {
            engine,
            now: 0,
            seq: 0,
            log: BTreeMap::new(),
            committed: BTreeMap::new(),
            position: BTreeMap::new(),
            generation: BTreeMap::new(),
            next_epoch: 1,
            revoking: BTreeMap::new(),
            queued_commits: Vec::new(),
            sink: HashMap::new(),
            handovers: 0,
            source_version: vec![0; KEYS],
            deliveries: Vec::new(),
            fetches: Vec::new(),
            writes: Vec::new(),
            dead_letters: Vec::new(),
            durable: Vec::new(),
            dead_lettered: HashSet::new(),
            last_written_flight: HashMap::new(),
            flight_started: HashMap::new(),
        };
        for p in 0..PARTITIONS {
            w.assign(p);
        }
        w
    }

    fn op_notify(key: usize, partition: i32) -> Op {
        Op::Notify {
            key,
            partition,
            versioned: false,
            gap: 0,
        }
    }

    fn tick(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn assignment(&self, p: i32) -> Option<Assignment> {
        self.generation
            .get(&p)
            .map(|e| Assignment::new(TopicPartition::new(TOPIC, p), *e))
    }

    fn assign(&mut self, p: i32) {
        let epoch = Epoch(self.next_epoch);
        self.next_epoch += 1;
        self.generation.insert(p, epoch);
        self.engine
            .assign(&[Assignment::new(TopicPartition::new(TOPIC, p), epoch)]);
        let from = self.committed.get(&p).copied().unwrap_or(0);
        self.position.insert(p, from);
        self.deliver(p);
    }

    /// The broker applies a commit: offsets of a partition never move backwards.
    fn broker_commit(&mut self, p: i32, offset: i64) {
        if let Some(prev) = self.committed.get(&p) {
            assert!(
                offset >= *prev,
                "committed offset of partition {p} moved backwards from {prev} to {offset}"
            );
        }
        self.committed.insert(p, offset);
    }

    /// Check a commit the engine computed for assignment `a` against the model.
    fn check_commit(&self, a: &Assignment, offset: i64, what: &str) {
        let p = a.tp.partition;
        for d in self
            .deliveries
            .iter()
            .filter(|d| d.partition == p && d.generation == a.epoch)
        {
            if d.offset < offset {
                assert!(
                    self.satisfied(d),
                    "{what} {offset} on partition {p} passes unsatisfied {d:?}"
                );
            }
        }
    }

    /// Deliver every logged record from the position on (what the broker would send).
    fn deliver(&mut self, p: i32) {
        let Some(pos) = self.position.get(&p).copied() else {
            return;
        };
        let records: Vec<(i64, usize, Option<i64>)> = self
            .log
            .get(&p)
            .map(|l| l.iter().filter(|r| r.0 >= pos).cloned().collect())
            .unwrap_or_default();
        for (offset, key, version) in records {
            let payload = match version {
                Some(v) => format!(r#"{{"id":"{}","v":{v}}}"#, key_name(key)),
                None => format!(r#"{{"id":"{}"}}"#, key_name(key)),
            };
            let seq = self.tick();
            let view = RecordView {
                topic: TOPIC,
                partition: p,
                offset,
                key: None,
                payload: Some(payload.as_bytes()),
                headers: &[],
                timestamp: None,
            };
            self.engine.on_record(&view, Tick(self.now));
            self.deliveries.push(Delivery {
                key,
                partition: p,
                offset,
                version,
                seq,
                generation: self.generation[&p],
            });
            self.position.insert(p, offset + 1);
        }
    }

    fn collect_actions(&mut self) {
        for a in self.engine.take_actions() {
            match a {
                Action::Fetch(j) => {
                    let key = key_index(j.request.key.id());
                    assert!(
                        !self.fetches.iter().any(|f| f.key == key)
                            && !self.writes.iter().any(|w| w.key == key),
                        "single flight violated for key {key}"
                    );
                    let started = self.tick();
                    let v = self.source_version[key];
                    self.flight_started.insert(j.flight, (key, started, v));
                    self.fetches.push(OpenFetch {
                        flight: j.flight,
                        key,
                        started,
                        version_at_start: v,
                        fence: j.fence,
                    });
                }
                Action::Write(j) => {
                    let key = key_index(j.change.key().id());
                    let (_, started, _) = self.flight_started[&j.flight];
                    if let Some(prev) = self.last_written_flight.get(&key) {
                        assert!(
                            *prev <= j.flight,
                            "writes for key {key} out of flight order"
                        );
                    }
                    self.last_written_flight.insert(key, j.flight);
                    assert!(
                        !self.writes.iter().any(|w| w.key == key),
                        "two writes in flight for key {key}"
                    );
                    let version = j.change.version().map_or(-1, |v| v.value());
                    assert!(
                        j.fence.is_live(),
                        "a write was issued for assignments that ended (a zombie write) for key {key}"
                    );
                    self.writes.push(OpenWrite {
                        flight: j.flight,
                        key,
                        started,
                        version,
                        change: j.change,
                        fence: j.fence,
                    });
                }
                Action::DeadLetter(j) => {
                    let mut coords = Vec::new();
                    let payload: serde_json::Value =
                        serde_json::from_slice(j.record.payload.as_deref().unwrap_or(b"{}"))
                            .unwrap_or_default();
                    if let Some(ns) = payload.get("notifications").and_then(|n| n.as_array()) {
                        for n in ns {
                            coords.push((
                                n["partition"].as_i64().unwrap_or(-1) as i32,
                                n["offset"].as_i64().unwrap_or(-1),
                            ));
                        }
                    }
                    self.dead_letters.push((j.id, coords));
                }
            }
        }
    }

    fn satisfied(&self, d: &Delivery) -> bool {
        let by_fetch = self.durable.iter().any(|(k, started, v)| {
            *k == d.key && *started > d.seq && d.version.is_none_or(|nv| *v >= nv)
        });
        let by_version = d
            .version
            .is_some_and(|nv| self.durable.iter().any(|(k, _, v)| *k == d.key && *v >= nv));
        by_fetch || by_version || self.dead_lettered.contains(&(d.partition, d.offset))
    }

    /// A periodic commit, computed and applied at once.
    fn check_commits(&mut self) {
        let commits = self.engine.commits();
        for (a, offset) in &commits {
            self.check_commit(a, *offset, "commit");
        }
        self.apply_commit(commits);
    }

    /// The driver's side of a commit: drop entries whose assignment is not current, the
    /// broker applies the rest, and the engine hears which reached it.
    fn apply_commit(&mut self, commits: Vec<(Assignment, i64)>) {
        for (a, offset) in commits {
            let current = self.generation.get(&a.tp.partition) == Some(&a.epoch)
                && !self.revoking.contains_key(&a.tp.partition);
            if !current {
                continue;
            }
            self.broker_commit(a.tp.partition, offset);
            self.engine.committed(&a, offset);
        }
    }

    /// The engine answered a revoke of `a`: commit its offsets, let the partition go.
    fn finish_revoke(&mut self, a: &Assignment) {
        let offsets = self.engine.revoke_finish(std::slice::from_ref(a));
        for (b, offset) in offsets {
            assert!(b.same(a), "a revoke answered for another assignment: {b:?}");
            self.check_commit(&b, offset, "revoke commit");
            // Still owned until the handler returns: this commit reaches the broker.
            if self.generation.get(&b.tp.partition) == Some(&b.epoch) {
                self.broker_commit(b.tp.partition, offset);
            }
        }
    }

    /// Our assignment of `p` ended: another member of the group takes the partition over,
    /// fetches every key it carries and writes the current state (and, every other time,
    /// commits the partition's end) before the partition comes back to us. A write of ours that
    /// lands after this is a zombie write.
    ///
    /// Only keys whose every notification is on `p` are written by the other member: per-key
    /// order across instances is promised only for keys that live on one partition (design
    /// notes, invariant 10).
    fn hand_over(&mut self, p: i32) {
        self.handovers += 1;
        let elsewhere: HashSet<usize> = self
            .log
            .iter()
            .filter(|(q, _)| **q != p)
            .flat_map(|(_, l)| l.iter().map(|r| r.1))
            .collect();
        let keys: HashSet<usize> = self
            .log
            .get(&p)
            .map(|l| {
                l.iter()
                    .map(|r| r.1)
                    .filter(|k| !elsewhere.contains(k))
                    .collect()
            })
            .unwrap_or_default();
        for key in keys {
            let started = self.tick();
            self.sink.insert(key, (started, self.source_version[key]));
        }
        if self.handovers % 2 == 0 {
            if let Some(end) = self.log.get(&p).and_then(|l| l.last()).map(|r| r.0 + 1) {
                if self.committed.get(&p).is_none_or(|c| *c < end) {
                    self.broker_commit(p, end);
                }
            }
        }
    }

    /// Complete a fetch the way the dispatcher would: a fetch whose fence ended is abandoned.
    fn finish_fetch(&mut self, f: OpenFetch, result: FetchResult) {
        let key = refetch::EntityKey::new("c", key_name(f.key));
        let result = if f.fence.is_live() {
            result
        } else {
            FetchResult::Abandoned
        };
        self.engine
            .on_fetch_done(&key, f.flight, result, Tick(self.now));
        self.collect_actions();
    }

    /// Complete a write the way the dispatcher would: a write whose fence ended is dropped (not
    /// applied to the sink) and reported abandoned.
    fn finish_write(&mut self, w: OpenWrite, result: WriteResult) {
        let key = w.change.key().clone();
        let result = if !w.fence.is_live() {
            WriteResult::Abandoned
        } else {
            if matches!(result, WriteResult::Durable) {
                self.durable.push((w.key, w.started, w.version));
                if let Some((held_start, held_version)) = self.sink.get(&w.key) {
                    assert!(
                        w.started >= *held_start,
                        "zombie write: key {} fetched at {} (version {}) lands after a write fetched at {held_start} (version {held_version})",
                        w.key,
                        w.started,
                        w.version
                    );
                }
                self.sink.insert(w.key, (w.started, w.version));
            }
            result
        };
        self.engine
            .on_write_done(&key, w.flight, result, Tick(self.now));
        self.collect_actions();
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Notify {
                key,
                partition,
                versioned,
                gap,
            } => {
                self.source_version[key] += 1;
                let log = self.log.entry(partition).or_default();
                let offset = log.last().map_or(0, |r| r.0 + 1) + i64::from(gap);
                let v = versioned.then_some(self.source_version[key]);
                log.push((offset, key, v));
                self.deliver(partition);
            }
            Op::Advance(ms) => self.now += u64::from(ms),
            Op::Poll => {
                self.engine.poll(Tick(self.now));
                self.collect_actions();
            }
            Op::FinishFetch { pick, how } => {
                if self.fetches.is_empty() {
                    return;
                }
                let f = self.fetches.remove(pick % self.fetches.len());
                let result = match how {
                    FetchHow::Current => FetchResult::Outcome(FetchOutcome::Found(Entity::json(
                        "{}",
                        Some(Version::Int(f.version_at_start)),
                    ))),
                    FetchHow::Stale => FetchResult::Outcome(FetchOutcome::Found(Entity::json(
                        "{}",
                        Some(Version::Int(f.version_at_start - 1)),
                    ))),
                    FetchHow::Transient => FetchResult::Error(FetchError::transient("boom")),
                    FetchHow::Permanent => FetchResult::Error(FetchError::permanent("bad")),
                };
                if let (FetchHow::Stale, Some(entry)) =
                    (how, self.flight_started.get_mut(&f.flight))
                {
                    entry.2 = f.version_at_start - 1;
                }
                self.finish_fetch(f, result);
            }
            Op::FinishWrite { pick, how } => {
                if self.writes.is_empty() {
                    return;
                }
                let w = self.writes.remove(pick % self.writes.len());
                let result = match how {
                    WriteHow::Durable => WriteResult::Durable,
                    WriteHow::Transient => WriteResult::Failed(SinkError::transient("down")),
                    WriteHow::Permanent => WriteResult::Failed(SinkError::permanent("rejected")),
                };
                self.finish_write(w, result);
            }
            Op::AckDeadLetter(pick) => {
                if self.dead_letters.is_empty() {
                    return;
                }
                let (id, coords) = self.dead_letters.remove(pick % self.dead_letters.len());
                self.dead_lettered.extend(coords);
                self.engine.on_dead_letter_done(id, Ok(()));
                self.collect_actions();
            }
            Op::Commit => {
                // One commit in flight at a time, answered in order (as the runtime does).
                while !self.queued_commits.is_empty() {
                    self.apply(Op::DeliverCommit);
                }
                self.check_commits();
            }
            Op::Revoke(p) => {
                if self.revoking.contains_key(&p) {
                    return;
                }
                let Some(a) = self.assignment(p) else {
                    return;
                };
                self.engine.revoke_begin(std::slice::from_ref(&a));
                // The runtime would wait for pending writes of this partition (within its
                // deadline); here the deadline passes at once.
                self.finish_revoke(&a);
                self.generation.remove(&p);
                self.hand_over(p);
                self.assign(p);
            }
            Op::Lose(p) => {
                let Some(a) = self.assignment(p) else {
                    return;
                };
                self.revoking.remove(&p);
                self.engine.lose(std::slice::from_ref(&a));
                self.generation.remove(&p);
                self.hand_over(p);
                self.assign(p);
            }
            Op::RevokeBegin(p) => {
                if self.revoking.contains_key(&p) {
                    return;
                }
                let Some(a) = self.assignment(p) else {
                    return;
                };
                self.engine.revoke_begin(std::slice::from_ref(&a));
                self.revoking.insert(p, a);
            }
            Op::RevokeFinish(p) => {
                let Some(a) = self.revoking.remove(&p) else {
                    return;
                };
                self.finish_revoke(&a);
                if self.generation.get(&p) == Some(&a.epoch) {
                    self.generation.remove(&p);
                    self.hand_over(p);
                    self.assign(p);
                }
                self.collect_actions();
            }
            Op::AssignBack(p) => {
                // The handler gave up waiting: the partition is let go uncommitted and assigned
                // straight back; the engine's old revoke is still pending and finishes later.
                if !self.revoking.contains_key(&p) {
                    return;
                }
                self.generation.remove(&p);
                self.hand_over(p);
                self.assign(p);
                self.collect_actions();
            }
            Op::QueueCommit => {
                if !self.queued_commits.is_empty() {
                    return;
                }
                let commits = self.engine.commits();
                for (a, offset) in &commits {
                    self.check_commit(a, *offset, "queued commit");
                }
                if !commits.is_empty() {
                    self.queued_commits.push(commits);
                }
            }
            Op::DeliverCommit => {
                if self.queued_commits.is_empty() {
                    return;
                }
                let commits = self.queued_commits.remove(0);
                self.apply_commit(commits);
            }
        }
    }

    /// Input stops; every job now succeeds until nothing is left.
    fn drain(&mut self) {
        // Pending revokes finish; queued commits are delivered (or dropped as stale).
        let revoking: Vec<i32> = self.revoking.keys().copied().collect();
        for p in revoking {
            self.apply(Op::RevokeFinish(p));
        }
        while !self.queued_commits.is_empty() {
            self.apply(Op::DeliverCommit);
        }
        for _ in 0..10_000 {
            self.now += 100;
            self.engine.poll(Tick(self.now));
            self.collect_actions();
            let mut progressed = false;
            while let Some(f) = self.fetches.pop() {
                progressed = true;
                let v = self.source_version[f.key];
                self.flight_started.insert(f.flight, (f.key, f.started, v));
                let result = FetchResult::Outcome(FetchOutcome::Found(Entity::json(
                    "{}",
                    Some(Version::Int(f.version_at_start)),
                )));
                self.finish_fetch(f, result);
            }
            while let Some(w) = self.writes.pop() {
                progressed = true;
                self.finish_write(w, WriteResult::Durable);
            }
            while let Some((id, coords)) = self.dead_letters.pop() {
                progressed = true;
                self.dead_lettered.extend(coords);
                self.engine.on_dead_letter_done(id, Ok(()));
                self.collect_actions();
            }
            self.apply(Op::Commit);
            if !progressed && self.engine.is_idle() {
                break;
            }
        }
        assert!(
            self.engine.is_idle(),
            "engine did not drain: {:?}",
            self.engine.status(Tick(self.now))
        );
        // Every partition committed up to the end of what it received in this assignment.
        for p in 0..PARTITIONS {
            let end = self.log.get(&p).and_then(|l| l.last()).map(|r| r.0 + 1);
            if let Some(end) = end {
                assert_eq!(
                    self.committed.get(&p).copied(),
                    Some(end),
                    "partition {p} not committed to its end"
                );
            }
        }
        // Every current-assignment delivery is satisfied; the last of each key by a fetch after it
        // (or by version or dead letter).
        for d in &self.deliveries {
            if Some(&d.generation) == self.generation.get(&d.partition) {
                assert!(self.satisfied(d), "unsatisfied after drain: {d:?}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, .. ProptestConfig::default() })]

    #[test]
    fn engine_keeps_commit_safety_single_flight_and_convergence(ops in proptest::collection::vec(op(), 1..120)) {
        let mut w = World::new();
        for op in ops {
            w.apply(op);
        }
        w.drain();
    }
}

/// A focused scenario: a notification arriving while its key's fetch is in flight is not
/// satisfied by that fetch; a follow-up fetch starts after the first write.
#[test]
fn notification_during_flight_starts_a_follow_up() {
    let mut w = World::new();
    w.apply(Op::Notify {
        key: 0,
        partition: 0,
        versioned: false,
        gap: 0,
    });
    w.apply(Op::Advance(20));
    w.apply(Op::Poll);
    assert_eq!(w.fetches.len(), 1);
    // The source changes again while the fetch is in flight.
    w.apply(Op::Notify {
        key: 0,
        partition: 0,
        versioned: false,
        gap: 0,
    });
    w.apply(Op::FinishFetch {
        pick: 0,
        how: FetchHow::Current,
    });
    w.apply(Op::FinishWrite {
        pick: 0,
        how: WriteHow::Durable,
    });
    // Offset 0 is satisfied, offset 1 is not: the commit point is 1.
    let commits = w.engine.commits();
    assert_eq!(commits.iter().map(|c| c.1).collect::<Vec<_>>(), vec![1]);
    w.apply(Op::Advance(20));
    w.apply(Op::Poll);
    assert_eq!(w.fetches.len(), 1, "a follow-up fetch must start");
    assert!(w.fetches[0].started > w.deliveries[1].seq);
    w.drain();
}

/// Stale reads (a replica behind the notified version) are retried, not written.
#[test]
fn stale_read_is_retried() {
    let mut w = World::new();
    w.apply(Op::Notify {
        key: 1,
        partition: 1,
        versioned: true,
        gap: 0,
    });
    w.apply(Op::Advance(20));
    w.apply(Op::Poll);
    w.apply(Op::FinishFetch {
        pick: 0,
        how: FetchHow::Stale,
    });
    assert!(w.writes.is_empty(), "a stale state must not be written");
    assert_eq!(w.engine.counters().stale_reads, 1);
    w.drain();
}

/// Invariant 10: a key whose notifications arrive on two partitions is counted.
#[test]
fn keys_seen_on_several_partitions_are_counted() {
    let mut w = World::new();
    w.apply(Op::Notify {
        key: 2,
        partition: 0,
        versioned: false,
        gap: 0,
    });
    w.apply(Op::Notify {
        key: 2,
        partition: 0,
        versioned: false,
        gap: 0,
    });
    assert_eq!(w.engine.counters().keys_on_several_partitions, 0);
    w.apply(Op::Notify {
        key: 2,
        partition: 1,
        versioned: false,
        gap: 0,
    });
    assert_eq!(w.engine.counters().keys_on_several_partitions, 1);
    w.drain();
}

/// A write waiting on a slow sink when the revoke's deadline passes: the partition goes to
/// another member, which writes the newer state; the old write must be dropped, not land after.
#[test]
fn a_revoke_deadline_passing_with_a_write_in_flight_fences_the_write() {
    let mut w = World::new();
    w.apply(World::op_notify(0, 0));
    w.apply(Op::Advance(20));
    w.apply(Op::Poll);
    w.apply(Op::FinishFetch {
        pick: 0,
        how: FetchHow::Current,
    });
    assert_eq!(w.writes.len(), 1, "the write is issued");
    w.apply(Op::RevokeBegin(0));
    w.apply(World::op_notify(0, 0)); // the source changes meanwhile
    w.apply(Op::RevokeFinish(0)); // the deadline passed with the write still pending
    assert!(
        w.writes.iter().all(|wr| !wr.fence.is_live()),
        "the old owner's write is fenced once its assignment ended"
    );
    w.apply(Op::FinishWrite {
        pick: 0,
        how: WriteHow::Durable,
    });
    w.drain();
}

/// Lost while a write is in flight: the same fence applies, with no commit at all.
#[test]
fn a_loss_during_a_write_fences_the_write() {
    let mut w = World::new();
    w.apply(World::op_notify(1, 1));
    w.apply(Op::Advance(20));
    w.apply(Op::Poll);
    w.apply(Op::FinishFetch {
        pick: 0,
        how: FetchHow::Current,
    });
    w.apply(World::op_notify(1, 1));
    w.apply(Op::Lose(1));
    assert!(w.writes.iter().all(|wr| !wr.fence.is_live()));
    w.apply(Op::FinishWrite {
        pick: 0,
        how: WriteHow::Durable,
    });
    w.drain();
}

/// The handler gave up on a revoke and the partition was assigned straight back: the old
/// revoke finishing late must not drop the new assignment (whose records would then be
/// ignored while the consumer looks healthy).
#[test]
fn a_partition_assigned_back_before_its_revoke_finished_keeps_its_new_assignment() {
    let mut w = World::new();
    w.apply(World::op_notify(2, 0));
    w.apply(Op::Advance(20));
    w.apply(Op::Poll);
    w.apply(Op::RevokeBegin(0));
    let old = w.revoking.get(&0).cloned();
    w.apply(Op::AssignBack(0));
    w.apply(World::op_notify(3, 0));
    // The engine finishes the old revoke now.
    if let Some(old) = old {
        let offsets = w.engine.revoke_finish(std::slice::from_ref(&old));
        assert!(
            offsets.is_empty(),
            "nothing to commit for a stale assignment"
        );
        w.revoking.remove(&0);
    }
    assert_eq!(
        w.engine.owned_partitions().len(),
        2,
        "the new assignment of partition 0 is still owned"
    );
    w.apply(World::op_notify(3, 0));
    w.drain();
}

/// A periodic commit queued before a revoke and delivered after it: the driver drops it (its
/// assignment is no longer current), so the committed offset never moves backwards.
#[test]
fn a_commit_queued_before_a_revoke_never_moves_the_offset_back() {
    let mut w = World::new();
    for _ in 0..3 {
        w.apply(World::op_notify(0, 0));
        w.apply(Op::Advance(20));
        w.apply(Op::Poll);
        w.apply(Op::FinishFetch {
            pick: 0,
            how: FetchHow::Current,
        });
        w.apply(Op::FinishWrite {
            pick: 0,
            how: WriteHow::Durable,
        });
        if w.queued_commits.is_empty() {
            w.apply(Op::QueueCommit);
        }
    }
    assert!(!w.queued_commits.is_empty());
    w.apply(Op::Revoke(0)); // commits the newer point on revoke; the other member commits more
    w.apply(Op::Revoke(0));
    w.apply(Op::DeliverCommit);
    w.drain();
}

/// A single record's write failed and waits for its retry when its assignment ends: the retry
/// is never issued (it would be a zombie write), and the key is fetched again by its new owner.
#[test]
fn a_write_retry_after_its_assignment_ended_is_never_issued() {
    let mut w = World::new();
    w.apply(World::op_notify(2, 1));
    w.apply(Op::Advance(20));
    w.apply(Op::Poll);
    w.apply(Op::FinishFetch {
        pick: 0,
        how: FetchHow::Current,
    });
    w.apply(Op::FinishWrite {
        pick: 0,
        how: WriteHow::Transient,
    });
    assert!(w.writes.is_empty(), "the retry waits for its backoff");
    w.apply(Op::Lose(1));
    w.now += 60_000;
    w.apply(Op::Poll); // collect_actions asserts that no write is issued for an ended assignment
    w.drain();
}
