//! Metrics of the HTTP fetcher, through the `metrics` facade, and the hook that puts a trace
//! context (`traceparent`) on source requests. Every series carries the `source` label (the
//! entity type the source serves).
//!
//! | name | kind | labels | meaning |
//! |---|---|---|---|
//! | `refetch_http_requests_total` | counter | `source`, `outcome` | requests sent, by outcome: `found`, `gone`, `unchanged`, `batch` (a batch answer), `transient`, `permanent` |
//! | `refetch_http_request_seconds` | histogram | `source` | request latency, body included |
//! | `refetch_http_rate_limited_total` | counter | `source` | requests that had to wait for the rate limiter |
//! | `refetch_http_not_attempted_total` | counter | `source` | fetches answered by the open breaker without a request |
//! | `refetch_http_refused_total` | counter | `source` | ids refused before any request (they cannot be placed in a URL) |
//!
//! The breaker's state goes to the engine's `refetch_breaker_open{source}`
//! ([`refetch::metrics::breaker_open`]), which any fetcher with a breaker can set.
//!
//! [`register_source`] creates a source's series with zero values (call it once per source
//! after the recorder is installed) and keeps handles to them, so a request does not look its
//! series up by name and labels.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use metrics::{Counter, Histogram};
use refetch::metrics::{FETCH_BUCKETS, Kind, Series};

/// Requests sent, by outcome.
pub const REQUESTS_TOTAL: &str = "refetch_http_requests_total";
/// Request latency in seconds.
pub const REQUEST_SECONDS: &str = "refetch_http_request_seconds";
/// Rate-limit waits.
pub const RATE_LIMITED_TOTAL: &str = "refetch_http_rate_limited_total";
/// Breaker state (1 open, 0 closed): the engine's per-source series.
pub const BREAKER_OPEN: &str = refetch::metrics::BREAKER_OPEN;
/// Fetches short-circuited by the open breaker.
pub const NOT_ATTEMPTED_TOTAL: &str = "refetch_http_not_attempted_total";
/// Ids refused before any request.
pub const REFUSED_TOTAL: &str = "refetch_http_refused_total";

/// The outcomes of `refetch_http_requests_total`.
pub const OUTCOMES: &[&str] = &[
    "found",
    "gone",
    "unchanged",
    "batch",
    "transient",
    "permanent",
];

/// Every series of the HTTP fetcher.
pub const SERIES: &[Series] = &[
    Series {
        name: REQUESTS_TOTAL,
        kind: Kind::Counter,
        unit: "requests",
        labels: &["source", "outcome"],
        help: "HTTP requests sent to a source, by outcome: found, gone, unchanged, batch (a batch answer), transient, permanent.",
        buckets: &[],
    },
    Series {
        name: REQUEST_SECONDS,
        kind: Kind::Histogram,
        unit: "seconds",
        labels: &["source"],
        help: "HTTP request latency per source, body included.",
        buckets: FETCH_BUCKETS,
    },
    Series {
        name: RATE_LIMITED_TOTAL,
        kind: Kind::Counter,
        unit: "requests",
        labels: &["source"],
        help: "HTTP requests that had to wait for the source's rate limiter.",
        buckets: &[],
    },
    Series {
        name: NOT_ATTEMPTED_TOTAL,
        kind: Kind::Counter,
        unit: "fetches",
        labels: &["source"],
        help: "Fetches answered by the open circuit breaker without a request.",
        buckets: &[],
    },
    Series {
        name: REFUSED_TOTAL,
        kind: Kind::Counter,
        unit: "ids",
        labels: &["source"],
        help: "Ids refused before any request because they cannot be placed in a URL.",
        buckets: &[],
    },
];

struct SourceHandles {
    requests: Vec<(&'static str, Counter)>,
    seconds: Histogram,
    rate_limited: Counter,
    not_attempted: Counter,
    refused: Counter,
}

fn registry() -> &'static RwLock<HashMap<String, Arc<SourceHandles>>> {
    static HANDLES: OnceLock<RwLock<HashMap<String, Arc<SourceHandles>>>> = OnceLock::new();
    HANDLES.get_or_init(|| RwLock::new(HashMap::new()))
}

fn handles(source: &str) -> Option<Arc<SourceHandles>> {
    registry().read().ok()?.get(source).cloned()
}

/// Create the series of `source` with zero values, including its breaker gauge and its
/// outage gauge ([`refetch::metrics::register_source`]), and keep handles to them. Call once
/// per source after the recorder is installed; calling it again registers again.
pub fn register_source(source: &str) {
    refetch::metrics::describe(SERIES);
    refetch::metrics::register_source(source);
    let counter = |name: &'static str| {
        let c = metrics::counter!(name, "source" => source.to_owned());
        c.increment(0);
        c
    };
    let h = SourceHandles {
        requests: OUTCOMES
            .iter()
            .map(|o| {
                let c = metrics::counter!(REQUESTS_TOTAL, "source" => source.to_owned(), "outcome" => *o);
                c.increment(0);
                (*o, c)
            })
            .collect(),
        seconds: metrics::histogram!(REQUEST_SECONDS, "source" => source.to_owned()),
        rate_limited: counter(RATE_LIMITED_TOTAL),
        not_attempted: counter(NOT_ATTEMPTED_TOTAL),
        refused: counter(REFUSED_TOTAL),
    };
    if let Ok(mut map) = registry().write() {
        map.insert(source.to_owned(), Arc::new(h));
    }
}

pub(crate) fn request(source: &str, outcome: &'static str, elapsed: Duration) {
    let h = handles(source);
    match h
        .as_deref()
        .and_then(|h| h.requests.iter().find(|(o, _)| *o == outcome))
    {
        Some((_, c)) => c.increment(1),
        None => {
            metrics::counter!(REQUESTS_TOTAL, "source" => source.to_owned(), "outcome" => outcome)
                .increment(1)
        }
    }
    match h {
        Some(h) => h.seconds.record(elapsed.as_secs_f64()),
        None => metrics::histogram!(REQUEST_SECONDS, "source" => source.to_owned())
            .record(elapsed.as_secs_f64()),
    }
}

pub(crate) fn rate_limited(source: &str) {
    match handles(source) {
        Some(h) => h.rate_limited.increment(1),
        None => metrics::counter!(RATE_LIMITED_TOTAL, "source" => source.to_owned()).increment(1),
    }
}

pub(crate) fn breaker_state(source: &str, open: bool) {
    refetch::metrics::breaker_open(source, open);
}

pub(crate) fn not_attempted(source: &str) {
    match handles(source) {
        Some(h) => h.not_attempted.increment(1),
        None => metrics::counter!(NOT_ATTEMPTED_TOTAL, "source" => source.to_owned()).increment(1),
    }
}

pub(crate) fn refused(source: &str) {
    match handles(source) {
        Some(h) => h.refused.increment(1),
        None => metrics::counter!(REFUSED_TOTAL, "source" => source.to_owned()).increment(1),
    }
}

type TraceHeaders = Box<dyn Fn(&mut reqwest::header::HeaderMap) + Send + Sync>;

fn trace_hook() -> &'static OnceLock<TraceHeaders> {
    static HOOK: OnceLock<TraceHeaders> = OnceLock::new();
    &HOOK
}

/// Install the function that adds trace-context headers (W3C `traceparent`, `tracestate`) for
/// the current span to every source request. The binary installs one when trace export is on;
/// without one, requests carry no trace headers. Only the first call takes effect.
pub fn set_trace_headers(inject: impl Fn(&mut reqwest::header::HeaderMap) + Send + Sync + 'static) {
    let _ = trace_hook().set(Box::new(inject));
}

/// Add the trace headers of the current span to `rb` (nothing without [`set_trace_headers`]).
pub(crate) fn traced(rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
    match trace_hook().get() {
        Some(inject) => {
            let mut headers = reqwest::header::HeaderMap::new();
            inject(&mut headers);
            if headers.is_empty() {
                rb
            } else {
                rb.headers(headers)
            }
        }
        None => rb,
    }
}
