//! Offsets: which received notifications of a partition are satisfied, and how far it is safe to
//! commit.
//!
//! Offsets are tracked in the order they were received, never by arithmetic: compacted topics,
//! transaction markers and aborted transactions leave gaps, so "offset + 1" is not "the next
//! record". The commit point is the oldest unsatisfied received offset; when everything received
//! is satisfied it is the consumer's position (the offset after the last received record, or
//! further when transaction markers follow it). A partition that received nothing has no commit
//! point, and a commit point already committed is not offered again.
//!
//! ## Transactions
//!
//! With a transactional sink (exactly-once delivery) an offset has a third state: *provisional*,
//! satisfied by a write the sink holds in its open transaction. A provisional offset becomes
//! satisfied when the transaction commits and unsatisfied again when it aborts. What a
//! transaction commits with its writes is a [`StoredOffset`]: the oldest offset that is neither
//! satisfied nor provisional, plus the ranges above it that are (their writes are in the sink
//! already, although an older offset is still open). A restart or a new owner of the partition
//! starts from the stored offset and takes records in the stored ranges as satisfied on arrival
//! ([`StartFilter`]), so no offset is covered by two committed writes.

use std::collections::VecDeque;

/// The state of one received offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    /// Not satisfied.
    Open,
    /// Satisfied by a write the sink holds in its open transaction.
    Provisional,
    /// Satisfied.
    Done,
}

/// Per-partition record of received offsets and their state.
#[derive(Debug, Default, Clone)]
pub struct OffsetTracker {
    /// Received offsets, oldest first, with their state. The satisfied prefix is popped eagerly,
    /// so the front, if any, is always open or provisional.
    window: VecDeque<(i64, Mark)>,
    /// Open and provisional offsets.
    unsatisfied: usize,
    /// Provisional offsets.
    provisional: usize,
    last_received: Option<i64>,
    /// The consumer's position (next offset it will deliver), when it is past the last received
    /// record: transaction markers and compacted-away offsets leave the position ahead of
    /// `last_received + 1`.
    position: Option<i64>,
    committed: Option<i64>,
    /// The satisfied ranges committed with `committed` as its metadata (at-least-once).
    committed_ranges: String,
    /// A commit sent and not yet confirmed: its offset and ranges.
    sent: Option<(i64, String)>,
    /// What the sink stored last for this partition (exactly-once delivery).
    stored: Option<StoredOffset>,
    /// What the sink had stored when the assignment began, while records it covers may still
    /// arrive (see [`OffsetTracker::start_from`]).
    start: Option<StartFilter>,
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

/// What a transactional sink stores for a partition with its writes: the next offset to
/// consume (every offset below it is satisfied) and the ranges above it that are satisfied too.
///
/// Ranges are inclusive, sorted, non-overlapping and above `offset`. Offsets inside a range
/// that were never received are not records (transaction markers, compacted offsets), so a
/// range may span them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct StoredOffset {
    /// The next offset to consume.
    pub offset: i64,
    /// Satisfied ranges above `offset`, `(first, last)` inclusive.
    pub covered: Vec<(i64, i64)>,
}

/// Stored offset metadata that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unreadable stored offset ranges {text:?}: {reason}")]
pub struct BadStoredRanges {
    /// The text.
    pub text: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// The prefix of encoded ranges (a format version).
const RANGES_V1: &str = "refetch1:";

impl StoredOffset {
    /// A stored offset without ranges.
    pub fn at(offset: i64) -> Self {
        StoredOffset {
            offset,
            covered: Vec::new(),
        }
    }

    /// The ranges as text (for a database column or a Kafka offset's metadata): empty without
    /// ranges, else `refetch1:` and `gap+length` pairs separated by commas, each gap counted
    /// from the end of the previous range (from `offset` for the first one). Compact: a few
    /// bytes per range.
    pub fn encode_ranges(&self) -> String {
        use std::fmt::Write as _;
        if self.covered.is_empty() {
            return String::new();
        }
        let mut out = String::with_capacity(RANGES_V1.len() + self.covered.len() * 6);
        out.push_str(RANGES_V1);
        let mut prev = self.offset;
        for (i, (a, b)) in self.covered.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{}+{}", a - prev, b - a);
            prev = *b;
        }
        out
    }

    /// [`StoredOffset::encode_ranges`] within `max_bytes`: the ranges nearest the offset that
    /// fit, the rest left out (empty when not even the first fits). Leaving a range out is safe
    /// where the ranges only save work (at-least-once commit metadata: its records are fetched
    /// again after a restart), not where they promise something (a transaction's).
    pub fn encode_ranges_within(&self, max_bytes: usize) -> String {
        use std::fmt::Write as _;
        if self.covered.is_empty() || max_bytes <= RANGES_V1.len() {
            return String::new();
        }
        let mut out =
            String::with_capacity(max_bytes.min(RANGES_V1.len() + self.covered.len() * 8));
        out.push_str(RANGES_V1);
        let mut prev = self.offset;
        let mut part = String::new();
        for (i, (a, b)) in self.covered.iter().enumerate() {
            part.clear();
            if i > 0 {
                part.push(',');
            }
            let _ = write!(part, "{}+{}", a - prev, b - a);
            if out.len() + part.len() > max_bytes {
                break;
            }
            out.push_str(&part);
            prev = *b;
        }
        if out.len() == RANGES_V1.len() {
            out.clear();
        }
        out
    }

    /// Read ranges written by [`StoredOffset::encode_ranges`] for a stored `offset`. Empty text
    /// (or text another tool wrote, without the prefix) means no ranges; text with the prefix
    /// that does not parse is an error (the ranges cannot be trusted, nor ignored).
    pub fn decode(offset: i64, text: &str) -> Result<StoredOffset, BadStoredRanges> {
        let bad = |reason| BadStoredRanges {
            text: text.chars().take(200).collect(),
            reason,
        };
        let Some(rest) = text.strip_prefix(RANGES_V1) else {
            return Ok(StoredOffset::at(offset));
        };
        let mut covered = Vec::new();
        let mut prev = offset;
        for part in rest.split(',').filter(|p| !p.is_empty()) {
            let (gap, len) = part
                .split_once('+')
                .ok_or_else(|| bad("a range is not gap+length"))?;
            let gap: i64 = gap.parse().map_err(|_| bad("a gap is not a number"))?;
            let len: i64 = len.parse().map_err(|_| bad("a length is not a number"))?;
            let min_gap = if covered.is_empty() { 1 } else { 2 };
            if gap < min_gap || len < 0 {
                return Err(bad("ranges must be ascending, apart, and above the offset"));
            }
            let a = prev
                .checked_add(gap)
                .ok_or_else(|| bad("offset overflow"))?;
            let b = a.checked_add(len).ok_or_else(|| bad("offset overflow"))?;
            covered.push((a, b));
            prev = b;
        }
        Ok(StoredOffset { offset, covered })
    }
}

/// Which records of a partition arrive satisfied because the sink stored them already: those
/// below the stored offset and those in its ranges. Records arrive in order, so a lookup is
/// O(1) amortised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartFilter {
    stored: StoredOffset,
    /// The first range not yet passed.
    cursor: usize,
}

impl StartFilter {
    /// A filter for what the sink stored.
    pub fn new(stored: StoredOffset) -> Self {
        StartFilter { stored, cursor: 0 }
    }

    /// Is `offset` (not below the last offset asked about) stored already?
    pub fn covers(&mut self, offset: i64) -> bool {
        if offset < self.stored.offset {
            return true;
        }
        while let Some(&(_, b)) = self.stored.covered.get(self.cursor) {
            if b < offset {
                self.cursor += 1;
            } else {
                break;
            }
        }
        self.stored
            .covered
            .get(self.cursor)
            .is_some_and(|&(a, _)| a <= offset)
    }

    /// The first offset after everything the filter knows about.
    pub fn horizon(&self) -> i64 {
        self.stored
            .covered
            .last()
            .map_or(self.stored.offset, |&(_, b)| b + 1)
            .max(self.stored.offset)
    }

    /// The stored offset and ranges.
    pub fn stored(&self) -> &StoredOffset {
        &self.stored
    }
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
        self.window.push_back((offset, Mark::Open));
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
            self.window.push_back((offset, Mark::Done));
        }
        Ok(())
    }

    fn entry_mut(&mut self, offset: i64) -> Option<&mut (i64, Mark)> {
        let i = self.window.binary_search_by_key(&offset, |e| e.0).ok()?;
        self.window.get_mut(i)
    }

    fn pop_done(&mut self) {
        while matches!(self.window.front(), Some((_, Mark::Done))) {
            self.window.pop_front();
        }
    }

    /// Mark `offset` satisfied (also when it is provisional). Returns `false` when it is unknown
    /// or was satisfied already.
    pub fn satisfy(&mut self, offset: i64) -> bool {
        let Some(entry) = self.entry_mut(offset) else {
            return false;
        };
        let was = entry.1;
        if was == Mark::Done {
            return false;
        }
        entry.1 = Mark::Done;
        self.unsatisfied -= 1;
        if was == Mark::Provisional {
            self.provisional -= 1;
        }
        self.pop_done();
        true
    }

    /// Mark an open `offset` provisional: a write the sink holds in its open transaction
    /// satisfies it. Returns `false` when it is unknown or not open.
    pub fn provisional(&mut self, offset: i64) -> bool {
        let Some(entry) = self.entry_mut(offset) else {
            return false;
        };
        if entry.1 != Mark::Open {
            return false;
        }
        entry.1 = Mark::Provisional;
        self.provisional += 1;
        true
    }

    /// The transaction of a provisional `offset` aborted: it is open again. Returns `false`
    /// when it is unknown or not provisional.
    pub fn revert(&mut self, offset: i64) -> bool {
        let Some(entry) = self.entry_mut(offset) else {
            return false;
        };
        if entry.1 != Mark::Provisional {
            return false;
        }
        entry.1 = Mark::Open;
        self.provisional -= 1;
        true
    }

    /// Is `offset` received and not yet satisfied (open or provisional)?
    pub fn is_outstanding(&self, offset: i64) -> bool {
        self.window
            .binary_search_by_key(&offset, |e| e.0)
            .ok()
            .and_then(|i| self.window.get(i))
            .is_some_and(|e| e.1 != Mark::Done)
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

    /// The offset after everything received (at least the consumer's position).
    fn next(&self) -> Option<i64> {
        let next = self.last_received? + 1;
        Some(self.position.map_or(next, |p| p.max(next)))
    }

    /// The offset it is safe to commit: the oldest unsatisfied received offset (a provisional
    /// one included), or else the consumer's position (at least the one after the last
    /// received record). `None` when nothing was received.
    pub fn commit_point(&self) -> Option<i64> {
        match self.window.front() {
            Some((offset, _)) => Some(*offset),
            None => self.next(),
        }
    }

    /// The commit point if it differs from what was committed last.
    pub fn pending_commit(&self) -> Option<i64> {
        let point = self.commit_point()?;
        (self.committed != Some(point)).then_some(point)
    }

    /// Record a successful commit of `offset` (with the ranges sent with it, if it was sent
    /// by [`OffsetTracker::commit_with_ranges`]).
    pub fn committed(&mut self, offset: i64) {
        self.committed = Some(offset);
        match self.sent.take() {
            Some((o, ranges)) if o == offset => self.committed_ranges = ranges,
            _ => self.committed_ranges.clear(),
        }
    }

    /// At-least-once commit metadata: the commit point and the satisfied ranges above it,
    /// encoded within `max_bytes` (nearest first), when either differs from what was committed
    /// last. Ranges let a restart (or the next owner) take the records they cover as satisfied
    /// instead of fetching them again; see [`OffsetTracker::start_from`]. The answer is
    /// remembered as sent, so a successful commit of it records its ranges.
    pub fn commit_with_ranges(&mut self, max_bytes: usize) -> Option<(i64, String)> {
        let point = self.commit_point()?;
        let ranges = if max_bytes == 0 || (self.unsatisfied == 0 && self.start.is_none()) {
            String::new()
        } else {
            self.to_store()
                .map(|mut s| {
                    // Past the point, the sink stored everything up to `s.offset` before this
                    // assignment (the ranges it started from): keep that as a range.
                    if s.offset > point + 1 {
                        s.covered.insert(0, (point + 1, s.offset - 1));
                    }
                    s.covered.retain(|&(a, _)| a > point);
                    s.offset = point;
                    s.encode_ranges_within(max_bytes)
                })
                .unwrap_or_default()
        };
        if self.committed == Some(point) && self.committed_ranges == ranges {
            return None;
        }
        self.sent = Some((point, ranges.clone()));
        Some((point, ranges))
    }

    /// The last committed offset, if any commit succeeded in this assignment.
    pub fn last_committed(&self) -> Option<i64> {
        self.committed
    }

    /// The last offset received, if any.
    pub fn last_received(&self) -> Option<i64> {
        self.last_received
    }

    /// Received offsets not yet satisfied (provisional ones included).
    pub fn unsatisfied(&self) -> usize {
        self.unsatisfied
    }

    /// Received offsets satisfied only provisionally.
    pub fn provisional_count(&self) -> usize {
        self.provisional
    }

    /// Offsets held in memory (unsatisfied ones and satisfied ones behind an unsatisfied head).
    pub fn outstanding(&self) -> usize {
        self.window.len()
    }

    // ----- exactly-once -------------------------------------------------------------------------

    /// The sink had `stored` for this partition when the assignment began: records below its
    /// offset and in its ranges are satisfied on arrival (use [`OffsetTracker::stored_covers`]),
    /// and what the tracker offers to store never goes behind it.
    pub fn start_from(&mut self, stored: StoredOffset) {
        self.stored = Some(stored.clone());
        self.start = Some(StartFilter::new(stored));
    }

    /// Did the sink store `offset` before this assignment (then it is satisfied on arrival)?
    /// Asked once per received record, in order.
    #[inline]
    pub fn stored_covers(&mut self, offset: i64) -> bool {
        let Some(f) = &mut self.start else {
            return false;
        };
        f.covers(offset)
    }

    /// What a transaction should store now: the oldest offset that is neither satisfied nor
    /// provisional (else the consumer's position), and the satisfied or provisional ranges above
    /// it, merged with what the sink stored before this assignment and has not been received
    /// again yet. `None` when nothing is known (nothing received, nothing stored).
    pub fn to_store(&self) -> Option<StoredOffset> {
        let start = self
            .start
            .as_ref()
            .filter(|f| self.last_received.is_none_or(|l| l < f.horizon()));
        let Some(next) = self.next() else {
            return start.map(|f| f.stored().clone());
        };
        // Stored ranges beyond what was received, clipped to start at `next` at the earliest.
        let ahead = start.into_iter().flat_map(|f| {
            f.stored()
                .covered
                .iter()
                .filter(move |&&(_, b)| b >= next)
                .map(move |&(a, b)| (a.max(next), b))
        });
        match self.window.iter().position(|e| e.1 == Mark::Open) {
            Some(i) => {
                // Runs of satisfied or provisional entries after the oldest open one; the gaps
                // between received offsets are not records, so a run spans them.
                let mut covered: Vec<(i64, i64)> = Vec::new();
                let mut run: Option<(i64, i64)> = None;
                for &(o, m) in self.window.iter().skip(i + 1) {
                    if m == Mark::Open {
                        covered.extend(run.take());
                    } else {
                        run = Some(run.map_or((o, o), |(a, _)| (a, o)));
                    }
                }
                // A run that reaches the end of the window continues into a stored range that
                // starts right at `next`.
                let last_open = self.window.back().is_some_and(|e| e.1 == Mark::Open);
                for (a, b) in ahead {
                    match &mut run {
                        Some(r) if a == next && !last_open => r.1 = b,
                        _ => covered.extend(run.replace((a, b))),
                    }
                }
                covered.extend(run);
                Some(StoredOffset {
                    offset: self.window[i].0,
                    covered,
                })
            }
            None => {
                // Everything received is satisfied or provisional: the point is the first offset
                // from `next` on that the sink did not store before.
                let mut point = start.map_or(next, |f| next.max(f.stored().offset));
                let mut covered = Vec::new();
                for (a, b) in ahead {
                    if b < point {
                        continue;
                    }
                    if a <= point {
                        point = b + 1;
                    } else {
                        covered.push((a, b));
                    }
                }
                Some(StoredOffset {
                    offset: point,
                    covered,
                })
            }
        }
    }

    /// What [`OffsetTracker::to_store`] offers, if it differs from what the sink stored last.
    pub fn pending_store(&self) -> Option<StoredOffset> {
        let s = self.to_store()?;
        (self.stored.as_ref() != Some(&s)).then_some(s)
    }

    /// The sink stored `s` (its transaction committed).
    pub fn stored(&mut self, s: StoredOffset) {
        self.stored = Some(s);
    }

    /// What the sink stored last, if anything is known.
    pub fn last_stored(&self) -> Option<&StoredOffset> {
        self.stored.as_ref()
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

    #[test]
    fn provisional_offsets_hold_the_commit_point_until_settled_or_reverted() {
        let mut t = OffsetTracker::new();
        for o in [1, 2, 3] {
            t.receive(o).unwrap();
        }
        assert!(t.provisional(1));
        assert!(!t.provisional(1), "already provisional");
        assert_eq!(
            t.commit_point(),
            Some(1),
            "a provisional offset is not satisfied"
        );
        assert_eq!(t.provisional_count(), 1);
        assert!(t.revert(1));
        assert!(!t.revert(1));
        assert!(t.provisional(1));
        assert!(t.satisfy(1), "a commit settles it");
        assert_eq!(t.commit_point(), Some(2));
        assert_eq!(t.provisional_count(), 0);
        assert_eq!(t.unsatisfied(), 2);
    }

    #[test]
    fn what_to_store_is_the_oldest_open_offset_and_the_ranges_above_it() {
        let mut t = OffsetTracker::new();
        assert_eq!(t.to_store(), None);
        for o in [10, 11, 12, 14, 15, 20, 21] {
            t.receive(o).unwrap();
        }
        t.provisional(11);
        t.satisfy(12);
        t.provisional(15);
        t.provisional(21);
        // 10 open; 11-15 covered except 14 (open); 20 open; 21 covered.
        assert_eq!(
            t.to_store(),
            Some(StoredOffset {
                offset: 10,
                covered: vec![(11, 12), (15, 15), (21, 21)]
            })
        );
        t.satisfy(10);
        t.provisional(14);
        assert_eq!(
            t.to_store(),
            Some(StoredOffset {
                offset: 20,
                covered: vec![(21, 21)]
            }),
            "11 to 15 are covered now, so the point moves to 20"
        );
        t.provisional(20);
        assert_eq!(t.to_store(), Some(StoredOffset::at(22)));
        t.observe_position(25);
        assert_eq!(t.to_store(), Some(StoredOffset::at(25)), "past markers");
    }

    #[test]
    fn ranges_round_trip_as_text_and_bad_text_is_refused() {
        let s = StoredOffset {
            offset: 100,
            covered: vec![(105, 110), (120, 120), (1_000_000, 1_000_400)],
        };
        let text = s.encode_ranges();
        assert_eq!(text, "refetch1:5+5,10+0,999880+400");
        assert_eq!(StoredOffset::decode(100, &text), Ok(s));
        assert_eq!(StoredOffset::at(7).encode_ranges(), "");
        assert_eq!(StoredOffset::decode(7, ""), Ok(StoredOffset::at(7)));
        assert_eq!(
            StoredOffset::decode(7, "written by another tool"),
            Ok(StoredOffset::at(7))
        );
        for bad in [
            "refetch1:x+1",
            "refetch1:0+1",
            "refetch1:3+1,1+0",
            "refetch1:3+-1",
            "refetch1:3",
        ] {
            assert!(StoredOffset::decode(7, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn records_the_sink_stored_are_satisfied_on_arrival() {
        let mut f = StartFilter::new(StoredOffset {
            offset: 10,
            covered: vec![(12, 13), (20, 20)],
        });
        let covered: Vec<i64> = (5..23).filter(|&o| f.covers(o)).collect();
        assert_eq!(covered, vec![5, 6, 7, 8, 9, 12, 13, 20]);
        assert_eq!(f.horizon(), 21);
    }

    #[test]
    fn what_to_store_keeps_what_was_stored_before_the_assignment() {
        let stored = StoredOffset {
            offset: 10,
            covered: vec![(12, 13), (20, 20)],
        };
        let mut t = OffsetTracker::new();
        t.start_from(stored.clone());
        assert_eq!(t.to_store(), Some(stored.clone()), "nothing received yet");
        assert_eq!(t.pending_store(), None, "unchanged");
        // The consumer starts below the stored offset (its commit lagged behind the sink's).
        for o in 7..10 {
            assert!(t.stored_covers(o));
            t.receive_satisfied(o).unwrap();
        }
        assert_eq!(
            t.to_store(),
            Some(stored.clone()),
            "never behind the stored offset"
        );
        assert!(!t.stored_covers(10));
        t.receive(10).unwrap();
        assert!(!t.stored_covers(11));
        t.receive(11).unwrap();
        assert_eq!(
            t.to_store(),
            Some(StoredOffset {
                offset: 10,
                covered: vec![(12, 13), (20, 20)]
            }),
            "the stored ranges ahead are kept"
        );
        t.provisional(11);
        assert_eq!(
            t.to_store(),
            Some(StoredOffset {
                offset: 10,
                covered: vec![(11, 13), (20, 20)]
            }),
            "a run reaching the end of the window joins the stored range at the next offset"
        );
        t.provisional(10);
        assert_eq!(
            t.to_store(),
            Some(StoredOffset {
                offset: 14,
                covered: vec![(20, 20)]
            })
        );
        for o in [12, 13] {
            assert!(t.stored_covers(o));
            t.receive_satisfied(o).unwrap();
        }
        for o in 14..21 {
            if t.stored_covers(o) {
                t.receive_satisfied(o).unwrap();
            } else {
                t.receive(o).unwrap();
            }
        }
        t.receive(21).unwrap();
        assert_eq!(
            t.to_store(),
            Some(StoredOffset {
                offset: 14,
                covered: vec![(20, 20)]
            }),
            "past the horizon only what was received counts"
        );
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

    #[derive(Debug, Clone)]
    enum TxnOp {
        Receive { gap: u8, satisfied: bool },
        Satisfy(usize),
        Provisional(usize),
        Revert(usize),
    }

    fn txn_op() -> impl Strategy<Value = TxnOp> {
        prop_oneof![
            (0u8..3, any::<bool>()).prop_map(|(gap, satisfied)| TxnOp::Receive { gap, satisfied }),
            any::<usize>().prop_map(TxnOp::Satisfy),
            any::<usize>().prop_map(TxnOp::Provisional),
            any::<usize>().prop_map(TxnOp::Revert),
        ]
    }

    proptest! {
        /// What a transaction stores, against a model of received offsets and their states
        /// (0 open, 1 provisional, 2 satisfied): the stored offset is the oldest open one (or the
        /// next after everything), no open offset is inside a stored range, and every satisfied
        /// or provisional offset above the stored offset is inside one (else a restart would
        /// write it again).
        #[test]
        fn what_to_store_matches_the_model(ops in proptest::collection::vec(txn_op(), 1..200)) {
            let mut t = OffsetTracker::new();
            let mut model: Vec<(i64, u8)> = Vec::new();
            let mut next = 0i64;
            for op in ops {
                match op {
                    TxnOp::Receive { gap, satisfied } => {
                        next += i64::from(gap);
                        if satisfied { t.receive_satisfied(next).unwrap(); } else { t.receive(next).unwrap(); }
                        model.push((next, if satisfied { 2 } else { 0 }));
                        next += 1;
                    }
                    TxnOp::Satisfy(i) | TxnOp::Provisional(i) | TxnOp::Revert(i) if model.is_empty() => { let _ = i; }
                    TxnOp::Satisfy(i) => {
                        let i = i % model.len();
                        prop_assert_eq!(t.satisfy(model[i].0), model[i].1 != 2);
                        model[i].1 = 2;
                    }
                    TxnOp::Provisional(i) => {
                        let i = i % model.len();
                        prop_assert_eq!(t.provisional(model[i].0), model[i].1 == 0);
                        if model[i].1 == 0 { model[i].1 = 1; }
                    }
                    TxnOp::Revert(i) => {
                        let i = i % model.len();
                        prop_assert_eq!(t.revert(model[i].0), model[i].1 == 1);
                        if model[i].1 == 1 { model[i].1 = 0; }
                    }
                }
                let Some(s) = t.to_store() else {
                    prop_assert!(model.is_empty());
                    continue;
                };
                let inside = |o: i64| s.covered.iter().any(|&(a, b)| a <= o && o <= b);
                let oldest_open = model.iter().find(|e| e.1 == 0).map(|e| e.0);
                prop_assert_eq!(s.offset, oldest_open.unwrap_or(next));
                for &(o, st) in &model {
                    if st == 0 {
                        prop_assert!(!inside(o), "open {} inside {:?}", o, s);
                    } else if o > s.offset {
                        prop_assert!(inside(o), "covered {} outside {:?}", o, s);
                    }
                }
                for w in s.covered.windows(2) {
                    prop_assert!(w[0].1 + 1 < w[1].0, "ranges apart and ascending: {:?}", s);
                }
                prop_assert!(s.covered.iter().all(|&(a, b)| a > s.offset && a <= b));
                prop_assert_eq!(StoredOffset::decode(s.offset, &s.encode_ranges()), Ok(s.clone()));
            }
        }

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

    #[test]
    fn commit_ranges_name_the_satisfied_offsets_above_the_point() {
        let mut t = OffsetTracker::new();
        for o in 0..10 {
            t.receive(o).unwrap();
        }
        for o in (0..10).filter(|o| *o != 2 && *o != 6) {
            t.satisfy(o);
        }
        let (point, text) = t.commit_with_ranges(4000).unwrap();
        assert_eq!(point, 2);
        assert_eq!(
            StoredOffset::decode(point, &text).unwrap().covered,
            vec![(3, 5), (7, 9)]
        );
        t.committed(2);
        assert_eq!(t.commit_with_ranges(4000), None, "nothing new to commit");
        t.satisfy(6);
        let (point, text) = t.commit_with_ranges(4000).unwrap();
        assert_eq!(point, 2);
        assert_eq!(
            StoredOffset::decode(2, &text).unwrap().covered,
            vec![(3, 9)]
        );
        // A failed commit (no `committed`) leaves the ranges to send again.
        assert!(t.commit_with_ranges(4000).is_some());
        t.satisfy(2);
        assert_eq!(t.commit_with_ranges(4000), Some((10, String::new())));
        // Off: the point only.
        let mut t = OffsetTracker::new();
        t.receive(0).unwrap();
        t.receive(1).unwrap();
        t.satisfy(1);
        assert_eq!(t.commit_with_ranges(0), Some((0, String::new())));
    }

    #[test]
    fn a_restart_keeps_the_ranges_it_started_from_until_they_are_received() {
        let mut t = OffsetTracker::new();
        t.start_from(StoredOffset {
            offset: 100,
            covered: vec![(105, 200), (300, 310)],
        });
        for o in 100..103 {
            assert!(!t.stored_covers(o));
            t.receive(o).unwrap();
        }
        t.satisfy(100);
        let (point, text) = t.commit_with_ranges(4000).unwrap();
        assert_eq!(point, 101);
        assert_eq!(
            StoredOffset::decode(point, &text).unwrap().covered,
            vec![(105, 200), (300, 310)]
        );
        t.satisfy(101);
        t.satisfy(102);
        // Everything received is satisfied; 103 and 104 are not stored, 105.. are.
        let (point, text) = t.commit_with_ranges(4000).unwrap();
        assert_eq!(point, 103);
        assert_eq!(
            StoredOffset::decode(point, &text).unwrap().covered,
            vec![(105, 200), (300, 310)]
        );
    }

    #[test]
    fn commit_ranges_stay_within_their_bound_keeping_the_nearest() {
        // 20,000 offsets, every other one open: 10,000 one-offset ranges, far over 4,000 bytes.
        let mut t = OffsetTracker::new();
        for o in 0..20_000 {
            t.receive(o).unwrap();
            if o % 2 == 1 {
                t.satisfy(o);
            }
        }
        let (point, text) = t.commit_with_ranges(4000).unwrap();
        assert_eq!(point, 0);
        assert!(text.len() <= 4000, "{} bytes", text.len());
        assert!(text.len() > 3990, "the bound is used: {} bytes", text.len());
        let covered = StoredOffset::decode(point, &text).unwrap().covered;
        let expected: Vec<(i64, i64)> = (0..covered.len() as i64)
            .map(|i| (2 * i + 1, 2 * i + 1))
            .collect();
        assert_eq!(covered, expected, "the ranges nearest the point, in order");
        assert!(
            t.commit_with_ranges(9)
                .map(|(_, r)| r)
                .unwrap_or_default()
                .is_empty()
        );
    }

    proptest! {
        #[test]
        fn bounded_ranges_are_a_prefix_and_fit(
            gaps in proptest::collection::vec((1i64..100_000, 0i64..100_000), 0..60),
            max in 0usize..400,
        ) {
            let mut covered = Vec::new();
            let mut prev = 1_000i64;
            for (i, (gap, len)) in gaps.iter().enumerate() {
                let a = prev + gap + i64::from(i > 0);
                covered.push((a, a + len));
                prev = a + len;
            }
            let s = StoredOffset { offset: 1_000, covered: covered.clone() };
            let text = s.encode_ranges_within(max);
            prop_assert!(text.len() <= max);
            let back = StoredOffset::decode(1_000, &text).unwrap().covered;
            prop_assert_eq!(&covered[..back.len()], &back[..]);
            if max >= s.encode_ranges().len() {
                prop_assert_eq!(text, s.encode_ranges());
            }
        }
    }
}
