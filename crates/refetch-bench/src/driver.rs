//! The driver: one source, one topic per contender with the same contents, one child process per
//! contender, and the figures of each run.
//!
//! For each workload the driver generates the backlog once and starts one local HTTP source
//! (`refetch_testkit::http_source::HttpSource`, fixed latency, counts requests). Then, for each
//! contender in turn: it resets the source to the backlog's final state and its request counters,
//! creates a fresh topic, produces the backlog, starts the contender as a child process with a
//! fresh consumer group, and, once the child has received its first record, makes the workload's
//! *live* saves at the source (each followed by its burst of notifications), so the source keeps
//! changing while the contender runs. When the live saves are done it tells the child the topic's
//! end offsets and waits for its report. Convergence compares what the sink holds (the JSON Lines
//! file, read back with `refetch_sinks::jsonl::read_latest`, or for the null sink the versions the
//! child saw acknowledged) with the source's final state, entity by entity.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use rdkafka::ClientContext;
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use refetch::Version;
use refetch_testkit::http_source::{HttpSource, HttpSourceOptions};
use refetch_testkit::kafka;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

use crate::contender::{ContenderKind, ContenderReport};
use crate::workload::{ENTITY_TYPE, Workload, WorkloadSpec, entity_id, payload};

/// How a run is set up.
#[derive(Debug, Clone)]
pub struct DriverOptions {
    /// Bootstrap servers.
    pub brokers: String,
    /// The `refetch-bench` executable (the contenders run as `EXE contender ...`).
    pub exe: PathBuf,
    /// Partitions of every topic.
    pub partitions: i32,
    /// Time cap per contender, from its first record.
    pub cap: Duration,
    /// Where sink files, versions and logs go.
    pub work_dir: PathBuf,
    /// A unique tag for topic and group names.
    pub run_id: String,
    /// The Maven project of the Java peers (`bench/peers`), built with `mvn package`.
    pub peers_dir: PathBuf,
}

/// One row of the results table.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Row {
    /// The workload's name.
    pub workload: String,
    /// The contender's name.
    pub contender: String,
    /// Notifications in the topic (backlog + live).
    pub notifications: u64,
    /// Notifications covered by the last commit.
    pub committed: u64,
    /// Records the contender consumed (more than committed when it was capped mid-way).
    #[serde(default)]
    pub consumed: u64,
    /// Seconds from the first record to the last commit.
    pub elapsed_s: f64,
    /// Committed notifications per second.
    pub throughput: f64,
    /// The time cap was hit.
    pub capped: bool,
    /// Requests the source received during the run.
    pub fetches: u64,
    /// Entity reads: requests per entity summed over entities (a batch request naming 100 ids
    /// counts 100).
    pub entity_reads: u64,
    /// Distinct (entity, version) pairs notified (of the committed part when capped).
    pub distinct_pairs: u64,
    /// `entity_reads / distinct_pairs`.
    pub amplification: f64,
    /// p50 notification-to-durable latency, ms.
    pub p50_ms: Option<f64>,
    /// p99, ms.
    pub p99_ms: Option<f64>,
    /// Peak RSS of the contender process, MiB.
    pub peak_rss_mib: f64,
    /// `Some(true)` when the sink equals the source for every entity; `None` when not checked.
    pub converged: Option<bool>,
    /// Entities whose sink state differs from the source.
    pub mismatched: u64,
    /// Anything the table should say about this row.
    pub note: String,
}

#[derive(Default)]
struct CountErrors {
    errors: AtomicU64,
}

impl ClientContext for CountErrors {}

impl ProducerContext for CountErrors {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if result.is_err() {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// An idempotent producer that never drops a record on a full queue.
struct FastProducer {
    producer: BaseProducer<CountErrors>,
    topic: String,
}

impl FastProducer {
    fn new(brokers: &str, topic: &str) -> anyhow::Result<Self> {
        let producer = kafka::client_config(brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "20")
            .set("batch.num.messages", "10000")
            .set("queue.buffering.max.messages", "200000")
            .set("message.timeout.ms", "120000")
            .create_with_context(CountErrors::default())
            .context("creating the producer")?;
        Ok(FastProducer {
            producer,
            topic: topic.to_owned(),
        })
    }

    fn send(&self, key: &str, value: &[u8]) -> anyhow::Result<()> {
        let mut record = BaseRecord::to(&self.topic).key(key).payload(value);
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    r,
                )) => {
                    record = r;
                    self.producer.poll(Duration::from_millis(5));
                }
                Err((e, _)) => bail!("producing to {}: {e}", self.topic),
            }
        }
    }

    fn finish(self) -> anyhow::Result<()> {
        self.producer
            .flush(Duration::from_secs(120))
            .context("flushing the producer")?;
        let errors = self.producer.context().errors.load(Ordering::Relaxed);
        if errors > 0 {
            bail!("{errors} records were not delivered to {}", self.topic);
        }
        Ok(())
    }
}

fn produce_backlog(brokers: &str, topic: &str, w: &Workload) -> anyhow::Result<()> {
    let p = FastProducer::new(brokers, topic)?;
    for &(e, v) in &w.notifications {
        let id = entity_id(e);
        p.send(&id, &payload(&id, v))?;
    }
    p.finish()
}

/// Make the live saves: change the entity at the source, then publish its burst.
fn live_saves(
    brokers: &str,
    topic: &str,
    source: &HttpSource,
    keys: &[u32],
    burst: usize,
    rate: f64,
) -> anyhow::Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    let p = FastProducer::new(brokers, topic)?;
    let start = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rate.max(1.0));
    for (i, &e) in keys.iter().enumerate() {
        let due = start + interval * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let id = entity_id(e);
        let v = source.put(ENTITY_TYPE, &id, json!({ "n": i }));
        for _ in 0..burst.max(1) {
            p.send(&id, &payload(&id, v))?;
        }
        p.producer.poll(Duration::ZERO);
    }
    p.finish()
}

/// Set the source to the backlog's final state and forget its counters.
fn reset_source(source: &HttpSource, w: &Workload) {
    for (&e, &v) in &w.final_versions {
        source.set(ENTITY_TYPE, &entity_id(e), v, json!({ "n": v }));
    }
    source.reset_counters();
}

/// The source of one workload, shared by its contenders.
pub struct WorkloadRun {
    spec: WorkloadSpec,
    backlog: Workload,
    live: Vec<u32>,
    source: HttpSource,
}

impl WorkloadRun {
    /// Generate the backlog and start the source.
    pub async fn start(spec: WorkloadSpec) -> anyhow::Result<Self> {
        let backlog = spec.generate();
        let live = spec.live_keys();
        let source = HttpSource::start(HttpSourceOptions {
            latency: Duration::from_millis(spec.source_latency_ms),
            ..HttpSourceOptions::default()
        })
        .await?;
        Ok(WorkloadRun {
            spec,
            backlog,
            live,
            source,
        })
    }

    /// The workload's spec.
    pub fn spec(&self) -> &WorkloadSpec {
        &self.spec
    }

    /// Run one contender; a failure becomes a row that says so.
    pub async fn run(&self, opts: &DriverOptions, kind: ContenderKind) -> Row {
        match self.try_run(opts, kind).await {
            Ok(row) => row,
            Err(e) => {
                tracing::error!(contender = kind.label(), error = %format!("{e:#}"), "contender failed");
                Row {
                    workload: self.spec.name.clone(),
                    contender: kind.label().to_owned(),
                    note: format!("failed: {e:#}"),
                    ..Row::default()
                }
            }
        }
    }

    async fn try_run(&self, opts: &DriverOptions, kind: ContenderKind) -> anyhow::Result<Row> {
        let spec = &self.spec;
        let name = format!(
            "refetch-bench-{}-{}-{}",
            opts.run_id,
            spec.name,
            kind.label()
        );
        tracing::info!(topic = %name, notifications = self.backlog.notifications.len(), "preparing");
        kafka::create_topic(&opts.brokers, &name, opts.partitions).await?;
        if matches!(
            kind,
            ContenderKind::RefetchDefault | ContenderKind::RefetchTuned
        ) {
            // refetch checks its dead-letter topic at start (the group's name + ".dlq").
            kafka::create_topic(&opts.brokers, &format!("{name}.dlq"), 1).await?;
        }
        reset_source(&self.source, &self.backlog);
        {
            let (b, t, w) = (opts.brokers.clone(), name.clone(), self.backlog.clone());
            tokio::task::spawn_blocking(move || produce_backlog(&b, &t, &w)).await??;
        }
        self.source.reset_counters();
        std::fs::create_dir_all(&opts.work_dir)?;
        let jsonl = (spec.sink == "jsonl").then(|| opts.work_dir.join(format!("{name}.jsonl")));
        if let Some(p) = &jsonl {
            let _ = std::fs::remove_file(p);
        }
        let versions = opts.work_dir.join(format!("{name}.versions.json"));
        let log = std::fs::File::create(opts.work_dir.join(format!("{name}.log")))?;
        let mut cmd = match kind.java_peer() {
            None => {
                let mut c = Command::new(&opts.exe);
                c.arg("contender").args(["--kind", kind.label()]);
                c
            }
            Some((module, main)) => {
                let m = opts.peers_dir.join(module).join("target");
                let common = opts.peers_dir.join("common").join("target").join("classes");
                if !m.join("classes").exists() || !m.join("dependency").exists() {
                    bail!(
                        "not built: run `mvn -B -q -f {}/pom.xml package` (see docs/benchmarks.md)",
                        opts.peers_dir.display()
                    );
                }
                let cp = format!(
                    "{}:{}/*:{}",
                    m.join("classes").display(),
                    m.join("dependency").display(),
                    common.display()
                );
                let mut c = Command::new("java");
                c.args(["-cp", &cp, main]);
                c
            }
        };
        cmd.args(["--brokers", &opts.brokers])
            .args(["--topic", &name])
            .args(["--group", &name])
            .args(["--source", &self.source.base_url()])
            .args(["--cap", &format!("{}ms", opts.cap.as_millis())])
            .arg("--versions-out")
            .arg(&versions)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        if let Some(p) = &jsonl {
            cmd.arg("--jsonl").arg(p);
        }
        if spec.no_latency && kind.java_peer().is_none() {
            cmd.arg("--no-latency");
        }
        tracing::info!(contender = kind.label(), "starting");
        let mut child = cmd.spawn().context("starting the contender process")?;
        let mut stdin = child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(Duration::from_secs(120), async {
            while let Some(line) = lines.next_line().await? {
                if line == "FIRST" {
                    return Ok(());
                }
            }
            bail!("the contender exited before its first record")
        })
        .await
        .context("no first record within 120 s")?;
        first?;
        {
            let (b, t, s, k) = (
                opts.brokers.clone(),
                name.clone(),
                self.source.clone(),
                self.live.clone(),
            );
            let (burst, rate) = (spec.burst, spec.live_rate);
            tokio::task::spawn_blocking(move || live_saves(&b, &t, &s, &k, burst, rate)).await??;
        }
        let end = kafka::end_offsets(&opts.brokers, &name).await?;
        let notifications: u64 = end.values().map(|&o| o as u64).sum();
        stdin
            .write_all(format!("{}\n", serde_json::to_string(&end)?).as_bytes())
            .await?;
        stdin.flush().await?;
        let report: ContenderReport =
            tokio::time::timeout(opts.cap + Duration::from_secs(180), async {
                while let Some(line) = lines.next_line().await? {
                    if let Some(json) = line.strip_prefix("REPORT ") {
                        return Ok(serde_json::from_str(json)?);
                    }
                }
                bail!(
                    "the contender exited without a report (see its log in {})",
                    opts.work_dir.display()
                )
            })
            .await
            .context("no report in time")??;
        let _ = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
        let fetches = self.source.total_requests();
        let entity_reads: u64 = self
            .source
            .snapshot()
            .keys()
            .map(|(t, id)| self.source.requests_for(t, id))
            .sum();

        let all_pairs = (self.backlog.saves + self.live.len()) as u64;
        // A capped contender read only part of the topic: count the pairs of that part (the
        // hand-rolled loop counts them itself; for the others, the share of records consumed).
        let distinct_pairs = if report.capped {
            report.distinct_pairs_consumed.unwrap_or_else(|| {
                let share = report.consumed.min(notifications) as f64 / notifications.max(1) as f64;
                (all_pairs as f64 * share).round() as u64
            })
        } else {
            all_pairs
        };
        let (converged, mismatched, mut note) = if kind == ContenderKind::Raw {
            (None, 0, "reads only; writes nothing".to_owned())
        } else if report.capped {
            (None, 0, format!("time cap {:?} hit", opts.cap))
        } else {
            let held = match &jsonl {
                Some(p) => read_jsonl_versions(p)?,
                None => serde_json::from_slice(&std::fs::read(&versions)?)?,
            };
            let bad = mismatches(&self.source, &held);
            (Some(bad == 0), bad, String::new())
        };
        if report.capped && kind != ContenderKind::Raw {
            note = format!("{note}; latency and amplification of the part done");
        }
        if kind == ContenderKind::KafkaStreams {
            note = format!(
                "{note}{}suppression runs on stream time: after the input ends the harness sends 1 heartbeat record per partition per second (counted in committed)",
                if note.is_empty() { "" } else { "; " }
            );
        }
        let committed = report.committed;
        Ok(Row {
            workload: spec.name.clone(),
            contender: kind.label().to_owned(),
            notifications,
            committed,
            consumed: report.consumed,
            elapsed_s: report.elapsed_s,
            throughput: if report.elapsed_s > 0.0 {
                committed as f64 / report.elapsed_s
            } else {
                0.0
            },
            capped: report.capped,
            fetches,
            entity_reads,
            distinct_pairs,
            amplification: if distinct_pairs > 0 {
                entity_reads as f64 / distinct_pairs as f64
            } else {
                0.0
            },
            p50_ms: report.probe.p50_ms,
            p99_ms: report.probe.p99_ms,
            peak_rss_mib: report.vmhwm_kb as f64 / 1024.0,
            converged,
            mismatched,
            note,
        })
    }

    /// Stop the source.
    pub async fn shutdown(&self) {
        self.source.shutdown().await;
    }
}

fn read_jsonl_versions(path: &Path) -> anyhow::Result<HashMap<String, i64>> {
    let latest = refetch_sinks::jsonl::read_latest(path)
        .map_err(|e| anyhow!("reading {}: {e}", path.display()))?;
    Ok(latest
        .into_iter()
        .filter_map(|(k, entry)| match entry.version {
            Some(Version::Int(v)) => Some((k.id().to_owned(), v)),
            _ => None,
        })
        .collect())
}

/// Entities whose held version differs from the source's final version.
fn mismatches(source: &HttpSource, held: &HashMap<String, i64>) -> u64 {
    let snapshot: BTreeMap<(String, String), Option<(i64, serde_json::Value)>> = source.snapshot();
    snapshot
        .iter()
        .filter(|((_, id), state)| {
            let want = state.as_ref().map(|(v, _)| *v);
            held.get(id.as_str()).copied() != want
        })
        .count() as u64
}
