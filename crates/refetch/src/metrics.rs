//! Metrics through the [`metrics`] facade.
//!
//! The engine only emits; the binary installs a recorder (Prometheus) and embedders may install
//! their own. Without a recorder every call is a cheap no-op.
//!
//! # Naming
//!
//! Every series is prefixed `refetch_`. Counters end in `_total`; durations are histograms in
//! seconds ending in `_seconds`; sizes are histograms without a unit suffix; a state is a gauge
//! that reads `1` while it holds and `0` otherwise (`_tripped`, `_open`, `_outage`, `_broken`,
//! `_reachable`, `_ready`). A series is always exported with the same label names, never once
//! with and once without a label. [`SERIES`] lists every series of this crate with its kind,
//! unit, labels and help text; the HTTP fetcher and the sinks keep their own lists, and
//! `docs/operations.md` holds the one table of all of them (a test compares it with `/metrics`).
//!
//! # Start-up registration and handles
//!
//! A series that exists only after its first event cannot be alerted on (`increase()` of a
//! series that appears with its first dead letter misses that dead letter). [`register`] creates
//! every series of this crate with its zero value, including each known label value. It also
//! keeps handles to the series the engine updates per record, fetch or write, so those calls
//! skip the recorder's lookup by name and labels; call it once, after the recorder is
//! installed. Without it every call looks its series up (still correct, only slower).
//! [`describe`] gives the recorder the help text of a list of series.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram};

use crate::engine::TopicPartition;

/// The kind of a series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A monotonic counter (`_total`).
    Counter,
    /// A value that goes up and down.
    Gauge,
    /// A histogram with fixed buckets ([`Series::buckets`]).
    Histogram,
}

impl Kind {
    /// The Prometheus `# TYPE` of this kind.
    pub fn prometheus_type(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One exported series: what an operator needs to know to use it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Series {
    /// The metric name.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: Kind,
    /// The unit of its values (`seconds`, `records`, `offsets`, ...; `1` for a 0/1 state).
    pub unit: &'static str,
    /// Its label names, always all present.
    pub labels: &'static [&'static str],
    /// The `# HELP` text.
    pub help: &'static str,
    /// Histogram bucket upper bounds (empty for counters and gauges).
    pub buckets: &'static [f64],
}

/// Buckets for the time a source takes to answer one fetch: 1 ms to 30 s.
pub const FETCH_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Buckets for one sink batch write: 0.5 ms to 30 s.
pub const SINK_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Buckets for notification to durable write: the debounce window and max-wait (hundreds of
/// milliseconds to seconds) up to retries during an outage (an hour).
pub const END_TO_END_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0,
];
/// Buckets for an action's collection time: 10 ms to 10 minutes.
pub const ACTION_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];
/// Buckets for sizes (records per batch, entities per action).
pub const SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0,
];

/// Records received from Kafka.
pub const RECORDS_TOTAL: &str = "refetch_records_total";
/// Notifications merged into a key that already had pending notifications.
pub const COALESCED_TOTAL: &str = "refetch_notifications_coalesced_total";
/// Notifications satisfied without a fetch of their own.
pub const SATISFIED_BY_VERSION_TOTAL: &str = "refetch_notifications_satisfied_by_version_total";
/// Records that were not notifications.
pub const IGNORED_TOTAL: &str = "refetch_records_ignored_total";
/// Records that could not be decoded.
pub const DECODE_ERRORS_TOTAL: &str = "refetch_decode_errors_total";
/// Keys seen on several partitions at once.
pub const KEYS_ON_SEVERAL_PARTITIONS_TOTAL: &str = "refetch_keys_on_several_partitions_total";
/// Fetch outcomes.
pub const FETCHES_TOTAL: &str = "refetch_fetches_total";
/// Fetch latency.
pub const FETCH_SECONDS: &str = "refetch_fetch_seconds";
/// Sink batch latency.
pub const SINK_BATCH_SECONDS: &str = "refetch_sink_batch_seconds";
/// Sink batch size.
pub const SINK_BATCH_SIZE: &str = "refetch_sink_batch_size";
/// Write outcomes.
pub const WRITES_TOTAL: &str = "refetch_writes_total";
/// Dead letters issued.
pub const DEAD_LETTERS_TOTAL: &str = "refetch_dead_letters_total";
/// First notification to durable write.
pub const NOTIFICATION_TO_DURABLE_SECONDS: &str = "refetch_notification_to_durable_seconds";
/// Keys pending or in flight.
pub const PENDING_KEYS: &str = "refetch_pending_keys";
/// Age of the oldest pending notification.
pub const OLDEST_PENDING_SECONDS: &str = "refetch_oldest_pending_seconds";
/// The consumer's position per partition.
pub const CONSUMED_OFFSET: &str = "refetch_consumed_offset";
/// The committed offset per partition.
pub const COMMITTED_OFFSET: &str = "refetch_committed_offset";
/// Partitions paused by backpressure.
pub const PARTITIONS_PAUSED: &str = "refetch_partitions_paused";
/// The gone guard holds deletes.
pub const GONE_GUARD_TRIPPED: &str = "refetch_gone_guard_tripped";
/// Business actions open.
pub const ACTIONS_OPEN: &str = "refetch_actions_open";
/// Business actions whose collection ended.
pub const ACTIONS_COMPLETED_TOTAL: &str = "refetch_actions_completed_total";
/// Business actions that fell back to normal writes.
pub const ACTIONS_INCOMPLETE_TOTAL: &str = "refetch_actions_incomplete_total";
/// Entities per completed action.
pub const ACTION_SIZE: &str = "refetch_action_size";
/// An action's collection time.
pub const ACTION_COMPLETION_SECONDS: &str = "refetch_action_completion_seconds";
/// Members that arrived after their action closed.
pub const ACTION_LATE_MEMBERS_TOTAL: &str = "refetch_action_late_members_total";
/// Transactions of a transactional sink, by outcome.
pub const TRANSACTIONS_TOTAL: &str = "refetch_transactions_total";
/// Notifications fetched again because the transaction of their write aborted.
pub const TRANSACTION_REFETCHED_TOTAL: &str = "refetch_transaction_refetched_total";
/// Automatic offset resets by librdkafka.
pub const OFFSET_RESETS_TOTAL: &str = "refetch_offset_resets_total";
/// A source is judged in outage.
pub const SOURCE_OUTAGE: &str = "refetch_source_outage";
/// A source's circuit breaker is open.
pub const BREAKER_OPEN: &str = "refetch_breaker_open";
/// The broker answers.
pub const BROKER_REACHABLE: &str = "refetch_broker_reachable";
/// The dead-letter topic refuses writes.
pub const DEAD_LETTER_TOPIC_BROKEN: &str = "refetch_dead_letter_topic_broken";
/// The pipeline is ready.
pub const READY: &str = "refetch_ready";
/// Keys held without evidence against them.
pub const KEYS_BLOCKED: &str = "refetch_keys_blocked";
/// Fetcher, sink or dead-letter writer calls that panicked.
pub const PANICS_TOTAL: &str = "refetch_panics_total";
/// Values of the `part` label of `refetch_panics_total`.
pub const PANIC_PARTS: &[&str] = &["fetcher", "sink"];

/// Outcomes of `refetch_fetches_total`.
pub const FETCH_OUTCOMES: &[&str] = &[
    "found",
    "gone",
    "unchanged",
    "stale",
    "permanent",
    "transient",
    "not_attempted",
];
/// Outcomes of `refetch_writes_total`.
pub const WRITE_OUTCOMES: &[&str] = &["durable", "transient", "permanent"];
/// Reasons of `refetch_dead_letters_total` the engine issues.
pub const DEAD_LETTER_REASONS: &[&str] = &[
    crate::dlq::reason::DECODE,
    crate::dlq::reason::ID_TOO_LONG,
    crate::dlq::reason::UNKNOWN_TYPE,
    crate::dlq::reason::FETCH,
    crate::dlq::reason::SINK,
    "action",
];
/// Reasons of `refetch_records_ignored_total` known in advance (a custom decoder may add its own).
pub const IGNORED_REASONS: &[&str] = &["unknown_type"];
/// Outcomes of `refetch_transactions_total`.
pub const TRANSACTION_OUTCOMES: &[&str] = &["committed", "aborted"];
/// Values of the `by` label of `refetch_actions_completed_total`.
pub const ACTION_COMPLETED_BY: &[&str] = &["count", "timeout"];

const fn counter(name: &'static str, unit: &'static str, help: &'static str) -> Series {
    labeled(name, Kind::Counter, unit, &[], help)
}

const fn gauge(name: &'static str, unit: &'static str, help: &'static str) -> Series {
    labeled(name, Kind::Gauge, unit, &[], help)
}

const fn labeled(
    name: &'static str,
    kind: Kind,
    unit: &'static str,
    labels: &'static [&'static str],
    help: &'static str,
) -> Series {
    Series {
        name,
        kind,
        unit,
        labels,
        help,
        buckets: &[],
    }
}

const fn histogram(
    name: &'static str,
    unit: &'static str,
    buckets: &'static [f64],
    help: &'static str,
) -> Series {
    Series {
        name,
        kind: Kind::Histogram,
        unit,
        labels: &[],
        help,
        buckets,
    }
}

/// Every series of the engine crate.
pub const SERIES: &[Series] = &[
    counter(RECORDS_TOTAL, "records", "Records received from Kafka."),
    counter(
        COALESCED_TOTAL,
        "notifications",
        "Notifications merged into a key that already had notifications pending.",
    ),
    counter(
        SATISFIED_BY_VERSION_TOTAL,
        "notifications",
        "Notifications satisfied without a fetch of their own because the sink holds their version or a newer one.",
    ),
    labeled(
        IGNORED_TOTAL,
        Kind::Counter,
        "records",
        &["reason"],
        "Records that were not notifications (ignored by the decoder, or of an entity type no source serves).",
    ),
    counter(
        DECODE_ERRORS_TOTAL,
        "records",
        "Records that could not be decoded (they are dead-lettered).",
    ),
    counter(
        KEYS_ON_SEVERAL_PARTITIONS_TOTAL,
        "notifications",
        "Notifications of a key that had notifications pending or in flight from another partition.",
    ),
    labeled(
        FETCHES_TOTAL,
        Kind::Counter,
        "fetches",
        &["outcome"],
        "Fetch results by outcome: found, gone, unchanged, stale (older than announced, retried), permanent, transient, not_attempted (breaker open or fetcher shutting down).",
    ),
    histogram(
        FETCH_SECONDS,
        "seconds",
        FETCH_BUCKETS,
        "Time the fetcher took for one fetch or one batched fetch.",
    ),
    histogram(
        SINK_BATCH_SECONDS,
        "seconds",
        SINK_BUCKETS,
        "Time one sink batch write took (each attempt counts).",
    ),
    histogram(
        SINK_BATCH_SIZE,
        "records",
        SIZE_BUCKETS,
        "Changes per sink batch write.",
    ),
    labeled(
        WRITES_TOTAL,
        Kind::Counter,
        "changes",
        &["outcome"],
        "Changes the sink acknowledged as durable, or failed (transient, permanent).",
    ),
    labeled(
        DEAD_LETTERS_TOTAL,
        Kind::Counter,
        "records",
        &["reason"],
        "Dead letters issued, by reason: decode, id_too_long, unknown_type, fetch, sink, action.",
    ),
    histogram(
        NOTIFICATION_TO_DURABLE_SECONDS,
        "seconds",
        END_TO_END_BUCKETS,
        "Time from a flight's first notification to its durable write.",
    ),
    gauge(
        PENDING_KEYS,
        "keys",
        "Keys with notifications pending or a fetch in flight.",
    ),
    gauge(
        OLDEST_PENDING_SECONDS,
        "seconds",
        "Age of the oldest notification not yet satisfied (0 when none).",
    ),
    labeled(
        CONSUMED_OFFSET,
        Kind::Gauge,
        "offset",
        &["topic", "partition"],
        "The consumer's position per owned partition: the offset after the last record received.",
    ),
    labeled(
        COMMITTED_OFFSET,
        Kind::Gauge,
        "offset",
        &["topic", "partition"],
        "The offset this process last committed per partition.",
    ),
    gauge(
        PARTITIONS_PAUSED,
        "partitions",
        "Partitions paused by backpressure.",
    ),
    gauge(
        GONE_GUARD_TRIPPED,
        "1",
        "1 while the gone guard holds deletes back (an abnormal share of fetches said gone).",
    ),
    gauge(
        ACTIONS_OPEN,
        "actions",
        "Business actions collecting members or being fetched and written.",
    ),
    labeled(
        ACTIONS_COMPLETED_TOTAL,
        Kind::Counter,
        "actions",
        &["by"],
        "Business actions whose collection ended, by count (every announced member arrived) or timeout.",
    ),
    counter(
        ACTIONS_INCOMPLETE_TOTAL,
        "actions",
        "Business actions whose members fell back to ordinary writes.",
    ),
    histogram(
        ACTION_SIZE,
        "entities",
        SIZE_BUCKETS,
        "Distinct entities per completed business action.",
    ),
    histogram(
        ACTION_COMPLETION_SECONDS,
        "seconds",
        ACTION_BUCKETS,
        "Time from a business action's first member to the end of its collection.",
    ),
    counter(
        ACTION_LATE_MEMBERS_TOTAL,
        "notifications",
        "Action members that arrived after their action closed (handled as ordinary notifications).",
    ),
    labeled(
        TRANSACTIONS_TOTAL,
        Kind::Counter,
        "transactions",
        &["outcome"],
        "Transactions of an exactly-once sink, by outcome: committed (with the input offsets) or aborted (their notifications are fetched again).",
    ),
    counter(
        TRANSACTION_REFETCHED_TOTAL,
        "notifications",
        "Notifications fetched again because the transaction holding their write aborted.",
    ),
    counter(
        OFFSET_RESETS_TOTAL,
        "resets",
        "Automatic offset resets by the Kafka client (notifications skipped or read again).",
    ),
    labeled(
        SOURCE_OUTAGE,
        Kind::Gauge,
        "1",
        &["source"],
        "1 while the source is judged in outage (most keys fail at once); nothing is dead-lettered then.",
    ),
    labeled(
        BREAKER_OPEN,
        Kind::Gauge,
        "1",
        &["source"],
        "1 while the source's circuit breaker is open or half-open (fetches are not attempted).",
    ),
    gauge(
        BROKER_REACHABLE,
        "1",
        "1 while the Kafka brokers answer, 0 while they cannot be reached (or not yet).",
    ),
    gauge(
        DEAD_LETTER_TOPIC_BROKEN,
        "1",
        "1 while the dead-letter topic refuses writes (affected partitions are paused).",
    ),
    gauge(
        READY,
        "1",
        "1 while the pipeline is ready (the same judgement as /readyz), 0 otherwise.",
    ),
    gauge(
        KEYS_BLOCKED,
        "keys",
        "Keys held without evidence against them (their source in outage, no other key of their source succeeding, a breaker open, a delete held): retried with capped backoff, never dead-lettered.",
    ),
    labeled(
        PANICS_TOTAL,
        Kind::Counter,
        "calls",
        &["part"],
        "Fetcher or sink calls that panicked (each became a transient error of its key or batch).",
    ),
];

/// Give the installed recorder the help text of every series in `series`.
pub fn describe(series: &[Series]) {
    for s in series {
        match s.kind {
            Kind::Counter => metrics::describe_counter!(s.name, s.help),
            Kind::Gauge => metrics::describe_gauge!(s.name, s.help),
            Kind::Histogram => metrics::describe_histogram!(s.name, s.help),
        }
    }
}

/// Handles to the series the engine updates per record, fetch or write.
struct Handles {
    records: Counter,
    coalesced: Counter,
    satisfied_by_version: Counter,
    decode_errors: Counter,
    keys_on_several_partitions: Counter,
    fetch_outcomes: Vec<(&'static str, Counter)>,
    fetch_seconds: Histogram,
    sink_batch_seconds: Histogram,
    sink_batch_size: Histogram,
    write_outcomes: Vec<(&'static str, Counter)>,
    end_to_end: Histogram,
    pending_keys: Gauge,
    oldest_pending: Gauge,
    partitions_paused: Gauge,
}

static HANDLES: OnceLock<Handles> = OnceLock::new();

fn handles() -> Option<&'static Handles> {
    HANDLES.get()
}

fn find<'a, T>(list: &'a [(&'static str, T)], label: &str) -> Option<&'a T> {
    list.iter().find(|(l, _)| *l == label).map(|(_, h)| h)
}

/// Create every series of the engine with its zero value, give them their help text, and keep
/// handles to the hot ones (see the module docs). Call once, after the recorder is installed;
/// later calls only register again (harmless).
pub fn register() {
    describe(SERIES);
    let labeled_counters = |name: &'static str, key: &'static str, values: &[&'static str]| {
        for v in values {
            metrics::counter!(name, key => *v).increment(0);
        }
    };
    labeled_counters(IGNORED_TOTAL, "reason", IGNORED_REASONS);
    labeled_counters(DEAD_LETTERS_TOTAL, "reason", DEAD_LETTER_REASONS);
    labeled_counters(ACTIONS_COMPLETED_TOTAL, "by", ACTION_COMPLETED_BY);
    labeled_counters(TRANSACTIONS_TOTAL, "outcome", TRANSACTION_OUTCOMES);
    labeled_counters(PANICS_TOTAL, "part", PANIC_PARTS);
    for name in [
        TRANSACTION_REFETCHED_TOTAL,
        ACTIONS_INCOMPLETE_TOTAL,
        ACTION_LATE_MEMBERS_TOTAL,
        OFFSET_RESETS_TOTAL,
    ] {
        metrics::counter!(name).increment(0);
    }
    for name in [
        GONE_GUARD_TRIPPED,
        ACTIONS_OPEN,
        BROKER_REACHABLE,
        DEAD_LETTER_TOPIC_BROKEN,
        READY,
        KEYS_BLOCKED,
    ] {
        // Registering creates the gauge at 0 and leaves a value already set alone.
        let _ = metrics::gauge!(name);
    }
    let _ = metrics::histogram!(ACTION_SIZE);
    let _ = metrics::histogram!(ACTION_COMPLETION_SECONDS);
    let _ = HANDLES.get_or_init(|| {
        let outcome_counters = |name: &'static str, values: &[&'static str]| {
            values
                .iter()
                .map(|v| {
                    let c = metrics::counter!(name, "outcome" => *v);
                    c.increment(0);
                    (*v, c)
                })
                .collect()
        };
        let c = |name: &'static str| {
            let c = metrics::counter!(name);
            c.increment(0);
            c
        };
        Handles {
            records: c(RECORDS_TOTAL),
            coalesced: c(COALESCED_TOTAL),
            satisfied_by_version: c(SATISFIED_BY_VERSION_TOTAL),
            decode_errors: c(DECODE_ERRORS_TOTAL),
            keys_on_several_partitions: c(KEYS_ON_SEVERAL_PARTITIONS_TOTAL),
            fetch_outcomes: outcome_counters(FETCHES_TOTAL, FETCH_OUTCOMES),
            fetch_seconds: metrics::histogram!(FETCH_SECONDS),
            sink_batch_seconds: metrics::histogram!(SINK_BATCH_SECONDS),
            sink_batch_size: metrics::histogram!(SINK_BATCH_SIZE),
            write_outcomes: outcome_counters(WRITES_TOTAL, WRITE_OUTCOMES),
            end_to_end: metrics::histogram!(NOTIFICATION_TO_DURABLE_SECONDS),
            pending_keys: metrics::gauge!(PENDING_KEYS),
            oldest_pending: metrics::gauge!(OLDEST_PENDING_SECONDS),
            partitions_paused: metrics::gauge!(PARTITIONS_PAUSED),
        }
    });
}

/// Create the per-source series of `source` with their zero values (`refetch_source_outage`,
/// `refetch_breaker_open`). Call once per configured source at start-up.
pub fn register_source(source: &str) {
    let _ = metrics::gauge!(SOURCE_OUTAGE, "source" => source.to_owned());
    let _ = metrics::gauge!(BREAKER_OPEN, "source" => source.to_owned());
}

/// A record was consumed.
pub fn record() {
    record_batch(1);
}

pub(crate) fn coalesced() {
    match handles() {
        Some(h) => h.coalesced.increment(1),
        None => metrics::counter!(COALESCED_TOTAL).increment(1),
    }
}

/// `n` notifications were satisfied by a held version.
pub(crate) fn satisfied_by_version_n(n: u64) {
    match handles() {
        Some(h) => h.satisfied_by_version.increment(n),
        None => metrics::counter!(SATISFIED_BY_VERSION_TOTAL).increment(n),
    }
}

pub(crate) fn ignored(reason: &'static str) {
    metrics::counter!(IGNORED_TOTAL, "reason" => reason).increment(1);
}

pub(crate) fn key_on_several_partitions() {
    match handles() {
        Some(h) => h.keys_on_several_partitions.increment(1),
        None => metrics::counter!(KEYS_ON_SEVERAL_PARTITIONS_TOTAL).increment(1),
    }
}

pub(crate) fn decode_error() {
    match handles() {
        Some(h) => h.decode_errors.increment(1),
        None => metrics::counter!(DECODE_ERRORS_TOTAL).increment(1),
    }
}

pub(crate) fn fetch_outcome(outcome: &'static str) {
    match handles().and_then(|h| find(&h.fetch_outcomes, outcome)) {
        Some(c) => c.increment(1),
        None => metrics::counter!(FETCHES_TOTAL, "outcome" => outcome).increment(1),
    }
}

/// A fetch took `d`.
pub fn fetch_latency(d: Duration) {
    match handles() {
        Some(h) => h.fetch_seconds.record(d.as_secs_f64()),
        None => metrics::histogram!(FETCH_SECONDS).record(d.as_secs_f64()),
    }
}

/// A sink batch took `d`.
pub fn sink_batch(d: Duration, size: usize) {
    match handles() {
        Some(h) => {
            h.sink_batch_seconds.record(d.as_secs_f64());
            h.sink_batch_size.record(size as f64);
        }
        None => {
            metrics::histogram!(SINK_BATCH_SECONDS).record(d.as_secs_f64());
            metrics::histogram!(SINK_BATCH_SIZE).record(size as f64);
        }
    }
}

pub(crate) fn write_durable() {
    write_outcome("durable");
}

pub(crate) fn write_failed(class: &'static str) {
    write_outcome(class);
}

fn write_outcome(outcome: &'static str) {
    match handles().and_then(|h| find(&h.write_outcomes, outcome)) {
        Some(c) => c.increment(1),
        None => metrics::counter!(WRITES_TOTAL, "outcome" => outcome).increment(1),
    }
}

pub(crate) fn dead_letter(reason: &str) {
    metrics::counter!(DEAD_LETTERS_TOTAL, "reason" => reason.to_owned()).increment(1);
}

pub(crate) fn latency(d: Duration) {
    match handles() {
        Some(h) => h.end_to_end.record(d.as_secs_f64()),
        None => metrics::histogram!(NOTIFICATION_TO_DURABLE_SECONDS).record(d.as_secs_f64()),
    }
}

pub(crate) fn committed(tp: &TopicPartition, offset: i64) {
    metrics::gauge!(COMMITTED_OFFSET, "topic" => tp.topic.to_string(),
        "partition" => tp.partition.to_string())
    .set(offset as f64);
}

/// The consumer's position of a partition.
pub fn consumed(tp: &TopicPartition, offset: i64) {
    metrics::gauge!(CONSUMED_OFFSET, "topic" => tp.topic.to_string(),
        "partition" => tp.partition.to_string())
    .set(offset as f64);
}

/// Keys held without evidence against them.
pub fn keys_blocked(n: usize) {
    metrics::gauge!(KEYS_BLOCKED).set(n as f64);
}

/// A fetcher or sink call panicked.
pub(crate) fn panicked(part: &'static str) {
    metrics::counter!(PANICS_TOTAL, "part" => part).increment(1);
}

pub(crate) fn gone_guard(tripped: bool, _ratio: f64) {
    metrics::gauge!(GONE_GUARD_TRIPPED).set(flag(tripped));
}

/// Periodic gauges.
pub fn gauges(pending_keys: usize, oldest_pending: Option<Duration>, paused: usize) {
    let oldest = oldest_pending.map_or(0.0, |d| d.as_secs_f64());
    match handles() {
        Some(h) => {
            h.pending_keys.set(pending_keys as f64);
            h.oldest_pending.set(oldest);
            h.partitions_paused.set(paused as f64);
        }
        None => {
            metrics::gauge!(PENDING_KEYS).set(pending_keys as f64);
            metrics::gauge!(OLDEST_PENDING_SECONDS).set(oldest);
            metrics::gauge!(PARTITIONS_PAUSED).set(paused as f64);
        }
    }
}

pub(crate) fn actions_open(n: usize) {
    metrics::gauge!(ACTIONS_OPEN).set(n as f64);
}

pub(crate) fn action_completed(by: &'static str, size: usize, took: Duration) {
    metrics::counter!(ACTIONS_COMPLETED_TOTAL, "by" => by).increment(1);
    metrics::histogram!(ACTION_SIZE).record(size as f64);
    metrics::histogram!(ACTION_COMPLETION_SECONDS).record(took.as_secs_f64());
}

pub(crate) fn action_incomplete() {
    metrics::counter!(ACTIONS_INCOMPLETE_TOTAL).increment(1);
}

pub(crate) fn transaction(outcome: &'static str) {
    metrics::counter!(TRANSACTIONS_TOTAL, "outcome" => outcome).increment(1);
}

pub(crate) fn transaction_refetched(notes: usize) {
    metrics::counter!(TRANSACTION_REFETCHED_TOTAL).increment(notes as u64);
}

pub(crate) fn action_late_member() {
    metrics::counter!(ACTION_LATE_MEMBERS_TOTAL).increment(1);
}

/// A batch of records was consumed.
pub fn record_batch(n: usize) {
    match handles() {
        Some(h) => h.records.increment(n as u64),
        None => metrics::counter!(RECORDS_TOTAL).increment(n as u64),
    }
}

/// The Kafka client reset a partition's offset on its own.
pub fn offset_reset() {
    metrics::counter!(OFFSET_RESETS_TOTAL).increment(1);
}

/// Whether `source` is judged in outage (`refetch_source_outage{source}`).
pub fn source_outage(source: &str, outage: bool) {
    metrics::gauge!(SOURCE_OUTAGE, "source" => source.to_owned()).set(flag(outage));
}

/// Whether the circuit breaker of `source` is open or half-open (`refetch_breaker_open{source}`).
pub fn breaker_open(source: &str, open: bool) {
    metrics::gauge!(BREAKER_OPEN, "source" => source.to_owned()).set(flag(open));
}

/// Whether the Kafka brokers answer (`refetch_broker_reachable`).
pub fn broker_reachable(up: bool) {
    metrics::gauge!(BROKER_REACHABLE).set(flag(up));
}

/// Whether the dead-letter topic refuses writes (`refetch_dead_letter_topic_broken`).
pub fn dead_letter_topic_broken(broken: bool) {
    metrics::gauge!(DEAD_LETTER_TOPIC_BROKEN).set(flag(broken));
}

/// Whether the pipeline is ready (`refetch_ready`).
pub fn ready(ready: bool) {
    metrics::gauge!(READY).set(flag(ready));
}

fn flag(on: bool) -> f64 {
    if on { 1.0 } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalogue_follows_the_naming_scheme() {
        let mut names = std::collections::HashSet::new();
        for s in SERIES {
            assert!(names.insert(s.name), "{} listed twice", s.name);
            assert!(s.name.starts_with("refetch_"), "{}", s.name);
            assert!(!s.help.is_empty(), "{} has no help", s.name);
            match s.kind {
                Kind::Counter => assert!(s.name.ends_with("_total"), "{}", s.name),
                Kind::Histogram => {
                    assert!(!s.buckets.is_empty(), "{} has no buckets", s.name);
                    assert!(s.buckets.windows(2).all(|w| w[0] < w[1]), "{}", s.name);
                }
                Kind::Gauge => assert!(!s.name.ends_with("_total"), "{}", s.name),
            }
            if s.name.ends_with("_seconds") {
                assert_eq!(s.unit, "seconds", "{}", s.name);
            }
        }
    }
}
