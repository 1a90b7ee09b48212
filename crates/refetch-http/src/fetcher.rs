//! [`HttpFetcher`]: the built-in [`refetch::Fetcher`] for REST sources.
//!
//! One compiled source per entity type holds its HTTP client (with its own redirect policy),
//! URL templates, secrets, rate limit ([`crate::rate`]), concurrency limit
//! ([`crate::concurrency`]) and circuit breaker ([`crate::breaker`]). A fetch goes through these
//! steps, and stops at the first that refuses:
//!
//! 1. render the URL (an id that cannot be placed safely is a permanent error; no request);
//! 2. take a concurrency slot;
//! 3. ask the circuit breaker whether it is open (open: [`FetchError::NotAttempted`] with the
//!    time until it half-opens; no request, no retry budget spent);
//! 4. wait for the rate limit (waits are counted; an instance that owns no partition of a
//!    group budget gets [`FetchError::NotAttempted`]);
//! 5. take the breaker's admission (it counts the call as in flight from here on);
//! 6. send, read the body under the size limit, classify (see [`crate::response`]).
//!
//! Rate limits, concurrency limits and breaker settings change live with
//! [`HttpFetcher::reconfigure`]; everything else needs a new fetcher.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::future::join_all;
use refetch::{FailureCause, FetchError, FetchOutcome, FetchRequest, Fetcher, OwnershipShare};
use reqwest::header::{
    ACCEPT, HeaderMap, HeaderName, HeaderValue, IF_MODIFIED_SINCE, IF_NONE_MATCH,
};
use serde_json::Value;
use url::Url;

use crate::breaker::{Breaker, BreakerStatus, CallOutcome};
use crate::concurrency::ConcurrencyLimit;
use crate::config::{AuthConfig, BreakerConfig, HttpFetcherConfig, MissingKey, SourceConfig};
use crate::listing::{Listing, read_listing};
use crate::rate::{self, RateBudget, RateStatus, Refusal};
use crate::response::{self, BodyRules, VersionAt};
use crate::secret::{MissingVar, Secret};
use crate::telemetry;
use crate::template::{self, RenderError, TemplateError, UrlTemplate};

/// Why an [`HttpFetcher`] could not be built. Messages name the source and the setting, never a
/// secret's value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A URL template is invalid.
    #[error("source {entity_type}: {error}")]
    Template {
        /// The entity type.
        entity_type: String,
        /// What is wrong.
        error: TemplateError,
    },
    /// A `${VAR}` in a header or auth setting is not set.
    #[error("source {entity_type}: {setting}: {missing}")]
    Env {
        /// The entity type.
        entity_type: String,
        /// Which setting referenced it (for example `headers.X-Api-Key`).
        setting: String,
        /// The variable.
        missing: MissingVar,
    },
    /// Another setting is invalid.
    #[error("source {entity_type}: {message}")]
    Invalid {
        /// The entity type.
        entity_type: String,
        /// What is wrong.
        message: String,
    },
}

enum Auth {
    Bearer(Secret),
    Basic(Secret, Secret),
}

struct Batch {
    url: UrlTemplate,
    max: usize,
    separator: String,
    items: String,
    id: String,
    missing: MissingKey,
}

/// Why [`HttpFetcher::reconfigure`] refused a new configuration. Nothing was applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReconfigureError {
    /// Settings changed that a running fetcher cannot take: build a new fetcher (and the
    /// pipeline around it) to apply them.
    #[error("these settings cannot change while the fetcher runs (a restart applies them): {}", settings.join(", "))]
    NeedsRestart {
        /// The settings, as paths in the fetcher's configuration (for example
        /// `sources.customer.url`, `sources.order` for a source added or removed).
        settings: Vec<String>,
    },
    /// A setting that may change live has an invalid new value.
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

/// One compiled source.
struct Source {
    name: Arc<str>,
    client: reqwest::Client,
    url: UrlTemplate,
    batch: Option<Batch>,
    headers: HeaderMap,
    auth: Option<Auth>,
    timeout: Duration,
    rate: RateBudget,
    permits: ConcurrencyLimit,
    breaker: Arc<Breaker>,
    rules: BodyRules,
    fields: Vec<String>,
    listing: Option<Listing>,
    /// The configuration in force (live changes included), for [`HttpFetcher::reconfigure`].
    config: Mutex<SourceConfig>,
}

/// The built-in HTTP fetcher. Build it with [`HttpFetcher::from_config`] or
/// [`HttpFetcher::builder`]; share it as `Arc<HttpFetcher>`.
pub struct HttpFetcher {
    sources: HashMap<String, Arc<Source>>,
    user_agent: String,
}

impl fmt::Debug for HttpFetcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let templates: BTreeMap<&str, &str> = self
            .sources
            .iter()
            .map(|(t, s)| (t.as_str(), s.url.as_str()))
            .collect();
        f.debug_struct("HttpFetcher")
            .field("sources", &templates)
            .finish()
    }
}

type EnvLookup = Box<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Builds an [`HttpFetcher`] from Rust.
///
/// ```
/// use refetch_http::{HttpFetcher, RateLimit, SourceConfig};
/// let fetcher = HttpFetcher::builder()
///     .source("customer", SourceConfig {
///         rate_limit: Some(RateLimit::per_instance(20.0)),
///         ..SourceConfig::new("https://crm.example/api/customers/{id}")
///     })
///     .build()
///     .expect("valid configuration");
/// # let _ = fetcher;
/// ```
pub struct HttpFetcherBuilder {
    config: HttpFetcherConfig,
    env: EnvLookup,
}

impl fmt::Debug for HttpFetcherBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpFetcherBuilder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl HttpFetcherBuilder {
    /// Fetch `entity_type` from `source`.
    pub fn source(mut self, entity_type: impl Into<String>, source: SourceConfig) -> Self {
        self.config.sources.insert(entity_type.into(), source);
        self
    }

    /// The `User-Agent` header.
    pub fn user_agent(mut self, user_agent: impl Into<String>) -> Self {
        self.config.user_agent = user_agent.into();
        self
    }

    /// Resolve `${VAR}` references with `lookup` instead of the process environment.
    pub fn env(mut self, lookup: impl Fn(&str) -> Option<String> + Send + Sync + 'static) -> Self {
        self.env = Box::new(lookup);
        self
    }

    /// Validate everything and build the fetcher.
    pub fn build(self) -> Result<HttpFetcher, ConfigError> {
        let mut sources = HashMap::new();
        for (entity_type, cfg) in &self.config.sources {
            let source = compile(entity_type, cfg, &self.config.user_agent, &*self.env)?;
            let name = source.name.clone();
            telemetry::breaker_state(&name, false);
            sources.insert(entity_type.clone(), Arc::new(source));
        }
        Ok(HttpFetcher {
            sources,
            user_agent: self.config.user_agent,
        })
    }
}

impl HttpFetcher {
    /// A builder with no sources, resolving `${VAR}` from the process environment.
    pub fn builder() -> HttpFetcherBuilder {
        HttpFetcherBuilder {
            config: HttpFetcherConfig::default(),
            env: Box::new(|name| std::env::var(name).ok()),
        }
    }

    /// Build from configuration, resolving `${VAR}` from the process environment.
    pub fn from_config(config: HttpFetcherConfig) -> Result<HttpFetcher, ConfigError> {
        HttpFetcherBuilder {
            config,
            env: Box::new(|name| std::env::var(name).ok()),
        }
        .build()
    }

    /// The configured entity types.
    pub fn entity_types(&self) -> impl Iterator<Item = &str> {
        self.sources.keys().map(String::as_str)
    }

    /// The URL a request would go to (after every safety check), without sending it. Useful for
    /// `refetch validate` and tests.
    pub fn url_for(&self, request: &FetchRequest) -> Result<Url, FetchError> {
        let source = self.source(request.key.entity_type())?;
        source.render_single(request)
    }

    /// Is the circuit breaker of `entity_type`'s source open (or half-open)?
    pub fn breaker_open(&self, entity_type: &str) -> bool {
        self.sources
            .get(entity_type)
            .is_some_and(|s| s.breaker.is_open())
    }

    /// The circuit breaker of `entity_type`'s source: its state and the window's counts.
    pub fn breaker_status(&self, entity_type: &str) -> Option<BreakerStatus> {
        self.sources.get(entity_type).map(|s| s.breaker.status())
    }

    /// The rate limit of `entity_type`'s source now: configured, this instance's share of a
    /// group budget, and the resulting rate.
    pub fn rate_status(&self, entity_type: &str) -> Option<RateStatus> {
        self.sources.get(entity_type).map(|s| s.rate.status())
    }

    /// The concurrency limit of `entity_type`'s source now (0: unlimited).
    pub fn concurrency_limit(&self, entity_type: &str) -> Option<usize> {
        self.sources.get(entity_type).map(|s| s.permits.limit())
    }

    /// Apply a new configuration to the running fetcher, for a reload (SIGHUP).
    ///
    /// Applied live, per source: `rate_limit` (its rate, burst and scope), `burst`,
    /// `concurrency` and every `breaker` setting; calls already waiting move to the new limits.
    /// Every other setting (the URL templates, headers and auth, timeouts, TLS, redirects, body
    /// rules, batch and listing endpoints, the user agent, adding or removing a source) needs a
    /// new fetcher: then nothing is applied and [`ReconfigureError::NeedsRestart`] names each
    /// such setting. An invalid new value of a live setting is refused the same way
    /// ([`ReconfigureError::Invalid`]), so a failed reload changes nothing. Returns the settings
    /// that changed (empty when none did).
    ///
    /// Only the live settings are checked here; a configuration refused with `NeedsRestart` is
    /// checked when the new fetcher is built ([`HttpFetcher::from_config`]).
    pub fn reconfigure(&self, new: &HttpFetcherConfig) -> Result<Vec<String>, ReconfigureError> {
        let mut restart = Vec::new();
        if new.user_agent != self.user_agent {
            restart.push("user_agent".to_owned());
        }
        let mut names: Vec<&String> = self.sources.keys().chain(new.sources.keys()).collect();
        names.sort();
        names.dedup();
        let mut plans = Vec::new();
        for entity_type in names {
            match (self.sources.get(entity_type), new.sources.get(entity_type)) {
                (Some(source), Some(next)) => {
                    let current = source.current_config();
                    let fixed = restart_settings(&current, next);
                    if fixed.is_empty() {
                        let plan = LivePlan::check(entity_type, next)?;
                        let changed = live_settings(&current, next);
                        if !changed.is_empty() {
                            plans.push((source, next, plan, changed, entity_type));
                        }
                    } else {
                        restart.extend(
                            fixed
                                .into_iter()
                                .map(|f| format!("sources.{entity_type}.{f}")),
                        );
                    }
                }
                (Some(_), None) => restart.push(format!("sources.{entity_type} (removed)")),
                (None, Some(_)) => restart.push(format!("sources.{entity_type} (added)")),
                (None, None) => {}
            }
        }
        if !restart.is_empty() {
            return Err(ReconfigureError::NeedsRestart { settings: restart });
        }
        let mut applied = Vec::new();
        for (source, next, plan, changed, entity_type) in plans {
            source.apply(next, plan);
            tracing::info!(source = %source.name, settings = ?changed, "source reconfigured live");
            applied.extend(
                changed
                    .into_iter()
                    .map(|c| format!("sources.{entity_type}.{c}")),
            );
        }
        Ok(applied)
    }

    pub(crate) fn listing_of(&self, entity_type: &str) -> Option<&Listing> {
        self.sources
            .get(entity_type)
            .and_then(|s| s.listing.as_ref())
    }

    /// One listing request to `entity_type`'s source, under its concurrency limit, breaker and
    /// rate limit; `parse` gets the response headers and the body.
    pub(crate) async fn list_request<T>(
        &self,
        entity_type: &str,
        url: Url,
        parse: impl FnOnce(&HeaderMap, &bytes::Bytes) -> Result<T, FetchError>,
    ) -> Result<T, FetchError> {
        let source = self.source(entity_type)?;
        let (headers, body) = source
            .guarded(
                |r| match r {
                    Ok(_) => "listing",
                    Err(e) => e.class().label(),
                },
                async {
                    let resp = source.request(url).send().await.map_err(|e| {
                        response::transport_error(&e, "sending the listing request")
                    })?;
                    read_listing(resp, source.rules.body_limit, source.rules.expect_json).await
                },
            )
            .await?;
        parse(&headers, &body)
    }

    fn source(&self, entity_type: &str) -> Result<&Arc<Source>, FetchError> {
        self.sources.get(entity_type).ok_or_else(|| {
            FetchError::permanent(format!(
                "no HTTP source is configured for type {entity_type:?}"
            ))
        })
    }
}

fn invalid(entity_type: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        entity_type: entity_type.to_owned(),
        message: message.into(),
    }
}

fn check_pointer(entity_type: &str, setting: &str, p: &str) -> Result<(), ConfigError> {
    if p.is_empty() || p.starts_with('/') {
        Ok(())
    } else {
        Err(invalid(
            entity_type,
            format!("{setting} {p:?} is not a JSON pointer (it must start with '/')"),
        ))
    }
}

/// The settings of `new` that differ from `old` and need a new fetcher.
fn restart_settings(old: &SourceConfig, new: &SourceConfig) -> Vec<&'static str> {
    let mut out = Vec::new();
    macro_rules! fixed {
        ($($field:ident),* $(,)?) => {
            $(if old.$field != new.$field { out.push(stringify!($field)); })*
        };
    }
    fixed!(
        url,
        fields,
        headers,
        auth,
        timeout,
        connect_timeout,
        body_limit,
        expect_json,
        version,
        envelope,
        not_found,
        follow_redirects_to_other_hosts,
        max_redirects,
        ca_file,
        batch,
        listing,
    );
    // A field added to SourceConfig and not sorted into live or fixed above needs a restart.
    let mut same = new.clone();
    same.rate_limit = old.rate_limit;
    same.burst = old.burst;
    same.concurrency = old.concurrency;
    same.breaker = old.breaker.clone();
    if out.is_empty() && same != *old {
        out.push("(a setting that cannot change live)");
    }
    out
}

/// The live settings of `new` that differ from `old`.
fn live_settings(old: &SourceConfig, new: &SourceConfig) -> Vec<&'static str> {
    let mut out = Vec::new();
    if old.rate_limit != new.rate_limit {
        out.push("rate_limit");
    }
    if old.burst != new.burst {
        out.push("burst");
    }
    if old.concurrency != new.concurrency {
        out.push("concurrency");
    }
    if old.breaker != new.breaker {
        out.push("breaker");
    }
    out
}

/// The checked live settings of a source.
struct LivePlan {
    rate: Option<crate::config::RateLimit>,
}

impl LivePlan {
    fn check(entity_type: &str, cfg: &SourceConfig) -> Result<LivePlan, ConfigError> {
        check_breaker(entity_type, &cfg.breaker)?;
        Ok(LivePlan {
            rate: check_rate(entity_type, cfg)?,
        })
    }
}

fn check_rate(
    entity_type: &str,
    cfg: &SourceConfig,
) -> Result<Option<crate::config::RateLimit>, ConfigError> {
    match (&cfg.rate_limit, cfg.burst) {
        (None, Some(_)) => return Err(invalid(entity_type, "burst needs rate_limit")),
        (Some(r), Some(_)) if r.burst.is_some() => {
            return Err(invalid(
                entity_type,
                "burst is set both in rate_limit and beside it; keep one",
            ));
        }
        _ => {}
    }
    rate::resolve(cfg.rate_limit, cfg.burst).map_err(|e| invalid(entity_type, e.to_string()))
}

fn check_breaker(entity_type: &str, b: &BreakerConfig) -> Result<(), ConfigError> {
    if !(b.failure_ratio > 0.0 && b.failure_ratio <= 1.0) {
        return Err(invalid(
            entity_type,
            "breaker.failure_ratio must be above 0 and at most 1",
        ));
    }
    if b.window.is_zero() || b.cooldown.is_zero() {
        return Err(invalid(
            entity_type,
            "breaker.window and breaker.cooldown must be positive",
        ));
    }
    if b.min_calls == 0 || b.probes == 0 {
        return Err(invalid(
            entity_type,
            "breaker.min_calls and breaker.probes must be at least 1",
        ));
    }
    Ok(())
}

fn compile(
    entity_type: &str,
    cfg: &SourceConfig,
    user_agent: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Source, ConfigError> {
    let template_err = |error| ConfigError::Template {
        entity_type: entity_type.to_owned(),
        error,
    };
    if cfg.url.is_empty() {
        return Err(invalid(entity_type, "url is required"));
    }
    for f in &cfg.fields {
        if matches!(f.as_str(), "id" | "type" | "ids") {
            return Err(invalid(
                entity_type,
                format!("field name {f:?} is reserved"),
            ));
        }
    }
    let mut known: Vec<&str> = vec!["id", "type"];
    known.extend(cfg.fields.iter().map(String::as_str));
    let url = UrlTemplate::parse(&cfg.url, &known).map_err(template_err)?;
    if !url.uses("id") {
        return Err(invalid(entity_type, "url must contain {id}"));
    }

    let batch = match &cfg.batch {
        None => None,
        Some(b) => {
            let mut known: Vec<&str> = vec!["ids", "type"];
            known.extend(cfg.fields.iter().map(String::as_str));
            let burl = UrlTemplate::parse(&b.url, &known).map_err(template_err)?;
            if !burl.uses("ids") {
                return Err(invalid(entity_type, "batch.url must contain {ids}"));
            }
            if b.max == 0 {
                return Err(invalid(entity_type, "batch.max must be at least 1"));
            }
            let sep_ok = !b.separator.is_empty()
                && b.separator.len() <= 4
                && b.separator.chars().all(|c| {
                    c.is_ascii_punctuation()
                        && !matches!(c, '/' | '?' | '#' | '%' | '&' | '=' | '\\')
                });
            if !sep_ok {
                return Err(invalid(
                    entity_type,
                    format!(
                        "batch.separator {:?} must be 1-4 punctuation characters other than / ? # % & = \\",
                        b.separator
                    ),
                ));
            }
            check_pointer(entity_type, "batch.items", &b.items)?;
            check_pointer(entity_type, "batch.id", &b.id)?;
            Some(Batch {
                url: burl,
                max: b.max,
                separator: b.separator.clone(),
                items: b.items.clone(),
                id: b.id.clone(),
                missing: b.missing,
            })
        }
    };

    let mut headers = HeaderMap::new();
    headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
    for (name, value) in &cfg.headers {
        let header = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| invalid(entity_type, format!("header name {name:?} is invalid")))?;
        let resolved = value.resolve(env).map_err(|missing| ConfigError::Env {
            entity_type: entity_type.to_owned(),
            setting: format!("headers.{name}"),
            missing,
        })?;
        let mut v = HeaderValue::from_str(resolved.expose()).map_err(|_| {
            invalid(
                entity_type,
                format!("the value of header {name} is not a valid header value"),
            )
        })?;
        v.set_sensitive(true);
        headers.insert(header, v);
    }
    let resolve = |setting: &str, s: &crate::secret::SecretString| {
        s.resolve(env).map_err(|missing| ConfigError::Env {
            entity_type: entity_type.to_owned(),
            setting: setting.to_owned(),
            missing,
        })
    };
    let auth = match &cfg.auth {
        None => None,
        Some(AuthConfig::Bearer { token }) => Some(Auth::Bearer(resolve("auth.token", token)?)),
        Some(AuthConfig::Basic { username, password }) => Some(Auth::Basic(
            resolve("auth.username", username)?,
            resolve("auth.password", password)?,
        )),
    };

    if cfg.timeout.is_zero() || cfg.connect_timeout.is_zero() {
        return Err(invalid(
            entity_type,
            "timeout and connect_timeout must be positive",
        ));
    }
    if cfg.body_limit == 0 {
        return Err(invalid(entity_type, "body_limit must be positive"));
    }
    let live = LivePlan::check(entity_type, cfg)?;

    let version = match &cfg.version {
        None => None,
        Some(v) => match (&v.pointer, &v.header) {
            (Some(p), None) => {
                check_pointer(entity_type, "version.pointer", p)?;
                Some(VersionAt::Pointer(p.clone(), v.kind))
            }
            (None, Some(h)) => Some(VersionAt::Header(
                HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
                    invalid(
                        entity_type,
                        format!("version.header {h:?} is not a header name"),
                    )
                })?,
                v.kind,
            )),
            _ => {
                return Err(invalid(
                    entity_type,
                    "version needs exactly one of pointer and header",
                ));
            }
        },
    };
    if let Some(p) = &cfg.envelope {
        check_pointer(entity_type, "envelope", p)?;
    }
    if let Some(nf) = &cfg.not_found {
        match (&nf.pointer, &nf.equals, &nf.contains) {
            (Some(p), Some(_), None) => check_pointer(entity_type, "not_found.pointer", p)?,
            (None, None, Some(c)) if !c.is_empty() => {}
            _ => {
                return Err(invalid(
                    entity_type,
                    "not_found needs pointer with equals, or a non-empty contains",
                ));
            }
        }
    }

    let listing = cfg
        .listing
        .as_ref()
        .map(|l| {
            Listing::compile(
                entity_type,
                l,
                cfg.version.as_ref().map(|v| (v.pointer.as_deref(), v.kind)),
            )
        })
        .transpose()?;

    let max_redirects = cfg.max_redirects;
    let other_hosts = cfg.follow_redirects_to_other_hosts;
    let policy = reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() > max_redirects {
            return attempt.stop();
        }
        let same = attempt
            .previous()
            .first()
            .is_some_and(|first| same_origin(first, attempt.url()));
        if same || other_hosts {
            attempt.follow()
        } else {
            attempt.stop()
        }
    });
    let mut builder = reqwest::Client::builder()
        .user_agent(user_agent)
        .connect_timeout(cfg.connect_timeout)
        .redirect(policy)
        .no_proxy();
    if let Some(path) = &cfg.ca_file {
        let pem = std::fs::read(path).map_err(|e| {
            invalid(
                entity_type,
                format!("reading ca_file {}: {e}", path.display()),
            )
        })?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            invalid(
                entity_type,
                format!(
                    "ca_file {} holds no usable PEM certificate: {e}",
                    path.display()
                ),
            )
        })?;
        if certs.is_empty() {
            return Err(invalid(
                entity_type,
                format!("ca_file {} holds no certificate", path.display()),
            ));
        }
        builder = builder.tls_certs_merge(certs);
    }
    let client = builder
        .build()
        .map_err(|e| invalid(entity_type, format!("building the HTTP client: {e}")))?;

    let name: Arc<str> = Arc::from(entity_type);
    let gauge_name = name.clone();
    let breaker = Arc::new(Breaker::new(name.clone(), &cfg.breaker, move |open| {
        telemetry::breaker_state(&gauge_name, open);
        if !open {
            tracing::info!(source = %gauge_name, "circuit breaker closed");
        }
    }));

    Ok(Source {
        rate: RateBudget::new(name.clone(), live.rate),
        name,
        client,
        url,
        batch,
        headers,
        auth,
        timeout: cfg.timeout,
        permits: ConcurrencyLimit::new(cfg.concurrency),
        breaker,
        rules: BodyRules {
            expect_json: cfg.expect_json,
            version,
            envelope: cfg.envelope.clone(),
            not_found: cfg.not_found.clone(),
            body_limit: cfg.body_limit,
        },
        fields: cfg.fields.clone(),
        listing,
        config: Mutex::new(cfg.clone()),
    })
}

use response::same_origin;

fn refused(e: RenderError) -> FetchError {
    FetchError::permanent(format!("id cannot be placed in the URL: {e}"))
        .with_cause(FailureCause::Key)
}

impl Source {
    fn current_config(&self) -> SourceConfig {
        self.config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Apply checked live settings.
    fn apply(&self, cfg: &SourceConfig, plan: LivePlan) {
        self.rate.set_limit(plan.rate);
        self.permits.resize(cfg.concurrency);
        self.breaker.update(&cfg.breaker);
        let mut held = self.config.lock().unwrap_or_else(|p| p.into_inner());
        held.rate_limit = cfg.rate_limit;
        held.burst = cfg.burst;
        held.concurrency = cfg.concurrency;
        held.breaker = cfg.breaker.clone();
    }

    fn field<'a>(&self, request: &'a FetchRequest, name: &str) -> Option<template::Value<'a>> {
        match name {
            "id" => Some(template::Value::Raw(request.key.id())),
            "type" => Some(template::Value::Raw(request.key.entity_type())),
            _ if self.fields.iter().any(|f| f == name) => {
                request.field(name).map(template::Value::Raw)
            }
            _ => None,
        }
    }

    fn render_single(&self, request: &FetchRequest) -> Result<Url, FetchError> {
        self.url
            .render(|name| self.field(request, name))
            .map_err(refused)
    }

    fn request(&self, url: Url) -> reqwest::RequestBuilder {
        let rb = self
            .client
            .get(url)
            .headers(self.headers.clone())
            .timeout(self.timeout);
        // `traceparent` of the current span, when trace export is on.
        let rb = telemetry::traced(rb);
        match &self.auth {
            None => rb,
            Some(Auth::Bearer(token)) => rb.bearer_auth(token.expose()),
            Some(Auth::Basic(user, password)) => {
                rb.basic_auth(user.expose(), Some(password.expose()))
            }
        }
    }

    /// Steps 2-4 and the accounting around one request.
    async fn guarded<T, F>(
        &self,
        label: fn(&Result<T, FetchError>) -> &'static str,
        call: F,
    ) -> Result<T, FetchError>
    where
        F: Future<Output = Result<T, FetchError>>,
    {
        let Some(_slot) = self.permits.acquire().await else {
            return Err(FetchError::not_attempted("fetcher is shutting down", None));
        };
        let breaker_open = |wait: Duration| {
            telemetry::not_attempted(&self.name);
            FetchError::not_attempted(
                format!("circuit breaker for {} is open", self.name),
                Some(wait),
            )
        };
        // Ask before waiting for the rate limit (an open breaker answers at once), admit after
        // (a call waiting for its turn is not yet in flight at the source).
        if let Some(wait) = self.breaker.refusal() {
            return Err(breaker_open(wait));
        }
        match self.rate.acquire().await {
            Ok(false) => {}
            Ok(true) => telemetry::rate_limited(&self.name),
            Err(Refusal::ZeroShare(wait)) => {
                telemetry::not_attempted(&self.name);
                return Err(FetchError::not_attempted(
                    format!(
                        "this instance owns no partition, so no share of {}'s group rate limit",
                        self.name
                    ),
                    Some(wait),
                ));
            }
        }
        let pass = self.breaker.admit().map_err(breaker_open)?;
        let started = Instant::now();
        let result = call.await;
        let elapsed = started.elapsed();
        let outcome = label(&result);
        telemetry::request(&self.name, outcome, elapsed);
        tracing::debug!(source = %self.name, outcome, cause = result.as_ref().err().and_then(FetchError::cause).map(|c| c.label()), elapsed_ms = elapsed.as_millis() as u64, "http request");
        pass.record(CallOutcome::of(&result));
        result
    }

    /// One entity: request and classification (step 5).
    async fn exchange(&self, url: Url, request: &FetchRequest) -> Result<FetchOutcome, FetchError> {
        let mut rb = self.request(url);
        let validators = request.validators.as_ref().filter(|v| !v.is_empty());
        if let Some(v) = validators {
            if let Some(etag) = v
                .etag
                .as_deref()
                .and_then(|e| HeaderValue::from_str(e).ok())
            {
                rb = rb.header(IF_NONE_MATCH, etag);
            }
            if let Some(lm) = v
                .last_modified
                .as_deref()
                .and_then(|e| HeaderValue::from_str(e).ok())
            {
                rb = rb.header(IF_MODIFIED_SINCE, lm);
            }
        }
        let mut resp = rb
            .send()
            .await
            .map_err(|e| response::transport_error(&e, "sending the request"))?;
        let status = resp.status();
        match status.as_u16() {
            200..=299 => {
                let headers = resp.headers().clone();
                let body = response::read_body(&mut resp, self.rules.body_limit).await?;
                let content_type = response::content_type(&headers);
                response::entity(&self.rules, body, content_type, Some(&headers), None)
                    .map(FetchOutcome::Found)
            }
            304 if validators.is_some() => Ok(FetchOutcome::Unchanged),
            304 => Err(
                FetchError::transient("304 Not Modified to a request without validators")
                    .with_cause(FailureCause::Server),
            ),
            404 | 410 => match &self.rules.not_found {
                None => Ok(FetchOutcome::Gone),
                Some(matcher) => {
                    let body = response::read_body(&mut resp, self.rules.body_limit.min(64 * 1024))
                        .await
                        .unwrap_or_default();
                    if response::is_source_not_found(matcher, &body) {
                        Ok(FetchOutcome::Gone)
                    } else {
                        Err(FetchError::transient(format!(
                            "HTTP {} whose body is not the source's not-found answer (a gateway or a misrouted request?)",
                            status.as_u16()
                        ))
                        .with_cause(FailureCause::Server))
                    }
                }
            },
            _ => Err(response::status_error(&resp, "HTTP")),
        }
    }

    /// One batch request: the items by id.
    async fn batch_exchange(&self, url: Url) -> Result<HashMap<String, Value>, FetchError> {
        let Some(batch) = &self.batch else {
            return Err(FetchError::permanent("no batch endpoint"));
        };
        let mut resp = self
            .request(url)
            .send()
            .await
            .map_err(|e| response::transport_error(&e, "sending the batch request"))?;
        let code = resp.status().as_u16();
        match code {
            200..=299 => {}
            404 | 410 => {
                return Err(FetchError::transient(format!(
                    "the batch endpoint answered HTTP {code}"
                ))
                .with_cause(FailureCause::Server));
            }
            _ => return Err(response::status_error(&resp, "HTTP")),
        }
        let headers = resp.headers().clone();
        let body = response::read_body(&mut resp, self.rules.body_limit).await?;
        if let Some(ct) = response::content_type(&headers)
            && !response::is_json_content_type(&ct)
        {
            return Err(FetchError::permanent(format!(
                "batch answer has content type {ct:?} where JSON is expected"
            ))
            .with_cause(FailureCause::ContentType));
        }
        let doc: Value = serde_json::from_slice(&body)
            .map_err(|e| response::decode_error(format!("batch body is not valid JSON: {e}")))?;
        let items = match doc.pointer(&batch.items) {
            Some(Value::Array(items)) => items,
            _ => {
                return Err(response::decode_error(format!(
                    "batch body has no array at {:?}",
                    batch.items
                )));
            }
        };
        let mut by_id = HashMap::with_capacity(items.len());
        for item in items {
            let id = match item.pointer(&batch.id) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
                _ => {
                    tracing::warn!(source = %self.name, pointer = %batch.id, "batch item without an id");
                    continue;
                }
            };
            by_id.entry(id).or_insert_with(|| item.clone());
        }
        Ok(by_id)
    }

    async fn fetch(&self, request: &FetchRequest) -> Result<FetchOutcome, FetchError> {
        let url = match self.render_single(request) {
            Ok(url) => url,
            Err(e) => {
                telemetry::refused(&self.name);
                return Err(e);
            }
        };
        self.guarded(
            |r| match r {
                Ok(o) => o.label(),
                Err(e) => e.class().label(),
            },
            self.exchange(url, request),
        )
        .await
    }

    /// A chunk of batchable requests (indices into `requests`): outcomes, plus the indices that
    /// must be fetched alone.
    async fn fetch_chunk(
        &self,
        requests: &[FetchRequest],
        chunk: &[usize],
    ) -> (Vec<(usize, Result<FetchOutcome, FetchError>)>, Vec<usize>) {
        let Some(batch) = &self.batch else {
            return (Vec::new(), chunk.to_vec());
        };
        let first = &requests[chunk[0]];
        let ids: Vec<&str> = chunk.iter().map(|&i| requests[i].key.id()).collect();
        let url = self.url_for_batch(batch, first, &ids);
        let url = match url {
            Ok(url) => url,
            // Cannot happen for ids that rendered alone; fetch them alone to be safe.
            Err(_) => return (Vec::new(), chunk.to_vec()),
        };
        let answer = self
            .guarded(
                |r| match r {
                    Ok(_) => "batch",
                    Err(e) => e.class().label(),
                },
                self.batch_exchange(url),
            )
            .await;
        let mut items = match answer {
            Ok(items) => items,
            // The whole batch was refused: find out per key.
            Err(FetchError::Permanent { message, .. }) => {
                tracing::debug!(source = %self.name, %message, "batch refused; fetching keys alone");
                return (Vec::new(), chunk.to_vec());
            }
            Err(e) => {
                return (
                    chunk.iter().map(|&i| (i, Err(e.clone()))).collect(),
                    Vec::new(),
                );
            }
        };
        let mut done = Vec::with_capacity(chunk.len());
        let mut alone = Vec::new();
        for &i in chunk {
            match items.remove(requests[i].key.id()) {
                Some(item) => {
                    let body = bytes::Bytes::new();
                    let outcome = response::entity(&self.rules, body, None, None, Some(item))
                        .map(FetchOutcome::Found);
                    done.push((i, outcome));
                }
                None => match batch.missing {
                    MissingKey::Gone => done.push((i, Ok(FetchOutcome::Gone))),
                    MissingKey::Retry => alone.push(i),
                },
            }
        }
        (done, alone)
    }

    fn url_for_batch(
        &self,
        batch: &Batch,
        first: &FetchRequest,
        ids: &[&str],
    ) -> Result<Url, RenderError> {
        batch.url.render(|name| match name {
            "ids" => Some(template::Value::List {
                items: ids,
                separator: &batch.separator,
            }),
            _ => self.field(first, name),
        })
    }
}

#[async_trait]
impl Fetcher for HttpFetcher {
    async fn fetch(&self, request: &FetchRequest) -> Result<FetchOutcome, FetchError> {
        let source = self.source(request.key.entity_type())?;
        source.fetch(request).await
    }

    fn handles(&self, entity_type: &str) -> bool {
        self.sources.contains_key(entity_type)
    }

    fn batch_limit(&self, entity_type: &str) -> usize {
        self.sources
            .get(entity_type)
            .and_then(|s| s.batch.as_ref())
            .map_or(1, |b| b.max)
    }

    /// The configured source that serves `entity_type` (`[sources.<type>]`): each type has its
    /// own source, so its own health, breaker and budget.
    fn source_name(&self, entity_type: &str) -> Arc<str> {
        self.sources
            .get(entity_type)
            .map_or_else(|| Arc::from(entity_type), |s| s.name.clone())
    }

    /// Every source with a group-wide `rate_limit` takes `share` of it from now on.
    fn ownership_changed(&self, share: OwnershipShare) {
        for source in self.sources.values() {
            source.rate.set_share(share);
        }
    }

    async fn fetch_batch(
        &self,
        requests: &[FetchRequest],
    ) -> Vec<Result<FetchOutcome, FetchError>> {
        let mut results: Vec<Option<Result<FetchOutcome, FetchError>>> = vec![None; requests.len()];
        let Some(first) = requests.first() else {
            return Vec::new();
        };
        let entity_type = first.key.entity_type();
        let source = match self.source(entity_type) {
            Ok(s) => s.clone(),
            Err(e) => return vec![Err(e); requests.len()],
        };
        let mut alone = Vec::new();
        let mut batchable = Vec::new();
        for (i, r) in requests.iter().enumerate() {
            let same_type = r.key.entity_type() == entity_type;
            match (&source.batch, same_type) {
                (Some(batch), true) => {
                    // Ids that cannot be placed in the single URL are refused the same way here.
                    if let Err(e) = source.render_single(r) {
                        telemetry::refused(&source.name);
                        results[i] = Some(Err(e));
                    } else if r.key.id().contains(batch.separator.as_str())
                        || source.fields.iter().any(|f| r.field(f) != first.field(f))
                    {
                        alone.push(i);
                    } else {
                        batchable.push(i);
                    }
                }
                _ => alone.push(i),
            }
        }
        if let Some(batch) = &source.batch
            && batchable.len() > 1
        {
            let chunks = batchable
                .chunks(batch.max)
                .map(|c| source.fetch_chunk(requests, c));
            for (done, more_alone) in join_all(chunks).await {
                for (i, outcome) in done {
                    results[i] = Some(outcome);
                }
                alone.extend(more_alone);
            }
        } else {
            alone.extend(batchable);
        }
        let singles = alone.iter().map(|&i| async move {
            let r = &requests[i];
            let outcome = match self.source(r.key.entity_type()) {
                Ok(s) => s.fetch(r).await,
                Err(e) => Err(e),
            };
            (i, outcome)
        });
        for (i, outcome) in join_all(singles).await {
            results[i] = Some(outcome);
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(FetchError::transient("request was not processed"))))
            .collect()
    }
}
