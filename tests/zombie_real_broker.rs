//! Zombie writes on the real broker: two `Pipeline`s (instances A and B, one consumer group)
//! share one last-write-wins sink, the way two `refetch` processes share a Kafka topic, an HTTP
//! endpoint or a JSON Lines file. A's sink hangs (past A's `rebalance_drain`) with A's write of
//! v1 on the wire; the source moves to v2 and B joins, takes partitions over, fetches v2, writes
//! it and commits. When A's hanging write is finally let through, it must not land: its
//! assignment ended, so the dispatcher dropped it. Otherwise the sink holds v1 for ever while
//! every offset is committed and nothing is left to repair it.
//!
//! The hang is released by the test only after B has written and committed its partitions, so
//! without the fence A's write lands strictly after B's (the test fails deterministically, not
//! by timing luck). Needs `REFETCH_TEST_KAFKA` (run with `scripts/test`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use refetch::decode::JsonDecoder;
use refetch::{
    Change, EngineConfig, EntityKey, KafkaConfig, Pipeline, PipelineHandle, RunReport, Sink,
    SinkError, WriteReport, async_trait,
};
use refetch_testkit::kafka::{self, OutRecord};
use refetch_testkit::memory::{RecordingSink, VersionedSource};
use refetch_testkit::names;

const PARTITIONS: i32 = 4;
const KEYS: usize = 40;
/// A's drain deadline: its sink hangs for longer than this.
const DRAIN: Duration = Duration::from_millis(1500);
/// The longest a hanging write waits for its release (a bound, never reached when the test
/// works).
const MAX_HANG: Duration = Duration::from_secs(45);
/// The whole test's wall-clock cap.
const CAP: Duration = Duration::from_secs(90);

fn key(i: usize) -> EntityKey {
    EntityKey::new("customer", format!("c{i}"))
}

/// Key `i` is announced on partition `i % PARTITIONS` (fixed, so the test knows which keys moved).
fn partition_of(i: usize) -> i32 {
    (i % KEYS) as i32 % PARTITIONS
}

/// One write that hung: which keys, when it started, and how it ended.
#[derive(Debug, Clone)]
struct Hang {
    keys: Vec<EntityKey>,
    started: Instant,
    /// `Some(true)`: let through after the release; `Some(false)`: dropped (cancelled) while
    /// hanging; `None`: still hanging.
    landed: Option<bool>,
    /// How long it hung.
    hung_for: Option<Duration>,
}

#[derive(Default)]
struct HangState {
    /// Keys whose first write since arming hung already (each key hangs once).
    hung_keys: HashSet<EntityKey>,
    hangs: Vec<Hang>,
}

/// Instance A's view of the shared sink: once armed, a batch holding a key's first write since
/// arming hangs until the test releases it (a sink that stalls past the drain deadline, with the
/// write on the wire), then writes. A write the dispatcher drops while it hangs is recorded as
/// dropped.
#[derive(Clone)]
struct HangingSink {
    inner: RecordingSink,
    armed: Arc<AtomicBool>,
    release: Arc<tokio::sync::watch::Sender<bool>>,
    state: Arc<Mutex<HangState>>,
}

impl HangingSink {
    fn new(inner: RecordingSink) -> Self {
        HangingSink {
            inner,
            armed: Arc::new(AtomicBool::new(true)),
            release: Arc::new(tokio::sync::watch::channel(false).0),
            state: Arc::default(),
        }
    }

    fn hangs(&self) -> Vec<Hang> {
        self.state.lock().unwrap().hangs.clone()
    }

    /// Let every hanging write through; later writes no longer hang.
    fn release(&self) {
        self.armed.store(false, Ordering::SeqCst);
        self.release.send_replace(true);
    }
}

/// Marks a hang dropped unless defused (the write future was dropped while it hung).
struct OnDrop {
    state: Arc<Mutex<HangState>>,
    index: usize,
    defused: bool,
}

impl Drop for OnDrop {
    fn drop(&mut self) {
        if self.defused {
            return;
        }
        if let Ok(mut s) = self.state.lock() {
            let h = &mut s.hangs[self.index];
            h.landed = Some(false);
            h.hung_for = Some(h.started.elapsed());
        }
    }
}

#[async_trait]
impl Sink for HangingSink {
    async fn write(&self, batch: &[Change]) -> Result<WriteReport, SinkError> {
        let index = if self.armed.load(Ordering::SeqCst) {
            let mut s = self.state.lock().unwrap();
            let fresh: Vec<EntityKey> = batch
                .iter()
                .map(|c| c.key().clone())
                .filter(|k| !s.hung_keys.contains(k))
                .collect();
            if fresh.is_empty() {
                None
            } else {
                s.hung_keys.extend(fresh);
                s.hangs.push(Hang {
                    keys: batch.iter().map(|c| c.key().clone()).collect(),
                    started: Instant::now(),
                    landed: None,
                    hung_for: None,
                });
                Some(s.hangs.len() - 1)
            }
        } else {
            None
        };
        let Some(index) = index else {
            return self.inner.write(batch).await;
        };
        let mut guard = OnDrop {
            state: self.state.clone(),
            index,
            defused: false,
        };
        let mut released = self.release.subscribe();
        tokio::select! {
            _ = released.wait_for(|r| *r) => {}
            () = tokio::time::sleep(MAX_HANG) => {}
        }
        guard.defused = true;
        let r = self.inner.write(batch).await;
        if let Ok(mut s) = self.state.lock() {
            let h = &mut s.hangs[index];
            h.landed = Some(true);
            h.hung_for = Some(h.started.elapsed());
        }
        r
    }
}

struct Instance {
    handle: PipelineHandle,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<RunReport, refetch::PipelineError>>,
}

impl Instance {
    async fn partitions(&self) -> BTreeSet<i32> {
        self.handle
            .status()
            .await
            .expect("instance runs")
            .engine
            .partitions
            .iter()
            .map(|p| p.partition)
            .collect()
    }

    async fn stop(self) -> RunReport {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the instance stops")
            .expect("task")
            .expect("run")
    }
}

fn start<S: Sink + Clone>(
    brokers: &str,
    group: &str,
    topic: &str,
    source: &VersionedSource,
    sink: S,
) -> Instance {
    let mut k = KafkaConfig::new(brokers, group, vec![topic.to_owned()]);
    k.consumer_properties
        .insert("session.timeout.ms".into(), "6000".into());
    k.consumer_properties
        .insert("heartbeat.interval.ms".into(), "500".into());
    let pipeline = Pipeline::builder::<VersionedSource, S>()
        .fetcher(source.clone())
        .sink(sink)
        .kafka(k)
        // Unversioned notifications: the shared sink cannot guard on version, and the engine
        // has nothing to skip a fetch with.
        .decoder(JsonDecoder::fixed_type("customer", "/id"))
        .engine(EngineConfig {
            window: Duration::from_millis(50),
            max_wait: Duration::from_millis(500),
            commit_interval: Duration::from_millis(200),
            rebalance_drain: DRAIN,
            shutdown_deadline: Duration::from_secs(5),
            // Every first write can hang at once (none waits for a permit instead).
            sink_concurrency: 16,
            ..EngineConfig::default()
        })
        .build()
        .expect("valid pipeline");
    let handle = pipeline.handle();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(pipeline.run(async move {
        let _ = stopped.await;
    }));
    Instance { handle, stop, task }
}

/// Change every key at the source and announce each change on its key's partition.
async fn change_all(brokers: &str, topic: &str, source: &VersionedSource) {
    let records: Vec<OutRecord> = (0..KEYS)
        .map(|i| {
            source.change(&key(i));
            OutRecord {
                partition: Some(partition_of(i)),
                ..OutRecord::keyed(format!("c{i}"), format!(r#"{{"id":"c{i}"}}"#))
            }
        })
        .collect();
    kafka::produce_records(brokers, topic, records)
        .await
        .expect("produce");
}

/// Keys (of `partitions`) whose sink state differs from the source.
fn differing(
    sink: &RecordingSink,
    source: &VersionedSource,
    partitions: &BTreeSet<i32>,
) -> Vec<String> {
    let held = sink.held();
    (0..KEYS)
        .filter(|i| partitions.contains(&partition_of(*i)))
        .filter_map(|i| {
            let want = source.snapshot().get(&key(i)).map(|e| e.version);
            let got = held.get(&key(i)).copied();
            (want != got).then(|| format!("{}: sink {got:?}, source {want:?}", key(i)))
        })
        .collect()
}

async fn committed_to_end(
    brokers: &str,
    group: &str,
    topic: &str,
    partitions: &BTreeSet<i32>,
) -> (bool, BTreeMap<i32, i64>, BTreeMap<i32, i64>) {
    let end = kafka::end_offsets(brokers, topic)
        .await
        .expect("end offsets");
    let committed = kafka::committed_offsets(brokers, group, topic)
        .await
        .expect("committed offsets");
    let done = partitions.iter().all(|p| {
        end.get(p)
            .is_none_or(|e| *e == 0 || committed.get(p) == Some(e))
    });
    (done, end, committed)
}

/// Wait until `partitions` are committed to their end and their keys equal the source.
#[allow(clippy::too_many_arguments)]
async fn until_converged(
    what: &str,
    brokers: &str,
    group: &str,
    topic: &str,
    sink: &RecordingSink,
    source: &VersionedSource,
    partitions: &BTreeSet<i32>,
    within: Duration,
) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let (done, end, committed) = committed_to_end(brokers, group, topic, partitions).await;
        let diff = differing(sink, source, partitions);
        if done && diff.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not converged within {within:?}: end {end:?}, committed {committed:?}, {} keys differ, e.g. {:?}",
            diff.len(),
            diff.first()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn a_write_hanging_past_the_revoke_never_lands_after_the_new_owner() {
    tokio::time::timeout(CAP, scenario())
        .await
        .expect("wall-clock cap");
}

async fn scenario() {
    let started = Instant::now();
    let brokers = kafka::brokers().expect("REFETCH_TEST_KAFKA");
    let topic = names::unique("zombie");
    let group = names::unique("zombie_group");
    kafka::create_topic(&brokers, &topic, PARTITIONS)
        .await
        .expect("topic");
    kafka::create_topic(&brokers, &format!("{group}.dlq"), 1)
        .await
        .expect("dead-letter topic");
    let all: BTreeSet<i32> = (0..PARTITIONS).collect();
    let source = VersionedSource::new();
    let shared = RecordingSink::last_write_wins();
    let hanging = HangingSink::new(shared.clone());

    // A owns every partition; its sink hangs from the start.
    let a = start(&brokers, &group, &topic, &source, hanging.clone());
    refetch_testkit::process::wait_for("a owns every partition", Duration::from_secs(30), || {
        let a = &a;
        let all = all.clone();
        async move { a.partitions().await == all }
    })
    .await
    .unwrap();

    // v1 of every key: A fetches it and its writes hang, on the wire.
    change_all(&brokers, &topic, &source).await;
    refetch_testkit::process::wait_for(
        "a's first writes of every key to hang",
        Duration::from_secs(30),
        || {
            let n = hanging.state.lock().unwrap().hung_keys.len();
            async move { n == KEYS }
        },
    )
    .await
    .unwrap();

    // The source moves on to v2; B joins and takes partitions over while A's writes hang.
    change_all(&brokers, &topic, &source).await;
    let b = start(&brokers, &group, &topic, &source, shared.clone());
    let on_b = refetch_testkit::process::wait_for_value(
        "b to take partitions over",
        Duration::from_secs(45),
        || {
            let b = &b;
            async move {
                let p = b.partitions().await;
                (!p.is_empty()).then_some(p)
            }
        },
    )
    .await
    .unwrap();
    // B fetches v2 of its keys, writes it and commits its partitions to the end.
    until_converged(
        "b's partitions",
        &brokers,
        &group,
        &topic,
        &shared,
        &source,
        &on_b,
        Duration::from_secs(30),
    )
    .await;
    let on_a = a.partitions().await;
    assert!(
        on_a.is_disjoint(&on_b),
        "a still owns some of b's partitions: a {on_a:?}, b {on_b:?}"
    );

    // Only now are A's hanging writes let through: one of B's keys written by A now would land
    // after B's v2.
    let log_before = shared.log().len();
    hanging.release();
    refetch_testkit::process::wait_for("every hang to end", Duration::from_secs(10), || {
        let done = hanging.hangs().iter().all(|h| h.landed.is_some());
        async move { done }
    })
    .await
    .unwrap();
    // A write of one of B's keys after the release is a zombie, whatever the final state.
    let b_keys: HashSet<EntityKey> = (0..KEYS)
        .filter(|i| on_b.contains(&partition_of(*i)))
        .map(key)
        .collect();
    let zombies: Vec<_> = shared
        .log()
        .into_iter()
        .skip(log_before)
        .filter(|w| b_keys.contains(&w.key))
        .collect();
    assert!(
        zombies.is_empty(),
        "a's write landed after b took the partition over: {zombies:?}"
    );
    until_converged(
        "every partition",
        &brokers,
        &group,
        &topic,
        &shared,
        &source,
        &all,
        Duration::from_secs(30),
    )
    .await;

    // (until_converged: the sink equals the source and every offset is committed.)

    // The scenario did what it says: A's writes of B's keys hung past the drain and were dropped.
    let hangs = hanging.hangs();
    let dropped: Vec<&Hang> = hangs
        .iter()
        .filter(|h| h.landed == Some(false) && h.keys.iter().any(|k| b_keys.contains(k)))
        .collect();
    assert!(
        !dropped.is_empty(),
        "no hanging write of b's keys was dropped: {hangs:?}"
    );
    for h in &dropped {
        let hung = h.hung_for.unwrap_or_default();
        assert!(
            hung >= DRAIN,
            "dropped after {hung:?}, before the drain deadline"
        );
    }

    let report_b = b.stop().await;
    let report_a = a.stop().await;
    assert_eq!(report_a.status.counters.dead_letters, 0);
    assert_eq!(report_b.status.counters.dead_letters, 0);
    let (done, end, committed) = committed_to_end(&brokers, &group, &topic, &all).await;
    assert!(done, "end {end:?}, committed {committed:?}");
    let dlq = kafka::read_all(
        &brokers,
        &format!("{group}.dlq"),
        true,
        Duration::from_secs(2),
    )
    .await
    .expect("read dlq");
    assert!(dlq.is_empty(), "nothing is dead-lettered");
    println!(
        "zombie: a kept {on_a:?}, b took {on_b:?}, {} hanging writes ({} dropped), {} sink writes, {:.1}s",
        hangs.len(),
        hangs.iter().filter(|h| h.landed == Some(false)).count(),
        shared.log().len(),
        started.elapsed().as_secs_f64()
    );
}
