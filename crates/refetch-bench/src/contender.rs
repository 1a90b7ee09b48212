//! The contenders, each run in its own process (`refetch-bench contender ...`) so its CPU time and
//! peak RSS are its own.
//!
//! The driver talks to a contender process over its standard streams: the contender prints
//! `FIRST` when it receives its first record; the driver writes `END {json}` with the topic's
//! end offsets once nothing more will be produced (the raw consumer commits when it reaches
//! them, Kafka Streams starts its heartbeats) and `STOP` when the run is over (end of input does
//! the same); the contender then stops the way it stops on SIGTERM, prints `REPORT {json}` and
//! exits. Completion, CPU time and RSS are judged by the driver from outside (the group's commits,
//! the durable logs, `/proc`), so a process can also be killed mid-run.
//!
//! - `raw`: a librdkafka `BaseConsumer` that reads every record and does nothing else, then
//!   commits once (the upper bound);
//! - `hand-rolled`: for each record, `GET` the entity, write it, store its offset (the client
//!   commits stored offsets every second); one record at a time;
//! - `concurrent-loop`: the micro-batch loop a competent team writes in an afternoon, without
//!   dedupe: poll up to 5,000 records or 100 ms, fetch one entity per record with 64 fetches in
//!   flight, write the batch in one sink call, commit the batch;
//! - `batch-dedupe`: the same loop keeping only the highest notified version per id in the batch
//!   and skipping ids whose written version already covers it;
//! - `refetch-default` / `refetch-tuned`: the `refetch` library's `Pipeline` in this process with
//!   `refetch_http::HttpFetcher`, defaults or a tuned configuration (see [`tuned_engine`]).

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_trait::async_trait;
use futures::StreamExt;
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
use tokio::sync::watch;

use crate::probe::{DurableLog, Probe, ProbeSummary};
use crate::workload::{ENTITY_TYPE, parse_payload};

/// Which contender.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ContenderKind {
    /// The raw consumer: read, do nothing, commit at the end.
    Raw,
    /// Fetch per notification, write, store the offset (committed every second); one at a time.
    HandRolled,
    /// Micro-batch loop without dedupe: 5,000 records or 100 ms, 64 fetches in flight, one sink
    /// call and one commit per batch.
    ConcurrentLoop,
    /// The same loop keeping the highest version per id and skipping ids already written at it.
    BatchDedupe,
    /// Confluent Parallel Consumer (Java, `bench/peers/parallel-consumer`).
    ParallelConsumer,
    /// Kafka Streams (Java, `bench/peers/kafka-streams`).
    KafkaStreams,
    /// Apache Camel (Java, `bench/peers/camel`).
    Camel,
    /// refetch with its defaults.
    RefetchDefault,
    /// refetch tuned for throughput (see `tuned_engine`).
    RefetchTuned,
}

impl ContenderKind {
    /// The name used in tables and file names.
    pub fn label(self) -> &'static str {
        match self {
            ContenderKind::Raw => "raw",
            ContenderKind::HandRolled => "hand-rolled",
            ContenderKind::ConcurrentLoop => "concurrent-loop",
            ContenderKind::BatchDedupe => "batch-dedupe",
            ContenderKind::ParallelConsumer => "parallel-consumer",
            ContenderKind::KafkaStreams => "kafka-streams",
            ContenderKind::Camel => "camel",
            ContenderKind::RefetchDefault => "refetch-default",
            ContenderKind::RefetchTuned => "refetch-tuned",
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

    /// refetch itself (it needs its dead-letter topic).
    pub fn is_refetch(self) -> bool {
        matches!(
            self,
            ContenderKind::RefetchDefault | ContenderKind::RefetchTuned
        )
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
    /// The consumer group (fresh per run; shared by the instances of one run).
    #[arg(long)]
    pub group: String,
    /// Base URL of the source (`http://127.0.0.1:PORT`).
    #[arg(long)]
    pub source: String,
    /// JSON Lines file to write (with fsync); none means the null sink.
    #[arg(long)]
    pub jsonl: Option<PathBuf>,
    /// The durable log: one line per acknowledged write (see `probe::DurableLog`).
    #[arg(long)]
    pub durable_log: PathBuf,
    /// Fetches in flight (default: the contender's own, 64 for the loops and refetch-default).
    #[arg(long)]
    pub fetch_slots: Option<usize>,
    /// Partitions of the topic (the Java peers size their threads by it).
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// Measure no receipt latency (keeps the probe's per-notification memory out of peak RSS).
    #[arg(long)]
    pub no_latency: bool,
    /// Static group membership: this `group.instance.id` (a restarted instance reuses it).
    #[arg(long)]
    pub instance_id: Option<String>,
}

/// What a contender reports when it stops.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ContenderReport {
    /// Records consumed.
    pub consumed: u64,
    /// Receipt-latency figures.
    pub probe: ProbeSummary,
}

/// What the driver says on stdin.
#[derive(Debug, Clone)]
pub struct Control {
    end: Arc<OnceLock<BTreeMap<i32, i64>>>,
    stop: watch::Receiver<bool>,
}

impl Control {
    /// Read the driver's lines on a thread of its own.
    pub fn from_stdin() -> Control {
        let end: Arc<OnceLock<BTreeMap<i32, i64>>> = Arc::new(OnceLock::new());
        let (tx, rx) = watch::channel(false);
        let e = end.clone();
        std::thread::spawn(move || {
            let stdin = std::io::stdin();
            for line in stdin.lock().lines() {
                let Ok(line) = line else { break };
                if let Some(json) = line.strip_prefix("END ") {
                    match serde_json::from_str::<BTreeMap<i32, i64>>(json.trim()) {
                        Ok(offsets) => {
                            let _ = e.set(offsets);
                        }
                        Err(err) => tracing::error!(error = %err, "bad END line"),
                    }
                } else if line.trim() == "STOP" {
                    break;
                }
            }
            let _ = tx.send(true);
        });
        Control { end, stop: rx }
    }

    /// The topic's end offsets, once the driver sent them.
    pub fn end(&self) -> Option<&BTreeMap<i32, i64>> {
        self.end.get()
    }

    /// The driver asked this process to stop.
    pub fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    /// Wait until the driver asks this process to stop.
    pub async fn wait_stop(&mut self) {
        let _ = self.stop.wait_for(|s| *s).await;
    }
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

/// A sink that tells the probe and the durable log what became durable.
struct ProbeSink {
    inner: BenchSink,
    probe: Arc<Probe>,
    log: DurableLog,
}

#[async_trait]
impl Sink for ProbeSink {
    async fn write(&self, batch: &[Change]) -> Result<WriteReport, SinkError> {
        let report = match &self.inner {
            BenchSink::Null => WriteReport::all_durable(),
            BenchSink::Jsonl(s) => s.write(batch).await?,
        };
        let mut durable = Vec::with_capacity(batch.len());
        for (i, change) in batch.iter().enumerate() {
            if report.failed.iter().any(|(f, _)| *f == i) {
                continue;
            }
            if let Some(Version::Int(v)) = change.version() {
                self.probe.durable(change.key().id(), v);
                durable.push((change.key().id(), v));
            }
        }
        self.log.record(durable);
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
        if let Decoded::Notification(n) = &decoded {
            let v = match n.version {
                Some(Version::Int(v)) => Some(v),
                _ => None,
            };
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

fn source_config(base: &str, tuned: bool, slots: Option<usize>) -> SourceConfig {
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
    if let Some(n) = slots {
        cfg.concurrency = n;
    }
    cfg
}

fn kafka_config(args: &ContenderArgs) -> KafkaConfig {
    let mut cfg = KafkaConfig::new(
        args.brokers.clone(),
        args.group.clone(),
        vec![args.topic.clone()],
    );
    if let Some(id) = &args.instance_id {
        cfg.consumer_properties
            .insert("group.instance.id".into(), id.clone());
    }
    cfg
}

fn new_probe(args: &ContenderArgs) -> Arc<Probe> {
    Arc::new(if args.no_latency {
        Probe::without_latency()
    } else {
        Probe::default()
    })
}

/// Run one contender until the driver stops it, then print its report.
pub async fn run(args: ContenderArgs) -> anyhow::Result<()> {
    let control = Control::from_stdin();
    let report = match args.kind {
        ContenderKind::Raw => {
            let a = args.clone();
            tokio::task::spawn_blocking(move || run_raw(&a, &control)).await??
        }
        ContenderKind::HandRolled => run_hand_rolled(&args, control).await?,
        ContenderKind::ConcurrentLoop | ContenderKind::BatchDedupe => {
            run_loop(&args, control, args.kind == ContenderKind::BatchDedupe).await?
        }
        ContenderKind::RefetchDefault | ContenderKind::RefetchTuned => {
            run_refetch(&args, control).await?
        }
        other => bail!(
            "{} runs in Java: start it from `refetch-bench run` (bench/peers/)",
            other.label()
        ),
    };
    say(&format!("REPORT {}", serde_json::to_string(&report)?));
    Ok(())
}

fn positions_list(topic: &str, positions: &BTreeMap<i32, i64>) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for (p, o) in positions {
        if let Err(e) = tpl.add_partition_offset(topic, *p, Offset::Offset(*o)) {
            tracing::warn!(error = %e, "building a commit");
        }
    }
    tpl
}

/// Commit `positions` and wait (bounded) until the broker shows them: an asynchronous commit and
/// a read-back, because a synchronous commit can block without end when the group coordinator
/// stops answering.
fn commit_and_confirm(consumer: &impl Consumer, topic: &str, positions: &BTreeMap<i32, i64>) {
    if positions.is_empty() {
        return;
    }
    let tpl = positions_list(topic, positions);
    if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
        tracing::warn!(error = %e, "final commit");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        match consumer.committed_offsets(tpl.clone(), Duration::from_secs(2)) {
            Ok(c) => {
                let seen: BTreeMap<i32, i64> = c
                    .elements()
                    .iter()
                    .filter_map(|e| match e.offset() {
                        Offset::Offset(o) => Some((e.partition(), o)),
                        _ => None,
                    })
                    .collect();
                if reached(&seen, positions) {
                    return;
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading committed offsets"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn run_raw(args: &ContenderArgs, control: &Control) -> anyhow::Result<ContenderReport> {
    let consumer: BaseConsumer = kafka_config(args)
        .consumer_client_config()
        .create()
        .context("creating the consumer")?;
    consumer.subscribe(&[&args.topic])?;
    let mut said_first = false;
    let mut positions: BTreeMap<i32, i64> = BTreeMap::new();
    let mut consumed = 0u64;
    let mut committed = false;
    while !control.stopped() {
        if let Some(r) = consumer.poll(Duration::from_millis(20)) {
            let m = r.context("consuming")?;
            if !said_first {
                said_first = true;
                say("FIRST");
            }
            positions.insert(m.partition(), m.offset() + 1);
            consumed += 1;
        }
        if !committed && control.end().is_some_and(|e| reached(&positions, e)) {
            commit_and_confirm(&consumer, &args.topic, &positions);
            committed = true;
        }
    }
    Ok(ContenderReport {
        consumed,
        probe: ProbeSummary::default(),
    })
}

/// A fetched entity: body and version.
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

/// Fetch until the source answers (backoff 50 ms doubling to 1 s), or `None` once stopped.
async fn fetch_retrying(
    client: &reqwest::Client,
    base: &str,
    id: &str,
    control: &Control,
) -> Option<(bytes::Bytes, i64)> {
    let mut backoff = Duration::from_millis(50);
    loop {
        match fetch_entity(client, base, id).await {
            Ok(x) => return Some(x),
            Err(e) => {
                tracing::debug!(error = %e, id, "fetch failed, retrying");
                if control.stopped() {
                    return None;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

fn upsert(id: &str, body: bytes::Bytes, version: i64) -> Change {
    Change::Upsert {
        key: EntityKey::new(ENTITY_TYPE, id),
        entity: Entity::json(body, Some(Version::Int(version))),
    }
}

/// Write until the sink takes the whole batch, or `false` once stopped.
async fn write_retrying(sink: &ProbeSink, batch: &[Change], control: &Control) -> bool {
    loop {
        match sink.write(batch).await {
            Ok(r) if r.failed.is_empty() => return true,
            Ok(_) | Err(_) => {
                if control.stopped() {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn run_hand_rolled(
    args: &ContenderArgs,
    control: Control,
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
    let probe = new_probe(args);
    let sink = ProbeSink {
        inner: BenchSink::open(args.jsonl.as_ref(), 1).await?,
        probe: probe.clone(),
        log: DurableLog::open(&args.durable_log)?,
    };
    let client = reqwest::Client::new();
    let mut said_first = false;
    let mut positions: BTreeMap<i32, i64> = BTreeMap::new();
    let mut consumed = 0u64;
    'run: while !control.stopped() {
        let m = match tokio::time::timeout(Duration::from_millis(50), consumer.recv()).await {
            Err(_) => continue,
            Ok(r) => r.context("consuming")?,
        };
        if !said_first {
            said_first = true;
            say("FIRST");
        }
        consumed += 1;
        if let Some((id, version)) = m.payload().and_then(parse_payload) {
            probe.received(&id, version);
            let Some((body, fetched)) = fetch_retrying(&client, &args.source, &id, &control).await
            else {
                break 'run;
            };
            if !write_retrying(&sink, &[upsert(&id, body, fetched)], &control).await {
                break 'run;
            }
        }
        consumer.store_offset_from_message(&m)?;
        positions.insert(m.partition(), m.offset() + 1);
    }
    tokio::task::block_in_place(|| commit_and_confirm(&consumer, &args.topic, &positions));
    Ok(ContenderReport {
        consumed,
        probe: probe.summary(),
    })
}

/// Records per batch of the loops.
pub const LOOP_BATCH_RECORDS: usize = 5_000;
/// Longest batch poll of the loops.
pub const LOOP_BATCH_TIME: Duration = Duration::from_millis(100);
/// Fetches in flight of the loops (and of refetch's defaults).
pub const LOOP_FETCHES: usize = 64;

/// What one loop batch asks the source for: the ids in record order, one per record
/// (`dedupe == false`), or one per id with the highest notified version, less the ids whose
/// written version already covers it.
pub fn loop_work(
    batch: &[(String, Option<i64>)],
    dedupe: bool,
    written: &HashMap<String, i64>,
) -> Vec<String> {
    if !dedupe {
        return batch.iter().map(|(id, _)| id.clone()).collect();
    }
    let mut highest: HashMap<&str, Option<i64>> = HashMap::new();
    let mut order: Vec<&str> = Vec::new();
    for (id, v) in batch {
        match highest.get_mut(id.as_str()) {
            Some(h) => {
                if let (Some(old), Some(new)) = (*h, *v) {
                    *h = Some(old.max(new));
                } else if v.is_some() {
                    *h = *v;
                }
            }
            None => {
                highest.insert(id.as_str(), *v);
                order.push(id.as_str());
            }
        }
    }
    order
        .into_iter()
        .filter(
            |id| match (highest.get(id).copied().flatten(), written.get(*id)) {
                (Some(v), Some(w)) => *w < v,
                _ => true,
            },
        )
        .map(str::to_owned)
        .collect()
}

async fn run_loop(
    args: &ContenderArgs,
    control: Control,
    dedupe: bool,
) -> anyhow::Result<ContenderReport> {
    let consumer: StreamConsumer = kafka_config(args)
        .consumer_client_config()
        .create()
        .context("creating the consumer")?;
    consumer.subscribe(&[&args.topic])?;
    let probe = new_probe(args);
    let sink = ProbeSink {
        inner: BenchSink::open(args.jsonl.as_ref(), LOOP_BATCH_RECORDS * 2).await?,
        probe: probe.clone(),
        log: DurableLog::open(&args.durable_log)?,
    };
    let slots = args.fetch_slots.unwrap_or(LOOP_FETCHES).max(1);
    let client = reqwest::Client::new();
    let mut written: HashMap<String, i64> = HashMap::new();
    let mut said_first = false;
    let mut consumed = 0u64;
    'run: while !control.stopped() {
        // Poll up to 5,000 records or 100 ms.
        let mut batch: Vec<(String, Option<i64>)> = Vec::new();
        let mut positions: BTreeMap<i32, i64> = BTreeMap::new();
        let deadline = tokio::time::Instant::now() + LOOP_BATCH_TIME;
        let mut n = 0;
        while n < LOOP_BATCH_RECORDS {
            let m = match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Err(_) => break,
                Ok(r) => r.context("consuming")?,
            };
            n += 1;
            positions.insert(m.partition(), m.offset() + 1);
            if let Some((id, v)) = m.payload().and_then(parse_payload) {
                probe.received(&id, v);
                batch.push((id, v));
            }
        }
        if n == 0 {
            continue;
        }
        if !said_first {
            said_first = true;
            say("FIRST");
        }
        consumed += n as u64;
        let work = loop_work(&batch, dedupe, &written);
        let fetched: Vec<Option<(String, bytes::Bytes, i64)>> = futures::stream::iter(work)
            .map(|id| {
                let (client, control) = (&client, &control);
                async move {
                    fetch_retrying(client, &args.source, &id, control)
                        .await
                        .map(|(b, v)| (id, b, v))
                }
            })
            .buffered(slots)
            .collect()
            .await;
        let mut changes = Vec::with_capacity(fetched.len());
        let mut versions = Vec::with_capacity(fetched.len());
        for f in fetched {
            let Some((id, body, v)) = f else {
                break 'run; // stopped mid-batch: nothing of it is committed
            };
            changes.push(upsert(&id, body, v));
            versions.push((id, v));
        }
        if !changes.is_empty() && !write_retrying(&sink, &changes, &control).await {
            break 'run;
        }
        for (id, v) in versions {
            let w = written.entry(id).or_insert(v);
            *w = (*w).max(v);
        }
        // Commit the batch, for the partitions this member still owns.
        let owned: Vec<i32> = consumer
            .assignment()
            .map(|a| a.elements().iter().map(|e| e.partition()).collect())
            .unwrap_or_default();
        positions.retain(|p, _| owned.contains(p));
        if !positions.is_empty()
            && let Err(e) =
                consumer.commit(&positions_list(&args.topic, &positions), CommitMode::Async)
        {
            tracing::warn!(error = %e, "committing a batch");
        }
    }
    Ok(ContenderReport {
        consumed,
        probe: probe.summary(),
    })
}

async fn run_refetch(
    args: &ContenderArgs,
    mut control: Control,
) -> anyhow::Result<ContenderReport> {
    let tuned = args.kind == ContenderKind::RefetchTuned;
    let mut engine = if tuned {
        tuned_engine()
    } else {
        EngineConfig::default()
    };
    if let Some(n) = args.fetch_slots {
        engine.fetch_concurrency = n;
    }
    let probe = new_probe(args);
    let sink = ProbeSink {
        inner: BenchSink::open(args.jsonl.as_ref(), engine.sink_batch_max).await?,
        probe: probe.clone(),
        log: DurableLog::open(&args.durable_log)?,
    };
    let fetcher = HttpFetcher::builder()
        .source(
            ENTITY_TYPE,
            source_config(&args.source, tuned, args.fetch_slots),
        )
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
    let mut task = tokio::spawn(pipeline.run(std::future::pending()));
    let mut said_first = false;
    loop {
        tokio::select! {
            _ = control.wait_stop() => break,
            r = &mut task => bail!("the pipeline stopped early: {r:?}"),
            _ = tokio::time::sleep(Duration::from_millis(10)), if !said_first => {
                if probe.first_receive().is_some() {
                    said_first = true;
                    say("FIRST");
                }
            }
        }
    }
    handle.shutdown();
    match tokio::time::timeout(Duration::from_secs(30), task).await {
        Ok(Ok(Ok(_))) => {}
        other => tracing::warn!(?other, "pipeline shutdown"),
    }
    Ok(ContenderReport {
        consumed: probe.summary().received,
        probe: probe.summary(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(items: &[(&str, Option<i64>)]) -> Vec<(String, Option<i64>)> {
        items.iter().map(|(i, v)| ((*i).to_owned(), *v)).collect()
    }

    #[test]
    fn the_concurrent_loop_fetches_once_per_record() {
        let batch = b(&[("a", Some(1)), ("a", Some(2)), ("b", None)]);
        assert_eq!(loop_work(&batch, false, &HashMap::new()), ["a", "a", "b"]);
    }

    #[test]
    fn batch_dedupe_keeps_one_per_id_and_skips_covered_ids() {
        let batch = b(&[
            ("a", Some(1)),
            ("b", Some(5)),
            ("a", Some(3)),
            ("c", None),
            ("c", None),
            ("d", Some(2)),
        ]);
        let written = HashMap::from([
            ("a".to_owned(), 2), // below 3: fetched
            ("b".to_owned(), 5), // covers 5: skipped
            ("c".to_owned(), 9), // unversioned: always fetched
        ]);
        assert_eq!(loop_work(&batch, true, &written), ["a", "c", "d"]);
        assert_eq!(
            loop_work(&batch, true, &HashMap::new()),
            ["a", "b", "c", "d"]
        );
    }
}
