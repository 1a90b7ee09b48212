//! The driver: one source, one topic per contender with the same contents, one or more child
//! processes per contender, and the figures of each run, all judged from outside the contender.
//!
//! For each workload the driver generates the backlog and the live stream once and starts one
//! [`BenchSource`]. Then, for each contender in turn:
//!
//! 1. the source is reset to the backlog's final state and its counters to zero;
//! 2. a fresh topic gets the backlog (each record's timestamp is set by the driver, which keeps
//!    every save's time for the freshness figure); refetch also gets its dead-letter topic;
//! 3. the workload's initial instances start as child processes in one fresh consumer group;
//! 4. once one of them receives its first record, the clock starts and the driver makes the live
//!    saves (change the entity at the source, then publish its events, spread in time), and plays
//!    the workload's schedule: poisoning on and off, a second instance joining and leaving, a
//!    SIGKILL and restart every few seconds;
//! 5. when the live stream is over it sends the topic's end offsets to every instance, and the
//!    run is complete when the group's committed offsets reach them and (for contenders that
//!    write) the durable logs cover every entity's final version; or when the time cap is hit;
//! 6. every instance is told to stop; CPU time (user + sys from `/proc/<pid>/stat`) and peak RSS
//!    (`VmHWM`) were sampled from outside every 25 ms, so killed processes count too;
//! 7. the sink is read back and compared with the source, entity by entity; freshness is computed
//!    from the saves and the durable logs ([`crate::freshness`]).

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{Offset, TopicPartitionList};
use refetch::Version;
use refetch_testkit::kafka;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

use crate::contender::{ContenderKind, ContenderReport};
use crate::freshness::{self, Freshness, Save};
use crate::probe::{Histogram, parse_durable_line, unix_micros};
use crate::source::{BenchSource, SourceOptions};
use crate::workload::{LiveItem, Workload, WorkloadSpec, entity_id, entity_index, payload};

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
    /// Where sink files, durable logs and process logs go.
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
    /// How many processes ran, and what happened to them.
    pub instances: String,
    /// Notifications in the topic (backlog + live).
    pub notifications: u64,
    /// Notifications covered by the group's last commit.
    pub committed: u64,
    /// Records the contender's processes reported consuming (killed processes report nothing).
    pub consumed: u64,
    /// Seconds from the first record to completion (or the cap).
    pub elapsed_s: f64,
    /// Committed notifications per second.
    pub throughput: f64,
    /// The time cap was hit.
    pub capped: bool,
    /// Requests the source received.
    pub fetches: u64,
    /// Entity reads: requests per entity summed (a batch naming 100 ids counts 100).
    pub entity_reads: u64,
    /// Saves (distinct entity versions) in the backlog and the live stream.
    pub saves: u64,
    /// `entity_reads / saves`.
    pub reads_per_save: f64,
    /// Receipt-to-durable latency p50, ms (versioned notifications; processes that reported).
    pub receipt_p50_ms: Option<f64>,
    /// Receipt-to-durable latency p99, ms.
    pub receipt_p99_ms: Option<f64>,
    /// Save-to-durable freshness.
    pub freshness: Freshness,
    /// CPU seconds (user + sys) of the contender's processes over the run.
    pub cpu_s: f64,
    /// CPU seconds per million notifications.
    pub cpu_per_million: f64,
    /// Peak RSS of the largest contender process, MiB.
    pub peak_rss_mib: f64,
    /// From the last durable write to completion (the group's commits reaching the end), ms:
    /// how promptly commits follow the work. `None` for the raw consumer and capped runs.
    #[serde(default)]
    pub commit_tail_ms: Option<f64>,
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
    fn new(brokers: &str, topic: &str, linger_ms: u32) -> anyhow::Result<Self> {
        let producer = kafka::client_config(brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", linger_ms.to_string())
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

    fn send(&self, key: &str, value: &[u8], timestamp_ms: i64) -> anyhow::Result<()> {
        let mut record = BaseRecord::to(&self.topic)
            .key(key)
            .payload(value)
            .timestamp(timestamp_ms);
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

/// Produce the backlog; returns every backlog save with the time its first notification was
/// produced.
fn produce_backlog(brokers: &str, topic: &str, w: &Workload) -> anyhow::Result<Vec<Save>> {
    let p = FastProducer::new(brokers, topic, 20)?;
    let mut at: Vec<u64> = vec![u64::MAX; w.saves.len()];
    for &(e, v, s) in &w.notifications {
        let id = entity_id(e);
        let now = unix_micros();
        let t = &mut at[s as usize];
        *t = (*t).min(now);
        p.send(&id, &payload(&id, Some(v)), (now / 1000) as i64)?;
    }
    p.finish()?;
    Ok(w.saves
        .iter()
        .zip(at)
        .filter(|(_, t)| *t != u64::MAX)
        .map(|(&(e, v), t)| (e, v, t))
        .collect())
}

/// Make the live saves and their events; returns the live saves with their times.
fn live_stream(
    brokers: &str,
    topic: &str,
    source: &BenchSource,
    timeline: &[LiveItem],
    versioned: bool,
) -> anyhow::Result<Vec<Save>> {
    if timeline.is_empty() {
        return Ok(Vec::new());
    }
    let p = FastProducer::new(brokers, topic, 1)?;
    let start = Instant::now();
    let mut versions: HashMap<u32, i64> = HashMap::new();
    let mut saves = Vec::new();
    for item in timeline {
        if let Some(wait) = (start + item.at).checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        if item.is_save {
            let v = source.put(item.entity);
            versions.insert(item.save, v);
            saves.push((item.entity, v, unix_micros()));
        } else {
            let id = entity_id(item.entity);
            let v = versions.get(&item.save).copied();
            p.send(
                &id,
                &payload(&id, if versioned { v } else { None }),
                (unix_micros() / 1000) as i64,
            )?;
            p.producer.poll(Duration::ZERO);
        }
    }
    p.finish()?;
    Ok(saves)
}

/// Clock ticks per second of `/proc/<pid>/stat` (USER_HZ, 100 on Linux).
const TICKS: f64 = 100.0;

/// CPU seconds (user + sys, all threads) of a process, from `/proc/<pid>/stat`.
pub fn proc_cpu_s(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_ascii_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS)
}

/// Peak RSS of a process, KiB (`VmHWM` from `/proc/<pid>/status`).
pub fn proc_vmhwm_kb(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// What an instance's stdout said.
enum Said {
    First,
    Report(ContenderReport),
    Closed,
}

/// One contender process.
struct Instance {
    /// The instance slot (a restarted instance takes the killed one's).
    slot: usize,
    child: Child,
    pid: u32,
    stdin: Option<ChildStdin>,
    /// CPU seconds at the start of the measured window.
    cpu_base: f64,
    /// Last CPU sample.
    cpu_last: f64,
    rss_kb: u64,
    durable_log: PathBuf,
    jsonl: Option<PathBuf>,
    report: Option<ContenderReport>,
    /// Stopped or killed by the driver.
    ended: bool,
    killed: bool,
    closed: bool,
}

impl Instance {
    fn sample(&mut self) {
        if self.closed {
            return;
        }
        if let Some(c) = proc_cpu_s(self.pid) {
            self.cpu_last = c;
        }
        if let Some(r) = proc_vmhwm_kb(self.pid) {
            self.rss_kb = self.rss_kb.max(r);
        }
    }

    async fn say(&mut self, line: &str) {
        if let Some(stdin) = self.stdin.as_mut() {
            let _ = stdin.write_all(format!("{line}\n").as_bytes()).await;
            let _ = stdin.flush().await;
        }
    }
}

/// Reads new lines of durable logs as they grow, and tracks which entities still lack their
/// final version.
struct LogTail {
    offsets: HashMap<PathBuf, u64>,
    need: HashMap<u32, i64>,
    seen: HashMap<u32, i64>,
}

impl LogTail {
    fn new() -> Self {
        LogTail {
            offsets: HashMap::new(),
            need: HashMap::new(),
            seen: HashMap::new(),
        }
    }

    fn read(&mut self, path: &Path) {
        let Ok(mut f) = std::fs::File::open(path) else {
            return;
        };
        let off = self.offsets.get(path).copied().unwrap_or(0);
        if f.seek(SeekFrom::Start(off)).is_err() {
            return;
        }
        let mut buf = String::new();
        if f.read_to_string(&mut buf).is_err() {
            return;
        }
        let complete = buf.rfind('\n').map_or(0, |i| i + 1);
        for line in buf[..complete].lines() {
            if let Some((id, v, _)) = parse_durable_line(line)
                && let Some(e) = entity_index(id)
            {
                let s = self.seen.entry(e).or_insert(v);
                *s = (*s).max(v);
                if self.need.get(&e).is_some_and(|&n| v >= n) {
                    self.need.remove(&e);
                }
            }
        }
        self.offsets.insert(path.to_owned(), off + complete as u64);
    }

    fn require(&mut self, finals: &HashMap<u32, i64>) {
        self.need = finals
            .iter()
            .filter(|(e, v)| self.seen.get(e).is_none_or(|s| s < v))
            .map(|(e, v)| (*e, *v))
            .collect();
    }
}

/// The source of one workload, shared by its contenders.
pub struct WorkloadRun {
    spec: WorkloadSpec,
    backlog: Workload,
    timeline: Vec<LiveItem>,
    source: BenchSource,
}

/// What one read of the committed offsets found (empty when the broker did not answer).
struct Committed(BTreeMap<i32, i64>);

impl Committed {
    /// These offsets, or `previous` when the read found none (a timed-out read must not look
    /// like a group that committed nothing).
    fn or(self, previous: BTreeMap<i32, i64>) -> BTreeMap<i32, i64> {
        if self.0.is_empty() { previous } else { self.0 }
    }
}

/// Reads the group's committed offsets.
struct CommitWatch {
    consumer: Arc<BaseConsumer>,
    topic: String,
    partitions: i32,
}

impl CommitWatch {
    fn new(brokers: &str, group: &str, topic: &str, partitions: i32) -> anyhow::Result<Self> {
        let consumer: BaseConsumer = kafka::client_config(brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .context("creating the commit watcher")?;
        Ok(CommitWatch {
            consumer: Arc::new(consumer),
            topic: topic.to_owned(),
            partitions,
        })
    }

    /// The group's committed offsets (empty when the broker did not answer in time).
    async fn committed(&self) -> Committed {
        let mut tpl = TopicPartitionList::new();
        for p in 0..self.partitions {
            tpl.add_partition(&self.topic, p);
        }
        let c = self.consumer.clone();
        tokio::task::spawn_blocking(move || {
            c.committed_offsets(tpl, Duration::from_secs(5))
                .map(|l| {
                    l.elements()
                        .iter()
                        .filter_map(|e| match e.offset() {
                            Offset::Offset(o) => Some((e.partition(), o)),
                            _ => None,
                        })
                        .collect()
                })
                .ok()
        })
        .await
        .ok()
        .flatten()
        .map(Committed)
        .unwrap_or(Committed(BTreeMap::new()))
    }
}

fn reached(positions: &BTreeMap<i32, i64>, end: &BTreeMap<i32, i64>) -> bool {
    end.iter()
        .all(|(p, e)| *e == 0 || positions.get(p).is_some_and(|pos| pos >= e))
}

impl WorkloadRun {
    /// Generate the backlog and the live stream, and start the source.
    pub async fn start(spec: WorkloadSpec) -> anyhow::Result<Self> {
        let backlog = spec.generate();
        let timeline = spec.live_timeline();
        let source = BenchSource::start(SourceOptions {
            latency: Duration::from_millis(spec.source.latency_ms),
            slow: spec.slow_keys(),
            poisoned: spec.poisoned_keys(),
            capacity: spec.source.capacity,
        })
        .await?;
        Ok(WorkloadRun {
            spec,
            backlog,
            timeline,
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

    fn command(
        &self,
        opts: &DriverOptions,
        kind: ContenderKind,
        name: &str,
        n: usize,
        slot: usize,
    ) -> anyhow::Result<(Command, PathBuf, Option<PathBuf>)> {
        let spec = &self.spec;
        let mut cmd = match kind.java_peer() {
            None => {
                let mut c = Command::new(&opts.exe);
                c.arg("contender").args(["--kind", kind.label()]);
                if spec.no_latency {
                    c.arg("--no-latency");
                }
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
        let durable = opts.work_dir.join(format!("{name}.{n}.durable"));
        let _ = std::fs::remove_file(&durable);
        let jsonl = (spec.sink == "jsonl").then(|| opts.work_dir.join(format!("{name}.{n}.jsonl")));
        if let Some(p) = &jsonl {
            let _ = std::fs::remove_file(p);
        }
        let log = std::fs::File::create(opts.work_dir.join(format!("{name}.{n}.log")))?;
        cmd.args(["--brokers", &opts.brokers])
            .args(["--topic", name])
            .args(["--group", name])
            .args(["--source", &self.source.base_url()])
            .args(["--partitions", &opts.partitions.to_string()])
            .arg("--durable-log")
            .arg(&durable)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        if let Some(p) = &jsonl {
            cmd.arg("--jsonl").arg(p);
        }
        if let Some(s) = spec.fetch_slots {
            cmd.args(["--fetch-slots", &s.to_string()]);
        }
        if spec.instances.static_membership {
            cmd.args(["--instance-id", &format!("{name}-{slot}")]);
        }
        Ok((cmd, durable, jsonl))
    }

    async fn spawn(
        &self,
        opts: &DriverOptions,
        kind: ContenderKind,
        name: &str,
        n: usize,
        slot: usize,
        said: &mpsc::UnboundedSender<(usize, Said)>,
    ) -> anyhow::Result<Instance> {
        let (mut cmd, durable_log, jsonl) = self.command(opts, kind, name, n, slot)?;
        let mut child = cmd.spawn().context("starting the contender process")?;
        let pid = child.id().ok_or_else(|| anyhow!("no pid"))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let tx = said.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if line == "FIRST" {
                    let _ = tx.send((n, Said::First));
                } else if let Some(json) = line.strip_prefix("REPORT ") {
                    match serde_json::from_str(json) {
                        Ok(r) => {
                            let _ = tx.send((n, Said::Report(r)));
                        }
                        Err(e) => tracing::warn!(error = %e, "bad report"),
                    }
                }
            }
            let _ = tx.send((n, Said::Closed));
        });
        Ok(Instance {
            slot,
            child,
            pid,
            stdin,
            cpu_base: 0.0,
            cpu_last: 0.0,
            rss_kb: 0,
            durable_log,
            jsonl,
            report: None,
            ended: false,
            killed: false,
            closed: false,
        })
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
        if kind.is_refetch() {
            // refetch checks its dead-letter topic at start (the group's name + ".dlq").
            kafka::create_topic(&opts.brokers, &format!("{name}.dlq"), 1).await?;
        }
        self.source.reset(
            &self
                .backlog
                .final_versions
                .iter()
                .map(|(e, v)| (*e, *v))
                .collect(),
        );
        let backlog_saves: Vec<Save> = {
            let (b, t, w) = (opts.brokers.clone(), name.clone(), self.backlog.clone());
            tokio::task::spawn_blocking(move || produce_backlog(&b, &t, &w)).await??
        };
        self.source.reset_counters();
        std::fs::create_dir_all(&opts.work_dir)?;
        let watch = CommitWatch::new(&opts.brokers, &name, &name, opts.partitions)?;

        let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Said)>();
        let mut instances: Vec<Instance> = Vec::new();
        for _ in 0..spec.instances.initial.max(1) {
            let n = instances.len();
            instances.push(self.spawn(opts, kind, &name, n, n, &tx).await?);
        }
        tracing::info!(
            contender = kind.label(),
            instances = instances.len(),
            "started"
        );
        // Wait for the first record.
        let first = tokio::time::timeout(Duration::from_secs(120), async {
            while let Some((n, said)) = rx.recv().await {
                match said {
                    Said::First => return Ok(()),
                    Said::Closed => bail!(
                        "instance {n} exited before its first record (see {}/{name}.{n}.log)",
                        opts.work_dir.display()
                    ),
                    Said::Report(_) => {}
                }
            }
            bail!("no instance is left")
        })
        .await
        .context("no first record within 120 s")?;
        first?;
        let t0 = Instant::now();
        for i in &mut instances {
            i.sample();
            i.cpu_base = i.cpu_last;
        }

        let live = {
            let (b, t, s, tl) = (
                opts.brokers.clone(),
                name.clone(),
                self.source.clone(),
                self.timeline.clone(),
            );
            let versioned = spec.live.versioned;
            tokio::task::spawn_blocking(move || live_stream(&b, &t, &s, &tl, versioned))
        };
        let mut live = Some(live);
        let mut live_saves: Vec<Save> = Vec::new();

        let ms = |t: u64| Duration::from_millis(t);
        let poison_on = (spec.source.poison_hottest > 0).then(|| ms(spec.source.poison_after_ms));
        let poison_off = poison_on.map(|on| on + ms(spec.source.poison_for_ms));
        let mut poisoned = false;
        let mut joined: Option<usize> = None;
        let mut left = false;
        let mut kills = 0u32;
        let mut next_kill = spec.instances.kill_every_ms.map(ms);
        let mut end: Option<BTreeMap<i32, i64>> = None;
        let mut tail = LogTail::new();
        let mut committed: BTreeMap<i32, i64> = BTreeMap::new();
        let mut last_commit_check = Instant::now() - Duration::from_secs(1);
        let mut capped = false;
        let mut problems: Vec<String> = Vec::new();
        let writes = kind != ContenderKind::Raw;

        let done_at = loop {
            tokio::time::sleep(Duration::from_millis(25)).await;
            let now = t0.elapsed();
            for i in &mut instances {
                i.sample();
            }
            while let Ok((n, said)) = rx.try_recv() {
                match said {
                    Said::Report(r) => instances[n].report = Some(r),
                    Said::Closed => {
                        instances[n].closed = true;
                        if !instances[n].ended {
                            problems.push(format!("instance {n} exited on its own"));
                            instances[n].ended = true;
                        }
                    }
                    Said::First => {}
                }
            }
            // The schedule.
            if let (Some(on), Some(off)) = (poison_on, poison_off) {
                let want = now >= on && now < off;
                if want != poisoned {
                    self.source.set_poison(want);
                    poisoned = want;
                    tracing::info!(on = want, "poison");
                }
            }
            if let Some(at) = spec.instances.join_at_ms
                && joined.is_none()
                && now >= ms(at)
            {
                let n = instances.len();
                let mut inst = self.spawn(opts, kind, &name, n, n, &tx).await?;
                if let Some(e) = &end {
                    inst.say(&format!("END {}", serde_json::to_string(e)?))
                        .await;
                }
                instances.push(inst);
                joined = Some(n);
                tracing::info!(instance = n, "joined");
            }
            if let (Some(at), Some(n)) = (spec.instances.leave_at_ms, joined)
                && !left
                && now >= ms(at)
            {
                instances[n].say("STOP").await;
                instances[n].ended = true;
                left = true;
                tracing::info!(instance = n, "leaving");
            }
            if let Some(k) = next_kill
                && now >= k
                && live.is_some()
            {
                if let Some(victim) = instances.iter().position(|i| !i.ended) {
                    let v = &mut instances[victim];
                    v.sample();
                    let _ = v.child.start_kill();
                    v.ended = true;
                    v.killed = true;
                    kills += 1;
                    let slot = v.slot;
                    let n = instances.len();
                    let inst = self.spawn(opts, kind, &name, n, slot, &tx).await?;
                    instances.push(inst);
                    tracing::info!(killed = victim, restarted = n, "SIGKILL and restart");
                }
                next_kill = spec.instances.kill_every_ms.map(|e| k + ms(e));
            }
            // The end of the live stream.
            if live.as_ref().is_some_and(|l| l.is_finished())
                && let Some(l) = live.take()
            {
                live_saves = l.await??;
                let e = kafka::end_offsets(&opts.brokers, &name).await?;
                let line = format!("END {}", serde_json::to_string(&e)?);
                for i in instances.iter_mut().filter(|i| !i.ended) {
                    i.say(&line).await;
                }
                end = Some(e);
                if writes {
                    tail.require(&self.source.versions());
                }
            }
            for i in &instances {
                tail.read(&i.durable_log);
            }
            if last_commit_check.elapsed() >= Duration::from_millis(100) {
                committed = watch.committed().await.or(committed);
                last_commit_check = Instant::now();
            }
            if let Some(e) = &end {
                let poison_done = poison_off.is_none_or(|off| now >= off);
                if reached(&committed, e) && tail.need.is_empty() && poison_done {
                    // One more read: the commit may have moved past the end.
                    committed = watch.committed().await.or(committed);
                    break Instant::now();
                }
            }
            // The cap runs from the first record, but never ends a run before its live stream
            // had 15 s to drain.
            if now > opts.cap.max(spec.live.duration() + Duration::from_secs(15)) {
                capped = true;
                committed = watch.committed().await.or(committed);
                break Instant::now();
            }
        };
        let elapsed = done_at.duration_since(t0).as_secs_f64();
        let done_unix = unix_micros().saturating_sub(done_at.elapsed().as_micros() as u64);
        if poisoned {
            self.source.set_poison(false);
        }
        // Stop everyone; collect reports.
        for i in instances.iter_mut() {
            i.sample();
            if !i.ended {
                i.say("STOP").await;
                i.ended = true;
            }
        }
        if let Some(l) = live.take() {
            // Capped before the live stream ended: let it finish (its saves still count).
            live_saves = l.await??;
        }
        let _ = tokio::time::timeout(Duration::from_secs(60), async {
            while instances.iter().any(|i| !i.closed) {
                match rx.recv().await {
                    Some((n, Said::Report(r))) => instances[n].report = Some(r),
                    Some((n, Said::Closed)) => instances[n].closed = true,
                    Some(_) => {}
                    None => break,
                }
            }
        })
        .await;
        for i in instances.iter_mut() {
            if !i.closed {
                problems.push(format!("instance {} did not stop in 60 s", i.pid));
            }
            let _ = i.child.start_kill();
            let _ = i.child.wait().await;
        }

        let notifications: u64 = match &end {
            Some(e) => e.values().map(|&o| o as u64).sum(),
            None => kafka::end_offsets(&opts.brokers, &name)
                .await?
                .values()
                .map(|&o| o as u64)
                .sum(),
        };
        let committed_sum: u64 = committed.values().map(|&o| o as u64).sum();
        let fetches = self.source.total_requests();
        let entity_reads = self.source.entity_reads();
        let cpu_s: f64 = instances
            .iter()
            .map(|i| (i.cpu_last - i.cpu_base).max(0.0))
            .sum();
        let peak_rss_kb = instances.iter().map(|i| i.rss_kb).max().unwrap_or(0);
        let mut receipt = Histogram::default();
        let mut consumed = 0;
        for i in &instances {
            if let Some(r) = &i.report {
                receipt.merge_sparse(&r.probe.buckets);
                consumed += r.consumed;
            }
        }
        let logs: Vec<PathBuf> = instances.iter().map(|i| i.durable_log.clone()).collect();
        let durable = freshness::read_logs(&logs);
        // Freshness of the live saves where there is a live stream (the warm-up backlog's saves
        // wait for the group to form), else of the backlog's.
        let measured = if live_saves.is_empty() {
            &backlog_saves
        } else {
            &live_saves
        };
        let last_write = durable
            .values()
            .flat_map(|w| w.iter().map(|(t, _)| *t))
            .filter(|t| *t <= done_unix)
            .max();
        let commit_tail_ms = match last_write {
            Some(t) if writes && !capped => Some(done_unix.saturating_sub(t) as f64 / 1000.0),
            _ => None,
        };
        let fresh = if writes {
            freshness::measure(measured, &durable, &spec.unhealthy_keys())
        } else {
            Freshness::default()
        };
        let (converged, mismatched) = if !writes || capped {
            (None, 0)
        } else {
            let mut held: HashMap<u32, i64> = HashMap::new();
            if spec.sink == "jsonl" {
                for p in instances.iter().filter_map(|i| i.jsonl.as_ref()) {
                    if !p.exists() {
                        continue;
                    }
                    for (id, v) in read_jsonl_versions(p)? {
                        if let Some(e) = entity_index(&id) {
                            let h = held.entry(e).or_insert(v);
                            *h = (*h).max(v);
                        }
                    }
                }
            } else {
                for (e, w) in &durable {
                    if let Some(v) = w.iter().map(|(_, v)| *v).max() {
                        held.insert(*e, v);
                    }
                }
            }
            let bad = self
                .source
                .versions()
                .iter()
                .filter(|(e, v)| held.get(e) != Some(v))
                .count() as u64;
            (Some(bad == 0), bad)
        };
        let mut notes = problems;
        if kind == ContenderKind::Raw {
            notes.push("reads only; writes nothing".into());
        }
        if capped {
            notes.push(format!(
                "time cap {:?} hit: figures of the part done",
                opts.cap
            ));
        }
        if kind == ContenderKind::KafkaStreams {
            notes.push(
                "suppression runs on stream time: after the input ends the harness sends 1 heartbeat record per partition per second (counted in committed)"
                    .into(),
            );
        }
        if fresh.uncovered > 0 && !capped {
            notes.push(format!("{} saves never written", fresh.uncovered));
        }
        let instances_label = {
            let mut s = spec.instances.initial.max(1).to_string();
            if joined.is_some() {
                s.push_str("+1 joined");
                if left {
                    s.push_str(" and left");
                }
            }
            if kills > 0 {
                s.push_str(&format!(", {kills} SIGKILL + restart"));
            }
            s
        };
        let saves_n = (backlog_saves.len() + live_saves.len()) as u64;
        Ok(Row {
            workload: spec.name.clone(),
            contender: kind.label().to_owned(),
            instances: instances_label,
            notifications,
            committed: committed_sum,
            consumed,
            elapsed_s: elapsed,
            throughput: if elapsed > 0.0 {
                committed_sum.min(notifications) as f64 / elapsed
            } else {
                0.0
            },
            capped,
            fetches,
            entity_reads,
            saves: saves_n,
            reads_per_save: if saves_n > 0 {
                entity_reads as f64 / saves_n as f64
            } else {
                0.0
            },
            receipt_p50_ms: receipt.quantile_ms(0.5),
            receipt_p99_ms: receipt.quantile_ms(0.99),
            freshness: fresh,
            cpu_s,
            cpu_per_million: if notifications > 0 {
                cpu_s * 1e6 / notifications as f64
            } else {
                0.0
            },
            peak_rss_mib: peak_rss_kb as f64 / 1024.0,
            commit_tail_ms,
            converged,
            mismatched,
            note: notes.join("; "),
        })
    }

    /// Stop the source.
    pub fn shutdown(&self) {
        self.source.shutdown();
    }
}

fn read_jsonl_versions(path: &Path) -> anyhow::Result<Vec<(String, i64)>> {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn cpu_and_rss_of_this_process_from_proc() {
        let pid = std::process::id();
        // Busy work until the reading grows by 0.1 s (on a loaded machine that takes longer than
        // 0.1 s of wall time, so no timing is assumed, only that the reading follows the work).
        let before = proc_cpu_s(pid).unwrap();
        let t = Instant::now();
        let mut x = 0u64;
        let mut after = before;
        while after - before < 0.1 && t.elapsed() < Duration::from_secs(30) {
            for _ in 0..1_000_000 {
                x = x.wrapping_add(std::hint::black_box(1));
            }
            after = proc_cpu_s(pid).unwrap();
        }
        std::hint::black_box(x);
        assert!(after - before >= 0.1, "{before} -> {after}");
        assert!(proc_vmhwm_kb(pid).unwrap() > 1000);
        assert!(proc_cpu_s(u32::MAX).is_none());
    }

    #[test]
    fn the_log_tail_reads_only_complete_new_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        std::fs::write(&p, "e1 1 5\ne2 1 6\ne3 1").unwrap();
        let mut t = LogTail::new();
        t.require(&HashMap::from([(1, 2), (2, 1), (3, 1)]));
        t.read(&p);
        assert_eq!(t.need, HashMap::from([(1, 2), (3, 1)]));
        std::fs::write(&p, "e1 1 5\ne2 1 6\ne3 1 7\ne1 2 8\n").unwrap();
        t.read(&p);
        assert!(t.need.is_empty(), "{:?}", t.need);
        // Entities already seen at their final version are not required again.
        t.require(&HashMap::from([(1, 2), (4, 1)]));
        assert_eq!(t.need, HashMap::from([(4, 1)]));
    }
}
