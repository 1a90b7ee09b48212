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
    /// The key's size before it was truncated to fit the producer's limit.
    pub const ORIGINAL_KEY_SIZE: &str = "refetch.original.key.size";
    /// The headers' total size before their values were truncated to fit.
    pub const ORIGINAL_HEADERS_SIZE: &str = "refetch.original.headers.size";
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

impl DeadLetter {
    /// Make the whole record (key, headers and payload) fit in `max` bytes: the key is cut to a
    /// quarter of it, each header value to 1 KiB (while the headers are over a quarter), and the
    /// payload to what is left; every cut is named with its original size in a header. A record
    /// that fits is left alone.
    pub fn fit(&mut self, max: usize) {
        if self.size() <= max {
            return;
        }
        let key_max = max / 4;
        if let Some(k) = &mut self.key {
            if k.len() > key_max {
                let original = k.len();
                k.truncate(key_max);
                self.headers
                    .push((header::ORIGINAL_KEY_SIZE.to_owned(), original.to_string()));
            }
        }
        let headers_size =
            |h: &[(String, String)]| -> usize { h.iter().map(|(k, v)| k.len() + v.len()).sum() };
        let original_headers = headers_size(&self.headers);
        if original_headers > max / 4 {
            for (_, v) in &mut self.headers {
                if v.len() > 1024 {
                    let mut cut = 1024;
                    while !v.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    v.truncate(cut);
                }
            }
            self.headers.push((
                header::ORIGINAL_HEADERS_SIZE.to_owned(),
                original_headers.to_string(),
            ));
        }
        let fixed = self.key.as_ref().map_or(0, Vec::len) + headers_size(&self.headers) + 64;
        self.truncate(max.saturating_sub(fixed));
    }

    /// Bytes the record holds (key, payload and headers), counted against the memory cap until
    /// the broker acknowledges it.
    pub fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len)
            + self.payload.as_ref().map_or(0, Vec::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

// ----- building records --------------------------------------------------------------------------

/// Where one notification came from: its topic, partition and offset (in a key's dead letter,
/// and in [`crate::WriteContext::inputs`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Coordinate {
    /// Topic.
    pub topic: std::sync::Arc<str>,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

/// What a key's dead letter says about the failure.
#[derive(Debug, Clone)]
pub(crate) struct KeyFailure<'a> {
    pub reason: &'a str,
    pub message: &'a str,
    pub class: crate::error::ErrorClass,
    pub attempts: u32,
    /// How long ago the oldest notification arrived.
    pub age: Duration,
}

/// The dead letter of a key whose fetch or write failed for good: the entity key as the record
/// key, a JSON payload naming the entity and every coalesced notification (oldest first).
pub(crate) fn for_key(
    key: &crate::key::EntityKey,
    version: Option<crate::key::Version>,
    coords: &[Coordinate],
    failure: &KeyFailure<'_>,
) -> DeadLetter {
    let notifications: Vec<serde_json::Value> = coords
        .iter()
        .map(|c| serde_json::json!({"topic": &*c.topic, "partition": c.partition, "offset": c.offset}))
        .collect();
    let payload = serde_json::json!({
        "entity_type": key.entity_type(),
        "entity_id": key.id(),
        "version": version.map(|v| v.to_string()),
        "notifications": notifications,
    });
    let mut headers = vec![
        (header::ERROR.to_owned(), failure.message.to_owned()),
        (
            header::ERROR_CLASS.to_owned(),
            failure.class.label().to_owned(),
        ),
        (header::REASON.to_owned(), failure.reason.to_owned()),
        (header::ATTEMPTS.to_owned(), failure.attempts.to_string()),
        (
            header::FIRST_SEEN.to_owned(),
            rfc3339(seen_ago(failure.age)),
        ),
        (header::ENTITY_TYPE.to_owned(), key.entity_type().to_owned()),
        (header::ENTITY_ID.to_owned(), key.id().to_owned()),
    ];
    if let Some(oldest) = coords.first() {
        headers.push((header::SOURCE_TOPIC.to_owned(), oldest.topic.to_string()));
        headers.push((
            header::SOURCE_PARTITION.to_owned(),
            oldest.partition.to_string(),
        ));
        headers.push((header::SOURCE_OFFSET.to_owned(), oldest.offset.to_string()));
    }
    DeadLetter {
        key: Some(key.to_string().into_bytes()),
        payload: Some(payload.to_string().into_bytes()),
        headers,
    }
}

/// The dead letter of a record that could not become a notification: its original key and
/// payload, with the reason.
pub(crate) fn for_record(
    record: &crate::decode::RecordView<'_>,
    reason: &str,
    message: &str,
) -> DeadLetter {
    DeadLetter {
        key: record.key.map(<[u8]>::to_vec),
        payload: record.payload.map(<[u8]>::to_vec),
        headers: vec![
            (header::ERROR.to_owned(), message.to_owned()),
            (header::ERROR_CLASS.to_owned(), "permanent".to_owned()),
            (header::REASON.to_owned(), reason.to_owned()),
            (header::SOURCE_TOPIC.to_owned(), record.topic.to_owned()),
            (
                header::SOURCE_PARTITION.to_owned(),
                record.partition.to_string(),
            ),
            (header::SOURCE_OFFSET.to_owned(), record.offset.to_string()),
            (header::ATTEMPTS.to_owned(), "0".to_owned()),
            (header::FIRST_SEEN.to_owned(), rfc3339(SystemTime::now())),
        ],
    }
}

// ----- dead letters awaiting their acknowledgement -----------------------------------------------

/// A dead letter issued and not yet acknowledged.
#[derive(Debug)]
pub(crate) struct Issued {
    /// The notifications it satisfies once acknowledged.
    pub notes: crate::coalesce::Notes,
    /// The assignments whose revokes wait for it.
    pub held: Vec<crate::partitions::PartRef>,
    bytes: usize,
}

/// Dead letters issued and not yet acknowledged, with the bytes they hold.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    entries: std::collections::HashMap<u64, Issued>,
    next: u64,
    bytes: usize,
    /// The topic refused a write for good (pauses consumption, fails readiness).
    pub broken: bool,
}

impl InFlight {
    pub fn new() -> Self {
        InFlight {
            next: 1,
            ..Self::default()
        }
    }

    /// Record an issued dead letter; returns its id.
    pub fn issue(
        &mut self,
        record: &DeadLetter,
        notes: crate::coalesce::Notes,
        held: Vec<crate::partitions::PartRef>,
    ) -> u64 {
        let id = self.next;
        self.next += 1;
        let bytes = record.size();
        self.bytes += bytes;
        self.entries.insert(id, Issued { notes, held, bytes });
        id
    }

    /// The broker acknowledged dead letter `id`.
    pub fn acked(&mut self, id: u64) -> Option<Issued> {
        let e = self.entries.remove(&id)?;
        self.bytes = self.bytes.saturating_sub(e.bytes);
        if self.entries.is_empty() {
            self.broken = false;
        }
        Some(e)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of records awaiting acknowledgement.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::EntityKey;

    #[test]
    fn a_key_record_names_the_entity_and_every_notification() {
        let key = EntityKey::new("customer", "42");
        let coords = [
            Coordinate {
                topic: "t".into(),
                partition: 1,
                offset: 7,
            },
            Coordinate {
                topic: "t".into(),
                partition: 1,
                offset: 9,
            },
        ];
        let r = for_key(
            &key,
            Some(crate::key::Version::Int(3)),
            &coords,
            &KeyFailure {
                reason: reason::FETCH,
                message: "HTTP 400",
                class: crate::error::ErrorClass::Permanent,
                attempts: 1,
                age: Duration::from_secs(1),
            },
        );
        assert_eq!(r.key.as_deref(), Some(&b"customer:42"[..]));
        assert_eq!(r.header(header::SOURCE_OFFSET), Some("7"));
        assert_eq!(r.header(header::REASON), Some("fetch"));
        let payload: serde_json::Value =
            serde_json::from_slice(r.payload.as_deref().unwrap_or_default()).unwrap_or_default();
        assert_eq!(payload["notifications"][1]["offset"], 9);
        assert_eq!(payload["version"], "3");
    }

    #[test]
    fn in_flight_counts_bytes_until_acknowledged() {
        let mut t = InFlight::new();
        let r = DeadLetter {
            key: Some(vec![0; 10]),
            payload: Some(vec![0; 100]),
            headers: vec![("a".into(), "bc".into())],
        };
        let id = t.issue(&r, crate::coalesce::Notes::new(), Vec::new());
        assert_eq!(t.bytes(), 113);
        t.broken = true;
        assert!(t.acked(id).is_some());
        assert_eq!(t.bytes(), 0);
        assert!(
            !t.broken,
            "an acknowledgement after the last failure clears the broken flag"
        );
    }
}

#[cfg(test)]
mod fit_tests {
    use super::*;

    #[test]
    fn key_headers_and_payload_are_cut_to_fit_with_their_original_sizes() {
        let mut r = DeadLetter {
            key: Some(vec![b'k'; 100_000]),
            payload: Some(vec![b'p'; 100_000]),
            headers: vec![("refetch.error".into(), "e".repeat(100_000))],
        };
        r.fit(16 * 1024);
        assert!(r.size() <= 16 * 1024, "{} bytes", r.size());
        assert_eq!(r.header(header::ORIGINAL_KEY_SIZE), Some("100000"));
        assert!(r.header(header::ORIGINAL_HEADERS_SIZE).is_some());
        assert_eq!(r.header(header::ORIGINAL_SIZE), Some("100000"));
        let mut small = DeadLetter {
            key: Some(b"k".to_vec()),
            payload: Some(b"p".to_vec()),
            headers: vec![],
        };
        small.fit(1024);
        assert!(small.headers.is_empty(), "a record that fits is left alone");
    }
}
