//! The key table and its schedule: every entity key with pending notifications or a flight.
//!
//! Entries live in a slab of fixed-size chunks (growing never copies entries, and at most one
//! chunk is spare). A slot holds the key's id and its entity type interned as a 4-byte index.
//! The index beside the slab is a hash table of slot numbers that hashes the slab's own key, so
//! each key is held once. What is handed around is a [`KeyId`]: the slot plus the slot's
//! generation, so a stale handle (a timer or write retry of a key that was forgotten, whose slot
//! now holds another key) is caught instead of reaching the wrong entry. Timers and write
//! retries hold a `KeyId` (8 bytes), not a clone of the key.
//!
//! The table also keeps the byte counts the memory caps look at: keys (id and overhead) and the
//! bodies of fetched changes waiting for the sink.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

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

/// Bytes a pending key costs besides its id (`EntityKey::heap_bytes`): slab slot 104, index
/// entry ~7, timer ~17, its note's offset-tracker entry ~21, with the vectors' spare capacity.
/// Measured: the `hot_path` benchmark's heap per pending key (229 B with 64-byte ids) minus the
/// id's 80; `tests/key_memory.rs` checks the accounting against the heap really held.
pub(crate) const KEY_OVERHEAD: usize = 149;

/// Slots per slab chunk (a power of two).
const CHUNK_BITS: u32 = 10;
const CHUNK: usize = 1 << CHUNK_BITS;
const CHUNK_MASK: u32 = (CHUNK as u32) - 1;

/// A handle to a key's entry: slot and generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct KeyId {
    slot: u32,
    generation: u32,
}

/// One key's entry: its id and state (its entity type is interned in the table; the whole key
/// is [`KeyTable::key`]).
#[derive(Debug)]
pub(crate) struct KeyEntry {
    id: Arc<str>,
    pub state: KeyState,
}

#[derive(Debug)]
struct Slot {
    generation: u32,
    /// The entry's entity type, an index into [`Types`].
    ty: u32,
    entry: Option<KeyEntry>,
}

/// The entity types of held keys, interned (a slot holds a 4-byte index instead of a second
/// 16-byte `Arc<str>`), each counted and released with its last key.
#[derive(Debug, Default)]
struct Types {
    names: Vec<(Option<Arc<str>>, u32)>,
    free: Vec<u32>,
    by_name: HashMap<Arc<str>, u32>,
    /// The type interned last (most records of a topic share one).
    last: u32,
}

impl Types {
    /// The index of `name`, counting one more key of it.
    fn intern(&mut self, name: &Arc<str>) -> u32 {
        if let Some((Some(n), count)) = self.names.get_mut(self.last as usize) {
            if Arc::ptr_eq(n, name) || **n == **name {
                *count += 1;
                return self.last;
            }
        }
        let i = match self.by_name.get(&**name) {
            Some(&i) => i,
            None => {
                let i = match self.free.pop() {
                    Some(i) => i,
                    None => {
                        self.names.push((None, 0));
                        (self.names.len() - 1) as u32
                    }
                };
                if let Some(e) = self.names.get_mut(i as usize) {
                    *e = (Some(name.clone()), 0);
                }
                self.by_name.insert(name.clone(), i);
                i
            }
        };
        if let Some((_, count)) = self.names.get_mut(i as usize) {
            *count += 1;
        }
        self.last = i;
        i
    }

    /// One key of type `i` fewer; the type is forgotten with its last key.
    fn release(&mut self, i: u32) {
        let Some((name, count)) = self.names.get_mut(i as usize) else {
            return;
        };
        *count = count.saturating_sub(1);
        if *count == 0 {
            if let Some(n) = name.take() {
                self.by_name.remove(&*n);
            }
            self.free.push(i);
        }
    }

    #[inline]
    fn name(&self, i: u32) -> Option<&Arc<str>> {
        self.names.get(i as usize)?.0.as_ref()
    }

    /// Is type `i` the type `name`?
    #[inline]
    fn is(&self, i: u32, name: &Arc<str>) -> bool {
        self.name(i)
            .is_some_and(|n| Arc::ptr_eq(n, name) || **n == **name)
    }
}

/// Push onto the timer heap, growing it by a quarter instead of doubling: one timer per pending
/// key, so the spare capacity is heap per key (about 12% on average instead of about 50%).
#[inline]
fn push_timer<T: Ord>(heap: &mut BinaryHeap<T>, timer: T) {
    if heap.len() == heap.capacity() {
        heap.reserve_exact(heap.len() / 4 + 64);
    }
    heap.push(timer);
}

/// The index's hash of a key (entity type and id).
#[inline]
fn key_hash(hasher: &RandomState, entity_type: &str, id: &str) -> u64 {
    hasher.hash_one((entity_type, id))
}

/// The slab: chunks of [`CHUNK`] slots, every chunk full except the last.
#[derive(Debug, Default)]
struct Slab {
    chunks: Vec<Vec<Slot>>,
}

impl Slab {
    #[inline]
    fn get(&self, slot: u32) -> Option<&Slot> {
        self.chunks
            .get((slot >> CHUNK_BITS) as usize)?
            .get((slot & CHUNK_MASK) as usize)
    }

    #[inline]
    fn get_mut(&mut self, slot: u32) -> Option<&mut Slot> {
        self.chunks
            .get_mut((slot >> CHUNK_BITS) as usize)?
            .get_mut((slot & CHUNK_MASK) as usize)
    }

    /// Does `slot` hold `key`?
    #[inline]
    fn holds(&self, slot: u32, types: &Types, key: &EntityKey) -> bool {
        self.get(slot).is_some_and(|s| {
            s.entry.as_ref().is_some_and(|e| *e.id == *key.id())
                && types.is(s.ty, key.entity_type_arc())
        })
    }

    /// The index's hash of the key in `slot`.
    #[inline]
    fn hash_of(&self, slot: u32, types: &Types, hasher: &RandomState) -> u64 {
        self.get(slot)
            .and_then(|s| Some(key_hash(hasher, types.name(s.ty)?, &s.entry.as_ref()?.id)))
            .unwrap_or(0)
    }

    /// A new, empty slot at the end.
    fn push(&mut self) -> u32 {
        let full = self.chunks.last().is_none_or(|c| c.len() == CHUNK);
        if full {
            self.chunks.push(Vec::with_capacity(CHUNK));
        }
        let n = self.chunks.len() - 1;
        let Some(chunk) = self.chunks.last_mut() else {
            unreachable!("a chunk was just pushed");
        };
        let slot = ((n as u32) << CHUNK_BITS) | chunk.len() as u32;
        chunk.push(Slot {
            generation: 0,
            ty: 0,
            entry: None,
        });
        slot
    }

    fn iter(&self) -> impl Iterator<Item = (u32, &Slot)> {
        self.chunks.iter().enumerate().flat_map(|(c, chunk)| {
            chunk
                .iter()
                .enumerate()
                .map(move |(i, s)| (((c as u32) << CHUNK_BITS) | i as u32, s))
        })
    }

    fn iter_mut(&mut self) -> impl Iterator<Item = (u32, &mut Slot)> {
        self.chunks.iter_mut().enumerate().flat_map(|(c, chunk)| {
            chunk
                .iter_mut()
                .enumerate()
                .map(move |(i, s)| (((c as u32) << CHUNK_BITS) | i as u32, s))
        })
    }
}

/// Every key the engine holds, and when each is due.
#[derive(Debug, Default)]
pub(crate) struct KeyTable {
    slab: Slab,
    free: Vec<u32>,
    /// Slots of held keys, hashed by the slab's key. SipHash with a per-process random key:
    /// ids come from untrusted payloads.
    index: hashbrown::HashTable<u32>,
    hasher: RandomState,
    types: Types,
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
        let hash = key_hash(&self.hasher, key.entity_type(), key.id());
        let (slab, types) = (&self.slab, &self.types);
        let slot = *self.index.find(hash, |&s| slab.holds(s, types, key))?;
        let s = slab.get(slot)?;
        Some(KeyId {
            slot,
            generation: s.generation,
        })
    }

    /// The entry behind `id`, if `id` is not stale.
    #[inline]
    pub fn get(&self, id: KeyId) -> Option<&KeyEntry> {
        let s = self.slab.get(id.slot)?;
        if s.generation != id.generation {
            return None;
        }
        s.entry.as_ref()
    }

    #[inline]
    pub fn get_mut(&mut self, id: KeyId) -> Option<&mut KeyEntry> {
        let s = self.slab.get_mut(id.slot)?;
        if s.generation != id.generation {
            return None;
        }
        s.entry.as_mut()
    }

    /// The key behind `id`, if `id` is not stale.
    #[inline]
    pub fn key(&self, id: KeyId) -> Option<EntityKey> {
        let s = self.slab.get(id.slot)?;
        if s.generation != id.generation {
            return None;
        }
        let e = s.entry.as_ref()?;
        Some(EntityKey::new(self.types.name(s.ty)?.clone(), e.id.clone()))
    }

    /// The state of `key`, if held.
    pub fn state_of(&self, key: &EntityKey) -> Option<&KeyState> {
        self.find(key).and_then(|id| self.get(id)).map(|e| &e.state)
    }

    /// Hold a new key (which must not be held yet).
    pub fn insert(&mut self, key: EntityKey, state: KeyState) -> KeyId {
        self.key_bytes += key.heap_bytes() + KEY_OVERHEAD;
        let hash = key_hash(&self.hasher, key.entity_type(), key.id());
        let ty = self.types.intern(key.entity_type_arc());
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => self.slab.push(),
        };
        let Some(s) = self.slab.get_mut(slot) else {
            unreachable!("free and pushed slots exist");
        };
        s.ty = ty;
        s.entry = Some(KeyEntry {
            id: key.id_arc().clone(),
            state,
        });
        let id = KeyId {
            slot,
            generation: s.generation,
        };
        let KeyTable {
            slab,
            index,
            hasher,
            types,
            ..
        } = self;
        index.insert_unique(hash, slot, |&s| slab.hash_of(s, types, hasher));
        id
    }

    /// Forget a key; its handle and every timer of it go stale. Returns its key and state.
    pub fn remove(&mut self, id: KeyId) -> Option<(EntityKey, KeyState)> {
        let key = self.key(id)?;
        let s = self.slab.get_mut(id.slot)?;
        let entry = s.entry.take()?;
        s.generation = s.generation.wrapping_add(1);
        let ty = s.ty;
        self.free.push(id.slot);
        let hash = key_hash(&self.hasher, key.entity_type(), key.id());
        if let Ok(found) = self.index.find_entry(hash, |&s| s == id.slot) {
            found.remove();
        }
        self.types.release(ty);
        self.key_bytes = self
            .key_bytes
            .saturating_sub(key.heap_bytes() + KEY_OVERHEAD);
        if let Some(f) = &entry.state.flight {
            self.body_bytes = self.body_bytes.saturating_sub(f.change_bytes);
        }
        Some((key, entry.state))
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
        self.slab.iter().filter_map(|(slot, s)| {
            s.entry.as_ref().map(|e| {
                (
                    KeyId {
                        slot,
                        generation: s.generation,
                    },
                    e,
                )
            })
        })
    }

    /// Every held key, mutable.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (KeyId, &mut KeyEntry)> {
        self.slab.iter_mut().filter_map(|(slot, s)| {
            let generation = s.generation;
            s.entry.as_mut().map(|e| (KeyId { slot, generation }, e))
        })
    }

    // ----- schedule ------------------------------------------------------------------------

    /// Schedule `id` for when its state says it is due (nothing if it has a flight or nothing
    /// pending).
    pub fn schedule(&mut self, id: KeyId) {
        if let Some(at) = self.get(id).and_then(|e| e.state.due()) {
            push_timer(&mut self.timers, Reverse((at, id)));
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
                push_timer(&mut self.timers, Reverse((due, id)));
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
        assert_eq!(t.key(b).map(|k| k.id().to_owned()), Some("b".to_owned()));
        // a's timer (due at 10) is stale; b is due at 50.
        assert_eq!(t.pop_due(Tick(20)), None);
        t.schedule(b);
        assert_eq!(t.pop_due(Tick(50)), Some(b));
        assert_eq!(t.find(&EntityKey::new("c", "a")), None);
        assert_eq!(t.len(), 1);
    }

    /// The layout the memory figures in docs/benchmarks.md and [`KEY_OVERHEAD`] rest on.
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn a_slot_is_104_bytes() {
        assert_eq!(std::mem::size_of::<KeyState>(), 80);
        assert_eq!(std::mem::size_of::<Slot>(), 104);
        assert_eq!(std::mem::size_of::<Reverse<(Tick, KeyId)>>(), 16);
    }

    #[test]
    fn the_timer_heap_grows_by_a_quarter() {
        let mut t = KeyTable::new();
        for i in 0..10_000u64 {
            let id = t.insert(EntityKey::new("c", format!("{i}")), pending(i, 10));
            t.schedule(id);
        }
        let (len, cap) = (t.timers.len(), t.timers.capacity());
        assert_eq!(len, 10_000);
        assert!(cap <= len + len / 4 + 64, "{cap} slots for {len} timers");
        assert_eq!(t.pop_due(Tick(10)), t.find(&EntityKey::new("c", "0")));
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

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u16),
        Remove(u16),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        // Enough distinct keys to span several slab chunks; removals free slots for reuse.
        prop_oneof![
            3 => (0u16..2500).prop_map(Op::Insert),
            2 => (0u16..2500).prop_map(Op::Remove),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]

        /// The slab and its index against a map: every held key is found at a handle that
        /// reaches it, forgotten keys are not found, and handles of forgotten keys stay stale
        /// when their slots are reused.
        #[test]
        fn slab_and_index_follow_a_map(ops in proptest::collection::vec(op(), 1..4000)) {
            let mut t = KeyTable::new();
            let mut model: std::collections::HashMap<u16, KeyId> = Default::default();
            let mut stale: Vec<KeyId> = Vec::new();
            let key = |k: u16| EntityKey::new(if k % 3 == 0 { "a" } else { "b" }, format!("{k}"));
            for op in ops {
                match op {
                    Op::Insert(k) => {
                        if let Some(id) = model.get(&k) {
                            proptest::prop_assert_eq!(t.find(&key(k)), Some(*id));
                        } else {
                            proptest::prop_assert_eq!(t.find(&key(k)), None);
                            let id = t.insert(key(k), pending(u64::from(k), 10));
                            model.insert(k, id);
                        }
                    }
                    Op::Remove(k) => match model.remove(&k) {
                        Some(id) => {
                            let e = t.remove(id);
                            proptest::prop_assert_eq!(e.map(|(k, _)| k), Some(key(k)));
                            proptest::prop_assert!(t.remove(id).is_none());
                            stale.push(id);
                        }
                        None => proptest::prop_assert_eq!(t.find(&key(k)), None),
                    },
                }
                proptest::prop_assert_eq!(t.len(), model.len());
            }
            for (k, id) in &model {
                proptest::prop_assert_eq!(t.find(&key(*k)), Some(*id));
                proptest::prop_assert_eq!(t.key(*id), Some(key(*k)));
            }
            for id in stale {
                proptest::prop_assert!(t.get(id).is_none(), "a forgotten key's handle is stale");
            }
            let mut held: Vec<KeyId> = t.iter().map(|(id, _)| id).collect();
            let mut want: Vec<KeyId> = model.values().copied().collect();
            held.sort();
            want.sort();
            proptest::prop_assert_eq!(held, want);
            proptest::prop_assert_eq!(t.iter_mut().count(), model.len());
            let types: std::collections::HashSet<bool> = model.keys().map(|k| k % 3 == 0).collect();
            proptest::prop_assert_eq!(t.types.by_name.len(), types.len(), "types go with their last key");
            let bytes: usize = model.keys().map(|k| key(*k).heap_bytes() + KEY_OVERHEAD).sum();
            proptest::prop_assert_eq!(t.key_bytes(), bytes);
        }
    }
}
