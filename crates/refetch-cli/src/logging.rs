//! Logs: `tracing-subscriber` on standard error, human-readable by default, JSON on request.
//!
//! The filter comes from `RUST_LOG` when it is set, otherwise from `[log] level`. librdkafka's own
//! log lines arrive through the `rdkafka` target. The filter can be replaced while the process
//! runs ([`set_level`], used by `refetch run` when SIGHUP reloads the configuration).

use std::sync::OnceLock;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

type Reload = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// Replaces the installed subscriber's filter.
static RELOAD: OnceLock<Reload> = OnceLock::new();

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
        LogFormat::Text => {
            let builder = builder.with_target(true).with_filter_reloading();
            let handle = builder.reload_handle();
            let result = builder.try_init();
            if result.is_ok() {
                let _ = RELOAD.set(Box::new(move |f| {
                    handle.reload(f).map_err(|e| e.to_string())
                }));
            }
            result
        }
        LogFormat::Json => {
            let builder = builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_filter_reloading();
            let handle = builder.reload_handle();
            let result = builder.try_init();
            if result.is_ok() {
                let _ = RELOAD.set(Box::new(move |f| {
                    handle.reload(f).map_err(|e| e.to_string())
                }));
            }
            result
        }
    };
    // An already installed subscriber (tests, a second call) is fine.
    let _ = result;
}

/// Replace the filter with `level` (a filter directive). Refused while `RUST_LOG` is set (it
/// wins over `[log] level`) or when no subscriber of this module is installed.
pub fn set_level(level: &str) -> Result<(), String> {
    if std::env::var_os("RUST_LOG").is_some() {
        return Err("RUST_LOG is set and wins over [log] level".to_owned());
    }
    let filter = EnvFilter::try_new(level).map_err(|e| format!("`{level}`: {e}"))?;
    match RELOAD.get() {
        Some(reload) => reload(filter),
        None => Err("no log subscriber to reconfigure".to_owned()),
    }
}
