//! Sink configuration as the `refetch` binary reads it from TOML.
//!
//! One [`SinkConfig`] picks the sink by `kind`; every kind has its own table of settings with
//! defaults, unknown keys are rejected (a typo must not silently fall back to a default), and
//! durations are humantime strings (`"500ms"`, `"30s"`). These types are plain data and compile
//! whatever cargo features are enabled, so a configuration file can always be parsed; building a
//! sink whose feature is disabled fails with a clear error in [`build_sink`](crate::build_sink).
//!
//! ```toml
//! [sink]
//! kind = "postgres"
//! url = "postgres://app:secret@db:5432/app"
//! table = "customers"
//! create_table = true
//! deletes = "tombstone"
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

pub use refetch::Delivery;
use serde::{Deserialize, Serialize};

use crate::secret::Secret;

/// Which sink to write to, and its settings. Tagged by `kind`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SinkConfig {
    /// Upsert into a PostgreSQL table (`kind = "postgres"`).
    Postgres(PostgresConfig),
    /// Produce to a (compacted) Kafka topic (`kind = "kafka"`).
    Kafka(KafkaConfig),
    /// `PUT`/`DELETE` to an HTTP endpoint (`kind = "http"`).
    Http(HttpConfig),
    /// Upsert into an embedded SQLite database (`kind = "sqlite"`).
    Sqlite(SqliteConfig),
    /// Append to a JSON Lines file (`kind = "jsonl"`).
    Jsonl(JsonlConfig),
    /// Print each change on standard output (`kind = "stdout"`).
    Stdout(StdoutConfig),
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig::Sqlite(SqliteConfig::default())
    }
}

impl SinkConfig {
    /// The delivery the configuration asks for (`delivery = "exactly_once"` exists on the
    /// `postgres` and `kafka` sinks only; every other sink is at-least-once).
    pub fn delivery(&self) -> Delivery {
        match self {
            SinkConfig::Postgres(c) => c.delivery,
            SinkConfig::Kafka(c) => c.delivery,
            _ => Delivery::AtLeastOnce,
        }
    }

    /// Can this kind of sink deliver exactly once?
    pub fn supports_exactly_once(kind: &str) -> bool {
        matches!(kind, "postgres" | "kafka")
    }

    /// The `kind` label (also the `sink` label of the sink metrics).
    pub fn kind(&self) -> &'static str {
        match self {
            SinkConfig::Postgres(_) => "postgres",
            SinkConfig::Kafka(_) => "kafka",
            SinkConfig::Http(_) => "http",
            SinkConfig::Sqlite(_) => "sqlite",
            SinkConfig::Jsonl(_) => "jsonl",
            SinkConfig::Stdout(_) => "stdout",
        }
    }
}

/// What a table sink does when the source says an entity is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeleteMode {
    /// Delete the row.
    #[default]
    Delete,
    /// Keep the row as a tombstone: `deleted = true`, body cleared, version kept, so an older
    /// state arriving later cannot resurrect the entity.
    Tombstone,
}

/// PostgreSQL sink settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    /// Connection URL (`postgres://user:password@host:5432/database`) or libpq key/value string.
    /// The password is never logged.
    pub url: Secret,
    /// Schema of the table.
    pub schema: String,
    /// Table name. Columns: see the sinks guide (`docs/sinks.md`).
    pub table: String,
    /// Create the schema and table at start-up when they do not exist.
    pub create_table: bool,
    /// What a gone entity becomes: `"delete"` (remove the row) or `"tombstone"`.
    pub deletes: DeleteMode,
    /// Maximum number of pooled connections.
    pub pool_size: usize,
    /// How long to wait for a new connection.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Server-side `statement_timeout` for the sink's statements (`"0s"` disables it).
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
    /// Largest batch written in one transaction.
    pub max_batch: usize,
    /// `"at_least_once"` (default: one transaction per batch) or `"exactly_once"`: the
    /// transaction spans batches until the engine commits it together with the input offsets,
    /// which it stores in `offsets_table`.
    pub delivery: Delivery,
    /// With `delivery = "exactly_once"`: the table (in `schema`) holding the next offset per
    /// consumer group, topic and partition, created when missing.
    pub offsets_table: String,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            url: Secret::new("postgres://postgres@127.0.0.1:5432/postgres"),
            schema: "public".to_owned(),
            table: "refetch_entities".to_owned(),
            create_table: false,
            deletes: DeleteMode::Delete,
            pool_size: 4,
            connect_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(30),
            max_batch: 256,
            delivery: Delivery::AtLeastOnce,
            offsets_table: "refetch_offsets".to_owned(),
        }
    }
}

/// Kafka topic sink settings.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers (`host:port,host:port`).
    pub brokers: String,
    /// The topic entities are produced to (typically compacted: `cleanup.policy=compact`).
    pub topic: String,
    /// How long librdkafka may try to deliver one record (`message.timeout.ms`); a record not
    /// delivered in time fails its batch transiently.
    #[serde(with = "humantime_serde")]
    pub delivery_timeout: Duration,
    /// How long to wait for room in the producer queue when it is full.
    #[serde(with = "humantime_serde")]
    pub queue_timeout: Duration,
    /// Largest batch the sink takes at once.
    pub max_batch: usize,
    /// Extra librdkafka producer properties (for example `"security.protocol" = "SASL_SSL"`).
    /// `enable.idempotence` and `acks` cannot be weakened. Values of keys that look secret
    /// (`password`, `secret`, `token`, `key`) are never printed.
    pub properties: BTreeMap<String, String>,
    /// `"at_least_once"` (default) or `"exactly_once"`: states are produced in transactions that
    /// also commit the input offsets to the consumer group (`send_offsets_to_transaction`), so
    /// consumers reading with `isolation.level=read_committed` see each input offset covered
    /// once.
    pub delivery: Delivery,
    /// With `delivery = "exactly_once"` (required then): the stable prefix of the producer's
    /// `transactional.id`, which is `<prefix>-<instance_id>`.
    pub transactional_id_prefix: Option<String>,
    /// With `delivery = "exactly_once"`: what makes this instance's `transactional.id` its own
    /// (unset: the host name). Keep it stable across restarts, so a restarted instance fences
    /// its former self at once, and distinct between instances (two live producers with one id
    /// fence each other).
    pub instance_id: Option<String>,
    /// With `delivery = "exactly_once"`: `transaction.timeout.ms`, how long a transaction may stay
    /// open before the broker aborts it. Must exceed the engine's `commit_interval` plus
    /// `commit_timeout`.
    #[serde(with = "humantime_serde")]
    pub transaction_timeout: Duration,
    /// Add a header `refetch-inputs` to every record naming the input offsets it covers
    /// (`topic:partition:offset`, comma-separated).
    pub input_offsets_header: bool,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".to_owned(),
            topic: "refetch.entities".to_owned(),
            delivery_timeout: Duration::from_secs(30),
            queue_timeout: Duration::from_secs(5),
            max_batch: 1000,
            properties: BTreeMap::new(),
            delivery: Delivery::AtLeastOnce,
            transactional_id_prefix: None,
            instance_id: None,
            transaction_timeout: Duration::from_secs(60),
            input_offsets_header: false,
        }
    }
}

/// Does a librdkafka property or HTTP header name look like it holds a secret?
pub(crate) fn looks_secret(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    [
        "password",
        "secret",
        "token",
        "key",
        "authorization",
        "cookie",
        "credential",
    ]
    .iter()
    .any(|s| n.contains(s))
}

struct RedactedMap<'a>(&'a BTreeMap<String, String>);

impl fmt::Debug for RedactedMap<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| {
                let shown = if looks_secret(k) { "***" } else { v.as_str() };
                (k, shown)
            }))
            .finish()
    }
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("delivery_timeout", &self.delivery_timeout)
            .field("queue_timeout", &self.queue_timeout)
            .field("max_batch", &self.max_batch)
            .field("properties", &RedactedMap(&self.properties))
            .field("delivery", &self.delivery)
            .field("transactional_id_prefix", &self.transactional_id_prefix)
            .field("instance_id", &self.instance_id)
            .field("transaction_timeout", &self.transaction_timeout)
            .field("input_offsets_header", &self.input_offsets_header)
            .finish()
    }
}

/// HTTP sink settings.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Target URL with `{type}` and `{id}` placeholders, each replaced by the percent-encoded
    /// value as one path segment (for example `"https://target/api/{type}/{id}"`).
    pub url_template: String,
    /// Extra request headers (for example `Authorization`). Values of headers that look secret
    /// are never printed.
    pub headers: BTreeMap<String, String>,
    /// Header carrying the entity's version on `PUT` (the kind goes in `<header>-Kind`).
    pub version_header: String,
    /// Timeout of one request (a timeout is a transient failure).
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// How many requests of one batch run at once.
    pub concurrency: usize,
    /// Largest batch the sink takes at once.
    pub max_batch: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            url_template: "http://127.0.0.1:8080/entities/{type}/{id}".to_owned(),
            headers: BTreeMap::new(),
            version_header: "X-Entity-Version".to_owned(),
            timeout: Duration::from_secs(10),
            concurrency: 8,
            max_batch: 64,
        }
    }
}

impl fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpConfig")
            .field(
                "url_template",
                &crate::secret::redact_url(&self.url_template),
            )
            .field("headers", &RedactedMap(&self.headers))
            .field("version_header", &self.version_header)
            .field("timeout", &self.timeout)
            .field("concurrency", &self.concurrency)
            .field("max_batch", &self.max_batch)
            .finish()
    }
}

/// SQLite sink settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SqliteConfig {
    /// Database file (created when missing).
    pub path: PathBuf,
    /// Table name.
    pub table: String,
    /// Create the table when it does not exist.
    pub create_table: bool,
    /// What a gone entity becomes: `"delete"` or `"tombstone"`.
    pub deletes: DeleteMode,
    /// How long a write waits for a lock held by another connection before failing transiently.
    #[serde(with = "humantime_serde")]
    pub busy_timeout: Duration,
    /// Largest batch written in one transaction.
    pub max_batch: usize,
}

impl Default for SqliteConfig {
    fn default() -> Self {
        SqliteConfig {
            path: PathBuf::from("refetch.db"),
            table: "refetch_entities".to_owned(),
            create_table: true,
            deletes: DeleteMode::Delete,
            busy_timeout: Duration::from_secs(5),
            max_batch: 256,
        }
    }
}

/// JSON Lines sink settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JsonlConfig {
    /// The file changes are appended to (created when missing).
    pub path: PathBuf,
    /// Largest batch appended (and `fsync`ed) at once.
    pub max_batch: usize,
}

impl Default for JsonlConfig {
    fn default() -> Self {
        JsonlConfig {
            path: PathBuf::from("refetch.jsonl"),
            max_batch: 256,
        }
    }
}

/// Standard output sink settings (there are none yet; the table only selects the kind).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StdoutConfig {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_kind_with_defaults() {
        let pg: SinkConfig = toml::from_str(
            r#"kind = "postgres"
               url = "postgres://app:pw@db/app"
               table = "customers"
               deletes = "tombstone"
               statement_timeout = "2s""#,
        )
        .unwrap();
        let SinkConfig::Postgres(pg) = pg else {
            panic!("wrong kind: {pg:?}")
        };
        assert_eq!(pg.table, "customers");
        assert_eq!(pg.schema, "public");
        assert_eq!(pg.deletes, DeleteMode::Tombstone);
        assert_eq!(pg.statement_timeout, Duration::from_secs(2));

        let http: SinkConfig = toml::from_str(
            r#"kind = "http"
               url_template = "http://x/{type}/{id}"
               timeout = "250ms"
               headers = { Authorization = "Bearer abc" }"#,
        )
        .unwrap();
        let SinkConfig::Http(http) = http else {
            panic!("wrong kind: {http:?}")
        };
        assert_eq!(http.timeout, Duration::from_millis(250));
        assert_eq!(http.concurrency, HttpConfig::default().concurrency);

        for kind in ["kafka", "sqlite", "jsonl", "stdout"] {
            let cfg: SinkConfig = toml::from_str(&format!("kind = {kind:?}")).unwrap();
            assert_eq!(cfg.kind(), kind);
        }
    }

    #[test]
    fn unknown_keys_and_kinds_are_rejected() {
        let err = toml::from_str::<SinkConfig>("kind = \"sqlite\"\npaht = \"x.db\"").unwrap_err();
        assert!(err.to_string().contains("paht"), "{err}");
        let err = toml::from_str::<SinkConfig>("kind = \"stdout\"\ncolor = true").unwrap_err();
        assert!(err.to_string().contains("color"), "{err}");
        let err = toml::from_str::<SinkConfig>("kind = \"mongo\"").unwrap_err();
        assert!(err.to_string().contains("mongo"), "{err}");
    }

    #[test]
    fn debug_never_shows_secrets() {
        let pg = PostgresConfig {
            url: Secret::new("postgres://app:hunter2@db/app"),
            ..PostgresConfig::default()
        };
        let mut kafka = KafkaConfig::default();
        kafka
            .properties
            .insert("sasl.password".into(), "hunter2".into());
        kafka
            .properties
            .insert("security.protocol".into(), "SASL_SSL".into());
        let mut http = HttpConfig::default();
        http.headers
            .insert("Authorization".into(), "Bearer hunter2".into());
        for shown in [
            format!("{:?}", SinkConfig::Postgres(pg)),
            format!("{:?}", SinkConfig::Kafka(kafka)),
            format!("{:?}", SinkConfig::Http(http)),
        ] {
            assert!(!shown.contains("hunter2"), "{shown}");
        }
    }
}
