//! Sink metrics, recorded the same way by every sink.
//!
//! - `refetch_sink_writes_total{sink, outcome}`: records written, by outcome: `durable` (part of
//!   an acknowledged batch), `rejected` (listed in `WriteReport::failed`), `transient` or
//!   `permanent` (the whole batch failed with that class).
//! - `refetch_sink_batch_seconds{sink}`: time from the start of a batch write to its result.

use std::time::Instant;

use refetch::{SinkError, WriteReport};

/// Record the outcome of one batch write of `len` records started at `started`.
pub(crate) fn record_batch(
    sink: &'static str,
    len: usize,
    started: Instant,
    result: &Result<WriteReport, SinkError>,
) {
    metrics::histogram!("refetch_sink_batch_seconds", "sink" => sink)
        .record(started.elapsed().as_secs_f64());
    match result {
        Ok(report) => {
            let rejected = report.failed.len().min(len);
            metrics::counter!("refetch_sink_writes_total", "sink" => sink, "outcome" => "durable")
                .increment((len - rejected) as u64);
            if rejected > 0 {
                metrics::counter!("refetch_sink_writes_total", "sink" => sink, "outcome" => "rejected")
                    .increment(rejected as u64);
            }
        }
        Err(e) => {
            metrics::counter!("refetch_sink_writes_total", "sink" => sink, "outcome" => e.class().label())
                .increment(len as u64);
        }
    }
}
