//! The operator's commands against a real broker: `validate --connect`, `run`, `dlq list`,
//! `dlq redrive` (through the engine, and to the retry topic that `run` subscribes to), `fetch`
//! and `offsets` (show, a reset plan that changes nothing, a reset with `--execute`).
//!
//! Needs a real broker: run with `scripts/test` (or `REFETCH_TEST_KAFKA=host:port cargo test -p
//! refetch-cli --test operator_commands -- --include-ignored`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use refetch::{EntityKey, Version};
use refetch_sinks::jsonl::read_latest;
use refetch_testkit::http_source::{Fault, HttpSource, HttpSourceOptions};
use refetch_testkit::kafka;
use refetch_testkit::names::unique;
use refetch_testkit::process::{spawn, terminate, wait_for};
use serde_json::json;

struct Setup {
    brokers: String,
    topic: String,
    group: String,
    config: PathBuf,
    sink: PathBuf,
    dir: tempfile::TempDir,
}

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

async fn run_until_caught_up(s: &Setup, topics: &[&str], log: &str) {
    let mut child = spawn(
        env!("CARGO_BIN_EXE_refetch"),
        ["run", "--config", s.config.to_str().unwrap()],
        [("RUST_LOG", "info,rdkafka=warn")],
        s.dir.path().join(log),
    )
    .unwrap();
    for topic in topics {
        let ends = kafka::end_offsets(&s.brokers, topic).await.unwrap();
        wait_for(
            "committed offsets to reach the end",
            Duration::from_secs(60),
            || {
                let (b, g, t, ends) = (
                    s.brokers.clone(),
                    s.group.clone(),
                    topic.to_string(),
                    ends.clone(),
                );
                async move {
                    let committed = kafka::committed_offsets(&b, &g, &t)
                        .await
                        .unwrap_or_default();
                    ends.iter()
                        .all(|(p, e)| *e == 0 || committed.get(p) == Some(e))
                }
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", child.log()));
    }
    let status = terminate(&mut child, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0), "{}", child.log());
}

fn held(sink: &Path, id: &str) -> Option<Version> {
    read_latest(sink)
        .unwrap()
        .get(&EntityKey::new("customer", id))
        .and_then(|e| e.version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn validate_run_dlq_fetch_and_offsets_work_together() {
    let brokers = kafka::brokers().unwrap();
    let topic = unique("ops_cmds");
    let group = unique("ops_cmds_group");
    let retry = format!("{group}.retry");
    kafka::create_topic(&brokers, &topic, 3).await.unwrap();
    kafka::create_topic(&brokers, &format!("{group}.dlq"), 1)
        .await
        .unwrap();
    kafka::create_topic(&brokers, &retry, 1).await.unwrap();
    let source = HttpSource::start(HttpSourceOptions::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sink = dir.path().join("sink.jsonl");
    let config = dir.path().join("refetch.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[kafka]
brokers = "{brokers}"
group_id = "{group}"
retry_topic = "{retry}"

[[topics]]
name = "{topic}"
decoder = {{ kind = "json", fixed_type = "customer", id = "/id" }}

[engine]
window = "20ms"
max_wait = "200ms"
commit_interval = "100ms"

[fetcher.sources.customer]
url = "{base}/customer/{{id}}"
version = {{ pointer = "/version", kind = "integer" }}

[sink]
kind = "jsonl"
path = "{sink}"

[ops]
listen = "127.0.0.1:0"

[validate]
health_urls = {{ customer = "{base}/customer/1" }}
"#,
            base = source.base_url(),
            sink = sink.display()
        ),
    )
    .unwrap();
    let s = Setup {
        brokers: brokers.clone(),
        topic: topic.clone(),
        group: group.clone(),
        config: config.clone(),
        sink: sink.clone(),
        dir,
    };
    let cfg = config.to_str().unwrap();

    for i in 1..=20 {
        source.put("customer", &i.to_string(), json!({"n": i}));
    }
    // validate --connect reaches everything.
    let (code, out) = refetch(&["validate", "--config", cfg, "--connect"]).await;
    assert_eq!(code, 0, "{out}");
    for line in [
        "ok      broker",
        "ok      dead-letter topic",
        "ok      source customer: GET",
        "ok      sink jsonl",
    ] {
        assert!(out.contains(line), "{line} missing:\n{out}");
    }

    // Customer 13 is refused by the source (400: permanent): it is dead-lettered.
    source.poison("customer", "13", Fault::Status(400));
    let records = (1..=20).map(|i| {
        (
            Some(i.to_string().into_bytes()),
            json!({"id": i.to_string()}).to_string().into_bytes(),
        )
    });
    kafka::produce(&brokers, &topic, records).await.unwrap();
    run_until_caught_up(&s, &[&s.topic], "run1.log").await;
    assert_eq!(held(&s.sink, "12"), Some(Version::Int(1)));
    assert_eq!(held(&s.sink, "13"), None);

    let (code, out) = refetch(&["dlq", "list", "--config", cfg]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("refetch.entity.id: 13"), "{out}");
    assert!(out.contains("refetch.reason: fetch"), "{out}");
    assert!(out.contains("1 dead letter(s)"), "{out}");
    let (_, json_out) = refetch(&["dlq", "list", "--config", cfg, "--json"]).await;
    let first: serde_json::Value = serde_json::from_str(json_out.lines().next().unwrap()).unwrap();
    assert_eq!(first["partition"], 0);

    // Redrive through the engine once the source accepts the customer again.
    source.clear_faults();
    source.put("customer", "13", json!({"n": 13, "fixed": true}));
    let (code, out) = refetch(&["dlq", "redrive", "--config", cfg, "--all", "--dry-run"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("customer:13\twould refresh"), "{out}");
    assert_eq!(held(&s.sink, "13"), None, "a dry run changes nothing");
    let (code, out) = refetch(&["dlq", "redrive", "--config", cfg, "--reason", "fetch"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("customer:13\trefreshed"), "{out}");
    assert_eq!(held(&s.sink, "13"), Some(Version::Int(2)));

    // Or republish to the retry topic, which `run` consumes.
    source.put("customer", "13", json!({"n": 13, "again": true}));
    let (code, out) = refetch(&[
        "dlq",
        "redrive",
        "--config",
        cfg,
        "--record",
        "0:0",
        "--to-retry-topic",
    ])
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("1 record(s) republished"), "{out}");
    let (code, out) = refetch(&[
        "dlq",
        "redrive",
        "--config",
        cfg,
        "--all",
        "--to-source-topic",
    ])
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("skipped: its payload is a dead-letter summary"),
        "{out}"
    );
    let (code, out) = refetch(&["offsets", "--config", cfg]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("{retry}/0")), "{out}");
    run_until_caught_up(&s, &[&retry], "run2.log").await;
    assert_eq!(held(&s.sink, "13"), Some(Version::Int(3)));

    // fetch refreshes named keys now.
    source.put("customer", "5", json!({"n": 5, "edited": true}));
    let (code, out) = refetch(&["fetch", "--config", cfg, "--key", "customer:5"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("customer:5\tok"), "{out}");
    assert_eq!(held(&s.sink, "5"), Some(Version::Int(2)));
    let (code, out) = refetch(&["fetch", "--config", cfg, "--key", "order:1"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("no source serves entity type `order`"),
        "{out}"
    );

    // offsets: lag 0 now; a reset to earliest is only a plan without --execute (like
    // kafka-consumer-groups --reset-offsets), then committed with it.
    let (code, out) = refetch(&["offsets", "--config", cfg]).await;
    assert_eq!(code, 0, "{out}");
    let total = out.lines().find(|l| l.starts_with("total")).unwrap();
    assert!(total.trim_end().ends_with(" 0"), "{out}");
    let before = kafka::committed_offsets(&brokers, &group, &topic)
        .await
        .unwrap();
    assert_eq!(before.values().sum::<i64>(), 20);
    for plan in [
        vec!["offsets", "--config", cfg, "--reset-to", "earliest"],
        vec![
            "offsets",
            "--config",
            cfg,
            "--reset-to",
            "earliest",
            "--dry-run",
        ],
    ] {
        let (code, out) = refetch(&plan).await;
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("reset plan for group"), "{out}");
        assert!(out.contains("plan only: nothing committed"), "{out}");
        let unchanged = kafka::committed_offsets(&brokers, &group, &topic)
            .await
            .unwrap();
        assert_eq!(unchanged, before, "{plan:?} changed the group's offsets");
    }
    let (code, out) = refetch(&[
        "offsets",
        "--config",
        cfg,
        "--reset-to",
        "earliest",
        "--execute",
    ])
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("committed new offsets"), "{out}");
    let after = kafka::committed_offsets(&brokers, &group, &topic)
        .await
        .unwrap();
    assert!(after.values().all(|o| *o == 0), "{after:?}");
    let (_, out) = refetch(&["offsets", "--config", cfg]).await;
    let total = out.lines().find(|l| l.starts_with("total")).unwrap();
    assert!(
        total.trim_end().ends_with(" 21"),
        "20 on the topic and 1 on the retry topic: {out}"
    );
}
