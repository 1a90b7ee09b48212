//! The partition table: the partitions this member owns, one slot per [`Assignment`], with its
//! offsets, pause state and the writes in flight that a revoke waits for.
//!
//! Notes (see [`crate::coalesce::NoteRef`]) refer to a partition by a compact [`PartRef`]: the
//! slot and the generation the slot had when the note was received. A slot is reused after its
//! assignment ends, with a new generation, so a stale reference can never reach the new
//! assignment (the same shape as a slab handle with an ABA guard). Lookups that come from
//! outside (revokes, commits, losses) carry the driver's [`Assignment`] and act only when its
//! epoch is the one the slot holds.

use std::collections::HashMap;
use std::sync::Arc;

use crate::assignment::{Assignment, AssignmentToken, TopicPartition};
use crate::offsets::OffsetTracker;

/// A compact reference to one assignment of a partition slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct PartRef {
    pub slot: u32,
    pub generation: u32,
}

impl PartRef {
    /// Stands for an on-demand refresh: no partition, no offset to release.
    pub const REFRESH: PartRef = PartRef {
        slot: u32::MAX,
        generation: 0,
    };

    /// Is this the refresh reference?
    #[inline]
    pub fn is_refresh(self) -> bool {
        self.slot == u32::MAX
    }
}

/// One owned partition.
#[derive(Debug)]
pub(crate) struct PartitionState {
    /// The driver's assignment (partition + epoch).
    pub assignment: Assignment,
    /// The slot's generation for this assignment.
    pub generation: u32,
    /// Cancelled when the assignment ends; fences jobs that serve it.
    pub token: AssignmentToken,
    pub tracker: OffsetTracker,
    /// A revoke began: no new work, writes already issued are awaited.
    pub revoking: bool,
    /// Writes and dead letters issued whose notes include this assignment.
    pub writes_in_flight: usize,
    /// Pause state as last handed out to the consumer.
    pub paused: bool,
}

impl PartitionState {
    pub fn tp(&self) -> &TopicPartition {
        &self.assignment.tp
    }
}

/// What [`PartitionTable::assign`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AssignOutcome {
    /// A new slot for a partition not owned before.
    New(PartRef),
    /// The partition was owned in an older epoch with no revoke in between: that assignment
    /// ended (its notes must be forgotten, as on a loss) and the new one took its place.
    Replaced { old: PartRef, new: PartRef },
    /// The same assignment again: nothing changed.
    Unchanged(PartRef),
}

/// The partitions this member owns.
#[derive(Debug, Default)]
pub(crate) struct PartitionTable {
    slots: Vec<Option<PartitionState>>,
    by_tp: HashMap<TopicPartition, u32>,
    next_generation: u32,
    next_token: u64,
    /// The last (topic, partition) looked up by a record, and its slot: records come in runs of
    /// one partition, so this skips the map.
    last_lookup: Option<(Arc<str>, i32, u32)>,
}

impl PartitionTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Take an assignment. A new assignment starts paused when `paused` (the engine's desired
    /// pause state, re-applied after every assignment).
    pub fn assign(&mut self, a: &Assignment, paused: bool) -> AssignOutcome {
        let mut old = None;
        if let Some(&slot) = self.by_tp.get(&a.tp) {
            if let Some(p) = self.get(slot) {
                if p.assignment.epoch == a.epoch {
                    return AssignOutcome::Unchanged(PartRef {
                        slot,
                        generation: p.generation,
                    });
                }
                old = Some(PartRef {
                    slot,
                    generation: p.generation,
                });
            }
            self.end(slot);
        }
        self.next_generation = self.next_generation.wrapping_add(1);
        self.next_token += 1;
        let state = PartitionState {
            assignment: a.clone(),
            generation: self.next_generation,
            token: AssignmentToken::new(self.next_token),
            tracker: OffsetTracker::new(),
            revoking: false,
            writes_in_flight: 0,
            paused,
        };
        let slot = match self.slots.iter().position(Option::is_none) {
            Some(i) => {
                self.slots[i] = Some(state);
                i as u32
            }
            None => {
                self.slots.push(Some(state));
                (self.slots.len() - 1) as u32
            }
        };
        self.by_tp.insert(a.tp.clone(), slot);
        self.last_lookup = None;
        let new = PartRef {
            slot,
            generation: self.next_generation,
        };
        match old {
            Some(old) => AssignOutcome::Replaced { old, new },
            None => AssignOutcome::New(new),
        }
    }

    /// The slot of `a`, if it is the current assignment of its partition.
    pub fn current(&self, a: &Assignment) -> Option<PartRef> {
        let slot = *self.by_tp.get(&a.tp)?;
        let p = self.get(slot)?;
        (p.assignment.epoch == a.epoch).then_some(PartRef {
            slot,
            generation: p.generation,
        })
    }

    /// The slot receiving records of (`topic`, `partition`).
    #[inline]
    pub fn lookup(&mut self, topic: &str, partition: i32) -> Option<u32> {
        if let Some((t, p, s)) = &self.last_lookup {
            if **t == *topic && *p == partition {
                return Some(*s);
            }
        }
        let (tp, slot) = self
            .by_tp
            .iter()
            .find(|(tp, _)| &*tp.topic == topic && tp.partition == partition)
            .map(|(tp, s)| (tp.clone(), *s))?;
        self.last_lookup = Some((tp.topic, partition, slot));
        Some(slot)
    }

    pub fn get(&self, slot: u32) -> Option<&PartitionState> {
        self.slots.get(slot as usize).and_then(Option::as_ref)
    }

    pub fn get_mut(&mut self, slot: u32) -> Option<&mut PartitionState> {
        self.slots.get_mut(slot as usize).and_then(Option::as_mut)
    }

    /// The state behind `r`, if `r` is still that slot's assignment.
    pub fn resolve(&self, r: PartRef) -> Option<&PartitionState> {
        self.get(r.slot).filter(|p| p.generation == r.generation)
    }

    pub fn resolve_mut(&mut self, r: PartRef) -> Option<&mut PartitionState> {
        self.get_mut(r.slot)
            .filter(|p| p.generation == r.generation)
    }

    /// Is `r` the current assignment of its slot and not being revoked? (A refresh reference is
    /// always live.)
    #[inline]
    pub fn is_live(&self, r: PartRef) -> bool {
        r.is_refresh() || self.resolve(r).is_some_and(|p| !p.revoking)
    }

    /// End the assignment in `slot`: cancel its token and free the slot.
    pub fn end(&mut self, slot: u32) -> Option<PartitionState> {
        let p = self.slots.get_mut(slot as usize)?.take()?;
        p.token.cancel();
        if self.by_tp.get(p.tp()) == Some(&slot) {
            self.by_tp.remove(p.tp());
        }
        self.last_lookup = None;
        Some(p)
    }

    pub fn iter(&self) -> impl Iterator<Item = &PartitionState> {
        self.slots.iter().flatten()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut PartitionState> {
        self.slots.iter_mut().flatten()
    }

    pub fn len(&self) -> usize {
        self.by_tp.len()
    }

    /// Count a write in flight for each distinct assignment in `refs` that is current; returns
    /// those counted (to release them later).
    pub fn hold(&mut self, refs: impl IntoIterator<Item = PartRef>) -> Vec<PartRef> {
        let mut held: Vec<PartRef> = Vec::new();
        for r in refs {
            if r.is_refresh() || held.contains(&r) {
                continue;
            }
            if let Some(p) = self.resolve_mut(r) {
                p.writes_in_flight += 1;
                held.push(r);
            }
        }
        held
    }

    /// Release writes counted by [`PartitionTable::hold`].
    pub fn release(&mut self, held: &[PartRef]) {
        for &r in held {
            if let Some(p) = self.resolve_mut(r) {
                p.writes_in_flight = p.writes_in_flight.saturating_sub(1);
            }
        }
    }

    /// Offsets worth committing now: current, not revoking, commit point moved.
    pub fn commits(&self) -> Vec<(Assignment, i64)> {
        self.iter()
            .filter(|p| !p.revoking)
            .filter_map(|p| Some((p.assignment.clone(), p.tracker.pending_commit()?)))
            .collect()
    }

    /// Like [`PartitionTable::commits`], with the satisfied ranges above each commit point as
    /// commit metadata (within `max_bytes`; see [`crate::offsets::OffsetTracker::commit_with_ranges`]).
    /// A partition whose point did not move is offered when its ranges did.
    pub fn commits_with_ranges(&mut self, max_bytes: usize) -> Vec<(Assignment, i64, String)> {
        self.iter_mut()
            .filter(|p| !p.revoking)
            .filter_map(|p| {
                let (o, ranges) = p.tracker.commit_with_ranges(max_bytes)?;
                Some((p.assignment.clone(), o, ranges))
            })
            .collect()
    }

    /// A commit of `a` succeeded; ignored unless `a` is current.
    pub fn committed(&mut self, a: &Assignment, offset: i64) -> bool {
        match self.current(a).and_then(|r| self.resolve_mut(r)) {
            Some(p) => {
                p.tracker.committed(offset);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assignment::Epoch;

    fn a(p: i32, e: u64) -> Assignment {
        Assignment::new(TopicPartition::new("t", p), Epoch(e))
    }

    #[test]
    fn a_stale_assignment_never_reaches_the_current_one() {
        let mut t = PartitionTable::new();
        let AssignOutcome::New(first) = t.assign(&a(0, 1), false) else {
            panic!("new slot expected");
        };
        assert_eq!(t.current(&a(0, 1)), Some(first));
        // Assigned straight back in a new epoch, without a revoke in between.
        let AssignOutcome::Replaced { old, new } = t.assign(&a(0, 2), false) else {
            panic!("replacement expected");
        };
        assert_eq!(old, first);
        assert_eq!(new.slot, first.slot, "the slot is reused");
        assert_ne!(new.generation, first.generation);
        assert!(
            t.current(&a(0, 1)).is_none(),
            "the old epoch is not current"
        );
        assert!(
            t.resolve(first).is_none(),
            "a stale reference resolves to nothing"
        );
        assert!(
            !t.committed(&a(0, 1), 10),
            "a commit of the old epoch is ignored"
        );
        assert!(t.committed(&a(0, 2), 10));
        assert_eq!(t.assign(&a(0, 2), false), AssignOutcome::Unchanged(new));
    }

    #[test]
    fn ending_an_assignment_cancels_its_token() {
        let mut t = PartitionTable::new();
        let AssignOutcome::New(r) = t.assign(&a(3, 7), true) else {
            panic!("new slot expected");
        };
        let token = t.resolve(r).map(|p| p.token.clone()).expect("owned");
        assert!(
            t.resolve(r).is_some_and(|p| p.paused),
            "starts paused when asked"
        );
        assert!(!token.is_cancelled());
        t.end(r.slot);
        assert!(token.is_cancelled());
        assert_eq!(t.len(), 0);
        assert_eq!(t.lookup("t", 3), None);
    }

    #[test]
    fn holds_count_each_assignment_once() {
        let mut t = PartitionTable::new();
        let AssignOutcome::New(r) = t.assign(&a(0, 1), false) else {
            panic!("new slot expected");
        };
        let held = t.hold([r, r, PartRef::REFRESH]);
        assert_eq!(held, vec![r]);
        assert_eq!(t.resolve(r).map(|p| p.writes_in_flight), Some(1));
        t.release(&held);
        assert_eq!(t.resolve(r).map(|p| p.writes_in_flight), Some(0));
    }
}
