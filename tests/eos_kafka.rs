//! Exactly-once into a Kafka topic, on the real broker, with `refetch run` processes that are
//! killed with SIGKILL mid-transaction while another instance joins and leaves (rebalances).
//!
//! Every output record names the input offsets it covers (`refetch-inputs`). Read back with
//! `isolation.level=read_committed`, the output must show no input offset covered by two
//! committed records, every input offset covered (or satisfied by a conditional fetch that found
//! the committed state already current: then a committed record of its key holds a version at
//! least the one the notification announced), and the last state of every key equal to the
//! source's. The same kills in at-least-once mode cover offsets twice: that check fails there,
//! which the second test shows.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rdkafka::producer::{FutureProducer, FutureRecord};
use refetch_integration_tests::refetch_binary;
use refetch_testkit::http_source::{HttpSource, HttpSourceOptions};
use refetch_testkit::kafka;
use refetch_testkit::names::unique;
use refetch_testkit::process::{ChildProcess, kill9, spawn, terminate, wait_for};
use serde_json::json;

const CAP: Duration = Duration::from_secs(240);
const KEYS: usize = 150;

struct EosScenario {
    brokers: String,
    input: String,
    output: String,
    group: String,
    source: Arc<HttpSource>,
    dir: tempfile::TempDir,
    delivery: &'static str,
}

impl EosScenario {
    async fn new(name: &str, delivery: &'static str) -> anyhow::Result<Self> {
        let brokers = kafka::brokers()?;
        let input = unique(&format!("{name}_in"));
        let output = unique(&format!("{name}_out"));
        let group = unique(&format!("{name}_group"));
        kafka::create_topic(&brokers, &input, 4).await?;
        kafka::create_topic(&brokers, &output, 4).await?;
        kafka::create_topic(&brokers, &format!("{group}.dlq"), 1).await?;
        let source = Arc::new(HttpSource::start(HttpSourceOptions::default()).await?);
        let dir = tempfile::Builder::new()
            .prefix(&format!("refetch-{name}-"))
            .disable_cleanup(std::env::var_os("REFETCH_KEEP").is_some())
            .tempdir()?;
        if std::env::var_os("REFETCH_KEEP").is_some() {
            eprintln!("scenario folder kept: {}", dir.path().display());
        }
        Ok(EosScenario {
            brokers,
            input,
            output,
            group,
            source,
            dir,
            delivery,
        })
    }

    /// The config of one instance (its own `instance_id`, so its `transactional.id` is its own).
    fn config(&self, instance: &str) -> anyhow::Result<PathBuf> {
        let path = self.dir.path().join(format!("{instance}.toml"));
        let text = format!(
            r#"
[kafka]
brokers = "{brokers}"
group_id = "{group}"
group_protocol = "classic"
consumer_properties = {{ "session.timeout.ms" = "6000", "heartbeat.interval.ms" = "500" }}

[[topics]]
name = "{input}"
decoder = {{ kind = "json", fixed_type = "customer", id = "/id" }}

[engine]
window = "20ms"
max_wait = "300ms"
commit_interval = "200ms"
shutdown_deadline = "10s"
rebalance_drain = "5s"

[fetcher.sources.customer]
url = "{source}/customer/{{id}}"
timeout = "2s"
version = {{ pointer = "/version", kind = "integer" }}
not_found = {{ pointer = "/error", equals = "not_found" }}

[sink]
kind = "kafka"
brokers = "{brokers}"
topic = "{output}"
delivery = "{delivery}"
transactional_id_prefix = "{group}"
instance_id = "{instance}"
transaction_timeout = "10s"
input_offsets_header = true

[ops]
listen = "127.0.0.1:0"

[log]
level = "info"
"#,
            brokers = self.brokers,
            group = self.group,
            input = self.input,
            output = self.output,
            source = self.source.base_url(),
            delivery = self.delivery,
        );
        std::fs::write(&path, text)?;
        Ok(path)
    }

    fn spawn(&self, instance: &str, run: usize) -> anyhow::Result<ChildProcess> {
        let config = self.config(instance)?;
        spawn(
            refetch_binary()?,
            ["run", "--config", config.to_str().unwrap_or_default()],
            [("RUST_LOG", "info,rdkafka=warn")],
            self.dir.path().join(format!("{instance}-{run}.log")),
        )
    }

    /// Changes random keys at the source and notifies each change (change first, then notify)
    /// until `stop` is set. Returns how many notifications were produced.
    fn mutate(&self, stop: Arc<AtomicBool>, seed: u64) -> tokio::task::JoinHandle<usize> {
        let producer: FutureProducer = kafka::client_config(&self.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .create()
            .expect("producer");
        let source = self.source.clone();
        let topic = self.input.clone();
        tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut sent = 0;
            while !stop.load(Ordering::SeqCst) {
                let mut pending = Vec::new();
                for _ in 0..15 {
                    let id = rng.random_range(0..KEYS).to_string();
                    let v = source.put("customer", &id, json!({"n": rng.random::<u32>()}));
                    let payload = json!({"id": id, "v": v}).to_string();
                    pending.push((id, payload));
                }
                let sends = pending.iter().map(|(id, payload)| {
                    producer.send(
                        FutureRecord::<str, str>::to(&topic)
                            .key(id)
                            .payload(payload),
                        Duration::from_secs(30),
                    )
                });
                for r in futures::future::join_all(sends).await {
                    r.map_err(|(e, _)| e).expect("notification produced");
                    sent += 1;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            sent
        })
    }
}

/// What the output shows.
#[derive(Debug, Default)]
struct Analysis {
    notifications: usize,
    outputs: usize,
    /// Input offsets covered by two or more committed outputs.
    twice: Vec<(i32, i64, usize)>,
    /// Input offsets covered by no committed output, and not explained by a conditional fetch.
    uncovered: Vec<(i32, i64)>,
    /// Input offsets satisfied by a conditional fetch (no output, the committed state was current).
    unchanged: usize,
    /// Keys whose last committed output is not the source's state.
    mismatched: Vec<String>,
}

fn parse_inputs(text: &str) -> Vec<(i32, i64)> {
    text.split(',')
        .filter_map(|c| {
            let mut parts = c.rsplitn(3, ':');
            let offset = parts.next()?.parse().ok()?;
            let partition = parts.next()?.parse().ok()?;
            Some((partition, offset))
        })
        .collect()
}

async fn analyse(s: &EosScenario) -> anyhow::Result<Analysis> {
    let inputs = kafka::read_all(&s.brokers, &s.input, true, Duration::from_secs(60)).await?;
    // Input offset -> (key, announced version).
    let mut announced: BTreeMap<(i32, i64), (String, i64)> = BTreeMap::new();
    for r in &inputs {
        let v: serde_json::Value = serde_json::from_slice(r.payload.as_deref().unwrap_or(b"{}"))?;
        let id = v["id"].as_str().unwrap_or_default().to_owned();
        announced.insert((r.partition, r.offset), (id, v["v"].as_i64().unwrap_or(0)));
    }
    let outputs = kafka::read_all(&s.brokers, &s.output, true, Duration::from_secs(60)).await?;
    let mut covered: BTreeMap<(i32, i64), usize> = BTreeMap::new();
    let mut max_version: BTreeMap<String, i64> = BTreeMap::new();
    // Output partition and offset order is write order per key.
    let mut last: BTreeMap<String, (i32, i64, Option<i64>)> = BTreeMap::new();
    for r in &outputs {
        let key = String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).into_owned();
        let id = key.strip_prefix("customer:").unwrap_or(&key).to_owned();
        let version = r
            .header("refetch-version")
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse::<i64>().ok());
        if let Some(v) = version {
            let m = max_version.entry(id.clone()).or_insert(v);
            *m = (*m).max(v);
        }
        last.insert(id, (r.partition, r.offset, version));
        let text = r
            .header("refetch-inputs")
            .map(|h| String::from_utf8_lossy(h).into_owned())
            .unwrap_or_default();
        for c in parse_inputs(&text) {
            *covered.entry(c).or_default() += 1;
        }
    }
    let mut a = Analysis {
        notifications: announced.len(),
        outputs: outputs.len(),
        ..Analysis::default()
    };
    for ((p, o), n) in &covered {
        if *n > 1 {
            a.twice.push((*p, *o, *n));
        }
    }
    for (coord, (id, v)) in &announced {
        if covered.contains_key(coord) {
            continue;
        }
        if max_version.get(id).is_some_and(|m| m >= v) {
            a.unchanged += 1;
        } else {
            a.uncovered.push(*coord);
        }
    }
    for ((t, id), state) in s.source.snapshot() {
        let Some((version, _)) = state else {
            continue;
        };
        let held = last.get(&id).and_then(|l| l.2);
        if held != Some(version) {
            a.mismatched
                .push(format!("{t}:{id}: source v{version}, output {held:?}"));
        }
    }
    Ok(a)
}

async fn until_committed(s: &EosScenario, logs: &[&ChildProcess]) -> anyhow::Result<()> {
    let r = wait_for(
        "commits to reach the end",
        Duration::from_secs(120),
        || async {
            let end = kafka::end_offsets(&s.brokers, &s.input).await.ok();
            let committed = kafka::committed_offsets(&s.brokers, &s.group, &s.input)
                .await
                .ok();
            match (end, committed) {
                // Transaction markers in the input do not occur (plain producer): end is exact.
                (Some(e), Some(c)) => e.iter().all(|(p, o)| *o == 0 || c.get(p) == Some(o)),
                _ => false,
            }
        },
    )
    .await;
    if r.is_err() {
        for l in logs {
            eprintln!("{}", refetch_testkit::process::tail(&l.log(), 60));
        }
    }
    r
}

/// One run: A starts, the source keeps changing, B joins (a rebalance), A is killed with SIGKILL
/// and restarted, B is killed and restarted, the changes stop, everything is committed, both stop.
async fn run_with_kills(delivery: &'static str) -> (EosScenario, Analysis) {
    let started = Instant::now();
    let s = EosScenario::new(&format!("eos_{delivery}"), delivery)
        .await
        .unwrap();
    let mut a = s.spawn("a", 0).unwrap();
    wait_for_log(&a, "partitions assigned").await;
    let stop = Arc::new(AtomicBool::new(false));
    let mutator = s.mutate(stop.clone(), 7);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut b = s.spawn("b", 0).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    kill9(&mut a).await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    a = s.spawn("a", 1).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    kill9(&mut b).await.unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    b = s.spawn("b", 1).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    let sent = mutator.await.unwrap();
    until_committed(&s, &[&a, &b]).await.unwrap();
    for child in [&mut a, &mut b] {
        let status = terminate(child, Duration::from_secs(60)).await.unwrap();
        assert_eq!(status.code(), Some(0), "{}", child.log());
    }
    let analysis = analyse(&s).await.unwrap();
    assert_eq!(analysis.notifications, sent);
    println!(
        "exactly-once check ({delivery}): {} notifications, {} committed outputs, {} covered twice, {} uncovered, {} satisfied by an unchanged conditional fetch, {} keys differ, {:.1}s",
        analysis.notifications,
        analysis.outputs,
        analysis.twice.len(),
        analysis.uncovered.len(),
        analysis.unchanged,
        analysis.mismatched.len(),
        started.elapsed().as_secs_f64()
    );
    (s, analysis)
}

async fn wait_for_log(child: &ChildProcess, what: &'static str) {
    wait_for("the process to join", Duration::from_secs(60), || {
        let log = child.log();
        async move { log.contains(what) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", child.log()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn exactly_once_into_kafka_covers_every_input_offset_once_through_kills_and_rebalances() {
    let (_s, a) = tokio::time::timeout(CAP, run_with_kills("exactly_once"))
        .await
        .expect("wall-clock cap");
    assert!(a.notifications > 1000, "too little load: {a:?}");
    assert!(
        a.twice.is_empty(),
        "input offsets covered by two committed outputs: {:?}",
        &a.twice[..a.twice.len().min(20)]
    );
    assert!(
        a.uncovered.is_empty(),
        "input offsets not covered: {:?}",
        &a.uncovered[..a.uncovered.len().min(20)]
    );
    assert!(
        a.mismatched.is_empty(),
        "sink differs from source: {:?}",
        a.mismatched
    );
}

/// The same kills with `delivery = "at_least_once"`: after each SIGKILL the notifications after
/// the last commit are fetched and written again, so the check above finds input offsets
/// covered twice (the sink still converges).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn at_least_once_covers_input_offsets_twice_under_the_same_kills() {
    let (_s, a) = tokio::time::timeout(CAP, run_with_kills("at_least_once"))
        .await
        .expect("wall-clock cap");
    assert!(
        !a.twice.is_empty(),
        "at-least-once delivery under SIGKILL should cover some input offsets twice: {a:?}"
    );
    assert!(
        a.mismatched.is_empty(),
        "sink differs from source: {:?}",
        a.mismatched
    );
}

/// Two live instances with one `instance_id`: the second one's producer fences the first, whose
/// pipeline stops with an error that names the `transactional.id` and says what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn a_fenced_producer_stops_the_pipeline_with_a_clear_error() {
    let s = EosScenario::new("eos_fenced", "exactly_once")
        .await
        .unwrap();
    let mut first = s.spawn("same", 0).unwrap();
    wait_for_log(&first, "partitions assigned").await;
    let stop = Arc::new(AtomicBool::new(false));
    let mutator = s.mutate(stop.clone(), 11);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut second = s.spawn("same", 1).unwrap();
    let status = first
        .wait(Duration::from_secs(90))
        .await
        .unwrap_or_else(|e| panic!("{e}: the fenced instance kept running: {}", first.log()));
    stop.store(true, Ordering::SeqCst);
    mutator.await.unwrap();
    let log = first.log();
    assert_ne!(status.code(), Some(0), "{log}");
    let id = format!("{}-same", s.group);
    assert!(
        log.contains("cannot go on") && log.contains(&id) && log.contains("instance_id"),
        "the error names the transactional id and the remedy: {}",
        refetch_testkit::process::tail(&log, 30)
    );
    let status = terminate(&mut second, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0), "{}", second.log());
}
