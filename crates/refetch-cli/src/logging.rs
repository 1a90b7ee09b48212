//! Logs: `tracing-subscriber` on standard error, human-readable by default, JSON on request.
//!
//! The filter comes from `RUST_LOG` when it is set, otherwise from `[log] level`. librdkafka's own
//! log lines arrive through the `rdkafka` target.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Install the global subscriber. `level` is a filter directive (`info`, `info,refetch=debug`).
/// Calling it twice keeps the first subscriber.
pub fn init(level: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.with_target(true).try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
    // An already installed subscriber (tests, a second call) is fine.
    let _ = result;
}
