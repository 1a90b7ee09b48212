//! # refetch-http: fetch entities from REST sources, safely
//!
//! The built-in [`refetch::Fetcher`] for sources that serve entities over HTTP. A notification
//! says "customer 42 changed"; this crate turns that into `GET https://crm.example/customers/42`,
//! classifies the answer for the engine, and protects the source while doing it.
//!
//! ## Configure a source per entity type
//!
//! ```
//! use refetch_http::{HttpFetcher, HttpFetcherConfig};
//!
//! let config: HttpFetcherConfig = toml::from_str(r#"
//!     [sources.customer]
//!     url = "https://crm.example/api/customers/{id}"
//!     timeout = "5s"
//!     rate_limit = 50.0                      # requests per second (or { per_second = 200, scope = "group" })
//!     burst = 10
//!     concurrency = 16
//!     auth = { kind = "bearer", token = "${CRM_TOKEN}" }
//!     version = { pointer = "/version", kind = "integer" }
//!     not_found = { pointer = "/error", equals = "not_found" }
//!     batch = { url = "https://crm.example/api/customers?ids={ids}", max = 50 }
//! "#).unwrap();
//! // `${CRM_TOKEN}` is resolved from the environment when the fetcher is built:
//! let fetcher = HttpFetcher::builder()
//!     .env(|name| (name == "CRM_TOKEN").then(|| "t0ken".to_owned()))
//!     .source("customer", config.sources["customer"].clone())
//!     .build()
//!     .unwrap();
//! # use refetch::Fetcher;
//! assert!(fetcher.handles("customer") && !fetcher.handles("order"));
//! assert_eq!(fetcher.batch_limit("customer"), 50);
//! ```
//!
//! In the `refetch` binary the same table sits under the fetcher's section of the TOML file and
//! [`HttpFetcher::from_config`] resolves `${VAR}` from the process environment. Every field is
//! documented on [`SourceConfig`].
//!
//! ## Ids are untrusted
//!
//! Ids come from notification payloads. Each placeholder (`{id}`, `{type}`, declared `fields`) is
//! percent-encoded as one path segment or one query value, so no id can change the scheme, the
//! host or the path: `../admin` becomes `..%2Fadmin`, `a/b` becomes `a%2Fb`. Ids that would still
//! be a dot segment or empty (`""`, `.`, `..`, `.%2E`, `%2e%2e`) are refused with a permanent
//! error before any request, so the engine dead-letters them. Templates are checked when the
//! fetcher is built (see [`template`]).
//!
//! ## What an answer means
//!
//! Every failure carries its class (transient: retried; permanent: dead-lettered) and a
//! [`FailureCause`](refetch::FailureCause), by which the engine judges the source's health: a
//! cause that most keys of a source meet at once (401 everywhere, a maintenance page) is an
//! outage, not poison. The full table is in [`response`]; in short:
//!
//! | answer | outcome | cause |
//! |---|---|---|
//! | 2xx | [`FetchOutcome::Found`](refetch::FetchOutcome::Found): body (or the envelope's inner value), content type, version, `ETag`/`Last-Modified` validators | |
//! | 304 (to a conditional request) | `Unchanged` | |
//! | 404, 410 | `Gone`; with `not_found` configured, only when the body is the source's own not-found answer (otherwise transient: a gateway's 404 is not a deletion) | `Server` when transient |
//! | 401, 403 | permanent | `Auth` |
//! | 429 / 5xx / 408, a timeout / a connection, DNS or TLS error, a body cut short | transient, honouring `Retry-After` (seconds or HTTP date) | `Throttled` / `Server` / `Timeout` / `Connect` |
//! | non-JSON content type / unparsable JSON, missing version or envelope, where JSON is expected | permanent | `ContentType` / `Decode` |
//! | other 4xx, a body over `body_limit`, a redirect to another host (not followed unless configured), too many redirects | permanent | `Other` |
//!
//! ## Protecting the source
//!
//! Per source: a rate limit with burst ([`rate`]; waits are counted), optionally a budget shared
//! by the whole consumer group and split by the partitions each instance owns
//! (`rate_limit = { per_second = 100, scope = "group" }`); a concurrency limit ([`concurrency`]);
//! and a circuit breaker ([`breaker`]) that opens when most calls of a recent time window fail
//! (not on a burst of fast errors; 429 is not a failure) and then answers
//! [`FetchError::NotAttempted`](refetch::FetchError::NotAttempted) (no request, no retry budget
//! spent) with the time until it half-opens. Rate limits, concurrency limits and breaker settings
//! change live with [`HttpFetcher::reconfigure`] (a SIGHUP reload); anything else is refused by
//! name and needs a new fetcher.
//!
//! ## Conditional and batched fetches
//!
//! Validators in [`FetchRequest::validators`](refetch::FetchRequest) become `If-None-Match` and
//! `If-Modified-Since`; the engine fills them only from sink acknowledgements. With a `batch`
//! endpoint, [`Fetcher::fetch_batch`](refetch::Fetcher::fetch_batch) asks for up to `max` ids at
//! once and maps the items back by their id; a key missing from the answer is fetched alone
//! (`missing = "retry"`, the default) or taken as gone (`missing = "gone"`); an id containing the
//! separator is always fetched alone.
//!
//! ## Listings (backfill and reconcile)
//!
//! A source may also declare a `listing` endpoint that pages through every entity (offset/limit,
//! page number, cursor or `Link` header); [`HttpFetcher::list_page`] loads one page under the
//! same concurrency limit, rate limit and breaker as fetches. See [`listing`].
//!
//! ## Secrets
//!
//! Header values and auth fields may use `${VAR}`. Their values never appear in logs, `Debug`
//! output or error messages ([`secret`]). Credentials inside the URL template are refused.
//!
//! ## Metrics
//!
//! See [`telemetry`] for the series (`refetch_http_requests_total`, `refetch_http_request_seconds`,
//! `refetch_http_rate_limited_total`, ...; the breaker sets the engine's `refetch_breaker_open`).

// Tests may panic on unexpected values; library code may not (see the workspace lints).
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod breaker;
pub mod concurrency;
pub mod config;
pub mod fetcher;
pub mod listing;
pub mod rate;
pub mod response;
pub mod secret;
pub mod telemetry;
pub mod template;

pub use breaker::BreakerStatus;
pub use config::{
    AuthConfig, BatchConfig, BreakerConfig, HttpFetcherConfig, MissingKey, NotFoundConfig,
    RateLimit, RateScope, SourceConfig, VersionConfig,
};
pub use fetcher::{ConfigError, HttpFetcher, HttpFetcherBuilder, ReconfigureError};
pub use listing::{
    ListPage, ListedItem, ListingConfig, ListingInfo, ListingTotal, PageToken, Paging,
};
pub use rate::RateStatus;
pub use secret::{Secret, SecretString};
pub use template::{RenderError, TemplateError, UrlTemplate, encode_component};
