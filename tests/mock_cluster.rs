//! Component tests on librdkafka's built-in mock cluster: the real Kafka code path (consumer
//! thread, rebalance callbacks, commits, the dead-letter producer) without a broker process.
//! The same scenarios run against a real Apache Kafka broker in `real_broker.rs`.

use std::time::Duration;

use rand::{Rng, SeedableRng};
use refetch::decode::JsonDecoder;
use refetch::{
    EngineConfig, EntityKey, KafkaConfig, Pipeline, PipelineHandle, RunReport, VersionKind,
};
use refetch_testkit::kafka::{self, OutRecord};
use refetch_testkit::memory::{RecordingSink, VersionedSource};
use refetch_testkit::mock::MockKafka;
use refetch_testkit::names;

struct Running {
    handle: PipelineHandle,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<RunReport, refetch::PipelineError>>,
}

fn engine_cfg() -> EngineConfig {
    EngineConfig {
        window: Duration::from_millis(50),
        max_wait: Duration::from_millis(500),
        commit_interval: Duration::from_millis(200),
        rebalance_drain: Duration::from_secs(5),
        shutdown_deadline: Duration::from_secs(10),
        ..EngineConfig::default()
    }
}

fn start(
    brokers: &str,
    group: &str,
    topic: &str,
    source: &VersionedSource,
    sink: &RecordingSink,
) -> Running {
    let mut k = KafkaConfig::new(brokers, group, vec![topic.to_owned()]);
    k.dead_letter_topic = format!("{topic}.dlq");
    k.consumer_properties
        .insert("session.timeout.ms".into(), "6000".into());
    k.consumer_properties
        .insert("heartbeat.interval.ms".into(), "500".into());
    let pipeline = Pipeline::builder::<VersionedSource, RecordingSink>()
        .fetcher(source.clone())
        .sink(sink.clone())
        .kafka(k)
        .decoder(
            JsonDecoder::fixed_type("customer", "/id").with_version("/v", VersionKind::Integer),
        )
        .engine(engine_cfg())
        .build()
        .expect("valid pipeline");
    let handle = pipeline.handle();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(pipeline.run(async move {
        let _ = stopped.await;
    }));
    Running { handle, stop, task }
}

impl Running {
    async fn stop(self) -> RunReport {
        let _ = self.stop.send(());
        self.task.await.expect("task").expect("run")
    }
}

/// Changes `n` random entities in bursts (one save = `burst` events) and publishes a keyed
/// notification per event; some carry versions. Returns how many notifications went out.
async fn publish_changes(
    brokers: &str,
    topic: &str,
    source: &VersionedSource,
    rng: &mut rand::rngs::StdRng,
    entities: usize,
    saves: usize,
    burst: usize,
) -> usize {
    let mut records = Vec::new();
    for _ in 0..saves {
        let i = rng.random_range(0..entities);
        let key = EntityKey::new("customer", format!("c{i}"));
        for _ in 0..burst {
            let v = source.change(&key);
            let payload = if rng.random_bool(0.5) {
                format!(r#"{{"id":"c{i}","v":{v}}}"#)
            } else {
                format!(r#"{{"id":"c{i}"}}"#)
            };
            records.push(OutRecord::keyed(format!("c{i}"), payload));
        }
    }
    let n = records.len();
    kafka::produce_records(brokers, topic, records)
        .await
        .expect("produce");
    n
}

async fn until_converged(
    brokers: &str,
    group: &str,
    topic: &str,
    source: &VersionedSource,
    sink: &RecordingSink,
    limit: Duration,
) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let end = kafka::end_offsets(brokers, topic)
            .await
            .expect("end offsets");
        let committed = kafka::committed_offsets(brokers, group, topic)
            .await
            .expect("committed");
        let diff = sink.diff(source);
        if end
            .iter()
            .all(|(p, o)| *o == 0 || committed.get(p) == Some(o))
            && diff.is_empty()
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not converged: end {end:?} committed {committed:?}, {} keys differ, e.g. {:?}",
            diff.len(),
            diff.first()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn mock(topic: &str, partitions: i32) -> MockKafka {
    let m = MockKafka::start(1).expect("mock cluster");
    m.create_topic(topic, partitions).expect("topic");
    m.create_topic(&format!("{topic}.dlq"), 1)
        .expect("dlq topic");
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converges_with_a_changing_source_and_steps_over_an_aborted_transaction() {
    let topic = names::unique("notes");
    let group = names::unique("group");
    let m = mock(&topic, 3);
    let brokers = m.bootstrap_servers().to_owned();
    let source = VersionedSource::new();
    let sink = RecordingSink::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let run = start(&brokers, &group, &topic, &source, &sink);
    let mut notifications = 0;
    for round in 0..6 {
        notifications += publish_changes(&brokers, &topic, &source, &mut rng, 300, 200, 3).await;
        if round == 2 {
            // Records of an aborted transaction occupy offsets no read-committed consumer sees.
            kafka::produce_aborted_transaction(
                &brokers,
                &topic,
                (0..30).map(|i| {
                    (
                        Some(format!("c{i}").into_bytes()),
                        br#"{"id":"aborted"}"#.to_vec(),
                    )
                }),
            )
            .await
            .expect("aborted transaction");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    until_converged(
        &brokers,
        &group,
        &topic,
        &source,
        &sink,
        Duration::from_secs(90),
    )
    .await;
    let fetches = source.total_fetches() as usize;
    assert!(
        fetches * 2 < notifications,
        "{fetches} fetches for {notifications} notifications"
    );
    // librdkafka's mock cluster does not filter aborted transactions for read_committed
    // consumers (the real-broker test checks that); here the point is that the transaction
    // markers leave offset gaps and the commits still reach the end of the log.
    let report = run.stop().await;
    assert_eq!(report.status.counters.dead_letters, 0);
    let dlq = kafka::read_all(
        &brokers,
        &format!("{topic}.dlq"),
        true,
        Duration::from_secs(2),
    )
    .await
    .expect("read dlq");
    assert!(dlq.is_empty(), "nothing is dead-lettered");
    println!(
        "mock cluster: {notifications} notifications, {fetches} fetches, {} sink writes",
        sink.log().len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_consumer_joining_mid_run_loses_nothing() {
    let topic = names::unique("notes");
    let group = names::unique("group");
    let m = mock(&topic, 4);
    let brokers = m.bootstrap_servers().to_owned();
    let source = VersionedSource::new();
    let sink = RecordingSink::new();
    source.set_delay(Duration::from_millis(2));
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let a = start(&brokers, &group, &topic, &source, &sink);
    publish_changes(&brokers, &topic, &source, &mut rng, 400, 300, 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b = start(&brokers, &group, &topic, &source, &sink);
    for _ in 0..4 {
        publish_changes(&brokers, &topic, &source, &mut rng, 400, 150, 2).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    until_converged(
        &brokers,
        &group,
        &topic,
        &source,
        &sink,
        Duration::from_secs(90),
    )
    .await;
    // The cooperative protocol moves partitions in two rebalances; on the mock cluster the
    // second one can come some seconds after the data has converged.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let (sa, sb) = loop {
        let sa = a.handle.status().await.expect("a runs");
        let sb = b.handle.status().await.expect("b runs");
        let both = !sa.engine.partitions.is_empty() && !sb.engine.partitions.is_empty();
        if both || std::time::Instant::now() >= deadline {
            break (sa, sb);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        !sa.engine.partitions.is_empty() && !sb.engine.partitions.is_empty(),
        "both members own partitions after the rebalance: a {:?} b {:?}",
        sa.engine.partitions.len(),
        sb.engine.partitions.len()
    );
    b.stop().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_dropped_without_commit_loses_nothing() {
    let topic = names::unique("notes");
    let group = names::unique("group");
    let m = mock(&topic, 3);
    let brokers = m.bootstrap_servers().to_owned();
    let source = VersionedSource::new();
    let sink = RecordingSink::new();
    source.set_delay(Duration::from_millis(3));
    let mut rng = rand::rngs::StdRng::seed_from_u64(13);
    // Many entities, few notifications each: a lost notification shows when it was the last.
    publish_changes(&brokers, &topic, &source, &mut rng, 2_000, 2_000, 1).await;
    let a = start(&brokers, &group, &topic, &source, &sink);
    tokio::time::sleep(Duration::from_millis(700)).await;
    // Crash: the run future is dropped mid-flight; nothing more is committed.
    a.task.abort();
    let _ = a.task.await;
    publish_changes(&brokers, &topic, &source, &mut rng, 2_000, 500, 1).await;
    let b = start(&brokers, &group, &topic, &source, &sink);
    until_converged(
        &brokers,
        &group,
        &topic,
        &source,
        &sink,
        Duration::from_secs(120),
    )
    .await;
    b.stop().await;
}

// ----- the librdkafka driver's commit fence ------------------------------------------------------

/// The next assignment or revoke from a driver, skipping records, positions and broker reports.
/// Revokes are returned with their reply for the caller to answer.
async fn next_rebalance(
    events: &mut tokio::sync::mpsc::UnboundedReceiver<refetch::consumer::ConsumerEvent>,
    within: Duration,
    what: &str,
) -> refetch::consumer::ConsumerEvent {
    use refetch::consumer::ConsumerEvent as E;
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let ev = tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap_or_else(|_| panic!("no {what} within {within:?}"))
            .unwrap_or_else(|| panic!("the driver stopped before {what}"));
        match ev {
            E::Assigned(_) | E::Revoke { .. } | E::Lost(_) => return ev,
            E::Error {
                message,
                fatal: true,
            } => panic!("fatal consumer error: {message}"),
            _ => {}
        }
    }
}

/// The next non-empty assignment (cooperative rebalances also report empty ones).
async fn next_assigned(
    events: &mut tokio::sync::mpsc::UnboundedReceiver<refetch::consumer::ConsumerEvent>,
    within: Duration,
    what: &str,
) -> Vec<refetch::Assignment> {
    loop {
        match next_rebalance(events, within, what).await {
            refetch::consumer::ConsumerEvent::Assigned(a) if !a.is_empty() => return a,
            refetch::consumer::ConsumerEvent::Assigned(_) => {}
            other => panic!("expected {what}, got {other:?}"),
        }
    }
}

/// Send a commit through a driver and wait for its answer.
async fn commit_through(
    commands: &tokio::sync::mpsc::UnboundedSender<refetch::consumer::ConsumerCommand>,
    offsets: Vec<(refetch::Assignment, i64)>,
) -> refetch::consumer::CommitResult {
    let (reply, answer) = tokio::sync::oneshot::channel();
    commands
        .send(refetch::consumer::ConsumerCommand::Commit {
            offsets,
            metadata: Vec::new(),
            reply,
        })
        .expect("driver running");
    tokio::time::timeout(Duration::from_secs(30), answer)
        .await
        .expect("commit answered in time")
        .expect("commit answered")
}

/// The librdkafka driver itself (no engine): a commit of an assignment that is no longer current
/// is dropped by the driver (answered `Ok` with nothing committed), both while another member
/// owns the partition and after the partition came back in a new epoch, so it never moves the
/// committed offset back; a commit of the current assignment goes through. The broker would
/// accept the stale commit (it checks the member, not the assignment epoch), which is why the
/// driver must drop it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_driver_drops_commits_of_an_assignment_that_ended() {
    use refetch::consumer::ConsumerEvent;
    let topic = names::unique("notes");
    let group = names::unique("group");
    let m = mock(&topic, 2);
    let brokers = m.bootstrap_servers().to_owned();
    let records: Vec<OutRecord> = (0..40)
        .map(|i| OutRecord::keyed(format!("c{i}"), format!(r#"{{"id":"c{i}"}}"#)))
        .collect();
    kafka::produce_records(&brokers, &topic, records)
        .await
        .expect("produce");
    let kcfg = || {
        let mut k = KafkaConfig::new(&brokers, &group, vec![topic.clone()]);
        k.consumer_properties
            .insert("session.timeout.ms".into(), "6000".into());
        k.consumer_properties
            .insert("heartbeat.interval.ms".into(), "500".into());
        k
    };
    let drain = Duration::from_secs(2);
    let commit_timeout = Duration::from_secs(5);
    let committed = |p: i32| {
        let (brokers, group, topic) = (brokers.clone(), group.clone(), topic.clone());
        async move {
            kafka::committed_offsets(&brokers, &group, &topic)
                .await
                .expect("committed offsets")
                .get(&p)
                .copied()
        }
    };

    // A owns both partitions.
    let mut a = refetch::kafka::start_consumer(&kcfg(), drain, commit_timeout).expect("consumer a");
    let first = next_assigned(&mut a.events, Duration::from_secs(30), "a's assignment").await;
    assert_eq!(first.len(), 2, "{first:?}");

    // B joins: one partition is revoked from A. A answers the revoke with offset 10, which the
    // driver commits before letting go.
    let mut b = refetch::kafka::start_consumer(&kcfg(), drain, commit_timeout).expect("consumer b");
    let old = match next_rebalance(&mut a.events, Duration::from_secs(30), "a's revoke").await {
        ConsumerEvent::Revoke {
            assignments, reply, ..
        } => {
            assert_eq!(assignments.len(), 1, "{assignments:?}");
            let old = assignments[0].clone();
            assert!(
                first.iter().any(|f| f.same(&old)),
                "the revoke names a's assignment"
            );
            reply.send(vec![(old.clone(), 10)]).expect("driver waits");
            old
        }
        other => panic!("expected a revoke, got {other:?}"),
    };
    let p = old.tp.partition;
    let on_b = next_assigned(&mut b.events, Duration::from_secs(30), "b's assignment").await;
    assert_eq!(on_b.len(), 1);
    assert_eq!(on_b[0].tp, old.tp, "b took the revoked partition");
    assert_eq!(
        committed(p).await,
        Some(10),
        "the revoke's commit went through"
    );

    // B, the owner now, moves on.
    let r = commit_through(&b.commands, vec![(on_b[0].clone(), 15)]).await;
    assert_eq!(r, Ok(vec![(on_b[0].clone(), 15)]));
    assert_eq!(committed(p).await, Some(15));

    // A commit of A's ended assignment (queued before the revoke) is dropped.
    let r = commit_through(&a.commands, vec![(old.clone(), 5)]).await;
    assert_eq!(
        r,
        Ok(vec![]),
        "a commit for a partition a does not own is dropped"
    );
    assert_eq!(
        committed(p).await,
        Some(15),
        "the committed offset never moves back"
    );

    // B leaves; the partition comes back to A in a new epoch.
    let (closed, done) = tokio::sync::oneshot::channel();
    b.commands
        .send(refetch::consumer::ConsumerCommand::Close { reply: closed })
        .expect("b running");
    tokio::time::timeout(Duration::from_secs(30), done)
        .await
        .expect("b closes in time")
        .expect("b closed");
    let back = next_assigned(
        &mut a.events,
        Duration::from_secs(30),
        "the partition back on a",
    )
    .await;
    let new = back
        .iter()
        .find(|n| n.tp == old.tp)
        .cloned()
        .unwrap_or_else(|| panic!("{} not assigned back: {back:?}", old.tp));
    assert!(new.epoch > old.epoch, "{new} follows {old}");

    // The stale commit is still dropped, although the partition is A's again.
    let r = commit_through(&a.commands, vec![(old.clone(), 5)]).await;
    assert_eq!(r, Ok(vec![]), "a commit of the ended epoch is dropped");
    assert_eq!(
        committed(p).await,
        Some(15),
        "the committed offset never moves back"
    );

    // A commit of the current assignment goes through, also mixed with a stale entry.
    let r = commit_through(&a.commands, vec![(old.clone(), 6), (new.clone(), 17)]).await;
    assert_eq!(r, Ok(vec![(new.clone(), 17)]));
    assert_eq!(committed(p).await, Some(17));

    let (closed, done) = tokio::sync::oneshot::channel();
    a.commands
        .send(refetch::consumer::ConsumerCommand::Close { reply: closed })
        .expect("a running");
    let _ = tokio::time::timeout(Duration::from_secs(30), done).await;
}
