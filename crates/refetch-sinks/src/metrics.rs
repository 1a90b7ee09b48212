//! Sink metrics, recorded the same way by every sink. Every series carries the `sink` label (the
//! sink's kind: `postgres`, `sqlite`, `http`, `kafka`, `jsonl`, `stdout`).
//!
//! - `refetch_sink_writes_total{sink, outcome}`: records written, by outcome: `durable` (part of
//!   an acknowledged batch), `rejected` (listed in `WriteReport::failed`), `transient` or
//!   `permanent` (the whole batch failed with that class).
//! - `refetch_sink_version_guard_skips_total{sink}`: older states not written over newer ones
//!   (the version-guarded sinks; 0 for the others).
//!
//! The time a batch takes is measured by the engine, for every sink alike
//! (`refetch_sink_batch_seconds`, without a `sink` label: one process has one sink).

use std::time::Instant;

use refetch::metrics::{Kind, Series};
use refetch::{SinkError, WriteReport};

/// Records written, by outcome.
pub const WRITES_TOTAL: &str = "refetch_sink_writes_total";
/// Older states a version-guarded sink did not write over newer ones.
pub const VERSION_GUARD_SKIPS_TOTAL: &str = "refetch_sink_version_guard_skips_total";

/// The outcomes of `refetch_sink_writes_total`.
pub const OUTCOMES: &[&str] = &["durable", "rejected", "transient", "permanent"];

/// Every series of the sinks.
pub const SERIES: &[Series] = &[
    Series {
        name: WRITES_TOTAL,
        kind: Kind::Counter,
        unit: "records",
        labels: &["sink", "outcome"],
        help: "Records a sink wrote, by outcome: durable, rejected (refused on their own), transient or permanent (the whole batch failed).",
        buckets: &[],
    },
    Series {
        name: VERSION_GUARD_SKIPS_TOTAL,
        kind: Kind::Counter,
        unit: "records",
        labels: &["sink"],
        help: "Older states a version-guarded sink did not write over the newer state it holds.",
        buckets: &[],
    },
];

/// Create the series of the sink of kind `sink` with zero values and give them their help
/// text. Call once at start-up, after the recorder is installed.
pub fn register(sink: &'static str) {
    refetch::metrics::describe(SERIES);
    for outcome in OUTCOMES {
        metrics::counter!(WRITES_TOTAL, "sink" => sink, "outcome" => *outcome).increment(0);
    }
    metrics::counter!(VERSION_GUARD_SKIPS_TOTAL, "sink" => sink).increment(0);
}

/// Record the outcome of one batch write of `len` records started at `started`.
pub(crate) fn record_batch(
    sink: &'static str,
    len: usize,
    _started: Instant,
    result: &Result<WriteReport, SinkError>,
) {
    match result {
        Ok(report) => {
            let rejected = report.failed.len().min(len);
            metrics::counter!(WRITES_TOTAL, "sink" => sink, "outcome" => "durable")
                .increment((len - rejected) as u64);
            if rejected > 0 {
                metrics::counter!(WRITES_TOTAL, "sink" => sink, "outcome" => "rejected")
                    .increment(rejected as u64);
            }
        }
        Err(e) => {
            metrics::counter!(WRITES_TOTAL, "sink" => sink, "outcome" => e.class().label())
                .increment(len as u64);
        }
    }
}
