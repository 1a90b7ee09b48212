//! The whole runtime (engine task, dispatch, sink batching, commits) driven by the in-memory
//! consumer, mostly under a paused tokio clock: debounce and max-wait timing, sink outages,
//! source outages, poison keys, revokes, losses and shutdown.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use refetch::consumer::MemoryControl;
use refetch::decode::JsonDecoder;
use refetch::{
    EngineConfig, EntityKey, FetchError, FetchOutcome, FetchRequest, Fetcher, MemoryConsumer,
    MemoryDeadLetters, Pipeline, PipelineHandle, RunReport, TopicPartition, VersionKind,
    async_trait,
};
use refetch_testkit::memory::{RecordingSink, VersionedSource};
use tokio::time::Instant;

const TOPIC: &str = "crm.customers";

/// Records when each fetch started.
#[derive(Clone)]
struct Timed {
    inner: VersionedSource,
    starts: Arc<Mutex<Vec<(EntityKey, Instant)>>>,
}

#[async_trait]
impl Fetcher for Timed {
    async fn fetch(&self, req: &FetchRequest) -> Result<FetchOutcome, FetchError> {
        if let Ok(mut s) = self.starts.lock() {
            s.push((req.key.clone(), Instant::now()));
        }
        self.inner.fetch(req).await
    }
}

struct Harness {
    topics: MemoryConsumer,
    source: VersionedSource,
    sink: RecordingSink,
    dead: MemoryDeadLetters,
    starts: Arc<Mutex<Vec<(EntityKey, Instant)>>>,
    handle: PipelineHandle,
    control: MemoryControl,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<RunReport, refetch::PipelineError>>,
}

fn key(i: usize) -> EntityKey {
    EntityKey::new("customer", format!("c{i}"))
}

fn start(cfg: EngineConfig, partitions: i32) -> Harness {
    let topics = MemoryConsumer::new();
    topics.create_topic(TOPIC, partitions);
    let source = VersionedSource::new();
    let sink = RecordingSink::new();
    let dead = MemoryDeadLetters::new();
    let starts = Arc::new(Mutex::new(Vec::new()));
    let (channels, control) = topics.start();
    let pipeline = Pipeline::builder::<Timed, RecordingSink>()
        .fetcher(Timed {
            inner: source.clone(),
            starts: starts.clone(),
        })
        .sink(sink.clone())
        .consumer(channels)
        .decoder(
            JsonDecoder::fixed_type("customer", "/id").with_version("/v", VersionKind::Integer),
        )
        .engine(cfg)
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
        sink,
        dead,
        starts,
        handle,
        control,
        stop: Some(stop),
        task,
    }
}

impl Harness {
    /// The source changes `i` and a notification is published (versioned or not).
    fn change(&self, i: usize, partition: i32, versioned: bool) -> i64 {
        let v = self.source.change(&key(i));
        let payload = if versioned {
            format!(r#"{{"id":"c{i}","v":{v}}}"#)
        } else {
            format!(r#"{{"id":"c{i}"}}"#)
        };
        self.topics
            .produce(TOPIC, partition, None, payload.as_bytes(), 0)
    }

    /// The source changes `i` and a versioned notification stamped as produced `ago` before
    /// now (wall clock) is published: a record of a backlog.
    fn change_produced_ago(&self, i: usize, partition: i32, ago: Duration) -> i64 {
        let v = self.source.change(&key(i));
        let payload = format!(r#"{{"id":"c{i}","v":{v}}}"#);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        self.topics.produce_at(
            TOPIC,
            partition,
            None,
            payload.as_bytes(),
            now - ago.as_millis() as i64,
        )
    }

    fn fetch_starts(&self, k: &EntityKey) -> Vec<Instant> {
        self.starts
            .lock()
            .map(|s| {
                s.iter()
                    .filter(|(kk, _)| kk == k)
                    .map(|(_, t)| *t)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Wait (in virtual time under a paused clock) until every partition is committed to its end.
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

fn cfg(window_ms: u64, max_wait_ms: u64) -> EngineConfig {
    EngineConfig {
        window: Duration::from_millis(window_ms),
        max_wait: Duration::from_millis(max_wait_ms),
        commit_interval: Duration::from_millis(50),
        sink_linger: Duration::from_millis(1),
        ..EngineConfig::default()
    }
}

#[tokio::test(start_paused = true)]
async fn trailing_debounce_fetches_once_after_the_burst() {
    let h = start(cfg(100, 1_000), 1);
    let t0 = Instant::now();
    for _ in 0..4 {
        h.change(1, 0, false);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.until_committed(Duration::from_secs(5)).await;
    let starts = h.fetch_starts(&key(1));
    assert_eq!(
        starts.len(),
        1,
        "one fetch for a burst of four notifications"
    );
    let at = starts[0].duration_since(t0);
    // The last notification went out at ~150 ms; the trailing window ends ~100 ms later.
    assert!(
        at >= Duration::from_millis(240) && at <= Duration::from_millis(320),
        "fetch at {at:?}"
    );
    assert!(h.sink.diff(&h.source).is_empty());
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn max_wait_flushes_a_key_that_keeps_changing() {
    let h = start(cfg(100, 300), 1);
    let t0 = Instant::now();
    for _ in 0..20 {
        h.change(7, 0, false);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.until_committed(Duration::from_secs(5)).await;
    let starts = h.fetch_starts(&key(7));
    // 1 s of changes every 50 ms, never quiet for 100 ms: flushed every ~300 ms, plus the tail.
    assert!(
        (3..=5).contains(&starts.len()),
        "fetches at {:?}",
        starts
            .iter()
            .map(|s| s.duration_since(t0))
            .collect::<Vec<_>>()
    );
    let first = starts[0].duration_since(t0);
    assert!(
        first <= Duration::from_millis(330),
        "first flush at {first:?}"
    );
    assert!(h.sink.diff(&h.source).is_empty());
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn bursty_workload_converges_with_far_fewer_fetches() {
    let h = start(cfg(50, 500), 3);
    h.source.set_delay(Duration::from_millis(5));
    let mut notifications = 0;
    for round in 0..20 {
        for i in 0..50 {
            // One "save" emits three field events.
            for _ in 0..3 {
                h.change(i, (i % 3) as i32, round % 2 == 0);
                notifications += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.until_committed(Duration::from_secs(30)).await;
    assert!(
        h.sink.diff(&h.source).is_empty(),
        "{:?}",
        h.sink.diff(&h.source)
    );
    let fetches = h.source.total_fetches();
    assert!(
        fetches * 5 < notifications,
        "{fetches} fetches for {notifications} notifications"
    );
    assert!(h.dead.records().is_empty());
    let report = h.stop().await;
    assert!(report.drained);
}

#[tokio::test(start_paused = true)]
async fn a_sink_outage_commits_nothing_and_loses_nothing() {
    let h = start(cfg(20, 200), 2);
    for i in 0..20 {
        h.change(i, (i % 2) as i32, false);
    }
    h.until_committed(Duration::from_secs(5)).await;
    let before = h.topics.committed();
    h.sink.set_down(true);
    for i in 0..20 {
        h.change(i, (i % 2) as i32, true);
    }
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(
        h.topics.committed(),
        before,
        "nothing may be committed while the sink is down"
    );
    h.sink.set_down(false);
    h.until_committed(Duration::from_secs(60)).await;
    assert!(h.sink.diff(&h.source).is_empty());
    assert!(
        h.dead.records().is_empty(),
        "a sink outage dead-letters nothing"
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_source_outage_dead_letters_nothing_but_a_poison_key_is_dead_lettered() {
    let mut c = cfg(20, 200);
    c.retry_budget = 4;
    c.fetch_backoff.max = Duration::from_secs(2);
    let h = start(c, 2);
    h.source.set_down(true);
    for i in 0..30 {
        h.change(i, (i % 2) as i32, false);
    }
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(
        h.dead.records().is_empty(),
        "an outage of the whole source must dead-letter nothing"
    );
    h.source.set_down(false);
    h.until_committed(Duration::from_secs(120)).await;
    assert!(h.sink.diff(&h.source).is_empty());

    // Now one key keeps failing while the others succeed: it is poison.
    h.source.poison(key(3));
    for round in 0..40 {
        for i in 0..30 {
            h.change(i, (i % 2) as i32, false);
        }
        let _ = round;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    h.until_committed(Duration::from_secs(300)).await;
    let dead = h.dead.records();
    assert!(!dead.is_empty(), "the poison key is dead-lettered");
    assert!(
        dead.iter()
            .all(|d| d.header("refetch.entity.id") == Some("c3"))
    );
    assert_eq!(dead[0].header("refetch.reason"), Some("fetch"));
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn revoke_and_loss_mid_run_lose_nothing() {
    let h = start(cfg(30, 300), 2);
    h.source.set_delay(Duration::from_millis(40));
    for i in 0..40 {
        h.change(i, (i % 2) as i32, false);
    }
    tokio::time::sleep(Duration::from_millis(60)).await;
    let p0 = TopicPartition::new(TOPIC, 0);
    let p1 = TopicPartition::new(TOPIC, 1);
    let offsets = h.control.revoke(vec![p0.clone()]).await;
    // What was committed on revoke never passes an unfinished notification: everything after
    // it is redelivered on re-assignment and must still converge.
    assert!(offsets.iter().all(|(tp, _)| *tp == p0));
    for i in 0..40 {
        h.change(i, (i % 2) as i32, false);
    }
    h.control.assign(vec![p0.clone()]);
    tokio::time::sleep(Duration::from_millis(50)).await;
    h.control.lose(vec![p1.clone()]);
    h.control.assign(vec![p1.clone()]);
    h.until_committed(Duration::from_secs(30)).await;
    assert!(
        h.sink.diff(&h.source).is_empty(),
        "{:?}",
        h.sink.diff(&h.source)
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_flushes_pending_keys_without_waiting_out_the_window() {
    let h = start(cfg(10_000, 60_000), 1);
    for i in 0..10 {
        h.change(i, 0, false);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        h.source.total_fetches(),
        0,
        "still inside the debounce window"
    );
    let t0 = Instant::now();
    let sink = h.sink.clone();
    let source = h.source.clone();
    let topics = h.topics.clone();
    let report = h.stop().await;
    assert!(report.drained);
    assert!(Instant::now().duration_since(t0) < Duration::from_secs(5));
    assert!(sink.diff(&source).is_empty());
    let end = topics.end_offsets();
    assert_eq!(topics.committed(), end, "shutdown commits synchronously");
}

#[tokio::test(start_paused = true)]
async fn malformed_and_hostile_records_are_dead_lettered_with_reasons() {
    let h = start(cfg(10, 100), 1);
    let long = format!(r#"{{"id":"{}"}}"#, "x".repeat(2_000));
    for payload in [
        &b"not json"[..],
        b"{}",
        br#"{"id":null}"#,
        br#"{"id":""}"#,
        b"\xff\xfe\x00",
        long.as_bytes(),
    ] {
        h.topics.produce(TOPIC, 0, Some(b"k"), payload, 0);
    }
    h.change(1, 0, false);
    h.until_committed(Duration::from_secs(5)).await;
    let dead = h.dead.records();
    assert_eq!(dead.len(), 6, "{dead:?}");
    let reasons: Vec<_> = dead
        .iter()
        .map(|d| d.header("refetch.reason").unwrap_or(""))
        .collect();
    assert_eq!(reasons.iter().filter(|r| **r == "decode").count(), 5);
    assert_eq!(reasons.iter().filter(|r| **r == "id_too_long").count(), 1);
    assert!(
        dead.iter().all(|d| d.key.as_deref() == Some(&b"k"[..])),
        "original key kept"
    );
    assert!(h.sink.diff(&h.source).is_empty());
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_record_the_sink_rejects_is_dead_lettered_alone() {
    let h = start(cfg(10, 100), 1);
    h.sink.reject(key(2));
    for i in 0..5 {
        h.change(i, 0, false);
    }
    h.until_committed(Duration::from_secs(10)).await;
    let dead = h.dead.records();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].header("refetch.entity.id"), Some("c2"));
    assert_eq!(dead[0].header("refetch.reason"), Some("sink"));
    let held = h.sink.held();
    assert_eq!(held.len(), 4);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn refresh_goes_through_single_flight() {
    let h = start(cfg(10, 100), 1);
    h.source.change(&key(9));
    let out = h.handle.refresh(vec![key(9)]).await;
    assert_eq!(out, vec![(key(9), refetch::RefreshOutcome::Done)]);
    assert_eq!(h.sink.held().get(&key(9)), Some(&1));
    h.stop().await;
}

/// Issue 19.2: once a delete is written, late notifications at or below the delete's version are
/// satisfied from the acknowledged-version cache (a tombstone) without a fetch or a second
/// delete; a newer version (the entity re-created) is fetched and written.
#[tokio::test(start_paused = true)]
async fn late_notifications_of_a_deleted_entity_are_satisfied_by_its_tombstone() {
    let h = start(cfg(10, 100), 1);
    let k = key(1);
    let publish = |v: i64| {
        h.topics.produce(
            TOPIC,
            0,
            None,
            format!(r#"{{"id":"c1","v":{v}}}"#).as_bytes(),
            0,
        )
    };
    h.source.change(&k);
    h.source.change(&k);
    let deleted_at = h.source.delete(&k);
    assert_eq!(deleted_at, 3);
    publish(deleted_at);
    // Gone right after the notification of an unseen version is a stale read for `gone_grace`
    // (10 s); then the lone delete waits `gone_guard.wait` (10 s) for evidence and is written.
    h.until_committed(Duration::from_secs(25)).await;
    let deletes = |h: &Harness| {
        h.sink
            .log()
            .iter()
            .filter(|w| w.key == k && w.delete)
            .count()
    };
    assert_eq!(deletes(&h), 1, "the delete is written: {:?}", h.sink.log());
    let fetched = h.source.fetches_of(&k);
    let satisfied = h
        .handle
        .status()
        .await
        .expect("running")
        .engine
        .counters
        .satisfied_by_version;
    // Late and duplicated notifications, at and below the delete's version.
    for v in [1, 2, 3, 2, 3] {
        publish(v);
    }
    h.until_committed(Duration::from_secs(30)).await;
    assert_eq!(
        h.source.fetches_of(&k),
        fetched,
        "a stale notification of a deleted entity was fetched again"
    );
    assert_eq!(deletes(&h), 1, "the delete was written again");
    let now = h
        .handle
        .status()
        .await
        .expect("running")
        .engine
        .counters
        .satisfied_by_version;
    assert_eq!(
        now - satisfied,
        5,
        "each late notification is satisfied by the tombstone"
    );
    // The entity is created again: its newer version is fetched and written.
    let v = h.source.change(&k);
    publish(v);
    h.until_committed(Duration::from_secs(30)).await;
    assert_eq!(h.sink.held().get(&k), Some(&v));
    assert!(h.sink.diff(&h.source).is_empty());
    assert!(h.dead.records().is_empty());
    h.stop().await;
}

/// Catch-up: a backlog produced a minute before it is read has waited out a 10 s window long
/// ago; its keys are fetched after the catch-up linger (once each, the backlog's notes of a key
/// merged), not after the window. Records produced now wait the window.
#[tokio::test(start_paused = true)]
async fn a_backlog_read_long_after_it_was_produced_is_not_debounced_again() {
    let h = start(
        EngineConfig {
            catch_up_linger: Duration::from_millis(20),
            ..cfg(10_000, 20_000)
        },
        1,
    );
    let t0 = Instant::now();
    for _ in 0..3 {
        for i in 0..5 {
            h.change_produced_ago(i, 0, Duration::from_secs(60));
        }
    }
    h.change(9, 0, true);
    tokio::time::sleep(Duration::from_secs(1)).await;
    for i in 0..5 {
        let starts = h.fetch_starts(&key(i));
        assert_eq!(starts.len(), 1, "key {i}: one fetch for its three notes");
        let at = starts[0].duration_since(t0);
        assert!(
            at <= Duration::from_millis(100),
            "key {i} fetched at {at:?}"
        );
    }
    assert!(
        h.fetch_starts(&key(9)).is_empty(),
        "a fresh notification waits its 10 s window"
    );
    h.until_committed(Duration::from_secs(30)).await;
    let at = h.fetch_starts(&key(9))[0].duration_since(t0);
    assert!(at >= Duration::from_secs(10), "fresh key fetched at {at:?}");
    assert!(h.sink.diff(&h.source).is_empty());
    h.stop().await;
}

/// Commits follow the commit point: with a 10 s commit interval, the offset of a write is
/// committed within the commit linger of the write, not at the next tick.
#[tokio::test(start_paused = true)]
async fn a_commit_follows_the_write_that_moved_the_commit_point() {
    let h = start(
        EngineConfig {
            commit_interval: Duration::from_secs(10),
            commit_linger: Duration::from_millis(50),
            ..cfg(100, 1_000)
        },
        1,
    );
    // Let the first (empty) tick pass.
    tokio::time::sleep(Duration::from_millis(10)).await;
    h.change(1, 0, true);
    let t0 = Instant::now();
    h.until_committed(Duration::from_secs(5)).await;
    let took = t0.elapsed();
    let fetched = h.fetch_starts(&key(1))[0].duration_since(t0);
    assert!(
        took <= fetched + Duration::from_millis(200),
        "committed {took:?} after the notification, fetched at {fetched:?}"
    );
    // A second write, long after: committed promptly again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    h.change(2, 0, true);
    let t1 = Instant::now();
    h.until_committed(Duration::from_secs(5)).await;
    assert!(
        t1.elapsed() <= Duration::from_millis(400),
        "second commit {:?} after its notification",
        t1.elapsed()
    );
    assert!(h.sink.diff(&h.source).is_empty());
    h.stop().await;
}
