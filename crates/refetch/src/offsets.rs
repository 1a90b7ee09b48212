//! Offsets: which received notifications of a partition are satisfied, and how far it is safe to
//! commit.
//!
//! Offsets are tracked in the order they were received, never by arithmetic: compacted topics,
//! transaction markers and aborted transactions leave gaps, so "offset + 1" is not "the next
//! record". The commit point is the oldest unsatisfied received offset; when everything received
//! is satisfied it is the consumer's position (the offset after the last received record, or
//! further when transaction markers follow it). A partition that received nothing has no commit
//! point, and a commit point already committed is not offered again.

use std::collections::VecDeque;

/// Per-partition record of received offsets and their state.
#[derive(Debug, Default, Clone)]
pub struct OffsetTracker {
    /// Received offsets, oldest first, with a satisfied flag. The satisfied prefix is popped
    /// eagerly, so the front, if any, is always unsatisfied.
    window: VecDeque<(i64, bool)>,
    unsatisfied: usize,
    last_received: Option<i64>,
    /// The consumer's position (next offset it will deliver), when it is past the last received
    /// record: transaction markers and compacted-away offsets leave the position ahead of
    /// `last_received + 1`.
    position: Option<i64>,
    committed: Option<i64>,
}

/// A record arrived whose offset is not above the last one received.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("offset {offset} received after {last}: offsets must increase within an assignment")]
pub struct OutOfOrder {
    /// The offending offset.
    pub offset: i64,
    /// The last offset received before it.
    pub last: i64,
}

impl OffsetTracker {
    /// An empty tracker for a freshly assigned partition.
    pub fn new() -> Self {
        Self::default()
    }

    /// Record a received offset as outstanding.
    pub fn receive(&mut self, offset: i64) -> Result<(), OutOfOrder> {
        if let Some(last) = self.last_received {
            if offset <= last {
                return Err(OutOfOrder { offset, last });
            }
        }
        self.last_received = Some(offset);
        self.window.push_back((offset, false));
        self.unsatisfied += 1;
        Ok(())
    }

    /// Record a received offset that is satisfied on arrival (ignored records, versions the sink
    /// already holds). Cheaper than `receive` + `satisfy`.
    pub fn receive_satisfied(&mut self, offset: i64) -> Result<(), OutOfOrder> {
        if let Some(last) = self.last_received {
            if offset <= last {
                return Err(OutOfOrder { offset, last });
            }
        }
        self.last_received = Some(offset);
        if !self.window.is_empty() {
            self.window.push_back((offset, true));
        }
        Ok(())
    }

    /// Mark `offset` satisfied. Returns `false` when it is unknown or was satisfied already.
    pub fn satisfy(&mut self, offset: i64) -> bool {
        let Ok(i) = self.window.binary_search_by_key(&offset, |e| e.0) else {
            return false;
        };
        let Some(entry) = self.window.get_mut(i) else {
            return false;
        };
        if entry.1 {
            return false;
        }
        entry.1 = true;
        self.unsatisfied -= 1;
        while matches!(self.window.front(), Some((_, true))) {
            self.window.pop_front();
        }
        true
    }

    /// Is `offset` received and not yet satisfied?
    pub fn is_outstanding(&self, offset: i64) -> bool {
        self.window
            .binary_search_by_key(&offset, |e| e.0)
            .ok()
            .and_then(|i| self.window.get(i))
            .is_some_and(|e| !e.1)
    }

    /// The consumer's position moved to `position` (the next offset it will deliver). Records
    /// below it that were not received are not records (transaction markers, aborted or
    /// compacted offsets), so once everything received is satisfied the commit point may move
    /// there. A position at or below what was received changes nothing.
    pub fn observe_position(&mut self, position: i64) {
        if self.last_received.is_some_and(|l| position > l + 1) {
            self.position = Some(self.position.map_or(position, |p| p.max(position)));
        }
    }

    /// The offset it is safe to commit: the oldest unsatisfied received offset, or else the
    /// consumer's position (at least the one after the last received record). `None` when
    /// nothing was received.
    pub fn commit_point(&self) -> Option<i64> {
        match self.window.front() {
            Some((offset, _)) => Some(*offset),
            None => {
                let next = self.last_received? + 1;
                Some(self.position.map_or(next, |p| p.max(next)))
            }
        }
    }

    /// The commit point if it differs from what was committed last.
    pub fn pending_commit(&self) -> Option<i64> {
        let point = self.commit_point()?;
        (self.committed != Some(point)).then_some(point)
    }

    /// Record a successful commit of `offset`.
    pub fn committed(&mut self, offset: i64) {
        self.committed = Some(offset);
    }

    /// The last committed offset, if any commit succeeded in this assignment.
    pub fn last_committed(&self) -> Option<i64> {
        self.committed
    }

    /// The last offset received, if any.
    pub fn last_received(&self) -> Option<i64> {
        self.last_received
    }

    /// Received offsets not yet satisfied.
    pub fn unsatisfied(&self) -> usize {
        self.unsatisfied
    }

    /// Offsets held in memory (unsatisfied ones and satisfied ones behind an unsatisfied head).
    pub fn outstanding(&self) -> usize {
        self.window.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn nothing_received_nothing_to_commit() {
        let t = OffsetTracker::new();
        assert_eq!(t.commit_point(), None);
        assert_eq!(t.pending_commit(), None);
    }

    #[test]
    fn gaps_are_not_arithmetic() {
        let mut t = OffsetTracker::new();
        for o in [3, 4, 9, 12] {
            t.receive(o).unwrap();
        }
        assert_eq!(t.commit_point(), Some(3));
        t.satisfy(4);
        assert_eq!(t.commit_point(), Some(3));
        t.satisfy(3);
        assert_eq!(t.commit_point(), Some(9));
        t.satisfy(12);
        t.satisfy(9);
        assert_eq!(t.commit_point(), Some(13));
        t.committed(13);
        assert_eq!(t.pending_commit(), None);
        assert_eq!(t.outstanding(), 0);
    }

    #[test]
    fn the_position_past_transaction_markers_is_the_commit_point_once_all_is_satisfied() {
        let mut t = OffsetTracker::new();
        t.observe_position(9);
        assert_eq!(
            t.commit_point(),
            None,
            "nothing received: nothing to commit"
        );
        t.receive(3).unwrap();
        t.observe_position(6); // offsets 4 and 5 were a commit marker and an aborted record
        assert_eq!(t.commit_point(), Some(3), "3 is not satisfied yet");
        t.satisfy(3);
        assert_eq!(t.commit_point(), Some(6));
        t.observe_position(5);
        assert_eq!(t.commit_point(), Some(6), "the position never moves back");
        t.receive(7).unwrap();
        assert_eq!(t.commit_point(), Some(7));
        t.satisfy(7);
        assert_eq!(
            t.commit_point(),
            Some(8),
            "the old position is behind the new record"
        );
    }

    #[test]
    fn out_of_order_is_refused() {
        let mut t = OffsetTracker::new();
        t.receive(5).unwrap();
        assert_eq!(t.receive(5), Err(OutOfOrder { offset: 5, last: 5 }));
        assert!(!t.satisfy(6));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Receive { gap: u8, satisfied: bool },
        Satisfy(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..4, any::<bool>()).prop_map(|(gap, satisfied)| Op::Receive { gap, satisfied }),
            any::<usize>().prop_map(Op::Satisfy),
        ]
    }

    proptest! {
        /// Against a reference model (a plain list of received offsets and their state): the
        /// commit point never passes an unsatisfied offset, and is exactly the oldest unsatisfied
        /// one, or the next after the last received.
        #[test]
        fn commit_point_matches_the_model(ops in proptest::collection::vec(op(), 1..200)) {
            let mut t = OffsetTracker::new();
            let mut model: Vec<(i64, bool)> = Vec::new();
            let mut next = 0i64;
            for op in ops {
                match op {
                    Op::Receive { gap, satisfied } => {
                        next += i64::from(gap);
                        if satisfied { t.receive_satisfied(next).unwrap(); } else { t.receive(next).unwrap(); }
                        model.push((next, satisfied));
                        next += 1;
                    }
                    Op::Satisfy(i) => {
                        if model.is_empty() { continue; }
                        let i = i % model.len();
                        let was = model[i].1;
                        prop_assert_eq!(t.satisfy(model[i].0), !was);
                        model[i].1 = true;
                    }
                }
                let expected = model.iter().find(|e| !e.1).map(|e| e.0)
                    .or_else(|| model.last().map(|e| e.0 + 1));
                prop_assert_eq!(t.commit_point(), expected);
                prop_assert_eq!(t.unsatisfied(), model.iter().filter(|e| !e.1).count());
                if let Some(point) = t.commit_point() {
                    prop_assert!(model.iter().all(|e| e.1 || e.0 >= point));
                }
            }
        }
    }
}
