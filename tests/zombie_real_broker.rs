//! Zombie writes on the real broker: two `Pipeline`s (instances A and B, one consumer group)
//! share one sink. A's sink hangs (past A's `rebalance_drain`) with A's write of v1 pending; the
//! source moves to v2 and B joins, takes partitions over, fetches v2, writes it and commits. The
//! test lets A's hanging write through only after that, so a write of A that lands then lands
//! strictly after B's (the tests fail deterministically, not by timing luck):
//!
//! - With a **last-write-wins** sink (as a Kafka topic, an HTTP endpoint or a JSON Lines file
//!   is), A's write must not land at all: its assignment ended, so the dispatcher dropped it.
//!   Otherwise the sink holds v1 for ever while every offset is committed and nothing is left to
//!   repair it.
//! - A write already **on the wire** cannot be recalled (the target received it; dropping the
//!   client's future does not undo that). With the SQLite sink and unversioned entities, such a
//!   late write does land, and the sink's fetch-time guard must refuse it: A read v1 before B
//!   read v2.
//!
//! Needs `REFETCH_TEST_KAFKA` (run with `scripts/test`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use refetch::decode::JsonDecoder;
use refetch::{
    Change, EngineConfig, EntityKey, FetchError, FetchOutcome, FetchRequest, Fetcher, KafkaConfig,
    Pipeline, PipelineHandle, RunReport, Sink, SinkError, WriteContext, WriteReport, async_trait,
};
use refetch_sinks::SqliteConfig;
use refetch_sinks::sqlite::SqliteSink;
use refetch_sinks::stored::StoredBody;
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

/// The sink both instances write to, read back as the version of each key's state.
#[async_trait]
trait Shared: Sink + Clone {
    /// The version of the state held per key (deleted or absent keys are missing).
    async fn held(&self) -> BTreeMap<EntityKey, i64>;
}

#[async_trait]
impl Shared for RecordingSink {
    async fn held(&self) -> BTreeMap<EntityKey, i64> {
        RecordingSink::held(self)
    }
}

#[async_trait]
impl Shared for Arc<SqliteSink> {
    /// The version inside the stored body (the entities are written unversioned).
    async fn held(&self) -> BTreeMap<EntityKey, i64> {
        self.snapshot()
            .await
            .expect("sqlite snapshot")
            .into_iter()
            .filter(|(_, row)| !row.deleted)
            .filter_map(|(k, row)| match row.body {
                Some(StoredBody::Json(v)) => {
                    v.get("version").and_then(|v| v.as_i64()).map(|v| (k, v))
                }
                _ => None,
            })
            .collect()
    }
}

/// Instance A's view of the shared sink: once armed, a batch holding a key's first write since
/// arming hangs until the test releases it (a sink that stalls past the drain deadline), then
/// writes. In `on_the_wire` mode the hanging write runs as a task of its own: when the
/// dispatcher drops the write, the task still writes after the release, as a request the target
/// already received would.
#[derive(Clone)]
struct HangingSink<S> {
    inner: S,
    on_the_wire: bool,
    armed: Arc<AtomicBool>,
    release: Arc<tokio::sync::watch::Sender<bool>>,
    state: Arc<Mutex<HangState>>,
}

impl<S: Sink + Clone> HangingSink<S> {
    fn new(inner: S, on_the_wire: bool) -> Self {
        HangingSink {
            inner,
            on_the_wire,
            armed: Arc::new(AtomicBool::new(true)),
            release: Arc::new(tokio::sync::watch::channel(false).0),
            state: Arc::default(),
        }
    }

    fn hangs(&self) -> Vec<Hang> {
        self.state.lock().unwrap().hangs.clone()
    }

    fn hung_keys(&self) -> usize {
        self.state.lock().unwrap().hung_keys.len()
    }

    /// Let every hanging write through; later writes no longer hang.
    fn release(&self) {
        self.armed.store(false, Ordering::SeqCst);
        self.release.send_replace(true);
    }

    /// The index of a new hang when this batch must hang.
    fn hang_index(&self, batch: &[Change]) -> Option<usize> {
        if !self.armed.load(Ordering::SeqCst) {
            return None;
        }
        let mut s = self.state.lock().unwrap();
        let fresh: Vec<EntityKey> = batch
            .iter()
            .map(|c| c.key().clone())
            .filter(|k| !s.hung_keys.contains(k))
            .collect();
        if fresh.is_empty() {
            return None;
        }
        s.hung_keys.extend(fresh);
        s.hangs.push(Hang {
            keys: batch.iter().map(|c| c.key().clone()).collect(),
            started: Instant::now(),
            landed: None,
            hung_for: None,
        });
        Some(s.hangs.len() - 1)
    }
}

/// Wait for the release (at most `MAX_HANG`).
async fn released(mut rx: tokio::sync::watch::Receiver<bool>) {
    tokio::select! {
        _ = rx.wait_for(|r| *r) => {}
        () = tokio::time::sleep(MAX_HANG) => {}
    }
}

fn mark(state: &Mutex<HangState>, index: usize, landed: bool) {
    if let Ok(mut s) = state.lock() {
        let h = &mut s.hangs[index];
        h.landed = Some(landed);
        h.hung_for = Some(h.started.elapsed());
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
        if !self.defused {
            mark(&self.state, self.index, false);
        }
    }
}

#[async_trait]
impl<S: Sink + Clone> Sink for HangingSink<S> {
    async fn write_with(
        &self,
        batch: &[Change],
        ctx: &WriteContext<'_>,
    ) -> Result<WriteReport, SinkError> {
        let Some(index) = self.hang_index(batch) else {
            return self.inner.write_with(batch, ctx).await;
        };
        if self.on_the_wire {
            let (inner, state, rx) = (
                self.inner.clone(),
                self.state.clone(),
                self.release.subscribe(),
            );
            let (batch, at) = (batch.to_vec(), ctx.fetched_at.to_vec());
            let wire = tokio::spawn(async move {
                released(rx).await;
                let r = inner.write_with(&batch, &WriteContext::new(&at)).await;
                mark(&state, index, true);
                r
            });
            return wire
                .await
                .unwrap_or_else(|e| Err(SinkError::transient(format!("write task: {e}"))));
        }
        let mut guard = OnDrop {
            state: self.state.clone(),
            index,
            defused: false,
        };
        released(self.release.subscribe()).await;
        guard.defused = true;
        let r = self.inner.write_with(batch, ctx).await;
        mark(&self.state, index, true);
        r
    }

    async fn write(&self, batch: &[Change]) -> Result<WriteReport, SinkError> {
        self.write_with(batch, &WriteContext::new(&[])).await
    }
}

/// The source without versions on the entities it returns (the sink can guard them only by
/// fetch time); the version stays in the body, for the checks.
#[derive(Clone)]
struct Unversioned(VersionedSource);

#[async_trait]
impl Fetcher for Unversioned {
    async fn fetch(&self, req: &FetchRequest) -> Result<FetchOutcome, FetchError> {
        Ok(match self.0.fetch(req).await? {
            FetchOutcome::Found(mut e) => {
                e.version = None;
                FetchOutcome::Found(e)
            }
            other => other,
        })
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

fn start<F: Fetcher + Clone, S: Sink + Clone>(
    brokers: &str,
    group: &str,
    topic: &str,
    source: &F,
    sink: S,
) -> Instance {
    let mut k = KafkaConfig::new(brokers, group, vec![topic.to_owned()]);
    k.consumer_properties
        .insert("session.timeout.ms".into(), "6000".into());
    k.consumer_properties
        .insert("heartbeat.interval.ms".into(), "500".into());
    let pipeline = Pipeline::builder::<F, S>()
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
async fn differing<S: Shared>(
    sink: &S,
    source: &VersionedSource,
    partitions: &BTreeSet<i32>,
) -> Vec<String> {
    let held = sink.held().await;
    let now = source.snapshot();
    (0..KEYS)
        .filter(|i| partitions.contains(&partition_of(*i)))
        .filter_map(|i| {
            let want = now.get(&key(i)).map(|e| e.version);
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
async fn until_converged<S: Shared>(
    what: &str,
    brokers: &str,
    group: &str,
    topic: &str,
    sink: &S,
    source: &VersionedSource,
    partitions: &BTreeSet<i32>,
    within: Duration,
) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let (done, end, committed) = committed_to_end(brokers, group, topic, partitions).await;
        let diff = differing(sink, source, partitions).await;
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

/// The fence: A's write of v1, pending when its assignment ended, never lands on the
/// last-write-wins sink.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn a_write_hanging_past_the_revoke_never_lands_after_the_new_owner() {
    let shared = RecordingSink::last_write_wins();
    let source = VersionedSource::new();
    tokio::time::timeout(
        CAP,
        scenario("zombie", source.clone(), source, shared, false),
    )
    .await
    .expect("wall-clock cap");
}

/// The fetch-time guard: A's write of v1 is already on the wire when its assignment ends, so it
/// lands after B's v2; the SQLite sink refuses it because A's fetch started before B's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn a_write_already_on_the_wire_is_refused_by_the_fetch_time_guard() {
    let dir = tempfile::tempdir().expect("tempdir");
    let shared = Arc::new(
        SqliteSink::open(&SqliteConfig {
            path: dir.path().join("sink.db"),
            ..SqliteConfig::default()
        })
        .await
        .expect("sqlite sink"),
    );
    let source = VersionedSource::new();
    tokio::time::timeout(
        CAP,
        scenario("wire", Unversioned(source.clone()), source, shared, true),
    )
    .await
    .expect("wall-clock cap");
}

/// The shared steps: A alone, v1 hanging at A, v2, B takes over and converges, then the release.
async fn scenario<F: Fetcher + Clone, S: Shared>(
    name: &str,
    fetcher: F,
    source: VersionedSource,
    shared: S,
    on_the_wire: bool,
) {
    let started = Instant::now();
    let brokers = kafka::brokers().expect("REFETCH_TEST_KAFKA");
    let topic = names::unique(name);
    let group = names::unique(&format!("{name}_group"));
    kafka::create_topic(&brokers, &topic, PARTITIONS)
        .await
        .expect("topic");
    kafka::create_topic(&brokers, &format!("{group}.dlq"), 1)
        .await
        .expect("dead-letter topic");
    let all: BTreeSet<i32> = (0..PARTITIONS).collect();
    let hanging = HangingSink::new(shared.clone(), on_the_wire);

    // A owns every partition; its sink hangs from the start.
    let a = start(&brokers, &group, &topic, &fetcher, hanging.clone());
    refetch_testkit::process::wait_for("a owns every partition", Duration::from_secs(30), || {
        let a = &a;
        let all = all.clone();
        async move { a.partitions().await == all }
    })
    .await
    .unwrap();

    // v1 of every key: A fetches it and its writes hang.
    change_all(&brokers, &topic, &source).await;
    refetch_testkit::process::wait_for(
        "a's first writes of every key to hang",
        Duration::from_secs(30),
        || {
            let n = hanging.hung_keys();
            async move { n == KEYS }
        },
    )
    .await
    .unwrap();

    // The source moves on to v2; B joins and takes partitions over while A's writes hang.
    change_all(&brokers, &topic, &source).await;
    let b = start(&brokers, &group, &topic, &fetcher, shared.clone());
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

    // Only now are A's hanging writes let through: a write of A landing now lands after B's v2.
    hanging.release();
    refetch_testkit::process::wait_for("every hang to end", Duration::from_secs(10), || {
        let done = hanging.hangs().iter().all(|h| h.landed.is_some());
        async move { done }
    })
    .await
    .unwrap();
    let late = differing(&shared, &source, &on_b).await;
    assert!(
        late.is_empty(),
        "a's write of v1 landed over b's v2 after b took the partitions over: {late:?}"
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

    // The scenario did what it says: A's writes of B's keys hung past the drain, and were
    // dropped (the fence), or, on the wire, reached the sink after the release (the guard).
    let b_keys: HashSet<EntityKey> = (0..KEYS)
        .filter(|i| on_b.contains(&partition_of(*i)))
        .map(key)
        .collect();
    let hangs = hanging.hangs();
    let of_b: Vec<&Hang> = hangs
        .iter()
        .filter(|h| h.keys.iter().any(|k| b_keys.contains(k)))
        .collect();
    assert!(
        !of_b.is_empty(),
        "no write of b's keys hung at a: {hangs:?}"
    );
    for h in &of_b {
        assert_eq!(
            h.landed,
            Some(on_the_wire),
            "{}: {h:?}",
            if on_the_wire {
                "the write on the wire reached the sink"
            } else {
                "the pending write was dropped"
            }
        );
        let hung = h.hung_for.unwrap_or_default();
        assert!(hung >= DRAIN, "hung {hung:?}, less than the drain deadline");
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
        "{name}: a kept {on_a:?}, b took {on_b:?}, {} hanging writes ({} dropped), {:.1}s",
        hangs.len(),
        hangs.iter().filter(|h| h.landed == Some(false)).count(),
        started.elapsed().as_secs_f64()
    );
}
