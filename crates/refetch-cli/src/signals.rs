//! Signals, the same way for every subcommand.
//!
//! | subcommands | first SIGTERM / SIGINT | SIGHUP | second signal |
//! |---|---|---|---|
//! | `run` | graceful shutdown, exit 0 | reload the configuration | exit 130 at once |
//! | `demo` | stop producing, check, report | like SIGTERM | exit 130 at once |
//! | `fetch`, `backfill`, `reconcile`, `dlq redrive` | finish what is in flight, keep the checkpoint, exit 130 | like SIGTERM | exit 130 at once |
//! | `validate`, `offsets`, `dlq list`, `completions` | exit 130 at once | exit 130 at once | |
//!
//! Graceful for `run` means what docs/guarantees.md promises for shutdown: stop taking records, flush
//! pending keys, finish in-flight work within `engine.shutdown_deadline`, commit synchronously,
//! close the consumer, exit 0. An operator who does not want to wait sends the signal again: the
//! process exits with code 130 immediately, committing nothing more (whatever was not committed
//! is redone by the partitions' next owner). SIGHUP reaches `run` as a reload request
//! ([`Signals::reloads`]); for one-shot commands it means the terminal went away, so they stop
//! like on SIGTERM.

use std::future::Future;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};

/// Exit code of an interrupted command and of a second signal.
pub const FORCED_EXIT: i32 = crate::exit::INTERRUPTED as i32;

/// How a subcommand reacts to signals (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `run`: the first SIGTERM/SIGINT stops gracefully, SIGHUP reloads.
    Service,
    /// Commands that finish what is in flight: the first SIGTERM/SIGINT/SIGHUP stops them.
    Graceful,
    /// Commands with nothing to finish: any of the three signals exits 130 at once.
    Immediate,
}

/// The signals a subcommand waits for. Cloning shares the same state.
#[derive(Debug, Clone)]
pub struct Signals {
    stop: watch::Receiver<Option<&'static str>>,
    reloads: std::sync::Arc<std::sync::Mutex<Option<mpsc::UnboundedReceiver<()>>>>,
}

impl Signals {
    /// Install the handlers for `mode` (inside a tokio runtime). When they cannot be installed,
    /// the error is logged and the signals keep their default behaviour.
    pub fn install(mode: Mode) -> Signals {
        let (stop_tx, stop) = watch::channel(None);
        let (reload_tx, reload_rx) = mpsc::unbounded_channel();
        let streams = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        );
        match streams {
            (Ok(term), Ok(int), Ok(hup)) => {
                tokio::spawn(watch_signals(mode, term, int, hup, stop_tx, reload_tx));
            }
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                tracing::error!(error = %e, "cannot install signal handlers");
            }
        }
        Signals {
            stop,
            reloads: std::sync::Arc::new(std::sync::Mutex::new(Some(reload_rx))),
        }
    }

    /// Signals that never arrive (tests, embedded use).
    pub fn none() -> Signals {
        let (_tx, stop) = watch::channel(None);
        Signals {
            stop,
            reloads: std::sync::Arc::new(std::sync::Mutex::new(None)),
        }
    }

    /// Has a stop signal arrived? Its name, if so.
    pub fn stopped_by(&self) -> Option<&'static str> {
        *self.stop.borrow()
    }

    /// Resolves once the first stop signal arrived (at once if it already has).
    pub fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut stop = self.stop.clone();
        async move {
            // An error means the watcher is gone (no handlers): never resolve.
            if stop.wait_for(Option::is_some).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// The reload requests (SIGHUP) of `run`; `None` when taken already or in other modes.
    pub fn reloads(&self) -> Option<mpsc::UnboundedReceiver<()>> {
        self.reloads.lock().ok().and_then(|mut r| r.take())
    }
}

async fn watch_signals(
    mode: Mode,
    mut term: tokio::signal::unix::Signal,
    mut int: tokio::signal::unix::Signal,
    mut hup: tokio::signal::unix::Signal,
    stop: watch::Sender<Option<&'static str>>,
    reload: mpsc::UnboundedSender<()>,
) {
    loop {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            _ = hup.recv() => "SIGHUP",
        };
        if name == "SIGHUP" && mode == Mode::Service {
            tracing::info!(signal = name, "reloading the configuration");
            let _ = reload.send(());
            continue;
        }
        let first = stop.borrow().is_none();
        if mode == Mode::Immediate || !first {
            if !first {
                tracing::warn!(
                    signal = name,
                    code = FORCED_EXIT,
                    "second signal: exiting at once"
                );
            }
            std::process::exit(FORCED_EXIT);
        }
        match mode {
            Mode::Service => tracing::info!(
                signal = name,
                "shutting down gracefully (send the signal again to exit at once)"
            ),
            _ => tracing::warn!(
                signal = name,
                "shutting down gracefully: finishing what is in flight (send the signal again to \
                 exit at once)"
            ),
        }
        let _ = stop.send(Some(name));
    }
}
