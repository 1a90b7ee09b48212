//! # `refetch`: the notification-plus-pull pipeline as a program
//!
//! Reads one TOML file (see `docs/configuration.md` and `examples/refetch.example.toml`) and wires
//! the engine (`refetch`) to the HTTP fetcher (`refetch-http`) and a sink (`refetch-sinks`).
//! Subcommands: `run`, `validate`, `demo`, `dlq list|redrive`, `fetch`, `offsets`, `backfill`,
//! `reconcile` (see `docs/backfill.md`); `refetch
//! --help` lists them with examples. Operating it (scaling out, rebalances, dead letters,
//! metrics, readiness, signals) is described in `docs/operations.md`.
//!
//! Modules: [`cli`] (flags), [`config`] (the file), [`wiring`] (configuration to parts),
//! [`run`], [`validate`], [`dlq`], [`offsets`], [`backfill`], [`reconcile`] (subcommands), [`ops`] (the operations endpoint),
//! [`observe`] (fetch and sink figures, rates, lag per partition, series registration),
//! [`logging`] (logs and traces), [`signals`], [`demo`] and
//! [`demo_source`] (the embedded demo).

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod backfill;
pub mod cli;
pub mod config;
pub mod demo;
pub mod demo_source;
pub mod dlq;
pub mod logging;
pub mod observe;
pub mod offsets;
pub mod ops;
pub mod reconcile;
pub mod run;
pub mod signals;
pub mod validate;
pub mod wiring;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("refetch")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match &cli.command {
            Command::Run(a) => run::run(a).await,
            Command::Validate(a) => validate::validate(a).await,
            Command::Demo(a) => demo::demo(a).await,
            Command::Dlq(c) => dlq::command(c).await,
            Command::Fetch(a) => run::fetch(a).await,
            Command::Offsets(a) => offsets::command(a).await,
            Command::Backfill(a) => backfill::backfill(a).await,
            Command::Reconcile(a) => reconcile::command(a).await,
        }
    });
    // Background tasks (the ops server, librdkafka callbacks) must not hold the exit up.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    // The Kafka clients' last repeats and, when trace export is on, the last spans.
    logging::shutdown();
    match result {
        Ok(code) => code,
        Err(e) => {
            // In JSON mode the fatal line is JSON too; it is the last line.
            logging::fatal(&e);
            ExitCode::FAILURE
        }
    }
}
