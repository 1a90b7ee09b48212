//! Record intake: what one received Kafka record is for the engine.
//!
//! A record is decoded by its topic's decoder and screened before it touches any key: records
//! that are not notifications are satisfied on arrival; undecodable records, ids over the length
//! limit and (when configured) entity types no fetcher serves become dead letters that keep the
//! original record; everything else is a notification for its key. Intake holds no state besides
//! its settings, so it is tested on its own.

use std::sync::Arc;

use crate::action::ActionTag;
use crate::config::UnknownTypePolicy;
use crate::decode::{DecodeError, Decoded, Fields, NotificationDecoder, RecordView};
use crate::dlq::{self, DeadLetter, header, reason};
use crate::key::{EntityKey, Version};
use crate::stats::Counters;

/// Which decoder reads which topic.
#[derive(Clone, Default)]
pub struct Decoders {
    /// Few topics per pipeline: a list compares the record's topic without hashing it.
    by_topic: Vec<(String, Arc<dyn NotificationDecoder>)>,
    default: Option<Arc<dyn NotificationDecoder>>,
}

impl std::fmt::Debug for Decoders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoders")
            .field(
                "topics",
                &self.by_topic.iter().map(|(t, _)| t).collect::<Vec<_>>(),
            )
            .field("default", &self.default.is_some())
            .finish()
    }
}

impl Decoders {
    /// No decoders yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Use `decoder` for `topic`.
    pub fn topic(
        mut self,
        topic: impl Into<String>,
        decoder: Arc<dyn NotificationDecoder>,
    ) -> Self {
        let topic = topic.into();
        match self.by_topic.iter_mut().find(|(t, _)| *t == topic) {
            Some((_, d)) => *d = decoder,
            None => self.by_topic.push((topic, decoder)),
        }
        self
    }

    /// Use `decoder` for topics without their own.
    pub fn default_decoder(mut self, decoder: Arc<dyn NotificationDecoder>) -> Self {
        self.default = Some(decoder);
        self
    }

    fn for_topic(&self, topic: &str) -> Option<&Arc<dyn NotificationDecoder>> {
        self.by_topic
            .iter()
            .find(|(t, _)| t == topic)
            .map(|(_, d)| d)
            .or(self.default.as_ref())
    }
}

/// What a received record is.
#[derive(Debug)]
pub(crate) enum Intake {
    /// Not a notification (ignored by the decoder, or of a type nobody fetches): satisfied on
    /// arrival.
    Satisfied,
    /// Cannot be handled: dead-letter the record itself.
    DeadLetter(DeadLetter),
    /// A notification of `key`.
    Note {
        key: EntityKey,
        version: Option<Version>,
        fields: Option<Fields>,
        action: Option<ActionTag>,
    },
}

/// The intake settings.
pub(crate) struct Screen {
    decoders: Decoders,
    handles: Box<dyn Fn(&str) -> bool + Send + Sync>,
    max_id_len: usize,
    unknown_types: UnknownTypePolicy,
}

impl Screen {
    pub fn new(
        decoders: Decoders,
        handles: Box<dyn Fn(&str) -> bool + Send + Sync>,
        max_id_len: usize,
        unknown_types: UnknownTypePolicy,
    ) -> Self {
        Screen {
            decoders,
            handles,
            max_id_len,
            unknown_types,
        }
    }

    /// Does a fetcher serve `entity_type`?
    pub fn handles(&self, entity_type: &str) -> bool {
        (self.handles)(entity_type)
    }

    /// Decode and screen one record.
    pub fn take(&self, record: &RecordView<'_>, counters: &mut Counters) -> Intake {
        let decoded = match self.decoders.for_topic(record.topic) {
            Some(d) => d.decode(record),
            None => Err(DecodeError::new(format!(
                "no decoder configured for topic {}",
                record.topic
            ))),
        };
        let n = match decoded {
            Err(e) => {
                counters.add_decode_error();
                return Intake::DeadLetter(dlq::for_record(record, reason::DECODE, &e.reason));
            }
            Ok(Decoded::Ignore { reason }) => {
                counters.add_ignored(reason);
                return Intake::Satisfied;
            }
            Ok(Decoded::Notification(n)) => n,
        };
        counters.notifications += 1;
        if n.key.id().len() > self.max_id_len {
            let msg = format!(
                "id of {} bytes exceeds the limit of {} bytes",
                n.key.id().len(),
                self.max_id_len
            );
            let mut dl = dlq::for_record(record, reason::ID_TOO_LONG, &msg);
            // The type is known; the over-long id stays in the original payload only.
            dl.headers.push((
                header::ENTITY_TYPE.to_owned(),
                n.key.entity_type().to_owned(),
            ));
            return Intake::DeadLetter(dl);
        }
        if !(self.handles)(n.key.entity_type()) {
            return match self.unknown_types {
                UnknownTypePolicy::Ignore => {
                    counters.add_ignored("unknown_type");
                    Intake::Satisfied
                }
                UnknownTypePolicy::DeadLetter => {
                    let msg = format!("no fetcher serves entity type {:?}", n.key.entity_type());
                    let mut dl = dlq::for_record(record, reason::UNKNOWN_TYPE, &msg);
                    // Decoded fine: name the entity so it can be listed and redriven.
                    dl.headers.push((
                        header::ENTITY_TYPE.to_owned(),
                        n.key.entity_type().to_owned(),
                    ));
                    dl.headers
                        .push((header::ENTITY_ID.to_owned(), n.key.id().to_owned()));
                    Intake::DeadLetter(dl)
                }
            };
        }
        Intake::Note {
            key: n.key,
            version: n.version,
            fields: n.fields,
            action: n.action,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::JsonDecoder;

    fn screen(unknown: UnknownTypePolicy) -> Screen {
        let d = JsonDecoder::typed("/type", "/id");
        Screen::new(
            Decoders::new().default_decoder(Arc::new(d)),
            Box::new(|t| t == "customer"),
            8,
            unknown,
        )
    }

    fn view(payload: &[u8]) -> RecordView<'_> {
        RecordView {
            topic: "t",
            partition: 0,
            offset: 5,
            key: None,
            payload: Some(payload),
            headers: &[],
            timestamp: None,
        }
    }

    #[test]
    fn records_are_screened_before_they_reach_a_key() {
        let s = screen(UnknownTypePolicy::DeadLetter);
        let mut c = Counters::default();
        assert!(matches!(
            s.take(&view(br#"{"type":"customer","id":"42"}"#), &mut c),
            Intake::Note { .. }
        ));
        let Intake::DeadLetter(dl) = s.take(&view(b"not json"), &mut c) else {
            panic!("undecodable records are dead letters");
        };
        assert_eq!(dl.header(header::REASON), Some(reason::DECODE));
        assert_eq!(dl.payload.as_deref(), Some(&b"not json"[..]));
        let Intake::DeadLetter(dl) =
            s.take(&view(br#"{"type":"customer","id":"123456789"}"#), &mut c)
        else {
            panic!("over-long ids are dead letters");
        };
        assert_eq!(dl.header(header::REASON), Some(reason::ID_TOO_LONG));
        let Intake::DeadLetter(dl) = s.take(&view(br#"{"type":"order","id":"1"}"#), &mut c) else {
            panic!("unknown types are dead letters when so configured");
        };
        assert_eq!(dl.header(header::ENTITY_ID), Some("1"));
        assert_eq!(c.decode_errors, 1);
        let s = screen(UnknownTypePolicy::Ignore);
        assert!(matches!(
            s.take(&view(br#"{"type":"order","id":"1"}"#), &mut c),
            Intake::Satisfied
        ));
        assert_eq!(c.ignored, 1);
    }

    #[test]
    fn each_topic_has_its_decoder_and_others_the_default() {
        let by_key = Arc::new(crate::decode::RecordKeyDecoder::new("order"));
        let decoders = Decoders::new()
            .topic("orders", Arc::new(JsonDecoder::fixed_type("x", "/id")))
            .topic("orders", by_key)
            .default_decoder(Arc::new(JsonDecoder::fixed_type("customer", "/id")));
        let s = Screen::new(decoders, Box::new(|_| true), 64, UnknownTypePolicy::Ignore);
        let mut c = Counters::default();
        let mut r = view(br#"{"id":"7"}"#);
        r.key = Some(b"42");
        let Intake::Note { key, .. } = s.take(&r, &mut c) else {
            panic!("a default-topic note");
        };
        assert_eq!(key, EntityKey::new("customer", "7"));
        r.topic = "orders";
        let Intake::Note { key, .. } = s.take(&r, &mut c) else {
            panic!("an orders note");
        };
        assert_eq!(
            key,
            EntityKey::new("order", "42"),
            "the later decoder replaced the first"
        );
    }
}
