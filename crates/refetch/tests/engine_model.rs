//! Property tests of the engine's state machine against a reference model.
//!
//! Random interleavings of notifications (with and without versions, with offset gaps), fetch
//! completions (current, stale, failing), sink acknowledgements and failures, dead-letter
//! acknowledgements, clock advances, revokes, losses and re-assignments with redelivery from the
//! committed offset. The model decides, for every delivered notification, whether it is
//! satisfied (design notes, rules (a)-(c)); the checks are:
//! - commit safety: a commit point never passes a delivered notification of the current
//!   assignment that the model does not consider satisfied (so completions of an older
//!   assignment cannot move offsets: they started before the redelivery);
//! - single flight: at most one fetch or write per key at a time, writes in flight order;
//! - convergence: after the input stops and every job succeeds, each partition's commit point
//!   reaches the end of what it received, and every key's last notification was followed by a
//!   fetch that started after it (or is satisfied by version or by a dead letter).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use proptest::prelude::*;
use refetch::clock::Tick;
use refetch::decode::{JsonDecoder, RecordView};
use refetch::engine::{Action, Decoders, Engine, FetchResult, TopicPartition, WriteResult};
use refetch::{
    Change, EngineConfig, Entity, FetchError, FetchOutcome, SinkError, Version, VersionKind,
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
    /// The assignment generation of the partition when delivered.
    generation: u32,
}

#[derive(Debug, Clone)]
struct OpenFetch {
    flight: u64,
    key: usize,
    started: u64,
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
    now: u64,
    seq: u64,
    /// The log per partition: (offset, key, version).
    log: BTreeMap<i32, Vec<(i64, usize, Option<i64>)>>,
    committed: BTreeMap<i32, i64>,
    /// Next offset to deliver per owned partition.
    position: BTreeMap<i32, i64>,
    generation: BTreeMap<i32, u32>,
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

    fn tick(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn assign(&mut self, p: i32) {
        self.engine.assign(&[TopicPartition::new(TOPIC, p)]);
        *self.generation.entry(p).or_insert(0) += 1;
        let from = self.committed.get(&p).copied().unwrap_or(0);
        self.position.insert(p, from);
        self.deliver(p);
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
                    self.writes.push(OpenWrite {
                        flight: j.flight,
                        key,
                        started,
                        version,
                        change: j.change,
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

    fn check_commits(&mut self) {
        for (tp, epoch, offset) in self.engine.commits() {
            let p = tp.partition;
            let generation_now = self.generation[&p];
            for d in self
                .deliveries
                .iter()
                .filter(|d| d.partition == p && d.generation == generation_now)
            {
                if d.offset < offset {
                    assert!(
                        self.satisfied(d),
                        "commit {offset} on partition {p} passes unsatisfied {d:?}"
                    );
                }
            }
            self.engine.committed(&tp, epoch, offset);
            self.committed.insert(p, offset);
        }
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
                    FetchHow::Permanent => FetchResult::Error(FetchError::permanent("bad")),
                };
                if let (FetchHow::Stale, Some(entry)) =
                    (how, self.flight_started.get_mut(&f.flight))
                {
                    entry.2 = f.version_at_start - 1;
                }
                self.engine
                    .on_fetch_done(&key, f.flight, result, Tick(self.now));
                self.collect_actions();
            }
            Op::FinishWrite { pick, how } => {
                if self.writes.is_empty() {
                    return;
                }
                let w = self.writes.remove(pick % self.writes.len());
                let key = w.change.key().clone();
                let result = match how {
                    WriteHow::Durable => {
                        self.durable.push((w.key, w.started, w.version));
                        WriteResult::Durable
                    }
                    WriteHow::Transient => WriteResult::Failed(SinkError::transient("down")),
                    WriteHow::Permanent => WriteResult::Failed(SinkError::permanent("rejected")),
                };
                self.engine
                    .on_write_done(&key, w.flight, result, Tick(self.now));
                self.collect_actions();
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
                let tp = TopicPartition::new(TOPIC, p);
                self.engine.revoke_begin(std::slice::from_ref(&tp));
                // Finish pending writes of this partition first when possible, as the runtime
                // would wait for them (within its deadline).
                let offsets = self.engine.revoke_finish(std::slice::from_ref(&tp));
                for (tp, offset) in offsets {
                    let generation_now = self.generation[&p];
                    for d in self
                        .deliveries
                        .iter()
                        .filter(|d| d.partition == p && d.generation == generation_now)
                    {
                        if d.offset < offset {
                            assert!(
                                self.satisfied(d),
                                "revoke commit {offset} passes unsatisfied {d:?}"
                            );
                        }
                    }
                    self.committed.insert(tp.partition, offset);
                }
                self.assign(p);
            }
            Op::Lose(p) => {
                self.engine.lose(&[TopicPartition::new(TOPIC, p)]);
                self.assign(p);
            }
        }
    }

    /// Input stops; every job now succeeds until nothing is left.
    fn drain(&mut self) {
        for _ in 0..10_000 {
            self.now += 100;
            self.engine.poll(Tick(self.now));
            self.collect_actions();
            let mut progressed = false;
            while let Some(f) = self.fetches.pop() {
                progressed = true;
                let key = refetch::EntityKey::new("c", key_name(f.key));
                let v = self.source_version[f.key];
                self.flight_started.insert(f.flight, (f.key, f.started, v));
                self.engine.on_fetch_done(
                    &key,
                    f.flight,
                    FetchResult::Outcome(FetchOutcome::Found(Entity::json(
                        "{}",
                        Some(Version::Int(f.version_at_start)),
                    ))),
                    Tick(self.now),
                );
                self.collect_actions();
            }
            while let Some(w) = self.writes.pop() {
                progressed = true;
                self.durable.push((w.key, w.started, w.version));
                let key = w.change.key().clone();
                self.engine
                    .on_write_done(&key, w.flight, WriteResult::Durable, Tick(self.now));
                self.collect_actions();
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
            if d.generation == self.generation[&d.partition] {
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
    assert_eq!(commits.iter().map(|c| c.2).collect::<Vec<_>>(), vec![1]);
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
