//! Wiring configuration to concrete parts: the HTTP fetcher, the sink, and pipelines.
//!
//! This is the only place that knows both the configuration and the concrete fetcher and sink
//! crates (the layering described in docs/architecture.md). It builds the consuming pipeline of `refetch run`
//! (Kafka consumer group, dead-letter topic); the refresh pipeline of the one-shot commands is in
//! [`crate::refresh`].

use std::sync::Arc;

use anyhow::Context;
use refetch::{EntityKey, Pipeline, Sink};
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

/// Build (connect and check) the sink of a one-shot command (`backfill`, `reconcile`,
/// `refresh`, `validate`): such writes cover no input offsets, so a sink configured with
/// `delivery = "exactly_once"` writes at-least-once here (a transactional Kafka producer would
/// otherwise fence the running instance that shares its `transactional.id`).
pub async fn build_sink(cfg: &refetch_sinks::SinkConfig) -> anyhow::Result<Arc<dyn Sink>> {
    let mut cfg = cfg.clone();
    match &mut cfg {
        refetch_sinks::SinkConfig::Kafka(k) => k.delivery = refetch::Delivery::AtLeastOnce,
        refetch_sinks::SinkConfig::Postgres(p) => p.delivery = refetch::Delivery::AtLeastOnce,
        _ => {}
    }
    build_consuming_sink(&cfg).await
}

/// Build (connect and check) the sink of `refetch run`, with the configured delivery.
pub async fn build_consuming_sink(
    cfg: &refetch_sinks::SinkConfig,
) -> anyhow::Result<Arc<dyn Sink>> {
    let sink = match refetch_sinks::build_sink(cfg).await {
        Ok(sink) => sink,
        // A setting only the sink checks (a table name, a template): exit 2 like the file's.
        Err(e @ refetch_sinks::SinkBuildError::Config { .. }) => {
            return Err(crate::exit::InvalidConfiguration(format!("[sink]: {e}")).into());
        }
        Err(e) => {
            return Err(e).with_context(|| format!("cannot start the {} sink", cfg.kind()));
        }
    };
    // Batches, latency and errors for the status page; the `sink_batch` span.
    Ok(Arc::new(crate::observe::ObservedSink::new(
        sink,
        cfg.kind(),
    )))
}

/// The consuming pipeline of `refetch run`; `dead_letters`, when given, is a producer whose topic
/// was checked already (otherwise the pipeline creates and checks one when it starts).
pub fn consuming_pipeline(
    cfg: &Config,
    fetcher: AppFetcher,
    sink: Arc<dyn Sink>,
    dead_letters: Option<refetch::kafka::DeadLetterProducer>,
) -> anyhow::Result<AppPipeline> {
    let mut b = Pipeline::builder::<AppFetcher, Arc<dyn Sink>>()
        .fetcher(fetcher)
        .sink(sink)
        .kafka(cfg.kafka_config())
        .engine(cfg.engine.to_engine());
    if let Some(d) = dead_letters {
        b = b.dead_letters(d);
    }
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

/// Parse `TYPE:ID` (the id is everything after the first `:`).
pub fn parse_key(s: &str) -> anyhow::Result<EntityKey> {
    match s.split_once(':') {
        Some((t, id)) if !t.is_empty() && !id.is_empty() => Ok(EntityKey::new(t, id)),
        _ => anyhow::bail!("`{s}` is not TYPE:ID (for example customer:42)"),
    }
}
