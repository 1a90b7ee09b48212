//! What the binary observes around the engine, for `/metrics`, `/status.json`, the status page
//! and the demo's summary:
//!
//! - [`ObservedFetcher`]: fetch latency (the engine reports notification to durable-write
//!   latency; the time a source takes to answer is measured here), the HTTP fetcher's circuit
//!   breakers, and the `fetch` / `fetch_batch` spans (children of the engine's `flight` span)
//!   that trace export sends and that source requests name in their `traceparent`.
//! - [`ObservedSink`]: sink batches, their latency and errors, and the `sink_batch` span.
//! - [`Observer`]: a task that polls the pipeline's status every second (readiness and
//!   dead-letter gauges, rates of notifications, fetches and writes) and, with a separate
//!   librdkafka client built from the same connection settings, the log-end offset (high
//!   watermark) of every partition the pipeline owns, from which it derives the lag to the end:
//!   the high watermark minus the committed offset, or minus the consumed position before the
//!   first commit. Those per-partition series are rendered by [`Observer::render_partitions`]
//!   straight into `/metrics`, so a partition that moved to another instance disappears from
//!   this one at once instead of keeping a stale value.
//! - [`register`]: the binary's start-up registration of every series of every crate, with its
//!   help text and zero value.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use refetch::client_log::QuietContext;
use refetch::engine::PartitionStatus;
use refetch::metrics::{Kind, Series};
use refetch::stats::{Counters, LatencyHistogram};
use refetch::{
    Change, EntityKey, FetchError, FetchOutcome, FetchRequest, Fetcher, KafkaConfig,
    OwnershipShare, PipelineHandle, Sink, SinkError, Version, WriteReport, async_trait,
};
use tracing::Instrument as _;

use crate::config::Config;

type BreakerProbe = Box<dyn Fn() -> Vec<(String, bool)> + Send + Sync>;

/// Fetch latency and breaker states, shared by the fetcher wrapper and the status page.
pub struct FetchStats {
    latency: Mutex<LatencyHistogram>,
    breakers: BreakerProbe,
}

impl std::fmt::Debug for FetchStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetchStats").finish_non_exhaustive()
    }
}

/// A snapshot of [`FetchStats`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct FetchSnapshot {
    /// Requests timed (a batched request counts once per key).
    pub fetches: u64,
    /// Fetch latency p50, milliseconds.
    pub p50_ms: Option<f64>,
    /// Fetch latency p99, milliseconds.
    pub p99_ms: Option<f64>,
    /// Circuit breaker per entity type: `true` while open (fetches not attempted).
    pub breakers_open: Vec<(String, bool)>,
}

impl FetchStats {
    /// Stats whose breaker states come from `breakers`.
    pub fn new(breakers: impl Fn() -> Vec<(String, bool)> + Send + Sync + 'static) -> Self {
        FetchStats {
            latency: Mutex::new(LatencyHistogram::default()),
            breakers: Box::new(breakers),
        }
    }

    fn record(&self, d: Duration, n: usize) {
        if let Ok(mut h) = self.latency.lock() {
            for _ in 0..n {
                h.record(d);
            }
        }
    }

    /// The current figures.
    pub fn snapshot(&self) -> FetchSnapshot {
        let (fetches, p50, p99) = match self.latency.lock() {
            Ok(h) => (h.count(), h.quantile(0.5), h.quantile(0.99)),
            Err(_) => (0, None, None),
        };
        FetchSnapshot {
            fetches,
            p50_ms: ms(p50),
            p99_ms: ms(p99),
            breakers_open: (self.breakers)(),
        }
    }
}

fn ms(d: Option<Duration>) -> Option<f64> {
    d.map(|d| d.as_secs_f64() * 1000.0)
}

/// A fetcher that times every request of the fetcher it wraps and runs it in a `fetch` span.
pub struct ObservedFetcher<F> {
    inner: F,
    stats: Arc<FetchStats>,
}

impl<F> ObservedFetcher<F> {
    /// Wrap `inner`, recording into `stats`.
    pub fn new(inner: F, stats: Arc<FetchStats>) -> Self {
        ObservedFetcher { inner, stats }
    }

    /// The wrapped fetcher.
    pub fn inner(&self) -> &F {
        &self.inner
    }
}

fn outcome_label(r: &Result<FetchOutcome, FetchError>) -> &'static str {
    match r {
        Ok(o) => o.label(),
        Err(FetchError::NotAttempted { .. }) => "not_attempted",
        Err(e) => e.class().label(),
    }
}

#[async_trait]
impl<F: Fetcher> Fetcher for ObservedFetcher<F> {
    async fn fetch(&self, request: &FetchRequest) -> Result<FetchOutcome, FetchError> {
        let span = tracing::debug_span!(
            "fetch",
            key = %request.key,
            otel.kind = "client",
            outcome = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        let started = Instant::now();
        let r = self.inner.fetch(request).instrument(span.clone()).await;
        span.record("outcome", outcome_label(&r));
        if matches!(
            r,
            Err(FetchError::Transient { .. } | FetchError::Permanent { .. })
        ) {
            span.record("otel.status_code", "ERROR");
        }
        if !matches!(r, Err(FetchError::NotAttempted { .. })) {
            self.stats.record(started.elapsed(), 1);
        }
        r
    }

    fn handles(&self, entity_type: &str) -> bool {
        self.inner.handles(entity_type)
    }

    fn batch_limit(&self, entity_type: &str) -> usize {
        self.inner.batch_limit(entity_type)
    }

    fn source_name(&self, entity_type: &str) -> Arc<str> {
        self.inner.source_name(entity_type)
    }

    fn ownership_changed(&self, share: OwnershipShare) {
        self.inner.ownership_changed(share)
    }

    async fn fetch_batch(
        &self,
        requests: &[FetchRequest],
    ) -> Vec<Result<FetchOutcome, FetchError>> {
        let span = tracing::debug_span!(
            "fetch_batch",
            entity_type = requests.first().map(|r| r.key.entity_type()),
            size = requests.len(),
            otel.kind = "client",
        );
        let started = Instant::now();
        let r = self.inner.fetch_batch(requests).instrument(span).await;
        let attempted = r
            .iter()
            .filter(|x| !matches!(x, Err(FetchError::NotAttempted { .. })))
            .count();
        self.stats.record(started.elapsed(), attempted);
        r
    }
}

/// Sink batches, their latency and errors, for the status page's sink section.
#[derive(Debug, Default)]
pub struct SinkStats {
    inner: Mutex<SinkInner>,
}

#[derive(Debug, Default)]
struct SinkInner {
    kind: &'static str,
    batches: u64,
    records: u64,
    failed_batches: u64,
    rejected_records: u64,
    last_error: Option<String>,
    latency: LatencyHistogram,
}

/// A snapshot of [`SinkStats`].
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct SinkSnapshot {
    /// The sink's kind (`postgres`, `sqlite`, ...).
    pub kind: String,
    /// Batch writes (every attempt counts).
    pub batches: u64,
    /// Records in those batches.
    pub records: u64,
    /// Batch writes that failed as a whole.
    pub failed_batches: u64,
    /// Records the sink refused on their own.
    pub rejected_records: u64,
    /// The last error (a whole batch or a single record).
    pub last_error: Option<String>,
    /// Batch write latency p50, milliseconds.
    pub p50_ms: Option<f64>,
    /// Batch write latency p99, milliseconds.
    pub p99_ms: Option<f64>,
}

impl SinkStats {
    /// The process-wide sink figures (one process has one sink).
    pub fn global() -> Arc<SinkStats> {
        static GLOBAL: OnceLock<Arc<SinkStats>> = OnceLock::new();
        GLOBAL.get_or_init(Arc::default).clone()
    }

    fn record(
        &self,
        kind: &'static str,
        len: usize,
        took: Duration,
        r: &Result<WriteReport, SinkError>,
    ) {
        let Ok(mut s) = self.inner.lock() else {
            return;
        };
        s.kind = kind;
        s.batches += 1;
        s.records += len as u64;
        s.latency.record(took);
        match r {
            Ok(report) => {
                s.rejected_records += report.failed.len() as u64;
                if let Some((_, e)) = report.failed.last() {
                    s.last_error = Some(e.to_string());
                }
            }
            Err(e) => {
                s.failed_batches += 1;
                s.last_error = Some(e.to_string());
            }
        }
    }

    /// The current figures.
    pub fn snapshot(&self) -> SinkSnapshot {
        let Ok(s) = self.inner.lock() else {
            return SinkSnapshot::default();
        };
        SinkSnapshot {
            kind: s.kind.to_owned(),
            batches: s.batches,
            records: s.records,
            failed_batches: s.failed_batches,
            rejected_records: s.rejected_records,
            last_error: s.last_error.clone(),
            p50_ms: ms(s.latency.quantile(0.5)),
            p99_ms: ms(s.latency.quantile(0.99)),
        }
    }
}

/// A sink that records every batch write of the sink it wraps into [`SinkStats::global`] and
/// runs it in a `sink_batch` span. Every other call is passed through unchanged.
pub struct ObservedSink<S: ?Sized> {
    kind: &'static str,
    stats: Arc<SinkStats>,
    inner: Arc<S>,
}

impl<S: ?Sized> ObservedSink<S> {
    /// Wrap `inner`, a sink of kind `kind`.
    pub fn new(inner: Arc<S>, kind: &'static str) -> Self {
        ObservedSink {
            kind,
            stats: SinkStats::global(),
            inner,
        }
    }
}

#[async_trait]
impl<S: Sink + ?Sized> Sink for ObservedSink<S> {
    async fn write(&self, batch: &[Change]) -> Result<WriteReport, SinkError> {
        let fetched_at = vec![std::time::SystemTime::now(); batch.len()];
        self.write_with(batch, &refetch::WriteContext::new(&fetched_at))
            .await
    }

    async fn write_with(
        &self,
        batch: &[Change],
        ctx: &refetch::WriteContext<'_>,
    ) -> Result<WriteReport, SinkError> {
        let span = tracing::debug_span!(
            "sink_batch",
            sink = self.kind,
            size = batch.len(),
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
        );
        let started = Instant::now();
        let r = self
            .inner
            .write_with(batch, ctx)
            .instrument(span.clone())
            .await;
        if r.is_err() {
            span.record("otel.status_code", "ERROR");
        }
        self.stats
            .record(self.kind, batch.len(), started.elapsed(), &r);
        r
    }

    async fn held_version(&self, key: &EntityKey) -> Result<Option<Version>, SinkError> {
        self.inner.held_version(key).await
    }

    fn tracks_versions(&self) -> bool {
        self.inner.tracks_versions()
    }

    fn max_batch(&self) -> usize {
        self.inner.max_batch()
    }

    async fn check(&self) -> Result<(), SinkError> {
        self.inner.check().await
    }

    fn offset_store(&self) -> Option<refetch::OffsetStore> {
        self.inner.offset_store()
    }

    async fn commit_transaction(
        &self,
        commit: &refetch::TransactionCommit<'_>,
    ) -> Result<(), refetch::TransactionError> {
        self.inner.commit_transaction(commit).await
    }

    async fn abort_transaction(&self) -> Result<(), refetch::TransactionError> {
        self.inner.abort_transaction().await
    }

    async fn stored_offsets(
        &self,
        group_id: &str,
        partitions: &[refetch::TopicPartition],
    ) -> Result<Vec<(refetch::TopicPartition, refetch::StoredOffset)>, SinkError> {
        self.inner.stored_offsets(group_id, partitions).await
    }

    fn transaction_timeout(&self) -> Option<std::time::Duration> {
        self.inner.transaction_timeout()
    }

    fn max_stored_ranges(&self) -> usize {
        self.inner.max_stored_ranges()
    }

    fn wants_inputs(&self) -> bool {
        self.inner.wants_inputs()
    }
}

/// The log-end offset of a partition as of the last watermark round (`refetch_log_end_offset`).
pub const LOG_END_OFFSET: &str = "refetch_log_end_offset";
/// The lag to the end per partition (`refetch_consumer_lag`).
pub const CONSUMER_LAG: &str = "refetch_consumer_lag";
/// Drift found by reconcile.
pub const RECONCILE_DRIFT_TOTAL: &str = "refetch_reconcile_drift_total";
/// The version of the running binary.
pub const BUILD_INFO: &str = "refetch_build_info";
/// The kinds of `refetch_reconcile_drift_total`.
pub const DRIFT_KINDS: &[&str] = &["missing", "stale", "orphaned"];

/// The series the binary itself exports.
pub const SERIES: &[Series] = &[
    Series {
        name: LOG_END_OFFSET,
        kind: Kind::Gauge,
        unit: "offset",
        labels: &["topic", "partition"],
        help: "The log end offset (high watermark) of each partition this instance owns.",
        buckets: &[],
    },
    Series {
        name: CONSUMER_LAG,
        kind: Kind::Gauge,
        unit: "records",
        labels: &["topic", "partition"],
        help: "Records between the log end and the committed offset of each partition this instance owns (the consumed position before the first commit).",
        buckets: &[],
    },
    Series {
        name: RECONCILE_DRIFT_TOTAL,
        kind: Kind::Counter,
        unit: "entities",
        labels: &["kind"],
        help: "Drift the scheduled reconcile found and repaired, by kind: missing, stale, orphaned.",
        buckets: &[],
    },
    Series {
        name: crate::reload::RELOADS_METRIC,
        kind: Kind::Counter,
        unit: "reloads",
        labels: &["result"],
        help: "Configuration reloads (SIGHUP) by result: applied (live or by rebuilding the pipeline), unchanged, invalid (the file was refused; the pipeline keeps running) or failed (the new pipeline could not be built; the old one keeps running).",
        buckets: &[],
    },
    Series {
        name: BUILD_INFO,
        kind: Kind::Gauge,
        unit: "1",
        labels: &["version"],
        help: "Always 1; the label names the version of the running refetch binary.",
        buckets: &[],
    },
];

/// Every series of every crate the binary exports: the engine's, the HTTP fetcher's, the
/// sinks' and its own.
pub fn catalogue() -> Vec<Series> {
    [
        refetch::metrics::SERIES,
        refetch_http::telemetry::SERIES,
        refetch_sinks::metrics::SERIES,
        SERIES,
    ]
    .concat()
}

/// What [`register`] and the [`Observer`] need to know about the pipeline.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// The Kafka connection of the pipeline (`None`: no watermarks, no lag).
    pub kafka: Option<KafkaConfig>,
    /// The configured sources (entity types).
    pub sources: Vec<String>,
    /// The sink's kind.
    pub sink: &'static str,
}

impl Observed {
    /// What a configuration file describes.
    pub fn from_config(cfg: &Config) -> Self {
        Observed {
            kafka: Some(cfg.kafka_config()),
            sources: cfg.fetcher.sources.keys().cloned().collect(),
            sink: cfg.sink.kind(),
        }
    }
}

/// Register every series with its zero value and help text (after the recorder is installed).
/// Series of partitions appear with the partitions.
pub fn register(observed: &Observed) {
    refetch::metrics::register();
    for s in &observed.sources {
        refetch_http::telemetry::register_source(s);
    }
    if !observed.sink.is_empty() {
        refetch_sinks::metrics::register(observed.sink);
    }
    refetch::metrics::describe(SERIES);
    for kind in DRIFT_KINDS {
        metrics::counter!(RECONCILE_DRIFT_TOTAL, "kind" => *kind).increment(0);
    }
    metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// One owned partition's position against its log end.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PartitionLag {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// The log end offset (high watermark), if the last round got it.
    pub end: Option<i64>,
    /// The consumer's position (the offset after the last record received).
    pub consumed: Option<i64>,
    /// The committed offset (this process's last commit, else the group's on the broker).
    pub committed: Option<i64>,
    /// `end - committed`, or `end - consumed` before the first commit.
    pub lag: Option<i64>,
}

/// Notifications, fetches and writes per second over the last few seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Rates {
    /// Notifications per second.
    pub notifications: f64,
    /// Fetches started per second.
    pub fetches: f64,
    /// Durable writes per second.
    pub writes: f64,
    /// The window the rates are averaged over, seconds.
    pub window_s: f64,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    notifications: u64,
    fetches: u64,
    writes: u64,
}

/// How far back the rates look.
const RATE_WINDOW: Duration = Duration::from_secs(10);
/// How often the observer polls the pipeline.
const STATUS_EVERY: Duration = Duration::from_secs(1);
/// How often it asks the brokers for the log-end offsets.
const WATERMARKS_EVERY: Duration = Duration::from_secs(5);
/// The deadline of one watermark or committed-offset request.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Default)]
struct ObserverState {
    samples: VecDeque<Sample>,
    ends: std::collections::HashMap<(String, i32), i64>,
    group_committed: std::collections::HashMap<(String, i32), i64>,
    partitions: Vec<PartitionLag>,
    broker: Option<bool>,
}

/// Polls the pipeline's status and the brokers' watermarks (see the module docs).
#[derive(Debug, Default)]
pub struct Observer {
    state: Mutex<ObserverState>,
}

/// A running [`Observer`] task; dropping it stops the task.
#[derive(Debug)]
pub struct ObserverTask {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ObserverTask {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Observer {
    /// Start polling `handle` (and, with `kafka`, the brokers' watermarks).
    pub fn start(
        self: &Arc<Self>,
        handle: PipelineHandle,
        kafka: Option<&KafkaConfig>,
    ) -> ObserverTask {
        let client = kafka.and_then(|k| match watermark_client(k) {
            Ok(c) => Some(Arc::new(c)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot create the watermark client: no lag per partition");
                None
            }
        });
        let me = self.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(STATUS_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_watermarks: Option<Instant> = None;
            loop {
                tick.tick().await;
                let Some(status) = handle.status().await else {
                    refetch::metrics::ready(false);
                    continue;
                };
                refetch::metrics::ready(status.ready());
                refetch::metrics::dead_letter_topic_broken(status.engine.dead_letter_broken);
                me.sample(&status.engine.counters, Instant::now());
                let due = last_watermarks.is_none_or(|t| t.elapsed() >= WATERMARKS_EVERY);
                if let (true, Some(client)) = (due, &client) {
                    last_watermarks = Some(Instant::now());
                    let wanted = wanted(&status.engine.partitions);
                    let client = client.clone();
                    let got =
                        tokio::task::spawn_blocking(move || query_watermarks(&client, &wanted))
                            .await
                            .unwrap_or_default();
                    me.store_watermarks(got);
                }
                me.derive(&status.engine.partitions);
            }
        });
        ObserverTask { task }
    }

    fn sample(&self, c: &Counters, at: Instant) {
        let Ok(mut s) = self.state.lock() else {
            return;
        };
        s.samples.push_back(Sample {
            at,
            notifications: c.notifications,
            fetches: c.fetches,
            writes: c.writes,
        });
        while s
            .samples
            .front()
            .is_some_and(|f| at.duration_since(f.at) > RATE_WINDOW)
        {
            s.samples.pop_front();
        }
    }

    fn store_watermarks(&self, got: Watermarks) {
        let Ok(mut s) = self.state.lock() else {
            return;
        };
        // (`refetch_broker_reachable` is the pipeline's, from the consumer client itself.)
        s.broker = got.reachable.or(s.broker);
        for (tp, end) in got.ends {
            s.ends.insert(tp, end);
        }
        for (tp, c) in got.committed {
            s.group_committed.insert(tp, c);
        }
    }

    /// Lag per owned partition from the latest status and watermarks; forgets partitions no
    /// longer owned.
    fn derive(&self, owned_now: &[PartitionStatus]) {
        let Ok(mut s) = self.state.lock() else {
            return;
        };
        let owned: std::collections::HashSet<(String, i32)> = owned_now
            .iter()
            .map(|p| (p.topic.clone(), p.partition))
            .collect();
        s.ends.retain(|tp, _| owned.contains(tp));
        s.group_committed.retain(|tp, _| owned.contains(tp));
        let partitions = owned_now
            .iter()
            .map(|p| {
                let tp = (p.topic.clone(), p.partition);
                let end = s.ends.get(&tp).copied();
                let consumed = p.last_received.map(|o| o + 1);
                let committed = p.committed.or_else(|| s.group_committed.get(&tp).copied());
                let lag = end.and_then(|e| {
                    p.committed
                        .or(consumed)
                        .or(committed)
                        .map(|c| (e - c).max(0))
                });
                PartitionLag {
                    topic: p.topic.clone(),
                    partition: p.partition,
                    end,
                    consumed,
                    committed,
                    lag,
                }
            })
            .collect();
        s.partitions = partitions;
    }

    /// The lag of every owned partition as of the last round.
    pub fn partitions(&self) -> Vec<PartitionLag> {
        self.state
            .lock()
            .map(|s| s.partitions.clone())
            .unwrap_or_default()
    }

    /// Whether the last watermark round reached the brokers (`None` before the first round).
    pub fn broker_reachable(&self) -> Option<bool> {
        self.state.lock().ok().and_then(|s| s.broker)
    }

    /// Rates over the last few seconds (zero until two samples exist).
    pub fn rates(&self) -> Rates {
        let Ok(s) = self.state.lock() else {
            return Rates::default();
        };
        let (Some(first), Some(last)) = (s.samples.front(), s.samples.back()) else {
            return Rates::default();
        };
        let dt = last.at.duration_since(first.at).as_secs_f64();
        if dt <= 0.0 {
            return Rates::default();
        }
        let per = |a: u64, b: u64| b.saturating_sub(a) as f64 / dt;
        Rates {
            notifications: per(first.notifications, last.notifications),
            fetches: per(first.fetches, last.fetches),
            writes: per(first.writes, last.writes),
            window_s: dt,
        }
    }

    /// The per-partition series (`refetch_log_end_offset`, `refetch_consumer_lag`) in the
    /// Prometheus text format, with their help and type lines.
    pub fn render_partitions(&self) -> String {
        let parts = self.partitions();
        let mut out = String::new();
        for (name, value) in [
            (
                LOG_END_OFFSET,
                (|p: &PartitionLag| p.end) as fn(&PartitionLag) -> Option<i64>,
            ),
            (CONSUMER_LAG, |p: &PartitionLag| p.lag),
        ] {
            let help = SERIES
                .iter()
                .find(|s| s.name == name)
                .map_or("", |s| s.help);
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} gauge");
            for p in &parts {
                if let Some(v) = value(p) {
                    let _ = writeln!(
                        out,
                        "{name}{{topic=\"{}\",partition=\"{}\"}} {v}",
                        label_value(&p.topic),
                        p.partition
                    );
                }
            }
            out.push('\n');
        }
        out
    }
}

/// The partitions to ask the brokers about, and which of them need the group's committed
/// offset (nothing received and nothing committed by this process).
fn wanted(partitions: &[PartitionStatus]) -> Vec<(String, i32, bool)> {
    partitions
        .iter()
        .map(|p| {
            let unknown = p.committed.is_none() && p.last_received.is_none();
            (p.topic.clone(), p.partition, unknown)
        })
        .collect()
}

/// A label value escaped for the Prometheus text format.
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The client that asks for watermarks: the pipeline's connection and security settings, its
/// group (to read the group's committed offsets; it never joins), and log lines through the
/// de-duplicating client log.
fn watermark_client(
    k: &KafkaConfig,
) -> Result<BaseConsumer<QuietContext>, rdkafka::error::KafkaError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.brokers)
        .set("group.id", &k.group_id)
        .set("client.id", "refetch-watermarks")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    for (key, v) in &k.properties {
        c.set(key, v);
    }
    c.set_log_level(rdkafka::config::RDKafkaLogLevel::Warning);
    c.create_with_context(QuietContext)
}

#[derive(Debug, Default)]
struct Watermarks {
    reachable: Option<bool>,
    ends: Vec<((String, i32), i64)>,
    committed: Vec<((String, i32), i64)>,
}

fn query_watermarks(
    client: &BaseConsumer<QuietContext>,
    wanted: &[(String, i32, bool)],
) -> Watermarks {
    // Serve the client's queued events (errors go to the de-duplicating client log), so they
    // do not pile up while the brokers are unreachable; it consumes nothing.
    let _ = client.poll(Duration::ZERO);
    let mut out = Watermarks::default();
    let mut unknown = rdkafka::TopicPartitionList::new();
    for (topic, partition, needs_committed) in wanted {
        match client.fetch_watermarks(topic, *partition, KAFKA_TIMEOUT) {
            Ok((_, high)) => {
                out.reachable = Some(true);
                out.ends.push(((topic.clone(), *partition), high));
            }
            Err(e) => {
                tracing::debug!(topic = %topic, partition, error = %e, "watermarks unavailable");
                if is_unreachable(&e) {
                    // One unreachable broker answer is enough for this round.
                    out.reachable = Some(false);
                    return out;
                }
            }
        }
        if *needs_committed {
            unknown.add_partition(topic, *partition);
        }
    }
    if unknown.count() > 0
        && let Ok(tpl) = client.committed_offsets(unknown, KAFKA_TIMEOUT)
    {
        for e in tpl.elements() {
            if let rdkafka::Offset::Offset(o) = e.offset() {
                out.committed
                    .push(((e.topic().to_owned(), e.partition()), o));
            }
        }
    }
    out
}

fn is_unreachable(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(
            C::OperationTimedOut
                | C::AllBrokersDown
                | C::BrokerTransportFailure
                | C::RequestTimedOut
                | C::BrokerNotAvailable
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_come_from_the_samples_of_the_window() {
        let o = Observer::default();
        let t0 = Instant::now();
        assert_eq!(o.rates(), Rates::default());
        let mut c = Counters::default();
        o.sample(&c, t0);
        c.notifications = 100;
        c.fetches = 20;
        c.writes = 10;
        o.sample(&c, t0 + Duration::from_secs(2));
        let r = o.rates();
        assert!((r.notifications - 50.0).abs() < 1e-9, "{r:?}");
        assert!((r.fetches - 10.0).abs() < 1e-9, "{r:?}");
        assert!((r.writes - 5.0).abs() < 1e-9, "{r:?}");
        // Old samples leave the window.
        o.sample(&c, t0 + Duration::from_secs(20));
        assert_eq!(o.rates(), Rates::default());
    }

    fn part(partition: i32, last_received: Option<i64>, committed: Option<i64>) -> PartitionStatus {
        PartitionStatus {
            topic: "t\"x".into(),
            partition,
            epoch: 1,
            last_received,
            commit_point: None,
            committed,
            outstanding: 0,
            paused: false,
            revoking: false,
        }
    }

    #[test]
    fn lag_is_measured_from_the_commit_then_the_position_then_the_group() {
        let o = Observer::default();
        let owned = [
            part(0, Some(99), Some(40)),
            part(1, Some(9), None),
            part(2, None, None),
            part(3, None, None),
        ];
        assert_eq!(
            wanted(&owned).iter().map(|w| w.2).collect::<Vec<_>>(),
            [false, false, true, true]
        );
        let tp = |p| ("t\"x".to_owned(), p);
        o.store_watermarks(Watermarks {
            reachable: Some(true),
            ends: vec![(tp(0), 150), (tp(1), 30), (tp(2), 7), (tp(3), 5)],
            committed: vec![(tp(2), 7)],
        });
        o.derive(&owned);
        let lags: Vec<Option<i64>> = o.partitions().iter().map(|p| p.lag).collect();
        // 150 - 40 committed; 30 - 10 consumed; 7 - 7 the group's commit; 3: unknown.
        assert_eq!(lags, [Some(110), Some(20), Some(0), None]);
        let text = o.render_partitions();
        assert!(
            text.contains("refetch_consumer_lag{topic=\"t\\\"x\",partition=\"0\"} 110"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE refetch_log_end_offset gauge"),
            "{text}"
        );
        assert!(
            !text.contains("refetch_consumer_lag{topic=\"t\\\"x\",partition=\"3\"}"),
            "no lag without a reference: {text}"
        );
        // A partition that moved away disappears at once.
        o.derive(&owned[..1]);
        let text = o.render_partitions();
        assert!(!text.contains("partition=\"1\""), "{text}");
        assert_eq!(o.broker_reachable(), Some(true));
    }
}
