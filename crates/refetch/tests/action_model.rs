//! Property tests of business-action grouping against a reference model.
//!
//! Random interleavings of business actions (one to three entities each, with or without an
//! announced size, members on either partition, emitted in any order, with duplicates), plain
//! notifications, fetch completions (current, stale, failing), sink batches, dead-letter
//! acknowledgements, clock advances, revokes and losses. The sink is modelled as a transactional
//! one: a batch is applied atomically. The checks:
//! - **no partial action**: after every sink batch, for every action the model calls *clean*
//!   (every member arrived before the action could time out, nothing else changed its entities,
//!   no revoke or loss, no write failure), a reader of the sink sees all of its entity states or
//!   none of them. With the `dead_letter_all` policy a failed member keeps the action clean: none
//!   of it may be written;
//! - **one batch**: an action's writes arrive as one consecutive group whose size is announced;
//! - **offsets**: a commit never passes a member notification of a clean action before the
//!   action's batch is durable (or the notification is dead-lettered), and never passes any
//!   unsatisfied notification;
//! - **single flight** and **convergence**: at most one fetch or write per key; after the input
//!   stops and every job succeeds the engine is idle, every partition is committed to its end and
//!   every notification of the current assignment is satisfied.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use refetch::action::{ActionConfig, ActionFailurePolicy, CORRELATION_HEADER};
use refetch::clock::Tick;
use refetch::decode::{Correlation, CorrelationSource, JsonDecoder, RecordView};
use refetch::engine::{
    Action, Decoders, Engine, FetchResult, TopicPartition, WriteGroup, WriteResult,
};
use refetch::{
    Assignment, Change, EngineConfig, Entity, Epoch, FetchError, FetchOutcome, SinkError, Version,
    VersionKind,
};

const TOPIC: &str = "notes";
const PARTITIONS: i32 = 2;
const KEYS: usize = 8;
const ACTION_WINDOW: u64 = 20;
const ACTION_MAX_WAIT: u64 = 100;

#[derive(Debug, Clone)]
enum Op {
    /// A business action changes these entities; its member notifications go to these
    /// partitions (emitted later by `Emit`).
    StartAction {
        members: Vec<(usize, i32)>,
        announce: bool,
    },
    /// Emit one pending member notification (or, with `dup`, re-emit an emitted one).
    Emit {
        pick: usize,
        dup: bool,
    },
    /// A plain notification (no correlation id).
    Notify {
        key: usize,
        partition: i32,
    },
    Advance(u16),
    Poll,
    FinishFetch {
        pick: usize,
        how: FetchHow,
    },
    FinishBatch {
        pick: usize,
        how: BatchHow,
    },
    AckDeadLetter(usize),
    Commit,
    Revoke(i32),
    Lose(i32),
}

#[derive(Debug, Clone, Copy)]
enum FetchHow {
    Current,
    Stale,
    Transient,
    Permanent,
}

#[derive(Debug, Clone, Copy)]
enum BatchHow {
    Durable,
    FirstFailsTransient,
    FirstFailsPermanent,
}

fn op() -> impl Strategy<Value = Op> {
    let members = proptest::collection::vec((0..KEYS, 0..PARTITIONS), 1..4).prop_map(|mut v| {
        let mut seen = HashSet::new();
        v.retain(|(k, _)| seen.insert(*k));
        v
    });
    prop_oneof![
        9 => (members, any::<bool>())
            .prop_map(|(members, announce)| Op::StartAction { members, announce }),
        30 => (any::<usize>(), prop::bool::weighted(0.1)).prop_map(|(pick, dup)| Op::Emit { pick, dup }),
        4 => (0..KEYS, 0..PARTITIONS).prop_map(|(key, partition)| Op::Notify { key, partition }),
        6 => prop_oneof![4 => 1u16..8, 1 => 8u16..60].prop_map(Op::Advance),
        12 => Just(Op::Poll),
        15 => (any::<usize>(), prop_oneof![
                8 => Just(FetchHow::Current), 1 => Just(FetchHow::Stale),
                2 => Just(FetchHow::Transient), 1 => Just(FetchHow::Permanent)])
            .prop_map(|(pick, how)| Op::FinishFetch { pick, how }),
        12 => (any::<usize>(), prop_oneof![
                8 => Just(BatchHow::Durable), 1 => Just(BatchHow::FirstFailsTransient),
                1 => Just(BatchHow::FirstFailsPermanent)])
            .prop_map(|(pick, how)| Op::FinishBatch { pick, how }),
        5 => any::<usize>().prop_map(Op::AckDeadLetter),
        6 => Just(Op::Commit),
        1 => (0..PARTITIONS).prop_map(Op::Revoke),
        1 => (0..PARTITIONS).prop_map(Op::Lose),
    ]
}

/// A logged record.
#[derive(Debug, Clone)]
struct Rec {
    offset: i64,
    key: usize,
    version: i64,
    /// `(action index, announced size)`.
    action: Option<(usize, Option<usize>)>,
}

/// One delivery of a record (a redelivery after a rebalance is another delivery).
#[derive(Debug, Clone)]
struct Delivery {
    key: usize,
    partition: i32,
    offset: i64,
    version: i64,
    action: Option<usize>,
    seq: u64,
    generation: u32,
}

#[derive(Debug)]
struct ModelAction {
    /// Member key, the version this action gave it, its partition.
    members: Vec<(usize, i64, i32)>,
    announce: bool,
    /// Members not yet emitted (indexes into `members`).
    unemitted: Vec<usize>,
    first_emit: Option<u64>,
    last_emit: Option<u64>,
    clean: bool,
    written: bool,
}

#[derive(Debug, Clone)]
struct OpenFetch {
    flight: u64,
    key: usize,
    version_at_start: i64,
}

#[derive(Debug, Clone)]
struct OpenWrite {
    flight: u64,
    key: usize,
    started: u64,
    version: i64,
    change: Change,
}

struct World {
    engine: Engine,
    policy: ActionFailurePolicy,
    now: u64,
    seq: u64,
    log: BTreeMap<i32, Vec<Rec>>,
    committed: BTreeMap<i32, i64>,
    position: BTreeMap<i32, i64>,
    generation: BTreeMap<i32, u32>,
    source_version: Vec<i64>,
    /// What a reader of the sink sees: the version per key (batch-atomic).
    sink_version: Vec<i64>,
    actions: Vec<ModelAction>,
    deliveries: Vec<Delivery>,
    fetches: Vec<OpenFetch>,
    /// Open sink batches: the writes and the group they came as.
    batches: Vec<(Vec<OpenWrite>, Option<WriteGroup>)>,
    /// A group being received (its writes are issued consecutively).
    forming: Option<(Vec<OpenWrite>, WriteGroup)>,
    dead_letters: Vec<(u64, Vec<(i32, i64)>)>,
    durable: Vec<(usize, u64, i64)>,
    dead_lettered: HashSet<(i32, i64)>,
    last_written_flight: HashMap<usize, u64>,
    flight_started: HashMap<u64, (usize, u64, i64)>,
    /// Dead letters seen with a correlation header.
    correlated_dead_letters: usize,
}

fn key_name(k: usize) -> String {
    format!("k{k}")
}

fn key_index(id: &str) -> usize {
    id.trim_start_matches('k').parse().unwrap_or(usize::MAX)
}

impl World {
    fn new(policy: ActionFailurePolicy) -> Self {
        let cfg = EngineConfig {
            window: Duration::from_millis(10),
            max_wait: Duration::from_millis(50),
            retry_budget: 3,
            sink_record_budget: 3,
            fetch_concurrency: 3,
            actions: ActionConfig {
                window: Duration::from_millis(ACTION_WINDOW),
                max_wait: Duration::from_millis(ACTION_MAX_WAIT),
                on_failure: policy,
                remember_closed: 1000,
            },
            ..EngineConfig::default()
        };
        let decoder = JsonDecoder::fixed_type("c", "/id")
            .with_version("/v", VersionKind::Integer)
            .with_correlation(Correlation {
                id: CorrelationSource::Pointer("/tx".into()),
                size_pointer: Some("/of".into()),
            });
        let engine = Engine::new(
            cfg,
            Decoders::new().default_decoder(Arc::new(decoder)),
            Box::new(|_| true),
            false,
        );
        let mut w = World {
            engine,
            policy,
            now: 0,
            seq: 0,
            log: BTreeMap::new(),
            committed: BTreeMap::new(),
            position: BTreeMap::new(),
            generation: BTreeMap::new(),
            source_version: vec![0; KEYS],
            sink_version: vec![0; KEYS],
            actions: Vec::new(),
            deliveries: Vec::new(),
            fetches: Vec::new(),
            batches: Vec::new(),
            forming: None,
            dead_letters: Vec::new(),
            durable: Vec::new(),
            dead_lettered: HashSet::new(),
            last_written_flight: HashMap::new(),
            flight_started: HashMap::new(),
            correlated_dead_letters: 0,
        };
        for p in 0..PARTITIONS {
            w.assign(p);
        }
        w
    }

    fn tick(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn assignment(&self, p: i32) -> Assignment {
        Assignment::new(
            TopicPartition::new(TOPIC, p),
            Epoch(u64::from(self.generation.get(&p).copied().unwrap_or(0))),
        )
    }

    fn assign(&mut self, p: i32) {
        *self.generation.entry(p).or_insert(0) += 1;
        let a = self.assignment(p);
        self.engine.assign(&[a]);
        let from = self.committed.get(&p).copied().unwrap_or(0);
        self.position.insert(p, from);
        self.deliver(p);
    }

    fn deliver(&mut self, p: i32) {
        let Some(pos) = self.position.get(&p).copied() else {
            return;
        };
        let records: Vec<Rec> = self
            .log
            .get(&p)
            .map(|l| l.iter().filter(|r| r.offset >= pos).cloned().collect())
            .unwrap_or_default();
        for r in records {
            let payload = match r.action {
                Some((a, Some(size))) => format!(
                    r#"{{"id":"{}","v":{},"tx":"a{a}","of":{size}}}"#,
                    key_name(r.key),
                    r.version
                ),
                Some((a, None)) => format!(
                    r#"{{"id":"{}","v":{},"tx":"a{a}"}}"#,
                    key_name(r.key),
                    r.version
                ),
                None => format!(r#"{{"id":"{}","v":{}}}"#, key_name(r.key), r.version),
            };
            let seq = self.tick();
            let view = RecordView {
                topic: TOPIC,
                partition: p,
                offset: r.offset,
                key: None,
                payload: Some(payload.as_bytes()),
                headers: &[],
                timestamp: None,
            };
            self.engine.on_record(&view, Tick(self.now));
            self.deliveries.push(Delivery {
                key: r.key,
                partition: p,
                offset: r.offset,
                version: r.version,
                action: r.action.map(|(a, _)| a),
                seq,
                generation: self.generation[&p],
            });
            self.position.insert(p, r.offset + 1);
        }
    }

    fn append(&mut self, p: i32, key: usize, version: i64, action: Option<(usize, Option<usize>)>) {
        let log = self.log.entry(p).or_default();
        let offset = log.last().map_or(0, |r| r.offset + 1);
        log.push(Rec {
            offset,
            key,
            version,
            action,
        });
        self.deliver(p);
    }

    /// Every not yet finished action holding `key` is no longer clean: its entity changed again.
    fn dirty_actions_with(&mut self, key: usize) {
        for a in &mut self.actions {
            if !a.written && a.members.iter().any(|m| m.0 == key) {
                a.clean = false;
            }
        }
    }

    fn key_quiet(&self, key: usize) -> bool {
        !self
            .engine
            .holds_key(&refetch::EntityKey::new("c", key_name(key)))
            && self.fetches.iter().all(|f| f.key != key)
            && self
                .batches
                .iter()
                .flat_map(|(b, _)| b)
                .chain(self.forming.iter().flat_map(|(b, _)| b))
                .all(|w| w.key != key)
            && self
                .deliveries
                .iter()
                .filter(|d| d.key == key && d.generation == self.generation[&d.partition])
                .all(|d| self.satisfied(d))
            && self
                .actions
                .iter()
                .enumerate()
                .filter(|(_, a)| a.members.iter().any(|m| m.0 == key))
                .all(|(i, a)| {
                    // An earlier action holding the key is over: every member emitted and every
                    // member notification satisfied (its write would read the new state).
                    a.unemitted.is_empty()
                        && self
                            .deliveries
                            .iter()
                            .filter(|d| d.action == Some(i))
                            .filter(|d| d.generation == self.generation[&d.partition])
                            .all(|d| self.satisfied(d))
                })
    }

    fn collect_actions(&mut self) {
        for a in self.engine.take_actions() {
            match a {
                Action::Fetch(j) => {
                    let key = key_index(j.request.key.id());
                    assert!(
                        !self.fetches.iter().any(|f| f.key == key)
                            && !self
                                .batches
                                .iter()
                                .flat_map(|(b, _)| b)
                                .chain(self.forming.iter().flat_map(|(b, _)| b))
                                .any(|w| w.key == key),
                        "single flight violated for key {key}"
                    );
                    let started = self.tick();
                    let v = self.source_version[key];
                    self.flight_started.insert(j.flight, (key, started, v));
                    self.fetches.push(OpenFetch {
                        flight: j.flight,
                        key,
                        version_at_start: v,
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
                    let version = j.change.version().map_or(-1, |v| v.value());
                    let w = OpenWrite {
                        flight: j.flight,
                        key,
                        started,
                        version,
                        change: j.change,
                    };
                    match (&mut self.forming, j.group) {
                        (Some((ws, g)), Some(h)) => {
                            assert_eq!(*g, h, "another write inside an action's group");
                            ws.push(w);
                        }
                        (Some(_), None) => panic!("a plain write inside an action's group"),
                        (None, Some(g)) => {
                            assert!(g.size >= 1);
                            self.forming = Some((vec![w], g));
                        }
                        (None, None) => self.batches.push((vec![w], None)),
                    }
                    if let Some((ws, g)) = self.forming.take() {
                        if ws.len() == g.size {
                            self.batches.push((ws, Some(g)));
                        } else {
                            self.forming = Some((ws, g));
                        }
                    }
                }
                Action::DeadLetter(j) => {
                    if j.record.header(CORRELATION_HEADER).is_some() {
                        self.correlated_dead_letters += 1;
                    }
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
        assert!(
            self.forming.is_none(),
            "an action's group writes were not issued together"
        );
    }

    fn satisfied(&self, d: &Delivery) -> bool {
        let by_fetch = self
            .durable
            .iter()
            .any(|(k, started, v)| *k == d.key && *started > d.seq && *v >= d.version);
        let by_version = self
            .durable
            .iter()
            .any(|(k, _, v)| *k == d.key && *v >= d.version);
        by_fetch || by_version || self.dead_lettered.contains(&(d.partition, d.offset))
    }

    /// A reader of the (transactional) sink never sees part of a clean action.
    fn check_reader(&mut self) {
        for (i, a) in self.actions.iter_mut().enumerate() {
            if !a.clean || !a.unemitted.is_empty() {
                continue;
            }
            let seen: Vec<bool> = a
                .members
                .iter()
                .map(|(k, v, _)| self.sink_version[*k] >= *v)
                .collect();
            let all = seen.iter().all(|s| *s);
            let none = seen.iter().all(|s| !*s);
            assert!(
                all || none,
                "reader sees part of action a{i}: {:?} sink {:?}",
                a.members,
                self.sink_version
            );
            if all {
                a.written = true;
            }
        }
    }

    fn check_commit(&self, p: i32, offset: i64) {
        let generation_now = self.generation[&p];
        for d in self
            .deliveries
            .iter()
            .filter(|d| d.partition == p && d.generation == generation_now && d.offset < offset)
        {
            assert!(
                self.satisfied(d),
                "commit {offset} on partition {p} passes unsatisfied {d:?}"
            );
            if let Some(a) = d.action.and_then(|a| self.actions.get(a)) {
                if a.clean {
                    assert!(
                        a.written || self.dead_lettered.contains(&(d.partition, d.offset)),
                        "commit {offset} on partition {p} released member {d:?} before its \
                         action's write"
                    );
                }
            }
        }
    }

    fn check_commits(&mut self) {
        for (a, offset) in self.engine.commits() {
            self.check_commit(a.tp.partition, offset);
            self.engine.committed(&a, offset);
            self.committed.insert(a.tp.partition, offset);
        }
    }

    fn finish_fetch(&mut self, f: OpenFetch, how: FetchHow) {
        let key = refetch::EntityKey::new("c", key_name(f.key));
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
            // A failure about the key alone (an id no request can be made for): dead-lettered
            // at once, whatever the source's health (see `outcome.rs`).
            FetchHow::Permanent => FetchResult::Error(
                FetchError::permanent("bad").with_cause(refetch::FailureCause::Key),
            ),
        };
        if let FetchHow::Stale = how {
            if let Some(entry) = self.flight_started.get_mut(&f.flight) {
                entry.2 = f.version_at_start - 1;
            }
        }
        if matches!(how, FetchHow::Permanent | FetchHow::Transient)
            && self.policy == ActionFailurePolicy::WriteSucceeded
        {
            // Writing the members that succeeded shows part of the action: by design.
            self.dirty_actions_with(f.key);
        }
        self.engine
            .on_fetch_done(&key, f.flight, result, Tick(self.now));
        self.collect_actions();
    }

    fn finish_batch(&mut self, batch: Vec<OpenWrite>, how: BatchHow) {
        let fails_first = !matches!(how, BatchHow::Durable);
        if fails_first && batch.len() > 1 {
            for w in &batch {
                self.dirty_actions_with(w.key);
            }
        }
        // The transactional sink applies the batch at once.
        let mut results = Vec::new();
        for (i, w) in batch.iter().enumerate() {
            let r = match how {
                BatchHow::FirstFailsTransient if i == 0 => {
                    WriteResult::Failed(SinkError::transient("down"))
                }
                BatchHow::FirstFailsPermanent if i == 0 => {
                    WriteResult::Failed(SinkError::permanent("rejected"))
                }
                _ => {
                    self.durable.push((w.key, w.started, w.version));
                    self.sink_version[w.key] = self.sink_version[w.key].max(w.version);
                    WriteResult::Durable
                }
            };
            results.push(r);
        }
        self.check_reader();
        for (w, r) in batch.into_iter().zip(results) {
            let key = w.change.key().clone();
            self.engine.on_write_done(&key, w.flight, r, Tick(self.now));
        }
        self.collect_actions();
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::StartAction { members, announce } => {
                let clean = members.iter().all(|(k, _)| self.key_quiet(*k));
                let mut ms = Vec::new();
                for (k, p) in members {
                    self.dirty_actions_with(k);
                    self.source_version[k] += 1;
                    ms.push((k, self.source_version[k], p));
                }
                let n = ms.len();
                self.actions.push(ModelAction {
                    members: ms,
                    announce,
                    unemitted: (0..n).collect(),
                    first_emit: None,
                    last_emit: None,
                    clean,
                    written: false,
                });
            }
            Op::Emit { pick, dup } => {
                let open: Vec<usize> = (0..self.actions.len())
                    .filter(|&i| {
                        if dup {
                            self.actions[i].unemitted.len() < self.actions[i].members.len()
                        } else {
                            !self.actions[i].unemitted.is_empty()
                        }
                    })
                    .collect();
                if open.is_empty() {
                    return;
                }
                let ai = open[pick % open.len()];
                let now = self.now;
                let mut late = false;
                let a = &mut self.actions[ai];
                let mi = if dup {
                    if a.unemitted.is_empty() {
                        // A late member after the action closed is an ordinary notification:
                        // it fetches and writes that one entity's current state (after a
                        // dead-lettered action, or over a later action's change).
                        late = true;
                    }
                    let emitted: Vec<usize> = (0..a.members.len())
                        .filter(|m| !a.unemitted.contains(m))
                        .collect();
                    emitted[(pick / 7) % emitted.len()]
                } else {
                    a.unemitted.remove((pick / 7) % a.unemitted.len())
                };
                a.first_emit.get_or_insert(now);
                a.last_emit = Some(now);
                let (k, v, p) = a.members[mi];
                let size = a.announce.then_some(a.members.len());
                if late {
                    self.dirty_actions_with(k);
                }
                self.append(p, k, v, Some((ai, size)));
            }
            Op::Notify { key, partition } => {
                self.dirty_actions_with(key);
                self.source_version[key] += 1;
                let v = self.source_version[key];
                self.append(partition, key, v, None);
            }
            Op::Advance(ms) => {
                self.now += u64::from(ms);
                let now = self.now;
                for a in &mut self.actions {
                    let (Some(first), Some(last)) = (a.first_emit, a.last_emit) else {
                        continue;
                    };
                    // The action may time out with members still to come: they fall back.
                    let may_time_out =
                        now >= last + ACTION_WINDOW || now >= first + ACTION_MAX_WAIT;
                    if !a.unemitted.is_empty() && may_time_out {
                        a.clean = false;
                    }
                }
            }
            Op::Poll => {
                self.engine.poll(Tick(self.now));
                self.collect_actions();
            }
            Op::FinishFetch { pick, how } => {
                if self.fetches.is_empty() {
                    return;
                }
                let f = self.fetches.remove(pick % self.fetches.len());
                self.finish_fetch(f, how);
            }
            Op::FinishBatch { pick, how } => {
                if self.batches.is_empty() {
                    return;
                }
                let (b, _) = self.batches.remove(pick % self.batches.len());
                self.finish_batch(b, how);
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
            Op::Commit => self.check_commits(),
            Op::Revoke(p) => {
                self.dirty_unfinished();
                let a = self.assignment(p);
                self.engine.revoke_begin(std::slice::from_ref(&a));
                let offsets = self.engine.revoke_finish(std::slice::from_ref(&a));
                for (a, offset) in offsets {
                    self.check_commit(a.tp.partition, offset);
                    self.committed.insert(a.tp.partition, offset);
                }
                self.assign(p);
                self.collect_actions();
            }
            Op::Lose(p) => {
                self.dirty_unfinished();
                let a = self.assignment(p);
                self.engine.lose(&[a]);
                self.assign(p);
                self.collect_actions();
            }
        }
    }

    /// A revoke or loss splits open actions: they fall back to normal writes.
    fn dirty_unfinished(&mut self) {
        for a in &mut self.actions {
            if !a.written {
                a.clean = false;
            }
        }
    }

    /// Input stops (remaining members are emitted); every job now succeeds until nothing is left.
    fn drain(&mut self) {
        for i in 0..self.actions.len() {
            while !self.actions[i].unemitted.is_empty() {
                self.apply(Op::Emit {
                    pick: 0,
                    dup: false,
                });
            }
        }
        for _ in 0..10_000 {
            self.now += 30;
            self.engine.poll(Tick(self.now));
            self.collect_actions();
            let mut progressed = false;
            while let Some(f) = self.fetches.pop() {
                progressed = true;
                self.finish_fetch(f, FetchHow::Current);
            }
            while let Some((b, _)) = self.batches.pop() {
                progressed = true;
                self.finish_batch(b, BatchHow::Durable);
            }
            while let Some((id, coords)) = self.dead_letters.pop() {
                progressed = true;
                self.dead_lettered.extend(coords);
                self.engine.on_dead_letter_done(id, Ok(()));
                self.collect_actions();
            }
            self.check_commits();
            if !progressed && self.engine.is_idle() {
                break;
            }
        }
        assert!(
            self.engine.is_idle(),
            "engine did not drain: {:?}, open actions {}",
            self.engine.status(Tick(self.now)),
            self.engine.open_actions()
        );
        // An idle engine asks for no wake-up in the past (the runtime would spin on it).
        self.engine.poll(Tick(self.now));
        assert!(
            self.engine.next_wakeup().is_none_or(|t| t > Tick(self.now)),
            "idle engine wants a wake-up at {:?} (now {})",
            self.engine.next_wakeup(),
            self.now
        );
        for p in 0..PARTITIONS {
            let end = self
                .log
                .get(&p)
                .and_then(|l| l.last())
                .map(|r| r.offset + 1);
            if let Some(end) = end {
                assert_eq!(
                    self.committed.get(&p).copied(),
                    Some(end),
                    "partition {p} not committed to its end"
                );
            }
        }
        for d in &self.deliveries {
            if d.generation == self.generation[&d.partition] {
                assert!(self.satisfied(d), "unsatisfied after drain: {d:?}");
            }
        }
    }
}

/// What one run exercised.
#[derive(Debug, Default, Clone, Copy)]
struct Exercised {
    correlated_dead_letters: usize,
    group_writes: u64,
    clean_actions_written: usize,
    incomplete: u64,
}

fn run(policy: ActionFailurePolicy, ops: Vec<Op>) -> Exercised {
    let mut w = World::new(policy);
    for op in ops {
        w.apply(op);
    }
    w.drain();
    let c = w.engine.counters();
    Exercised {
        correlated_dead_letters: w.correlated_dead_letters,
        group_writes: c.actions_written,
        clean_actions_written: w.actions.iter().filter(|a| a.clean && a.written).count(),
        incomplete: c.actions_incomplete,
    }
}

/// Run the model for `ACTION_MODEL_CASES` random cases (default 300) and check that the
/// generator reached the interesting paths (so the properties are not vacuous).
fn model(policy: ActionFailurePolicy) {
    let cases = std::env::var("ACTION_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases,
        ..ProptestConfig::default()
    });
    let total = std::cell::Cell::new(Exercised::default());
    let result = runner.run(&proptest::collection::vec(op(), 1..150), |ops| {
        let e = run(policy, ops);
        let mut t = total.get();
        t.correlated_dead_letters += e.correlated_dead_letters;
        t.group_writes += e.group_writes;
        t.clean_actions_written += e.clean_actions_written;
        t.incomplete += e.incomplete;
        total.set(t);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let t = total.get();
    eprintln!("{policy:?}: {t:?}");
    assert!(
        t.clean_actions_written as u32 >= cases / 10,
        "too few clean actions were checked: {t:?}"
    );
    assert!(
        t.group_writes > 0 && t.incomplete > 0,
        "paths not reached: {t:?}"
    );
    assert!(
        t.correlated_dead_letters > 0,
        "no correlated dead letter: {t:?}"
    );
}

#[test]
fn no_partial_action_with_dead_letter_all() {
    model(ActionFailurePolicy::DeadLetterAll);
}

#[test]
fn no_partial_action_with_write_succeeded() {
    model(ActionFailurePolicy::WriteSucceeded);
}

/// The generator reaches the interesting paths: group writes, and dead letters that carry the
/// correlation id.
#[test]
fn the_model_exercises_group_writes_and_correlated_dead_letters() {
    let action = |members: &[(usize, i32)]| Op::StartAction {
        members: members.to_vec(),
        announce: true,
    };
    // Action of three members on two partitions, emitted out of order with a duplicate; then an
    // action whose member fails permanently under dead_letter_all.
    let mut ops = vec![
        action(&[(0, 0), (1, 1), (2, 0)]),
        Op::Emit {
            pick: 14,
            dup: false,
        },
        Op::Emit { pick: 0, dup: true },
        Op::Emit {
            pick: 7,
            dup: false,
        },
        Op::Emit {
            pick: 0,
            dup: false,
        },
        Op::Poll,
    ];
    for _ in 0..3 {
        ops.push(Op::FinishFetch {
            pick: 0,
            how: FetchHow::Current,
        });
    }
    ops.push(Op::FinishBatch {
        pick: 0,
        how: BatchHow::Durable,
    });
    ops.push(Op::Commit);
    ops.push(action(&[(3, 0), (4, 1)]));
    ops.push(Op::Emit {
        pick: 0,
        dup: false,
    });
    ops.push(Op::Emit {
        pick: 0,
        dup: false,
    });
    ops.push(Op::Poll);
    ops.push(Op::FinishFetch {
        pick: 0,
        how: FetchHow::Permanent,
    });
    let e = run(ActionFailurePolicy::DeadLetterAll, ops);
    assert!(
        e.group_writes >= 1,
        "the first action was written as one group"
    );
    assert_eq!(e.clean_actions_written, 1, "{e:?}");
    assert_eq!(
        e.correlated_dead_letters, 2,
        "both members of the failed action are dead-lettered"
    );
}
