//! `refetch fetch --key TYPE:ID...`: refresh entities now, through the engine's single flight.

use std::process::ExitCode;

use refetch::RefreshOutcome;

use crate::cli::FetchArgs;
use crate::signals::Signals;
use crate::{logging, wiring};

/// `refetch fetch`.
pub async fn fetch(args: &FetchArgs, signals: Signals) -> anyhow::Result<ExitCode> {
    let loaded = match crate::config::load_for_command(&args.config.config) {
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
                return Ok(ExitCode::from(crate::exit::CONFIG));
            }
        }
    }
    let outcomes = crate::refresh::refresh_keys(&cfg, keys.clone(), &signals).await?;
    let mut failed = 0;
    for key in &keys {
        match outcomes.iter().find(|(k, _)| k == key).map(|(_, o)| o) {
            Some(RefreshOutcome::Done) => println!("{key}\tok"),
            Some(RefreshOutcome::Failed(why) | RefreshOutcome::DeleteHeld(why)) => {
                failed += 1;
                println!("{key}\tFAILED: {why}");
            }
            None => {
                failed += 1;
                println!("{key}\tnot refreshed: interrupted");
            }
        }
    }
    Ok(if signals.stopped_by().is_some() {
        ExitCode::from(crate::exit::INTERRUPTED)
    } else if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
