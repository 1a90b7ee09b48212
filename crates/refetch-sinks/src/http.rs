//! HTTP sink: `PUT` each fetched state, `DELETE` each gone entity, at a URL built from a template.
//!
//! The URL template holds `{type}` and `{id}` placeholders, for example
//! `https://target.example/api/{type}/{id}`. Ids come from untrusted notification payloads, so
//! each placeholder is percent-encoded as *one* path segment (everything but `A-Z a-z 0-9 - . _ ~`
//! is encoded, `/`, `?`, `#` and `%` included): no id can change the scheme, host or path of the
//! request. Ids that are empty, `.` or `..` cannot be one path segment (URL normalisation would
//! resolve them to the collection or its parent), so they are refused as permanent failures of
//! that record without a request. Placeholders may only appear after the host.
//!
//! Requests: `PUT` with the body as fetched and its `Content-Type`, the version in
//! `X-Entity-Version` (configurable) and its kind (`int`/`timestamp`) in `X-Entity-Version-Kind`;
//! `DELETE` without a body. Redirects are not followed.
//!
//! Results: a 2xx response means the target holds the change (a `DELETE` answered 404 or 410
//! also counts: the entity is already gone). 429, 408, 5xx, timeouts and connection errors are
//! transient, and `Retry-After` (seconds or an HTTP date) is passed on to the engine. Any other
//! status (4xx, 3xx) refuses that record for good: it is listed in
//! [`WriteReport::failed`] while its batch-mates are acknowledged. The requests of a batch run
//! concurrently (bounded by `concurrency`) because the keys in a batch are distinct.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use refetch::{Change, Sink, SinkError, WriteReport};
use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use reqwest::{Method, StatusCode};

use crate::body::version_parts;
use crate::config::HttpConfig;
use crate::factory::SinkBuildError;

const SINK: &str = "http";

/// Everything but RFC 3986 unreserved characters is encoded, so a value is exactly one path
/// segment (or one query value).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encode `value` as one path segment. Refuses values that cannot be one segment
/// (`""`, `"."`, `".."`).
pub fn encode_segment(value: &str) -> Result<String, SinkError> {
    if matches!(value, "" | "." | "..") {
        return Err(SinkError::permanent(format!(
            "{value:?} cannot be placed in a URL as one path segment"
        )));
    }
    Ok(utf8_percent_encode(value, SEGMENT).to_string())
}

/// A parsed URL template: literal text with `{type}` and `{id}` placeholders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlTemplate {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Type,
    Id,
}

impl UrlTemplate {
    /// Parse and check a template: an `http`/`https` URL whose placeholders are `{type}` and
    /// `{id}` only, all after the host.
    pub fn parse(template: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            let close = rest[open..].find('}').map(|c| open + c).ok_or_else(|| {
                format!(
                    "unclosed placeholder in URL template at {:?}",
                    &rest[open..]
                )
            })?;
            if open > 0 {
                parts.push(Part::Literal(rest[..open].to_owned()));
            }
            parts.push(match &rest[open + 1..close] {
                "type" => Part::Type,
                "id" => Part::Id,
                other => {
                    return Err(format!(
                        "unknown placeholder {{{other}}} in URL template (use {{type}} and {{id}})"
                    ));
                }
            });
            rest = &rest[close + 1..];
        }
        if rest.contains('}') {
            return Err("unmatched `}` in URL template".to_owned());
        }
        if !rest.is_empty() {
            parts.push(Part::Literal(rest.to_owned()));
        }
        if !parts.contains(&Part::Id) {
            return Err("URL template has no {id} placeholder".to_owned());
        }
        // Placeholders must come after the authority: the first part must hold scheme://host/.
        let head = match parts.first() {
            Some(Part::Literal(s)) => s.as_str(),
            _ => "",
        };
        let after_scheme = head
            .find("://")
            .map(|i| &head[i + 3..])
            .ok_or_else(|| "URL template must start with http:// or https://".to_owned())?;
        if !after_scheme.contains('/') {
            return Err("placeholders must come after the host, in the path or query".to_owned());
        }
        let t = UrlTemplate { parts };
        let probe = t.expand("t", "i").map_err(|e| e.message().to_owned())?;
        let url = reqwest::Url::parse(&probe).map_err(|e| format!("invalid URL template: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("unsupported scheme {:?}", url.scheme()));
        }
        Ok(t)
    }

    /// The URL for one entity, each value encoded as one path segment.
    pub fn expand(&self, entity_type: &str, id: &str) -> Result<String, SinkError> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Type => out.push_str(&encode_segment(entity_type)?),
                Part::Id => out.push_str(&encode_segment(id)?),
            }
        }
        Ok(out)
    }
}

/// Writes changes to an HTTP endpoint.
pub struct HttpSink {
    client: reqwest::Client,
    template: UrlTemplate,
    headers: HeaderMap,
    version_header: HeaderName,
    version_kind_header: HeaderName,
    concurrency: usize,
    max_batch: usize,
}

impl fmt::Debug for HttpSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpSink")
            .field("template", &self.template)
            .field("concurrency", &self.concurrency)
            .finish_non_exhaustive()
    }
}

impl HttpSink {
    /// Build the sink (no request is made).
    pub fn new(cfg: &HttpConfig) -> Result<Self, SinkBuildError> {
        let bad = |m: String| SinkBuildError::config(SINK, m);
        let template = UrlTemplate::parse(&cfg.url_template).map_err(bad)?;
        let mut headers = HeaderMap::new();
        for (name, value) in &cfg.headers {
            let n = HeaderName::from_str(name)
                .map_err(|_| bad(format!("invalid header name {name:?}")))?;
            let mut v = HeaderValue::from_str(value)
                .map_err(|_| bad(format!("invalid value for header {name:?}")))?;
            if crate::config::looks_secret(name) {
                v.set_sensitive(true);
            }
            headers.insert(n, v);
        }
        let version_header = HeaderName::from_str(&cfg.version_header)
            .map_err(|_| bad(format!("invalid version header {:?}", cfg.version_header)))?;
        let version_kind_header = HeaderName::from_str(&format!("{}-Kind", cfg.version_header))
            .map_err(|_| bad(format!("invalid version header {:?}", cfg.version_header)))?;
        let client = reqwest::Client::builder()
            .timeout(cfg.timeout)
            .connect_timeout(cfg.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| bad(format!("cannot build the HTTP client: {e}")))?;
        Ok(HttpSink {
            client,
            template,
            headers,
            version_header,
            version_kind_header,
            concurrency: cfg.concurrency.max(1),
            max_batch: cfg.max_batch.max(1),
        })
    }

    /// [`Self::send`] under one of the batch's concurrency permits.
    async fn send_bounded(
        &self,
        permits: &tokio::sync::Semaphore,
        change: &Change,
    ) -> Result<(), SinkError> {
        let _permit = permits
            .acquire()
            .await
            .map_err(|_| SinkError::transient("concurrency limiter closed"))?;
        self.send(change).await
    }

    async fn send(&self, change: &Change) -> Result<(), SinkError> {
        let key = change.key();
        let url = self.template.expand(key.entity_type(), key.id())?;
        let request = match change {
            Change::Upsert { entity, .. } => {
                let mut r = self
                    .client
                    .request(Method::PUT, &url)
                    .headers(self.headers.clone())
                    .body(entity.body.clone());
                let ct = entity
                    .content_type
                    .as_deref()
                    .unwrap_or("application/octet-stream");
                r = r.header(CONTENT_TYPE, ct);
                if let (Some(v), Some(kind)) = version_parts(entity.version) {
                    r = r
                        .header(&self.version_header, v.to_string())
                        .header(&self.version_kind_header, kind);
                }
                r
            }
            Change::Delete { .. } => self
                .client
                .request(Method::DELETE, &url)
                .headers(self.headers.clone()),
        };
        let response = request.send().await.map_err(|e| {
            // The error text may include the URL; it carries no secrets (headers are not shown).
            let what = if e.is_timeout() {
                "timed out"
            } else if e.is_connect() {
                "connection failed"
            } else {
                "request failed"
            };
            SinkError::transient(format!("{what}: {}", without_url(&e)))
        })?;
        let status = response.status();
        if status.is_success()
            || (matches!(change, Change::Delete { .. })
                && matches!(status, StatusCode::NOT_FOUND | StatusCode::GONE))
        {
            return Ok(());
        }
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(parse_retry_after);
        if status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::REQUEST_TIMEOUT
            || status.is_server_error()
        {
            return Err(SinkError::Transient {
                message: format!("target answered {status}"),
                retry_after,
            });
        }
        Err(SinkError::permanent(format!("target answered {status}")))
    }
}

fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(url) = e.url() {
        s = s.replace(url.as_str(), "<url>");
    }
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// Parse `Retry-After`: delay-seconds or an HTTP date (a date in the past means "now").
pub fn parse_retry_after(value: &HeaderValue) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = jiff::fmt::rfc2822::DateTimeParser::new()
        .parse_timestamp(text)
        .ok()?;
    let secs = at.as_second() - jiff::Timestamp::now().as_second();
    Some(Duration::from_secs(u64::try_from(secs).unwrap_or(0)))
}

#[async_trait]
impl Sink for HttpSink {
    async fn write(&self, batch: &[Change]) -> Result<WriteReport, SinkError> {
        let started = Instant::now();
        let permits = tokio::sync::Semaphore::new(self.concurrency);
        let results =
            futures::future::join_all(batch.iter().map(|c| self.send_bounded(&permits, c))).await;
        let mut failed = Vec::new();
        let mut transient: Option<SinkError> = None;
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Ok(()) => {}
                Err(e @ SinkError::Permanent { .. }) => {
                    tracing::warn!(sink = SINK, key = %batch[i].key(), error = %e, "record refused");
                    failed.push((i, e));
                }
                Err(SinkError::Transient {
                    message,
                    retry_after,
                }) => {
                    // Keep the longest retry hint of the batch.
                    let longest = match &transient {
                        Some(SinkError::Transient {
                            retry_after: prev, ..
                        }) => (*prev).max(retry_after),
                        _ => retry_after,
                    };
                    transient = Some(SinkError::Transient {
                        message,
                        retry_after: longest,
                    });
                }
            }
        }
        failed.sort_by_key(|(i, _)| *i);
        let result = match transient {
            Some(e) => Err(e),
            None => Ok(WriteReport { failed }),
        };
        if let Err(e) = &result {
            tracing::warn!(sink = SINK, records = batch.len(), error = %e, "batch not written");
        }
        crate::metrics::record_batch(SINK, batch.len(), started, &result);
        result
    }

    fn max_batch(&self) -> usize {
        self.max_batch
    }
}

#[cfg(test)]
mod tests;
