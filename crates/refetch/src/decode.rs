//! Decoding: turn a Kafka record into a [`Notification`].
//!
//! A decoder only reads; it never fails the pipeline. A record it cannot decode yields a
//! [`DecodeError`] with a clear reason and goes to the dead-letter topic; a record that is not a
//! notification at all (a heartbeat, a type nobody fetches) yields [`Decoded::Ignore`].
//!
//! Built-ins:
//! - [`JsonDecoder`]: JSON payloads with JSON-pointer paths for id, type and version, a fixed type
//!   per topic, extra fields for URL templates, and routing of related entities to their
//!   aggregate root.
//! - [`RecordKeyDecoder`]: the record key is the id, the type is fixed.

use std::borrow::Cow;
use std::sync::Arc;

use serde_json::Value;

use crate::action::ActionTag;
use crate::key::{EntityKey, Version, VersionKind};

/// Extra named fields decoded from a notification (for URL templates), shared cheaply.
pub type Fields = Arc<[(Box<str>, Box<str>)]>;

/// One decoded change notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// The entity that changed (after routing to its aggregate root).
    pub key: EntityKey,
    /// The version the notification announces, if any.
    pub version: Option<Version>,
    /// Extra named fields for URL templates (for example a tenant).
    pub fields: Option<Fields>,
    /// The business action this notification belongs to (correlation id and, where the source
    /// announces it, the action's size). `None` for ordinary notifications.
    pub action: Option<ActionTag>,
}

impl Notification {
    /// An unversioned notification for `key`.
    pub fn new(key: EntityKey) -> Self {
        Notification {
            key,
            version: None,
            fields: None,
            action: None,
        }
    }

    /// The same notification as a member of a business action.
    pub fn with_action(mut self, action: ActionTag) -> Self {
        self.action = Some(action);
        self
    }

    /// The same notification with a version.
    pub fn with_version(mut self, version: Version) -> Self {
        self.version = Some(version);
        self
    }
}

/// A borrowed view of a Kafka record, independent of the client library.
#[derive(Debug, Clone, Copy)]
pub struct RecordView<'a> {
    /// Topic name.
    pub topic: &'a str,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Record key bytes.
    pub key: Option<&'a [u8]>,
    /// Payload bytes (`None` for a tombstone).
    pub payload: Option<&'a [u8]>,
    /// Record headers.
    pub headers: &'a [(String, Option<Vec<u8>>)],
    /// When the record was produced (or appended, for a topic with `LogAppendTime`), in
    /// milliseconds since the Unix epoch; `None` when the client does not know. The engine uses
    /// it to skip the debounce window a record has already waited out (catch-up).
    pub timestamp: Option<i64>,
}

/// What a decoder made of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// A change notification.
    Notification(Notification),
    /// Not a notification this pipeline acts on; the record counts as handled.
    Ignore {
        /// Why (a stable label for metrics).
        reason: &'static str,
    },
}

/// A record that cannot be decoded. It is dead-lettered with this reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct DecodeError {
    /// A human-readable reason, for the dead-letter header and logs.
    pub reason: String,
}

impl DecodeError {
    /// A decode error with `reason`.
    pub fn new(reason: impl Into<String>) -> Self {
        DecodeError {
            reason: reason.into(),
        }
    }
}

/// Turns Kafka records into notifications.
pub trait NotificationDecoder: Send + Sync + 'static {
    /// Decode one record.
    fn decode(&self, record: &RecordView<'_>) -> Result<Decoded, DecodeError>;
}

impl<D: NotificationDecoder + ?Sized> NotificationDecoder for Arc<D> {
    fn decode(&self, record: &RecordView<'_>) -> Result<Decoded, DecodeError> {
        (**self).decode(record)
    }
}

impl<D: NotificationDecoder + ?Sized> NotificationDecoder for Box<D> {
    fn decode(&self, record: &RecordView<'_>) -> Result<Decoded, DecodeError> {
        (**self).decode(record)
    }
}

/// Where a [`JsonDecoder`] takes the entity type from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypeSource {
    /// Every record of the topic is of this type.
    Fixed(Arc<str>),
    /// The type is the string at this JSON pointer.
    Pointer(String),
}

/// Routes a related entity's notification to its aggregate root: an `address` event that carries
/// `customer_id` is a change of that customer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The decoded type this route applies to (for example `address`).
    pub from_type: String,
    /// The aggregate root's type (for example `customer`).
    pub to_type: Arc<str>,
    /// JSON pointer to the root's id in the payload (for example `/customer_id`).
    pub id_pointer: String,
    /// JSON pointer to the root's version, if the payload carries it. Without it a routed
    /// notification is unversioned: the child's version says nothing about the root.
    pub version_pointer: Option<String>,
}

/// Looks a JSON pointer up in a parsed payload.
type Find<'f, 'd> = dyn Fn(&str) -> Option<Got<'d>> + 'f;

/// Where a decoder reads a notification's correlation id (the business action it belongs to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorrelationSource {
    /// The string (or integer) at this JSON pointer in the payload.
    Pointer(String),
    /// The value of this record header (UTF-8).
    Header(String),
}

/// How a decoder groups notifications into business actions (see [`crate::action`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Correlation {
    /// Where the correlation id is. A notification without one is an ordinary notification.
    pub id: CorrelationSource,
    /// JSON pointer to the action's announced size (how many distinct entities it changes), if
    /// the source provides it. Without it an action completes when its quiet window passes.
    pub size_pointer: Option<String>,
}

impl Correlation {
    /// Read the action tag of one record; `None` when the record carries no correlation id.
    /// `find` looks a JSON pointer up in the payload (`None` for a decoder without one).
    fn read<'d>(&self, find: Option<&Find<'_, 'd>>, record: &RecordView<'_>) -> Option<ActionTag> {
        let id: Arc<str> = match &self.id {
            CorrelationSource::Pointer(p) => match find?(p)? {
                Got::Str(s) if !s.is_empty() => Arc::from(s),
                Got::Val(Value::Number(n)) if n.is_i64() || n.is_u64() => Arc::from(n.to_string()),
                _ => return None,
            },
            CorrelationSource::Header(name) => {
                let (_, v) = record.headers.iter().find(|(k, _)| k == name)?;
                let text = std::str::from_utf8(v.as_deref()?).ok()?;
                if text.is_empty() {
                    return None;
                }
                Arc::from(text)
            }
        };
        let size = self.size_pointer.as_deref().and_then(|p| {
            let n = match find?(p)? {
                Got::Val(Value::Number(n)) => n.as_u64()?,
                Got::Str(s) => s.trim().parse::<u64>().ok()?,
                Got::Val(_) => return None,
            };
            u32::try_from(n).ok().filter(|n| *n > 0)
        });
        Some(ActionTag { id, size })
    }
}

/// Decodes JSON notifications with JSON pointers.
///
/// ```
/// use refetch::decode::{Decoded, JsonDecoder, NotificationDecoder, RecordView};
/// use refetch::{Version, VersionKind};
///
/// let decoder = JsonDecoder::fixed_type("customer", "/id").with_version("/rev", VersionKind::Integer);
/// let payload = br#"{"id": "42", "rev": 7, "field": "phone"}"#;
/// let record = RecordView { topic: "crm", partition: 0, offset: 10, key: None,
///                           payload: Some(payload), headers: &[], timestamp: None };
/// let Decoded::Notification(n) = decoder.decode(&record).unwrap() else { panic!() };
/// assert_eq!(n.key.to_string(), "customer:42");
/// assert_eq!(n.version, Some(Version::Int(7)));
/// ```
#[derive(Debug, Clone)]
pub struct JsonDecoder {
    types: TypeSource,
    id_pointer: String,
    version: Option<(String, VersionKind)>,
    fields: Vec<(Box<str>, String)>,
    routes: Vec<Route>,
    correlation: Option<Correlation>,
    /// When every pointer names a top-level member, the member names: the payload is then
    /// parsed sparsely (other members are skipped without being built).
    top_level: Option<Vec<String>>,
}

impl JsonDecoder {
    /// Records of one fixed type, with the id at `id_pointer`.
    pub fn fixed_type(entity_type: impl Into<Arc<str>>, id_pointer: impl Into<String>) -> Self {
        JsonDecoder {
            types: TypeSource::Fixed(entity_type.into()),
            id_pointer: id_pointer.into(),
            version: None,
            fields: Vec::new(),
            routes: Vec::new(),
            correlation: None,
            top_level: None,
        }
        .plan()
    }

    /// The type at `type_pointer`, the id at `id_pointer`.
    pub fn typed(type_pointer: impl Into<String>, id_pointer: impl Into<String>) -> Self {
        JsonDecoder {
            types: TypeSource::Pointer(type_pointer.into()),
            id_pointer: id_pointer.into(),
            version: None,
            fields: Vec::new(),
            routes: Vec::new(),
            correlation: None,
            top_level: None,
        }
        .plan()
    }

    /// Read the version at `pointer`, of `kind`.
    pub fn with_version(mut self, pointer: impl Into<String>, kind: VersionKind) -> Self {
        self.version = Some((pointer.into(), kind));
        self.plan()
    }

    /// Also read the field `name` at `pointer` (for URL templates).
    pub fn with_field(mut self, name: impl Into<Box<str>>, pointer: impl Into<String>) -> Self {
        self.fields.push((name.into(), pointer.into()));
        self.plan()
    }

    /// Route notifications of one type to their aggregate root.
    pub fn with_route(mut self, route: Route) -> Self {
        self.routes.push(route);
        self.plan()
    }

    /// Group notifications into business actions by a correlation id (see [`crate::action`]).
    pub fn with_correlation(mut self, correlation: Correlation) -> Self {
        self.correlation = Some(correlation);
        self.plan()
    }

    /// Decide whether the sparse top-level parse applies.
    fn plan(mut self) -> Self {
        let mut pointers: Vec<&str> = vec![&self.id_pointer];
        if let TypeSource::Pointer(p) = &self.types {
            pointers.push(p);
        }
        if let Some((p, _)) = &self.version {
            pointers.push(p);
        }
        pointers.extend(self.fields.iter().map(|(_, p)| p.as_str()));
        for r in &self.routes {
            pointers.push(&r.id_pointer);
            pointers.extend(r.version_pointer.as_deref());
        }
        if let Some(c) = &self.correlation {
            if let CorrelationSource::Pointer(p) = &c.id {
                pointers.push(p);
            }
            pointers.extend(c.size_pointer.as_deref());
        }
        let simple = |p: &str| p.len() > 1 && p.starts_with('/') && !p[1..].contains(['/', '~']);
        self.top_level = pointers
            .iter()
            .all(|p| simple(p))
            .then(|| pointers.iter().map(|p| p[1..].to_owned()).collect());
        self
    }

    /// Parse `payload`; the sparse parse fills `members` in place (no copies of the buffer).
    fn parse<'m, 'de>(
        &self,
        payload: &'de [u8],
        members: &'m mut sparse::Members<'de>,
    ) -> Result<Doc<'m, 'de>, DecodeError> {
        let parsed = match &self.top_level {
            Some(names) => {
                let mut de = serde_json::Deserializer::from_slice(payload);
                let out = &mut *members;
                serde::de::DeserializeSeed::deserialize(sparse::Sparse { names, out }, &mut de)
                    .and_then(|()| de.end())
                    .map(|()| Doc::Sparse(members))
            }
            None => serde_json::from_slice(payload).map(Doc::Full),
        };
        parsed.map_err(|e| DecodeError::new(format!("payload is not valid JSON: {e}")))
    }

    /// The value at `pointer` in a parsed payload, without allocating.
    fn find<'d>(&self, doc: &'d Doc<'_, '_>, pointer: &str) -> Option<Got<'d>> {
        match doc {
            Doc::Sparse(members) => {
                let name = pointer.strip_prefix('/')?;
                let i = self.top_level.as_ref()?.iter().position(|n| n == name)?;
                match members.get(i)?.as_ref()? {
                    Lite::Str(s) => Some(Got::Str(s)),
                    Lite::Val(v) => Some(Got::of(v)),
                }
            }
            Doc::Full(v) => pointer_of(v, pointer).map(Got::of),
        }
    }
}

/// A wanted top-level member's value: strings are borrowed from the payload unless they hold
/// escapes.
#[derive(Debug)]
enum Lite<'de> {
    Str(Cow<'de, str>),
    Val(Value),
}

/// A parsed payload.
#[derive(Debug)]
enum Doc<'m, 'de> {
    /// The wanted top-level members only, by their position in [`JsonDecoder`]'s member names.
    Sparse(&'m sparse::Members<'de>),
    /// The whole payload (a pointer reaches below the top level).
    Full(Value),
}

/// A value found at a JSON pointer.
#[derive(Debug, Clone, Copy)]
enum Got<'a> {
    Str(&'a str),
    Val(&'a Value),
}

impl<'a> Got<'a> {
    fn of(v: &'a Value) -> Self {
        match v {
            Value::String(s) => Got::Str(s),
            v => Got::Val(v),
        }
    }

    fn is_null(&self) -> bool {
        matches!(self, Got::Val(Value::Null))
    }

    fn kind_name(&self) -> &'static str {
        match self {
            Got::Str(_) => "a string",
            Got::Val(v) => kind_name(v),
        }
    }
}

/// [`Value::pointer`] without allocating a `String` per reference token (only tokens holding an
/// escape are unescaped into a new string). Same rules: `""` is the whole document, array
/// indexes are decimal without leading zeros.
fn pointer_of<'v>(doc: &'v Value, pointer: &str) -> Option<&'v Value> {
    if pointer.is_empty() {
        return Some(doc);
    }
    let rest = pointer.strip_prefix('/')?;
    let mut cur = doc;
    for token in rest.split('/') {
        let token: Cow<'_, str> = if token.contains('~') {
            Cow::Owned(token.replace("~1", "/").replace("~0", "~"))
        } else {
            Cow::Borrowed(token)
        };
        cur = match cur {
            Value::Object(map) => map.get(&*token)?,
            Value::Array(list) => {
                if token.starts_with('+') || (token.starts_with('0') && token.len() != 1) {
                    return None;
                }
                list.get(token.parse::<usize>().ok()?)?
            }
            _ => return None,
        };
    }
    Some(cur)
}

/// A JSON object parser that keeps only the wanted top-level members.
mod sparse {
    use std::borrow::Cow;
    use std::fmt;

    use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
    use serde::de::{
        self, Deserialize, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor,
    };
    use serde_json::{Number, Value};

    use super::Lite;

    /// The wanted members' values, by position (most decoders want few members: no allocation).
    pub(super) type Members<'de> = smallvec::SmallVec<[Option<Lite<'de>>; 4]>;

    /// Parses into `out`, one entry per wanted name.
    pub(super) struct Sparse<'a, 'de> {
        pub names: &'a [String],
        pub out: &'a mut Members<'de>,
    }

    /// Which wanted member a key is, if any; compares without allocating.
    struct Wanted<'a>(&'a [String]);

    impl<'de> DeserializeSeed<'de> for Wanted<'_> {
        type Value = Option<usize>;
        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_str(self)
        }
    }

    impl<'de> Visitor<'de> for Wanted<'_> {
        type Value = Option<usize>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a member name")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(self.0.iter().position(|n| n == v))
        }
    }

    impl<'de> DeserializeSeed<'de> for Sparse<'_, 'de> {
        type Value = ();
        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }
    }

    impl<'de> Visitor<'de> for Sparse<'_, 'de> {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let out = self.out;
            out.clear();
            out.extend((0..self.names.len()).map(|_| None));
            while let Some(found) = map.next_key_seed(Wanted(self.names))? {
                match found.and_then(|i| out.get_mut(i)) {
                    // A repeated member: the last one wins, as in a parsed object.
                    Some(slot) => *slot = Some(map.next_value::<Lite<'de>>()?),
                    None => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(())
        }
    }

    impl<'de> Deserialize<'de> for Lite<'de> {
        fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_any(LiteVisitor)
        }
    }

    struct LiteVisitor;

    impl<'de> Visitor<'de> for LiteVisitor {
        type Value = Lite<'de>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
            Ok(Lite::Str(Cow::Borrowed(v)))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Lite::Str(Cow::Owned(v.to_owned())))
        }
        fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
            Ok(Lite::Str(Cow::Owned(v)))
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
            Ok(Lite::Val(Value::Bool(v)))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Lite::Val(Value::Number(v.into())))
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Lite::Val(Value::Number(v.into())))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
            Ok(Lite::Val(
                Number::from_f64(v).map_or(Value::Null, Value::Number),
            ))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Lite::Val(Value::Null))
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Lite::Val(Value::Null))
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            Value::deserialize(MapAccessDeserializer::new(map)).map(Lite::Val)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
            Value::deserialize(SeqAccessDeserializer::new(seq)).map(Lite::Val)
        }
    }
}

/// Reads an id: a non-empty string, or an integer rendered in decimal.
fn id_at(found: Option<Got<'_>>, pointer: &str) -> Result<Arc<str>, DecodeError> {
    match found {
        None => Err(DecodeError::new(format!("id missing at {pointer}"))),
        Some(Got::Val(Value::Null)) => Err(DecodeError::new(format!("id is null at {pointer}"))),
        Some(Got::Str("")) => Err(DecodeError::new(format!("id is empty at {pointer}"))),
        Some(Got::Str(s)) => Ok(Arc::from(s)),
        Some(Got::Val(Value::Number(n))) if n.is_i64() || n.is_u64() => {
            Ok(Arc::from(n.to_string()))
        }
        Some(other) => Err(DecodeError::new(format!(
            "id at {pointer} is {}, expected a string or an integer",
            other.kind_name()
        ))),
    }
}

fn kind_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a non-integer number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Parses a version value of `kind`. Integers: a JSON integer or a decimal string. Timestamps: an
/// RFC 3339 string, or a JSON integer of milliseconds since the Unix epoch.
pub fn parse_version(value: &Value, kind: VersionKind) -> Result<Version, DecodeError> {
    version_of(Got::of(value), kind)
}

fn version_of(value: Got<'_>, kind: VersionKind) -> Result<Version, DecodeError> {
    match (kind, value) {
        (VersionKind::Integer, Got::Val(Value::Number(n))) => n
            .as_i64()
            .map(Version::Int)
            .ok_or_else(|| DecodeError::new(format!("version {n} is not a 64-bit integer"))),
        (VersionKind::Integer, Got::Str(s)) => s
            .trim()
            .parse::<i64>()
            .map(Version::Int)
            .map_err(|_| DecodeError::new(format!("version {s:?} is not an integer"))),
        (VersionKind::Timestamp, Got::Val(Value::Number(n))) => n
            .as_i64()
            .and_then(|ms| ms.checked_mul(1000))
            .map(Version::Timestamp)
            .ok_or_else(|| DecodeError::new(format!("timestamp {n} is not integer milliseconds"))),
        (VersionKind::Timestamp, Got::Str(s)) => parse_timestamp(s),
        (_, other) => Err(DecodeError::new(format!(
            "version is {}, expected {}",
            other.kind_name(),
            match kind {
                VersionKind::Integer => "an integer",
                VersionKind::Timestamp => "an RFC 3339 timestamp or epoch milliseconds",
            }
        ))),
    }
}

/// Parses an RFC 3339 timestamp into a [`Version::Timestamp`].
pub fn parse_timestamp(s: &str) -> Result<Version, DecodeError> {
    s.trim()
        .parse::<jiff::Timestamp>()
        .map(|t| Version::Timestamp(t.as_microsecond()))
        .map_err(|e| DecodeError::new(format!("version {s:?} is not an RFC 3339 timestamp: {e}")))
}

impl NotificationDecoder for JsonDecoder {
    fn decode(&self, record: &RecordView<'_>) -> Result<Decoded, DecodeError> {
        let Some(payload) = record.payload else {
            return Err(DecodeError::new("record has no payload (tombstone)"));
        };
        let mut members = sparse::Members::new();
        let doc = self.parse(payload, &mut members)?;
        let find = |p: &str| self.find(&doc, p);
        let entity_type: Arc<str> = match &self.types {
            TypeSource::Fixed(t) => t.clone(),
            TypeSource::Pointer(p) => match find(p) {
                Some(Got::Str(s)) if !s.is_empty() => Arc::from(s),
                Some(other) => {
                    return Err(DecodeError::new(format!(
                        "type at {p} is {}, expected a non-empty string",
                        if matches!(other, Got::Str(_)) {
                            "empty"
                        } else {
                            other.kind_name()
                        }
                    )));
                }
                None => return Err(DecodeError::new(format!("type missing at {p}"))),
            },
        };
        let fields = if self.fields.is_empty() {
            None
        } else {
            let mut out = Vec::with_capacity(self.fields.len());
            for (name, pointer) in &self.fields {
                let v = match find(pointer) {
                    Some(Got::Str(s)) => s.into(),
                    Some(Got::Val(Value::Number(n))) => n.to_string().into(),
                    Some(Got::Val(Value::Bool(b))) => b.to_string().into(),
                    _ => continue,
                };
                out.push((name.clone(), v));
            }
            Some(Arc::from(out))
        };
        if let Some(route) = self.routes.iter().find(|r| *r.from_type == *entity_type) {
            let id = id_at(find(&route.id_pointer), &route.id_pointer)?;
            let version = match &route.version_pointer {
                Some(p) => match find(p) {
                    Some(v) if !v.is_null() => Some(version_of(
                        v,
                        self.version
                            .as_ref()
                            .map(|(_, k)| *k)
                            .unwrap_or(VersionKind::Integer),
                    )?),
                    _ => None,
                },
                None => None,
            };
            let action = self
                .correlation
                .as_ref()
                .and_then(|c| c.read(Some(&find), record));
            return Ok(Decoded::Notification(Notification {
                key: EntityKey::new(route.to_type.clone(), id),
                version,
                fields,
                action,
            }));
        }
        let id = id_at(find(&self.id_pointer), &self.id_pointer)?;
        let version = match &self.version {
            Some((p, kind)) => match find(p) {
                Some(v) if !v.is_null() => Some(version_of(v, *kind)?),
                _ => None,
            },
            None => None,
        };
        let action = self
            .correlation
            .as_ref()
            .and_then(|c| c.read(Some(&find), record));
        Ok(Decoded::Notification(Notification {
            key: EntityKey::new(entity_type, id),
            version,
            fields,
            action,
        }))
    }
}

/// The record key is the id; every record of the topic has one fixed type.
#[derive(Debug, Clone)]
pub struct RecordKeyDecoder {
    entity_type: Arc<str>,
    correlation_header: Option<String>,
}

impl RecordKeyDecoder {
    /// A decoder for records of `entity_type` keyed by id.
    pub fn new(entity_type: impl Into<Arc<str>>) -> Self {
        RecordKeyDecoder {
            entity_type: entity_type.into(),
            correlation_header: None,
        }
    }

    /// Group notifications into business actions by the correlation id in this record header.
    pub fn with_correlation_header(mut self, header: impl Into<String>) -> Self {
        self.correlation_header = Some(header.into());
        self
    }
}

impl NotificationDecoder for RecordKeyDecoder {
    fn decode(&self, record: &RecordView<'_>) -> Result<Decoded, DecodeError> {
        let key = record
            .key
            .ok_or_else(|| DecodeError::new("record has no key"))?;
        let id = std::str::from_utf8(key)
            .map_err(|_| DecodeError::new("record key is not valid UTF-8"))?;
        if id.is_empty() {
            return Err(DecodeError::new("record key is empty"));
        }
        let mut n = Notification::new(EntityKey::new(self.entity_type.clone(), id));
        if let Some(h) = &self.correlation_header {
            let c = Correlation {
                id: CorrelationSource::Header(h.clone()),
                size_pointer: None,
            };
            n.action = c.read(None, record);
        }
        Ok(Decoded::Notification(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(payload: &[u8]) -> RecordView<'_> {
        RecordView {
            topic: "t",
            partition: 0,
            offset: 0,
            key: None,
            payload: Some(payload),
            headers: &[],
            timestamp: None,
        }
    }

    fn notification(d: &dyn NotificationDecoder, payload: &[u8]) -> Notification {
        match d.decode(&rec(payload)) {
            Ok(Decoded::Notification(n)) => n,
            other => panic!("expected a notification, got {other:?}"),
        }
    }

    #[test]
    fn bad_ids_are_decode_errors_with_reasons() {
        let d = JsonDecoder::fixed_type("customer", "/id");
        for (payload, reason) in [
            (&b"{}"[..], "id missing"),
            (b"{\"id\":null}", "id is null"),
            (b"{\"id\":\"\"}", "id is empty"),
            (b"{\"id\":1.5}", "non-integer"),
            (b"{\"id\":[1]}", "an array"),
            (b"not json", "not valid JSON"),
            (b"\xff\xfe", "not valid JSON"),
        ] {
            let err = d.decode(&rec(payload)).expect_err("must fail");
            assert!(err.reason.contains(reason), "{err} should mention {reason}");
        }
    }

    #[test]
    fn numeric_ids_and_versions() {
        let d = JsonDecoder::fixed_type("c", "/id").with_version("/v", VersionKind::Integer);
        let n = notification(&d, br#"{"id": 42, "v": "9"}"#);
        assert_eq!(n.key.id(), "42");
        assert_eq!(n.version, Some(Version::Int(9)));
        let n = notification(&d, br#"{"id": "x"}"#);
        assert_eq!(n.version, None);
        assert!(d.decode(&rec(br#"{"id":"x","v":"nine"}"#)).is_err());
    }

    #[test]
    fn timestamps_parse_from_rfc3339_and_millis() {
        let d = JsonDecoder::fixed_type("c", "/id").with_version("/ts", VersionKind::Timestamp);
        let a = notification(&d, br#"{"id":"1","ts":"2026-01-01T00:00:00+01:00"}"#);
        let b = notification(&d, br#"{"id":"1","ts":1767222000000}"#);
        assert_eq!(a.version, b.version);
    }

    #[test]
    fn routed_children_are_unversioned_unless_a_root_version_is_configured() {
        let d = JsonDecoder::typed("/type", "/id")
            .with_version("/v", VersionKind::Integer)
            .with_route(Route {
                from_type: "address".into(),
                to_type: "customer".into(),
                id_pointer: "/customer_id".into(),
                version_pointer: None,
            });
        let n = notification(
            &d,
            br#"{"type":"address","id":"a1","customer_id":"42","v":99}"#,
        );
        assert_eq!(n.key, EntityKey::new("customer", "42"));
        assert_eq!(n.version, None);
        let n = notification(&d, br#"{"type":"customer","id":"42","v":3}"#);
        assert_eq!(n.version, Some(Version::Int(3)));
    }

    #[test]
    fn correlation_from_pointer_or_header_with_size() {
        let d = JsonDecoder::fixed_type("c", "/id").with_correlation(Correlation {
            id: CorrelationSource::Pointer("/tx".into()),
            size_pointer: Some("/of".into()),
        });
        let n = notification(&d, br#"{"id":"1","tx":"t-9","of":3,"big":[1,2]}"#);
        let tag = n.action.expect("tagged");
        assert_eq!((&*tag.id, tag.size), ("t-9", Some(3)));
        let n = notification(&d, br#"{"id":"1","tx":77,"of":"2"}"#);
        let tag = n.action.expect("tagged");
        assert_eq!((&*tag.id, tag.size), ("77", Some(2)));
        let n = notification(&d, br#"{"id":"1","of":2}"#);
        assert_eq!(
            n.action, None,
            "no correlation id: an ordinary notification"
        );
        let n = notification(&d, br#"{"id":"1","tx":"a","of":"many"}"#);
        assert_eq!(n.action.map(|t| t.size), Some(None));

        let headers = vec![("tx".to_owned(), Some(b"h-1".to_vec()))];
        let d = RecordKeyDecoder::new("c").with_correlation_header("tx");
        let mut r = rec(b"");
        r.key = Some(b"42");
        r.headers = &headers;
        let Ok(Decoded::Notification(n)) = d.decode(&r) else {
            panic!("decodes")
        };
        assert_eq!(n.action.map(|t| t.id), Some(Arc::from("h-1")));
    }

    #[test]
    fn record_key_decoder_rejects_non_utf8() {
        let d = RecordKeyDecoder::new("c");
        let mut r = rec(b"");
        r.key = Some(b"\xff");
        assert!(d.decode(&r).is_err());
        r.key = Some(b"42");
        assert!(matches!(d.decode(&r), Ok(Decoded::Notification(_))));
    }

    use proptest::prelude::*;

    /// The allocation-free pointer lookup answers exactly as `serde_json`'s, for every pointer
    /// of up to three tokens drawn from names, indexes (with leading zeros and signs), escapes
    /// and empty tokens.
    #[test]
    fn pointer_lookup_matches_serde_json() {
        let doc: Value = serde_json::json!({
            "a": {"b": [10, {"a/b": 1, "m~n": 2}], "": 3},
            "b": [[4], {"0": 5}],
            "a/b": {"1": 6},
            "m~n": 7,
            "": {"": 8},
        });
        let tokens = [
            "a", "b", "0", "1", "01", "+1", "~0", "~1", "a~1b", "m~0n", "", "x~",
        ];
        let mut pointers = vec![String::new()];
        let mut last = vec![String::new()];
        for _ in 0..3 {
            last = last
                .iter()
                .flat_map(|p| tokens.iter().map(move |t| format!("{p}/{t}")))
                .collect();
            pointers.extend(last.iter().cloned());
        }
        let mut found = 0;
        for p in &pointers {
            assert_eq!(pointer_of(&doc, p), doc.pointer(p), "pointer {p:?}");
            assert_eq!(
                pointer_of(&doc, &p[p.len().min(1)..]),
                doc.pointer(&p[p.len().min(1)..])
            );
            found += usize::from(doc.pointer(p).is_some());
        }
        assert!(found > 10, "the pointers reach into the document");
    }

    proptest::proptest! {
        /// The sparse top-level parse (borrowed strings, no map) decodes exactly what the full
        /// parse decodes, escapes and repeated members included.
        #[test]
        fn sparse_and_full_parses_agree(
            id in proptest::prop_oneof![
                proptest::string::string_regex("[a-z\\\\\"/é~ ]{0,6}").unwrap().prop_map(Value::from),
                proptest::num::i64::ANY.prop_map(Value::from),
                proptest::num::u64::ANY.prop_map(Value::from),
                proptest::num::f64::NORMAL.prop_map(Value::from),
                proptest::bool::ANY.prop_map(Value::from),
                proptest::strategy::Just(Value::Null),
                proptest::strategy::Just(serde_json::json!([1, {"id": "x"}])),
            ],
            v in proptest::prop_oneof![
                proptest::num::i64::ANY.prop_map(Value::from),
                proptest::num::i64::ANY.prop_map(|n| Value::from(n.to_string())),
                proptest::strategy::Just(Value::Null),
                proptest::strategy::Just(Value::from("x")),
            ],
            repeat in proptest::option::of("[a-z]{1,3}"),
            with_field in proptest::bool::ANY,
        ) {
            let mut doc = serde_json::Map::new();
            doc.insert("skip".into(), serde_json::json!({"id": "deep", "n": [1, 2]}));
            doc.insert("id".into(), id);
            doc.insert("v".into(), v);
            if with_field {
                doc.insert("f".into(), Value::from(true));
            }
            let mut payload = Value::Object(doc).to_string();
            if let Some(r) = repeat {
                // A repeated member: the last occurrence wins in both parses.
                payload.pop();
                payload.push_str(&format!(",\"id\":\"{r}\"}}"));
            }
            let sparse = JsonDecoder::fixed_type("c", "/id")
                .with_version("/v", VersionKind::Integer)
                .with_field("f", "/f");
            prop_assert!(sparse.top_level.is_some());
            let full = sparse.clone().with_field("deep", "/skip/n/5");
            prop_assert!(full.top_level.is_none());
            prop_assert_eq!(
                sparse.decode(&rec(payload.as_bytes())),
                full.decode(&rec(payload.as_bytes()))
            );
        }
    }
}
