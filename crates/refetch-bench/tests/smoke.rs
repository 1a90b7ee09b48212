//! The benchmark in miniature, so it cannot rot: the `smoke` workload (a small duplicate-heavy
//! backlog and a live stream with spread events) against the real broker, through the same
//! driver, source and child processes as the real benchmark, with the raw consumer, both loops
//! and refetch (no Java peers), then the table and the chart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use refetch_bench::driver::{DriverOptions, WorkloadRun};
use refetch_bench::{chart, preset, report};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn raw_both_loops_and_refetch_on_the_smoke_workload() {
    let brokers = refetch_testkit::kafka::brokers().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (spec, kinds) = preset("smoke", 1.0).unwrap();
    let opts = DriverOptions {
        brokers,
        exe: PathBuf::from(env!("CARGO_BIN_EXE_refetch-bench")),
        partitions: 2,
        cap: Duration::from_secs(60),
        work_dir: dir.path().to_path_buf(),
        peers_dir: PathBuf::from("../../bench/peers"),
        run_id: refetch_testkit::names::unique("smoke"),
    };
    let run = WorkloadRun::start(spec.clone()).await.unwrap();
    let mut rows = Vec::new();
    for kind in kinds {
        rows.push(run.run(&opts, kind).await);
    }
    run.shutdown();
    let table = report::table(&spec, &rows);
    println!("{table}");

    let live_events = spec.live_events() as u64;
    let total = spec.notifications as u64 + live_events;
    let saves = rows[0].saves;
    for r in &rows {
        assert!(!r.note.contains("failed"), "{}: {}", r.contender, r.note);
        assert_eq!(r.notifications, total, "{}", r.contender);
        assert_eq!(r.committed, total, "{} committed everything", r.contender);
        assert!(!r.capped, "{}", r.contender);
        assert!(r.throughput > 0.0, "{}", r.contender);
        assert!(r.peak_rss_mib > 1.0, "{}", r.contender);
        assert_eq!(r.saves, saves, "{}", r.contender);
    }
    // /proc counts CPU time in 10 ms ticks: a small run of one contender can show 0, the four
    // together cannot.
    assert!(
        rows.iter().map(|r| r.cpu_s).sum::<f64>() > 0.0,
        "CPU time from /proc"
    );
    let [raw, concurrent, dedupe, refetch] = &rows[..] else {
        panic!("four rows")
    };
    assert_eq!(raw.fetches, 0, "the raw consumer fetches nothing");
    assert_eq!(raw.converged, None);
    for r in [concurrent, dedupe, refetch] {
        assert_eq!(r.converged, Some(true), "{} converges", r.contender);
        assert_eq!(r.freshness.uncovered, 0, "{}", r.contender);
        assert!(r.freshness.p99_ms.is_some(), "{}", r.contender);
        assert!(r.receipt_p99_ms.is_some(), "{}", r.contender);
    }
    assert!(
        concurrent.fetches >= total,
        "the concurrent loop fetches once per record: {} < {total}",
        concurrent.fetches
    );
    assert!(
        dedupe.entity_reads * 2 < concurrent.entity_reads,
        "batch-dedupe reads less: {} against {}",
        dedupe.entity_reads,
        concurrent.entity_reads
    );
    assert!(
        refetch.entity_reads * 2 < concurrent.entity_reads,
        "refetch coalesces: {} against {}",
        refetch.entity_reads,
        concurrent.entity_reads
    );
    assert!(table.contains("| refetch-default |"), "{table}");
    let png = dir.path().join("smoke.png");
    chart::write_png(&png, "Workload smoke", &rows, false).unwrap();
    assert_eq!(&std::fs::read(&png).unwrap()[1..4], b"PNG");
}
