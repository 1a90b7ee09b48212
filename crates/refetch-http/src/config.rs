//! Configuration of the HTTP fetcher, as the `refetch` binary reads it from TOML.
//!
//! Plain serde data: every struct refuses unknown fields, durations are humantime strings
//! (`"500ms"`, `"10s"`), and every field has a sane default except the URL template. Header
//! values and auth fields may reference environment variables as `${VAR}`; they are resolved when
//! the fetcher is built and never printed (see [`crate::secret`]).
//!
//! ```toml
//! [sources.customer]
//! url = "https://crm.example/api/customers/{id}"
//! timeout = "5s"
//! rate_limit = 50.0                     # or { per_second = 200, scope = "group" }
//! burst = 10
//! concurrency = 16
//! headers = { "X-Api-Key" = "${CRM_API_KEY}" }
//! auth = { kind = "bearer", token = "${CRM_TOKEN}" }
//! version = { pointer = "/version", kind = "integer" }
//! envelope = "/data"
//! not_found = { pointer = "/error", equals = "not_found" }
//! breaker = { failure_ratio = 0.5, min_calls = 10, window = "30s", cooldown = "10s" }
//! batch = { url = "https://crm.example/api/customers?ids={ids}", max = 50, items = "/items", id = "/id" }
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use refetch::VersionKind;
use serde::{Deserialize, Serialize};

pub use crate::listing::{ListingConfig, Paging};
use crate::secret::SecretString;

/// The HTTP fetcher's configuration: one source per entity type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpFetcherConfig {
    /// Sources by entity type (the type a notification decodes to, for example `customer`).
    /// Only these types are fetched over HTTP.
    pub sources: BTreeMap<String, SourceConfig>,
    /// The `User-Agent` header sent with every request.
    pub user_agent: String,
}

impl Default for HttpFetcherConfig {
    fn default() -> Self {
        HttpFetcherConfig {
            sources: BTreeMap::new(),
            user_agent: concat!("refetch/", env!("CARGO_PKG_VERSION")).to_owned(),
        }
    }
}

/// How to fetch one entity type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    /// URL template (required), for example `https://crm.example/api/customers/{id}`.
    /// Placeholders: `{id}`, `{type}` and the names listed in `fields`; each value is
    /// percent-encoded as one path segment (or one query value). Only the path and the query may
    /// hold placeholders.
    pub url: String,
    /// Names of notification fields (decoded by the topic's decoder) the URL templates may use,
    /// for example `["tenant"]` for `https://{...}/t/{tenant}/customers/{id}`.
    pub fields: Vec<String>,
    /// Extra request headers. Values may reference environment variables as `${VAR}`; they are
    /// treated as secrets (never logged).
    pub headers: BTreeMap<String, SecretString>,
    /// Authentication (`{ kind = "bearer", token = "${TOKEN}" }` or
    /// `{ kind = "basic", username = "...", password = "${PASSWORD}" }`).
    pub auth: Option<AuthConfig>,
    /// Timeout of one request, from connecting until the whole body is read.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Timeout of establishing a connection.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Requests per second to this source: a number for this process alone (fractions
    /// allowed), or `{ per_second = 100, scope = "group" }` for a budget the whole consumer group
    /// shares (see [`RateLimit`]). Unset: no rate limit.
    pub rate_limit: Option<RateLimit>,
    /// How many requests may go out at once above the steady rate (default: one second's worth).
    /// May also be given inside the `rate_limit` table, not in both places.
    pub burst: Option<u32>,
    /// Most requests in flight to this source at once (0: unlimited).
    pub concurrency: usize,
    /// The circuit breaker that stops requests while the source keeps failing.
    pub breaker: BreakerConfig,
    /// Largest response body accepted, in bytes; a larger one is a permanent error for the key.
    pub body_limit: usize,
    /// Expect JSON: a response whose content type is not JSON, or whose body does not parse,
    /// is a permanent error for the key.
    pub expect_json: bool,
    /// Where the entity's version is: a JSON pointer into the body or a response header.
    pub version: Option<VersionConfig>,
    /// JSON pointer to the entity inside an envelope (for example `/data`); the extracted value
    /// becomes the entity body. Unset: the whole body is the entity.
    pub envelope: Option<String>,
    /// The source's own not-found answer. When set, a 404/410 is taken as a deletion only if its
    /// body matches; any other 404 (a gateway's, a misrouted request's) is transient. Unset: every
    /// 404/410 is a deletion.
    pub not_found: Option<NotFoundConfig>,
    /// Follow redirects to another host (scheme, host or port). Off by default: custom headers
    /// (for example API keys) would be sent to that host. Same-host redirects are followed.
    pub follow_redirects_to_other_hosts: bool,
    /// Most redirects followed for one request.
    pub max_redirects: usize,
    /// A PEM file of CA certificates trusted for this source's HTTPS in addition to the
    /// system's (for example a company CA). Read when the fetcher is built.
    pub ca_file: Option<std::path::PathBuf>,
    /// A multi-id endpoint for batched fetches.
    pub batch: Option<BatchConfig>,
    /// A listing endpoint that names every entity of the type, page by page, for `refetch
    /// backfill` and `refetch reconcile` (see [`ListingConfig`]).
    pub listing: Option<ListingConfig>,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            url: String::new(),
            fields: Vec::new(),
            headers: BTreeMap::new(),
            auth: None,
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            rate_limit: None,
            burst: None,
            concurrency: 32,
            breaker: BreakerConfig::default(),
            body_limit: 4 * 1024 * 1024,
            expect_json: true,
            version: None,
            envelope: None,
            not_found: None,
            follow_redirects_to_other_hosts: false,
            max_redirects: 3,
            ca_file: None,
            batch: None,
            listing: None,
        }
    }
}

impl SourceConfig {
    /// A source with URL template `url` and defaults for everything else.
    pub fn new(url: impl Into<String>) -> Self {
        SourceConfig {
            url: url.into(),
            ..SourceConfig::default()
        }
    }
}

/// Authentication for a source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum AuthConfig {
    /// `Authorization: Bearer <token>`.
    Bearer {
        /// The token (use `${VAR}`).
        token: SecretString,
    },
    /// `Authorization: Basic ...`.
    Basic {
        /// The user name.
        username: SecretString,
        /// The password (use `${VAR}`).
        password: SecretString,
    },
}

/// The circuit breaker of a source: it judges the *share* of failed calls over a time window,
/// not a run of consecutive failures, so a flaky source whose errors come back faster than its
/// successes does not trip it.
///
/// It opens when, within `window`, at least `failures` calls failed, at least `min_calls` calls
/// were made (calls still in flight count, as calls that have not failed), and the failed share
/// is at least `failure_ratio`. Throttling (429) counts neither way. While open, fetches are not
/// attempted (no request, no retry budget spent) and carry the time until it half-opens; after
/// `cooldown` it lets `probes` calls through: that many successes close it, one failure opens it
/// again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Fewest failed calls in the window before the breaker may open (0: it never opens).
    pub failures: u32,
    /// The failed share of the window's calls (in flight included) at which it opens, in
    /// `(0, 1]`.
    pub failure_ratio: f64,
    /// Fewest calls in the window (in flight included) before the share is judged at all.
    pub min_calls: u32,
    /// How far back calls are counted.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// How long the breaker stays open before it lets probes through.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
    /// Probe calls let through while half-open; that many successes close the breaker.
    pub probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failures: 5,
            failure_ratio: 0.5,
            min_calls: 10,
            window: Duration::from_secs(30),
            cooldown: Duration::from_secs(10),
            probes: 3,
        }
    }
}

/// A source's rate limit: requests per second for this process, or a budget shared by the
/// consumer group.
///
/// In TOML either a number (`rate_limit = 50.0`: this process alone, the old shape) or a table:
///
/// ```toml
/// rate_limit = { per_second = 100, burst = 20, scope = "group" }
/// ```
///
/// With `scope = "group"` every instance of the group takes the share of the budget that
/// matches the partitions it owns of the subscribed topics (see
/// [`refetch::Fetcher::ownership_changed`]): two of six partitions give a third of `per_second`
/// (and of `burst`). An instance that owns no partition sends nothing. A process that never
/// joins the group (`refetch backfill`, `refetch fetch`) takes the whole budget.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Requests per second (fractions allowed).
    pub per_second: f64,
    /// Requests that may go out at once above the steady rate; unset: the source's `burst`, or
    /// one second's worth.
    pub burst: Option<u32>,
    /// Who shares the budget.
    pub scope: RateScope,
}

impl RateLimit {
    /// `per_second` for this process alone.
    pub fn per_instance(per_second: f64) -> Self {
        RateLimit {
            per_second,
            burst: None,
            scope: RateScope::Instance,
        }
    }

    /// `per_second` shared by the consumer group.
    pub fn per_group(per_second: f64) -> Self {
        RateLimit {
            per_second,
            burst: None,
            scope: RateScope::Group,
        }
    }
}

impl From<f64> for RateLimit {
    fn from(per_second: f64) -> Self {
        RateLimit::per_instance(per_second)
    }
}

/// Who shares a [`RateLimit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RateScope {
    /// This process alone: every instance sends up to the whole rate.
    #[default]
    Instance,
    /// The whole consumer group: each instance takes the share of the partitions it owns.
    Group,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimitTable {
    per_second: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    burst: Option<u32>,
    #[serde(default)]
    scope: RateScope,
}

impl Serialize for RateLimit {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if self.scope == RateScope::Instance && self.burst.is_none() {
            serializer.serialize_f64(self.per_second)
        } else {
            RateLimitTable {
                per_second: self.per_second,
                burst: self.burst,
                scope: self.scope,
            }
            .serialize(serializer)
        }
    }
}

impl<'de> Deserialize<'de> for RateLimit {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = RateLimit;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    "requests per second (a number such as 50.0), or a table such as \
                     { per_second = 100, scope = \"group\" }",
                )
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<RateLimit, E> {
                Ok(RateLimit::per_instance(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<RateLimit, E> {
                Ok(RateLimit::per_instance(v as f64))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<RateLimit, E> {
                Ok(RateLimit::per_instance(v as f64))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<RateLimit, A::Error> {
                let t =
                    RateLimitTable::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(RateLimit {
                    per_second: t.per_second,
                    burst: t.burst,
                    scope: t.scope,
                })
            }
        }
        deserializer.deserialize_any(Visit)
    }
}

/// Where the entity's version is read from. Set exactly one of `pointer` and `header`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionConfig {
    /// JSON pointer into the (whole, not enveloped) body, for example `/version`.
    pub pointer: Option<String>,
    /// A response header, for example `X-Version`. Not available for batched fetches.
    pub header: Option<String>,
    /// `integer` or `timestamp` (RFC 3339, epoch milliseconds, or an HTTP date in a header).
    pub kind: VersionKind,
}

/// How to recognise the source's own not-found answer. Set `pointer` with `equals`, or
/// `contains`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotFoundConfig {
    /// JSON pointer into the 404 body, for example `/error`.
    pub pointer: Option<String>,
    /// The value expected at `pointer` (a string, or the JSON text of another value).
    pub equals: Option<String>,
    /// A substring the 404 body must contain.
    pub contains: Option<String>,
}

/// A multi-id endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    /// URL template with an `{ids}` placeholder, for example
    /// `https://crm.example/api/customers?ids={ids}`. Each id is encoded as a query value (or a
    /// path segment part) and joined by `separator`.
    pub url: String,
    /// Most ids in one request.
    pub max: usize,
    /// The separator between ids; an id that contains it is fetched on its own.
    pub separator: String,
    /// JSON pointer to the array of items in the response (`""` when the body is the array).
    pub items: String,
    /// JSON pointer to an item's id (a string or an integer).
    pub id: String,
    /// What a key missing from the response means.
    pub missing: MissingKey,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            url: String::new(),
            max: 50,
            separator: ",".to_owned(),
            items: "/items".to_owned(),
            id: "/id".to_owned(),
            missing: MissingKey::Retry,
        }
    }
}

/// What a key missing from a batch response means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissingKey {
    /// Fetch that key on its own (a 404 there makes it gone). The safe default.
    #[default]
    Retry,
    /// The key is gone (only when the endpoint reliably lists every existing id).
    Gone,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_toml_with_defaults_and_refuses_unknown_fields() {
        let cfg: HttpFetcherConfig = toml::from_str(
            r#"
            [sources.customer]
            url = "https://crm.example/customers/{id}"
            timeout = "500ms"
            auth = { kind = "bearer", token = "${T}" }
            version = { header = "X-Version", kind = "timestamp" }
            batch = { url = "https://crm.example/customers?ids={ids}", missing = "gone" }
            "#,
        )
        .expect("parses");
        let c = &cfg.sources["customer"];
        assert_eq!(c.timeout, Duration::from_millis(500));
        assert_eq!(c.breaker, BreakerConfig::default());
        assert_eq!(c.batch.as_ref().map(|b| b.missing), Some(MissingKey::Gone));
        assert_eq!(c.batch.as_ref().map(|b| b.max), Some(50));
        assert!(!format!("{cfg:?}").contains("${T}"));

        for bad in [
            "[sources.c]\nurl = \"http://h/{id}\"\ntimeuot = \"1s\"",
            "[sources.c]\nurl = \"http://h/{id}\"\nauth = { kind = \"bearer\", token = \"x\", extra = 1 }",
            "[sources.c]\nurl = \"http://h/{id}\"\nbreaker = { failures = 1, colldown = \"1s\" }",
            "nope = 1",
        ] {
            assert!(toml::from_str::<HttpFetcherConfig>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rate_limits_read_in_both_shapes_and_round_trip() {
        let read = |v: &str| {
            toml::from_str::<HttpFetcherConfig>(&format!(
                "[sources.c]\nurl = \"http://h/{{id}}\"\nrate_limit = {v}\n"
            ))
            .map(|c| c.sources["c"].rate_limit)
        };
        assert_eq!(read("50.0").unwrap(), Some(RateLimit::per_instance(50.0)));
        assert_eq!(read("7").unwrap(), Some(RateLimit::per_instance(7.0)));
        assert_eq!(
            read(r#"{ per_second = 100, burst = 20, scope = "group" }"#).unwrap(),
            Some(RateLimit {
                per_second: 100.0,
                burst: Some(20),
                scope: RateScope::Group
            })
        );
        assert_eq!(
            read("{ per_second = 2.5 }").unwrap(),
            Some(RateLimit::per_instance(2.5))
        );
        for (bad, says) in [
            (
                r#""fast""#,
                "requests per second (a number such as 50.0), or a table",
            ),
            (
                r#"{ per_second = 1, scope = "cluster" }"#,
                "unknown variant `cluster`",
            ),
            ("{ per_sec = 1 }", "unknown field `per_sec`"),
            ("{ scope = \"group\" }", "missing field `per_second`"),
        ] {
            let e = read(bad).expect_err(bad).to_string();
            assert!(e.contains(says), "{bad}: {e}");
            assert!(e.contains("line 3"), "{e}");
        }
        for limit in [
            RateLimit::per_instance(50.0),
            RateLimit::per_group(10.0),
            RateLimit {
                burst: Some(4),
                ..RateLimit::per_instance(1.0)
            },
        ] {
            let mut cfg = HttpFetcherConfig::default();
            cfg.sources.insert(
                "c".into(),
                SourceConfig {
                    rate_limit: Some(limit),
                    ..SourceConfig::new("http://h/{id}")
                },
            );
            let text = toml::to_string(&cfg).expect("serializes");
            let back: HttpFetcherConfig = toml::from_str(&text).expect("reads back");
            assert_eq!(back, cfg, "{text}");
        }
    }
}
