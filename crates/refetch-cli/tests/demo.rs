//! `refetch demo` end to end (nothing external needed: librdkafka's mock cluster, the demo source
//! and SQLite all run inside the process), and the signal handling of a running pipeline.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use refetch_testkit::process::{ChildProcess, signal, spawn, wait_for_value};

/// `(partition, committed, end)` rows of the demo summary.
fn offsets_table(out: &str) -> BTreeMap<i32, (Option<i64>, i64)> {
    out.lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let tp = parts.next()?;
            let p = tp.strip_prefix("demo.customer-changes/")?.parse().ok()?;
            let committed = parts.next()?.parse().ok();
            let end = parts.next()?.parse().ok()?;
            Some((p, (committed, end)))
        })
        .collect()
}

fn figure(out: &str, label: &str) -> f64 {
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("no `{label}` in:\n{out}"));
    line.trim_start()[label.len()..]
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no number in {line:?}"))
}

#[test]
fn a_small_demo_converges_and_commits_everything() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_refetch"))
        .args([
            "demo",
            "--notifications",
            "2000",
            "--entities",
            "200",
            "--duplicates",
            "4",
            "--window",
            "100ms",
            "--rate",
            "4000",
            "--listen",
            "off",
        ])
        .env_remove("RUST_LOG")
        .output()
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("check: the sink equals the source for all"),
        "{stdout}"
    );
    assert_eq!(figure(&stdout, "notifications produced"), 2000.0);
    assert_eq!(figure(&stdout, "notifications consumed"), 2000.0);
    assert_eq!(figure(&stdout, "dead letters"), 0.0);
    let fetches = figure(&stdout, "fetches");
    // Four events per save and hot customers: far fewer fetches than notifications.
    assert!(fetches < 1000.0, "{stdout}");
    assert_eq!(figure(&stdout, "requests at the source"), fetches);
    let table = offsets_table(&stdout);
    assert_eq!(table.len(), 3, "{stdout}");
    assert_eq!(table.values().map(|(_, end)| end).sum::<i64>(), 2000);
    for (p, (committed, end)) in &table {
        assert_eq!(*committed, Some(*end), "partition {p}: {stdout}");
    }
}

async fn start_slow_demo(log: &std::path::Path) -> (ChildProcess, String) {
    let mut child = spawn(
        env!("CARGO_BIN_EXE_refetch"),
        [
            "demo",
            "--notifications",
            "200000",
            "--rate",
            "1000",
            "--listen",
            "127.0.0.1:0",
        ],
        [("RUST_LOG", "warn,refetch=info")],
        log,
    )
    .unwrap();
    let addr = wait_for_value("the status page address", Duration::from_secs(30), || {
        let log = child.log();
        async move {
            log.lines()
                .find_map(|l| l.strip_prefix("status page: http://"))
                .map(|a| a.trim_end_matches('/').to_owned())
        }
    })
    .await
    .unwrap();
    // Mid-stream: something is committed already.
    wait_for_value("a first commit", Duration::from_secs(60), || {
        let url = format!("http://{addr}/status.json");
        async move {
            let body = reqwest::get(url).await.ok()?.text().await.ok()?;
            let doc: serde_json::Value = serde_json::from_str(&body).ok()?;
            let committed: i64 = doc["status"]["engine"]["partitions"]
                .as_array()?
                .iter()
                .filter_map(|p| p["committed"].as_i64())
                .sum();
            (committed > 0).then_some(())
        }
    })
    .await
    .unwrap();
    assert!(child.try_wait().unwrap().is_none(), "still running");
    (child, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_gracefully_with_a_final_commit_and_exit_0() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("demo.log");
    let (mut child, _) = start_slow_demo(&log).await;
    signal(&child, "TERM").await.unwrap();
    let status = child.wait(Duration::from_secs(60)).await.unwrap();
    let out = child.log();
    assert_eq!(status.code(), Some(0), "{out}");
    assert!(out.contains("shutting down gracefully"), "{out}");
    // The final commit commits what the periodic commits had not yet; when they already covered
    // everything consumed, it says there was nothing left.
    assert!(
        out.contains("final commit done") || out.contains("final commit: nothing left to commit"),
        "{out}"
    );
    assert!(out.contains("interrupted: stopped gracefully"), "{out}");
    // The final commit covers what was consumed: every partition committed up to its position.
    let table = offsets_table(&out);
    assert_eq!(table.len(), 3, "{out}");
    assert!(
        table.values().all(|(c, _)| c.is_some_and(|c| c > 0)),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once_with_130() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("demo.log");
    let (mut child, _) = start_slow_demo(&log).await;
    // Two different signals back to back (the same signal twice could be coalesced by the OS):
    // the second arrives while the graceful shutdown is still running.
    signal(&child, "TERM").await.unwrap();
    signal(&child, "INT").await.unwrap();
    let status = child.wait(Duration::from_secs(30)).await.unwrap();
    let out = child.log();
    assert_eq!(status.code(), Some(130), "{out}");
    assert!(out.contains("second signal: exiting at once"), "{out}");
    assert!(
        !out.contains("refetch demo summary"),
        "no graceful end: {out}"
    );
}
