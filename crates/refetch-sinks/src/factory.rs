//! Building a sink from its configuration: the one entry point the binary uses.

use std::sync::Arc;

use refetch::Sink;

use crate::config::SinkConfig;

/// Why a sink could not be built. Messages never contain secrets.
#[derive(Debug, thiserror::Error)]
pub enum SinkBuildError {
    /// The configuration is invalid (a bad URL template, an empty table name, a weakened
    /// producer setting, ...).
    #[error("invalid {sink} sink configuration: {message}")]
    Config {
        /// The sink kind.
        sink: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The target could not be reached or opened at start-up.
    #[error("{sink} sink target unavailable: {message}")]
    Unavailable {
        /// The sink kind.
        sink: &'static str,
        /// What failed.
        message: String,
    },
    /// The target exists but does not have the expected shape (a table with missing or
    /// mistyped columns).
    #[error("{sink} sink target does not match: {message}")]
    Schema {
        /// The sink kind.
        sink: &'static str,
        /// Every mismatch found.
        message: String,
    },
    /// This build of refetch-sinks does not include the sink (cargo feature disabled).
    #[error("the {0} sink is not compiled in (enable the `{0}` cargo feature of refetch-sinks)")]
    FeatureDisabled(&'static str),
}

impl SinkBuildError {
    #[cfg_attr(
        not(any(
            feature = "postgres",
            feature = "kafka",
            feature = "http",
            feature = "sqlite"
        )),
        allow(dead_code)
    )]
    pub(crate) fn config(sink: &'static str, message: impl Into<String>) -> Self {
        SinkBuildError::Config {
            sink,
            message: message.into(),
        }
    }

    pub(crate) fn unavailable(sink: &'static str, message: impl Into<String>) -> Self {
        SinkBuildError::Unavailable {
            sink,
            message: message.into(),
        }
    }
}

/// Build the sink `cfg` selects, connect it and check its target (table shape, topic
/// reachability, file writability).
///
/// ```no_run
/// # async fn demo() -> Result<(), refetch_sinks::SinkBuildError> {
/// let cfg: refetch_sinks::SinkConfig = refetch_sinks::SinkConfig::default(); // SQLite
/// let sink = refetch_sinks::build_sink(&cfg).await?;
/// # let _ = sink; Ok(()) }
/// ```
pub async fn build_sink(cfg: &SinkConfig) -> Result<Arc<dyn Sink>, SinkBuildError> {
    match cfg {
        #[cfg(feature = "postgres")]
        SinkConfig::Postgres(c) => Ok(Arc::new(crate::postgres::PostgresSink::connect(c).await?)),
        #[cfg(feature = "kafka")]
        // Exactly-once: the transactional id is registered (fencing an older producer with it)
        // when the sink is first used, not here, so building a sink (`refetch validate`, a
        // pipeline rebuilt on reload) never fences one that is running.
        SinkConfig::Kafka(c) => Ok(Arc::new(crate::kafka::KafkaSink::new(c)?)),
        #[cfg(feature = "http")]
        SinkConfig::Http(c) => Ok(Arc::new(crate::http::HttpSink::new(c)?)),
        #[cfg(feature = "sqlite")]
        SinkConfig::Sqlite(c) => Ok(Arc::new(crate::sqlite::SqliteSink::open(c).await?)),
        SinkConfig::Jsonl(c) => Ok(Arc::new(crate::jsonl::JsonlSink::open(c).await?)),
        SinkConfig::Stdout(_) => Ok(Arc::new(crate::stdout::StdoutSink::new())),
        #[allow(unreachable_patterns)]
        other => Err(SinkBuildError::FeatureDisabled(other.kind())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HttpConfig, JsonlConfig, SqliteConfig, StdoutConfig};

    #[tokio::test]
    async fn builds_the_configured_sink() {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = build_sink(&SinkConfig::Sqlite(SqliteConfig {
            path: dir.path().join("x.db"),
            max_batch: 7,
            ..SqliteConfig::default()
        }))
        .await
        .unwrap();
        assert!(sqlite.tracks_versions());
        assert_eq!(sqlite.max_batch(), 7);
        let jsonl = build_sink(&SinkConfig::Jsonl(JsonlConfig {
            path: dir.path().join("x.jsonl"),
            max_batch: 5,
        }))
        .await
        .unwrap();
        assert_eq!(jsonl.max_batch(), 5);
        assert!(!jsonl.tracks_versions());
        build_sink(&SinkConfig::Stdout(StdoutConfig {}))
            .await
            .unwrap();
        let http = build_sink(&SinkConfig::Http(HttpConfig::default()))
            .await
            .unwrap();
        assert_eq!(http.max_batch(), HttpConfig::default().max_batch);
    }

    #[tokio::test]
    async fn bad_configuration_is_reported_without_secrets() {
        let err = build_sink(&SinkConfig::Http(HttpConfig {
            url_template: "http://user:hunter2@h/{nope}".into(),
            ..HttpConfig::default()
        }))
        .await
        .err()
        .unwrap();
        assert!(
            matches!(err, SinkBuildError::Config { sink: "http", .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("{nope}"), "{err}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let err = build_sink(&SinkConfig::Jsonl(JsonlConfig {
            path: dir.path().join("missing-dir").join("x.jsonl"),
            ..JsonlConfig::default()
        }))
        .await
        .err()
        .unwrap();
        assert!(
            matches!(err, SinkBuildError::Unavailable { sink: "jsonl", .. }),
            "{err:?}"
        );
    }
}
