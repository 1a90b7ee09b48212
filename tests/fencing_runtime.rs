//! Fenced assignments and bounded memory, through the whole runtime on the in-memory consumer
//! under a paused clock: stale revokes and commits, writes fenced when their assignment ends,
//! batch tasks that must not outlive `run`, transaction markers and the commit point, and one
//! test per memory cap (it pauses, it resumes below the low-water mark, the pause is re-applied
//! after an assignment), including a flood of one business action's members.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use refetch::consumer::{ConsumerCommand, ConsumerEvent, MemoryControl};
use refetch::decode::{Correlation, CorrelationSource, JsonDecoder};
use refetch::dlq::{DeadLetter, DeadLetterFailure};
use refetch::{
    DeadLetterWriter, EngineConfig, EntityKey, FetchError, FetchOutcome, FetchRequest, Fetcher,
    MemoryConsumer, MemoryDeadLetters, Pipeline, PipelineHandle, RunReport, Status, TopicPartition,
    VersionKind, async_trait,
};
use refetch_testkit::memory::{RecordingSink, VersionedSource};
use tokio::time::Instant;

const TOPIC: &str = "crm.customers";

fn key(i: usize) -> EntityKey {
    EntityKey::new("customer", format!("c{i}"))
}

fn cfg() -> EngineConfig {
    EngineConfig {
        window: Duration::from_millis(20),
        max_wait: Duration::from_millis(200),
        commit_interval: Duration::from_millis(50),
        sink_linger: Duration::from_millis(1),
        ..EngineConfig::default()
    }
}

/// A fetcher whose answers can be made to wait (per call), over a versioned source.
#[derive(Clone)]
struct Source {
    inner: VersionedSource,
    /// Bodies this large (bytes) are returned, to fill the byte caps.
    body: Arc<Mutex<usize>>,
}

#[async_trait]
impl Fetcher for Source {
    async fn fetch(&self, req: &FetchRequest) -> Result<FetchOutcome, FetchError> {
        let out = self.inner.fetch(req).await?;
        let pad = self.body.lock().map(|b| *b).unwrap_or(0);
        Ok(match out {
            FetchOutcome::Found(mut e) if pad > 0 => {
                e.body = vec![b' '; pad].into();
                FetchOutcome::Found(e)
            }
            other => other,
        })
    }
}

/// Dead letters that are held (not acknowledged) while `hold` is set.
#[derive(Clone, Default)]
struct HeldDeadLetters {
    inner: MemoryDeadLetters,
    hold: Arc<std::sync::atomic::AtomicBool>,
}

#[async_trait]
impl DeadLetterWriter for HeldDeadLetters {
    async fn send(&self, record: &DeadLetter) -> Result<(), DeadLetterFailure> {
        while self.hold.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.inner.send(record).await
    }
}

struct Harness {
    topics: MemoryConsumer,
    source: VersionedSource,
    body: Arc<Mutex<usize>>,
    sink: RecordingSink,
    dead: HeldDeadLetters,
    handle: PipelineHandle,
    control: MemoryControl,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<RunReport, refetch::PipelineError>>,
}

struct Setup {
    cfg: EngineConfig,
    partitions: i32,
    sink: RecordingSink,
    revoke_timeout: Duration,
    decoder: JsonDecoder,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            cfg: cfg(),
            partitions: 1,
            sink: RecordingSink::last_write_wins(),
            revoke_timeout: Duration::from_secs(2),
            decoder: JsonDecoder::fixed_type("customer", "/id")
                .with_version("/v", VersionKind::Integer),
        }
    }
}

fn start(setup: Setup) -> Harness {
    let topics = MemoryConsumer::new().with_revoke_timeout(setup.revoke_timeout);
    topics.create_topic(TOPIC, setup.partitions);
    let source = VersionedSource::new();
    let body = Arc::new(Mutex::new(0));
    let dead = HeldDeadLetters::default();
    let (channels, control) = topics.start();
    let pipeline = Pipeline::builder::<Source, RecordingSink>()
        .fetcher(Source {
            inner: source.clone(),
            body: body.clone(),
        })
        .sink(setup.sink.clone())
        .consumer(channels)
        .decoder(setup.decoder)
        .engine(setup.cfg)
        .dead_letters(dead.clone())
        .build()
        .expect("valid pipeline");
    let handle = pipeline.handle();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(pipeline.run(async move {
        let _ = stopped.await;
    }));
    Harness {
        topics,
        source,
        body,
        sink: setup.sink,
        dead,
        handle,
        control,
        stop: Some(stop),
        task,
    }
}

impl Harness {
    /// The source changes `i`; a versioned notification is published.
    fn change(&self, i: usize, partition: i32) -> i64 {
        let v = self.source.change(&key(i));
        let payload = format!(r#"{{"id":"c{i}","v":{v}}}"#);
        self.topics
            .produce(TOPIC, partition, None, payload.as_bytes(), 0)
    }

    async fn status(&self) -> Status {
        self.handle.status().await.expect("pipeline running")
    }

    /// Wait (in virtual time) until every partition is committed to its end.
    async fn until_committed(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let end = self.topics.end_offsets();
            let committed = self.topics.committed();
            if !end.is_empty() && end.iter().all(|(tp, o)| committed.get(tp) == Some(o)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not committed to the end in time: end {end:?}, committed {committed:?}, status {:?}",
                self.handle.status().await
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(mut self) -> RunReport {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task
            .await
            .expect("pipeline task")
            .expect("pipeline run")
    }
}

fn p(n: i32) -> TopicPartition {
    TopicPartition::new(TOPIC, n)
}

// ----- fenced assignments ------------------------------------------------------------------------

/// A revoke whose handler gives up before the engine's drain is over, and a partition assigned
/// straight back: the stale revoke must not drop the new assignment (every later record of the
/// partition would be ignored while the consumer looks healthy).
#[tokio::test(start_paused = true)]
async fn a_stale_revoke_never_drops_the_partition_assigned_back() {
    let h = start(Setup::default());
    h.sink.set_delay(Duration::from_secs(3));
    for i in 0..5 {
        h.change(i, 0);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The handler told the engine 2 s but gives up after 200 ms (the writes are still pending).
    let committed = h
        .control
        .revoke_impatient(
            vec![p(0)],
            Duration::from_secs(2),
            Duration::from_millis(200),
        )
        .await;
    assert!(committed.is_empty(), "let go uncommitted");
    h.control.assign(vec![p(0)]);
    h.sink.set_delay(Duration::ZERO);
    for i in 0..5 {
        h.change(i, 0);
    }
    // The old revoke's deadline passes inside the engine; the new assignment keeps working.
    h.until_committed(Duration::from_secs(30)).await;
    assert!(
        h.sink.diff(&h.source).is_empty(),
        "{:?}",
        h.sink.diff(&h.source)
    );
    let st = h.status().await;
    assert_eq!(
        st.engine.partitions.len(),
        1,
        "partition 0 is owned: {st:?}"
    );
    assert_eq!(
        st.engine.counters.unassigned_records, 0,
        "no record was ignored"
    );
    h.stop().await;
}

/// A write waiting on a slow sink when the revoke's deadline passes: the partition is let go,
/// another member writes the newer state, and the old write must never land after it (a
/// last-write-wins sink would hold the stale state forever).
#[tokio::test(start_paused = true)]
async fn a_write_still_pending_when_the_revoke_deadline_passes_never_lands() {
    let h = start(Setup::default());
    h.change(1, 0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The write is issued; the sink now hangs for longer than the drain.
    h.sink.set_delay(Duration::from_secs(60));
    h.change(1, 0); // v2, fetched after the revoke only by the new owner
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = h.sink.log().len();
    let committed = h.control.revoke(vec![p(0)]).await;
    assert!(
        committed.iter().all(|(_, o)| *o == 0),
        "nothing past the unfinished write is committed: {committed:?}"
    );
    // The new owner writes v2 (simulated: straight into the same sink, as another instance).
    h.sink.set_delay(Duration::ZERO);
    let v2 = refetch::Change::Upsert {
        key: key(1),
        entity: refetch::Entity::json("{}", Some(refetch::Version::Int(2))),
    };
    refetch::Sink::write(&h.sink, std::slice::from_ref(&v2))
        .await
        .expect("the new owner's write");
    tokio::time::sleep(Duration::from_secs(120)).await;
    let late: Vec<_> = h.sink.log().into_iter().skip(before + 1).collect();
    assert!(
        late.is_empty(),
        "the old owner's write landed after the new owner's: {late:?}"
    );
    assert_eq!(h.sink.held().get(&key(1)), Some(&2));
    h.stop().await;
}

/// Commits of an assignment that is no longer current are dropped by the consumer driver, even
/// when the partition was assigned back in a new epoch: the broker accepts any commit it is sent,
/// so a stale one would move the committed offset backwards.
#[tokio::test(start_paused = true)]
async fn a_commit_of_an_ended_assignment_never_reaches_the_broker() {
    let topics = MemoryConsumer::new();
    topics.create_topic(TOPIC, 1);
    for i in 0..20 {
        topics.produce(TOPIC, 0, None, format!(r#"{{"id":"c{i}"}}"#).as_bytes(), 0);
    }
    let (mut channels, control) = topics.start();
    let Some(ConsumerEvent::Assigned(first)) = channels.events.recv().await else {
        panic!("assigned first");
    };
    let old = first[0].clone();
    // Revoke: answer with offset 10, which the driver commits.
    let revoke = tokio::spawn({
        let control = control.clone();
        async move { control.revoke(vec![p(0)]).await }
    });
    let answered = loop {
        match channels.events.recv().await {
            Some(ConsumerEvent::Revoke { reply, .. }) => {
                let _ = reply.send(vec![(old.clone(), 10)]);
                break true;
            }
            Some(_) => continue,
            None => break false,
        }
    };
    assert!(answered);
    assert_eq!(revoke.await.expect("revoke"), vec![(p(0), 10)]);
    control.assign(vec![p(0)]);
    // The new owner (us again, in a new epoch, or another member) moved on.
    control.commit_as_other_member(vec![(p(0), 15)]);
    tokio::time::sleep(Duration::from_millis(10)).await;
    // A periodic commit of the old epoch, queued before the revoke, arrives now.
    let (tx, rx) = tokio::sync::oneshot::channel();
    channels
        .commands
        .send(ConsumerCommand::Commit {
            offsets: vec![(old.clone(), 5)],
            metadata: Vec::new(),
            reply: tx,
        })
        .expect("driver running");
    let result = rx.await.expect("answered");
    assert_eq!(result, Ok(vec![]), "the stale commit is dropped");
    assert_eq!(topics.committed().get(&p(0)), Some(&15));
    assert!(
        topics.commit_log().iter().all(|(_, o)| *o != 5),
        "offset 5 never reached the broker: {:?}",
        topics.commit_log()
    );
}

/// A sink that is down when the run ends: its batch must not be retried (and land) after
/// `run` returned.
#[tokio::test(start_paused = true)]
async fn no_write_lands_after_run_returned() {
    let h = start(Setup {
        cfg: EngineConfig {
            shutdown_deadline: Duration::from_secs(1),
            ..cfg()
        },
        ..Setup::default()
    });
    h.sink.set_down(true);
    h.change(3, 0);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sink = h.sink.clone();
    let report = h.stop().await;
    assert!(!report.drained, "the write could not finish");
    sink.set_down(false);
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert!(
        sink.log().is_empty(),
        "a batch task outlived run and wrote: {:?}",
        sink.log()
    );
}

/// A partition whose last records are followed by a transaction marker: once everything is
/// satisfied, the commit point is the consumer's position (past the marker), so lag reaches 0.
#[tokio::test(start_paused = true)]
async fn the_commit_point_follows_the_position_past_transaction_markers() {
    let h = start(Setup::default());
    for i in 0..3 {
        h.change(i, 0);
    }
    h.topics.produce_marker(TOPIC, 0);
    h.until_committed(Duration::from_secs(10)).await;
    assert_eq!(h.topics.committed().get(&p(0)), Some(&4));
    h.stop().await;
}

/// A revoke arriving while the pipeline shuts down is answered at once, and the final commit
/// still completes.
#[tokio::test(start_paused = true)]
async fn a_revoke_during_shutdown_is_answered_and_the_final_commit_completes() {
    let h = start(Setup {
        partitions: 2,
        cfg: EngineConfig {
            commit_interval: Duration::from_secs(3600),
            ..cfg()
        },
        ..Setup::default()
    });
    for i in 0..10 {
        h.change(i, (i % 2) as i32);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let control = h.control.clone();
    let topics = h.topics.clone();
    let asked = Instant::now();
    let revoke = tokio::spawn(async move {
        let committed = control.revoke(vec![p(1)]).await;
        (committed, Instant::now())
    });
    let report = h.stop().await;
    assert!(report.drained);
    let (committed, answered) = revoke.await.expect("revoke answered");
    // Answered by the engine, not given up on by the consumer after its revoke timeout (10 s).
    let took = answered.duration_since(asked);
    assert!(
        took < Duration::from_secs(2),
        "the revoke waited {took:?} for an engine that was shutting down"
    );
    assert!(!committed.is_empty() || topics.committed().contains_key(&p(1)));
    let end = topics.end_offsets();
    let done = topics.committed();
    assert_eq!(
        done.get(&p(0)),
        end.get(&p(0)),
        "final commit of partition 0"
    );
}

/// A revoke still waiting for a write when the shutdown deadline passes is answered as the
/// pipeline stops (with nothing more to commit for it), not left to the consumer's own timeout.
#[tokio::test(start_paused = true)]
async fn a_revoke_pending_when_the_shutdown_deadline_passes_is_answered_at_once() {
    let h = start(Setup {
        partitions: 2,
        cfg: EngineConfig {
            shutdown_deadline: Duration::from_millis(300),
            rebalance_drain: Duration::from_secs(8),
            ..cfg()
        },
        ..Setup::default()
    });
    h.sink.set_delay(Duration::from_secs(30));
    for i in 0..4 {
        h.change(i, (i % 2) as i32);
    }
    // The writes are issued and hang.
    until_status(&h, Duration::from_secs(5), "writes in flight", |s| {
        s.engine.pending_keys == 4 && s.engine.fetches_in_flight == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let control = h.control.clone();
    let asked = Instant::now();
    let revoke = tokio::spawn(async move {
        let committed = control.revoke(vec![p(1)]).await;
        (committed, Instant::now())
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let report = h.stop().await;
    assert!(!report.drained, "the writes were still hanging");
    let (_, answered) = revoke.await.expect("revoke answered");
    let took = answered.duration_since(asked);
    assert!(
        took < Duration::from_secs(2),
        "the revoke waited {took:?} after the pipeline stopped"
    );
}

// ----- memory caps ------------------------------------------------------------------------------

/// Wait until `cond` holds for the status, sampling every 10 ms (virtual), or panic.
async fn until_status(h: &Harness, limit: Duration, what: &str, cond: impl Fn(&Status) -> bool) {
    let deadline = Instant::now() + limit;
    loop {
        let st = h.status().await;
        if cond(&st) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {st:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The shared shape of every cap test: fill, see the pause, see the pause re-applied after an
/// assignment, drain below the low-water mark, see the resume, converge.
async fn cap_pauses_resumes_and_reapplies(h: Harness, release: impl FnOnce(&Harness)) {
    until_status(&h, Duration::from_secs(30), "never paused", |s| {
        s.engine.globally_paused
    })
    .await;
    assert!(
        h.control.paused().await.contains(&p(0)),
        "the consumer was told to pause"
    );
    // Revoked and assigned back while paused: the new assignment must start paused too.
    h.control
        .revoke_within(vec![p(0)], Some(Duration::from_millis(50)))
        .await;
    h.control.assign(vec![p(0)]);
    until_status(&h, Duration::from_secs(5), "not re-assigned", |s| {
        s.engine.partitions.len() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        h.control.paused().await.contains(&p(0)),
        "the pause is re-applied after the assignment"
    );
    release(&h);
    until_status(&h, Duration::from_secs(120), "never resumed", |s| {
        !s.engine.globally_paused
    })
    .await;
    h.until_committed(Duration::from_secs(300)).await;
    assert!(
        h.sink.diff(&h.source).is_empty(),
        "{:?}",
        h.sink.diff(&h.source)
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_pending_key_cap_pauses_resumes_and_is_reapplied() {
    let h = start(Setup {
        cfg: EngineConfig {
            max_pending_keys: 100,
            fetch_concurrency: 4,
            ..cfg()
        },
        sink: RecordingSink::new(),
        ..Setup::default()
    });
    h.source.set_delay(Duration::from_secs(5));
    for i in 0..1_000 {
        h.change(i, 0);
    }
    cap_pauses_resumes_and_reapplies(h, |h| h.source.set_delay(Duration::from_millis(1))).await;
}

/// Fetched bodies waiting for a slow sink count against the byte cap.
#[tokio::test(start_paused = true)]
async fn bodies_awaiting_the_sink_count_against_the_byte_cap() {
    let h = start(Setup {
        cfg: EngineConfig {
            max_pending_bytes: 1024 * 1024,
            sink_batch_max: 8,
            sink_concurrency: 1,
            ..cfg()
        },
        sink: RecordingSink::new(),
        ..Setup::default()
    });
    if let Ok(mut b) = h.body.lock() {
        *b = 64 * 1024;
    }
    h.sink.set_delay(Duration::from_secs(5));
    for i in 0..200 {
        h.change(i, 0);
    }
    until_status(&h, Duration::from_secs(60), "bodies not counted", |s| {
        s.engine.memory.body_bytes >= 512 * 1024
    })
    .await;
    cap_pauses_resumes_and_reapplies(h, |h| h.sink.set_delay(Duration::ZERO)).await;
}

/// Dead letters waiting for the broker's acknowledgement count against the byte cap.
#[tokio::test(start_paused = true)]
async fn unacknowledged_dead_letters_count_against_the_byte_cap() {
    let h = start(Setup {
        cfg: EngineConfig {
            max_pending_bytes: 512 * 1024,
            ..cfg()
        },
        sink: RecordingSink::new(),
        ..Setup::default()
    });
    h.dead.hold.store(true, std::sync::atomic::Ordering::SeqCst);
    // Undecodable records of 8 KiB each: their dead letters keep the original payload.
    let junk = vec![b'x'; 8 * 1024];
    for _ in 0..200 {
        h.topics.produce(TOPIC, 0, None, &junk, 0);
    }
    until_status(
        &h,
        Duration::from_secs(60),
        "dead letters not counted",
        |s| s.engine.memory.dead_letter_bytes >= 256 * 1024,
    )
    .await;
    let dead = h.dead.clone();
    cap_pauses_resumes_and_reapplies(h, move |_| {
        dead.hold.store(false, std::sync::atomic::Ordering::SeqCst)
    })
    .await;
}

/// A partition's outstanding offsets reach their cap: that partition pauses (the others do not)
/// and resumes below the low-water mark.
#[tokio::test(start_paused = true)]
async fn the_outstanding_offsets_cap_pauses_one_partition() {
    let h = start(Setup {
        partitions: 2,
        cfg: EngineConfig {
            max_outstanding_per_partition: 200,
            ..cfg()
        },
        sink: RecordingSink::new(),
        ..Setup::default()
    });
    h.sink.set_delay(Duration::from_secs(5));
    for i in 0..1_000 {
        h.change(i, 0);
    }
    h.change(5_000, 1);
    until_status(
        &h,
        Duration::from_secs(30),
        "partition 0 never paused",
        |s| {
            s.engine
                .partitions
                .iter()
                .any(|p| p.partition == 0 && p.paused)
        },
    )
    .await;
    let st = h.status().await;
    assert!(
        st.engine
            .partitions
            .iter()
            .any(|p| p.partition == 1 && !p.paused),
        "only the full partition pauses: {st:?}"
    );
    assert!(!st.engine.globally_paused);
    h.sink.set_delay(Duration::ZERO);
    until_status(&h, Duration::from_secs(60), "never resumed", |s| {
        s.engine.partitions.iter().all(|p| !p.paused)
    })
    .await;
    h.until_committed(Duration::from_secs(120)).await;
    h.stop().await;
}

/// One business action of 20,000 members against a cap of 1,000 pending keys: members held by
/// the action count, so consumption pauses instead of holding all 20,000. (An action larger
/// than the cap cannot be written atomically: it completes short and its members fall back to
/// normal writes.)
#[tokio::test(start_paused = true)]
async fn a_flood_of_one_actions_members_is_held_within_the_key_cap() {
    const CAP: usize = 1_000;
    let decoder = JsonDecoder::fixed_type("customer", "/id")
        .with_version("/v", VersionKind::Integer)
        .with_correlation(Correlation {
            id: CorrelationSource::Pointer("/tx".into()),
            size_pointer: Some("/n".into()),
        });
    let h = start(Setup {
        cfg: EngineConfig {
            max_pending_keys: CAP,
            actions: refetch::ActionConfig {
                window: Duration::from_millis(100),
                max_wait: Duration::from_secs(2),
                ..refetch::ActionConfig::default()
            },
            ..cfg()
        },
        sink: RecordingSink::new(),
        decoder,
        ..Setup::default()
    });
    for i in 0..20_000 {
        let v = h.source.change(&key(i));
        let payload = format!(r#"{{"id":"c{i}","v":{v},"tx":"flood","n":20000}}"#);
        h.topics.produce(TOPIC, 0, None, payload.as_bytes(), 0);
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut peak = 0;
    let mut peak_seen = 0u64;
    loop {
        let st = h.status().await;
        peak = peak.max(st.engine.memory.keys);
        // Counted outside the engine: records taken in and not yet written (every record is a
        // key of its own).
        let written = h
            .sink
            .log()
            .iter()
            .map(|w| w.key.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .len() as u64;
        peak_seen = peak_seen.max(h.topics.delivered().saturating_sub(written));
        let end = h.topics.end_offsets();
        if h.topics.committed().get(&p(0)) == end.get(&p(0)) {
            break;
        }
        assert!(Instant::now() < deadline, "never converged: {st:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // One delivery batch (500 records) may arrive between crossing the cap and the pause.
    assert!(
        peak <= CAP + 500,
        "held {peak} keys and action members against a cap of {CAP}"
    );
    assert!(
        peak_seen <= (CAP + 500) as u64,
        "{peak_seen} records taken in and not written against a cap of {CAP}"
    );
    assert!(h.sink.diff(&h.source).is_empty());
    h.stop().await;
}
