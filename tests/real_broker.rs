//! Real Apache Kafka: crash, scale-out/rebalance and broker-restart scenarios with `refetch run`
//! processes, a local HTTP source whose entities keep changing, and a SQLite sink.
//!
//! Every scenario ends with the same checks: every entity in the sink equals the source's final
//! state, the committed offsets equal the end offsets (the offset after the last record), and
//! the dead-letter topic is empty. Each prints one line of figures and runs under a wall-clock
//! cap. Run with `scripts/test` (they need the broker it starts).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use refetch_integration_tests::{Protocol, Scenario, fetches};
use refetch_testkit::kafka;
use refetch_testkit::process::{self, ChildProcess, kill9, terminate};

const CAP: Duration = Duration::from_secs(240);

/// Many entities with few notifications each (a lost notification only shows when it was its
/// entity's last); the process is killed with SIGKILL at random points while it catches up, and
/// restarted, several times; the source keeps changing in between.
async fn crash_scenario(protocol: Protocol) {
    let started = Instant::now();
    let mut s = Scenario::new("crash", protocol, 4).await.unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(protocol as u64 + 1);
    const ENTITIES: usize = 3_000;
    s.change(0..ENTITIES, 0).await.unwrap();
    let mut restarts = 0;
    let mut child = s.spawn("run-0").unwrap();
    for round in 1..=3 {
        s.joined(&child).await.unwrap();
        // Kill at a random point while it works through the backlog.
        let wait = rng.random_range(300..2_500);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        kill9(&mut child).await.unwrap();
        restarts += 1;
        let ids: Vec<usize> = (0..ENTITIES).filter(|_| rng.random_bool(0.3)).collect();
        s.change(ids, 0).await.unwrap();
        child = s.spawn(&format!("run-{round}")).unwrap();
    }
    s.until_committed(CAP, &[&child]).await.unwrap();
    let status = terminate(&mut child, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0), "{}", child.log());
    let checked = s.assert_converged().await.unwrap();
    println!(
        "crash ({protocol:?}): {} notifications, {} fetches, {checked} entities checked, {restarts} SIGKILL restarts survived, {:.1}s",
        s.notifications,
        fetches(&s.source),
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn crash_with_sigkill_loses_nothing_classic() {
    tokio::time::timeout(CAP * 2, crash_scenario(Protocol::Classic))
        .await
        .expect("wall-clock cap");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn crash_with_sigkill_loses_nothing_consumer_protocol() {
    tokio::time::timeout(CAP * 2, crash_scenario(Protocol::Consumer))
        .await
        .expect("wall-clock cap");
}

/// Samples committed offsets and records any that moved backwards (a former owner committing
/// after its partitions were revoked would show as a regression).
async fn sample_commits(
    s: &Scenario,
    seen: &mut BTreeMap<i32, i64>,
    regressions: &mut Vec<String>,
) {
    if let Ok(c) = s.committed().await {
        for (p, o) in c {
            let prev = seen.entry(p).or_insert(o);
            if o < *prev {
                regressions.push(format!("partition {p}: {prev} -> {o}"));
            }
            *prev = (*prev).max(o);
        }
    }
}

/// Two and then three instances in one group, one leaving mid-stream (SIGTERM), while the source
/// keeps changing. Committed offsets never move backwards.
async fn rebalance_scenario(protocol: Protocol) {
    let started = Instant::now();
    let mut s = Scenario::new("rebalance", protocol, 6).await.unwrap();
    const ENTITIES: usize = 600;
    let mut seen = BTreeMap::new();
    let mut regressions = Vec::new();
    let a = s.spawn("a").unwrap();
    s.joined(&a).await.unwrap();
    let b = s.spawn("b").unwrap();
    s.joined(&b).await.unwrap();
    for _ in 0..3 {
        s.change(0..ENTITIES, 1).await.unwrap();
        sample_commits(&s, &mut seen, &mut regressions).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut c = s.spawn("c").unwrap();
    s.joined(&c).await.unwrap();
    for round in 0..4 {
        s.change((0..ENTITIES).filter(|i| i % 2 == round % 2), 1)
            .await
            .unwrap();
        sample_commits(&s, &mut seen, &mut regressions).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // One member leaves mid-stream.
    let mut b = b;
    let status = terminate(&mut b, Duration::from_secs(60)).await.unwrap();
    assert_eq!(status.code(), Some(0), "{}", b.log());
    for _ in 0..3 {
        s.change(0..ENTITIES, 0).await.unwrap();
        sample_commits(&s, &mut seen, &mut regressions).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    s.until_committed(CAP, &[&a, &c]).await.unwrap();
    sample_commits(&s, &mut seen, &mut regressions).await;
    let mut a = a;
    for p in [&mut a, &mut c] {
        let status = terminate(p, Duration::from_secs(60)).await.unwrap();
        assert_eq!(status.code(), Some(0), "{}", p.log());
    }
    assert!(
        regressions.is_empty(),
        "committed offsets moved backwards: {regressions:?}"
    );
    let checked = s.assert_converged().await.unwrap();
    println!(
        "rebalance ({protocol:?}): {} notifications, {} fetches, {checked} entities checked, 3 members (1 left), {:.1}s",
        s.notifications,
        fetches(&s.source),
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn scale_out_and_rebalance_lose_nothing_classic() {
    tokio::time::timeout(CAP * 2, rebalance_scenario(Protocol::Classic))
        .await
        .expect("wall-clock cap");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn scale_out_and_rebalance_lose_nothing_consumer_protocol() {
    tokio::time::timeout(CAP * 2, rebalance_scenario(Protocol::Consumer))
        .await
        .expect("wall-clock cap");
}

/// The broker is stopped (SIGTERM) and restarted, then killed (SIGKILL) and restarted, while the
/// pipeline runs; the pipeline recovers without being restarted. Uses a private broker on its
/// own port so other tests keep theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Java and Maven for a private broker: run scripts/test"]
async fn broker_restarts_are_survived_without_restarting_the_pipeline() {
    tokio::time::timeout(CAP * 3, async {
        let started = Instant::now();
        let port = "19292";
        let env = [("REFETCH_KAFKA_PORT", port.to_string())];
        let up = process::run_script("kafka", &["up", "--fresh"], &env).await.unwrap();
        let brokers = format!("127.0.0.1:{port}");
        assert!(up.contains(&brokers), "{up}");
        let mut s = Scenario::with_brokers(brokers, "broker_restart", Protocol::Classic, 3).await.unwrap();
        const ENTITIES: usize = 500;
        let child = s.spawn("run").unwrap();
        s.joined(&child).await.unwrap();
        s.change(0..ENTITIES, 1).await.unwrap();
        let mut restarts = 0;
        for how in ["restart", "kill9"] {
            tokio::time::sleep(Duration::from_millis(500)).await;
            process::run_script("kafka", &[how], &env).await.unwrap();
            if how == "kill9" {
                process::run_script("kafka", &["up"], &env).await.unwrap();
            }
            restarts += 1;
            // The source changed while the broker was away; the notifications follow now.
            s.change((0..ENTITIES).filter(|i| i % 3 == restarts % 3), 0).await.unwrap();
        }
        s.until_committed(CAP, &[&child]).await.unwrap();
        let mut child: ChildProcess = child;
        assert!(child.try_wait().unwrap().is_none(), "the pipeline kept running:\n{}", child.log());
        let status = terminate(&mut child, Duration::from_secs(60)).await.unwrap();
        assert_eq!(status.code(), Some(0), "{}", child.log());
        let checked = s.assert_converged().await.unwrap();
        println!(
            "broker restart: {} notifications, {} fetches, {checked} entities checked, {restarts} broker restarts survived, {:.1}s",
            s.notifications,
            fetches(&s.source),
            started.elapsed().as_secs_f64()
        );
        process::run_script("kafka", &["down"], &env).await.unwrap();
    })
    .await
    .expect("wall-clock cap");
}

/// Records of an aborted transaction are never acted on (read_committed) and commits step over
/// the transaction markers to the end of the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn aborted_transactions_are_skipped_and_commits_reach_the_end() {
    let mut s = Scenario::new("aborted", Protocol::Classic, 2)
        .await
        .unwrap();
    s.change(0..100, 0).await.unwrap();
    kafka::produce_aborted_transaction(
        &s.brokers,
        &s.topic,
        (0..50).map(|i| {
            (
                Some(format!("{i}").into_bytes()),
                br#"{"id":"ghost"}"#.to_vec(),
            )
        }),
    )
    .await
    .unwrap();
    s.change(50..150, 0).await.unwrap();
    let child = s.spawn("run").unwrap();
    s.until_committed(CAP, &[&child]).await.unwrap();
    assert_eq!(
        s.source.requests_for("customer", "ghost"),
        0,
        "an aborted record was acted on"
    );
    s.assert_converged().await.unwrap();
}
