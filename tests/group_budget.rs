//! A source's rate limit shared by the whole consumer group, on the real broker: three
//! `refetch run` instances with `rate_limit = { per_second = N, scope = "group" }` fetch from a
//! local HTTP source that counts requests, with more work queued than the budget allows. Each
//! instance takes the share of the budget that matches the partitions it owns (the engine reports
//! the partition count of the subscribed topics from metadata). Over a steady window the source
//! sees at most N × 1.2 requests per second; after one instance leaves, the two remaining ones
//! still use the whole budget (at least N × 0.8).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use refetch_integration_tests::refetch_binary;
use refetch_testkit::http_source::{HttpSource, HttpSourceOptions};
use refetch_testkit::kafka;
use refetch_testkit::names::unique;
use refetch_testkit::process::{ChildProcess, spawn, terminate, wait_for};
use serde_json::json;

/// The group's budget, requests per second.
const BUDGET: f64 = 20.0;
/// How long a rate is measured.
const WINDOW: Duration = Duration::from_secs(8);

struct Group {
    brokers: String,
    topic: String,
    group: String,
    source: HttpSource,
    dir: tempfile::TempDir,
}

impl Group {
    fn config(&self, instance: &str) -> PathBuf {
        let path = self.dir.path().join(format!("{instance}.toml"));
        let text = format!(
            r#"
[kafka]
brokers = "{brokers}"
group_id = "{group}"
group_protocol = "classic"
consumer_properties = {{ "session.timeout.ms" = "6000", "heartbeat.interval.ms" = "500" }}

[[topics]]
name = "{topic}"
decoder = {{ kind = "json", fixed_type = "customer", id = "/id" }}

[engine]
window = "10ms"
max_wait = "100ms"
commit_interval = "500ms"
shutdown_deadline = "2s"
rebalance_drain = "2s"

[fetcher.sources.customer]
url = "{source}/customer/{{id}}"
timeout = "2s"
rate_limit = {{ per_second = {BUDGET}, burst = 3, scope = "group" }}

[sink]
kind = "jsonl"
path = "{out}"

[ops]
listen = "127.0.0.1:0"

[log]
level = "info"
"#,
            brokers = self.brokers,
            group = self.group,
            topic = self.topic,
            source = self.source.base_url(),
            out = self.dir.path().join(format!("{instance}.jsonl")).display(),
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    fn spawn(&self, instance: &str) -> ChildProcess {
        let config = self.config(instance);
        spawn(
            refetch_binary().unwrap(),
            ["run", "--config", config.to_str().unwrap()],
            [("RUST_LOG", "info,rdkafka=warn")],
            self.dir.path().join(format!("{instance}.log")),
        )
        .unwrap()
    }

    /// Requests per second the source sees over `WINDOW`.
    async fn rate(&self) -> f64 {
        let before = self.source.total_requests();
        let started = Instant::now();
        tokio::time::sleep(WINDOW).await;
        let n = self.source.total_requests() - before;
        n as f64 / started.elapsed().as_secs_f64()
    }
}

async fn assigned(child: &ChildProcess) {
    wait_for(
        "the instance to get partitions",
        Duration::from_secs(60),
        || {
            let log = child.log();
            async move {
                log.lines()
                    .any(|l| l.contains("partitions assigned") && !l.contains("partitions=0"))
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", child.log()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn three_instances_share_one_budget_and_two_keep_all_of_it() {
    let brokers = kafka::brokers().unwrap();
    let g = Group {
        topic: unique("budget"),
        group: unique("budget_group"),
        source: HttpSource::start(HttpSourceOptions::default())
            .await
            .unwrap(),
        dir: tempfile::tempdir().unwrap(),
        brokers,
    };
    kafka::create_topic(&g.brokers, &g.topic, 6).await.unwrap();
    kafka::create_topic(&g.brokers, &format!("{}.dlq", g.group), 1)
        .await
        .unwrap();
    // Far more work than the budget allows in the test's time: every instance always has keys
    // due, so each uses all of its share.
    let mut records = Vec::new();
    for i in 0..4_000 {
        let id = i.to_string();
        g.source.put("customer", &id, json!({"n": i}));
        records.push((
            Some(id.clone().into_bytes()),
            json!({"id": id}).to_string().into_bytes(),
        ));
    }
    kafka::produce(&g.brokers, &g.topic, records).await.unwrap();

    let mut a = g.spawn("a");
    let mut b = g.spawn("b");
    let mut c = g.spawn("c");
    for child in [&a, &b, &c] {
        assigned(child).await;
    }
    // Let the cooperative rebalances settle.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let three = g.rate().await;

    let status = terminate(&mut c, Duration::from_secs(30)).await.unwrap();
    assert_eq!(status.code(), Some(0), "{}", c.log());
    tokio::time::sleep(Duration::from_secs(4)).await;
    let two = g.rate().await;

    for child in [&mut a, &mut b] {
        let status = terminate(child, Duration::from_secs(30)).await.unwrap();
        assert_eq!(status.code(), Some(0), "{}", child.log());
    }
    println!(
        "group budget {BUDGET}/s: three instances {three:.1}/s ({:.0}% of the budget), two after one left {two:.1}/s ({:.0}%)",
        three / BUDGET * 100.0,
        two / BUDGET * 100.0
    );
    assert!(
        three <= BUDGET * 1.2,
        "three instances sent {three:.1}/s against a group budget of {BUDGET}/s"
    );
    assert!(
        two <= BUDGET * 1.2,
        "two instances sent {two:.1}/s against a group budget of {BUDGET}/s"
    );
    assert!(
        two >= BUDGET * 0.8,
        "after one instance left, the two remaining sent only {two:.1}/s of {BUDGET}/s"
    );
}
