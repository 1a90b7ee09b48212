//! `refetch run` and `refetch fetch`.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::Context;

use crate::cli::{ConfigArg, FetchArgs};
use crate::config::Loaded;
use crate::{logging, ops, signals, wiring};

/// Load the configuration, printing errors the way every subcommand does. `Err` carries the exit
/// code (2: invalid configuration).
pub fn load_config(arg: &ConfigArg) -> Result<Loaded, ExitCode> {
    match crate::config::load(&arg.config) {
        Ok(l) => Ok(l),
        Err(e) => {
            eprintln!("error: invalid configuration\n{e}");
            Err(ExitCode::from(2))
        }
    }
}

/// `refetch run`: consume until SIGTERM/SIGINT, then drain and commit.
pub async fn run(arg: &ConfigArg) -> anyhow::Result<ExitCode> {
    let loaded = match load_config(arg) {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    let cfg = loaded.config;
    logging::init_with_traces(&cfg.log.level, cfg.log.format, &cfg.traces)?;
    for w in &loaded.warnings {
        tracing::warn!("{w}");
    }
    let started = Instant::now();
    let prometheus = ops::install_recorder();
    let (fetcher, stats) = wiring::build_fetcher(&cfg.fetcher)?;
    let sink = wiring::build_sink(&cfg.sink).await?;
    let pipeline = wiring::consuming_pipeline(&cfg, fetcher, sink)?;
    let handle = pipeline.handle();
    let _ops = if cfg.ops.enabled {
        let server = ops::serve(
            cfg.ops.listen,
            ops::OpsState {
                handle: handle.clone(),
                prometheus,
                fetch: stats,
                title: cfg.kafka.group_id.clone(),
                started,
                observed: crate::observe::Observed::from_config(&cfg),
            },
        )
        .await
        .with_context(|| format!("cannot listen on {} ([ops] listen)", cfg.ops.listen))?;
        tracing::info!(
            addr = %server.addr,
            "operations endpoint on http://{}/ (/metrics, /healthz, /readyz, /status.json)",
            server.addr
        );
        Some(server)
    } else {
        None
    };
    tracing::info!(
        group = %cfg.kafka.group_id,
        topics = ?cfg.kafka_config().topics,
        sink = cfg.sink.kind(),
        "refetch running"
    );
    // Off unless `[reconcile] interval` is set; stops with the pipeline.
    let reconcile = cfg
        .reconcile
        .interval
        .map(|_| tokio::spawn(crate::reconcile::schedule(cfg.clone(), handle.clone())));
    let report = pipeline
        .run(signals::shutdown_signal())
        .await
        .context("the pipeline failed")?;
    if let Some(r) = reconcile {
        r.abort();
    }
    let c = &report.status.counters;
    tracing::info!(
        drained = report.drained,
        notifications = c.notifications,
        fetches = c.fetches,
        writes = c.writes,
        dead_letters = c.dead_letters,
        commits = c.commits,
        "refetch stopped"
    );
    Ok(ExitCode::SUCCESS)
}

/// `refetch fetch --key TYPE:ID...`.
pub async fn fetch(args: &FetchArgs) -> anyhow::Result<ExitCode> {
    let loaded = match load_config(&args.config) {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    let cfg = loaded.config;
    logging::init(&cfg.log.level, cfg.log.format);
    let mut keys = Vec::new();
    for k in &args.keys {
        match wiring::parse_key(k) {
            Ok(key) => keys.push(key),
            Err(e) => {
                eprintln!("error: {e}");
                return Ok(ExitCode::from(2));
            }
        }
    }
    let outcomes = wiring::refresh(&cfg, keys).await?;
    let mut failed = 0;
    for (key, outcome) in &outcomes {
        match outcome {
            refetch::RefreshOutcome::Done => println!("{key}\tok"),
            refetch::RefreshOutcome::Failed(why) => {
                failed += 1;
                println!("{key}\tFAILED: {why}");
            }
        }
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
