//! Business actions: several entities changed by one user action, written together.
//!
//! One action in the source ("create customer" with its contact, address and consent records)
//! emits one notification per entity. Written one by one, the target briefly holds half of the
//! action. Where the source marks its notifications with a correlation id (read by the decoder,
//! see [`crate::decode::Correlation`]), the engine groups them:
//!
//! 1. **Collect.** Notifications with the same correlation id join one open action. It is
//!    complete when as many distinct entity keys as announced (the optional size) have arrived,
//!    or when its quiet window ([`ActionConfig::window`]) passes without a new member, capped by
//!    [`ActionConfig::max_wait`] after its first member. It never waits forever. An action that
//!    times out short of its announced size is *incomplete*: some members are elsewhere (another
//!    instance, a revoked partition); its members fall back to normal writes.
//! 2. **Fetch.** Each member key is fetched under the usual single flight. A key that belongs to
//!    several actions serves them one after the other, in the order the actions completed (one
//!    order for every key, so actions that share keys never wait on each other in a cycle); its
//!    next action starts only after the previous one's write. While a key is a member of an
//!    action that is still collecting, its ordinary notifications wait and ride along with the
//!    action's fetch (a separate write of the key would show part of the action early). A fetch
//!    reads the *current* state: when two actions change the same entity, the first one written
//!    may already carry the second one's change of that entity.
//! 3. **One write.** When every member is fetched, the changes go to the sink as one batch (the
//!    PostgreSQL sink writes a batch in one transaction), and each member's offsets are released
//!    with that write. Members whose source state was unchanged are released with it too.
//! 4. **Failure.** A member that cannot be fetched (permanent error, retry budget spent) is
//!    handled by [`ActionFailurePolicy`]: dead-letter the whole action, or write the members that
//!    succeeded and dead-letter the rest. Dead letters carry the correlation id in the
//!    [`CORRELATION_HEADER`] header.
//!
//! A member that arrives after its action closed is a normal notification. A revoke that takes
//! part of an open action away dissolves it: the remaining members fall back to normal writes
//! and the action counts as incomplete. All of this needs one instance to receive every member
//! of an action: key the topic by correlation id, or use one partition.
//!
//! This module holds the settings and the bookkeeping; the engine ([`crate::engine`]) drives it.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{Tick, millis};
use crate::coalesce::{NoteRef, Pending};
use crate::decode::Fields;
use crate::key::{EntityKey, Version};

/// The dead-letter header that carries a member's correlation id.
pub const CORRELATION_HEADER: &str = "refetch.correlation.id";

/// A notification's membership in a business action, as decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActionTag {
    /// The correlation id the source put on every notification of the action.
    pub id: Arc<str>,
    /// How many distinct entities the action changes, when the source announces it.
    pub size: Option<u32>,
}

/// What to do when a member of an action cannot be fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionFailurePolicy {
    /// Dead-letter every member: the target never holds part of the action.
    #[default]
    DeadLetterAll,
    /// Write the members that were fetched (in one batch) and dead-letter the rest.
    WriteSucceeded,
}

/// Settings of business-action grouping (used only for notifications that carry a correlation
/// id).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ActionConfig {
    /// An action without its announced size (or without one announced) completes once no new
    /// member arrived for this long.
    pub window: Duration,
    /// An action completes at the latest this long after its first member, complete or not.
    pub max_wait: Duration,
    /// What to do when a member cannot be fetched.
    pub on_failure: ActionFailurePolicy,
    /// How many closed correlation ids are remembered, so that a late member is treated as a
    /// normal notification instead of opening a new action.
    pub remember_closed: usize,
}

impl Default for ActionConfig {
    fn default() -> Self {
        ActionConfig {
            window: Duration::from_millis(500),
            max_wait: Duration::from_secs(10),
            on_failure: ActionFailurePolicy::DeadLetterAll,
            remember_closed: 10_000,
        }
    }
}

/// Where a member is in its action's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MemberState {
    /// Collected, not yet fetched: its notes are in [`Member::pending`].
    Waiting,
    /// Its flight started (its notes are in the key's flight, or pending again after a failure).
    Started,
    /// Fetched; the flight is parked until the action's write.
    Fetched,
    /// Written, or its flight ended otherwise (dead letter, abandoned).
    Done,
}

/// One distinct entity key of an action.
#[derive(Debug)]
pub(crate) struct Member {
    pub key: EntityKey,
    pub pending: Option<Pending>,
    pub fields: Option<Fields>,
    pub state: MemberState,
    /// The member's flight ended in a dead letter.
    pub failed: bool,
    /// The member's change is part of the issued group write and not yet acknowledged.
    pub in_write: bool,
    /// The notes the member brought to the action (kept once they move into the key's entry,
    /// so a failed action dead-letters only them, not ordinary notifications riding along).
    pub action_notes: crate::coalesce::Notes,
}

/// An action, from its first member to its write.
#[derive(Debug)]
pub(crate) struct OpenAction {
    pub correlation: Arc<str>,
    pub expected: Option<u32>,
    pub first_at: Tick,
    pub deadline: Tick,
    pub members: Vec<Member>,
    /// Member index by key: adding a member costs O(1), whatever the action's size.
    index: HashMap<EntityKey, usize>,
    /// Collection finished; members are being fetched and written.
    pub running: bool,
    /// A member failed and the policy dead-letters the whole action.
    pub failed: bool,
    /// The group write was issued.
    pub write_issued: bool,
    /// Members of the group write not yet durable (or dead-lettered).
    pub writes_outstanding: usize,
    /// Its keys no longer count as held by a collecting action.
    pub released: bool,
}

impl OpenAction {
    pub fn member_mut(&mut self, key: &EntityKey) -> Option<&mut Member> {
        let i = *self.index.get(key)?;
        self.members.get_mut(i)
    }

    pub fn member(&self, key: &EntityKey) -> Option<&Member> {
        let i = *self.index.get(key)?;
        self.members.get(i)
    }

    /// Every member fetched or finished: the group write can go.
    pub fn all_fetched(&self) -> bool {
        self.members
            .iter()
            .all(|m| matches!(m.state, MemberState::Fetched | MemberState::Done))
    }
}

/// Why an action completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Completed {
    ByCount,
    ByTimeout,
}

impl Completed {
    pub fn label(self) -> &'static str {
        match self {
            Completed::ByCount => "count",
            Completed::ByTimeout => "timeout",
        }
    }
}

/// The engine's action bookkeeping.
#[derive(Debug)]
pub(crate) struct Actions {
    pub cfg: ActionConfig,
    /// Collecting actions by correlation id.
    pub collecting: HashMap<Arc<str>, u64>,
    /// Open actions (collecting or running) by id.
    pub open: HashMap<u64, OpenAction>,
    pub next_id: u64,
    /// Quiet-window deadlines of collecting actions.
    pub timers: BinaryHeap<Reverse<(Tick, u64)>>,
    /// Per key, the running actions it serves, in the order they completed (one order for all
    /// keys, so actions sharing keys cannot wait on each other in a cycle).
    pub queues: HashMap<EntityKey, VecDeque<u64>>,
    /// Per key, how many collecting actions hold it: its ordinary notifications wait for them.
    collecting_keys: HashMap<EntityKey, u32>,
    /// Keys whose action flight waits for fetch concurrency.
    pub ready: VecDeque<EntityKey>,
    /// Recently closed correlation ids (late members are normal notifications).
    closed: lru::LruCache<Arc<str>, ()>,
    /// Members whose notes wait in their action (collected, not yet started): they count
    /// against the engine's caps like pending keys.
    held: usize,
    /// Approximate bytes of those members.
    held_bytes: usize,
}

impl Actions {
    pub fn new(cfg: ActionConfig) -> Self {
        let cap =
            std::num::NonZeroUsize::new(cfg.remember_closed).unwrap_or(std::num::NonZeroUsize::MIN);
        Actions {
            cfg,
            collecting: HashMap::new(),
            open: HashMap::new(),
            next_id: 1,
            timers: BinaryHeap::new(),
            queues: HashMap::new(),
            collecting_keys: HashMap::new(),
            ready: VecDeque::new(),
            closed: lru::LruCache::new(cap),
            held: 0,
            held_bytes: 0,
        }
    }

    /// Members whose notes wait in their action, and their approximate bytes.
    pub fn held(&self) -> (usize, usize) {
        (self.held, self.held_bytes)
    }

    /// Take the notes (and fields) a member collected; they leave the action's count.
    pub fn take_member_pending(
        &mut self,
        id: u64,
        key: &EntityKey,
    ) -> (Option<Pending>, Option<Fields>) {
        let Some(m) = self.open.get_mut(&id).and_then(|a| a.member_mut(key)) else {
            return (None, None);
        };
        let p = m.pending.take();
        let f = m.fields.take();
        if let Some(p) = &p {
            m.action_notes = p.notes.clone();
        }
        if p.is_some() {
            self.held = self.held.saturating_sub(1);
            self.held_bytes = self
                .held_bytes
                .saturating_sub(key.heap_bytes() + crate::keys::KEY_OVERHEAD);
        }
        (p, f)
    }

    /// The notes `key` brought to action `id`.
    pub fn action_notes(&self, id: u64, key: &EntityKey) -> Option<&crate::coalesce::Notes> {
        self.open
            .get(&id)
            .and_then(|a| a.member(key))
            .map(|m| &m.action_notes)
    }

    /// Remove an open action, releasing the count of members still holding notes.
    pub fn remove(&mut self, id: u64) -> Option<OpenAction> {
        let a = self.open.remove(&id)?;
        for m in &a.members {
            if m.pending.is_some() {
                self.held = self.held.saturating_sub(1);
                self.held_bytes = self
                    .held_bytes
                    .saturating_sub(m.key.heap_bytes() + crate::keys::KEY_OVERHEAD);
            }
        }
        Some(a)
    }

    /// Drop notes for which `gone` holds (their assignment is going away) from every member
    /// still holding its notes.
    pub fn forget_notes(&mut self, gone: &dyn Fn(&NoteRef) -> bool) {
        for a in self.open.values_mut() {
            for m in &mut a.members {
                if let Some(p) = &mut m.pending {
                    p.notes.retain(|n| !gone(n));
                }
            }
        }
    }

    /// Is `key` a member of an open action (collecting, or queued to run)?
    pub fn holds(&self, key: &EntityKey) -> bool {
        self.collecting_keys.contains_key(key) || self.queues.contains_key(key)
    }

    /// Nothing open: the engine's paths for ordinary notifications skip every action check.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// Was this correlation id's action closed recently?
    pub fn is_closed(&mut self, id: &Arc<str>) -> bool {
        self.closed.get(id).is_some()
    }

    pub fn remember_closed(&mut self, id: Arc<str>) {
        self.closed.put(id, ());
    }

    /// Add a member notification; returns the action id and whether it reached its size.
    #[allow(clippy::too_many_arguments)]
    pub fn add(
        &mut self,
        tag: &ActionTag,
        key: EntityKey,
        version: Option<Version>,
        fields: Option<Fields>,
        note: NoteRef,
        now: Tick,
    ) -> (u64, bool) {
        let window = millis(self.cfg.window);
        let max_wait = millis(self.cfg.max_wait);
        let id = match self.collecting.get(&tag.id) {
            Some(&id) => id,
            None => {
                let id = self.next_id;
                self.next_id += 1;
                self.collecting.insert(tag.id.clone(), id);
                self.open.insert(
                    id,
                    OpenAction {
                        correlation: tag.id.clone(),
                        expected: None,
                        first_at: now,
                        deadline: now,
                        members: Vec::new(),
                        index: HashMap::new(),
                        running: false,
                        failed: false,
                        write_issued: false,
                        writes_outstanding: 0,
                        released: false,
                    },
                );
                id
            }
        };
        let Some(a) = self.open.get_mut(&id) else {
            return (id, false);
        };
        if tag.size.is_some() {
            a.expected = tag.size;
        }
        a.deadline = now.plus(window).min(a.first_at.plus(max_wait));
        self.timers.push(Reverse((a.deadline, id)));
        match a.member_mut(&key) {
            Some(m) => {
                if let Some(p) = &mut m.pending {
                    p.merge(now, window, max_wait, note, version);
                }
                if fields.is_some() {
                    m.fields = fields;
                }
            }
            None => {
                *self.collecting_keys.entry(key.clone()).or_default() += 1;
                self.held += 1;
                self.held_bytes += key.heap_bytes() + crate::keys::KEY_OVERHEAD;
                a.index.insert(key.clone(), a.members.len());
                a.members.push(Member {
                    key,
                    pending: Some(Pending::new(now, window, note, version)),
                    fields,
                    state: MemberState::Waiting,
                    failed: false,
                    in_write: false,
                    action_notes: crate::coalesce::Notes::new(),
                });
            }
        }
        let full = a.expected.is_some_and(|n| a.members.len() >= n as usize);
        (id, full)
    }

    /// Collecting actions whose deadline passed.
    pub fn due(&mut self, now: Tick) -> Vec<u64> {
        let mut out = Vec::new();
        while let Some(Reverse((at, id))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            if let Some(a) = self.open.get(&id) {
                if !a.running && a.deadline <= now && !out.contains(&id) {
                    out.push(id);
                }
            }
        }
        out
    }

    /// The next deadline of a collecting action.
    pub fn next_wakeup(&self) -> Option<Tick> {
        self.timers.peek().map(|Reverse((t, _))| *t)
    }

    /// Is `key` a member of an action still collecting?
    pub fn in_collecting(&self, key: &EntityKey) -> bool {
        self.collecting_keys.contains_key(key)
    }

    /// Action `id` stopped collecting (completed or dissolved): its keys are free of it.
    pub fn stop_collecting(&mut self, id: u64) {
        let Some(a) = self.open.get_mut(&id) else {
            return;
        };
        if a.released {
            return;
        }
        a.released = true;
        for m in &a.members {
            if let Some(n) = self.collecting_keys.get_mut(&m.key) {
                *n -= 1;
                if *n == 0 {
                    self.collecting_keys.remove(&m.key);
                }
            }
        }
    }

    /// The running action `key` serves now.
    pub fn head(&self, key: &EntityKey) -> Option<u64> {
        self.queues.get(key).and_then(|q| q.front().copied())
    }

    /// `key` finished its part of `id`: drop it from the key's queue; returns the next action.
    pub fn pop(&mut self, key: &EntityKey, id: u64) -> Option<u64> {
        let q = self.queues.get_mut(key)?;
        q.retain(|a| *a != id);
        let next = q.front().copied();
        if q.is_empty() {
            self.queues.remove(key);
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(o: i64) -> NoteRef {
        NoteRef {
            part: crate::partitions::PartRef {
                slot: 0,
                generation: 1,
            },
            offset: o,
        }
    }

    fn tag(id: &str, size: Option<u32>) -> ActionTag {
        ActionTag {
            id: Arc::from(id),
            size,
        }
    }

    #[test]
    fn an_action_is_full_at_its_announced_number_of_distinct_keys() {
        let mut a = Actions::new(ActionConfig::default());
        let k = |i: &str| EntityKey::new("c", i);
        let t = tag("tx", Some(2));
        let (id, full) = a.add(&t, k("1"), None, None, note(0), Tick(0));
        assert!(!full);
        let (same, full) = a.add(&t, k("1"), None, None, note(1), Tick(1));
        assert_eq!(same, id);
        assert!(!full, "a duplicate key is not a new member");
        let (_, full) = a.add(&t, k("2"), None, None, note(2), Tick(2));
        assert!(full);
        let members = &a.open[&id].members;
        assert_eq!(members.len(), 2);
        assert_eq!(members[0].pending.as_ref().map(|p| p.notes.len()), Some(2));
        assert_eq!(a.held().0, 2, "collected members count against the caps");
        let (p, _) = a.take_member_pending(id, &k("1"));
        assert!(p.is_some());
        assert_eq!(a.held().0, 1);
        a.remove(id);
        assert_eq!(a.held(), (0, 0));
    }

    #[test]
    fn a_large_action_collects_every_member_once() {
        // 20,000 distinct members (a linear member scan made this quadratic: about 2*10^8
        // comparisons; the index keeps it linear).
        let mut a = Actions::new(ActionConfig::default());
        let t = tag("big", None);
        let started = std::time::Instant::now();
        for i in 0..20_000 {
            a.add(
                &t,
                EntityKey::new("c", i.to_string()),
                None,
                None,
                note(i),
                Tick(0),
            );
        }
        let id = a.collecting[&t.id];
        assert_eq!(a.open[&id].members.len(), 20_000);
        assert!(a.open[&id].member(&EntityKey::new("c", "19999")).is_some());
        // Not a timing assertion: the figure is printed for the reader.
        eprintln!("20,000 members collected in {:?}", started.elapsed());
    }

    #[test]
    fn keys_are_released_from_collection_once() {
        let mut a = Actions::new(ActionConfig::default());
        let k = EntityKey::new("c", "1");
        let (first, _) = a.add(&tag("a", None), k.clone(), None, None, note(0), Tick(0));
        a.add(&tag("b", None), k.clone(), None, None, note(1), Tick(0));
        a.stop_collecting(first);
        a.stop_collecting(first);
        assert!(a.in_collecting(&k), "still held by the second action");
    }

    #[test]
    fn quiet_window_slides_but_is_capped_by_max_wait() {
        let cfg = ActionConfig {
            window: Duration::from_millis(100),
            max_wait: Duration::from_millis(250),
            ..ActionConfig::default()
        };
        let mut a = Actions::new(cfg);
        let t = tag("tx", None);
        let key = EntityKey::new("c", "1");
        let (id, _) = a.add(&t, key.clone(), None, None, note(0), Tick(0));
        a.add(&t, key.clone(), None, None, note(1), Tick(90));
        assert!(a.due(Tick(150)).is_empty(), "the window slid to 190");
        a.add(&t, key, None, None, note(2), Tick(180));
        assert_eq!(a.open[&id].deadline, Tick(250));
        assert_eq!(a.due(Tick(250)), vec![id]);
    }
}
