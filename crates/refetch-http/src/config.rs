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
//! rate_limit = 50.0
//! burst = 10
//! concurrency = 16
//! headers = { "X-Api-Key" = "${CRM_API_KEY}" }
//! auth = { kind = "bearer", token = "${CRM_TOKEN}" }
//! version = { pointer = "/version", kind = "integer" }
//! envelope = "/data"
//! not_found = { pointer = "/error", equals = "not_found" }
//! breaker = { failures = 5, cooldown = "10s" }
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
    /// Requests per second to this source (fractions allowed); unset: no rate limit.
    pub rate_limit: Option<f64>,
    /// How many requests may go out at once above the steady rate (default: one second's worth).
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

/// The circuit breaker of a source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Consecutive transient failures (5xx, 429, timeouts, connection errors) that open the
    /// breaker (0: never open). While open, fetches are not attempted and do not spend retry
    /// budget.
    pub failures: u32,
    /// How long the breaker stays open before one probe request is let through.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failures: 5,
            cooldown: Duration::from_secs(10),
        }
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
}
