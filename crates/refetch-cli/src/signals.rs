//! Signals: the first SIGTERM or SIGINT starts the graceful shutdown, a second one exits at once.
//!
//! Graceful means what design notes invariant 8 says: stop taking records, flush pending keys,
//! finish in-flight work within `engine.shutdown_deadline`, commit synchronously, close the
//! consumer, exit 0. An operator who does not want to wait sends the signal again: the process
//! exits with code 130 immediately, committing nothing more (whatever was not committed is
//! redone by the partitions' next owner).

use std::future::Future;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::oneshot;

/// Exit code of the second signal.
pub const FORCED_EXIT: i32 = 130;

/// A future that resolves on the first SIGTERM or SIGINT. Also installs the second-signal exit.
/// When the handlers cannot be installed, the error is logged and the future never resolves.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let (mut term, mut int) = match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(t), Ok(i)) => (t, i),
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "cannot install signal handlers");
                std::future::pending::<()>().await;
                return;
            }
        };
        let first = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(
            signal = first,
            "shutting down gracefully (send the signal again to exit at once)"
        );
        let _ = tx.send(());
        let second = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::warn!(
            signal = second,
            code = FORCED_EXIT,
            "second signal: exiting at once"
        );
        std::process::exit(FORCED_EXIT);
    });
    async move {
        if rx.await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
