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
pub mod exit;
pub mod fetch;
pub mod logging;
pub mod observe;
pub mod offsets;
pub mod ops;
pub mod reconcile;
pub mod refresh;
pub mod reload;
pub mod run;
pub mod signals;
pub mod validate;
pub mod wiring;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};

/// `refetch completions SHELL`: the completion script on standard output.
fn completions(args: &cli::CompletionsArgs) -> ExitCode {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    clap_complete::generate(args.shell, &mut cmd, "refetch", &mut std::io::stdout());
    ExitCode::SUCCESS
}

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
    let mode = match &cli.command {
        Command::Run(_) => signals::Mode::Service,
        Command::Demo(_)
        | Command::Fetch(_)
        | Command::Backfill(_)
        | Command::Reconcile(_)
        | Command::Dlq(cli::DlqCommand::Redrive(_)) => signals::Mode::Graceful,
        _ => signals::Mode::Immediate,
    };
    let result = runtime.block_on(async {
        let signals = signals::Signals::install(mode);
        match &cli.command {
            Command::Run(a) => run::run(a, signals).await,
            Command::Validate(a) => validate::validate(a).await,
            Command::Demo(a) => demo::demo(a, signals).await,
            Command::Dlq(c) => dlq::command(c, signals).await,
            Command::Fetch(a) => fetch::fetch(a, signals).await,
            Command::Offsets(a) => offsets::command(a).await,
            Command::Backfill(a) => backfill::backfill(a, signals).await,
            Command::Reconcile(a) => reconcile::command(a, signals).await,
            Command::Completions(a) => Ok(completions(a)),
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
            if e.downcast_ref::<exit::InvalidConfiguration>().is_some() {
                ExitCode::from(exit::CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
