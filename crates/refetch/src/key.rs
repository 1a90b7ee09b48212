//! Entity keys and versions: the unit of coalescing, single flight and ordering.

use std::cmp::Ordering;
use std::fmt;
use std::sync::Arc;

/// The identity of one entity at the source: an entity type and an id.
///
/// Both parts are reference-counted, so cloning a key (for timers, flights and batches) never
/// copies the id.
/// Ids come from untrusted payloads: they are arbitrary strings and must be encoded by whatever
/// places them in a URL or query (see the HTTP fetcher).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntityKey {
    entity_type: Arc<str>,
    id: Arc<str>,
}

impl EntityKey {
    /// A key of `entity_type` with `id`.
    pub fn new(entity_type: impl Into<Arc<str>>, id: impl Into<Arc<str>>) -> Self {
        EntityKey {
            entity_type: entity_type.into(),
            id: id.into(),
        }
    }

    /// The entity type (for example `customer`).
    pub fn entity_type(&self) -> &str {
        &self.entity_type
    }

    /// The shared entity type, cheap to clone.
    pub fn entity_type_arc(&self) -> &Arc<str> {
        &self.entity_type
    }

    /// The id at the source, exactly as the notification carried it.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The shared id, cheap to clone.
    pub fn id_arc(&self) -> &Arc<str> {
        &self.id
    }

    /// Heap bytes this key owns (the id and its reference counts; the type is shared).
    pub fn heap_bytes(&self) -> usize {
        self.id.len() + 16
    }
}

impl fmt::Debug for EntityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{:?}", self.entity_type, self.id)
    }
}

impl fmt::Display for EntityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.entity_type, self.id)
    }
}

/// How an entity type declares its versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VersionKind {
    /// A monotonically increasing integer (a revision, a sequence number).
    Integer,
    /// A timestamp. Equal timestamps never prove that a change is already held, because two
    /// changes can share one clock tick.
    Timestamp,
}

/// The version of an entity as a notification, a fetch or a sink reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// An integer revision.
    Int(i64),
    /// A timestamp in microseconds since the Unix epoch.
    Timestamp(i64),
}

impl Version {
    /// The kind of this version.
    pub fn kind(&self) -> VersionKind {
        match self {
            Version::Int(_) => VersionKind::Integer,
            Version::Timestamp(_) => VersionKind::Timestamp,
        }
    }

    /// The raw number (integer or microseconds).
    pub fn value(&self) -> i64 {
        match self {
            Version::Int(v) | Version::Timestamp(v) => *v,
        }
    }

    /// Orders two versions of the same kind; versions of different kinds are not comparable.
    pub fn compare(&self, other: &Version) -> Option<Ordering> {
        match (self, other) {
            (Version::Int(a), Version::Int(b)) | (Version::Timestamp(a), Version::Timestamp(b)) => {
                Some(a.cmp(b))
            }
            _ => None,
        }
    }

    /// Does a fetched state of version `self` cover a notification of version `notified`?
    ///
    /// Used for a fetch that started after the notification was received (rule (a) of the
    /// design notes): an equal version is fine, a lower one is a stale read.
    pub fn fetched_covers(&self, notified: &Version) -> bool {
        matches!(
            self.compare(notified),
            Some(Ordering::Greater | Ordering::Equal)
        )
    }

    /// Does a version the sink already holds prove that a notification of version `notified` needs
    /// no fetch (rule (b))? Integers: held >= notified. Timestamps: held > notified, because equal
    /// timestamps never satisfy.
    pub fn held_covers(&self, notified: &Version) -> bool {
        match self.compare(notified) {
            Some(Ordering::Greater) => true,
            Some(Ordering::Equal) => self.kind() == VersionKind::Integer,
            _ => false,
        }
    }

    /// The newer of two versions (the first when they are not comparable).
    pub fn max_of(a: Option<Version>, b: Option<Version>) -> Option<Version> {
        match (a, b) {
            (Some(x), Some(y)) => match x.compare(&y) {
                Some(Ordering::Less) => Some(y),
                _ => Some(x),
            },
            (x, None) => x,
            (None, y) => y,
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Version::Int(v) => write!(f, "{v}"),
            Version::Timestamp(v) => write!(f, "ts:{v}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_timestamps_never_satisfy_from_held_state() {
        let t = Version::Timestamp(1_000);
        assert!(!t.held_covers(&t));
        assert!(Version::Timestamp(1_001).held_covers(&t));
        assert!(t.fetched_covers(&t));
    }

    #[test]
    fn integers_satisfy_at_equal() {
        assert!(Version::Int(3).held_covers(&Version::Int(3)));
        assert!(!Version::Int(2).held_covers(&Version::Int(3)));
        assert!(!Version::Int(2).fetched_covers(&Version::Int(3)));
    }

    #[test]
    fn kinds_do_not_compare() {
        assert!(!Version::Int(9).held_covers(&Version::Timestamp(1)));
        assert!(!Version::Timestamp(9).fetched_covers(&Version::Int(1)));
        assert_eq!(
            Version::max_of(Some(Version::Int(1)), Some(Version::Int(4))),
            Some(Version::Int(4))
        );
    }
}
