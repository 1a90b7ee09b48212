//! Turning HTTP responses into fetch outcomes, and failures into an error class and a
//! [`FailureCause`].
//!
//! The engine acts on the class (transient: retry; permanent: dead-letter) and judges source
//! health by the cause: when most recent outcomes of a source share one cause (every key answers
//! 401, every key gets a login page) the source is in outage and nothing is dead-lettered,
//! whatever the class. So the cause says what kind of failure it was, precisely:
//!
//! | answer | outcome or class | cause |
//! |---|---|---|
//! | 2xx | `Found`: body (optionally taken out of an envelope), content type, version, validators | |
//! | 304 to a conditional request | `Unchanged` | |
//! | 404, 410 | `Gone` (with `not_found` set: only when the body is the source's own answer) | |
//! | 404, 410 whose body is not the source's not-found answer (`not_found` set) | transient | `Server` |
//! | 304 to a request without validators | transient | `Server` |
//! | 401, 403 | permanent | `Auth` |
//! | 408 | transient, `Retry-After` | `Timeout` |
//! | 429 | transient, `Retry-After` | `Throttled` |
//! | 5xx | transient, `Retry-After` | `Server` |
//! | any other status (1xx, unknown) | transient | `Server` |
//! | request or body timed out | transient | `Timeout` |
//! | connection refused or reset, DNS, TLS, a body cut short | transient | `Connect` |
//! | 2xx with a content type other than JSON where JSON is expected | permanent | `ContentType` |
//! | 2xx body that is not JSON; no version, envelope, item array or id where configured | permanent | `Decode` |
//! | body over `body_limit` | permanent | `Other` |
//! | a redirect to another host not followed, too many redirects | permanent | `Other` |
//! | another 4xx | permanent | `Other` |
//!
//! Error messages name the status and the reason, never a header value or a URL's secrets.

use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use refetch::decode::{parse_timestamp, parse_version};
use refetch::{Entity, FailureCause, FetchError, Validators, Version, VersionKind};
use reqwest::header::{CONTENT_TYPE, ETAG, HeaderMap, LAST_MODIFIED, LOCATION, RETRY_AFTER};
use serde_json::Value;

use crate::config::NotFoundConfig;

/// The longest `Retry-After` honoured; longer hints are capped.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Where to read a version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum VersionAt {
    Pointer(String, VersionKind),
    Header(reqwest::header::HeaderName, VersionKind),
}

/// How a source's successful bodies are interpreted.
#[derive(Debug, Clone)]
pub(crate) struct BodyRules {
    pub expect_json: bool,
    pub version: Option<VersionAt>,
    pub envelope: Option<String>,
    pub not_found: Option<NotFoundConfig>,
    pub body_limit: usize,
}

/// Parse a `Retry-After` value: delay seconds or an HTTP date (relative to `now`).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER));
    }
    let at = jiff::fmt::rfc2822::DateTimeParser::new()
        .parse_timestamp(value)
        .ok()?;
    let now = jiff::Timestamp::try_from(now).ok()?;
    let wait = now.duration_until(at);
    let wait = Duration::try_from(wait).unwrap_or(Duration::ZERO);
    Some(wait.min(MAX_RETRY_AFTER))
}

pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, SystemTime::now()))
}

/// Is `content_type` JSON (`application/json`, `application/*+json`)?
pub fn is_json_content_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

pub(crate) fn content_type(headers: &HeaderMap) -> Option<String> {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Classify an answer whose status is neither success, not-found nor not-modified. `what`
/// prefixes the message (`"HTTP"`, `"listing answered HTTP"`).
pub(crate) fn status_error(resp: &reqwest::Response, what: &str) -> FetchError {
    let code = resp.status().as_u16();
    let retry_after = || retry_after(resp.headers());
    match code {
        401 | 403 => FetchError::permanent(format!("{what} {code}")).with_cause(FailureCause::Auth),
        408 => FetchError::transient(format!("{what} {code}"))
            .with_retry_after(retry_after())
            .with_cause(FailureCause::Timeout),
        429 => FetchError::transient(format!("{what} {code}"))
            .with_retry_after(retry_after())
            .with_cause(FailureCause::Throttled),
        500..=599 => FetchError::transient(format!("{what} {code}"))
            .with_retry_after(retry_after())
            .with_cause(FailureCause::Server),
        300..=399 => {
            let location = resp
                .headers()
                .get(LOCATION)
                .and_then(|l| l.to_str().ok())
                .and_then(|l| resp.url().join(l).ok());
            match location {
                Some(to) if !same_origin(resp.url(), &to) => FetchError::permanent(format!(
                    "{what} {code}: redirect to another host ({}) not followed",
                    to.host_str().unwrap_or("?")
                )),
                _ => FetchError::permanent(format!("{what} {code}: too many redirects")),
            }
        }
        400..=499 => FetchError::permanent(format!("{what} {code}")),
        _ => FetchError::transient(format!("unexpected {what} {code}"))
            .with_cause(FailureCause::Server),
    }
}

/// Same scheme, host and port.
pub(crate) fn same_origin(a: &url::Url, b: &url::Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

/// Read a body up to `limit` bytes. Too large: permanent; cut short: transient.
pub(crate) async fn read_body(
    response: &mut reqwest::Response,
    limit: usize,
) -> Result<Bytes, FetchError> {
    let too_large = || FetchError::permanent(format!("body larger than {limit} bytes"));
    if let Some(len) = response.content_length()
        && len > limit as u64
    {
        return Err(too_large());
    }
    let mut body = BytesMut::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > limit {
                    return Err(too_large());
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body.freeze()),
            Err(e) => return Err(transport_error(&e, "reading the body")),
        }
    }
}

/// Classify a transport-level error (no HTTP answer, or a body cut short): always transient;
/// a timeout is `Timeout`, anything else about reaching the source (refused, reset, DNS, TLS, a
/// body cut short) `Connect`.
pub(crate) fn transport_error(e: &reqwest::Error, during: &str) -> FetchError {
    let (what, class) = if e.is_timeout() {
        ("timed out", FailureCause::Timeout)
    } else if e.is_connect() {
        ("connection failed", FailureCause::Connect)
    } else if e.is_body() || e.is_decode() {
        ("connection dropped mid-body", FailureCause::Connect)
    } else if e.is_redirect() {
        ("redirect failed", FailureCause::Other)
    } else {
        ("request failed", FailureCause::Connect)
    };
    // The source chain explains the cause (refused, reset, ...); reqwest's own Display would
    // add the URL, which is not needed here.
    let mut cause = String::new();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        cause = s.to_string();
        source = s.source();
    }
    let message = if cause.is_empty() {
        format!("{what} while {during}")
    } else {
        format!("{what} while {during}: {cause}")
    };
    FetchError::transient(message).with_cause(class)
}

pub(crate) fn decode_error(message: String) -> FetchError {
    FetchError::permanent(message).with_cause(FailureCause::Decode)
}

fn version_from_header(
    headers: &HeaderMap,
    name: &reqwest::header::HeaderName,
    kind: VersionKind,
) -> Result<Version, FetchError> {
    let raw = headers
        .get(name)
        .ok_or_else(|| decode_error(format!("version header {name} missing")))?
        .to_str()
        .map_err(|_| decode_error(format!("version header {name} is not text")))?;
    let bad = || decode_error(format!("version header {name} is not a valid {kind:?}"));
    match kind {
        VersionKind::Integer => raw
            .trim()
            .parse::<i64>()
            .map(Version::Int)
            .map_err(|_| bad()),
        VersionKind::Timestamp => parse_timestamp(raw)
            .or_else(|_| {
                jiff::fmt::rfc2822::DateTimeParser::new()
                    .parse_timestamp(raw.trim())
                    .map(|t| Version::Timestamp(t.as_microsecond()))
            })
            .map_err(|_| bad()),
    }
}

fn version_from_body(doc: &Value, pointer: &str, kind: VersionKind) -> Result<Version, FetchError> {
    let v = doc
        .pointer(pointer)
        .filter(|v| !v.is_null())
        .ok_or_else(|| decode_error(format!("version missing at {pointer}")))?;
    parse_version(v, kind).map_err(|e| decode_error(format!("version at {pointer}: {e}")))
}

/// Build the entity of a successful answer (`headers` absent for batch items).
pub(crate) fn entity(
    rules: &BodyRules,
    body: Bytes,
    content_type: Option<String>,
    headers: Option<&HeaderMap>,
    parsed: Option<Value>,
) -> Result<Entity, FetchError> {
    let needs_parse = rules.expect_json
        || rules.envelope.is_some()
        || matches!(rules.version, Some(VersionAt::Pointer(..)));
    if rules.expect_json
        && let Some(ct) = &content_type
        && !is_json_content_type(ct)
    {
        return Err(
            FetchError::permanent(format!("content type {ct:?} where JSON is expected"))
                .with_cause(FailureCause::ContentType),
        );
    }
    let doc = match parsed {
        Some(doc) => Some(doc),
        None if needs_parse => Some(
            serde_json::from_slice::<Value>(&body)
                .map_err(|e| decode_error(format!("body is not valid JSON: {e}")))?,
        ),
        None => None,
    };
    let version = match (&rules.version, &doc) {
        (Some(VersionAt::Pointer(p, kind)), Some(doc)) => Some(version_from_body(doc, p, *kind)?),
        (Some(VersionAt::Header(name, kind)), _) => match headers {
            Some(h) => Some(version_from_header(h, name, *kind)?),
            None => None,
        },
        _ => None,
    };
    let (body, content_type) = match (&rules.envelope, &doc) {
        (Some(p), Some(doc)) => {
            let inner = doc
                .pointer(p)
                .ok_or_else(|| decode_error(format!("envelope has nothing at {p}")))?;
            let bytes = serde_json::to_vec(inner)
                .map_err(|e| decode_error(format!("re-encoding the envelope: {e}")))?;
            (Bytes::from(bytes), Some("application/json".to_owned()))
        }
        (None, Some(doc)) if headers.is_none() => {
            // A batch item: its own JSON text.
            let bytes = serde_json::to_vec(doc)
                .map_err(|e| decode_error(format!("re-encoding an item: {e}")))?;
            (Bytes::from(bytes), Some("application/json".to_owned()))
        }
        _ => (body, content_type),
    };
    let validators = headers.and_then(|h| {
        let v = Validators {
            etag: h.get(ETAG).and_then(|v| v.to_str().ok()).map(str::to_owned),
            last_modified: h
                .get(LAST_MODIFIED)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
        };
        (!v.is_empty()).then_some(v)
    });
    Ok(Entity {
        body,
        content_type,
        version,
        validators,
    })
}

/// Does a 404/410 body match the source's own not-found answer?
pub(crate) fn is_source_not_found(matcher: &NotFoundConfig, body: &[u8]) -> bool {
    if let Some(needle) = &matcher.contains {
        return String::from_utf8_lossy(body).contains(needle.as_str());
    }
    let (Some(pointer), Some(expected)) = (&matcher.pointer, &matcher.equals) else {
        return false;
    };
    let Ok(doc) = serde_json::from_slice::<Value>(body) else {
        return false;
    };
    match doc.pointer(pointer) {
        Some(Value::String(s)) => s == expected,
        Some(other) => *other.to_string() == **expected,
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now),
            Some(Duration::ZERO)
        );
        let later = jiff::Timestamp::from_second(784_111_777 + 30).expect("valid");
        let date = jiff::fmt::rfc2822::DateTimePrinter::new()
            .timestamp_to_rfc9110_string(&later)
            .expect("prints");
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(30)));
        assert_eq!(parse_retry_after("999999999", now), Some(MAX_RETRY_AFTER));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn json_content_types() {
        assert!(is_json_content_type("application/json; charset=utf-8"));
        assert!(is_json_content_type("application/vnd.crm+json"));
        assert!(!is_json_content_type("text/html"));
        assert!(!is_json_content_type("application/jsonp"));
    }

    #[test]
    fn not_found_matchers() {
        let by_pointer = NotFoundConfig {
            pointer: Some("/error".into()),
            equals: Some("not_found".into()),
            contains: None,
        };
        assert!(is_source_not_found(
            &by_pointer,
            br#"{"error":"not_found"}"#
        ));
        assert!(!is_source_not_found(&by_pointer, b"<html>404</html>"));
        let by_text = NotFoundConfig {
            pointer: None,
            equals: None,
            contains: Some("no such customer".into()),
        };
        assert!(is_source_not_found(&by_text, b"error: no such customer 42"));
        assert!(!is_source_not_found(&by_text, b"Not Found"));
    }

    #[test]
    fn entity_extraction_rules() {
        let rules = BodyRules {
            expect_json: true,
            version: Some(VersionAt::Pointer("/meta/rev".into(), VersionKind::Integer)),
            envelope: Some("/data".into()),
            not_found: None,
            body_limit: 1024,
        };
        let body = Bytes::from_static(br#"{"meta":{"rev":"4"},"data":{"name":"Ada"}}"#);
        let e = entity(&rules, body, Some("application/json".into()), None, None).expect("ok");
        assert_eq!(e.version, Some(Version::Int(4)));
        assert_eq!(&e.body[..], br#"{"name":"Ada"}"#);
        let missing = Bytes::from_static(br#"{"data":{}}"#);
        let err = entity(&rules, missing, None, None, None).expect_err("no version");
        assert!(
            err.message().contains("version missing at /meta/rev"),
            "{err}"
        );
        let html = Bytes::from_static(b"<html/>");
        let err =
            entity(&rules, html.clone(), Some("text/html".into()), None, None).expect_err("html");
        assert!(matches!(err, FetchError::Permanent { .. }));
        let err = entity(&rules, html, None, None, None).expect_err("not json");
        assert!(err.message().contains("not valid JSON"), "{err}");
    }
}
