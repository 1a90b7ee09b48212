//! `refetch backfill`: load every listed entity into the sink, resumably.
//!
//! Notifications only carry changes; a new target first needs every entity that already exists.
//! A backfill pages through each entity type's listing (`[fetcher.sources.T.listing]`) and, per
//! page:
//! - writes the items directly when the listing's items are complete states *with a version*
//!   and the sink guards on versions (PostgreSQL, SQLite): the guard keeps a newer state that
//!   `refetch run` may have written meanwhile;
//! - hands every other id to a refresh pipeline ([`crate::refresh::Refresher`]): the engine's single flight,
//!   versions, validators, gone guard and dead letters, exactly like a notification;
//! - then, once the sink acknowledged the page, writes a checkpoint (the next page to load) to a
//!   small state file, atomically (write, `fsync`, rename).
//!
//! After a crash the next run resumes at the checkpoint: only the page that was in flight is
//! loaded again. A finished type starts over on the next run. Progress (with an ETA when the
//! listing reports a total) is drawn on standard error when it is a terminal; a summary is
//! printed at the end.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use refetch::{Change, EntityKey, RefreshOutcome, Sink};
use refetch_http::{HttpFetcher, PageToken};
use serde::{Deserialize, Serialize};

use crate::cli::BackfillArgs;
use crate::config::Config;
use crate::refresh::{Refresher, http_fetcher, list_with_retry, observed};
use crate::signals::Signals;
use crate::{logging, wiring};

/// The checkpoint of one entity type.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TypeState {
    /// The next page to load (`None` with `done = false`: the first).
    pub next: Option<PageToken>,
    /// The listing was loaded to its end.
    pub done: bool,
    /// Pages acknowledged so far.
    pub pages: u64,
    /// Items acknowledged so far.
    pub items: u64,
}

/// The checkpoint file: per entity type, where the backfill stands.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BackfillState {
    /// By entity type.
    pub types: BTreeMap<String, TypeState>,
}

impl BackfillState {
    /// Read the file; a missing file is an empty state.
    pub fn load(path: &Path) -> anyhow::Result<BackfillState> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("the backfill state {} is not valid", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BackfillState::default()),
            Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    }

    /// Replace the file atomically: write a temporary file, `fsync` it, rename it over the old
    /// one, `fsync` the folder.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        use std::io::Write as _;
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(self)?;
        {
            let mut f = std::fs::File::create(&tmp)
                .with_context(|| format!("cannot write {}", tmp.display()))?;
            f.write_all(&text)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot replace {}", path.display()))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
            && let Ok(d) = std::fs::File::open(dir)
        {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

/// Figures of one type's backfill.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TypeSummary {
    /// Pages loaded in this run.
    pub pages: u64,
    /// Items listed in this run.
    pub items: u64,
    /// Items written directly from the listing.
    pub written: u64,
    /// Items refreshed through the engine.
    pub refreshed: u64,
    /// Items that could not be loaded (dead-lettered or refused).
    pub failed: u64,
}

/// Write `changes` until the sink acknowledges them; returns the indices it refused for good.
async fn write_acknowledged(
    sink: &dyn Sink,
    changes: &[Change],
    retry_for: Duration,
) -> anyhow::Result<Vec<usize>> {
    let mut refused = Vec::new();
    let chunk = sink.max_batch().max(1);
    for (n, part) in changes.chunks(chunk).enumerate() {
        let started = Instant::now();
        let mut pause = Duration::from_millis(100);
        loop {
            match sink.write(part).await {
                Ok(report) => {
                    refused.extend(report.failed.iter().map(|(i, _)| n * chunk + i));
                    break;
                }
                Err(e) if e.class().is_transient() => {
                    if started.elapsed() >= retry_for {
                        anyhow::bail!("the sink kept failing for {retry_for:?}: {e}");
                    }
                    tracing::warn!(error = %e, "sink write failed; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    // The whole batch is refused: hand every record to the engine instead.
                    tracing::warn!(error = %e, "the sink refused a listing batch");
                    refused.extend((0..part.len()).map(|i| n * chunk + i));
                    break;
                }
            }
        }
    }
    Ok(refused)
}

fn progress_bar(total: Option<u64>) -> ProgressBar {
    let bar = match total {
        Some(t) => ProgressBar::new(t),
        None => ProgressBar::no_length(),
    };
    let style = match total {
        Some(_) => ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} items, {per_sec}, ETA {eta} {msg}",
        ),
        None => ProgressStyle::with_template("{prefix} {spinner} {pos} items, {per_sec} {msg}"),
    };
    if let Ok(style) = style {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// `refetch backfill`.
pub async fn backfill(args: &BackfillArgs, signals: Signals) -> anyhow::Result<ExitCode> {
    let loaded = match crate::config::load_for_command(&args.config.config) {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    let cfg = loaded.config;
    logging::init(&cfg.log.level, cfg.log.format);
    let http = http_fetcher(&cfg)?;
    let types: Vec<String> = match &args.entity_type {
        Some(t) => {
            if http.listing(t).is_none() {
                eprintln!("error: entity type `{t}` has no [fetcher.sources.{t}.listing]");
                return Ok(ExitCode::from(2));
            }
            vec![t.clone()]
        }
        None => {
            let mut all: Vec<String> = http
                .entity_types()
                .filter(|t| http.listing(t).is_some())
                .map(str::to_owned)
                .collect();
            all.sort();
            all
        }
    };
    if types.is_empty() {
        eprintln!(
            "error: no source has a listing; add [fetcher.sources.<type>.listing] (docs/backfill.md)"
        );
        return Ok(ExitCode::from(2));
    }
    let state_path = cfg.backfill.state_path(&args.config.config);
    let mut state = BackfillState::load(&state_path)?;
    if args.restart {
        // Only the types of this run start over; other types keep their checkpoints.
        for t in &types {
            state.types.remove(t);
        }
    }
    let sink = wiring::build_sink(&cfg.sink).await?;
    let mut refresher: Option<Refresher> = None;
    let started = Instant::now();
    let mut summaries = BTreeMap::new();
    let mut failed_any = false;
    let mut error = None;
    for t in &types {
        let entry = state.types.entry(t.clone()).or_default();
        if entry.done {
            println!("{t}: the previous backfill finished; starting over");
            *entry = TypeState::default();
        } else if entry.pages > 0 {
            println!(
                "{t}: resuming after {} page(s), {} item(s)",
                entry.pages, entry.items
            );
        }
        if signals.stopped_by().is_some() {
            break;
        }
        let r = backfill_type(
            &cfg,
            &http,
            &sink,
            &mut refresher,
            t,
            &mut state,
            &state_path,
            &signals,
        )
        .await;
        match r {
            Ok(s) => {
                failed_any |= s.failed > 0;
                summaries.insert(t.clone(), s);
            }
            Err(e) => {
                error =
                    Some(e.context(format!("backfill of {t} stopped (the checkpoint is kept)")));
                break;
            }
        }
    }
    if let Some(r) = refresher {
        r.close().await?;
    }
    let elapsed = started.elapsed();
    println!("backfill summary ({:.1}s):", elapsed.as_secs_f64());
    for (t, s) in &summaries {
        let rate = s.items as f64 / elapsed.as_secs_f64().max(0.001);
        println!(
            "  {t}: {} page(s), {} item(s) ({} written from the listing, {} refreshed through the engine, {} failed), {rate:.0} items/s",
            s.pages, s.items, s.written, s.refreshed, s.failed
        );
    }
    println!("checkpoint: {}", state_path.display());
    if let Some(e) = error {
        return Err(e);
    }
    if let Some(signal) = signals.stopped_by() {
        println!(
            "interrupted by {signal}: every acknowledged page is checkpointed; run the same \
             command again to resume"
        );
        return Ok(ExitCode::from(crate::exit::INTERRUPTED));
    }
    Ok(if failed_any {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

#[allow(clippy::too_many_arguments)]
async fn backfill_type(
    cfg: &Config,
    http: &Arc<HttpFetcher>,
    sink: &Arc<dyn Sink>,
    refresher: &mut Option<Refresher>,
    entity_type: &str,
    state: &mut BackfillState,
    state_path: &Path,
    signals: &Signals,
) -> anyhow::Result<TypeSummary> {
    let mut summary = TypeSummary::default();
    let bar = progress_bar(None);
    bar.set_prefix(entity_type.to_owned());
    let mut length_set = false;
    loop {
        // A stop signal is honoured between pages: the page in flight is finished and
        // checkpointed, a listing request still being retried is given up (not checkpointed).
        if signals.stopped_by().is_some() {
            bar.abandon();
            return Ok(summary);
        }
        let at = state.types.get(entity_type).and_then(|s| s.next.clone());
        let listing = list_with_retry(http, entity_type, at.as_ref(), cfg.backfill.retry_for);
        let page = tokio::select! {
            page = listing => page?,
            () = signals.stopped() => {
                bar.abandon();
                return Ok(summary);
            }
        };
        if !length_set && let Some(total) = page.total {
            let done = state.types.get(entity_type).map_or(0, |s| s.items);
            bar.set_length(total);
            bar.set_position(done.min(total));
            if let Ok(style) = ProgressStyle::with_template(
                "{prefix} [{bar:30}] {pos}/{len} items, {per_sec}, ETA {eta} {msg}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            length_set = true;
        }
        let mut direct = Vec::new();
        let mut by_engine = Vec::new();
        // Direct writes are safe beside a running pipeline only where the sink's version guard
        // keeps the newer state (PostgreSQL, SQLite); other sinks get every id through the engine.
        let guarded = sink.tracks_versions();
        for item in &page.items {
            let key = EntityKey::new(entity_type, item.id.as_str());
            match item.entity.as_ref().filter(|_| guarded) {
                Some(entity) => direct.push(Change::Upsert {
                    key,
                    entity: entity.clone(),
                }),
                None => by_engine.push(key),
            }
        }
        let refused = write_acknowledged(sink.as_ref(), &direct, cfg.backfill.retry_for).await?;
        summary.written += (direct.len() - refused.len()) as u64;
        by_engine.extend(refused.iter().map(|&i| direct[i].key().clone()));
        if !by_engine.is_empty() {
            if refresher.is_none() {
                *refresher = Some(Refresher::start(cfg, observed(http), sink.clone()).await?);
            }
            if let Some(r) = refresher.as_ref() {
                let n = by_engine.len() as u64;
                let outcomes = r.handle().refresh(by_engine).await;
                // Never checkpoint past ids the engine did not get to.
                anyhow::ensure!(
                    !r.stopped(),
                    "the refresh pipeline stopped; the page is not checkpointed"
                );
                for (key, outcome) in &outcomes {
                    if let RefreshOutcome::Failed(why) | RefreshOutcome::DeleteHeld(why) = outcome {
                        summary.failed += 1;
                        tracing::warn!(%key, reason = %why, "backfill could not load an entity");
                    }
                }
                summary.refreshed += n;
            }
        }
        summary.pages += 1;
        summary.items += page.items.len() as u64;
        let entry = state.types.entry(entity_type.to_owned()).or_default();
        entry.pages += 1;
        entry.items += page.items.len() as u64;
        entry.done = page.next.is_none();
        entry.next = page.next.clone();
        state.save(state_path)?;
        bar.inc(page.items.len() as u64);
        if page.next.is_none() {
            bar.finish_and_clear();
            return Ok(summary);
        }
    }
}
