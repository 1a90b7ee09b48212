//! Business actions through the whole runtime (engine task, dispatch, sink batching, commits)
//! on the in-memory consumer under a paused clock: one sink batch per action even past the batch
//! limit, completion by count, by quiet window and by max-wait, late members, the failure
//! policies with the correlation header on dead letters, and offsets held until the action's
//! write.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use refetch::action::{ActionConfig, ActionFailurePolicy, CORRELATION_HEADER};
use refetch::decode::{Correlation, CorrelationSource, JsonDecoder};
use refetch::{
    Change, EngineConfig, EntityKey, FetchError, FetchOutcome, FetchRequest, Fetcher,
    MemoryConsumer, MemoryDeadLetters, Pipeline, PipelineHandle, RunReport, Sink, SinkError,
    VersionKind, WriteReport, async_trait,
};
use refetch_testkit::memory::{RecordingSink, VersionedSource};
use tokio::time::Instant;

const TOPIC: &str = "crm.changes";

/// Records the keys of every sink batch, then writes through a [`RecordingSink`].
#[derive(Clone, Default)]
struct BatchLog {
    inner: RecordingSink,
    batches: Arc<Mutex<Vec<Vec<EntityKey>>>>,
}

#[async_trait]
impl Sink for BatchLog {
    async fn write(&self, batch: &[Change]) -> Result<WriteReport, SinkError> {
        let r = self.inner.write(batch).await;
        if r.is_ok() {
            if let Ok(mut b) = self.batches.lock() {
                b.push(batch.iter().map(|c| c.key().clone()).collect());
            }
        }
        r
    }
}

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
    sink: BatchLog,
    dead: MemoryDeadLetters,
    starts: Arc<Mutex<Vec<(EntityKey, Instant)>>>,
    handle: PipelineHandle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<RunReport, refetch::PipelineError>>,
}

fn key(name: &str) -> EntityKey {
    EntityKey::new("customer", name)
}

fn cfg(actions: ActionConfig) -> EngineConfig {
    EngineConfig {
        window: Duration::from_millis(50),
        max_wait: Duration::from_millis(500),
        commit_interval: Duration::from_millis(50),
        sink_linger: Duration::from_millis(1),
        actions,
        ..EngineConfig::default()
    }
}

fn actions(window_ms: u64, max_wait_ms: u64, on_failure: ActionFailurePolicy) -> ActionConfig {
    ActionConfig {
        window: Duration::from_millis(window_ms),
        max_wait: Duration::from_millis(max_wait_ms),
        on_failure,
        ..ActionConfig::default()
    }
}

fn start(cfg: EngineConfig, partitions: i32) -> Harness {
    let topics = MemoryConsumer::new();
    topics.create_topic(TOPIC, partitions);
    let source = VersionedSource::new();
    let sink = BatchLog::default();
    let dead = MemoryDeadLetters::new();
    let starts = Arc::new(Mutex::new(Vec::new()));
    let (channels, _control) = topics.start();
    let decoder = JsonDecoder::fixed_type("customer", "/id")
        .with_version("/v", VersionKind::Integer)
        .with_correlation(Correlation {
            id: CorrelationSource::Pointer("/tx".into()),
            size_pointer: Some("/of".into()),
        });
    let pipeline = Pipeline::builder::<Timed, BatchLog>()
        .fetcher(Timed {
            inner: source.clone(),
            starts: starts.clone(),
        })
        .sink(sink.clone())
        .consumer(channels)
        .decoder(decoder)
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
        stop: Some(stop),
        task,
    }
}

impl Harness {
    /// A plain change of `name` and its notification.
    fn change(&self, name: &str, partition: i32) -> i64 {
        let v = self.source.change(&key(name));
        let payload = format!(r#"{{"id":"{name}","v":{v}}}"#);
        self.topics
            .produce(TOPIC, partition, None, payload.as_bytes(), 0)
    }

    /// The source changes `name` as part of action `tx` (of `size` entities, if announced); the
    /// notification goes to `partition`. Returns the offset.
    fn member(&self, tx: &str, size: Option<usize>, name: &str, partition: i32) -> i64 {
        let v = self.source.change(&key(name));
        self.notify_member(tx, size, name, v, partition)
    }

    /// A member notification without a source change (a duplicate or late copy).
    fn notify_member(
        &self,
        tx: &str,
        size: Option<usize>,
        name: &str,
        v: i64,
        partition: i32,
    ) -> i64 {
        let payload = match size {
            Some(n) => format!(r#"{{"id":"{name}","v":{v},"tx":"{tx}","of":{n}}}"#),
            None => format!(r#"{{"id":"{name}","v":{v},"tx":"{tx}"}}"#),
        };
        self.topics
            .produce(TOPIC, partition, None, payload.as_bytes(), 0)
    }

    fn batches(&self) -> Vec<Vec<EntityKey>> {
        self.sink
            .batches
            .lock()
            .map(|b| b.clone())
            .unwrap_or_default()
    }

    /// The batches holding any of `keys`.
    fn batches_with(&self, keys: &[EntityKey]) -> Vec<Vec<EntityKey>> {
        self.batches()
            .into_iter()
            .filter(|b| b.iter().any(|k| keys.contains(k)))
            .collect()
    }

    fn first_fetch(&self, k: &EntityKey) -> Option<Instant> {
        self.starts
            .lock()
            .ok()?
            .iter()
            .find(|(kk, _)| kk == k)
            .map(|(_, t)| *t)
    }

    async fn counters(&self) -> refetch::stats::Counters {
        self.handle
            .status()
            .await
            .map(|s| s.engine.counters)
            .unwrap_or_default()
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

#[tokio::test(start_paused = true)]
async fn each_action_is_one_sink_batch_even_past_the_batch_limit() {
    // Batches of at most 2 changes: only grouping keeps a 4-entity action together.
    let h = start(
        EngineConfig {
            sink_batch_max: 2,
            ..cfg(actions(200, 2_000, ActionFailurePolicy::DeadLetterAll))
        },
        2,
    );
    let mut groups = Vec::new();
    for a in 0..12 {
        let tx = format!("tx-{a}");
        let names: Vec<String> = (0..4).map(|m| format!("a{a}-m{m}")).collect();
        // Members on both partitions, in an order that differs per action, with plain changes
        // of other entities in between.
        for (i, n) in names.iter().enumerate().rev() {
            h.member(&tx, Some(4), n, ((a + i) % 2) as i32);
            h.change(&format!("plain-{}", (a * 4 + i) % 7), (i % 2) as i32);
        }
        groups.push(names.iter().map(|n| key(n)).collect::<Vec<_>>());
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    h.until_committed(Duration::from_secs(10)).await;
    assert!(h.sink.inner.diff(&h.source).is_empty(), "sink == source");
    for g in &groups {
        let with = h.batches_with(g);
        assert_eq!(with.len(), 1, "one batch holds the action {g:?}: {with:?}");
        let got: BTreeSet<&EntityKey> = with[0].iter().filter(|k| g.contains(k)).collect();
        assert_eq!(got.len(), 4, "the whole action is in it: {with:?}");
    }
    let c = h.counters().await;
    assert_eq!(c.actions_completed_by_count, 12);
    assert_eq!(c.actions_written, 12);
    assert_eq!(c.actions_incomplete, 0);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_action_without_a_size_waits_for_its_quiet_window() {
    let h = start(
        cfg(actions(300, 5_000, ActionFailurePolicy::DeadLetterAll)),
        1,
    );
    let t0 = Instant::now();
    let names = ["q1", "q2", "q3"];
    for n in names {
        h.member("quiet", None, n, 0);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    h.until_committed(Duration::from_secs(10)).await;
    // The last member went out at ~200 ms; the quiet window ends ~300 ms later.
    for n in names {
        let at = h.first_fetch(&key(n)).expect("fetched").duration_since(t0);
        assert!(
            at >= Duration::from_millis(490) && at <= Duration::from_millis(600),
            "{n} fetched at {at:?}"
        );
    }
    let keys: Vec<EntityKey> = names.iter().map(|n| key(n)).collect();
    assert_eq!(h.batches_with(&keys).len(), 1);
    let c = h.counters().await;
    assert_eq!(c.actions_completed_by_timeout, 1);
    assert_eq!(c.actions_incomplete, 0);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn max_wait_caps_an_action_and_late_members_are_ordinary_notifications() {
    let h = start(
        cfg(actions(300, 1_000, ActionFailurePolicy::DeadLetterAll)),
        1,
    );
    let t0 = Instant::now();
    // A member every 200 ms: never quiet for 300 ms. The action closes at ~1 s; members after
    // that are late and written as ordinary notifications.
    for i in 0..10 {
        h.member("long", None, &format!("l{i}"), 0);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    h.until_committed(Duration::from_secs(10)).await;
    let first = h
        .first_fetch(&key("l0"))
        .expect("fetched")
        .duration_since(t0);
    assert!(
        first >= Duration::from_millis(1_000) && first <= Duration::from_millis(1_100),
        "the action was fetched at {first:?}, capped by max_wait"
    );
    let early: Vec<EntityKey> = (0..5).map(|i| key(&format!("l{i}"))).collect();
    assert_eq!(
        h.batches_with(&early).len(),
        1,
        "members before max_wait: one batch"
    );
    let c = h.counters().await;
    assert!(c.action_late_members >= 4, "{c:?}");
    assert_eq!(c.actions_completed_by_timeout, 1);
    assert!(h.sink.inner.diff(&h.source).is_empty());
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_action_short_of_its_size_falls_back_and_counts_as_incomplete() {
    let h = start(
        cfg(actions(200, 1_000, ActionFailurePolicy::DeadLetterAll)),
        1,
    );
    // Announced 3, only 2 arrive here (the third went to another instance).
    h.member("split", Some(3), "s1", 0);
    h.member("split", Some(3), "s2", 0);
    h.until_committed(Duration::from_secs(10)).await;
    let c = h.counters().await;
    assert_eq!(c.actions_incomplete, 1);
    assert_eq!(c.actions_written, 0);
    assert!(
        h.sink.inner.diff(&h.source).is_empty(),
        "members written normally"
    );
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn offsets_are_released_only_with_the_actions_write() {
    let h = start(
        cfg(actions(100, 1_000, ActionFailurePolicy::DeadLetterAll)),
        2,
    );
    h.sink.inner.set_down(true);
    h.member("held", Some(3), "h1", 0);
    h.member("held", Some(3), "h2", 1);
    h.member("held", Some(3), "h3", 0);
    // Long enough for the fetches, the (failing) write attempts and many commit intervals.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let committed = h.topics.committed();
    assert!(
        committed.values().all(|o| *o == 0),
        "nothing committed while the action's write is not durable: {committed:?}"
    );
    assert!(h.batches().is_empty());
    h.sink.inner.set_down(false);
    h.until_committed(Duration::from_secs(30)).await;
    let keys = [key("h1"), key("h2"), key("h3")];
    assert_eq!(h.batches_with(&keys).len(), 1);
    h.stop().await;
}

/// Runs an action of three members where `bad` can never be fetched.
async fn failing_member(policy: ActionFailurePolicy) -> (Harness, BTreeMap<EntityKey, i64>) {
    let h = start(
        EngineConfig {
            retry_budget: 2,
            fetch_backoff: refetch::Backoff {
                initial: Duration::from_millis(50),
                max: Duration::from_millis(100),
                multiplier: 2.0,
            },
            ..cfg(actions(100, 1_000, policy))
        },
        1,
    );
    // Healthy traffic for other keys, so the bad key's failures spend its budget.
    for i in 0..20 {
        h.change(&format!("ok{i}"), 0);
    }
    h.source.poison(key("bad"));
    h.member("fails", Some(3), "good1", 0);
    h.member("fails", Some(3), "bad", 0);
    h.member("fails", Some(3), "good2", 0);
    h.until_committed(Duration::from_secs(30)).await;
    let held = h.sink.inner.held();
    (h, held)
}

#[tokio::test(start_paused = true)]
async fn dead_letter_all_writes_nothing_of_a_failed_action() {
    let (h, held) = failing_member(ActionFailurePolicy::DeadLetterAll).await;
    for n in ["good1", "bad", "good2"] {
        assert!(
            !held.contains_key(&key(n)),
            "{n} must not be written: {held:?}"
        );
    }
    let dead = h.dead.records();
    let correlated: Vec<_> = dead
        .iter()
        .filter(|d| d.header(CORRELATION_HEADER) == Some("fails"))
        .collect();
    assert_eq!(correlated.len(), 3, "every member dead-lettered: {dead:?}");
    assert_eq!(h.counters().await.actions_dead_lettered, 1);
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn write_succeeded_writes_the_others_in_one_batch() {
    let (h, held) = failing_member(ActionFailurePolicy::WriteSucceeded).await;
    assert!(held.contains_key(&key("good1")) && held.contains_key(&key("good2")));
    assert!(!held.contains_key(&key("bad")));
    assert_eq!(h.batches_with(&[key("good1"), key("good2")]).len(), 1);
    let dead = h.dead.records();
    let correlated: Vec<_> = dead
        .iter()
        .filter(|d| d.header(CORRELATION_HEADER) == Some("fails"))
        .collect();
    assert_eq!(correlated.len(), 1, "only the failed member: {dead:?}");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_member_after_the_write_is_an_ordinary_notification() {
    let h = start(
        cfg(actions(100, 1_000, ActionFailurePolicy::DeadLetterAll)),
        1,
    );
    h.member("late", Some(2), "d1", 0);
    h.member("late", Some(2), "d2", 0);
    h.until_committed(Duration::from_secs(10)).await;
    // Another change under the same correlation id, after the action was written.
    h.member("late", Some(2), "d1", 0);
    h.until_committed(Duration::from_secs(10)).await;
    let c = h.counters().await;
    assert_eq!(c.action_late_members, 1);
    assert_eq!(c.actions_written, 1, "no second action was opened");
    assert!(h.sink.inner.diff(&h.source).is_empty());
    h.stop().await;
}
