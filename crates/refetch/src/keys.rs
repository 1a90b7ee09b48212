//! The key table and its schedule: every entity key with pending notifications or a flight.
//!
//! Entries live in a slab. A map from key to slot sits beside it, and what is handed around is a
//! [`KeyId`]: the slot plus the slot's generation, so a stale handle (a timer of a key that was
//! forgotten, whose slot now holds another key) is caught instead of reaching the wrong entry.
//! Timers and write retries hold a `KeyId` (8 bytes), not a clone of the key.
//!
//! The table also keeps the byte counts the memory caps look at: keys (id and overhead) and the
//! bodies of fetched changes waiting for the sink.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use crate::clock::Tick;
use crate::coalesce::{Flight, KeyState};
use crate::key::EntityKey;
use crate::sink::Change;

/// The bytes a change holds while it waits for the sink.
pub(crate) fn change_bytes(c: &Change) -> usize {
    match c {
        Change::Upsert { entity, .. } => entity.body.len() + 64,
        Change::Delete { .. } => 64,
    }
}

/// Approximate bytes a key costs besides its id (table entry, state, one note, its timer).
pub(crate) const KEY_OVERHEAD: usize = 160;

/// A handle to a key's entry: slot and generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct KeyId {
    slot: u32,
    generation: u32,
}

/// One key's entry.
#[derive(Debug)]
pub(crate) struct KeyEntry {
    pub key: EntityKey,
    pub state: KeyState,
}

#[derive(Debug)]
struct Slot {
    generation: u32,
    entry: Option<KeyEntry>,
}

/// Every key the engine holds, and when each is due.
#[derive(Debug, Default)]
pub(crate) struct KeyTable {
    slots: Vec<Slot>,
    free: Vec<u32>,
    index: HashMap<EntityKey, u32>,
    /// When keys become due (debounce deadline, max-wait, retry backoff). Entries can be stale:
    /// [`KeyTable::pop_due`] checks them against the key's current due time.
    timers: BinaryHeap<Reverse<(Tick, KeyId)>>,
    /// Single-record write retries: (when, flight, key).
    write_retries: BinaryHeap<Reverse<(Tick, u64, KeyId)>>,
    key_bytes: usize,
    body_bytes: usize,
}

impl KeyTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// The handle of `key`, if held.
    #[inline]
    pub fn find(&self, key: &EntityKey) -> Option<KeyId> {
        let slot = *self.index.get(key)?;
        let s = self.slots.get(slot as usize)?;
        Some(KeyId {
            slot,
            generation: s.generation,
        })
    }

    /// The entry behind `id`, if `id` is not stale.
    #[inline]
    pub fn get(&self, id: KeyId) -> Option<&KeyEntry> {
        let s = self.slots.get(id.slot as usize)?;
        if s.generation != id.generation {
            return None;
        }
        s.entry.as_ref()
    }

    #[inline]
    pub fn get_mut(&mut self, id: KeyId) -> Option<&mut KeyEntry> {
        let s = self.slots.get_mut(id.slot as usize)?;
        if s.generation != id.generation {
            return None;
        }
        s.entry.as_mut()
    }

    /// The state of `key`, if held.
    pub fn state_of(&self, key: &EntityKey) -> Option<&KeyState> {
        self.find(key).and_then(|id| self.get(id)).map(|e| &e.state)
    }

    /// Hold a new key (which must not be held yet).
    pub fn insert(&mut self, key: EntityKey, state: KeyState) -> KeyId {
        self.key_bytes += key.heap_bytes() + KEY_OVERHEAD;
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    entry: None,
                });
                (self.slots.len() - 1) as u32
            }
        };
        self.index.insert(key.clone(), slot);
        let s = &mut self.slots[slot as usize];
        s.entry = Some(KeyEntry { key, state });
        KeyId {
            slot,
            generation: s.generation,
        }
    }

    /// Forget a key; its handle and every timer of it go stale.
    pub fn remove(&mut self, id: KeyId) -> Option<KeyEntry> {
        let s = self.slots.get_mut(id.slot as usize)?;
        if s.generation != id.generation {
            return None;
        }
        let entry = s.entry.take()?;
        s.generation = s.generation.wrapping_add(1);
        self.free.push(id.slot);
        self.index.remove(&entry.key);
        self.key_bytes = self
            .key_bytes
            .saturating_sub(entry.key.heap_bytes() + KEY_OVERHEAD);
        if let Some(f) = &entry.state.flight {
            self.body_bytes = self.body_bytes.saturating_sub(f.change_bytes);
        }
        Some(entry)
    }

    /// Forget `id` if it has nothing pending and no flight. Returns whether it was forgotten.
    pub fn remove_if_idle(&mut self, id: KeyId) -> bool {
        if self.get(id).is_some_and(|e| e.state.is_idle()) {
            self.remove(id);
            true
        } else {
            false
        }
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Approximate bytes held for keys.
    pub fn key_bytes(&self) -> usize {
        self.key_bytes
    }

    /// Bytes of fetched bodies waiting for the sink.
    pub fn body_bytes(&self) -> usize {
        self.body_bytes
    }

    /// Release `n` body bytes.
    fn sub_body_bytes(&mut self, n: usize) {
        self.body_bytes = self.body_bytes.saturating_sub(n);
    }

    /// Take `id`'s flight, releasing the bytes of its change.
    pub fn take_flight(&mut self, id: KeyId) -> Option<Box<Flight>> {
        let f = self.get_mut(id)?.state.flight.take()?;
        self.sub_body_bytes(f.change_bytes);
        Some(f)
    }

    /// Set the change of `id`'s flight (what it will write), counting its body bytes.
    pub fn set_flight_change(&mut self, id: KeyId, change: Option<Change>) {
        let Some(f) = self.get_mut(id).and_then(|e| e.state.flight.as_mut()) else {
            return;
        };
        let old = f.change_bytes;
        let new = change.as_ref().map_or(0, change_bytes);
        f.change = change;
        f.change_bytes = new;
        self.body_bytes = self.body_bytes.saturating_sub(old) + new;
    }

    /// Every held key, with its handle.
    pub fn iter(&self) -> impl Iterator<Item = (KeyId, &KeyEntry)> {
        self.slots.iter().enumerate().filter_map(|(i, s)| {
            s.entry.as_ref().map(|e| {
                (
                    KeyId {
                        slot: i as u32,
                        generation: s.generation,
                    },
                    e,
                )
            })
        })
    }

    /// Every held key, mutable.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (KeyId, &mut KeyEntry)> {
        self.slots.iter_mut().enumerate().filter_map(|(i, s)| {
            let generation = s.generation;
            s.entry.as_mut().map(|e| {
                (
                    KeyId {
                        slot: i as u32,
                        generation,
                    },
                    e,
                )
            })
        })
    }

    // ----- schedule ------------------------------------------------------------------------

    /// Schedule `id` for when its state says it is due (nothing if it has a flight or nothing
    /// pending).
    pub fn schedule(&mut self, id: KeyId) {
        if let Some(at) = self.get(id).and_then(|e| e.state.due()) {
            self.timers.push(Reverse((at, id)));
        }
    }

    /// The next key whose due time passed, if any (stale timers are skipped). The key stays
    /// held; a caller that cannot start it now must [`KeyTable::schedule`] it again.
    pub fn pop_due(&mut self, now: Tick) -> Option<KeyId> {
        while let Some(Reverse((at, id))) = self.timers.peek().copied() {
            if at > now {
                return None;
            }
            self.timers.pop();
            let Some(due) = self.get(id).and_then(|e| e.state.due()) else {
                continue; // stale: forgotten, in flight, or nothing pending
            };
            if due > now {
                // Moved later since this timer was set (a retry backoff): wait for it.
                self.timers.push(Reverse((due, id)));
                continue;
            }
            return Some(id);
        }
        None
    }

    /// The earliest timer (possibly stale: a wake-up that finds nothing is harmless).
    pub fn next_timer(&self) -> Option<Tick> {
        self.timers.peek().map(|Reverse((t, _))| *t)
    }

    /// Retry a single-record write of `flight` at `at`.
    pub fn push_write_retry(&mut self, at: Tick, flight: u64, id: KeyId) {
        self.write_retries.push(Reverse((at, flight, id)));
    }

    /// The next write retry whose time passed.
    pub fn pop_write_retry(&mut self, now: Tick) -> Option<(u64, KeyId)> {
        match self.write_retries.peek() {
            Some(Reverse((at, _, _))) if *at <= now => {
                let Reverse((_, flight, id)) = self.write_retries.pop()?;
                Some((flight, id))
            }
            _ => None,
        }
    }

    /// The earliest write retry.
    pub fn next_write_retry(&self) -> Option<Tick> {
        self.write_retries.peek().map(|Reverse((t, _, _))| *t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coalesce::{NoteRef, Pending};
    use crate::partitions::PartRef;

    fn pending(at: u64, window: u64) -> KeyState {
        let note = NoteRef {
            part: PartRef {
                slot: 0,
                generation: 1,
            },
            offset: 0,
        };
        KeyState::with_pending(Pending::new(Tick(at), window, note, None))
    }

    #[test]
    fn a_stale_handle_never_reaches_a_reused_slot() {
        let mut t = KeyTable::new();
        let a = t.insert(EntityKey::new("c", "a"), pending(0, 10));
        t.schedule(a);
        assert!(t.remove(a).is_some());
        let b = t.insert(EntityKey::new("c", "b"), pending(0, 50));
        assert!(t.get(a).is_none(), "the old handle is stale");
        assert_eq!(t.get(b).map(|e| e.key.id()), Some("b"));
        // a's timer (due at 10) is stale; b is due at 50.
        assert_eq!(t.pop_due(Tick(20)), None);
        t.schedule(b);
        assert_eq!(t.pop_due(Tick(50)), Some(b));
        assert_eq!(t.find(&EntityKey::new("c", "a")), None);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn byte_counts_follow_keys() {
        let mut t = KeyTable::new();
        let key = EntityKey::new("c", "0123456789");
        let cost = key.heap_bytes() + KEY_OVERHEAD;
        let id = t.insert(key.clone(), pending(0, 10));
        assert_eq!(t.key_bytes(), cost);
        // A flight whose change waits for the sink holds its body's bytes.
        if let Some(e) = t.get_mut(id) {
            let batch = e.state.pending.take().expect("pending");
            e.state.flight = Some(Box::new(Flight {
                id: 1,
                phase: crate::coalesce::Phase::Writing,
                batch,
                change: None,
                change_bytes: 0,
                validators: None,
                write_failures: 0,
                action: None,
                fetched_at: std::time::SystemTime::UNIX_EPOCH,
                abandoned: false,
            }));
        }
        let change = Change::Upsert {
            key,
            entity: crate::fetch::Entity::json(vec![b'x'; 100], None),
        };
        t.set_flight_change(id, Some(change));
        assert_eq!(t.body_bytes(), 164);
        assert!(t.take_flight(id).is_some());
        assert_eq!(t.body_bytes(), 0, "taking the flight releases its body");
        t.remove(id);
        assert_eq!(t.key_bytes(), 0);
    }
}
