//! Dead letters: records that cannot be handled go to a dead-letter topic, with the reason.
//!
//! A dead letter is a write like any other (invariant 11): the notifications it stands for are
//! satisfied only when the broker acknowledged it. The producer is idempotent with `acks=all`; a
//! transient failure is retried and holds the commit point; a record too large for the broker is
//! written truncated with its original size in a header; a permanent failure (topic missing, not
//! authorised) pauses consumption and fails readiness.
//!
//! Record layout:
//! - records that could not be decoded (or whose id is unusable) keep their original key and
//!   payload;
//! - records of a key whose fetch or write failed for good carry the entity key (`type:id`) as
//!   the record key and a JSON payload naming the entity and every coalesced notification
//!   (`{"entity_type","entity_id","version","notifications":[{"topic","partition","offset"}]}`).
//!   Redrive re-fetches the entity by key, so the original payloads need not be kept in memory.
//!
//! Headers (all UTF-8): `refetch.error`, `refetch.error.class` (`transient`/`permanent`),
//! `refetch.reason` (a stable label such as `decode`, `id_too_long`, `fetch`, `sink`,
//! `unknown_type`), `refetch.source.topic`, `refetch.source.partition`, `refetch.source.offset`
//! (the oldest notification), `refetch.attempts`, `refetch.first_seen` (RFC 3339),
//! `refetch.entity.type` and `refetch.entity.id` where known.

use std::time::{Duration, SystemTime};

/// Stable reason labels written to `refetch.reason`.
pub mod reason {
    /// The record could not be decoded.
    pub const DECODE: &str = "decode";
    /// The id is longer than the configured limit.
    pub const ID_TOO_LONG: &str = "id_too_long";
    /// No fetcher serves the entity type and the policy is to dead-letter.
    pub const UNKNOWN_TYPE: &str = "unknown_type";
    /// The fetch failed permanently or spent its retry budget.
    pub const FETCH: &str = "fetch";
    /// The sink rejected the record.
    pub const SINK: &str = "sink";
}

/// Header names.
pub mod header {
    /// The error message.
    pub const ERROR: &str = "refetch.error";
    /// `transient` or `permanent`.
    pub const ERROR_CLASS: &str = "refetch.error.class";
    /// A stable reason label, see [`super::reason`].
    pub const REASON: &str = "refetch.reason";
    /// Topic of the oldest notification.
    pub const SOURCE_TOPIC: &str = "refetch.source.topic";
    /// Partition of the oldest notification.
    pub const SOURCE_PARTITION: &str = "refetch.source.partition";
    /// Offset of the oldest notification.
    pub const SOURCE_OFFSET: &str = "refetch.source.offset";
    /// Attempts made.
    pub const ATTEMPTS: &str = "refetch.attempts";
    /// When the first notification was seen (RFC 3339).
    pub const FIRST_SEEN: &str = "refetch.first_seen";
    /// The entity type.
    pub const ENTITY_TYPE: &str = "refetch.entity.type";
    /// The entity id.
    pub const ENTITY_ID: &str = "refetch.entity.id";
    /// The original size of a payload that was truncated to fit the broker.
    pub const ORIGINAL_SIZE: &str = "refetch.original.size";
}

/// One record for the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Record key.
    pub key: Option<Vec<u8>>,
    /// Record payload.
    pub payload: Option<Vec<u8>>,
    /// Headers, see the module docs.
    pub headers: Vec<(String, String)>,
}

impl DeadLetter {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Truncate the payload to `max` bytes, recording the original size.
    pub fn truncate(&mut self, max: usize) {
        if let Some(p) = &mut self.payload {
            if p.len() > max {
                let original = p.len();
                p.truncate(max);
                self.headers
                    .push((header::ORIGINAL_SIZE.to_owned(), original.to_string()));
            }
        }
    }
}

/// How a dead-letter write failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetterFailure {
    /// Worth retrying (broker down, timeouts).
    Transient(String),
    /// The record is too large for the broker.
    TooLarge(String),
    /// The topic is missing or not writable.
    Permanent(String),
}

/// Renders a wall-clock time as RFC 3339.
pub fn rfc3339(t: SystemTime) -> String {
    match jiff::Timestamp::try_from(t) {
        Ok(ts) => ts.to_string(),
        Err(_) => String::from("unknown"),
    }
}

/// The wall-clock time `age` ago.
pub fn seen_ago(age: Duration) -> SystemTime {
    SystemTime::now()
        .checked_sub(age)
        .unwrap_or(SystemTime::UNIX_EPOCH)
}
