//! `refetch reconcile`: compare what the source lists with what the sink holds, and repair.
//!
//! Even a perfect consumer cannot repair a notification the source never sent. Reconcile is the
//! safety net: for each entity type with a listing it
//! 1. pages through the listing (ids and, where items carry them, versions);
//! 2. pages through the versions the sink holds (PostgreSQL and SQLite sinks; other sinks cannot
//!    report what they hold, so reconcile refuses them);
//! 3. classifies drift: **missing** (listed, not held or held as a tombstone), **stale** (held
//!    with a lower version than listed), **orphaned** (held, not listed);
//! 4. refreshes every drifted key through the engine ([`PipelineHandle::refresh`]): a missing or
//!    stale key is fetched and written; an orphaned key is deleted only if a fetch of that one
//!    id says gone, under the gone guard (a listing is no snapshot: an entity created after its
//!    page passed is fetched and kept).
//!
//! Drift is reported by kind with a sample of keys, and counted in
//! `refetch_reconcile_drift_total{kind}`. Drift found means notifications were lost upstream.
//!
//! Inside `refetch run` ([`schedule`]) a reconcile covers only the keys of the partitions this
//! instance owns: the partition of a key is computed like Kafka's default partitioner for keyed
//! records (murmur2 of the id bytes, made positive, modulo the partition count), so the topic must
//! be keyed by entity id.

use std::collections::{BTreeMap, HashSet};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use refetch::{EntityKey, PipelineHandle, RefreshOutcome, Sink, SinkError, Version};
use refetch_http::HttpFetcher;
use refetch_sinks::SinkConfig;
use refetch_sinks::postgres::PostgresSink;
use refetch_sinks::sqlite::SqliteSink;
use refetch_sinks::stored::HeldVersion;

use crate::cli::ReconcileArgs;
use crate::config::{Config, ReconcileSection};
use crate::logging;
use crate::refresh::{Refresher, http_fetcher, list_with_retry, observed};
use crate::signals::Signals;

/// A sink that can report the versions it holds, in pages.
#[derive(Clone)]
pub enum HeldVersions {
    /// The PostgreSQL sink.
    Postgres(Arc<PostgresSink>),
    /// The SQLite sink.
    Sqlite(Arc<SqliteSink>),
}

impl HeldVersions {
    /// Open the configured sink if it can report versions; `Ok(None)` for other sinks.
    pub async fn open(cfg: &SinkConfig) -> anyhow::Result<Option<HeldVersions>> {
        Ok(match cfg {
            SinkConfig::Postgres(c) => Some(HeldVersions::Postgres(Arc::new(
                PostgresSink::connect(c)
                    .await
                    .context("cannot start the postgres sink")?,
            ))),
            SinkConfig::Sqlite(c) => Some(HeldVersions::Sqlite(Arc::new(
                SqliteSink::open(c)
                    .await
                    .context("cannot start the sqlite sink")?,
            ))),
            _ => None,
        })
    }

    /// One page of held versions after `after`.
    pub async fn page(
        &self,
        after: Option<&EntityKey>,
        limit: usize,
    ) -> Result<Vec<HeldVersion>, SinkError> {
        match self {
            HeldVersions::Postgres(s) => s.list_versions(after, limit).await,
            HeldVersions::Sqlite(s) => s.list_versions(after, limit).await,
        }
    }

    /// The same sink, for writing.
    pub fn sink(&self) -> Arc<dyn Sink> {
        match self {
            HeldVersions::Postgres(s) => s.clone(),
            HeldVersions::Sqlite(s) => s.clone(),
        }
    }
}

/// Kafka's default partitioner for keyed records (murmur2, as in the Java client's
/// `Utils.murmur2`), made positive: `(murmur2(key) & 0x7fffffff) % partitions`.
pub fn kafka_partition(key: &[u8], partitions: u32) -> u32 {
    (murmur2(key) as u32 & 0x7fff_ffff) % partitions.max(1)
}

/// Kafka's murmur2 (seed `0x9747b28c`).
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h: u32 = SEED ^ (len as u32);
    let chunks = data.chunks_exact(4);
    let tail = chunks.remainder();
    for c in chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    match tail.len() {
        3 => {
            h ^= u32::from(tail[2]) << 16;
            h ^= u32::from(tail[1]) << 8;
            h ^= u32::from(tail[0]);
            h = h.wrapping_mul(M);
        }
        2 => {
            h ^= u32::from(tail[1]) << 8;
            h ^= u32::from(tail[0]);
            h = h.wrapping_mul(M);
        }
        1 => {
            h ^= u32::from(tail[0]);
            h = h.wrapping_mul(M);
        }
        _ => {}
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// Which keys a reconcile covers.
#[derive(Debug, Clone, Default)]
pub enum Scope {
    /// Every key (`refetch reconcile`).
    #[default]
    All,
    /// Keys whose id falls on one of `owned` of `partitions` partitions.
    Partitions {
        /// The topic's partition count.
        partitions: u32,
        /// The partitions this instance owns.
        owned: HashSet<u32>,
    },
}

impl Scope {
    fn covers(&self, id: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Partitions { partitions, owned } => {
                owned.contains(&kafka_partition(id.as_bytes(), *partitions))
            }
        }
    }
}

/// The kinds of drift.
pub const KINDS: [&str; 3] = ["missing", "stale", "orphaned"];

/// What one reconcile found and did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Listed items in scope.
    pub listed: u64,
    /// Held rows in scope.
    pub held: u64,
    /// Drift count by kind (`missing`, `stale`, `orphaned`).
    pub drift: BTreeMap<&'static str, u64>,
    /// Up to `sample` keys per kind.
    pub samples: BTreeMap<&'static str, Vec<EntityKey>>,
    /// Keys refreshed through the engine.
    pub repaired: u64,
    /// Keys whose refresh failed (including `deletes_held`).
    pub failed: u64,
    /// Suspected orphans whose delete the gone guard kept holding for `orphan_wait`.
    pub deletes_held: u64,
}

impl Report {
    /// Total drift.
    pub fn total_drift(&self) -> u64 {
        self.drift.values().sum()
    }

    fn repaired(&mut self, outcomes: Vec<(EntityKey, RefreshOutcome)>) {
        for (key, outcome) in outcomes {
            match outcome {
                RefreshOutcome::Done => self.repaired += 1,
                RefreshOutcome::Failed(why) => {
                    self.failed += 1;
                    tracing::warn!(%key, reason = %why, "reconcile could not repair a key");
                }
                RefreshOutcome::DeleteHeld(why) => {
                    self.failed += 1;
                    self.deletes_held += 1;
                    tracing::warn!(%key, reason = %why, "reconcile did not delete a suspected orphan");
                }
            }
        }
    }

    fn found(&mut self, kind: &'static str, key: &EntityKey, sample: usize) {
        *self.drift.entry(kind).or_default() += 1;
        let s = self.samples.entry(kind).or_default();
        if s.len() < sample {
            s.push(key.clone());
        }
        metrics::counter!("refetch_reconcile_drift_total", "kind" => kind).increment(1);
    }

    /// Print the report as lines of text.
    pub fn print(&self, entity_type: &str) {
        println!(
            "{entity_type}: {} listed, {} held, {} drifted",
            self.listed,
            self.held,
            self.total_drift()
        );
        for kind in KINDS {
            let n = self.drift.get(kind).copied().unwrap_or(0);
            let sample: Vec<String> = self
                .samples
                .get(kind)
                .map(|s| s.iter().map(|k| k.id().to_owned()).collect())
                .unwrap_or_default();
            println!(
                "  {kind:<9} {n}{}",
                if sample.is_empty() {
                    String::new()
                } else {
                    format!("  e.g. {}", sample.join(", "))
                }
            );
        }
        if self.repaired > 0 || self.failed > 0 {
            println!("  repaired  {} (failed {})", self.repaired, self.failed);
        }
        if self.deletes_held > 0 {
            println!(
                "  {} suspected orphan(s) not deleted: the gone guard holds their deletes (gone outcomes are abnormally frequent); check the source, then run reconcile again",
                self.deletes_held
            );
        }
    }
}

/// Reconcile one entity type; repair through `handle` unless it is `None` (dry run). A stop
/// signal ends the repairs after the batch in flight.
pub async fn reconcile_type(
    cfg: &Config,
    http: &HttpFetcher,
    held: &HeldVersions,
    handle: Option<&PipelineHandle>,
    entity_type: &str,
    scope: &Scope,
    signals: &Signals,
) -> anyhow::Result<Report> {
    let opts: &ReconcileSection = &cfg.reconcile;
    let mut report = Report::default();
    // 1. The listing: id -> version.
    let mut listed: BTreeMap<String, Option<Version>> = BTreeMap::new();
    let mut at = None;
    loop {
        let page = list_with_retry(http, entity_type, at.as_ref(), cfg.backfill.retry_for).await?;
        for item in page.items {
            if scope.covers(&item.id) {
                listed.insert(item.id, item.version);
            }
        }
        match page.next {
            Some(next) => at = Some(next),
            None => break,
        }
    }
    report.listed = listed.len() as u64;
    // 2. The sink's rows of this type, in key order.
    let mut drifted: Vec<EntityKey> = Vec::new();
    let mut orphaned: HashSet<String> = HashSet::new();
    let mut after = EntityKey::new(entity_type, "");
    'pages: loop {
        let page = held
            .page(Some(&after), opts.page_size)
            .await
            .map_err(|e| anyhow::anyhow!("reading the sink's versions: {e}"))?;
        let Some(last) = page.last() else { break };
        after = last.key.clone();
        let full = page.len() >= opts.page_size;
        for row in page {
            if row.key.entity_type() != entity_type {
                break 'pages;
            }
            if !scope.covers(row.key.id()) {
                continue;
            }
            report.held += 1;
            match listed.remove(row.key.id()) {
                Some(_) if row.deleted => {
                    report.found("missing", &row.key, opts.sample);
                    drifted.push(row.key);
                }
                Some(Some(v))
                    if row
                        .version
                        .is_some_and(|h| h.compare(&v) == Some(std::cmp::Ordering::Less)) =>
                {
                    report.found("stale", &row.key, opts.sample);
                    drifted.push(row.key);
                }
                Some(_) => {}
                None if row.deleted => {}
                None => {
                    report.found("orphaned", &row.key, opts.sample);
                    orphaned.insert(row.key.id().to_owned());
                    drifted.push(row.key);
                }
            }
        }
        if !full {
            break;
        }
    }
    for id in listed.into_keys() {
        let key = EntityKey::new(entity_type, id.as_str());
        report.found("missing", &key, opts.sample);
        drifted.push(key);
    }
    // 3. Repair through the engine: missing and stale keys first, so the gone guard has seen
    //    found outcomes before the suspected orphans' (likely gone) ones; an orphan's delete the
    //    guard keeps holding is reported, not waited for without end.
    if let Some(handle) = handle {
        let (orphans, others): (Vec<EntityKey>, Vec<EntityKey>) =
            drifted.into_iter().partition(|k| orphaned.contains(k.id()));
        for chunk in others.chunks(opts.repair_batch) {
            if signals.stopped_by().is_some() {
                break;
            }
            report.repaired(handle.refresh(chunk.to_vec()).await);
        }
        for chunk in orphans.chunks(opts.repair_batch) {
            if signals.stopped_by().is_some() {
                break;
            }
            match tokio::time::timeout(opts.orphan_wait, handle.refresh(chunk.to_vec())).await {
                Ok(outcomes) => report.repaired(outcomes),
                Err(_) => {
                    report.failed += chunk.len() as u64;
                    report.deletes_held += chunk.len() as u64;
                    tracing::warn!(
                        keys = chunk.len(),
                        "suspected orphans not settled within reconcile.orphan_wait: the gone guard holds their deletes"
                    );
                }
            }
        }
    }
    tracing::info!(
        entity_type,
        listed = report.listed,
        held = report.held,
        missing = report.drift.get("missing").copied().unwrap_or(0),
        stale = report.drift.get("stale").copied().unwrap_or(0),
        orphaned = report.drift.get("orphaned").copied().unwrap_or(0),
        repaired = report.repaired,
        "reconcile finished"
    );
    Ok(report)
}

fn listed_types(http: &HttpFetcher, only: Option<&str>) -> Vec<String> {
    let mut types: Vec<String> = http
        .entity_types()
        .filter(|t| http.listing(t).is_some() && only.is_none_or(|o| o == *t))
        .map(str::to_owned)
        .collect();
    types.sort();
    types
}

/// `refetch reconcile`.
pub async fn command(args: &ReconcileArgs, signals: Signals) -> anyhow::Result<ExitCode> {
    let loaded = match crate::config::load_for_command(&args.config.config) {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    let cfg = loaded.config;
    logging::init(&cfg.log.level, cfg.log.format);
    let http = http_fetcher(&cfg)?;
    let types = listed_types(&http, args.entity_type.as_deref());
    if types.is_empty() {
        eprintln!(
            "error: no source{} has a listing; add [fetcher.sources.<type>.listing] (docs/backfill.md)",
            args.entity_type
                .as_deref()
                .map(|t| format!(" of type `{t}`"))
                .unwrap_or_default()
        );
        return Ok(ExitCode::from(2));
    }
    let Some(held) = HeldVersions::open(&cfg.sink).await? else {
        eprintln!(
            "error: reconcile is not supported for the {} sink: it cannot report the versions it holds (use postgres or sqlite)",
            cfg.sink.kind()
        );
        return Ok(ExitCode::from(2));
    };
    let refresher = if args.dry_run {
        None
    } else {
        Some(Refresher::start(&cfg, observed(&http), held.sink()).await?)
    };
    let started = Instant::now();
    let mut failed = 0;
    let mut result = Ok(());
    for t in &types {
        if signals.stopped_by().is_some() {
            break;
        }
        match reconcile_type(
            &cfg,
            &http,
            &held,
            refresher.as_ref().map(Refresher::handle),
            t,
            &Scope::All,
            &signals,
        )
        .await
        {
            Ok(report) => {
                report.print(t);
                failed += report.failed;
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    if let Some(r) = refresher {
        r.close().await?;
    }
    result?;
    if let Some(signal) = signals.stopped_by() {
        println!(
            "reconcile interrupted by {signal} after {:.1}s: the repairs in flight finished; run \
             it again for the rest",
            started.elapsed().as_secs_f64()
        );
        return Ok(ExitCode::from(crate::exit::INTERRUPTED));
    }
    println!(
        "reconcile done in {:.1}s{}",
        started.elapsed().as_secs_f64(),
        if args.dry_run {
            " (dry run: nothing repaired)"
        } else {
            ""
        }
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The partition count of `topic`, from the broker's metadata.
fn partition_count(cfg: &Config, topic: &str) -> anyhow::Result<u32> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let mut client = rdkafka::ClientConfig::new();
    client.set("bootstrap.servers", &cfg.kafka.brokers);
    for (k, v) in &cfg.kafka.properties {
        client.set(k, v);
    }
    let consumer: BaseConsumer = client.create().context("cannot create a metadata client")?;
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .context("cannot read the topic's metadata")?;
    let n = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map_or(0, |t| t.partitions().len());
    anyhow::ensure!(n > 0, "topic {topic} has no partitions");
    Ok(n as u32)
}

/// The scheduled reconcile of `refetch run`: every `[reconcile] interval`, reconcile the keys of
/// the partitions this instance owns through the running pipeline's single flight. Runs until the
/// pipeline stops; a failed round is logged and retried at the next interval.
pub async fn schedule(cfg: Config, handle: PipelineHandle) {
    let Some(interval) = cfg.reconcile.interval else {
        return;
    };
    let topic = match cfg
        .reconcile
        .topic
        .clone()
        .or_else(|| cfg.topics.first().map(|t| t.name.clone()))
    {
        Some(t) => t,
        None => return,
    };
    let http = match http_fetcher(&cfg) {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(error = %e, "scheduled reconcile disabled");
            return;
        }
    };
    let held = match HeldVersions::open(&cfg.sink).await {
        Ok(Some(h)) => h,
        Ok(None) => {
            tracing::warn!(
                sink = cfg.sink.kind(),
                "scheduled reconcile is not supported for this sink; disabled"
            );
            return;
        }
        Err(e) => {
            tracing::error!(error = %e, "scheduled reconcile disabled");
            return;
        }
    };
    let types = listed_types(&http, None);
    loop {
        tokio::time::sleep(interval).await;
        let Some(status) = handle.status().await else {
            return;
        };
        let owned: HashSet<u32> = status
            .engine
            .partitions
            .iter()
            .filter(|p| p.topic == topic)
            .filter_map(|p| u32::try_from(p.partition).ok())
            .collect();
        if owned.is_empty() {
            tracing::info!("scheduled reconcile skipped: no partition owned");
            continue;
        }
        let partitions = {
            let cfg = cfg.clone();
            let topic = topic.clone();
            match tokio::task::spawn_blocking(move || partition_count(&cfg, &topic)).await {
                Ok(Ok(n)) => n,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "scheduled reconcile skipped");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "scheduled reconcile skipped");
                    continue;
                }
            }
        };
        let scope = Scope::Partitions { partitions, owned };
        for t in &types {
            let none = Signals::none();
            if let Err(e) =
                reconcile_type(&cfg, &http, &held, Some(&handle), t, &scope, &none).await
            {
                tracing::warn!(entity_type = %t, error = %e, "scheduled reconcile failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafka() {
        // Values from the Java client's own test (`UtilsTest.testMurmur2`).
        let cases: [(&[u8], i32); 5] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (
                b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
                -58_897_971,
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(
                murmur2(input),
                expected,
                "{}",
                String::from_utf8_lossy(input)
            );
        }
        let p = kafka_partition(b"foobar", 3);
        assert_eq!(p, ((-790_332_482_i32) as u32 & 0x7fff_ffff) % 3);
    }

    /// The partition reconcile computes is where a murmur2-partitioning producer (the Java
    /// client's default; librdkafka with `partitioner=murmur2_random`) puts a keyed record.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "needs a real broker: run scripts/test"]
    async fn partitions_match_a_murmur2_producer_on_a_real_broker() {
        use rdkafka::producer::{FutureProducer, FutureRecord};
        use refetch_testkit::kafka;
        let brokers = kafka::brokers().unwrap();
        let topic = refetch_testkit::names::unique("reconcile_partitioner");
        kafka::create_topic(&brokers, &topic, 7).await.unwrap();
        let producer: FutureProducer = kafka::client_config(&brokers)
            .set("partitioner", "murmur2_random")
            .create()
            .unwrap();
        let ids: Vec<String> = (0..200)
            .map(|i| format!("customer-{i}"))
            .chain(["", "ü", "a/b", "12345678901234567890"].map(String::from))
            .filter(|id| !id.is_empty())
            .collect();
        for id in &ids {
            producer
                .send(
                    FutureRecord::<str, str>::to(&topic).key(id).payload("{}"),
                    Duration::from_secs(10),
                )
                .await
                .map_err(|(e, _)| e)
                .unwrap();
        }
        let records = kafka::read_all(&brokers, &topic, false, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(records.len(), ids.len());
        let mut used = HashSet::new();
        for r in records {
            let key = r.key.unwrap();
            used.insert(r.partition);
            assert_eq!(
                kafka_partition(&key, 7) as i32,
                r.partition,
                "{}",
                String::from_utf8_lossy(&key)
            );
        }
        assert!(used.len() > 3, "keys spread over the partitions: {used:?}");
    }
}
