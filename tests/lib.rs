//! Shared set-up of the real-service scenarios in this package: a random topic and group on the
//! real broker, a local HTTP source whose entities change, `refetch run` processes over a SQLite
//! sink, and the end checks (sink equals source, committed offsets reach the end, no dead
//! letters). Lower-level helpers live in `refetch-testkit`.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, bail};
use refetch::{EntityKey, Version};
use refetch_sinks::SqliteConfig;
use refetch_sinks::sqlite::SqliteSink;
use refetch_sinks::stored::StoredBody;
use refetch_testkit::http_source::{HttpSource, HttpSourceOptions};
use refetch_testkit::kafka;
use refetch_testkit::names::unique;
use refetch_testkit::process::{ChildProcess, repo_root, spawn, wait_for};
use serde_json::json;

/// A pipeline on the in-memory consumer (no broker): its topics, sink, dead letters, handle and
/// task. Used by the tests that exercise the engine with real fetchers and sinks quickly.
/// Keeps producing one healthy notification every `every` until dropped: a live stream of other
/// keys succeeding, which is the evidence that a failing key fails alone (a key that fails on a
/// quiet stream is held and counted as blocked, never dead-lettered).
pub struct Heartbeat(tokio::task::JoinHandle<()>);

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Start a [`Heartbeat`] producing `payload` to `topic`/`partition`.
pub fn heartbeat(
    topics: &refetch::MemoryConsumer,
    topic: &str,
    partition: i32,
    payload: Vec<u8>,
    every: Duration,
) -> Heartbeat {
    heartbeat_of(topics, topic, partition, vec![payload], every)
}

/// Start a [`Heartbeat`] producing each of `payloads` in turn (distinct healthy keys).
pub fn heartbeat_of(
    topics: &refetch::MemoryConsumer,
    topic: &str,
    partition: i32,
    payloads: Vec<Vec<u8>>,
    every: Duration,
) -> Heartbeat {
    let topics = topics.clone();
    let topic = topic.to_owned();
    Heartbeat(tokio::spawn(async move {
        for payload in payloads.iter().cycle() {
            topics.produce(&topic, partition, None, payload, 0);
            tokio::time::sleep(every).await;
        }
    }))
}

pub struct MemoryRun<S> {
    pub topics: refetch::MemoryConsumer,
    pub sink: S,
    pub dead: refetch::MemoryDeadLetters,
    pub handle: refetch::PipelineHandle,
    pub task: tokio::task::JoinHandle<Result<refetch::RunReport, refetch::PipelineError>>,
}

impl<S> MemoryRun<S> {
    /// Waits until every offset is committed; a skipped or stuck offset fails here.
    pub async fn committed_to_end(&self, within: Duration) {
        let end = self.topics.end_offsets();
        refetch_testkit::process::wait_for("commits to reach the end", within, || {
            let (end, committed) = (end.clone(), self.topics.committed());
            async move { end == committed }
        })
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{e}: end {end:?}, committed {:?}, dead letters {:?}",
                self.topics.committed(),
                self.dead.records()
            )
        });
    }

    /// Stops the pipeline gracefully; it must end without an error. Returns the sink.
    pub async fn stop(self) -> S {
        self.handle.shutdown();
        let r = tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the pipeline stops")
            .expect("the pipeline task does not panic");
        r.expect("the pipeline ends without an error");
        self.sink
    }
}

/// Starts `fetcher` -> `sink` on one in-memory topic with `partitions` partitions, dead letters
/// kept in memory, running until its handle asks it to stop.
pub fn start_in_memory<F: refetch::Fetcher, S: refetch::Sink + Clone>(
    topic: &str,
    partitions: i32,
    fetcher: F,
    sink: S,
    decoder: impl refetch::NotificationDecoder + 'static,
    engine: refetch::EngineConfig,
) -> MemoryRun<S> {
    let topics = refetch::MemoryConsumer::new();
    topics.create_topic(topic, partitions);
    let dead = refetch::MemoryDeadLetters::new();
    let (channels, _control) = topics.start();
    let pipeline = refetch::Pipeline::builder::<F, S>()
        .fetcher(fetcher)
        .sink(sink.clone())
        .consumer(channels)
        .decoder(decoder)
        .engine(engine)
        .dead_letters(dead.clone())
        .build()
        .expect("valid pipeline");
    let handle = pipeline.handle();
    let task = tokio::spawn(pipeline.run(std::future::pending()));
    MemoryRun {
        topics,
        sink,
        dead,
        handle,
        task,
    }
}

/// The `refetch` binary, built once if the workspace build did not build it yet.
pub fn refetch_binary() -> anyhow::Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Ok(p) = std::env::var("REFETCH_BIN") {
            return Ok(PathBuf::from(p));
        }
        let target = std::env::var("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| repo_root().join("target"));
        let bin = target.join("debug").join("refetch");
        // Always ask cargo: it is a no-op when the binary is up to date.
        let status = std::process::Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", "refetch-cli", "--bin", "refetch"])
            .current_dir(repo_root())
            .status()
            .map_err(|e| format!("running cargo build: {e}"))?;
        if !status.success() || !bin.exists() {
            return Err(format!("building the refetch binary failed ({status})"));
        }
        Ok(bin)
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// The consumer group protocol a scenario runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Classic with cooperative-sticky.
    Classic,
    /// KIP-848 `consumer`.
    Consumer,
}

/// A real-broker scenario: topic, group, HTTP source, SQLite sink and config file.
pub struct Scenario {
    pub brokers: String,
    pub topic: String,
    pub group: String,
    pub partitions: i32,
    pub source: HttpSource,
    pub dir: tempfile::TempDir,
    pub db: PathBuf,
    pub config: PathBuf,
    pub protocol: Protocol,
    pub notifications: usize,
}

impl Scenario {
    /// Creates the topics and the source and writes the config file.
    pub async fn new(name: &str, protocol: Protocol, partitions: i32) -> anyhow::Result<Scenario> {
        Self::with_brokers(kafka::brokers()?, name, protocol, partitions).await
    }

    /// Like [`Scenario::new`] on a given broker.
    pub async fn with_brokers(
        brokers: String,
        name: &str,
        protocol: Protocol,
        partitions: i32,
    ) -> anyhow::Result<Scenario> {
        let topic = unique(name);
        let group = unique(&format!("{name}_group"));
        kafka::create_topic(&brokers, &topic, partitions).await?;
        kafka::create_topic(&brokers, &format!("{group}.dlq"), 1).await?;
        let source = HttpSource::start(HttpSourceOptions::default()).await?;
        let dir = tempfile::tempdir()?;
        let db = dir.path().join("sink.db");
        let config = dir.path().join("refetch.toml");
        let s = Scenario {
            brokers,
            topic,
            group,
            partitions,
            source,
            dir,
            db,
            config,
            protocol,
            notifications: 0,
        };
        std::fs::write(&s.config, s.config_text())?;
        Ok(s)
    }

    fn config_text(&self) -> String {
        let (protocol, consumer_properties) = match self.protocol {
            Protocol::Classic => (
                "classic",
                r#"{ "session.timeout.ms" = "6000", "heartbeat.interval.ms" = "500" }"#,
            ),
            Protocol::Consumer => ("consumer", "{}"),
        };
        format!(
            r#"
[kafka]
brokers = "{brokers}"
group_id = "{group}"
group_protocol = "{protocol}"
consumer_properties = {consumer_properties}

[[topics]]
name = "{topic}"
decoder = {{ kind = "json", fixed_type = "customer", id = "/id" }}

[engine]
window = "50ms"
max_wait = "500ms"
commit_interval = "200ms"
shutdown_deadline = "10s"
rebalance_drain = "5s"

[fetcher.sources.customer]
url = "{source}/customer/{{id}}"
version = {{ pointer = "/version", kind = "integer" }}
not_found = {{ pointer = "/error", equals = "not_found" }}

[sink]
kind = "sqlite"
path = "{db}"
table = "customers"
busy_timeout = "30s"

[ops]
listen = "127.0.0.1:0"

[log]
level = "info"
"#,
            brokers = self.brokers,
            group = self.group,
            topic = self.topic,
            source = self.source.base_url(),
            db = self.db.display(),
        )
    }

    /// Starts `refetch run` with this scenario's config.
    pub fn spawn(&self, name: &str) -> anyhow::Result<ChildProcess> {
        spawn(
            refetch_binary()?,
            [
                "run",
                "--config",
                self.config.to_str().context("utf-8 path")?,
            ],
            [("RUST_LOG", "info,rdkafka=warn")],
            self.dir.path().join(format!("{name}.log")),
        )
    }

    /// Waits until the process has partitions (or, with more members than partitions, joined).
    pub async fn joined(&self, child: &ChildProcess) -> anyhow::Result<()> {
        wait_for(
            "the process to join the group",
            Duration::from_secs(60),
            || {
                let log = child.log();
                async move { log.contains("partitions assigned") }
            },
        )
        .await
        .with_context(|| child.log())
    }

    /// Changes `ids` at the source and announces each change with a keyed notification (the
    /// outbox order: change first, then notify). `dupes` extra notifications per change.
    pub async fn change(
        &mut self,
        ids: impl IntoIterator<Item = usize>,
        dupes: usize,
    ) -> anyhow::Result<()> {
        let mut records = Vec::new();
        for i in ids {
            let id = i.to_string();
            let v = self
                .source
                .put("customer", &id, json!({"name": format!("customer {i}")}));
            for _ in 0..=dupes {
                records.push((
                    Some(id.clone().into_bytes()),
                    json!({"id": id, "v": v}).to_string().into_bytes(),
                ));
            }
        }
        self.notifications += records.len();
        kafka::produce(&self.brokers, &self.topic, records).await?;
        Ok(())
    }

    /// Committed offsets per partition.
    pub async fn committed(&self) -> anyhow::Result<std::collections::BTreeMap<i32, i64>> {
        kafka::committed_offsets(&self.brokers, &self.group, &self.topic).await
    }

    /// Waits until the committed offsets equal the end offsets.
    pub async fn until_committed(
        &self,
        within: Duration,
        logs: &[&ChildProcess],
    ) -> anyhow::Result<()> {
        until_committed(&self.brokers, &self.group, &self.topic, within, logs).await
    }

    /// Entities whose sink row differs from the source.
    pub async fn differences(&self) -> anyhow::Result<(usize, Vec<String>)> {
        let sink = SqliteSink::open(&SqliteConfig {
            path: self.db.clone(),
            table: "customers".into(),
            ..SqliteConfig::default()
        })
        .await?;
        let held = sink.snapshot().await?;
        let mut differences = Vec::new();
        let mut checked = 0;
        for ((t, id), state) in self.source.snapshot() {
            let Some((version, body)) = state else {
                continue;
            };
            checked += 1;
            match held.get(&EntityKey::new(t.as_str(), id.as_str())) {
                Some(row)
                    if row.version == Some(Version::Int(version))
                        && row.body == Some(StoredBody::Json(body.clone())) => {}
                other => differences.push(format!("{t}:{id} source v{version}, sink {other:?}")),
            }
        }
        Ok((checked, differences))
    }

    /// Records in the dead-letter topic.
    pub async fn dead_letters(&self) -> anyhow::Result<usize> {
        Ok(kafka::read_all(
            &self.brokers,
            &format!("{}.dlq", self.group),
            true,
            Duration::from_secs(2),
        )
        .await?
        .len())
    }

    /// The end checks every scenario shares; returns entities checked.
    pub async fn assert_converged(&self) -> anyhow::Result<usize> {
        let (checked, diff) = self.differences().await?;
        if !diff.is_empty() {
            bail!(
                "{} of {checked} entities differ, e.g. {:?}",
                diff.len(),
                &diff[..diff.len().min(3)]
            );
        }
        let dead = self.dead_letters().await?;
        if dead != 0 {
            bail!("{dead} records in the dead-letter topic");
        }
        Ok(checked)
    }

    /// A path inside the scenario's folder.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// Waits until `group`'s committed offsets on `topic` equal the end offsets; on timeout the error
/// carries both and the end of each process log.
pub async fn until_committed(
    brokers: &str,
    group: &str,
    topic: &str,
    within: Duration,
    logs: &[&ChildProcess],
) -> anyhow::Result<()> {
    let ends = kafka::end_offsets(brokers, topic).await?;
    let committed = || kafka::committed_offsets(brokers, group, topic);
    let r = wait_for("committed offsets to reach the end", within, || {
        let ends = ends.clone();
        async move { committed().await.is_ok_and(|c| c == ends) }
    })
    .await;
    if let Err(e) = r {
        let mut msg = format!("{e}\nends {ends:?}\ncommitted {:?}", committed().await.ok());
        for (i, l) in logs.iter().enumerate() {
            msg.push_str(&format!(
                "\n--- process {i} ---\n{}",
                refetch_testkit::process::tail(&l.log(), 60)
            ));
        }
        bail!(msg);
    }
    Ok(())
}

/// Sums the fetch requests the source served.
pub fn fetches(source: &HttpSource) -> u64 {
    source.total_requests()
}

/// Keeps the folder of a failed scenario for inspection when `REFETCH_KEEP=1`.
pub fn keep(dir: &Path) {
    if std::env::var("REFETCH_KEEP").is_ok() {
        eprintln!("scenario files kept in {}", dir.display());
    }
}
