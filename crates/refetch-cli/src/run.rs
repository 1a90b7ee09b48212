//! `refetch run`: consume until SIGTERM/SIGINT; on SIGHUP, reload the configuration.
//!
//! The process runs one pipeline at a time (a *generation*). A reload that only changes live
//! settings keeps the generation running; one that changes anything else builds the next
//! generation's parts first (fetcher, sink, dead-letter producer, pipeline: a failure there keeps
//! the running generation), then drains and commits the running one, and starts the next in the
//! same process. See [`crate::reload`] for what is live.
//!
//! Start-up order: everything that can fail (the fetcher, the sink, the dead-letter topic) is
//! checked before "refetch running" is logged.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use refetch::RunReport;
use refetch::kafka::DeadLetterProducer;
use tokio::sync::mpsc;

use crate::cli::ConfigArg;
use crate::config::Config;
use crate::observe::FetchStats;
use crate::reload::{self, Apply};
use crate::signals::Signals;
use crate::wiring::AppPipeline;
use crate::{logging, ops, wiring};

/// How long start-up waits for the broker's answer about the dead-letter topic.
const DEAD_LETTER_CHECK: Duration = Duration::from_secs(10);

/// `refetch run`.
pub async fn run(arg: &ConfigArg, signals: Signals) -> anyhow::Result<ExitCode> {
    let path = arg.config.clone();
    let loaded = match crate::config::load_for_command(&path) {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    let mut cfg = loaded.config;
    logging::init_with_traces(&cfg.log.level, cfg.log.format, &cfg.traces)?;
    for w in &loaded.warnings {
        tracing::warn!("{w}");
    }
    let started = Instant::now();
    let prometheus = ops::install_recorder();
    reload::register_metrics();
    // Without reload requests (no handler), an empty receiver whose sender is dropped.
    let mut reloads = signals
        .reloads()
        .unwrap_or_else(|| mpsc::unbounded_channel().1);
    let mut parts = Parts::build(&cfg).await?;
    let mut generation = 1u64;
    loop {
        let handle = parts.pipeline.handle();
        let _ops = serve_ops(&cfg, &parts, prometheus.clone(), started).await?;

        tracing::info!(
            group = %cfg.kafka.group_id,
            topics = ?cfg.kafka_config().topics,
            sink = cfg.sink.kind(),
            generation,
            "refetch running"
        );
        // Off unless `[reconcile] interval` is set; stops with the pipeline.
        let reconcile = cfg
            .reconcile
            .interval
            .map(|_| tokio::spawn(crate::reconcile::schedule(cfg.clone(), handle.clone())));
        let next = drive(parts, &cfg, &path, &signals, &mut reloads).await;
        if let Some(r) = reconcile {
            r.abort();
        }
        match next? {
            Next::Stop(report) => {
                log_stopped(&report, "refetch stopped");
                return Ok(ExitCode::SUCCESS);
            }
            Next::Rebuild {
                config,
                parts: new,
                report,
            } => {
                log_stopped(
                    &report,
                    "pipeline drained and committed; starting it again with the new configuration",
                );
                cfg = *config;
                parts = *new;
                generation += 1;
            }
        }
    }
}

fn log_stopped(report: &RunReport, message: &'static str) {
    let c = &report.status.counters;
    tracing::info!(
        drained = report.drained,
        notifications = c.notifications,
        fetches = c.fetches,
        writes = c.writes,
        dead_letters = c.dead_letters,
        commits = c.commits,
        "{message}"
    );
}

/// What one generation runs with.
pub struct Parts {
    pipeline: AppPipeline,
    stats: Arc<FetchStats>,
    /// The HTTP fetcher, for settings that change live (rate limits, concurrency, breakers).
    http: Arc<refetch_http::HttpFetcher>,
}

impl Parts {
    /// Build the fetcher, the sink and the pipeline, and check the dead-letter topic.
    pub async fn build(cfg: &Config) -> anyhow::Result<Parts> {
        let (fetcher, stats) = wiring::build_fetcher(&cfg.fetcher)?;
        let http = fetcher.inner().clone();
        let sink = wiring::build_consuming_sink(&cfg.sink).await?;
        let kafka = cfg.kafka_config();
        let dead_letters =
            DeadLetterProducer::new(&kafka).context("cannot create the dead-letter producer")?;
        // The brokers first: when they cannot be reached, say so rather than blaming the topic.
        dead_letters
            .probe_brokers(DEAD_LETTER_CHECK)
            .await
            .context("cannot reach the Kafka brokers ([kafka] brokers)")?;
        dead_letters
            .check(DEAD_LETTER_CHECK)
            .await
            .with_context(|| {
                format!(
                    "the dead-letter topic `{}` is not usable (create it, or set [kafka] \
                     dead_letter_topic to a topic that exists)",
                    kafka.dead_letter_topic
                )
            })?;
        let pipeline = wiring::consuming_pipeline(cfg, fetcher, sink, Some(dead_letters))?;
        Ok(Parts {
            pipeline,
            stats,
            http,
        })
    }
}

/// Serve the operations endpoint for this generation's pipeline.
async fn serve_ops(
    cfg: &Config,
    parts: &Parts,
    prometheus: Option<PrometheusHandle>,
    started: Instant,
) -> anyhow::Result<Option<ops::OpsServer>> {
    if !cfg.ops.enabled {
        return Ok(None);
    }
    let state = ops::OpsState {
        handle: parts.pipeline.handle(),
        prometheus,
        fetch: parts.stats.clone(),
        title: cfg.kafka.group_id.clone(),
        started,
        observed: crate::observe::Observed::from_config(cfg),
    };
    // After a rebuild the previous generation's listener is closing: retry briefly.
    let mut attempt = 0;
    let server = loop {
        match ops::serve(cfg.ops.listen, state.clone()).await {
            Ok(s) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && attempt < 40 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("cannot listen on {} ([ops] listen)", cfg.ops.listen)
                });
            }
        }
    };
    tracing::info!(
        addr = %server.addr,
        "operations endpoint on http://{}/ (/metrics, /healthz, /readyz, /status.json)",
        server.addr
    );
    Ok(Some(server))
}

/// How a generation ended.
enum Next {
    /// A stop signal: the process exits.
    Stop(RunReport),
    /// A reload: the next generation is ready.
    Rebuild {
        config: Box<Config>,
        parts: Box<Parts>,
        report: RunReport,
    },
}

/// Run one generation, handling reload requests while it runs.
async fn drive(
    parts: Parts,
    cfg: &Config,
    path: &Path,
    signals: &Signals,
    reloads: &mut mpsc::UnboundedReceiver<()>,
) -> anyhow::Result<Next> {
    let Parts { pipeline, http, .. } = parts;
    let handle = pipeline.handle();
    // A task of its own: a reload (which builds the next parts) never holds the pipeline up.
    let mut run = tokio::spawn(pipeline.run(signals.stopped()));
    let mut current = cfg.clone();
    let mut next: Option<(Config, Parts)> = None;
    let mut reloads_open = true;
    loop {
        tokio::select! {
            result = &mut run => {
                let report = result
                    .context("the pipeline panicked")?
                    .context("the pipeline failed")?;
                return Ok(match next {
                    Some((config, parts)) if signals.stopped_by().is_none() => Next::Rebuild {
                        config: Box::new(config),
                        parts: Box::new(parts),
                        report,
                    },
                    _ => Next::Stop(report),
                });
            }
            got = reloads.recv(), if reloads_open && next.is_none() => {
                if got.is_none() {
                    reloads_open = false;
                    continue;
                }
                match reload_once(path, &current, &handle, &http).await {
                    Reloaded::Kept => {}
                    Reloaded::Live(config) => current = *config,
                    Reloaded::Rebuild(config, parts) => {
                        next = Some((*config, *parts));
                        handle.shutdown();
                    }
                }
            }
        }
    }
}

/// What a reload decided.
enum Reloaded {
    /// The running configuration stays (invalid file, nothing changed, or a failed rebuild).
    Kept,
    /// Only live changes: applied; this is the configuration now.
    Live(Box<Config>),
    /// The pipeline is rebuilt with this configuration and these parts.
    Rebuild(Box<Config>, Box<Parts>),
}

/// Read `path` again and apply it (see [`crate::reload`]).
async fn reload_once(
    path: &Path,
    current: &Config,
    handle: &refetch::PipelineHandle,
    http: &refetch_http::HttpFetcher,
) -> Reloaded {
    let loaded = match crate::config::load(path) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(
                file = %path.display(),
                problems = e.len(),
                "configuration reload refused, the pipeline keeps running with the configuration \
                 it has:\n{e}"
            );
            reload::count("invalid");
            return Reloaded::Kept;
        }
    };
    for w in &loaded.warnings {
        tracing::warn!("{w}");
    }
    let new = loaded.config;
    let diff = reload::diff(current, &new);
    if diff.is_empty() {
        tracing::info!(file = %path.display(), "configuration reloaded: nothing changed");
        reload::count("unchanged");
        return Reloaded::Kept;
    }
    let live = diff.paths(Apply::Live);
    let mut live_failed = false;
    for key in &live {
        live_failed |= !apply_live(key, &new, handle, http);
    }
    if live_failed {
        // A live step refused the new value after all (a fetcher setting that needs a rebuild):
        // take the rebuild path for everything.
        return rebuild(path, new, live, diff.paths(Apply::Rebuild)).await;
    }
    for key in diff.paths(Apply::ProcessRestart) {
        tracing::warn!(
            key,
            "configuration reloaded: `{key}` changed, which only a restart of the process applies"
        );
    }
    let not_used = diff.paths(Apply::NotUsed);
    if !diff.needs_rebuild() {
        tracing::info!(
            live = ?live,
            not_used_by_run = ?not_used,
            "configuration reloaded: applied live"
        );
        reload::count("applied");
        return Reloaded::Live(Box::new(new));
    }
    rebuild(path, new, live, diff.paths(Apply::Rebuild)).await
}

/// Build the next generation's parts for `new`; keep the running pipeline when that fails.
async fn rebuild(path: &Path, new: Config, live: Vec<&str>, rebuild: Vec<&str>) -> Reloaded {
    let _ = path;
    match Parts::build(&new).await {
        Ok(parts) => {
            tracing::info!(
                live = ?live,
                rebuild = ?rebuild,
                "configuration reloaded: draining, committing and rebuilding the pipeline"
            );
            reload::count("applied");
            Reloaded::Rebuild(Box::new(new), Box::new(parts))
        }
        Err(e) => {
            tracing::error!(
                error = format!("{e:#}"),
                rebuild = ?rebuild,
                "configuration reload failed: the new pipeline cannot be built; the pipeline keeps \
                 running with the configuration it has"
            );
            reload::count("failed");
            Reloaded::Kept
        }
    }
}

/// Apply one live change. Returns `false` when the change must take the rebuild path after all.
fn apply_live(
    key: &str,
    new: &Config,
    handle: &refetch::PipelineHandle,
    http: &refetch_http::HttpFetcher,
) -> bool {
    if key == "log.level" {
        match logging::set_level(&new.log.level) {
            Ok(()) => tracing::debug!(level = %new.log.level, "log level applied"),
            Err(e) => tracing::warn!(error = %e, "log.level not applied"),
        }
        return true;
    }
    if key.starts_with("engine.") {
        return match handle.reconfigure(new.engine.to_engine()) {
            Ok(_) => {
                tracing::debug!(key, "engine setting applied live");
                true
            }
            Err(e) => {
                tracing::warn!(key, error = %e, "engine setting not applied live");
                false
            }
        };
    }
    if key.starts_with("fetcher.") {
        return match http.reconfigure(&new.fetcher) {
            Ok(applied) => {
                tracing::debug!(key, ?applied, "fetcher settings applied live");
                true
            }
            Err(refetch_http::ReconfigureError::NeedsRestart { settings }) => {
                tracing::info!(key, ?settings, "fetcher settings need a rebuild");
                false
            }
            Err(e) => {
                tracing::warn!(key, error = %e, "fetcher settings not applied live");
                false
            }
        };
    }
    tracing::warn!(key, "no live step for this key");
    true
}
