//! Metrics of the HTTP fetcher, through the `metrics` facade. Every series carries the
//! `source` label (the entity type the source serves).
//!
//! | name | kind | labels | meaning |
//! |---|---|---|---|
//! | `refetch_http_requests_total` | counter | `source`, `outcome` | requests sent, by outcome: `found`, `gone`, `unchanged`, `batch` (a batch answer), `transient`, `permanent` |
//! | `refetch_http_request_seconds` | histogram | `source` | request latency, body included |
//! | `refetch_http_rate_limited_total` | counter | `source` | requests that had to wait for the rate limiter |
//! | `refetch_http_breaker_open` | gauge | `source` | 1 while the circuit breaker is open or half-open |
//! | `refetch_http_not_attempted_total` | counter | `source` | fetches answered by the open breaker without a request |
//! | `refetch_http_refused_total` | counter | `source` | ids refused before any request (they cannot be placed in a URL) |

use std::time::Duration;

/// Requests sent, by outcome.
pub const REQUESTS_TOTAL: &str = "refetch_http_requests_total";
/// Request latency in seconds.
pub const REQUEST_SECONDS: &str = "refetch_http_request_seconds";
/// Rate-limit waits.
pub const RATE_LIMITED_TOTAL: &str = "refetch_http_rate_limited_total";
/// Breaker state (1 open, 0 closed).
pub const BREAKER_OPEN: &str = "refetch_http_breaker_open";
/// Fetches short-circuited by the open breaker.
pub const NOT_ATTEMPTED_TOTAL: &str = "refetch_http_not_attempted_total";
/// Ids refused before any request.
pub const REFUSED_TOTAL: &str = "refetch_http_refused_total";

pub(crate) fn request(source: &str, outcome: &'static str, elapsed: Duration) {
    metrics::counter!(REQUESTS_TOTAL, "source" => source.to_owned(), "outcome" => outcome)
        .increment(1);
    metrics::histogram!(REQUEST_SECONDS, "source" => source.to_owned())
        .record(elapsed.as_secs_f64());
}

pub(crate) fn rate_limited(source: &str) {
    metrics::counter!(RATE_LIMITED_TOTAL, "source" => source.to_owned()).increment(1);
}

pub(crate) fn breaker_state(source: &str, open: bool) {
    metrics::gauge!(BREAKER_OPEN, "source" => source.to_owned()).set(if open { 1.0 } else { 0.0 });
}

pub(crate) fn not_attempted(source: &str) {
    metrics::counter!(NOT_ATTEMPTED_TOTAL, "source" => source.to_owned()).increment(1);
}

pub(crate) fn refused(source: &str) {
    metrics::counter!(REFUSED_TOTAL, "source" => source.to_owned()).increment(1);
}
