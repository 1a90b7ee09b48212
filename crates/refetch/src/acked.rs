//! What the sink acknowledged per key: the caches that let later notifications be satisfied
//! without a fetch (the version held, rule (b) of the design notes) and make fetches cheap (the
//! HTTP validators of the state written).
//!
//! Entries are filled only from sink acknowledgements and cleared for a key that is rejected or
//! dead-lettered. Each entry belongs to the assignment whose notifications the write satisfied:
//! once that assignment ends (revoked or lost), another member may have written the key since,
//! so the entry is no longer trusted (it is dropped at its next lookup). A delete leaves a
//! tombstone with the notified version, so late notifications of a deleted entity at or below
//! that version are satisfied without a fetch.
//!
//! A single-threaded LRU: the engine owns it on one task, so a concurrent cache would only add
//! cost.

use std::num::NonZeroUsize;

use crate::fetch::Validators;
use crate::key::{EntityKey, Version};
use crate::partitions::{PartRef, PartitionTable};

/// The acknowledged state of one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Acked {
    /// The version the sink holds (for a tombstone: the version the delete was notified at).
    pub version: Option<Version>,
    /// Validators of the state written (none for a tombstone).
    pub validators: Option<Validators>,
    /// The entity was deleted.
    pub deleted: bool,
    /// The assignment whose notifications the write satisfied.
    pub owner: PartRef,
}

/// The bounded cache of acknowledged states.
#[derive(Debug)]
pub(crate) struct AckedCache {
    lru: lru::LruCache<EntityKey, Acked>,
}

impl AckedCache {
    /// A cache holding at most `capacity` keys (least recently used evicted).
    pub fn new(capacity: u64) -> Self {
        let capacity = usize::try_from(capacity)
            .ok()
            .and_then(NonZeroUsize::new)
            .unwrap_or(NonZeroUsize::MIN);
        AckedCache {
            lru: lru::LruCache::new(capacity),
        }
    }

    /// The acknowledged state of `key`, if its owner is still a current assignment.
    #[inline]
    pub fn get(&mut self, key: &EntityKey, parts: &PartitionTable) -> Option<&Acked> {
        let owned = self
            .lru
            .peek(key)
            .map(|a| parts.resolve(a.owner).is_some())?;
        if !owned {
            self.lru.pop(key);
            return None;
        }
        self.lru.get(key)
    }

    /// The version held for `key`, if trusted. The hot path (one lookup per versioned
    /// notification): one probe of the cache, and none at all while it is empty.
    #[inline]
    pub fn version(&mut self, key: &EntityKey, parts: &PartitionTable) -> Option<Version> {
        if self.lru.is_empty() {
            return None;
        }
        let a = self.lru.get(key)?;
        if parts.resolve(a.owner).is_some() {
            return a.version;
        }
        self.lru.pop(key);
        None
    }

    /// Remember what the sink acknowledged. Nothing is cached for work not tied to an
    /// assignment (an on-demand refresh), nor a state with neither version nor validators.
    pub fn put(&mut self, key: EntityKey, acked: Acked) {
        if acked.owner.is_refresh() {
            self.lru.pop(&key);
            return;
        }
        if acked.version.is_none() && acked.validators.is_none() {
            self.lru.pop(&key);
            return;
        }
        self.lru.put(key, acked);
    }

    /// Forget `key` (rejected, dead-lettered, or written without anything to remember).
    pub fn forget(&mut self, key: &EntityKey) {
        self.lru.pop(key);
    }

    /// Keys remembered (trusted or not yet found stale).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lru.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assignment::{Assignment, Epoch, TopicPartition};
    use crate::partitions::AssignOutcome;

    #[test]
    fn an_entry_is_trusted_only_while_its_assignment_is_current() {
        let mut parts = PartitionTable::new();
        let a1 = Assignment::new(TopicPartition::new("t", 0), Epoch(1));
        let AssignOutcome::New(owner) = parts.assign(&a1, false) else {
            panic!("new");
        };
        let mut cache = AckedCache::new(10);
        let key = EntityKey::new("c", "1");
        cache.put(
            key.clone(),
            Acked {
                version: Some(Version::Int(3)),
                validators: None,
                deleted: false,
                owner,
            },
        );
        assert_eq!(cache.version(&key, &parts), Some(Version::Int(3)));
        // Revoked and assigned back: another member may have written the key meanwhile.
        parts.end(owner.slot);
        parts.assign(
            &Assignment::new(TopicPartition::new("t", 0), Epoch(2)),
            false,
        );
        assert_eq!(cache.version(&key, &parts), None);
        assert_eq!(cache.len(), 0, "the stale entry is dropped");
    }

    #[test]
    fn refreshes_and_empty_states_are_not_cached() {
        let parts = PartitionTable::new();
        let mut cache = AckedCache::new(10);
        let key = EntityKey::new("c", "1");
        cache.put(
            key.clone(),
            Acked {
                version: Some(Version::Int(1)),
                validators: None,
                deleted: false,
                owner: PartRef::REFRESH,
            },
        );
        assert_eq!(cache.version(&key, &parts), None);
        assert_eq!(cache.len(), 0);
    }
}
