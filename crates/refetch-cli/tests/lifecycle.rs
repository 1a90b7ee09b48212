//! The binary's start-up and signal behaviour, subcommand by subcommand, as `refetch --help` and
//! `docs/operations.md` describe it, against the test broker:
//! - `run` checks the dead-letter topic before it logs "refetch running";
//! - `validate --connect` creates no file and no table;
//! - `fetch`, `dlq redrive`, `backfill` and `reconcile` finish what is in flight on SIGTERM or
//!   SIGINT and exit 130 (backfill keeps its checkpoint and resumes); a second signal exits 130
//!   at once.
//!
//! Needs a real broker (and PostgreSQL for the table case): `scripts/test`, or
//! `REFETCH_TEST_KAFKA=... REFETCH_TEST_PG=... cargo test -p refetch-cli --test lifecycle --
//! --include-ignored`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use refetch_testkit::kafka::{self, OutRecord};
use refetch_testkit::names::unique;
use refetch_testkit::process::wait_for;
use serde_json::json;
use support::{Env, Run};

/// Run `refetch ARGS` to the end: (exit code, stdout + stderr).
async fn refetch(args: &[&str]) -> (i32, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_refetch"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn a_missing_dead_letter_topic_fails_before_running_is_logged() {
    let env = Env::new("lifecycle_dlq", 1).await;
    let missing = unique("no_such_dlq");
    let config = env.config_text(&[&env.topic], "20ms", "info", "").replace(
        &format!("group_id = \"{}\"", env.group),
        &format!(
            "group_id = \"{}\"\ndead_letter_topic = \"{missing}\"",
            env.group
        ),
    );
    env.write_config(&config);
    let mut run = Run::run(&env, "run.log");
    let code = run.exit_code(Duration::from_secs(60)).await;
    let log = run.log();
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains(&format!("the dead-letter topic `{missing}` is not usable")),
        "{log}"
    );
    assert!(!log.contains("refetch running"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker and PostgreSQL: run scripts/test"]
async fn validate_connect_creates_no_file_and_no_table() {
    let env = Env::new("lifecycle_validate", 1).await;
    let folder = env.dir.path().join("data");
    std::fs::create_dir(&folder).unwrap();
    let jsonl = folder.join("out.jsonl");
    let sqlite = folder.join("out.db");
    let pg_table = unique("validate_table");
    for (sink, expect) in [
        (
            format!("kind = \"jsonl\"\npath = \"{}\"", jsonl.display()),
            "does not exist yet; its folder is writable",
        ),
        (
            format!("kind = \"sqlite\"\npath = \"{}\"", sqlite.display()),
            "does not exist yet; its folder is writable",
        ),
        (
            format!(
                "kind = \"postgres\"\nurl = \"{}\"\ntable = \"{pg_table}\"\ncreate_table = true",
                refetch_testkit::postgres::url().unwrap()
            ),
            "`run` creates it (create_table = true)",
        ),
    ] {
        let config = env.config_text(&[&env.topic], "20ms", "info", "").replace(
            &format!("kind = \"jsonl\"\npath = \"{}\"", env.sink.display()),
            &sink,
        );
        env.write_config(&config);
        let (code, out) = refetch(&[
            "validate",
            "--connect",
            "--config",
            env.config.to_str().unwrap(),
        ])
        .await;
        assert_eq!(code, 0, "{out}");
        assert!(out.contains(expect), "{expect}:\n{out}");
        assert!(out.contains("ok      dead-letter topic"), "{out}");
    }
    let left: Vec<_> = std::fs::read_dir(&folder).unwrap().collect();
    assert!(left.is_empty(), "validate created {left:?}");
    let client = refetch_testkit::postgres::connect().await.unwrap();
    let row = client
        .query_one(
            "SELECT to_regclass($1)::text",
            &[&format!("public.{pg_table}")],
        )
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, Option<String>>(0),
        None,
        "validate created the table"
    );
    // An existing file is checked, not changed.
    std::fs::write(&jsonl, "").unwrap();
    let config = env.config_text(&[&env.topic], "20ms", "info", "").replace(
        &format!("path = \"{}\"", env.sink.display()),
        &format!("path = \"{}\"", jsonl.display()),
    );
    env.write_config(&config);
    let (code, out) = refetch(&[
        "validate",
        "--connect",
        "--config",
        env.config.to_str().unwrap(),
    ])
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("exists and is writable"), "{out}");
    assert_eq!(std::fs::metadata(&jsonl).unwrap().len(), 0);
}

/// Wait until the source has received `n` requests.
async fn requests(env: &Env, n: u64) {
    wait_for(
        &format!("{n} request(s) at the source"),
        Duration::from_secs(30),
        || {
            let got = env.source.total_requests();
            async move { got >= n }
        },
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn fetch_and_redrive_finish_in_flight_work_on_the_first_signal_and_exit_130() {
    let env = Env::new("lifecycle_fetch", 1).await;
    env.write_config(&env.config_text(&[&env.topic], "20ms", "info", ""));
    for id in ["1", "2"] {
        env.source.put("customer", id, json!({ "n": id }));
    }
    env.source.set_latency(Duration::from_millis(1500));
    let cfg = env.config.to_str().unwrap().to_owned();

    // fetch: both keys are in flight when SIGTERM arrives; they finish, then exit 130.
    let mut fetch = Run::start(
        &[
            "fetch",
            "--config",
            &cfg,
            "--key",
            "customer:1",
            "--key",
            "customer:2",
        ],
        &env.dir.path().join("fetch.log"),
    );
    requests(&env, 1).await;
    fetch.signal("TERM").await;
    assert_eq!(
        fetch.exit_code(Duration::from_secs(30)).await,
        Some(130),
        "{}",
        fetch.log()
    );
    let log = fetch.log();
    assert!(
        log.contains("shutting down gracefully: finishing what is in flight"),
        "{log}"
    );
    assert!(
        log.contains("customer:1\tok") && log.contains("customer:2\tok"),
        "{log}"
    );
    assert!(env.held("1").is_some() && env.held("2").is_some());

    // dlq redrive: the same for the entities dead letters name.
    let dlq = format!("{}.dlq", env.group);
    kafka::produce_records(
        &env.brokers,
        &dlq,
        [OutRecord {
            payload: Some(b"{}".to_vec()),
            headers: vec![
                ("refetch.entity.type".into(), b"customer".to_vec()),
                ("refetch.entity.id".into(), b"2".to_vec()),
                ("refetch.reason".into(), b"fetch".to_vec()),
            ],
            ..OutRecord::default()
        }],
    )
    .await
    .unwrap();
    env.source
        .put("customer", "2", json!({ "n": "2", "again": true }));
    let before = env.source.total_requests();
    let mut redrive = Run::start(
        &["dlq", "redrive", "--config", &cfg, "--all"],
        &env.dir.path().join("redrive.log"),
    );
    requests(&env, before + 1).await;
    redrive.signal("INT").await;
    assert_eq!(
        redrive.exit_code(Duration::from_secs(30)).await,
        Some(130),
        "{}",
        redrive.log()
    );
    assert!(
        redrive.log().contains("customer:2\trefreshed"),
        "{}",
        redrive.log()
    );

    // A second signal does not wait for a source that takes its time.
    env.source.set_latency(Duration::from_secs(20));
    let mut stuck = Run::start(
        &["fetch", "--config", &cfg, "--key", "customer:1"],
        &env.dir.path().join("stuck.log"),
    );
    let before = env.source.total_requests();
    requests(&env, before + 1).await;
    stuck.signal("TERM").await;
    stuck
        .wait_log("shutting down gracefully: finishing what is in flight", 1)
        .await;
    let second = Instant::now();
    stuck.signal("TERM").await;
    assert_eq!(stuck.exit_code(Duration::from_secs(10)).await, Some(130));
    assert!(
        second.elapsed() < Duration::from_secs(5),
        "{:?}",
        second.elapsed()
    );
    assert!(
        stuck.log().contains("second signal: exiting at once"),
        "{}",
        stuck.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn backfill_and_reconcile_stop_between_pages_exit_130_and_resume() {
    let env = Env::new("lifecycle_backfill", 1).await;
    for i in 1..=40 {
        env.source
            .put("customer", &i.to_string(), json!({ "n": i }));
    }
    let db = env.dir.path().join("sink.db");
    let listing = format!(
        "\n[fetcher.sources.customer.listing]\nurl = \"{}/customer?offset={{offset}}&limit={{limit}}\"\npage_size = 5\ntotal = \"/total\"\n",
        env.source.base_url()
    );
    let config = env
        .config_text(&[&env.topic], "20ms", "info", "")
        .replace(
            &format!("kind = \"jsonl\"\npath = \"{}\"", env.sink.display()),
            &format!("kind = \"sqlite\"\npath = \"{}\"", db.display()),
        )
        .replace(
            "[sink]",
            &format!("{listing}\n[reconcile]\nrepair_batch = 5\n\n[sink]"),
        );
    env.write_config(&config);
    let cfg = env.config.to_str().unwrap().to_owned();
    let state = env.dir.path().join("refetch.toml.backfill.json");
    env.source.set_latency(Duration::from_millis(200));

    let mut backfill = Run::start(
        &["backfill", "--config", &cfg],
        &env.dir.path().join("b1.log"),
    );
    wait_for("a checkpointed page", Duration::from_secs(60), || {
        let saved = std::fs::read_to_string(&state).unwrap_or_default();
        async move { saved.contains("\"pages\": 1") || saved.contains("\"pages\": 2") }
    })
    .await
    .unwrap();
    backfill.signal("INT").await;
    assert_eq!(
        backfill.exit_code(Duration::from_secs(30)).await,
        Some(130),
        "{}",
        backfill.log()
    );
    let log = backfill.log();
    assert!(log.contains("interrupted by SIGINT"), "{log}");
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    let pages = saved["types"]["customer"]["pages"].as_u64().unwrap();
    assert!((1..8).contains(&pages), "{saved}");
    assert_eq!(saved["types"]["customer"]["done"], false);

    // Run again: it resumes after the checkpoint and finishes.
    env.source.set_latency(Duration::ZERO);
    let (code, out) = refetch(&["backfill", "--config", &cfg]).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("resuming after {pages} page(s)")),
        "{out}"
    );

    // reconcile: 40 new customers drifted (missing); SIGTERM after the first repairs.
    for i in 41..=80 {
        env.source
            .put("customer", &i.to_string(), json!({ "n": i }));
    }
    env.source.set_latency(Duration::from_millis(300));
    let before = env.source.total_requests();
    let mut reconcile = Run::start(
        &["reconcile", "--config", &cfg],
        &env.dir.path().join("r.log"),
    );
    // The listing is 16 pages; repairs come after it.
    requests(&env, before + 17).await;
    reconcile.signal("TERM").await;
    assert_eq!(
        reconcile.exit_code(Duration::from_secs(60)).await,
        Some(130),
        "{}",
        reconcile.log()
    );
    assert!(
        reconcile.log().contains("reconcile interrupted by SIGTERM"),
        "{}",
        reconcile.log()
    );
}
