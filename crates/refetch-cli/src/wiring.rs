//! Wiring configuration to concrete parts: the HTTP fetcher, the sink, and pipelines.
//!
//! This is the only place that knows both the configuration and the concrete fetcher and sink
//! crates (the layering of the design notes). Three kinds of pipeline are built here:
//! - the consuming pipeline of `refetch run` (Kafka consumer group, dead-letter topic);
//! - a *refresh* pipeline for `refetch fetch` and `refetch dlq redrive`: no consumer group at
//!   all (an idle in-memory consumer), the real fetcher, sink and dead-letter topic, fed only
//!   through [`refetch::PipelineHandle::refresh`], so redriven keys go through the engine's
//!   single flight, versions and validators exactly like notifications, without joining the
//!   group (which would take partitions away from running processes).

use std::sync::Arc;

use anyhow::Context;
use refetch::kafka::DeadLetterProducer;
use refetch::{EntityKey, Fetcher, MemoryConsumer, Pipeline, RefreshOutcome, Sink};
use refetch_http::{HttpFetcher, HttpFetcherConfig};

use crate::config::Config;
use crate::observe::{FetchStats, ObservedFetcher};

/// The fetcher every pipeline of the binary uses.
pub type AppFetcher = ObservedFetcher<Arc<HttpFetcher>>;

/// A pipeline of the binary.
pub type AppPipeline = Pipeline<AppFetcher, Arc<dyn Sink>>;

/// Build the HTTP fetcher (resolving its `${VAR}`s) with latency and breaker observation.
pub fn build_fetcher(cfg: &HttpFetcherConfig) -> anyhow::Result<(AppFetcher, Arc<FetchStats>)> {
    let fetcher = Arc::new(
        HttpFetcher::from_config(cfg.clone()).context("the [fetcher] configuration is invalid")?,
    );
    let probe = fetcher.clone();
    let stats = Arc::new(FetchStats::new(move || {
        let mut types: Vec<String> = probe.entity_types().map(str::to_owned).collect();
        types.sort();
        types
            .into_iter()
            .map(|t| {
                let open = probe.breaker_open(&t);
                (t, open)
            })
            .collect()
    }));
    Ok((ObservedFetcher::new(fetcher, stats.clone()), stats))
}

/// Build (connect and check) the sink.
pub async fn build_sink(cfg: &refetch_sinks::SinkConfig) -> anyhow::Result<Arc<dyn Sink>> {
    let sink = refetch_sinks::build_sink(cfg)
        .await
        .with_context(|| format!("cannot start the {} sink", cfg.kind()))?;
    // Batches, latency and errors for the status page; the `sink_batch` span.
    Ok(Arc::new(crate::observe::ObservedSink::new(
        sink,
        cfg.kind(),
    )))
}

/// The consuming pipeline of `refetch run`.
pub fn consuming_pipeline(
    cfg: &Config,
    fetcher: AppFetcher,
    sink: Arc<dyn Sink>,
) -> anyhow::Result<AppPipeline> {
    let mut b = Pipeline::builder::<AppFetcher, Arc<dyn Sink>>()
        .fetcher(fetcher)
        .sink(sink)
        .kafka(cfg.kafka_config())
        .engine(cfg.engine.to_engine());
    for (topic, decoder) in cfg.decoders() {
        b = b.topic_decoder(topic, ArcDecoder(decoder));
    }
    b.build().context("cannot build the pipeline")
}

/// Adapts a shared decoder to the builder's `impl NotificationDecoder`.
struct ArcDecoder(Arc<dyn refetch::NotificationDecoder>);

impl refetch::NotificationDecoder for ArcDecoder {
    fn decode(
        &self,
        record: &refetch::RecordView<'_>,
    ) -> Result<refetch::Decoded, refetch::DecodeError> {
        self.0.decode(record)
    }
}

/// Refresh `keys` now through a refresh pipeline (see the module docs) and return each outcome.
pub async fn refresh(
    cfg: &Config,
    keys: Vec<EntityKey>,
) -> anyhow::Result<Vec<(EntityKey, RefreshOutcome)>> {
    let (fetcher, _stats) = build_fetcher(&cfg.fetcher)?;
    for k in &keys {
        if !fetcher.handles(k.entity_type()) {
            anyhow::bail!(
                "no source serves entity type `{}` (configured: {})",
                k.entity_type(),
                cfg.fetcher
                    .sources
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let sink = build_sink(&cfg.sink).await?;
    let kafka = cfg.kafka_config();
    let dead_letters = DeadLetterProducer::new(&kafka).context("cannot create the producer")?;
    dead_letters
        .check(std::time::Duration::from_secs(10))
        .await
        .context("the dead-letter topic is not usable")?;
    // No topics: the in-memory consumer assigns nothing and delivers nothing.
    let (channels, control) = MemoryConsumer::new().start();
    let pipeline = Pipeline::builder::<AppFetcher, Arc<dyn Sink>>()
        .fetcher(fetcher)
        .sink(sink)
        .consumer(channels)
        .dead_letters(dead_letters)
        .engine(cfg.engine.to_engine())
        .build()
        .context("cannot build the refresh pipeline")?;
    let handle = pipeline.handle();
    let run = tokio::spawn(pipeline.run(std::future::pending::<()>()));
    let outcomes = handle.refresh(keys).await;
    handle.shutdown();
    let report = run.await.context("the refresh pipeline panicked")??;
    tracing::debug!(drained = report.drained, "refresh pipeline stopped");
    drop(control);
    Ok(outcomes)
}

/// Parse `TYPE:ID` (the id is everything after the first `:`).
pub fn parse_key(s: &str) -> anyhow::Result<EntityKey> {
    match s.split_once(':') {
        Some((t, id)) if !t.is_empty() && !id.is_empty() => Ok(EntityKey::new(t, id)),
        _ => anyhow::bail!("`{s}` is not TYPE:ID (for example customer:42)"),
    }
}
