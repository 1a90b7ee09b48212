//! Coalescing: per entity key, the notifications waiting for a fetch, and the fetch in flight.
//!
//! A key's notifications are merged on the *trailing* edge: the key becomes ready once no new
//! notification arrived for the debounce window, and at the latest `max_wait` after its first
//! pending notification. Merging keeps every notification's offset (a [`NoteRef`]) so the offsets
//! are released only together with the write that satisfies them.
//!
//! At most one flight per key runs at a time (single flight). A notification that arrives while
//! the key's fetch is in flight is *not* satisfied by that fetch (the fetch may have read the
//! state before the change): it starts a new pending entry, the follow-up (invariant 2). When the
//! flight's write is acknowledged with a version that covers every pending notification, the
//! follow-up is satisfied without a fetch (rule (b)).

use std::time::SystemTime;

use crate::clock::Tick;
use crate::decode::Fields;
use crate::fetch::Validators;
use crate::key::Version;
use crate::partitions::PartRef;

/// One notification's coordinates, compact: the partition's assignment and the offset. For an
/// on-demand refresh the reference is [`PartRef::REFRESH`] and the offset holds the waiter id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NoteRef {
    pub part: PartRef,
    pub offset: i64,
}

impl NoteRef {
    /// Does this note stand for an on-demand refresh?
    #[inline]
    pub fn is_refresh(&self) -> bool {
        self.part.is_refresh()
    }
}

/// Notes of one key; most keys hold one or two.
pub(crate) type Notes = smallvec::SmallVec<[NoteRef; 1]>;

/// Notifications waiting for a fetch.
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    /// When the first of them arrived.
    pub first_at: Tick,
    /// When the key becomes ready (trailing window, capped by max-wait).
    pub deadline: Tick,
    /// The highest announced version.
    pub max_version: Option<Version>,
    /// Every merged notification carried a version.
    pub all_versioned: bool,
    pub notes: Notes,
}

impl Pending {
    pub fn new(now: Tick, window: u64, note: NoteRef, version: Option<Version>) -> Self {
        let mut notes = Notes::new();
        notes.push(note);
        Pending {
            first_at: now,
            deadline: now.plus(window),
            max_version: version,
            all_versioned: version.is_some(),
            notes,
        }
    }

    /// Merge one more notification: the deadline slides (trailing edge) but never past max-wait
    /// after the first. `window` and `max_wait` are the ones of this notification (shorter for
    /// one that waited them out before it arrived, see [`crate::EngineConfig::catch_up`]); it
    /// never moves the deadline earlier.
    pub fn merge(
        &mut self,
        now: Tick,
        window: u64,
        max_wait: u64,
        note: NoteRef,
        version: Option<Version>,
    ) {
        self.deadline = self
            .deadline
            .max(now.plus(window).min(self.first_at.plus(max_wait)));
        self.max_version = Version::max_of(self.max_version, version);
        self.all_versioned &= version.is_some();
        self.notes.push(note);
    }

    /// Put notes of a failed flight back in front, keeping the older first-seen time.
    pub fn absorb(&mut self, older: Pending) {
        self.first_at = self.first_at.min(older.first_at);
        self.max_version = Version::max_of(self.max_version, older.max_version);
        self.all_versioned &= older.all_versioned;
        let mut notes = older.notes;
        notes.extend(self.notes.drain(..));
        self.notes = notes;
    }
}

/// What a flight is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Fetching,
    /// Fetched as a member of a business action; waits for the action's group write.
    Parked,
    Writing,
}

/// The fetch-and-write of one key, from the start of its fetch to the sink's acknowledgement.
#[derive(Debug)]
pub(crate) struct Flight {
    pub id: u64,
    pub phase: Phase,
    /// The notifications this flight satisfies (all received before it started).
    pub batch: Pending,
    /// The change being written (kept for single-record retries).
    pub change: Option<crate::sink::Change>,
    /// Bytes of the change's body, counted against the memory cap while it waits for the sink.
    pub change_bytes: usize,
    /// Validators to remember once the change is durable.
    pub validators: Option<Validators>,
    /// Write attempts that failed for this record alone.
    pub write_failures: u32,
    /// The business action this flight serves (see [`crate::action`]).
    pub action: Option<u64>,
    /// When the fetch started, on the wall clock: sinks that cannot guard on a version guard on
    /// this instead (an older read never overwrites a newer one).
    pub fetched_at: SystemTime,
    /// Every notification of the flight belonged to assignments that ended while its write was
    /// issued: the write is being dropped by the dispatcher, and the flight only waits for its
    /// completion so that a newer flight of the key cannot overtake it.
    pub abandoned: bool,
}

/// Retry state of a key whose fetches fail.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RetryState {
    /// Attempts that spent budget.
    pub counted: u32,
    /// All attempts.
    pub attempts: u32,
    /// Not before this tick.
    pub next_at: Tick,
    /// Held without evidence against the key (its source in outage, no other key succeeding,
    /// a breaker open, a delete held): shown and counted as blocked.
    pub blocked: bool,
    /// Its delete is held by the gone guard (its retries are no new evidence).
    pub gone_held: bool,
    /// An operator released the deletes the guard held: the next gone answer is written.
    pub released: bool,
    /// Its delete waits for the gone guard to have enough outcomes to judge (since then).
    pub gone_waiting_since: Option<Tick>,
    /// Where its source's outcome counts stood at the key's previous failure (its source's
    /// successes since then are evidence about the key).
    pub last_failure: Option<crate::health::FailureMark>,
}

/// Rarely used per-key state, boxed so the common key (pending, no retry, no fields) stays small.
#[derive(Debug, Default)]
pub(crate) struct KeyExtra {
    pub retry: Option<RetryState>,
    pub fields: Option<Fields>,
    /// An on-demand refresh waits for this key: it needs a fetch even without notes.
    pub refresh_requested: bool,
}

impl KeyExtra {
    fn is_empty(&self) -> bool {
        self.retry.is_none() && self.fields.is_none() && !self.refresh_requested
    }
}

/// Everything the engine holds for one key.
#[derive(Debug, Default)]
pub(crate) struct KeyState {
    pub pending: Option<Pending>,
    pub flight: Option<Box<Flight>>,
    extra: Option<Box<KeyExtra>>,
}

impl KeyState {
    /// A key with one pending entry.
    pub fn with_pending(pending: Pending) -> Self {
        KeyState {
            pending: Some(pending),
            flight: None,
            extra: None,
        }
    }

    fn extra_mut(&mut self) -> &mut KeyExtra {
        self.extra.get_or_insert_with(Box::default)
    }

    fn tidy(&mut self) {
        if self.extra.as_ref().is_some_and(|e| e.is_empty()) {
            self.extra = None;
        }
    }

    /// The retry state, if the key's fetches are failing.
    pub fn retry(&self) -> Option<RetryState> {
        self.extra.as_ref().and_then(|e| e.retry)
    }

    /// The retry state, created with `init` if absent.
    pub fn retry_or_insert(&mut self, init: RetryState) -> &mut RetryState {
        self.extra_mut().retry.get_or_insert(init)
    }

    /// The retry state, mutable, if the key's fetches are failing.
    pub fn retry_mut(&mut self) -> Option<&mut RetryState> {
        self.extra.as_mut().and_then(|e| e.retry.as_mut())
    }

    /// Forget the retry state (after success or a dead letter).
    pub fn clear_retry(&mut self) {
        if let Some(e) = &mut self.extra {
            e.retry = None;
        }
        self.tidy();
    }

    /// Decoded fields of the newest notification.
    pub fn fields(&self) -> Option<Fields> {
        self.extra.as_ref().and_then(|e| e.fields.clone())
    }

    /// Remember the newest notification's fields.
    pub fn set_fields(&mut self, fields: Fields) {
        self.extra_mut().fields = Some(fields);
    }

    /// Is an on-demand refresh waiting?
    pub fn refresh_requested(&self) -> bool {
        self.extra.as_ref().is_some_and(|e| e.refresh_requested)
    }

    /// Mark or clear a waiting refresh.
    pub fn set_refresh_requested(&mut self, on: bool) {
        if on {
            self.extra_mut().refresh_requested = true;
        } else if let Some(e) = &mut self.extra {
            e.refresh_requested = false;
            self.tidy();
        }
    }

    /// When the key can start its next flight, if it has pending work and no flight.
    pub fn due(&self) -> Option<Tick> {
        if self.flight.is_some() {
            return None;
        }
        let pending = self.pending.as_ref()?;
        Some(match self.retry() {
            Some(r) => pending.deadline.max(r.next_at),
            None => pending.deadline,
        })
    }

    /// Nothing pending, nothing in flight: the key can be forgotten.
    pub fn is_idle(&self) -> bool {
        self.pending.is_none() && self.flight.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(o: i64) -> NoteRef {
        NoteRef {
            part: PartRef {
                slot: 0,
                generation: 1,
            },
            offset: o,
        }
    }

    #[test]
    fn trailing_window_is_capped_by_max_wait() {
        let mut p = Pending::new(Tick(0), 100, note(0), None);
        assert_eq!(p.deadline, Tick(100));
        p.merge(Tick(80), 100, 250, note(1), Some(Version::Int(2)));
        assert_eq!(p.deadline, Tick(180));
        p.merge(Tick(170), 100, 250, note(2), None);
        assert_eq!(p.deadline, Tick(250), "capped by first + max_wait");
        assert!(!p.all_versioned);
        assert_eq!(p.max_version, Some(Version::Int(2)));
        assert_eq!(p.notes.len(), 3);
    }

    #[test]
    fn absorb_keeps_older_notes_first() {
        let mut newer = Pending::new(Tick(50), 10, note(5), Some(Version::Int(5)));
        let older = Pending::new(Tick(10), 10, note(1), Some(Version::Int(1)));
        newer.absorb(older);
        assert_eq!(newer.first_at, Tick(10));
        assert_eq!(newer.notes[0].offset, 1);
        assert_eq!(newer.max_version, Some(Version::Int(5)));
        assert!(newer.all_versioned);
    }
}
