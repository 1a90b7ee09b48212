//! What the one-shot subcommands share: the HTTP fetcher built from the configuration, listing
//! pages with retries, and the *refresh pipeline* ([`Refresher`]).
//!
//! A refresh pipeline has no consumer group at all (an idle in-memory consumer): the real
//! fetcher, sink and dead-letter topic, fed only through [`PipelineHandle::refresh`], so keys
//! refreshed by `refetch fetch`, `dlq redrive`, `backfill` and `reconcile` go through the
//! engine's single flight, versions, validators, gone guard and dead letters exactly like
//! notifications, without joining the group (which would take partitions away from running
//! processes).
//!
//! `backfill`, `reconcile`, `fetch` and `dlq redrive` use this module; it uses none of them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use refetch::kafka::DeadLetterProducer;
use refetch::{
    EntityKey, FetchError, Fetcher, MemoryConsumer, Pipeline, PipelineHandle, RefreshOutcome, Sink,
};
use refetch_http::{HttpFetcher, ListPage, PageToken};

use crate::config::Config;
use crate::observe::{FetchStats, ObservedFetcher};
use crate::signals::Signals;
use crate::wiring::{AppFetcher, AppPipeline};

/// The HTTP fetcher, shared by listings and pipelines so both draw on one set of per-source
/// limits (rate, concurrency, breaker).
pub fn http_fetcher(cfg: &Config) -> anyhow::Result<Arc<HttpFetcher>> {
    Ok(Arc::new(
        HttpFetcher::from_config(cfg.fetcher.clone())
            .context("the [fetcher] configuration is invalid")?,
    ))
}

/// The pipelines' fetcher wrapping the shared `http` (same limits as listings).
pub fn observed(http: &Arc<HttpFetcher>) -> AppFetcher {
    ObservedFetcher::new(http.clone(), Arc::new(FetchStats::new(Vec::new)))
}

/// A pipeline without a consumer group, fed only through [`PipelineHandle::refresh`]: keys go
/// through the engine's single flight, versions, gone guard and dead letters without joining
/// the group.
pub struct Refresher {
    handle: PipelineHandle,
    run: tokio::task::JoinHandle<Result<refetch::RunReport, refetch::PipelineError>>,
    _control: refetch::consumer::MemoryControl,
}

impl Refresher {
    /// Build and start the refresh pipeline (checks that the dead-letter topic is writable).
    pub async fn start(
        cfg: &Config,
        fetcher: AppFetcher,
        sink: Arc<dyn Sink>,
    ) -> anyhow::Result<Refresher> {
        let kafka = cfg.kafka_config();
        let dead_letters = DeadLetterProducer::new(&kafka).context("cannot create the producer")?;
        dead_letters
            .check(Duration::from_secs(10))
            .await
            .context("the dead-letter topic is not usable")?;
        let (channels, control) = MemoryConsumer::new().start();
        let pipeline: AppPipeline = Pipeline::builder::<AppFetcher, Arc<dyn Sink>>()
            .fetcher(fetcher)
            .sink(sink)
            .consumer(channels)
            .dead_letters(dead_letters)
            .engine(cfg.engine.to_engine())
            .build()
            .context("cannot build the refresh pipeline")?;
        let handle = pipeline.handle();
        let run = tokio::spawn(pipeline.run(std::future::pending::<()>()));
        Ok(Refresher {
            handle,
            run,
            _control: control,
        })
    }

    /// The handle keys are refreshed through.
    pub fn handle(&self) -> &PipelineHandle {
        &self.handle
    }

    /// Whether the pipeline stopped on its own (its refreshes then fail without a fetch).
    pub fn stopped(&self) -> bool {
        self.run.is_finished()
    }

    /// Stop the pipeline after its work is done.
    pub async fn close(self) -> anyhow::Result<()> {
        self.handle.shutdown();
        let report = self.run.await.context("the refresh pipeline panicked")??;
        tracing::debug!(drained = report.drained, "refresh pipeline stopped");
        Ok(())
    }
}

/// Load one page with retries while the source fails transiently, for at most `retry_for`.
pub async fn list_with_retry(
    fetcher: &HttpFetcher,
    entity_type: &str,
    at: Option<&PageToken>,
    retry_for: Duration,
) -> anyhow::Result<ListPage> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(100);
    loop {
        match fetcher.list_page(entity_type, at).await {
            Ok(page) => return Ok(page),
            Err(FetchError::Permanent { message, .. }) => {
                anyhow::bail!("listing {entity_type} at {at:?}: {message}")
            }
            Err(e) => {
                let hint = match &e {
                    FetchError::Transient { retry_after, .. }
                    | FetchError::NotAttempted { retry_after, .. } => *retry_after,
                    FetchError::Permanent { .. } => None,
                };
                if started.elapsed() >= retry_for {
                    anyhow::bail!(
                        "listing {entity_type} at {at:?} kept failing for {retry_for:?}: {e}"
                    );
                }
                let wait = hint.unwrap_or(pause).min(Duration::from_secs(30));
                tracing::warn!(entity_type, error = %e, wait_ms = wait.as_millis() as u64, "listing page failed; retrying");
                tokio::time::sleep(wait).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Refresh `keys` now through a refresh pipeline and return each outcome (`refetch fetch`,
/// `refetch dlq redrive`). A stop signal shuts the pipeline down gracefully: what is in flight
/// finishes (within `engine.shutdown_deadline`), and keys it did not get to have no outcome.
pub async fn refresh_keys(
    cfg: &Config,
    keys: Vec<EntityKey>,
    signals: &Signals,
) -> anyhow::Result<Vec<(EntityKey, RefreshOutcome)>> {
    let (fetcher, _stats) = crate::wiring::build_fetcher(&cfg.fetcher)?;
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
    let sink = crate::wiring::build_sink(&cfg.sink).await?;
    if signals.stopped_by().is_some() {
        return Ok(Vec::new());
    }
    let refresher = Refresher::start(cfg, fetcher, sink).await?;
    let handle = refresher.handle().clone();
    let work = handle.refresh(keys);
    tokio::pin!(work);
    let outcomes = tokio::select! {
        outcomes = &mut work => outcomes,
        () = signals.stopped() => {
            // The pipeline finishes what is in flight; the reply comes back with what was done
            // (or is dropped when the pipeline stopped first).
            refresher.handle().shutdown();
            work.await
        }
    };
    refresher.close().await?;
    Ok(outcomes
        .into_iter()
        .filter(|(_, o)| !matches!(o, RefreshOutcome::Failed(why) if why == "not finished"))
        .collect())
}
