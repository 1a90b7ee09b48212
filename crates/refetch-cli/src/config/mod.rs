//! The configuration file of the `refetch` binary.
//!
//! One TOML file describes one pipeline: where notifications come from (`[kafka]`, `[[topics]]`),
//! how they coalesce (`[engine]`), where entities are fetched (`[fetcher]`, the HTTP fetcher's own
//! configuration from `refetch-http`), where they are written (`[sink]`, from `refetch-sinks`),
//! and how the process is operated (`[ops]`, `[log]`).
//!
//! Everything is plain serde data that refuses unknown keys, so a typo is an error that names the
//! key and its line rather than a silent default. Durations are humantime strings (`"500ms"`,
//! `"2s"`). Loading ([`load`]) also resolves `${VAR}` references from the environment and checks
//! the relations between settings, so `refetch validate` and `refetch run` reject the same files
//! with the same messages, every problem of a file at once. `docs/configuration.md` is the
//! reference of every key; a test keeps it complete.
//!
//! Modules: `load` (parsing, `${VAR}`, collecting every problem), `tree` (the spanned document),
//! `shapes` (one shape for a version), `fetcher` (the `[fetcher]` checks), `messages` (serde's
//! messages in TOML terms), `engine`, `backfill` (sections).

mod backfill;
mod engine;
mod fetcher;
mod load;
mod messages;
mod shapes;
mod telemetry;
mod tree;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use refetch::decode::{Correlation, CorrelationSource, JsonDecoder, RecordKeyDecoder, Route};
use refetch::{GroupProtocol, KafkaConfig, NotificationDecoder, VersionKind};
use refetch_http::HttpFetcherConfig;
use refetch_sinks::SinkConfig;
use serde::{Deserialize, Serialize};

pub use backfill::{BackfillSection, ReconcileSection};
pub use engine::{BackoffSection, EngineSection, GoneGuardSection};
pub use load::{ConfigError, ConfigErrors, Loaded, load, load_str, resolve_env};

/// Load the file for a subcommand, printing every problem to standard error the way every
/// subcommand does. `Err` carries the exit code (2: invalid configuration).
pub fn load_for_command(path: &std::path::Path) -> Result<Loaded, std::process::ExitCode> {
    match load(path) {
        Ok(l) => Ok(l),
        Err(e) => {
            eprintln!("error: invalid configuration\n{e}");
            Err(std::process::ExitCode::from(crate::exit::CONFIG))
        }
    }
}
pub use telemetry::TracesSection;

/// The whole configuration file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Kafka connection, consumer group and dead-letter topic.
    pub kafka: KafkaSection,
    /// The notification topics and how each is decoded.
    pub topics: Vec<TopicSection>,
    /// Coalescing, concurrency, retries, caps and deadlines of the engine.
    #[serde(default)]
    pub engine: EngineSection,
    /// The HTTP fetcher: one source per entity type (see `refetch-http`).
    pub fetcher: HttpFetcherConfig,
    /// Where fetched entities are written, selected by `kind` (see `refetch-sinks`).
    pub sink: SinkConfig,
    /// The operations endpoint (metrics, health, readiness, status page).
    #[serde(default)]
    pub ops: OpsSection,
    /// Logging.
    #[serde(default)]
    pub log: LogSection,
    /// OpenTelemetry trace export (off unless `traces.endpoint` is set).
    #[serde(default)]
    pub traces: TracesSection,
    /// What `refetch validate --connect` checks beyond the defaults.
    #[serde(default)]
    pub validate: ValidateSection,
    /// `refetch backfill`: its checkpoint and retries.
    #[serde(default)]
    pub backfill: BackfillSection,
    /// `refetch reconcile`, and the scheduled reconcile inside `refetch run`.
    #[serde(default)]
    pub reconcile: ReconcileSection,
}

/// `[kafka]`: connection, consumer group and the topics refetch owns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSection {
    /// Bootstrap servers, `host:port[,host:port...]` (librdkafka's `bootstrap.servers`).
    pub brokers: String,
    /// The consumer group. Every process with the same group shares the topics' partitions.
    pub group_id: String,
    /// `classic` (cooperative-sticky assignor) or `consumer` (KIP-848, broker-side assignment).
    #[serde(default)]
    pub group_protocol: GroupProtocol,
    /// Where dead letters go. Default: `<group_id>.dlq`. The topic must exist and be writable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter_topic: Option<String>,
    /// A retry topic refetch owns and subscribes to in addition to `[[topics]]` (conventionally
    /// `<group_id>.retry`). `refetch dlq redrive --to-retry-topic` republishes dead letters there;
    /// its records name their entity in the `refetch.entity.type` / `refetch.entity.id` headers.
    /// Unset: no retry topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_topic: Option<String>,
    /// librdkafka properties for every client (consumer and producers), for example
    /// `"security.protocol" = "SASL_SSL"`. Values may use `${VAR}`. Settings refetch depends on
    /// (`enable.auto.commit`, `enable.auto.offset.store`) are refused.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// librdkafka properties for the consumer only (for example `max.poll.interval.ms`).
    #[serde(default)]
    pub consumer_properties: BTreeMap<String, String>,
    /// librdkafka properties for the dead-letter and retry producers only.
    #[serde(default)]
    pub producer_properties: BTreeMap<String, String>,
}

impl Default for KafkaSection {
    fn default() -> Self {
        KafkaSection {
            brokers: "127.0.0.1:9092".to_owned(),
            group_id: "refetch".to_owned(),
            group_protocol: GroupProtocol::Classic,
            dead_letter_topic: None,
            retry_topic: None,
            properties: BTreeMap::new(),
            consumer_properties: BTreeMap::new(),
            producer_properties: BTreeMap::new(),
        }
    }
}

impl KafkaSection {
    /// The dead-letter topic, explicit or `<group_id>.dlq`.
    pub fn dead_letter_topic(&self) -> String {
        self.dead_letter_topic
            .clone()
            .unwrap_or_else(|| format!("{}.dlq", self.group_id))
    }
}

/// `[[topics]]`: one notification topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSection {
    /// The topic name.
    pub name: String,
    /// How its records become entity keys.
    pub decoder: DecoderSection,
}

/// How a topic's records are decoded, selected by `kind`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DecoderSection {
    /// A JSON payload (`kind = "json"`): the id, type and version are found by JSON pointers.
    Json(JsonDecoderSection),
    /// The record key is the id (`kind = "record_key"`); every record has one entity type.
    RecordKey(RecordKeyDecoderSection),
}

/// `kind = "json"` decoder settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonDecoderSection {
    /// JSON pointer to the entity type, for example `"/type"`. Set this or `fixed_type`.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub type_pointer: Option<String>,
    /// Every record of the topic is of this entity type. Set this or `type`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fixed_type: Option<String>,
    /// JSON pointer to the id (a string or an integer), for example `"/id"`.
    #[serde(default = "default_id_pointer")]
    pub id: String,
    /// Where the entity's version is in the payload, if notifications carry one:
    /// `{ pointer = "/version", kind = "integer" }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<VersionSpec>,
    /// Extra fields handed to the fetcher's URL templates: name = JSON pointer.
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
    /// Child types routed to an aggregate root (an `address` change is a change of its
    /// customer).
    #[serde(default)]
    pub routes: Vec<RouteSection>,
    /// JSON pointer to the business action's correlation id: notifications with the same id
    /// are written together (see `docs/actions.md`). Set this or `correlation_header`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation: Option<String>,
    /// Record header holding the correlation id. Set this or `correlation`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_header: Option<String>,
    /// JSON pointer to the action's announced size (distinct entities), if the source gives it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action_size: Option<String>,
}

fn default_id_pointer() -> String {
    "/id".to_owned()
}

fn default_version_kind() -> VersionKind {
    VersionKind::Integer
}

/// A version: `{ pointer = "/version", kind = "integer" }`, the one shape of a version wherever
/// one is configured (decoders, routes, sources, listings).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionSpec {
    /// JSON pointer to the version, for example `"/version"`.
    pub pointer: String,
    /// `integer` or `timestamp` (RFC 3339 or epoch milliseconds; equal timestamps never prove
    /// a change is held).
    #[serde(default = "default_version_kind")]
    pub kind: VersionKind,
}

/// A routed root's version: `{ pointer = "/customer_version" }`. It is read with the decoder's
/// version kind; `kind`, when written, must be that kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteVersion {
    /// JSON pointer to the root's version in the child's payload.
    pub pointer: String,
    /// The decoder's version kind, if written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<VersionKind>,
}

impl Default for JsonDecoderSection {
    fn default() -> Self {
        JsonDecoderSection {
            type_pointer: None,
            fixed_type: None,
            id: default_id_pointer(),
            version: None,
            fields: BTreeMap::new(),
            routes: Vec::new(),
            correlation: None,
            correlation_header: None,
            action_size: None,
        }
    }
}

/// `[[topics.decoder.routes]]`: a child type whose changes are changes of its root.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    /// The child's entity type as decoded (for example `address`).
    pub from_type: String,
    /// The root's entity type (for example `customer`).
    pub to_type: String,
    /// JSON pointer to the root's id in the child's notification (for example `/customer_id`).
    pub id: String,
    /// The root's version, if the child's notification carries it
    /// (`{ pointer = "/customer_version" }`). Without it a routed notification counts as
    /// unversioned (the child's version says nothing about the root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<RouteVersion>,
}

/// `kind = "record_key"` decoder settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordKeyDecoderSection {
    /// The entity type of every record of the topic.
    pub entity_type: String,
}

/// `[ops]`: the operations endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpsSection {
    /// Serve the endpoint at all.
    pub enabled: bool,
    /// Listen address, an IP address and port. Loopback by default: expose it deliberately
    /// (`0.0.0.0:9464`) when a scraper on another host needs it.
    #[serde(deserialize_with = "listen_address")]
    pub listen: SocketAddr,
}

impl Default for OpsSection {
    fn default() -> Self {
        OpsSection {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

/// An IP address and port; a host name (`localhost:9464`) is refused with a hint.
fn listen_address<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    parse_listen_address(&text).map_err(serde::de::Error::custom)
}

/// Parse a listen address (`127.0.0.1:9464`, `[::1]:9464`), explaining what a host name needs.
pub fn parse_listen_address(text: &str) -> Result<SocketAddr, String> {
    text.parse::<SocketAddr>().map_err(|_| {
        let hint = match text.rsplit_once(':') {
            Some((host, port)) if port.parse::<u16>().is_ok() && !host.is_empty() => {
                let ip = if host.eq_ignore_ascii_case("localhost") {
                    "127.0.0.1"
                } else {
                    "0.0.0.0"
                };
                format!(
                    ": a listen address is an IP address and port, not a host name; write \
                     \"{ip}:{port}\" (or \"[::1]:{port}\" for IPv6)"
                )
            }
            _ => ": expected an IP address and port such as \"127.0.0.1:9464\"".to_owned(),
        };
        format!("{text:?} is not a listen address{hint}")
    })
}

/// `[log]`: logging.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// A `tracing` filter, for example `"info"` or `"info,refetch=debug"`. `RUST_LOG`, when set,
    /// wins.
    pub level: String,
    /// `text` (human-readable) or `json` (one object per line).
    pub format: LogFormat,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            level: "info".to_owned(),
            format: LogFormat::Text,
        }
    }
}

/// `[validate]`: extra checks of `refetch validate --connect`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ValidateSection {
    /// A health URL per entity type (`customer = "https://crm.example/health"`), fetched with
    /// `GET` and expected to answer 2xx. Types without one get a `HEAD` of their URL template's
    /// origin, where any HTTP answer counts as reachable.
    pub health_urls: BTreeMap<String, String>,
}

/// The name of a version kind as written in the file.
fn kind_name(kind: VersionKind) -> &'static str {
    match kind {
        VersionKind::Integer => "integer",
        VersionKind::Timestamp => "timestamp",
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The header naming a retry-topic record's entity type (also on dead letters).
pub const ENTITY_TYPE_HEADER: &str = refetch::dlq::header::ENTITY_TYPE;
/// The header naming a retry-topic record's entity id (also on dead letters).
pub const ENTITY_ID_HEADER: &str = refetch::dlq::header::ENTITY_ID;

/// Decodes retry-topic records: the entity is named by the `refetch.entity.type` and
/// `refetch.entity.id` headers that dead letters carry.
#[derive(Debug, Clone, Default)]
pub struct HeaderKeyDecoder;

impl NotificationDecoder for HeaderKeyDecoder {
    fn decode(
        &self,
        record: &refetch::RecordView<'_>,
    ) -> Result<refetch::Decoded, refetch::DecodeError> {
        let header = |name: &str| -> Result<String, refetch::DecodeError> {
            let value = record
                .headers
                .iter()
                .find(|(k, _)| k == name)
                .and_then(|(_, v)| v.as_deref())
                .ok_or_else(|| refetch::DecodeError::new(format!("header `{name}` missing")))?;
            let text = std::str::from_utf8(value).map_err(|_| {
                refetch::DecodeError::new(format!("header `{name}` is not valid UTF-8"))
            })?;
            if text.is_empty() {
                return Err(refetch::DecodeError::new(format!(
                    "header `{name}` is empty"
                )));
            }
            Ok(text.to_owned())
        };
        let key = refetch::EntityKey::new(header(ENTITY_TYPE_HEADER)?, header(ENTITY_ID_HEADER)?);
        Ok(refetch::Decoded::Notification(refetch::Notification::new(
            key,
        )))
    }
}

impl DecoderSection {
    /// Check the decoder's pointers and exclusive options; `p` is its key path.
    fn check(&self, p: &str, out: &mut Vec<Invalid>) {
        match self {
            DecoderSection::Json(j) => {
                match (&j.type_pointer, &j.fixed_type) {
                    (Some(_), Some(_)) => out.push(Invalid::new(
                        format!("{p}.fixed_type"),
                        "set either `type` (a JSON pointer) or `fixed_type`, not both",
                    )),
                    (None, None) => out.push(Invalid::new(
                        p,
                        "expected `type` (a JSON pointer such as \"/type\") or `fixed_type` \
                         (an entity type name)",
                    )),
                    _ => {}
                }
                let mut pointers = vec![(format!("{p}.id"), j.id.as_str())];
                if let Some(t) = &j.type_pointer {
                    pointers.push((format!("{p}.type"), t));
                }
                if let Some(v) = &j.version {
                    pointers.push((format!("{p}.version.pointer"), v.pointer.as_str()));
                }
                for (name, ptr) in &j.fields {
                    pointers.push((format!("{p}.fields.{name}"), ptr));
                }
                if j.correlation.is_some() && j.correlation_header.is_some() {
                    out.push(Invalid::new(
                        format!("{p}.correlation_header"),
                        "set either `correlation` (a JSON pointer) or `correlation_header`, not \
                         both",
                    ));
                }
                if let Some(c) = &j.correlation {
                    pointers.push((format!("{p}.correlation"), c));
                }
                if let Some(c) = &j.action_size {
                    pointers.push((format!("{p}.action_size"), c));
                }
                let decoder_kind = j.version.as_ref().map_or(VersionKind::Integer, |v| v.kind);
                for (ri, r) in j.routes.iter().enumerate() {
                    pointers.push((format!("{p}.routes[{ri}].id"), r.id.as_str()));
                    if let Some(v) = &r.version {
                        pointers.push((
                            format!("{p}.routes[{ri}].version.pointer"),
                            v.pointer.as_str(),
                        ));
                        if let Some(k) = v.kind
                            && k != decoder_kind
                        {
                            out.push(Invalid::new(
                                format!("{p}.routes[{ri}].version.kind"),
                                format!(
                                    "a root's version is read with the decoder's version kind \
                                     ({}): leave `kind` out here or make them equal",
                                    kind_name(decoder_kind)
                                ),
                            ));
                        }
                    }
                    if r.from_type.is_empty() || r.to_type.is_empty() {
                        out.push(Invalid::new(
                            format!("{p}.routes[{ri}]"),
                            "expected non-empty `from_type` and `to_type`",
                        ));
                    }
                }
                for (path, ptr) in pointers {
                    if !ptr.is_empty() && !ptr.starts_with('/') {
                        out.push(Invalid::new(
                            path,
                            format!(
                                "expected a JSON pointer starting with `/` (for example \
                                 \"/{ptr}\"), found {ptr:?}"
                            ),
                        ));
                    }
                }
            }
            DecoderSection::RecordKey(r) => {
                if r.entity_type.trim().is_empty() {
                    out.push(Invalid::new(
                        format!("{p}.entity_type"),
                        "expected an entity type name",
                    ));
                }
            }
        }
    }

    /// Build the engine decoder this section describes.
    pub fn build(&self) -> Arc<dyn NotificationDecoder> {
        match self {
            DecoderSection::Json(j) => {
                let mut d = match (&j.fixed_type, &j.type_pointer) {
                    (Some(t), _) => JsonDecoder::fixed_type(t.as_str(), j.id.as_str()),
                    (None, Some(p)) => JsonDecoder::typed(p.as_str(), j.id.as_str()),
                    // Rejected by `Config::check`; a type pointer of `/type` is the convention.
                    (None, None) => JsonDecoder::typed("/type", j.id.as_str()),
                };
                if let Some(v) = &j.version {
                    d = d.with_version(v.pointer.as_str(), v.kind);
                }
                for (name, pointer) in &j.fields {
                    d = d.with_field(name.as_str(), pointer.as_str());
                }
                for r in &j.routes {
                    d = d.with_route(Route {
                        from_type: r.from_type.clone(),
                        to_type: Arc::from(r.to_type.as_str()),
                        id_pointer: r.id.clone(),
                        version_pointer: r.version.as_ref().map(|v| v.pointer.clone()),
                    });
                }
                let source = match (&j.correlation, &j.correlation_header) {
                    (Some(p), _) => Some(CorrelationSource::Pointer(p.clone())),
                    (None, Some(h)) => Some(CorrelationSource::Header(h.clone())),
                    (None, None) => None,
                };
                if let Some(id) = source {
                    d = d.with_correlation(Correlation {
                        id,
                        size_pointer: j.action_size.clone(),
                    });
                }
                Arc::new(d)
            }
            DecoderSection::RecordKey(r) => Arc::new(RecordKeyDecoder::new(r.entity_type.as_str())),
        }
    }
}

/// A problem found by [`Config::check`]: the key path (`engine.max_wait`) and what is expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// Dotted key path, arrays as `topics[0]`.
    pub path: String,
    /// What is wrong and what is expected.
    pub message: String,
}

impl Invalid {
    pub(crate) fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Invalid {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl Config {
    /// The engine's Kafka settings (topics include the retry topic when configured).
    pub fn kafka_config(&self) -> KafkaConfig {
        let k = &self.kafka;
        let mut topics: Vec<String> = self.topics.iter().map(|t| t.name.clone()).collect();
        if let Some(r) = &k.retry_topic {
            topics.push(r.clone());
        }
        let mut cfg = KafkaConfig::new(k.brokers.clone(), k.group_id.clone(), topics);
        cfg.group_protocol = k.group_protocol;
        cfg.dead_letter_topic = k.dead_letter_topic();
        cfg.properties = k.properties.clone();
        cfg.consumer_properties = k.consumer_properties.clone();
        cfg.producer_properties = k.producer_properties.clone();
        cfg
    }

    /// Every topic with its decoder (the retry topic decodes entity headers).
    pub fn decoders(&self) -> Vec<(String, Arc<dyn NotificationDecoder>)> {
        let mut out: Vec<(String, Arc<dyn NotificationDecoder>)> = self
            .topics
            .iter()
            .map(|t| (t.name.clone(), t.decoder.build()))
            .collect();
        if let Some(r) = &self.kafka.retry_topic {
            out.push((r.clone(), Arc::new(HeaderKeyDecoder)));
        }
        out
    }

    /// `delivery = "exactly_once"`: what the sink needs, and a transaction timeout the commit
    /// interval fits in.
    fn check_delivery(&self, out: &mut Vec<Invalid>) {
        let refetch_sinks::SinkConfig::Kafka(k) = &self.sink else {
            return;
        };
        if k.delivery != refetch_sinks::config::Delivery::ExactlyOnce {
            return;
        }
        if let Err(e) = refetch_sinks::kafka::transactional_id(k) {
            let path = if k.transactional_id_prefix.is_none() {
                "sink.transactional_id_prefix"
            } else {
                "sink.instance_id"
            };
            out.push(Invalid::new(path, e));
        }
        let needed = self.engine.commit_interval + self.engine.commit_timeout;
        if k.transaction_timeout <= needed {
            out.push(Invalid::new(
                "sink.transaction_timeout",
                format!(
                    "{:?} must exceed engine.commit_interval + engine.commit_timeout ({needed:?}): \
                     a transaction stays open from its first write to the next commit",
                    k.transaction_timeout
                ),
            ));
        }
    }

    /// Check the relations between settings that serde cannot: required values, exclusive
    /// options, the engine's and Kafka's own validation. Returns every problem found.
    pub fn check(&self) -> Vec<Invalid> {
        let mut out = Vec::new();
        if self.kafka.brokers.trim().is_empty() {
            out.push(Invalid::new(
                "kafka.brokers",
                "expected host:port[,host:port...], found an empty string",
            ));
        }
        if self.kafka.group_id.trim().is_empty() {
            out.push(Invalid::new(
                "kafka.group_id",
                "expected a consumer group name, found an empty string",
            ));
        }
        if self.topics.is_empty() {
            out.push(Invalid::new(
                "topics",
                "expected at least one [[topics]] table with a name and a decoder",
            ));
        }
        let r = &self.reconcile;
        if r.page_size == 0 {
            out.push(Invalid::new("reconcile.page_size", "expected at least 1"));
        }
        if r.repair_batch == 0 {
            out.push(Invalid::new(
                "reconcile.repair_batch",
                "expected at least 1",
            ));
        }
        if r.interval.is_some_and(|i| i.is_zero()) {
            out.push(Invalid::new(
                "reconcile.interval",
                "expected a positive duration (leave it unset to turn the schedule off)",
            ));
        }
        if let Some(t) = &r.topic
            && !self.topics.iter().any(|x| &x.name == t)
        {
            out.push(Invalid::new(
                "reconcile.topic",
                format!("`{t}` is not one of the [[topics]]"),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, t) in self.topics.iter().enumerate() {
            if t.name.trim().is_empty() {
                out.push(Invalid::new(
                    format!("topics[{i}].name"),
                    "expected a topic name",
                ));
            } else if !seen.insert(t.name.as_str()) {
                out.push(Invalid::new(
                    format!("topics[{i}].name"),
                    format!("topic `{}` is listed twice", t.name),
                ));
            }
            if Some(&t.name) == self.kafka.retry_topic.as_ref() {
                out.push(Invalid::new(
                    format!("topics[{i}].name"),
                    "the retry topic is subscribed on its own; do not list it in [[topics]]",
                ));
            }
            t.decoder.check(&format!("topics[{i}].decoder"), &mut out);
        }
        self.check_delivery(&mut out);
        let kafka = self.kafka_config();
        if let Err(e) = kafka.validate() {
            let path = match &e {
                refetch::kafka::KafkaSetupError::Property { key, .. } => {
                    if key == "topics" {
                        "topics".to_owned()
                    } else if self.kafka.consumer_properties.contains_key(key) {
                        format!("kafka.consumer_properties.{key}")
                    } else if self.kafka.properties.contains_key(key) {
                        format!("kafka.properties.{key}")
                    } else {
                        "kafka".to_owned()
                    }
                }
                _ => "kafka".to_owned(),
            };
            out.push(Invalid::new(path, e.to_string()));
        }
        for (k, v) in &self.kafka.producer_properties {
            let forced = ["enable.idempotence", "acks"];
            if forced.contains(&k.as_str()) {
                out.push(Invalid::new(
                    format!("kafka.producer_properties.{k}"),
                    format!(
                        "`{k}` = {v:?} is not configurable: dead letters are produced \
                         idempotently with acks=all"
                    ),
                ));
            }
        }
        let engine = self.engine.to_engine();
        if let Err(e) = engine.validate(Some(kafka.max_poll_interval())) {
            out.push(Invalid::new(format!("engine.{}", e.key), e.reason));
        }
        if self.fetcher.sources.is_empty() {
            out.push(Invalid::new(
                "fetcher.sources",
                "expected at least one source, for example [fetcher.sources.customer] with a url",
            ));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            out.push(Invalid::new(
                "log.level",
                format!(
                    "{:?} is not a log filter ({e}): expected a level such as \"info\" or \
                     directives such as \"info,refetch=debug\"",
                    self.log.level
                ),
            ));
        }
        for (t, s) in &self.fetcher.sources {
            if s.url.trim().is_empty() {
                out.push(Invalid::new(
                    format!("fetcher.sources.{t}.url"),
                    "expected a URL template such as \"https://crm.example/customers/{id}\"",
                ));
            }
        }
        out
    }

    /// Warnings about settings that work but weaken a guarantee: keys that can arrive on
    /// several partitions without versions to order them (docs/guarantees.md, per-key order
    /// across processes).
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        let versioned = |j: &JsonDecoderSection| j.version.is_some();
        for t in &self.topics {
            if let DecoderSection::Json(j) = &t.decoder {
                for r in &j.routes {
                    if r.version.is_none() {
                        out.push(format!(
                            "topic `{}` routes `{}` to `{}` without a root version pointer: \
                             if producers key child and root records differently, one {} can \
                             arrive on several partitions and several processes may write it \
                             out of order unless the sink guards on the fetched version",
                            t.name, r.from_type, r.to_type, r.to_type
                        ));
                    }
                }
            }
        }
        let unversioned_topics = self
            .topics
            .iter()
            .filter(|t| match &t.decoder {
                DecoderSection::Json(j) => !versioned(j),
                DecoderSection::RecordKey(_) => true,
            })
            .count();
        if self.topics.len() > 1 && unversioned_topics > 0 {
            out.push(format!(
                "{} notification topics are configured and {} of them carry no versions: a key \
                 that appears on several topics is owned by several partitions (refetch counts \
                 such keys); per-key order across processes then relies on the sink's version \
                 guard",
                self.topics.len(),
                unversioned_topics
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests;
