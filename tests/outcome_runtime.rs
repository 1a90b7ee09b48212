//! The outcome policy through the whole runtime (in-memory consumer, paused clock): an outage is
//! never poison, deletes need evidence per source, panics and oversized dead letters are
//! outcomes, and a failed business action dead-letters only its own notifications.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use refetch::decode::JsonDecoder;
use refetch::dlq::{DeadLetter, DeadLetterFailure};
use refetch::{
    DeadLetterWriter, EngineConfig, EntityKey, FailureCause, FetchError, FetchOutcome,
    FetchRequest, Fetcher, GoneGuardConfig, MemoryConsumer, MemoryDeadLetters, Pipeline,
    PipelineHandle, RefreshOutcome, RunReport, Status, TopicPartition, VersionKind, async_trait,
};
use refetch_testkit::memory::{RecordingSink, VersionedSource};
use tokio::time::Instant;

const TOPIC: &str = "crm.changes";

/// How every fetch of a source answers, whatever the key.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Normal,
    /// Every key answers this (a permanent class when `permanent`).
    Failing {
        cause: FailureCause,
        permanent: bool,
    },
    /// The breaker is open: nothing is attempted; try again after this long.
    NotAttempted(Duration),
}

/// A fetcher over a versioned source with scripted failures: a mode per entity type, keys that
/// panic a number of times, keys that answer gone a number of times first, poisoned keys.
#[derive(Clone, Default)]
struct Scripted {
    inner: VersionedSource,
    modes: Arc<Mutex<HashMap<String, Mode>>>,
    panics: Arc<Mutex<HashMap<EntityKey, u32>>>,
    gone_first: Arc<Mutex<HashMap<EntityKey, u32>>>,
    permanent_for: Arc<Mutex<HashSet<EntityKey>>>,
    delay_for: Arc<Mutex<HashMap<EntityKey, Duration>>>,
    /// Sources by type (types not listed are their own source).
    sources: Arc<HashMap<String, String>>,
}

impl Scripted {
    fn set_mode(&self, entity_type: &str, mode: Mode) {
        if let Ok(mut m) = self.modes.lock() {
            m.insert(entity_type.to_owned(), mode);
        }
    }
}

#[async_trait]
impl Fetcher for Scripted {
    async fn fetch(&self, req: &FetchRequest) -> Result<FetchOutcome, FetchError> {
        let mode = self
            .modes
            .lock()
            .ok()
            .and_then(|m| m.get(req.key.entity_type()).copied())
            .unwrap_or(Mode::Normal);
        let panic_now = self.panics.lock().ok().is_some_and(|mut p| {
            p.get_mut(&req.key).is_some_and(|n| {
                let hit = *n > 0;
                *n = n.saturating_sub(1);
                hit
            })
        });
        if panic_now {
            panic!("the fetcher of {} blew up", req.key);
        }
        let delay = self
            .delay_for
            .lock()
            .ok()
            .and_then(|d| d.get(&req.key).copied());
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        if self
            .permanent_for
            .lock()
            .ok()
            .is_some_and(|p| p.contains(&req.key))
        {
            return Err(FetchError::permanent("HTTP 422 for this id"));
        }
        match mode {
            Mode::Normal => {}
            Mode::Failing { cause, permanent } => {
                let e = if permanent {
                    FetchError::permanent(format!("injected {}", cause.label()))
                } else {
                    FetchError::transient(format!("injected {}", cause.label()))
                };
                return Err(e.with_cause(cause));
            }
            Mode::NotAttempted(after) => {
                return Err(FetchError::not_attempted("breaker open", Some(after)));
            }
        }
        let gone_now = self.gone_first.lock().ok().is_some_and(|mut g| {
            g.get_mut(&req.key).is_some_and(|n| {
                let hit = *n > 0;
                *n = n.saturating_sub(1);
                hit
            })
        });
        if gone_now {
            return Ok(FetchOutcome::Gone);
        }
        self.inner.fetch(req).await
    }

    fn source_name(&self, entity_type: &str) -> Arc<str> {
        Arc::from(
            self.sources
                .get(entity_type)
                .map_or(entity_type, String::as_str),
        )
    }
}

/// Dead letters with a producer's size limit (key + headers + payload).
#[derive(Clone, Default)]
struct Limited {
    inner: MemoryDeadLetters,
    max: Option<usize>,
    refused: Arc<Mutex<u32>>,
}

#[async_trait]
impl DeadLetterWriter for Limited {
    async fn send(&self, record: &DeadLetter) -> Result<(), DeadLetterFailure> {
        if self.max.is_some_and(|m| record.size() > m) {
            if let Ok(mut r) = self.refused.lock() {
                *r += 1;
            }
            return Err(DeadLetterFailure::TooLarge("MSG_SIZE_TOO_LARGE".into()));
        }
        self.inner.send(record).await
    }
}

struct Harness {
    topics: MemoryConsumer,
    fetcher: Scripted,
    sink: RecordingSink,
    dead: Limited,
    handle: PipelineHandle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<RunReport, refetch::PipelineError>>,
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

struct Setup {
    cfg: EngineConfig,
    sink: RecordingSink,
    fetcher: Scripted,
    dead: Limited,
    decoder: JsonDecoder,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            cfg: cfg(),
            sink: RecordingSink::new(),
            fetcher: Scripted::default(),
            dead: Limited::default(),
            decoder: JsonDecoder::typed("/type", "/id").with_version("/v", VersionKind::Integer),
        }
    }
}

fn start(setup: Setup) -> Harness {
    let topics = MemoryConsumer::new();
    topics.create_topic(TOPIC, 1);
    let (channels, _control) = topics.start();
    let pipeline = Pipeline::builder::<Scripted, RecordingSink>()
        .fetcher(setup.fetcher.clone())
        .sink(setup.sink.clone())
        .consumer(channels)
        .decoder(setup.decoder)
        .engine(setup.cfg)
        .dead_letters(setup.dead.clone())
        .build()
        .expect("valid pipeline");
    let handle = pipeline.handle();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(pipeline.run(async move {
        let _ = stopped.await;
    }));
    Harness {
        topics,
        fetcher: setup.fetcher,
        sink: setup.sink,
        dead: setup.dead,
        handle,
        stop: Some(stop),
        task,
    }
}

fn key(t: &str, i: usize) -> EntityKey {
    EntityKey::new(t, format!("{t}{i}"))
}

impl Harness {
    fn source(&self) -> &VersionedSource {
        &self.fetcher.inner
    }

    /// The source changes the entity; its versioned notification is published.
    fn change(&self, t: &str, i: usize) {
        let v = self.source().change(&key(t, i));
        self.notify(t, i, v);
    }

    /// The source deletes the entity; its versioned notification is published.
    fn delete(&self, t: &str, i: usize) {
        let v = self.source().delete(&key(t, i));
        self.notify(t, i, v);
    }

    fn notify(&self, t: &str, i: usize, v: i64) {
        let payload = format!(r#"{{"type":"{t}","id":"{t}{i}","v":{v}}}"#);
        self.topics.produce(TOPIC, 0, None, payload.as_bytes(), 0);
    }

    async fn status(&self) -> Status {
        self.handle.status().await.expect("pipeline running")
    }

    fn dead_letters(&self) -> Vec<DeadLetter> {
        self.dead.inner.records()
    }

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

    async fn until(&self, limit: Duration, what: &str, cond: impl Fn(&Status) -> bool) {
        let deadline = Instant::now() + limit;
        loop {
            let st = self.status().await;
            if cond(&st) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: {st:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn stop(mut self) -> RunReport {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.await.expect("task").expect("run")
    }
}

fn diff(h: &Harness) -> Vec<String> {
    h.sink.diff(h.source())
}

// ----- an outage is never poison -------------------------------------------------------------

/// A quiet stream whose only key's source is down for two minutes: the key keeps retrying with
/// capped backoff and is counted as blocked; nothing is dead-lettered; it is written once the
/// source is back.
#[tokio::test(start_paused = true)]
async fn the_only_key_of_a_source_down_for_two_minutes_is_never_dead_lettered() {
    let h = start(Setup::default());
    h.source().set_down(true);
    h.change("customer", 1);
    tokio::time::sleep(Duration::from_secs(20)).await;
    let st = h.status().await;
    assert_eq!(
        st.engine.blocked_keys, 1,
        "shown and counted as blocked: {st:?}"
    );
    tokio::time::sleep(Duration::from_secs(100)).await;
    assert!(h.dead_letters().is_empty(), "{:?}", h.dead_letters());
    h.source().set_down(false);
    h.until_committed(Duration::from_secs(60)).await;
    assert!(diff(&h).is_empty(), "{:?}", diff(&h));
    assert!(h.dead_letters().is_empty());
    h.stop().await;
}

/// After a healthy period, the source goes down and two keys fail: the healthy period is long
/// gone by the time their budgets would be spent, so neither is dead-lettered.
#[tokio::test(start_paused = true)]
async fn after_a_healthy_period_failing_keys_are_judged_by_recent_time_not_old_samples() {
    let h = start(Setup::default());
    for i in 0..60 {
        h.change("customer", i);
    }
    h.until_committed(Duration::from_secs(30)).await;
    h.source().set_down(true);
    h.change("customer", 1);
    h.change("customer", 2);
    tokio::time::sleep(Duration::from_secs(240)).await;
    assert!(h.dead_letters().is_empty(), "{:?}", h.dead_letters());
    h.source().set_down(false);
    h.until_committed(Duration::from_secs(60)).await;
    assert!(diff(&h).is_empty());
    h.stop().await;
}

/// Every key of a source answers a permanent failure of one class (an expired credential, a
/// maintenance page): the source is in outage, readiness says so, nothing is dead-lettered, and
/// the sink converges once the source recovers.
async fn a_permanent_class_shared_by_every_key_is_an_outage(cause: FailureCause) {
    let h = start(Setup::default());
    for i in 0..20 {
        h.change("customer", i);
    }
    h.until_committed(Duration::from_secs(30)).await;
    h.fetcher.set_mode(
        "customer",
        Mode::Failing {
            cause,
            permanent: true,
        },
    );
    for i in 0..20 {
        h.change("customer", i);
    }
    h.until(Duration::from_secs(60), "the outage never showed", |s| {
        s.not_ready
            .iter()
            .any(|r| r.contains("in outage") && r.contains(cause.label()))
    })
    .await;
    let st = h.status().await;
    assert_eq!(st.engine.outages.len(), 1, "{st:?}");
    assert!(!st.ready());
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(h.dead_letters().is_empty(), "{:?}", h.dead_letters());
    h.fetcher.set_mode("customer", Mode::Normal);
    h.until_committed(Duration::from_secs(120)).await;
    h.until(Duration::from_secs(60), "still in outage", |s| s.ready())
        .await;
    assert!(diff(&h).is_empty(), "{:?}", diff(&h));
    assert!(h.dead_letters().is_empty());
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_expired_credential_for_every_key_is_an_outage_not_poison() {
    a_permanent_class_shared_by_every_key_is_an_outage(FailureCause::Auth).await;
}

#[tokio::test(start_paused = true)]
async fn a_maintenance_page_for_every_key_is_an_outage_not_poison() {
    a_permanent_class_shared_by_every_key_is_an_outage(FailureCause::ContentType).await;
}

/// The poison case stays: one key fails permanently while the others succeed: it alone is
/// dead-lettered.
#[tokio::test(start_paused = true)]
async fn a_key_failing_alone_on_a_healthy_source_is_still_dead_lettered() {
    let h = start(Setup::default());
    if let Ok(mut p) = h.fetcher.permanent_for.lock() {
        p.insert(key("customer", 7));
    }
    // A live stream: other keys keep succeeding while key 7 keeps failing.
    for round in 0..10 {
        for i in 0..30 {
            if round == 0 || i != 7 {
                h.change("customer", i);
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    h.until_committed(Duration::from_secs(30)).await;
    let dead = h.dead_letters();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].header("refetch.entity.id"), Some("customer7"));
    h.stop().await;
}

/// Keys short-circuited by an open breaker are retried when it half-opens, without their
/// backoff growing: once the breaker closes they are fetched at once, not after a long backoff.
#[tokio::test(start_paused = true)]
async fn keys_short_circuited_by_an_open_breaker_are_retried_when_it_half_opens() {
    let h = start(Setup::default());
    h.fetcher
        .set_mode("customer", Mode::NotAttempted(Duration::from_millis(500)));
    for i in 0..10 {
        h.change("customer", i);
    }
    tokio::time::sleep(Duration::from_secs(60)).await;
    h.fetcher.set_mode("customer", Mode::Normal);
    let reopened = Instant::now();
    h.until_committed(Duration::from_secs(60)).await;
    assert!(
        reopened.elapsed() < Duration::from_secs(2),
        "fetched {:?} after the breaker closed (a grown backoff waits up to 30 s)",
        reopened.elapsed()
    );
    assert!(h.dead_letters().is_empty());
    h.stop().await;
}

/// A fetcher that panics is an outcome: a transient error of that key; its slot is freed and
/// the partition's commit point moves on once the key succeeds.
#[tokio::test(start_paused = true)]
async fn a_panicking_fetcher_is_a_transient_error_of_its_key() {
    let h = start(Setup {
        cfg: EngineConfig {
            fetch_concurrency: 2,
            ..cfg()
        },
        ..Setup::default()
    });
    if let Ok(mut p) = h.fetcher.panics.lock() {
        p.insert(key("customer", 3), 2);
    }
    for i in 0..10 {
        h.change("customer", i);
    }
    h.until_committed(Duration::from_secs(60)).await;
    let st = h.status().await;
    assert_eq!(
        st.engine.fetches_in_flight, 0,
        "the panicking fetches freed their slots"
    );
    assert!(diff(&h).is_empty(), "{:?}", diff(&h));
    h.stop().await;
}

/// A dead letter whose key and headers alone exceed the producer's limit is cut to fit (the
/// original sizes in headers) and acknowledged: the partition's commit point moves on.
#[tokio::test(start_paused = true)]
async fn an_oversized_dead_letter_is_cut_to_fit_and_never_spins() {
    let h = start(Setup {
        dead: Limited {
            max: Some(4 * 1024),
            ..Limited::default()
        },
        ..Setup::default()
    });
    let huge_key = vec![b'k'; 64 * 1024];
    h.topics
        .produce(TOPIC, 0, Some(&huge_key), b"not a notification", 0);
    h.change("customer", 1);
    h.until_committed(Duration::from_secs(60)).await;
    let dead = h.dead_letters();
    assert_eq!(dead.len(), 1);
    assert!(dead[0].size() <= 4 * 1024);
    assert_eq!(dead[0].header("refetch.original.key.size"), Some("65536"));
    h.stop().await;
}

// ----- deletes need evidence, per source -------------------------------------------------------

fn guard(min_samples: usize) -> GoneGuardConfig {
    GoneGuardConfig {
        window: 100,
        min_samples,
        max_ratio: 0.2,
        ..GoneGuardConfig::default()
    }
}

/// One source answers gone for every key (a misrouted template) while another source is busy
/// and healthy: the misrouted source's deletes are held once its own guard has its minimum of
/// outcomes, whatever the other source does; a reset releases every delete it held.
#[tokio::test(start_paused = true)]
async fn the_gone_guard_is_kept_per_source_and_a_reset_releases_every_held_delete() {
    let fetcher = Scripted {
        sources: Arc::new(HashMap::from([
            ("customer".to_owned(), "crm".to_owned()),
            ("order".to_owned(), "shop".to_owned()),
        ])),
        ..Scripted::default()
    };
    let h = start(Setup {
        cfg: EngineConfig {
            gone_guard: guard(10),
            gone_grace: Duration::ZERO,
            ..cfg()
        },
        fetcher,
        ..Setup::default()
    });
    // The busy, healthy source.
    for i in 0..200 {
        h.change("customer", i);
    }
    // 40 orders that exist... but the template is misrouted: every fetch says gone.
    for i in 0..40 {
        let v = h.source().change(&key("order", i));
        h.notify("order", i, v);
    }
    if let Ok(mut g) = h.fetcher.gone_first.lock() {
        for i in 0..40 {
            g.insert(key("order", i), u32::MAX);
        }
    }
    h.until(
        Duration::from_secs(60),
        "the shop guard never tripped",
        |s| {
            s.engine
                .gone_guards
                .iter()
                .any(|g| g.source == "shop" && g.tripped)
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let deleted = h.sink.log().iter().filter(|w| w.delete).count();
    assert!(
        deleted < 10,
        "{deleted} of 40 misrouted deletes went through (at most min_samples - 1 may)"
    );
    let st = h.status().await;
    assert!(
        st.engine
            .gone_guards
            .iter()
            .any(|g| g.source == "crm" && !g.tripped),
        "the busy source's guard is its own: {st:?}"
    );
    assert!(
        st.not_ready
            .iter()
            .any(|r| r.contains("gone guard of source shop"))
    );
    // The operator decides the deletes are real: every held delete goes through.
    h.handle.reset_gone_guard_of("shop");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let deleted = h.sink.log().iter().filter(|w| w.delete).count();
    assert_eq!(deleted, 40, "a reset releases every held delete");
    h.until_committed(Duration::from_secs(60)).await;
    h.stop().await;
}

/// A lone delete on a fresh group is written (the guard judges only with its minimum of
/// outcomes), and an on-demand refresh of a held delete ends at once with a clear message.
#[tokio::test(start_paused = true)]
async fn a_lone_delete_is_written_and_a_refresh_of_a_held_delete_fails_clearly() {
    let h = start(Setup {
        cfg: EngineConfig {
            gone_guard: guard(10),
            gone_grace: Duration::ZERO,
            ..cfg()
        },
        ..Setup::default()
    });
    let _ = h.source().change(&key("customer", 1));
    h.delete("customer", 1);
    h.until_committed(Duration::from_secs(30)).await;
    assert!(
        h.sink.log().iter().any(|w| w.delete),
        "the lone delete was written"
    );
    assert!(h.status().await.ready());
    // Now trip the guard: 20 deletes in a row.
    for i in 100..120 {
        let _ = h.source().change(&key("customer", i));
        h.delete("customer", i);
    }
    h.until(Duration::from_secs(60), "never tripped", |s| {
        s.engine.gone_guard_tripped
    })
    .await;
    let _ = h.source().change(&key("customer", 999));
    let _ = h.source().delete(&key("customer", 999));
    let asked = Instant::now();
    let out = h.handle.refresh(vec![key("customer", 999)]).await;
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "the refresh did not hang"
    );
    match &out[0].1 {
        RefreshOutcome::Failed(m) => assert!(m.contains("gone guard"), "{m}"),
        other => panic!("a held delete must fail the refresh clearly: {other:?}"),
    }
    h.stop().await;
}

/// A restart whose first fetches are mostly real deletes: the entities the sink already holds
/// (answered from the sink, no fetch) are evidence that the source is fine, so the real deletes
/// are written and the group reaches the log end.
#[tokio::test(start_paused = true)]
async fn a_restart_whose_first_fetches_are_real_deletes_reaches_the_log_end() {
    let sink = RecordingSink::new();
    let fetcher = Scripted::default();
    // Before the restart: 100 customers at v1, all written.
    {
        let h = start(Setup {
            sink: sink.clone(),
            fetcher: fetcher.clone(),
            ..Setup::default()
        });
        for i in 0..100 {
            h.change("customer", i);
        }
        h.until_committed(Duration::from_secs(30)).await;
        h.stop().await;
    }
    // While refetch is down, 20 are deleted; a fresh group replays everything.
    let h = start(Setup {
        cfg: EngineConfig {
            gone_guard: guard(20),
            gone_grace: Duration::ZERO,
            ..cfg()
        },
        sink,
        fetcher,
        ..Setup::default()
    });
    for i in 0..100 {
        let v = h.source().snapshot()[&key("customer", i)].version;
        h.notify("customer", i, v);
    }
    for i in 0..20 {
        h.delete("customer", i);
    }
    h.until_committed(Duration::from_secs(120)).await;
    assert!(diff(&h).is_empty(), "{:?}", diff(&h));
    assert!(!h.status().await.engine.gone_guard_tripped);
    h.stop().await;
}

/// Not yet visible is not gone: a key created right before its notification, read from a
/// replica behind the API, answers gone at first; it is retried as a stale read and written,
/// never deleted.
#[tokio::test(start_paused = true)]
async fn gone_right_after_a_create_is_retried_as_a_stale_read() {
    let h = start(Setup::default());
    if let Ok(mut g) = h.fetcher.gone_first.lock() {
        g.insert(key("customer", 5), 2);
    }
    h.change("customer", 5);
    h.until_committed(Duration::from_secs(30)).await;
    assert!(
        h.sink.log().iter().all(|w| !w.delete),
        "the new entity was deleted: {:?}",
        h.sink.log()
    );
    assert!(diff(&h).is_empty());
    h.stop().await;
}

/// When a business action fails, a member's later, unrelated notification is not dead-lettered
/// with the action's.
#[tokio::test(start_paused = true)]
async fn a_failed_action_dead_letters_only_its_own_notifications() {
    let decoder = JsonDecoder::typed("/type", "/id")
        .with_version("/v", VersionKind::Integer)
        .with_correlation(refetch::decode::Correlation {
            id: refetch::decode::CorrelationSource::Pointer("/tx".into()),
            size_pointer: Some("/n".into()),
        });
    let h = start(Setup {
        decoder,
        ..Setup::default()
    });
    // Other keys succeed, so the failures below are evidence about the keys.
    for i in 100..120 {
        h.change("customer", i);
    }
    h.until_committed(Duration::from_secs(30)).await;
    // Member 1 fails permanently, but only after 3 s; member 2 fails transiently meanwhile
    // (it is in backoff when the action fails), and gets a later, ordinary notification.
    if let Ok(mut p) = h.fetcher.permanent_for.lock() {
        p.insert(key("customer", 1));
    }
    if let Ok(mut d) = h.fetcher.delay_for.lock() {
        d.insert(key("customer", 1), Duration::from_secs(3));
    }
    h.source().poison(key("customer", 2));
    for i in [1usize, 2] {
        let v = h.source().change(&key("customer", i));
        let payload =
            format!(r#"{{"type":"customer","id":"customer{i}","v":{v},"tx":"t1","n":2}}"#);
        h.topics.produce(TOPIC, 0, None, payload.as_bytes(), 0);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    h.change("customer", 2);
    let later = h.topics.end_offsets()[&TopicPartition::new(TOPIC, 0)] - 1;
    // A live stream: other keys keep succeeding meanwhile (the evidence that member 1's
    // failure is about member 1).
    for round in 0..40 {
        h.change("customer", 100 + round % 20);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let dead = h.dead_letters();
    let of_2: Vec<String> = dead
        .iter()
        .filter(|d| d.header("refetch.entity.id") == Some("customer2"))
        .filter_map(|d| String::from_utf8(d.payload.clone().unwrap_or_default()).ok())
        .collect();
    assert_eq!(
        of_2.len(),
        1,
        "member 2's action notification is dead-lettered: {dead:?}"
    );
    assert!(
        !of_2[0].contains(&format!("\"offset\":{later}")),
        "the unrelated later notification of member 2 was dead-lettered too: {of_2:?}"
    );
    h.source().unpoison(&key("customer", 2));
    h.until_committed(Duration::from_secs(120)).await;
    assert_eq!(
        h.sink.held().get(&key("customer", 2)),
        Some(&h.source().snapshot()[&key("customer", 2)].version),
        "the later notification of member 2 is written normally"
    );
    h.stop().await;
}
