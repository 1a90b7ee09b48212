//! Metrics through the [`metrics`] facade.
//!
//! The engine only emits; the binary installs a recorder (Prometheus) and embedders may install
//! their own. Without a recorder every call is a cheap no-op. Names:
//!
//! | metric | kind | labels | meaning |
//! |---|---|---|---|
//! | `refetch_records_total` | counter | | records consumed |
//! | `refetch_notifications_coalesced_total` | counter | | notifications merged into a pending key |
//! | `refetch_notifications_satisfied_by_version_total` | counter | | satisfied without a fetch |
//! | `refetch_records_ignored_total` | counter | `reason` | records that were not notifications |
//! | `refetch_decode_errors_total` | counter | | records that could not be decoded |
//! | `refetch_keys_on_several_partitions_total` | counter | | a key's notifications seen on two partitions at once |
//! | `refetch_fetches_total` | counter | `outcome` | fetch outcomes |
//! | `refetch_fetch_seconds` | histogram | | fetch latency |
//! | `refetch_sink_batch_seconds` | histogram | | sink batch latency (engine side) |
//! | `refetch_writes_total` | counter | `outcome` | changes written (`durable`) or failed |
//! | `refetch_dead_letters_total` | counter | `reason` | dead letters issued |
//! | `refetch_notification_to_durable_seconds` | histogram | | first notification to durable write |
//! | `refetch_pending_keys` | gauge | | keys pending or in flight |
//! | `refetch_oldest_pending_seconds` | gauge | | age of the oldest pending notification |
//! | `refetch_consumed_offset` / `refetch_committed_offset` | gauge | `topic`, `partition` | per partition |
//! | `refetch_partitions_paused` | gauge | | partitions paused by backpressure |
//! | `refetch_gone_guard_tripped` | gauge | | 1 while deletes are held back |
//! | `refetch_actions_open` | gauge | | business actions collecting or being fetched/written |
//! | `refetch_actions_completed_total` | counter | `by` (`count`, `timeout`) | actions whose collection ended |
//! | `refetch_actions_incomplete_total` | counter | | actions whose members fell back to normal writes |
//! | `refetch_action_size` | histogram | | distinct entities per completed action |
//! | `refetch_action_completion_seconds` | histogram | | first member to completion of collection |
//! | `refetch_action_late_members_total` | counter | | members that arrived after their action closed |

use std::time::Duration;

use crate::engine::TopicPartition;

/// A record was consumed.
pub fn record() {
    metrics::counter!("refetch_records_total").increment(1);
}

pub(crate) fn coalesced() {
    metrics::counter!("refetch_notifications_coalesced_total").increment(1);
}

pub(crate) fn satisfied_by_version() {
    metrics::counter!("refetch_notifications_satisfied_by_version_total").increment(1);
}

pub(crate) fn ignored(reason: &'static str) {
    metrics::counter!("refetch_records_ignored_total", "reason" => reason).increment(1);
}

pub(crate) fn key_on_several_partitions() {
    metrics::counter!("refetch_keys_on_several_partitions_total").increment(1);
}

pub(crate) fn decode_error() {
    metrics::counter!("refetch_decode_errors_total").increment(1);
}

pub(crate) fn fetch_outcome(outcome: &'static str) {
    metrics::counter!("refetch_fetches_total", "outcome" => outcome).increment(1);
}

/// A fetch took `d`.
pub fn fetch_latency(d: Duration) {
    metrics::histogram!("refetch_fetch_seconds").record(d.as_secs_f64());
}

/// A sink batch took `d`.
pub fn sink_batch(d: Duration, size: usize) {
    metrics::histogram!("refetch_sink_batch_seconds").record(d.as_secs_f64());
    metrics::histogram!("refetch_sink_batch_size").record(size as f64);
}

pub(crate) fn write_durable() {
    metrics::counter!("refetch_writes_total", "outcome" => "durable").increment(1);
}

pub(crate) fn write_failed(class: &'static str) {
    metrics::counter!("refetch_writes_total", "outcome" => class).increment(1);
}

pub(crate) fn dead_letter(reason: &str) {
    metrics::counter!("refetch_dead_letters_total", "reason" => reason.to_owned()).increment(1);
}

pub(crate) fn latency(d: Duration) {
    metrics::histogram!("refetch_notification_to_durable_seconds").record(d.as_secs_f64());
}

pub(crate) fn committed(tp: &TopicPartition, offset: i64) {
    metrics::gauge!("refetch_committed_offset", "topic" => tp.topic.to_string(),
        "partition" => tp.partition.to_string())
    .set(offset as f64);
}

/// The consumer's position of a partition.
pub fn consumed(tp: &TopicPartition, offset: i64) {
    metrics::gauge!("refetch_consumed_offset", "topic" => tp.topic.to_string(),
        "partition" => tp.partition.to_string())
    .set(offset as f64);
}

pub(crate) fn gone_guard(tripped: bool, _ratio: f64) {
    metrics::gauge!("refetch_gone_guard_tripped").set(if tripped { 1.0 } else { 0.0 });
}

/// Periodic gauges.
pub fn gauges(pending_keys: usize, oldest_pending: Option<Duration>, paused: usize) {
    metrics::gauge!("refetch_pending_keys").set(pending_keys as f64);
    metrics::gauge!("refetch_oldest_pending_seconds")
        .set(oldest_pending.map_or(0.0, |d| d.as_secs_f64()));
    metrics::gauge!("refetch_partitions_paused").set(paused as f64);
}

pub(crate) fn actions_open(n: usize) {
    metrics::gauge!("refetch_actions_open").set(n as f64);
}

pub(crate) fn action_completed(by: &'static str, size: usize, took: Duration) {
    metrics::counter!("refetch_actions_completed_total", "by" => by).increment(1);
    metrics::histogram!("refetch_action_size").record(size as f64);
    metrics::histogram!("refetch_action_completion_seconds").record(took.as_secs_f64());
}

pub(crate) fn action_incomplete() {
    metrics::counter!("refetch_actions_incomplete_total").increment(1);
}

pub(crate) fn action_late_member() {
    metrics::counter!("refetch_action_late_members_total").increment(1);
}

/// A batch of records was consumed.
pub fn record_batch(n: usize) {
    metrics::counter!("refetch_records_total").increment(n as u64);
}

/// Whether the Kafka brokers answer (1) or not (0).
pub fn broker_reachable(up: bool) {
    metrics::gauge!("refetch_broker_reachable").set(if up { 1.0 } else { 0.0 });
}
