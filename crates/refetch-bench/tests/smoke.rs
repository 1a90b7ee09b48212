//! The benchmark in miniature, so it cannot rot: a tiny duplicate-heavy workload with live saves
//! against the real broker, run through the same driver and child processes as the real benchmark,
//! with the raw consumer, the hand-rolled loop and refetch (no Java peers).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use refetch_bench::contender::ContenderKind;
use refetch_bench::driver::{DriverOptions, WorkloadRun};
use refetch_bench::report;
use refetch_bench::workload::{KeyDistribution, WorkloadSpec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn raw_hand_rolled_and_refetch_on_a_tiny_duplicate_heavy_workload() {
    let brokers = refetch_testkit::kafka::brokers().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = WorkloadSpec {
        name: "smoke".into(),
        notifications: 1_600,
        entities: 200,
        distribution: KeyDistribution::Zipf(1.0),
        burst: 4,
        late_share: 0.05,
        delay_window: 100,
        live_saves: 40,
        live_rate: 200.0,
        source_latency_ms: 1,
        sink: "jsonl".into(),
        seed: 3,
        no_latency: false,
    };
    let opts = DriverOptions {
        brokers,
        exe: PathBuf::from(env!("CARGO_BIN_EXE_refetch-bench")),
        partitions: 2,
        cap: Duration::from_secs(60),
        work_dir: dir.path().to_path_buf(),
        peers_dir: PathBuf::from("../../bench/peers"),
        run_id: format!(
            "smoke{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ),
    };
    let run = WorkloadRun::start(spec.clone()).await.unwrap();
    let mut rows = Vec::new();
    for kind in [
        ContenderKind::Raw,
        ContenderKind::HandRolled,
        ContenderKind::RefetchDefault,
    ] {
        rows.push(run.run(&opts, kind).await);
    }
    run.shutdown().await;
    let table = report::table(&spec, &rows);
    println!("{table}");

    let total = 1_600 + 40 * 4;
    for r in &rows {
        assert!(
            r.note.find("failed").is_none(),
            "{}: {}",
            r.contender,
            r.note
        );
        assert_eq!(r.notifications, total, "{}", r.contender);
        assert_eq!(r.committed, total, "{} committed everything", r.contender);
        assert!(!r.capped, "{}", r.contender);
        assert!(r.throughput > 0.0, "{}", r.contender);
        assert!(r.peak_rss_mib > 1.0, "{}", r.contender);
    }
    let [raw, hand, refetch] = &rows[..] else {
        panic!("three rows")
    };
    assert_eq!(raw.fetches, 0, "the raw consumer fetches nothing");
    assert!(
        hand.fetches >= total,
        "hand-rolled fetches once per notification: {} < {total}",
        hand.entity_reads
    );
    assert_eq!(hand.converged, Some(true), "hand-rolled converges");
    assert_eq!(refetch.converged, Some(true), "refetch converges");
    assert!(
        refetch.entity_reads * 2 < hand.entity_reads,
        "refetch coalesces: {} fetches against hand-rolled's {}",
        refetch.entity_reads,
        hand.entity_reads
    );
    assert!(refetch.p50_ms.is_some() && hand.p99_ms.is_some());
    assert!(table.contains("| refetch-default |"), "{table}");
}
