//! The contenders, each run in its own process (`refetch-bench contender ...`) so its peak RSS is
//! its own.
//!
//! The driver talks to a contender over its standard streams: the contender prints `FIRST` when it
//! receives its first record, the driver writes one JSON line with the topic's end offsets once
//! nothing more will be produced, and the contender prints `REPORT {json}` when its group's
//! commits reach those offsets (or its time cap is hit) and exits.
//!
//! - `raw`: a librdkafka `BaseConsumer` that reads every record and does nothing else, then commits
//!   once (the upper bound);
//! - `hand-rolled`: what teams write by hand: for each record, `GET` the entity, write it, store
//!   its offset (the client commits stored offsets every second); one record at a time;
//! - `refetch-default` / `refetch-tuned`: the `refetch` library's `Pipeline` in this process with
//!   `refetch_http::HttpFetcher`, defaults or a tuned configuration (see [`tuned_engine`]).

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_trait::async_trait;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use refetch::decode::JsonDecoder;
use refetch::{
    Change, DecodeError, Decoded, EngineConfig, Entity, EntityKey, KafkaConfig,
    NotificationDecoder, Pipeline, RecordView, Sink, SinkError, Version, VersionKind, WriteReport,
};
use refetch_http::{BatchConfig, HttpFetcher, SourceConfig, VersionConfig};
use refetch_sinks::JsonlConfig;
use refetch_sinks::jsonl::JsonlSink;
use serde::{Deserialize, Serialize};

use crate::probe::{Probe, ProbeSummary};
use crate::workload::{ENTITY_TYPE, parse_payload};

/// Which contender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ContenderKind {
    /// The raw consumer: read, do nothing, commit at the end.
    Raw,
    /// Fetch per notification, write, store the offset (committed every second); one at a time.
    HandRolled,
    /// refetch with its defaults.
    RefetchDefault,
    /// refetch tuned for throughput (see `tuned_engine`).
    RefetchTuned,
    /// Confluent Parallel Consumer (Java, `bench/peers/parallel-consumer`).
    ParallelConsumer,
    /// Kafka Streams (Java, `bench/peers/kafka-streams`).
    KafkaStreams,
    /// Apache Camel (Java, `bench/peers/camel`).
    Camel,
}

impl ContenderKind {
    /// The name used in tables and file names.
    pub fn label(self) -> &'static str {
        match self {
            ContenderKind::Raw => "raw",
            ContenderKind::HandRolled => "hand-rolled",
            ContenderKind::RefetchDefault => "refetch-default",
            ContenderKind::RefetchTuned => "refetch-tuned",
            ContenderKind::ParallelConsumer => "parallel-consumer",
            ContenderKind::KafkaStreams => "kafka-streams",
            ContenderKind::Camel => "camel",
        }
    }

    /// For the Java peers: the Maven module under `bench/peers/` and the main class.
    pub fn java_peer(self) -> Option<(&'static str, &'static str)> {
        match self {
            ContenderKind::ParallelConsumer => {
                Some(("parallel-consumer", "refetch.bench.peer.pc.Main"))
            }
            ContenderKind::KafkaStreams => {
                Some(("kafka-streams", "refetch.bench.peer.streams.Main"))
            }
            ContenderKind::Camel => Some(("camel", "refetch.bench.peer.camel.Main")),
            _ => None,
        }
    }
}

/// Everything a contender process needs.
#[derive(Debug, Clone, clap::Args)]
pub struct ContenderArgs {
    /// Which contender.
    #[arg(long, value_enum)]
    pub kind: ContenderKind,
    /// Bootstrap servers.
    #[arg(long)]
    pub brokers: String,
    /// The notification topic.
    #[arg(long)]
    pub topic: String,
    /// The consumer group (fresh per run).
    #[arg(long)]
    pub group: String,
    /// Base URL of the source (`http://127.0.0.1:PORT`).
    #[arg(long)]
    pub source: String,
    /// JSON Lines file to write (with fsync); none means the null sink.
    #[arg(long)]
    pub jsonl: Option<PathBuf>,
    /// Stop after this long from the first record, reporting the run as capped.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "120s")]
    pub cap: Duration,
    /// Where to write the durable version of every entity (JSON), for the convergence check.
    #[arg(long)]
    pub versions_out: PathBuf,
    /// Measure no latency (keeps the probe's per-notification memory out of peak RSS).
    #[arg(long)]
    pub no_latency: bool,
}

/// What a contender reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ContenderReport {
    /// Records consumed.
    pub consumed: u64,
    /// Records covered by the last commit.
    pub committed: u64,
    /// Seconds from the first record to the last commit.
    pub elapsed_s: f64,
    /// The time cap was hit.
    pub capped: bool,
    /// Latency figures.
    pub probe: ProbeSummary,
    /// Peak resident set of the process (VmHWM), KiB.
    pub vmhwm_kb: u64,
    /// Distinct (entity, version) pairs among the consumed records, when the contender counted them.
    pub distinct_pairs_consumed: Option<u64>,
}

/// The peak resident set of this process, KiB (`VmHWM` from `/proc/self/status`).
pub fn vmhwm_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// End offsets sent by the driver on stdin.
type EndOffsets = Arc<OnceLock<BTreeMap<i32, i64>>>;

fn read_end_offsets_from_stdin() -> EndOffsets {
    let cell: EndOffsets = Arc::new(OnceLock::new());
    let c = cell.clone();
    std::thread::spawn(move || {
        let mut line = String::new();
        if std::io::stdin().lock().read_line(&mut line).is_ok() {
            match serde_json::from_str::<BTreeMap<i32, i64>>(line.trim()) {
                Ok(end) => {
                    let _ = c.set(end);
                }
                Err(e) => tracing::error!(error = %e, "bad end offsets on stdin"),
            }
        }
    });
    cell
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn reached(positions: &BTreeMap<i32, i64>, end: &BTreeMap<i32, i64>) -> bool {
    end.iter()
        .all(|(p, e)| *e == 0 || positions.get(p).is_some_and(|pos| pos >= e))
}

/// The sink every contender writes to: JSON Lines with fsync, or nothing.
#[derive(Debug)]
pub enum BenchSink {
    /// Discard (acknowledge at once).
    Null,
    /// `refetch_sinks::jsonl`.
    Jsonl(JsonlSink),
}

impl BenchSink {
    async fn open(path: Option<&PathBuf>, max_batch: usize) -> anyhow::Result<BenchSink> {
        Ok(match path {
            None => BenchSink::Null,
            Some(p) => BenchSink::Jsonl(
                JsonlSink::open(&JsonlConfig {
                    path: p.clone(),
                    max_batch,
                })
                .await
                .context("opening the JSON Lines sink")?,
            ),
        })
    }
}

/// A sink that tells the probe what became durable.
struct ProbeSink {
    inner: BenchSink,
    probe: Arc<Probe>,
}

#[async_trait]
impl Sink for ProbeSink {
    async fn write(&self, batch: &[Change]) -> Result<WriteReport, SinkError> {
        let report = match &self.inner {
            BenchSink::Null => WriteReport::all_durable(),
            BenchSink::Jsonl(s) => s.write(batch).await?,
        };
        for (i, change) in batch.iter().enumerate() {
            if report.failed.iter().any(|(f, _)| *f == i) {
                continue;
            }
            if let Some(Version::Int(v)) = change.version() {
                self.probe.durable(change.key().id(), v);
            }
        }
        Ok(report)
    }

    fn max_batch(&self) -> usize {
        match &self.inner {
            BenchSink::Null => 4096,
            BenchSink::Jsonl(s) => s.max_batch(),
        }
    }
}

/// A decoder that tells the probe what was received.
struct ProbeDecoder {
    inner: JsonDecoder,
    probe: Arc<Probe>,
}

impl NotificationDecoder for ProbeDecoder {
    fn decode(&self, record: &RecordView<'_>) -> Result<Decoded, DecodeError> {
        let decoded = self.inner.decode(record)?;
        if let Decoded::Notification(n) = &decoded
            && let Some(Version::Int(v)) = n.version
        {
            self.probe.received(n.key.id(), v);
        }
        Ok(decoded)
    }
}

/// The tuned engine configuration (the table's `refetch-tuned` row).
pub fn tuned_engine() -> EngineConfig {
    EngineConfig {
        window: Duration::from_millis(500),
        max_wait: Duration::from_secs(2),
        fetch_concurrency: 256,
        sink_batch_max: 2048,
        sink_linger: Duration::from_millis(20),
        commit_interval: Duration::from_millis(100),
        ..EngineConfig::default()
    }
}

fn source_config(base: &str, tuned: bool) -> SourceConfig {
    let mut cfg = SourceConfig::new(format!("{base}/{ENTITY_TYPE}/{{id}}"));
    cfg.version = Some(VersionConfig {
        pointer: Some("/version".to_owned()),
        header: None,
        kind: VersionKind::Integer,
    });
    cfg.timeout = Duration::from_secs(30);
    if tuned {
        cfg.concurrency = 256;
        cfg.batch = Some(BatchConfig {
            url: format!("{base}/{ENTITY_TYPE}?ids={{ids}}"),
            max: 100,
            ..BatchConfig::default()
        });
    }
    cfg
}

fn kafka_config(args: &ContenderArgs) -> KafkaConfig {
    KafkaConfig::new(
        args.brokers.clone(),
        args.group.clone(),
        vec![args.topic.clone()],
    )
}

fn write_versions(args: &ContenderArgs, probe: &Probe) -> anyhow::Result<()> {
    let versions = probe.durable_versions();
    std::fs::write(&args.versions_out, serde_json::to_vec(&versions)?)
        .with_context(|| format!("writing {}", args.versions_out.display()))
}

/// Run one contender to the end and print its report.
pub async fn run(args: ContenderArgs) -> anyhow::Result<()> {
    let end = read_end_offsets_from_stdin();
    let report = match args.kind {
        ContenderKind::Raw => {
            let a = args.clone();
            tokio::task::spawn_blocking(move || run_raw(&a, &end)).await??
        }
        ContenderKind::HandRolled => run_hand_rolled(&args, &end).await?,
        ContenderKind::RefetchDefault | ContenderKind::RefetchTuned => {
            run_refetch(&args, &end).await?
        }
        other => bail!(
            "{} runs in Java: start it from `refetch-bench run` (bench/peers/)",
            other.label()
        ),
    };
    say(&format!("REPORT {}", serde_json::to_string(&report)?));
    Ok(())
}

/// Commit `positions` and wait (bounded) until the broker shows them. An asynchronous commit and a
/// read-back, because a synchronous commit can block without end when the group coordinator stops
/// answering; a commit that does not show up in time is logged and the report says what is
/// committed.
fn commit_positions(
    consumer: &impl Consumer,
    topic: &str,
    positions: &BTreeMap<i32, i64>,
) -> BTreeMap<i32, i64> {
    if positions.is_empty() {
        return BTreeMap::new();
    }
    let mut tpl = TopicPartitionList::new();
    for (p, o) in positions {
        if let Err(e) = tpl.add_partition_offset(topic, *p, Offset::Offset(*o)) {
            tracing::warn!(error = %e, "building the commit");
        }
    }
    if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
        tracing::warn!(error = %e, "final commit");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = BTreeMap::new();
    while Instant::now() < deadline {
        match consumer.committed_offsets(tpl.clone(), Duration::from_secs(2)) {
            Ok(c) => {
                seen = c
                    .elements()
                    .iter()
                    .filter_map(|e| match e.offset() {
                        Offset::Offset(o) => Some((e.partition(), o)),
                        _ => None,
                    })
                    .collect();
                if reached(&seen, positions) {
                    break;
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading committed offsets"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    seen
}

const JOIN_TIMEOUT: Duration = Duration::from_secs(90);

fn run_raw(args: &ContenderArgs, end: &EndOffsets) -> anyhow::Result<ContenderReport> {
    let consumer: BaseConsumer = kafka_config(args)
        .consumer_client_config()
        .create()
        .context("creating the consumer")?;
    consumer.subscribe(&[&args.topic])?;
    let started = Instant::now();
    let mut first: Option<Instant> = None;
    let mut positions: BTreeMap<i32, i64> = BTreeMap::new();
    let mut consumed = 0u64;
    let mut capped = false;
    loop {
        if let Some(r) = consumer.poll(Duration::from_millis(20)) {
            let m = r.context("consuming")?;
            if first.is_none() {
                first = Some(Instant::now());
                say("FIRST");
            }
            positions.insert(m.partition(), m.offset() + 1);
            consumed += 1;
        }
        if end.get().is_some_and(|e| reached(&positions, e)) {
            break;
        }
        match first {
            Some(f) if f.elapsed() > args.cap => {
                capped = true;
                break;
            }
            None if started.elapsed() > JOIN_TIMEOUT => bail!("no record within {JOIN_TIMEOUT:?}"),
            _ => {}
        }
    }
    let committed = commit_positions(&consumer, &args.topic, &positions);
    let done = Instant::now();
    std::fs::write(&args.versions_out, b"{}")?;
    Ok(ContenderReport {
        consumed,
        committed: committed.values().map(|&o| o as u64).sum(),
        elapsed_s: first.map_or(0.0, |f| done.duration_since(f).as_secs_f64()),
        capped,
        probe: ProbeSummary::default(),
        vmhwm_kb: vmhwm_kb(),
        distinct_pairs_consumed: None,
    })
}

async fn fetch_entity(
    client: &reqwest::Client,
    base: &str,
    id: &str,
) -> anyhow::Result<(bytes::Bytes, i64)> {
    let resp = client
        .get(format!("{base}/{ENTITY_TYPE}/{id}"))
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("status {}", resp.status());
    }
    let body = resp.bytes().await?;
    #[derive(Deserialize)]
    struct V {
        version: i64,
    }
    let v: V = serde_json::from_slice(&body)?;
    Ok((body, v.version))
}

async fn run_hand_rolled(
    args: &ContenderArgs,
    end: &EndOffsets,
) -> anyhow::Result<ContenderReport> {
    // The usual at-least-once loop: offsets are stored after the write and the client commits the
    // stored offsets every second (committing every record instead floods the group coordinator
    // at thousands of records per second).
    let consumer: StreamConsumer = kafka_config(args)
        .consumer_client_config()
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .create()
        .context("creating the consumer")?;
    consumer.subscribe(&[&args.topic])?;
    let sink = BenchSink::open(args.jsonl.as_ref(), 1).await?;
    let probe = Arc::new(Probe::default());
    let sink = ProbeSink {
        inner: sink,
        probe: probe.clone(),
    };
    let client = reqwest::Client::new();
    let started = Instant::now();
    let mut first: Option<Instant> = None;
    let mut positions: BTreeMap<i32, i64> = BTreeMap::new();
    let mut consumed = 0u64;
    let mut pairs: HashSet<(String, i64)> = HashSet::new();
    let mut capped = false;
    loop {
        if end.get().is_some_and(|e| reached(&positions, e)) {
            break;
        }
        match first {
            Some(f) if f.elapsed() > args.cap => {
                capped = true;
                break;
            }
            None if started.elapsed() > JOIN_TIMEOUT => bail!("no record within {JOIN_TIMEOUT:?}"),
            _ => {}
        }
        let m = match tokio::time::timeout(Duration::from_millis(50), consumer.recv()).await {
            Err(_) => continue,
            Ok(r) => r.context("consuming")?,
        };
        if first.is_none() {
            first = Some(Instant::now());
            say("FIRST");
        }
        consumed += 1;
        if let Some((id, version)) = m.payload().and_then(parse_payload) {
            probe.received(&id, version);
            pairs.insert((id.clone(), version));
            // Fetch (retrying until the source answers), write, commit.
            let (body, fetched) = loop {
                match fetch_entity(&client, &args.source, &id).await {
                    Ok(x) => break x,
                    Err(e) => {
                        tracing::warn!(error = %e, id, "fetch failed, retrying");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            };
            let change = Change::Upsert {
                key: EntityKey::new(ENTITY_TYPE, id.as_str()),
                entity: Entity::json(body, Some(Version::Int(fetched))),
            };
            loop {
                match sink.write(std::slice::from_ref(&change)).await {
                    Ok(r) if r.failed.is_empty() => break,
                    Ok(_) | Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
        consumer.store_offset_from_message(&m)?;
        positions.insert(m.partition(), m.offset() + 1);
    }
    let committed =
        tokio::task::block_in_place(|| commit_positions(&consumer, &args.topic, &positions));
    let done = Instant::now();
    write_versions(args, &probe)?;
    Ok(ContenderReport {
        consumed,
        committed: committed.values().map(|&o| o as u64).sum(),
        elapsed_s: first.map_or(0.0, |f| done.duration_since(f).as_secs_f64()),
        capped,
        probe: probe.summary(),
        vmhwm_kb: vmhwm_kb(),
        distinct_pairs_consumed: Some(pairs.len() as u64),
    })
}

async fn run_refetch(args: &ContenderArgs, end: &EndOffsets) -> anyhow::Result<ContenderReport> {
    let tuned = args.kind == ContenderKind::RefetchTuned;
    let engine = if tuned {
        tuned_engine()
    } else {
        EngineConfig::default()
    };
    let probe = Arc::new(if args.no_latency {
        Probe::without_latency()
    } else {
        Probe::default()
    });
    let sink = ProbeSink {
        inner: BenchSink::open(args.jsonl.as_ref(), engine.sink_batch_max).await?,
        probe: probe.clone(),
    };
    let fetcher = HttpFetcher::builder()
        .source(ENTITY_TYPE, source_config(&args.source, tuned))
        .build()
        .context("building the HTTP fetcher")?;
    let decoder = ProbeDecoder {
        inner: JsonDecoder::fixed_type(ENTITY_TYPE, "/id")
            .with_version("/version", VersionKind::Integer),
        probe: probe.clone(),
    };
    let pipeline = Pipeline::builder::<HttpFetcher, ProbeSink>()
        .kafka(kafka_config(args))
        .decoder(decoder)
        .fetcher(fetcher)
        .sink(sink)
        .engine(engine)
        .build()?;
    let handle = pipeline.handle();
    let task = tokio::spawn(pipeline.run(std::future::pending()));
    let started = Instant::now();
    let mut said_first = false;
    let mut capped = false;
    let mut committed: u64;
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if task.is_finished() {
            bail!("the pipeline stopped early: {:?}", task.await);
        }
        let first = probe.first_receive();
        if first.is_some() && !said_first {
            said_first = true;
            say("FIRST");
        }
        let Some(status) = handle.status().await else {
            continue;
        };
        let positions: BTreeMap<i32, i64> = status
            .engine
            .partitions
            .iter()
            .filter_map(|p| p.committed.map(|c| (p.partition, c)))
            .collect();
        committed = positions.values().map(|&o| o as u64).sum();
        if end.get().is_some_and(|e| reached(&positions, e)) {
            break;
        }
        match first {
            Some(f) if f.elapsed() > args.cap => {
                capped = true;
                break;
            }
            None if started.elapsed() > JOIN_TIMEOUT => bail!("no record within {JOIN_TIMEOUT:?}"),
            _ => {}
        }
    }
    let done = Instant::now();
    let consumed = probe.summary().received;
    handle.shutdown();
    match tokio::time::timeout(Duration::from_secs(30), task).await {
        Ok(Ok(Ok(_))) => {}
        other => tracing::warn!(?other, "pipeline shutdown"),
    }
    write_versions(args, &probe)?;
    Ok(ContenderReport {
        consumed,
        committed,
        elapsed_s: probe
            .first_receive()
            .map_or(0.0, |f| done.duration_since(f).as_secs_f64()),
        capped,
        probe: probe.summary(),
        vmhwm_kb: vmhwm_kb(),
        distinct_pairs_consumed: None,
    })
}
