//! The engine's state machine, free of I/O.
//!
//! [`Engine`] holds every partition's offsets, every key's pending notifications and flight, the
//! retry and dead-letter state, and decides what to do next. It performs no I/O and reads no
//! clock: callers feed it records, completions and the current [`Tick`], and take the
//! [`Action`]s it produces (fetch this, write that, dead-letter this). The async runtime in
//! [`crate::pipeline`] drives it against Kafka, a `Fetcher` and a `Sink`; tests drive it directly,
//! which is how the property tests check the invariants of the design notes.
//!
//! Invariants kept here (numbers from the design notes):
//! 1. the commit point of a partition never passes a received, unsatisfied notification;
//! 2. a notification received while its key is in flight starts a follow-up;
//! 3. at most one flight per key; a key's writes are issued in flight order;
//! 4. a key is fetched at most once per window plus one follow-up per flight;
//! 5. a key in backoff holds only its own partition's commit point; only attempts against a
//!    healthy source spend the retry budget;
//! 6. caps on outstanding offsets, pending keys and bytes produce pause decisions;
//! 7. completions from an older assignment epoch never touch offsets.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use crate::action::{
    ActionFailurePolicy, ActionTag, Actions, CORRELATION_HEADER, Completed, MemberState,
};
use crate::clock::{Tick, millis};
use crate::coalesce::{Flight, KeyState, NoteRef, Notes, Pending, Phase, REFRESH_SLOT, RetryState};
use crate::config::{EngineConfig, UnknownTypePolicy};
use crate::decode::Fields;
use crate::decode::{Decoded, NotificationDecoder, RecordView};
use crate::dlq::{self, DeadLetter, header, reason};
use crate::error::ErrorClass;
use crate::fetch::{FetchError, FetchOutcome, FetchRequest, Validators};
use crate::health::{GoneGuard, SourceHealth};
use crate::key::{EntityKey, Version};
use crate::offsets::OffsetTracker;
use crate::sink::{Change, SinkError};
use crate::stats::{Counters, LatencyHistogram};

/// A topic partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    /// Topic name.
    pub topic: Arc<str>,
    /// Partition number.
    pub partition: i32,
}

impl TopicPartition {
    /// A topic partition.
    pub fn new(topic: impl Into<Arc<str>>, partition: i32) -> Self {
        TopicPartition {
            topic: topic.into(),
            partition,
        }
    }
}

impl std::fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// Fetch a key (one flight).
#[derive(Debug, Clone)]
pub struct FetchJob {
    /// The flight this fetch belongs to.
    pub flight: u64,
    /// What to fetch.
    pub request: FetchRequest,
    /// Ask the sink for the version it holds first: every coalesced notification is versioned and
    /// the engine has no acknowledged version cached (for example after a restart).
    pub check_sink_first: bool,
}

/// Write a change (the second half of a flight).
#[derive(Debug, Clone)]
pub struct WriteJob {
    /// The flight.
    pub flight: u64,
    /// The change.
    pub change: Change,
    /// Set when the change belongs to a business action: the action's writes are issued one after
    /// the other and must reach the sink in one batch.
    pub group: Option<WriteGroup>,
}

/// The business action a write belongs to (see [`crate::action`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteGroup {
    /// Identifies the action's group write.
    pub action: u64,
    /// How many writes the group has (all issued consecutively).
    pub size: usize,
}

/// Produce a dead letter.
#[derive(Debug, Clone)]
pub struct DeadLetterJob {
    /// Identifies the dead letter in [`Engine::on_dead_letter_done`].
    pub id: u64,
    /// The record.
    pub record: DeadLetter,
}

/// What the engine wants done.
#[derive(Debug, Clone)]
pub enum Action {
    /// Fetch a key.
    Fetch(FetchJob),
    /// Write a change to the sink.
    Write(WriteJob),
    /// Produce a dead letter.
    DeadLetter(DeadLetterJob),
}

/// How a fetch job ended.
#[derive(Debug, Clone)]
pub enum FetchResult {
    /// The fetcher answered.
    Outcome(FetchOutcome),
    /// The fetcher failed.
    Error(FetchError),
    /// The sink already holds this version (or newer): no fetch was needed.
    AlreadyHeld(Version),
}

/// How a write of one change ended.
#[derive(Debug, Clone)]
pub enum WriteResult {
    /// Durable.
    Durable,
    /// This record failed (on its own, or with its batch).
    Failed(SinkError),
}

/// The outcome of an on-demand refresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshOutcome {
    /// A fetch that started after the request was written (or said unchanged).
    Done,
    /// The key could not be refreshed.
    Failed(String),
}

/// Partition pause decisions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PauseChanges {
    /// Partitions to pause.
    pub pause: Vec<TopicPartition>,
    /// Partitions to resume.
    pub resume: Vec<TopicPartition>,
}

impl PauseChanges {
    /// No change.
    pub fn is_empty(&self) -> bool {
        self.pause.is_empty() && self.resume.is_empty()
    }
}

/// Which decoder reads which topic.
#[derive(Clone, Default)]
pub struct Decoders {
    by_topic: HashMap<String, Arc<dyn NotificationDecoder>>,
    default: Option<Arc<dyn NotificationDecoder>>,
}

impl std::fmt::Debug for Decoders {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoders")
            .field("topics", &self.by_topic.keys().collect::<Vec<_>>())
            .field("default", &self.default.is_some())
            .finish()
    }
}

impl Decoders {
    /// No decoders yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Use `decoder` for `topic`.
    pub fn topic(
        mut self,
        topic: impl Into<String>,
        decoder: Arc<dyn NotificationDecoder>,
    ) -> Self {
        self.by_topic.insert(topic.into(), decoder);
        self
    }

    /// Use `decoder` for topics without their own.
    pub fn default_decoder(mut self, decoder: Arc<dyn NotificationDecoder>) -> Self {
        self.default = Some(decoder);
        self
    }

    fn for_topic(&self, topic: &str) -> Option<&Arc<dyn NotificationDecoder>> {
        self.by_topic.get(topic).or(self.default.as_ref())
    }
}

/// Per-partition state.
#[derive(Debug)]
struct PartitionState {
    tp: TopicPartition,
    epoch: u32,
    tracker: OffsetTracker,
    revoking: bool,
    /// Writes and dead letters issued whose notes include this partition.
    writes_in_flight: usize,
    /// Pause state as last handed out.
    paused: bool,
}

/// A dead letter awaiting its acknowledgement.
#[derive(Debug)]
struct DlqEntry {
    notes: Notes,
    held: Vec<(u32, u32)>,
}

/// The acknowledged state of a key: fills the caches that let later notifications skip a fetch.
#[derive(Debug, Clone, Default)]
struct Acked {
    version: Option<Version>,
    validators: Option<Validators>,
}

/// A snapshot of one partition, for status pages.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PartitionStatus {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Last offset received.
    pub last_received: Option<i64>,
    /// The current commit point.
    pub commit_point: Option<i64>,
    /// The last offset committed.
    pub committed: Option<i64>,
    /// Offsets held in memory.
    pub outstanding: usize,
    /// Paused by backpressure.
    pub paused: bool,
}

/// A snapshot of the engine, for status pages and summaries.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EngineStatus {
    /// Counters since start.
    pub counters: Counters,
    /// Partitions owned.
    pub partitions: Vec<PartitionStatus>,
    /// Keys with pending notifications or a flight.
    pub pending_keys: usize,
    /// Age of the oldest pending notification.
    pub oldest_pending_ms: Option<u64>,
    /// Fetches running.
    pub fetches_in_flight: usize,
    /// Dead letters awaiting acknowledgement.
    pub dead_letters_in_flight: usize,
    /// The gone guard is holding deletes back.
    pub gone_guard_tripped: bool,
    /// The share of gone outcomes in the guard's window.
    pub gone_ratio: f64,
    /// The dead-letter topic refused writes permanently.
    pub dead_letter_broken: bool,
    /// Every partition is paused by a global cap.
    pub globally_paused: bool,
    /// Notification-to-durable latency p50, milliseconds.
    pub latency_p50_ms: Option<f64>,
    /// Notification-to-durable latency p99, milliseconds.
    pub latency_p99_ms: Option<f64>,
    /// Business actions collecting or being fetched and written.
    pub open_actions: usize,
}

/// Approximate bytes a key costs besides its id (map entry, state, one note).
const KEY_OVERHEAD: usize = 160;

/// Dead-letter reason of members dead-lettered because another member of their action failed.
const ACTION_REASON: &str = "action";

/// The engine's state machine. See the module docs.
pub struct Engine {
    cfg: EngineConfig,
    decoders: Decoders,
    handles: Box<dyn Fn(&str) -> bool + Send + Sync>,
    sink_tracks_versions: bool,

    slots: Vec<Option<PartitionState>>,
    slot_of: HashMap<TopicPartition, u32>,
    next_epoch: u32,
    last_lookup: Option<(Arc<str>, i32, u32)>,

    keys: HashMap<EntityKey, KeyState>,
    timers: BinaryHeap<Reverse<(Tick, EntityKey)>>,
    write_retries: BinaryHeap<Reverse<(Tick, u64, EntityKey)>>,
    pending_bytes: usize,
    fetches_in_flight: usize,
    next_flight: u64,

    dead_letters: HashMap<u64, DlqEntry>,
    next_dead_letter: u64,
    dead_letter_broken: bool,

    /// Acknowledged versions and validators per key (bounded, least recently used evicted).
    /// A single-threaded LRU: the engine owns it, so a concurrent cache would only add cost.
    acked: lru::LruCache<EntityKey, Acked>,
    health: HashMap<Arc<str>, SourceHealth>,
    gone_guard: GoneGuard,

    refresh_done: Vec<(u64, RefreshOutcome)>,
    /// The latest tick seen (revokes carry no tick of their own).
    last_tick: Tick,
    globally_paused: bool,
    shutting_down: bool,
    jitter_state: u64,

    actions: Vec<Action>,
    counters: Counters,
    latency: LatencyHistogram,
    /// Business actions (notifications with a correlation id).
    acts: Actions,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("keys", &self.keys.len())
            .field("partitions", &self.slot_of.len())
            .field("fetches_in_flight", &self.fetches_in_flight)
            .finish()
    }
}

impl Engine {
    /// A new engine. `handles` says whether a fetcher serves an entity type;
    /// `sink_tracks_versions` whether the sink can report held versions.
    pub fn new(
        cfg: EngineConfig,
        decoders: Decoders,
        handles: Box<dyn Fn(&str) -> bool + Send + Sync>,
        sink_tracks_versions: bool,
    ) -> Self {
        let capacity = usize::try_from(cfg.version_cache_capacity)
            .ok()
            .and_then(std::num::NonZeroUsize::new)
            .unwrap_or(std::num::NonZeroUsize::MIN);
        let acked = lru::LruCache::new(capacity);
        let gone_guard = GoneGuard::new(cfg.gone_guard);
        let acts = Actions::new(cfg.actions);
        Engine {
            cfg,
            decoders,
            handles,
            sink_tracks_versions,
            slots: Vec::new(),
            slot_of: HashMap::new(),
            next_epoch: 0,
            last_lookup: None,
            keys: HashMap::new(),
            timers: BinaryHeap::new(),
            write_retries: BinaryHeap::new(),
            pending_bytes: 0,
            fetches_in_flight: 0,
            next_flight: 1,
            dead_letters: HashMap::new(),
            next_dead_letter: 1,
            dead_letter_broken: false,
            acked,
            health: HashMap::new(),
            gone_guard,
            refresh_done: Vec::new(),
            last_tick: Tick(0),
            globally_paused: false,
            shutting_down: false,
            jitter_state: 0x9E37_79B9_7F4A_7C15,
            actions: Vec::new(),
            counters: Counters::default(),
            latency: LatencyHistogram::default(),
            acts,
        }
    }

    /// The settings.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    // ----- assignment --------------------------------------------------------------------------

    /// Partitions were assigned: each gets a fresh epoch and an empty tracker.
    pub fn assign(&mut self, tps: &[TopicPartition]) {
        for tp in tps {
            if let Some(&slot) = self.slot_of.get(tp) {
                // Assigned again without a revoke in between: treat as a new assignment.
                self.drop_slot(slot);
            }
            self.next_epoch = self.next_epoch.wrapping_add(1);
            let state = PartitionState {
                tp: tp.clone(),
                epoch: self.next_epoch,
                tracker: OffsetTracker::new(),
                revoking: false,
                writes_in_flight: 0,
                paused: false,
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
            self.slot_of.insert(tp.clone(), slot);
            tracing::debug!(partition = %tp, epoch = self.next_epoch, "partition assigned");
        }
        self.last_lookup = None;
    }

    /// Begin a revoke: no new work for these partitions; their pending notifications are dropped
    /// and fetches in flight stop counting them. Writes already issued are awaited (see
    /// [`Engine::revoke_drained`]).
    pub fn revoke_begin(&mut self, tps: &[TopicPartition]) {
        let slots: Vec<u32> = tps
            .iter()
            .filter_map(|tp| self.slot_of.get(tp).copied())
            .collect();
        for &s in &slots {
            if let Some(Some(p)) = self.slots.get_mut(s as usize) {
                p.revoking = true;
            }
        }
        self.forget_notes_of(&slots, false);
    }

    /// Are all writes issued for these partitions acknowledged?
    pub fn revoke_drained(&self, tps: &[TopicPartition]) -> bool {
        tps.iter().all(|tp| {
            self.slot_of
                .get(tp)
                .and_then(|&s| self.slots.get(s as usize))
                .and_then(Option::as_ref)
                .is_none_or(|p| p.writes_in_flight == 0)
        })
    }

    /// Finish a revoke: returns the offsets to commit synchronously and forgets the partitions.
    pub fn revoke_finish(&mut self, tps: &[TopicPartition]) -> Vec<(TopicPartition, i64)> {
        let mut out = Vec::new();
        for tp in tps {
            let Some(slot) = self.slot_of.get(tp).copied() else {
                continue;
            };
            if let Some(Some(p)) = self.slots.get(slot as usize) {
                if let Some(offset) = p.tracker.pending_commit() {
                    out.push((tp.clone(), offset));
                }
            }
            self.drop_slot(slot);
        }
        self.last_lookup = None;
        out
    }

    /// Partitions were lost (session expired, fenced): drop their state with no drain and no
    /// commit.
    pub fn lose(&mut self, tps: &[TopicPartition]) {
        let slots: Vec<u32> = tps
            .iter()
            .filter_map(|tp| self.slot_of.get(tp).copied())
            .collect();
        self.forget_notes_of(&slots, true);
        for s in slots {
            self.drop_slot(s);
        }
        self.last_lookup = None;
    }

    fn drop_slot(&mut self, slot: u32) {
        if let Some(entry) = self.slots.get_mut(slot as usize) {
            if let Some(p) = entry.take() {
                self.slot_of.remove(&p.tp);
            }
        }
    }

    /// Remove notes of `slots` from pending entries and from flights still fetching.
    fn forget_notes_of(&mut self, slots: &[u32], also_writing: bool) {
        if slots.is_empty() {
            return;
        }
        let touched = self.actions_touching(slots);
        for a in self.acts.open.values_mut() {
            for m in &mut a.members {
                if let Some(p) = &mut m.pending {
                    p.notes.retain(|n| !slots.contains(&n.slot));
                }
            }
        }
        let mut emptied = Vec::new();
        for (key, state) in self.keys.iter_mut() {
            if let Some(p) = &mut state.pending {
                p.notes.retain(|n| !slots.contains(&n.slot));
                if p.notes.is_empty() && !state.refresh_requested() {
                    state.pending = None;
                }
            }
            if let Some(f) = &mut state.flight {
                if f.phase != Phase::Writing || also_writing {
                    f.batch.notes.retain(|n| !slots.contains(&n.slot));
                }
            }
            if state.is_idle() {
                emptied.push(key.clone());
            }
        }
        for key in emptied {
            self.remove_key(&key);
        }
        let now = self.last_tick;
        for id in touched {
            self.dissolve_action(id, now);
        }
    }

    fn slot_for(&mut self, topic: &str, partition: i32) -> Option<u32> {
        if let Some((t, p, s)) = &self.last_lookup {
            if **t == *topic && *p == partition {
                return Some(*s);
            }
        }
        let (tp, slot) = self
            .slot_of
            .iter()
            .find(|(tp, _)| &*tp.topic == topic && tp.partition == partition)
            .map(|(tp, s)| (tp.clone(), *s))?;
        self.last_lookup = Some((tp.topic, partition, slot));
        Some(slot)
    }

    // ----- records ---------------------------------------------------------------------------

    /// Take one received record.
    pub fn on_record(&mut self, record: &RecordView<'_>, now: Tick) {
        self.counters.records += 1;
        let Some(slot) = self.slot_for(record.topic, record.partition) else {
            self.counters.unassigned_records += 1;
            tracing::warn!(
                topic = record.topic,
                partition = record.partition,
                offset = record.offset,
                "record for a partition this engine does not own; ignored"
            );
            return;
        };
        let (epoch, revoking, paused) = match self.slots.get(slot as usize).and_then(Option::as_ref)
        {
            Some(p) => (p.epoch, p.revoking, p.paused),
            None => return,
        };
        if revoking {
            self.counters.unassigned_records += 1;
            return;
        }
        if paused || self.globally_paused {
            self.counters.records_while_paused += 1;
        }
        let decoded = match self.decoders.for_topic(record.topic) {
            Some(d) => d.decode(record),
            None => Err(crate::decode::DecodeError::new(format!(
                "no decoder configured for topic {}",
                record.topic
            ))),
        };
        let note = NoteRef {
            slot,
            epoch,
            offset: record.offset,
        };
        let n = match decoded {
            Err(e) => {
                self.counters.decode_errors += 1;
                crate::metrics::decode_error();
                if self.track(slot, record.offset, false) {
                    let dl = self.record_dead_letter(record, reason::DECODE, &e.reason);
                    self.issue_dead_letter(dl, std::iter::once(note).collect());
                }
                return;
            }
            Ok(Decoded::Ignore { reason }) => {
                self.counters.ignored += 1;
                crate::metrics::ignored(reason);
                self.track(slot, record.offset, true);
                return;
            }
            Ok(Decoded::Notification(n)) => n,
        };
        self.counters.notifications += 1;
        if n.key.id().len() > self.cfg.max_id_len {
            if self.track(slot, record.offset, false) {
                let msg = format!(
                    "id of {} bytes exceeds the limit of {} bytes",
                    n.key.id().len(),
                    self.cfg.max_id_len
                );
                let mut dl = self.record_dead_letter(record, reason::ID_TOO_LONG, &msg);
                // The type is known; the over-long id stays in the original payload only.
                dl.headers.push((
                    header::ENTITY_TYPE.to_owned(),
                    n.key.entity_type().to_owned(),
                ));
                self.issue_dead_letter(dl, std::iter::once(note).collect());
            }
            return;
        }
        if !(self.handles)(n.key.entity_type()) {
            match self.cfg.unknown_types {
                UnknownTypePolicy::Ignore => {
                    self.counters.ignored += 1;
                    crate::metrics::ignored("unknown_type");
                    self.track(slot, record.offset, true);
                }
                UnknownTypePolicy::DeadLetter => {
                    if self.track(slot, record.offset, false) {
                        let msg =
                            format!("no fetcher serves entity type {:?}", n.key.entity_type());
                        let mut dl = self.record_dead_letter(record, reason::UNKNOWN_TYPE, &msg);
                        // Decoded fine: name the entity so it can be listed and redriven.
                        dl.headers.push((
                            header::ENTITY_TYPE.to_owned(),
                            n.key.entity_type().to_owned(),
                        ));
                        dl.headers
                            .push((header::ENTITY_ID.to_owned(), n.key.id().to_owned()));
                        self.issue_dead_letter(dl, std::iter::once(note).collect());
                    }
                }
            }
            return;
        }
        if let Some(v) = n.version {
            if let Some(held) = self.acked.get(&n.key).and_then(|a| a.version) {
                if held.held_covers(&v) {
                    self.counters.satisfied_by_version += 1;
                    crate::metrics::satisfied_by_version();
                    self.track(slot, record.offset, true);
                    return;
                }
            }
        }
        if !self.track(slot, record.offset, false) {
            return;
        }
        match n.action {
            None => self.add_note(n.key, n.version, n.fields, note, now),
            Some(tag) => self.add_action_note(&tag, n.key, n.version, n.fields, note, now),
        }
    }

    /// Record an offset in its partition's tracker. Returns `false` for a duplicate delivery
    /// (offset not above the last one), which is already covered.
    fn track(&mut self, slot: u32, offset: i64, satisfied: bool) -> bool {
        let Some(Some(p)) = self.slots.get_mut(slot as usize) else {
            return false;
        };
        let r = if satisfied {
            p.tracker.receive_satisfied(offset)
        } else {
            p.tracker.receive(offset)
        };
        match r {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(partition = %p.tp, error = %e, "duplicate delivery ignored");
                false
            }
        }
    }

    fn add_note(
        &mut self,
        key: EntityKey,
        version: Option<Version>,
        fields: Option<Fields>,
        note: NoteRef,
        now: Tick,
    ) {
        let window = millis(self.cfg.window);
        let max_wait = millis(self.cfg.max_wait);
        let mut schedule = None;
        match self.keys.get_mut(&key) {
            Some(state) => {
                let elsewhere = state
                    .pending
                    .iter()
                    .flat_map(|p| p.notes.first())
                    .chain(state.flight.iter().flat_map(|f| f.batch.notes.first()))
                    .any(|n| {
                        n.slot != note.slot && n.slot != REFRESH_SLOT && note.slot != REFRESH_SLOT
                    });
                if elsewhere {
                    // Invariant 10: per-key order across instances needs one partition per key
                    // (or versions). Count the evidence that it does not hold.
                    self.counters.keys_on_several_partitions += 1;
                    crate::metrics::key_on_several_partitions();
                }
                match &mut state.pending {
                    Some(p) => {
                        p.merge(now, window, max_wait, note, version);
                        self.counters.coalesced += 1;
                        crate::metrics::coalesced();
                    }
                    None => {
                        state.pending = Some(Pending::new(now, window, note, version));
                        schedule = state.due();
                    }
                }
                if let Some(f) = fields {
                    state.set_fields(f);
                }
            }
            None => {
                self.pending_bytes += key.heap_bytes() + KEY_OVERHEAD;
                let mut state = KeyState::with_pending(Pending::new(now, window, note, version));
                if let Some(f) = fields {
                    state.set_fields(f);
                }
                schedule = state.due();
                self.keys.insert(key.clone(), state);
            }
        }
        if let Some(at) = schedule {
            self.timers.push(Reverse((at, key)));
        }
    }

    fn remove_key(&mut self, key: &EntityKey) {
        if self.keys.remove(key).is_some() {
            self.pending_bytes = self
                .pending_bytes
                .saturating_sub(key.heap_bytes() + KEY_OVERHEAD);
        }
    }

    /// Ask for an on-demand refresh of `key` (not tied to a Kafka offset). The outcome is
    /// reported through [`Engine::take_refresh_outcomes`] with `waiter`.
    pub fn refresh(&mut self, key: EntityKey, waiter: u64, now: Tick) {
        let note = NoteRef {
            slot: REFRESH_SLOT,
            epoch: 0,
            offset: waiter as i64,
        };
        if !(self.handles)(key.entity_type()) {
            self.refresh_done.push((
                waiter,
                RefreshOutcome::Failed(format!(
                    "no fetcher serves entity type {:?}",
                    key.entity_type()
                )),
            ));
            return;
        }
        self.add_note(key.clone(), None, None, note, now);
        if let Some(state) = self.keys.get_mut(&key) {
            state.set_refresh_requested(true);
            if let Some(p) = &mut state.pending {
                p.deadline = p.deadline.min(now);
            }
            if let Some(at) = state.due() {
                self.timers.push(Reverse((at, key)));
            }
        }
    }

    /// Refreshes that finished since the last call.
    pub fn take_refresh_outcomes(&mut self) -> Vec<(u64, RefreshOutcome)> {
        std::mem::take(&mut self.refresh_done)
    }

    // ----- scheduling ------------------------------------------------------------------------

    /// Start flights for keys whose time has come (up to the fetch concurrency) and re-issue
    /// writes whose backoff passed. Produces actions.
    pub fn poll(&mut self, now: Tick) {
        self.last_tick = self.last_tick.max(now);
        if !self.acts.is_empty() || self.acts.next_wakeup().is_some() {
            // (Timers of closed actions are stale entries: `poll_actions` drops them.)
            self.poll_actions(now);
        }
        while let Some(Reverse((at, _, _))) = self.write_retries.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((_, flight_id, key))) = self.write_retries.pop() else {
                break;
            };
            if let Some(f) = self.keys.get(&key).and_then(|s| s.flight.as_ref()) {
                if f.id == flight_id && f.phase == Phase::Writing {
                    if let Some(change) = f.change.clone() {
                        self.actions.push(Action::Write(WriteJob {
                            flight: flight_id,
                            change,
                            group: None,
                        }));
                    }
                }
            }
        }
        while self.fetches_in_flight < self.cfg.fetch_concurrency {
            let Some(Reverse((at, _))) = self.timers.peek() else {
                break;
            };
            if *at > now {
                break;
            }
            let Some(Reverse((_, key))) = self.timers.pop() else {
                break;
            };
            let Some(state) = self.keys.get(&key) else {
                continue;
            };
            let Some(due) = state.due() else {
                continue;
            };
            if due > now {
                self.timers.push(Reverse((due, key)));
                continue;
            }
            self.start_flight(key, now);
        }
    }

    fn start_flight(&mut self, key: EntityKey, now: Tick) {
        let action = if self.acts.is_empty() {
            None
        } else {
            match self.claim_member(&key, now) {
                Claim::Free => None,
                Claim::Action(id) => Some(id),
                // An action holding the key is still collecting: its notes wait for it (they
                // ride along with the action's fetch, or are scheduled if it dissolves).
                Claim::Blocked => return,
            }
        };
        let cached = self.acked.get(&key).cloned();
        let Some(state) = self.keys.get_mut(&key) else {
            return;
        };
        let Some(batch) = state.pending.take() else {
            return;
        };
        state.set_refresh_requested(false);
        let id = self.next_flight;
        self.next_flight += 1;
        let check_sink_first = self.sink_tracks_versions && batch.all_versioned && cached.is_none();
        let request = FetchRequest {
            key: key.clone(),
            fields: state.fields(),
            validators: cached.and_then(|a| a.validators),
            min_version: batch.max_version,
        };
        state.flight = Some(Box::new(Flight {
            id,
            phase: Phase::Fetching,
            batch,
            change: None,
            validators: None,
            write_failures: 0,
            action,
        }));
        self.fetches_in_flight += 1;
        self.counters.fetches += 1;
        tracing::trace!(key = %key, flight = id, "fetch started");
        self.actions.push(Action::Fetch(FetchJob {
            flight: id,
            request,
            check_sink_first,
        }));
    }

    /// Take the actions produced so far.
    pub fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    /// When [`Engine::poll`] next has something to do, if anything is scheduled.
    pub fn next_wakeup(&self) -> Option<Tick> {
        let a = self.timers.peek().map(|Reverse((t, _))| *t);
        let b = self.write_retries.peek().map(|Reverse((t, _, _))| *t);
        let c = self.acts.next_wakeup();
        [a, b, c].into_iter().flatten().min()
    }

    fn jitter(&mut self) -> f64 {
        // xorshift64*: cheap, deterministic per engine, good enough to spread retries.
        let mut x = self.jitter_state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.jitter_state = x;
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }

    // ----- completions -----------------------------------------------------------------------

    fn note_is_live(&self, n: &NoteRef) -> bool {
        n.slot == REFRESH_SLOT
            || self
                .slots
                .get(n.slot as usize)
                .and_then(Option::as_ref)
                .is_some_and(|p| p.epoch == n.epoch && !p.revoking)
    }

    /// A fetch job ended.
    pub fn on_fetch_done(&mut self, key: &EntityKey, flight: u64, result: FetchResult, now: Tick) {
        let live: Vec<bool>;
        {
            let Some(f) = self.keys.get(key).and_then(|s| s.flight.as_ref()) else {
                return;
            };
            if f.id != flight || f.phase != Phase::Fetching {
                return;
            }
            live = f.batch.notes.iter().map(|n| self.note_is_live(n)).collect();
        }
        self.fetches_in_flight = self.fetches_in_flight.saturating_sub(1);
        let Some(state) = self.keys.get_mut(key) else {
            return;
        };
        let Some(f) = state.flight.as_mut() else {
            return;
        };
        let mut i = 0;
        f.batch.notes.retain(|_| {
            let keep = live.get(i).copied().unwrap_or(false);
            i += 1;
            keep
        });
        let action = f.action;
        if f.batch.notes.is_empty() {
            // Every notification belonged to partitions this engine no longer owns.
            self.counters.abandoned += 1;
            state.flight = None;
            if let Some(a) = action {
                self.action_member_ended(key, a, false, now);
            }
            self.after_flight(key, now);
            return;
        }
        if let Some(a) = action {
            if self.acts.open.get(&a).is_some_and(|x| x.failed) {
                let attempts = state_attempts(self.keys.get(key)) + 1;
                self.dead_letter_flight(
                    key,
                    ACTION_REASON,
                    "another member of the business action failed",
                    ErrorClass::Permanent,
                    attempts,
                    now,
                );
                return;
            }
        }
        let min = f.batch.max_version;
        let entity_type = key.entity_type_arc().clone();
        match result {
            FetchResult::AlreadyHeld(v) => {
                self.counters.already_held += 1;
                self.record_health(&entity_type, false);
                self.acked.put(
                    key.clone(),
                    Acked {
                        version: Some(v),
                        validators: None,
                    },
                );
                self.finish_or_park(key, action, now);
            }
            FetchResult::Outcome(FetchOutcome::Unchanged) => {
                self.counters.unchanged += 1;
                crate::metrics::fetch_outcome("unchanged");
                self.record_health(&entity_type, false);
                self.gone_guard.record(false);
                self.finish_or_park(key, action, now);
            }
            FetchResult::Outcome(FetchOutcome::Found(entity)) => {
                self.record_health(&entity_type, false);
                self.gone_guard.record(false);
                if let (Some(min), Some(got)) = (min, entity.version) {
                    if !got.fetched_covers(&min) {
                        self.counters.stale_reads += 1;
                        crate::metrics::fetch_outcome("stale");
                        let err = FetchError::transient(format!(
                            "stale read: fetched version {got} is older than notified {min}"
                        ));
                        self.retry_fetch(key, &err, true, now);
                        return;
                    }
                }
                self.counters.found += 1;
                crate::metrics::fetch_outcome("found");
                let validators = entity.validators.clone();
                let change = Change::Upsert {
                    key: key.clone(),
                    entity,
                };
                match action {
                    Some(a) => self.park(key, a, Some(change), validators, now),
                    None => self.begin_write(key, change, validators),
                }
            }
            FetchResult::Outcome(FetchOutcome::Gone) => {
                self.record_health(&entity_type, false);
                let tripped = self.gone_guard.record(true);
                crate::metrics::gone_guard(tripped, self.gone_guard.ratio());
                if tripped {
                    self.counters.gone_held += 1;
                    tracing::warn!(key = %key, ratio = self.gone_guard.ratio(),
                        "gone guard tripped: delete held back");
                    let err = FetchError::NotAttempted {
                        message: "gone guard tripped: deletes are held".into(),
                        retry_after: Some(self.cfg.fetch_backoff.max),
                    };
                    self.retry_fetch(key, &err, false, now);
                    return;
                }
                self.counters.gone += 1;
                crate::metrics::fetch_outcome("gone");
                let change = Change::Delete { key: key.clone() };
                match action {
                    Some(a) => self.park(key, a, Some(change), None, now),
                    None => self.begin_write(key, change, None),
                }
            }
            FetchResult::Error(e) => match e.class() {
                ErrorClass::Permanent => {
                    self.counters.fetch_permanent += 1;
                    crate::metrics::fetch_outcome("permanent");
                    self.record_health(&entity_type, false);
                    let attempts = state_attempts(self.keys.get(key)) + 1;
                    self.dead_letter_flight(
                        key,
                        reason::FETCH,
                        e.message(),
                        ErrorClass::Permanent,
                        attempts,
                        now,
                    );
                }
                ErrorClass::Transient { .. } => {
                    self.counters.fetch_transient += 1;
                    crate::metrics::fetch_outcome(if e.counts_against_budget() {
                        "transient"
                    } else {
                        "not_attempted"
                    });
                    let reached = e.counts_against_budget();
                    if reached {
                        self.record_health(&entity_type, true);
                    }
                    self.retry_fetch(key, &e, reached, now);
                }
            },
        }
    }

    fn record_health(&mut self, entity_type: &Arc<str>, failed: bool) {
        let window = self.cfg.health_window;
        let ratio = self.cfg.unhealthy_ratio;
        self.health
            .entry(entity_type.clone())
            .or_insert_with(|| SourceHealth::new(window, ratio))
            .record(failed);
    }

    /// A transient failure: back off, keep the notes pending, spend budget only when the attempt
    /// reached a source that is healthy for other keys.
    fn retry_fetch(&mut self, key: &EntityKey, err: &FetchError, reached: bool, now: Tick) {
        let failing = self
            .health
            .get(key.entity_type())
            .is_none_or(SourceHealth::is_failing);
        let counts = reached && !failing;
        let budget = self.cfg.retry_budget;
        let (attempts, counted) = {
            let Some(state) = self.keys.get_mut(key) else {
                return;
            };
            let r = state.retry_or_insert(RetryState {
                counted: 0,
                attempts: 0,
                next_at: now,
            });
            r.attempts += 1;
            if counts {
                r.counted += 1;
            }
            (r.attempts, r.counted)
        };
        if counted >= budget {
            tracing::warn!(key = %key, attempts, error = %err, "retry budget spent: dead-lettering");
            self.dead_letter_flight(
                key,
                reason::FETCH,
                err.message(),
                err.class(),
                attempts,
                now,
            );
            return;
        }
        let jitter = self.jitter();
        let delay = self
            .cfg
            .fetch_backoff
            .delay(attempts, err.class().retry_after(), jitter);
        tracing::debug!(key = %key, attempts, counted, delay_ms = delay.as_millis() as u64,
            error = %err, "fetch failed; retrying");
        let Some(state) = self.keys.get_mut(key) else {
            return;
        };
        state
            .retry_or_insert(RetryState {
                counted: 0,
                attempts: 0,
                next_at: now,
            })
            .next_at = now.after(delay);
        if let Some(f) = state.flight.take() {
            let batch = f.batch;
            match &mut state.pending {
                Some(p) => p.absorb(batch),
                None => state.pending = Some(batch),
            }
        }
        if let Some(at) = state.due() {
            self.timers.push(Reverse((at, key.clone())));
        }
    }

    fn begin_write(&mut self, key: &EntityKey, change: Change, validators: Option<Validators>) {
        self.hold_slots_of_flight(key);
        let Some(f) = self.keys.get_mut(key).and_then(|s| s.flight.as_mut()) else {
            return;
        };
        f.phase = Phase::Writing;
        f.change = Some(change.clone());
        f.validators = validators;
        self.actions.push(Action::Write(WriteJob {
            flight: f.id,
            change,
            group: None,
        }));
    }

    /// Count a write in flight for each partition the flight's notes belong to.
    fn hold_slots_of_flight(&mut self, key: &EntityKey) -> Vec<(u32, u32)> {
        let notes: Notes = match self.keys.get(key).and_then(|s| s.flight.as_ref()) {
            Some(f) => f.batch.notes.clone(),
            None => return Vec::new(),
        };
        self.hold_slots(&notes)
    }

    fn hold_slots(&mut self, notes: &Notes) -> Vec<(u32, u32)> {
        let mut held: Vec<(u32, u32)> = Vec::new();
        for n in notes {
            if n.slot == REFRESH_SLOT || held.contains(&(n.slot, n.epoch)) {
                continue;
            }
            if let Some(Some(p)) = self.slots.get_mut(n.slot as usize) {
                if p.epoch == n.epoch {
                    p.writes_in_flight += 1;
                    held.push((n.slot, n.epoch));
                }
            }
        }
        held
    }

    fn release_slots(&mut self, held: &[(u32, u32)]) {
        for (slot, epoch) in held {
            if let Some(Some(p)) = self.slots.get_mut(*slot as usize) {
                if p.epoch == *epoch {
                    p.writes_in_flight = p.writes_in_flight.saturating_sub(1);
                }
            }
        }
    }

    fn held_of(&self, notes: &Notes) -> Vec<(u32, u32)> {
        let mut held: Vec<(u32, u32)> = Vec::new();
        for n in notes {
            if n.slot != REFRESH_SLOT && !held.contains(&(n.slot, n.epoch)) {
                held.push((n.slot, n.epoch));
            }
        }
        held
    }

    /// A write of one change ended.
    pub fn on_write_done(&mut self, key: &EntityKey, flight: u64, result: WriteResult, now: Tick) {
        let Some(f) = self.keys.get(key).and_then(|s| s.flight.as_ref()) else {
            return;
        };
        if f.id != flight || f.phase != Phase::Writing {
            return;
        }
        match result {
            WriteResult::Durable => {
                let held = self.held_of(&f.batch.notes);
                let (version, validators) = match (&f.change, &f.validators) {
                    (Some(Change::Upsert { entity, .. }), v) => (entity.version, v.clone()),
                    _ => (None, None),
                };
                let deleted = matches!(f.change, Some(Change::Delete { .. }));
                self.release_slots(&held);
                self.counters.writes += 1;
                crate::metrics::write_durable();
                if deleted {
                    self.acked.pop(key);
                } else if version.is_some() || validators.is_some() {
                    self.acked.put(
                        key.clone(),
                        Acked {
                            version,
                            validators,
                        },
                    );
                } else {
                    self.acked.pop(key);
                }
                self.finish_success(key, now);
            }
            WriteResult::Failed(e) => {
                self.counters.write_failures += 1;
                crate::metrics::write_failed(e.class().label());
                let failures = f.write_failures + 1;
                let held = self.held_of(&f.batch.notes);
                let permanent = !e.class().is_transient();
                if permanent || failures >= self.cfg.sink_record_budget {
                    self.release_slots(&held);
                    self.dead_letter_flight(
                        key,
                        reason::SINK,
                        e.message(),
                        e.class(),
                        failures,
                        now,
                    );
                    return;
                }
                let jitter = self.jitter();
                let delay = self
                    .cfg
                    .sink_backoff
                    .delay(failures, e.class().retry_after(), jitter);
                if let Some(f) = self.keys.get_mut(key).and_then(|s| s.flight.as_mut()) {
                    f.write_failures = failures;
                    self.write_retries
                        .push(Reverse((now.after(delay), flight, key.clone())));
                }
            }
        }
    }

    /// The flight's notes are satisfied: release their offsets and end the flight.
    fn finish_success(&mut self, key: &EntityKey, now: Tick) {
        let Some(state) = self.keys.get_mut(key) else {
            return;
        };
        let Some(f) = state.flight.take() else {
            return;
        };
        let action = f.action;
        state.clear_retry();
        self.latency.record(now.since(f.batch.first_at));
        crate::metrics::latency(now.since(f.batch.first_at));
        for n in &f.batch.notes {
            self.satisfy(n, RefreshOutcome::Done);
        }
        // Rule (b): a follow-up whose every notification is covered by the acknowledged version
        // needs no fetch.
        let held = self.acked.get(key).and_then(|a| a.version);
        if let (Some(held), Some(state)) = (held, self.keys.get_mut(key)) {
            let covered = state.pending.as_ref().is_some_and(|p| {
                p.all_versioned && p.max_version.is_some_and(|v| held.held_covers(&v))
            });
            if covered {
                if let Some(p) = state.pending.take() {
                    self.counters.satisfied_by_version += p.notes.len() as u64;
                    for n in &p.notes {
                        self.satisfy(n, RefreshOutcome::Done);
                    }
                }
            }
        }
        if let Some(a) = action {
            self.action_member_ended(key, a, false, now);
        }
        self.after_flight(key, now);
    }

    /// After a flight ended: schedule the follow-up, or forget the key.
    fn after_flight(&mut self, key: &EntityKey, now: Tick) {
        if !self.acts.is_empty() && self.head_wants_start(key) {
            // The key's next action waited for this flight.
            if let Some(state) = self.keys.get(key) {
                if state.is_idle() {
                    self.remove_key(key);
                }
            }
            self.try_start_member(key.clone(), now);
            return;
        }
        let Some(state) = self.keys.get(key) else {
            return;
        };
        if state.is_idle() {
            self.remove_key(key);
        } else if let Some(at) = state.due() {
            self.timers.push(Reverse((at, key.clone())));
        }
    }

    fn satisfy(&mut self, n: &NoteRef, outcome: RefreshOutcome) {
        if n.slot == REFRESH_SLOT {
            self.refresh_done.push((n.offset as u64, outcome));
            return;
        }
        if let Some(Some(p)) = self.slots.get_mut(n.slot as usize) {
            if p.epoch == n.epoch {
                p.tracker.satisfy(n.offset);
            }
        }
    }

    fn dead_letter_flight(
        &mut self,
        key: &EntityKey,
        why: &'static str,
        message: &str,
        class: ErrorClass,
        attempts: u32,
        now: Tick,
    ) {
        self.acked.pop(key);
        let Some(state) = self.keys.get_mut(key) else {
            return;
        };
        state.clear_retry();
        let Some(f) = state.flight.take() else {
            return;
        };
        let action = f.action;
        let mut notes = Notes::new();
        for n in f.batch.notes {
            if n.slot == REFRESH_SLOT {
                self.refresh_done
                    .push((n.offset as u64, RefreshOutcome::Failed(message.to_owned())));
            } else {
                notes.push(n);
            }
        }
        if !notes.is_empty() {
            let age = now.since(f.batch.first_at);
            let mut record = self.key_dead_letter(
                key,
                f.batch.max_version,
                &notes,
                why,
                message,
                class,
                attempts,
                age,
            );
            if let Some(corr) = action.and_then(|a| self.acts.open.get(&a)) {
                record
                    .headers
                    .push((CORRELATION_HEADER.to_owned(), corr.correlation.to_string()));
            }
            self.issue_dead_letter(record, notes);
        }
        if let Some(a) = action {
            self.action_member_ended(key, a, true, now);
        }
        self.after_flight(key, now);
    }

    #[allow(clippy::too_many_arguments)]
    fn key_dead_letter(
        &self,
        key: &EntityKey,
        version: Option<Version>,
        notes: &Notes,
        why: &str,
        message: &str,
        class: ErrorClass,
        attempts: u32,
        age: Duration,
    ) -> DeadLetter {
        let coords: Vec<serde_json::Value> = notes
            .iter()
            .filter_map(|n| {
                let p = self.slots.get(n.slot as usize)?.as_ref()?;
                Some(serde_json::json!({
                    "topic": &*p.tp.topic, "partition": p.tp.partition, "offset": n.offset
                }))
            })
            .collect();
        let payload = serde_json::json!({
            "entity_type": key.entity_type(),
            "entity_id": key.id(),
            "version": version.map(|v| v.to_string()),
            "notifications": coords,
        });
        let mut headers = vec![
            (header::ERROR.to_owned(), message.to_owned()),
            (header::ERROR_CLASS.to_owned(), class.label().to_owned()),
            (header::REASON.to_owned(), why.to_owned()),
            (header::ATTEMPTS.to_owned(), attempts.to_string()),
            (
                header::FIRST_SEEN.to_owned(),
                dlq::rfc3339(dlq::seen_ago(age)),
            ),
            (header::ENTITY_TYPE.to_owned(), key.entity_type().to_owned()),
            (header::ENTITY_ID.to_owned(), key.id().to_owned()),
        ];
        if let Some(oldest) = notes.first() {
            if let Some(Some(p)) = self.slots.get(oldest.slot as usize) {
                headers.push((header::SOURCE_TOPIC.to_owned(), p.tp.topic.to_string()));
                headers.push((
                    header::SOURCE_PARTITION.to_owned(),
                    p.tp.partition.to_string(),
                ));
                headers.push((header::SOURCE_OFFSET.to_owned(), oldest.offset.to_string()));
            }
        }
        DeadLetter {
            key: Some(key.to_string().into_bytes()),
            payload: Some(payload.to_string().into_bytes()),
            headers,
        }
    }

    fn record_dead_letter(&self, record: &RecordView<'_>, why: &str, message: &str) -> DeadLetter {
        DeadLetter {
            key: record.key.map(<[u8]>::to_vec),
            payload: record.payload.map(<[u8]>::to_vec),
            headers: vec![
                (header::ERROR.to_owned(), message.to_owned()),
                (header::ERROR_CLASS.to_owned(), "permanent".to_owned()),
                (header::REASON.to_owned(), why.to_owned()),
                (header::SOURCE_TOPIC.to_owned(), record.topic.to_owned()),
                (
                    header::SOURCE_PARTITION.to_owned(),
                    record.partition.to_string(),
                ),
                (header::SOURCE_OFFSET.to_owned(), record.offset.to_string()),
                (header::ATTEMPTS.to_owned(), "0".to_owned()),
                (
                    header::FIRST_SEEN.to_owned(),
                    dlq::rfc3339(std::time::SystemTime::now()),
                ),
            ],
        }
    }

    fn issue_dead_letter(&mut self, record: DeadLetter, notes: Notes) {
        let id = self.next_dead_letter;
        self.next_dead_letter += 1;
        let held = self.hold_slots(&notes);
        self.dead_letters.insert(id, DlqEntry { notes, held });
        self.counters.dead_letters += 1;
        crate::metrics::dead_letter(record.header(header::REASON).unwrap_or("unknown"));
        tracing::warn!(
            reason = record.header(header::REASON).unwrap_or(""),
            error = record.header(header::ERROR).unwrap_or(""),
            entity = record.header(header::ENTITY_ID).unwrap_or(""),
            "dead-lettering"
        );
        self.actions
            .push(Action::DeadLetter(DeadLetterJob { id, record }));
    }

    /// A dead letter was acknowledged by the broker (`Ok`), or failed for good (`Err`: the topic
    /// is missing or not writable; consumption pauses and readiness fails). Transient failures
    /// are retried by the producer side and are not reported here.
    pub fn on_dead_letter_done(&mut self, id: u64, result: Result<(), String>) {
        match result {
            Ok(()) => {
                if let Some(e) = self.dead_letters.remove(&id) {
                    self.release_slots(&e.held);
                    self.counters.dead_letters_acked += 1;
                    for n in &e.notes {
                        self.satisfy(n, RefreshOutcome::Done);
                    }
                }
                if self.dead_letter_broken && self.dead_letters.is_empty() {
                    self.dead_letter_broken = false;
                }
            }
            Err(message) => {
                if !self.dead_letter_broken {
                    tracing::error!(error = %message, "dead-letter topic refuses writes: pausing consumption");
                }
                self.dead_letter_broken = true;
            }
        }
    }

    /// Dead letters issued and not yet acknowledged.
    pub fn dead_letter_pending(&self) -> usize {
        self.dead_letters.len()
    }

    // ----- commits ---------------------------------------------------------------------------

    /// Offsets worth committing now: `(partition, epoch, offset)` for owned partitions whose
    /// commit point moved since the last successful commit.
    pub fn commits(&self) -> Vec<(TopicPartition, u32, i64)> {
        self.slots
            .iter()
            .flatten()
            .filter(|p| !p.revoking)
            .filter_map(|p| Some((p.tp.clone(), p.epoch, p.tracker.pending_commit()?)))
            .collect()
    }

    /// A commit succeeded. Ignored if the partition changed hands since.
    pub fn committed(&mut self, tp: &TopicPartition, epoch: u32, offset: i64) {
        if let Some(&slot) = self.slot_of.get(tp) {
            if let Some(Some(p)) = self.slots.get_mut(slot as usize) {
                if p.epoch == epoch {
                    p.tracker.committed(offset);
                    self.counters.commits += 1;
                    crate::metrics::committed(tp, offset);
                }
            }
        }
    }

    /// A commit failed; nothing local changes, it is retried at the next interval.
    pub fn commit_failed(&mut self) {
        self.counters.commit_failures += 1;
    }

    // ----- backpressure ----------------------------------------------------------------------

    /// Pause decisions since the last call: a partition pauses when its outstanding offsets reach
    /// the cap; all pause when pending keys or bytes reach theirs or the dead-letter topic is
    /// broken. Resumes happen below the low-water mark.
    pub fn pause_changes(&mut self) -> PauseChanges {
        let keys = self.keys.len();
        let bytes = self.pending_bytes;
        let low = self.cfg.resume_ratio;
        if self.globally_paused {
            let below = (keys as f64) < self.cfg.max_pending_keys as f64 * low
                && (bytes as f64) < self.cfg.max_pending_bytes as f64 * low;
            if below && !self.dead_letter_broken {
                self.globally_paused = false;
            }
        } else if keys >= self.cfg.max_pending_keys
            || bytes >= self.cfg.max_pending_bytes
            || self.dead_letter_broken
        {
            self.globally_paused = true;
        }
        let cap = self.cfg.max_outstanding_per_partition;
        let mut out = PauseChanges::default();
        for p in self.slots.iter_mut().flatten() {
            let n = p.tracker.outstanding();
            let own = if p.paused {
                (n as f64) >= cap as f64 * low
            } else {
                n >= cap
            };
            let want = self.globally_paused || own;
            if want != p.paused {
                p.paused = want;
                if want {
                    out.pause.push(p.tp.clone());
                } else {
                    out.resume.push(p.tp.clone());
                }
            }
        }
        out
    }

    /// Partitions currently paused (to re-apply after an assignment).
    pub fn paused(&self) -> Vec<TopicPartition> {
        self.slots
            .iter()
            .flatten()
            .filter(|p| p.paused)
            .map(|p| p.tp.clone())
            .collect()
    }

    // ----- shutdown --------------------------------------------------------------------------

    /// Stop waiting out debounce windows: every pending key becomes due now (keys in backoff
    /// keep their backoff).
    pub fn flush(&mut self, now: Tick) {
        self.shutting_down = true;
        let collecting: Vec<u64> = self.acts.collecting.values().copied().collect();
        for id in collecting {
            self.complete_action(id, Completed::ByTimeout, now);
        }
        let mut due = Vec::new();
        for (key, state) in self.keys.iter_mut() {
            if let Some(p) = &mut state.pending {
                p.deadline = p.deadline.min(now);
            }
            if let Some(at) = state.due() {
                due.push((at, key.clone()));
            }
        }
        for (at, key) in due {
            self.timers.push(Reverse((at, key)));
        }
    }

    /// Is there work in flight (fetches, writes, dead letters)?
    pub fn has_work_in_flight(&self) -> bool {
        self.fetches_in_flight > 0
            || !self.dead_letters.is_empty()
            || self.keys.values().any(|s| s.flight.is_some())
    }

    /// Is there nothing pending and nothing in flight?
    pub fn is_idle(&self) -> bool {
        self.keys.is_empty() && self.dead_letters.is_empty() && self.acts.is_empty()
    }

    /// Business actions collecting or being fetched and written.
    pub fn open_actions(&self) -> usize {
        self.acts.open.len()
    }

    /// Does the engine hold anything for `key`: pending notifications, a flight, or a
    /// membership in an open business action?
    pub fn holds_key(&self, key: &EntityKey) -> bool {
        self.keys.contains_key(key)
            || self
                .acts
                .open
                .values()
                .any(|a| a.members.iter().any(|m| &m.key == key))
    }

    // ----- introspection ---------------------------------------------------------------------

    /// Counters since start.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Reset the gone guard (an operator decided the gone outcomes are real).
    pub fn reset_gone_guard(&mut self) {
        self.gone_guard.reset();
    }

    /// Is the gone guard holding deletes back?
    pub fn gone_guard_tripped(&self) -> bool {
        self.gone_guard.is_tripped()
    }

    /// Has the dead-letter topic refused writes for good?
    pub fn dead_letter_broken(&self) -> bool {
        self.dead_letter_broken
    }

    /// Keys with pending notifications or a flight.
    pub fn pending_keys(&self) -> usize {
        self.keys.len()
    }

    /// Approximate bytes held for pending keys.
    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes
    }

    /// Partitions owned.
    pub fn owned_partitions(&self) -> Vec<TopicPartition> {
        self.slots.iter().flatten().map(|p| p.tp.clone()).collect()
    }

    /// A status snapshot.
    pub fn status(&self, now: Tick) -> EngineStatus {
        let oldest = self
            .keys
            .values()
            .filter_map(|s| {
                let p = s.pending.as_ref().map(|p| p.first_at);
                let f = s.flight.as_ref().map(|f| f.batch.first_at);
                match (p, f) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            })
            .min();
        let mut partitions: Vec<PartitionStatus> = self
            .slots
            .iter()
            .flatten()
            .map(|p| PartitionStatus {
                topic: p.tp.topic.to_string(),
                partition: p.tp.partition,
                last_received: p.tracker.last_received(),
                commit_point: p.tracker.commit_point(),
                committed: p.tracker.last_committed(),
                outstanding: p.tracker.outstanding(),
                paused: p.paused,
            })
            .collect();
        partitions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        EngineStatus {
            counters: self.counters.clone(),
            partitions,
            pending_keys: self.keys.len(),
            oldest_pending_ms: oldest.map(|t| now.since(t).as_millis() as u64),
            fetches_in_flight: self.fetches_in_flight,
            dead_letters_in_flight: self.dead_letters.len(),
            gone_guard_tripped: self.gone_guard.is_tripped(),
            gone_ratio: self.gone_guard.ratio(),
            dead_letter_broken: self.dead_letter_broken,
            globally_paused: self.globally_paused,
            latency_p50_ms: self.latency.quantile(0.5).map(|d| d.as_secs_f64() * 1000.0),
            latency_p99_ms: self
                .latency
                .quantile(0.99)
                .map(|d| d.as_secs_f64() * 1000.0),
            open_actions: self.acts.open.len(),
        }
    }
}

// ----- business actions ------------------------------------------------------------------------

/// Whether a key's next flight serves an action.
enum Claim {
    /// The key's next flight is an ordinary one.
    Free,
    /// The flight serves this running action.
    Action(u64),
    /// An action holding the key is still collecting: no ordinary flight now (the action's
    /// completion starts the key).
    Blocked,
}

impl Engine {
    /// A notification that belongs to a business action.
    fn add_action_note(
        &mut self,
        tag: &ActionTag,
        key: EntityKey,
        version: Option<Version>,
        fields: Option<Fields>,
        note: NoteRef,
        now: Tick,
    ) {
        if self.acts.is_closed(&tag.id) {
            // Its action was already completed: a normal notification.
            self.counters.action_late_members += 1;
            crate::metrics::action_late_member();
            self.add_note(key, version, fields, note, now);
            return;
        }
        let before = self.acts.open.len();
        let (id, full) = self.acts.add(tag, key, version, fields, note, now);
        if self.acts.open.len() != before {
            crate::metrics::actions_open(self.acts.open.len());
        }
        if full {
            self.complete_action(id, Completed::ByCount, now);
        }
    }

    /// Complete collection timers, and start member flights that waited for fetch concurrency.
    fn poll_actions(&mut self, now: Tick) {
        for id in self.acts.due(now) {
            self.complete_action(id, Completed::ByTimeout, now);
        }
        while self.fetches_in_flight < self.cfg.fetch_concurrency {
            let Some(key) = self.acts.ready.pop_front() else {
                break;
            };
            if self.keys.get(&key).is_some_and(|s| s.flight.is_some()) {
                continue;
            }
            self.start_flight(key, now);
        }
    }

    /// Collection of an action ended: queue its members for their flights, or, when it is short
    /// of its announced size, let its members fall back to normal writes.
    fn complete_action(&mut self, id: u64, by: Completed, now: Tick) {
        let Some(a) = self.acts.open.get_mut(&id) else {
            return;
        };
        if a.running {
            return;
        }
        let corr = a.correlation.clone();
        let size = a.members.len();
        let took = now.since(a.first_at);
        let short = a.expected.is_some_and(|n| size < n as usize);
        let keys: Vec<EntityKey> = a.members.iter().map(|m| m.key.clone()).collect();
        self.acts.stop_collecting(id);
        if !short {
            if let Some(a) = self.acts.open.get_mut(&id) {
                a.running = true;
            }
        }
        if self.acts.collecting.get(&corr) == Some(&id) {
            self.acts.collecting.remove(&corr);
        }
        self.acts.remember_closed(corr.clone());
        match by {
            Completed::ByCount => self.counters.actions_completed_by_count += 1,
            Completed::ByTimeout => self.counters.actions_completed_by_timeout += 1,
        }
        crate::metrics::action_completed(by.label(), size, took);
        tracing::debug!(correlation = %corr, size, by = by.label(), "business action complete");
        if short {
            tracing::info!(correlation = %corr, size, "business action incomplete: members fall back to normal writes");
            self.dissolve_action(id, now);
            return;
        }
        for key in keys {
            let q = self.acts.queues.entry(key.clone()).or_default();
            q.push_back(id);
            if q.len() == 1 {
                self.try_start_member(key, now);
            }
        }
    }

    /// It is `key`'s turn in the action at the head of its queue: start the flight now, or when
    /// the fetch concurrency allows; a flight already running starts it when it ends.
    fn try_start_member(&mut self, key: EntityKey, now: Tick) {
        if self.keys.get(&key).is_some_and(|s| s.flight.is_some()) {
            return;
        }
        if self.fetches_in_flight < self.cfg.fetch_concurrency {
            self.start_flight(key, now);
        } else {
            self.acts.ready.push_back(key);
        }
    }

    /// Before a flight of `key` starts: if the key serves a running action, move the member's
    /// notes into the key's pending entry and return the action.
    fn claim_member(&mut self, key: &EntityKey, now: Tick) -> Claim {
        let free = if self.acts.in_collecting(key) {
            Claim::Blocked
        } else {
            Claim::Free
        };
        let Some(id) = self.acts.head(key) else {
            return free;
        };
        let Some(a) = self.acts.open.get_mut(&id) else {
            return free;
        };
        let Some(m) = a.member_mut(key) else {
            return free;
        };
        let (pending, fields) = match m.state {
            MemberState::Waiting => {
                m.state = MemberState::Started;
                (m.pending.take(), m.fields.take())
            }
            MemberState::Started => return Claim::Action(id),
            MemberState::Fetched | MemberState::Done => return free,
        };
        if let Some(p) = pending {
            self.pending_normal(key.clone(), p, fields, now, false);
        }
        Claim::Action(id)
    }

    /// Does the key's current action still need a flight of this key?
    fn head_wants_start(&self, key: &EntityKey) -> bool {
        self.acts
            .head(key)
            .and_then(|id| self.acts.open.get(&id))
            .filter(|a| a.running)
            .and_then(|a| a.members.iter().find(|m| &m.key == key))
            .is_some_and(|m| matches!(m.state, MemberState::Waiting | MemberState::Started))
    }

    /// `key` left an action's queue: start its next action if that one runs, or schedule its
    /// ordinary pending notes.
    fn after_pop(&mut self, key: EntityKey, now: Tick) {
        if self.head_wants_start(&key) {
            self.try_start_member(key, now);
        } else if let Some(at) = self.keys.get(&key).and_then(KeyState::due) {
            self.timers.push(Reverse((at, key)));
        }
    }

    /// Put notes into `key`'s ordinary pending entry, due now.
    fn pending_normal(
        &mut self,
        key: EntityKey,
        mut p: Pending,
        fields: Option<Fields>,
        now: Tick,
        schedule: bool,
    ) {
        if p.notes.is_empty() {
            return;
        }
        p.deadline = p.deadline.min(now);
        match self.keys.get_mut(&key) {
            Some(state) => {
                match &mut state.pending {
                    Some(existing) => {
                        existing.absorb(p);
                        existing.deadline = existing.deadline.min(now);
                    }
                    None => state.pending = Some(p),
                }
                if let Some(f) = fields {
                    state.set_fields(f);
                }
            }
            None => {
                self.pending_bytes += key.heap_bytes() + KEY_OVERHEAD;
                let mut state = KeyState::with_pending(p);
                if let Some(f) = fields {
                    state.set_fields(f);
                }
                self.keys.insert(key.clone(), state);
            }
        }
        if schedule {
            if let Some(at) = self.keys.get(&key).and_then(KeyState::due) {
                self.timers.push(Reverse((at, key)));
            }
        }
    }

    /// An action member fetched (or unchanged): park its flight until the action's write.
    fn park(
        &mut self,
        key: &EntityKey,
        id: u64,
        change: Option<Change>,
        validators: Option<Validators>,
        now: Tick,
    ) {
        let Some(f) = self.keys.get_mut(key).and_then(|s| s.flight.as_mut()) else {
            return;
        };
        f.phase = Phase::Parked;
        f.change = change;
        f.validators = validators;
        if let Some(m) = self.acts.open.get_mut(&id).and_then(|a| a.member_mut(key)) {
            m.state = MemberState::Fetched;
        }
        self.maybe_issue_group(id, now);
    }

    fn finish_or_park(&mut self, key: &EntityKey, action: Option<u64>, now: Tick) {
        match action {
            Some(a) => self.park(key, a, None, None, now),
            None => self.finish_success(key, now),
        }
    }

    /// The flight of `key` serving action `id`, parked.
    fn parked_flight(&self, key: &EntityKey, id: u64) -> Option<&Flight> {
        self.keys
            .get(key)
            .and_then(|s| s.flight.as_deref())
            .filter(|f| f.action == Some(id) && f.phase == Phase::Parked)
    }

    /// Every member is fetched or finished: issue the action's changes as one group of writes.
    fn maybe_issue_group(&mut self, id: u64, now: Tick) {
        let Some(a) = self.acts.open.get(&id) else {
            return;
        };
        if !a.running || a.write_issued || a.failed || !a.all_fetched() {
            return;
        }
        let fetched: Vec<EntityKey> = a
            .members
            .iter()
            .filter(|m| m.state == MemberState::Fetched)
            .map(|m| m.key.clone())
            .collect();
        let mut writes = Vec::new();
        for key in &fetched {
            if let Some(f) = self.parked_flight(key, id) {
                if let Some(change) = &f.change {
                    writes.push((key.clone(), f.id, change.clone()));
                }
            }
        }
        if let Some(a) = self.acts.open.get_mut(&id) {
            a.write_issued = true;
            a.writes_outstanding = writes.len();
            for (key, _, _) in &writes {
                if let Some(m) = a.member_mut(key) {
                    m.in_write = true;
                }
            }
        }
        if writes.is_empty() {
            self.finish_parked(id, now);
            self.close_if_done(id);
            return;
        }
        self.counters.actions_written += 1;
        let size = writes.len();
        for (key, flight, change) in writes {
            self.hold_slots_of_flight(&key);
            if let Some(f) = self.keys.get_mut(&key).and_then(|s| s.flight.as_mut()) {
                f.phase = Phase::Writing;
            }
            self.actions.push(Action::Write(WriteJob {
                flight,
                change,
                group: Some(WriteGroup { action: id, size }),
            }));
        }
    }

    /// Release members that needed no write (unchanged): their offsets go with the action's.
    fn finish_parked(&mut self, id: u64, now: Tick) {
        let Some(a) = self.acts.open.get(&id) else {
            return;
        };
        let keys: Vec<EntityKey> = a
            .members
            .iter()
            .filter(|m| m.state == MemberState::Fetched && !m.in_write)
            .map(|m| m.key.clone())
            .collect();
        for key in keys {
            if self.parked_flight(&key, id).is_some() {
                self.finish_success(&key, now);
            }
        }
    }

    fn close_if_done(&mut self, id: u64) {
        let done =
            self.acts.open.get(&id).is_some_and(|a| {
                a.running && a.members.iter().all(|m| m.state == MemberState::Done)
            });
        if done {
            self.acts.open.remove(&id);
            crate::metrics::actions_open(self.acts.open.len());
        }
    }

    /// `key`'s flight for action `id` ended (written, unchanged, dead-lettered or abandoned).
    fn action_member_ended(&mut self, key: &EntityKey, id: u64, failed: bool, now: Tick) {
        let policy = self.acts.cfg.on_failure;
        let mut fail_all = false;
        let mut write_done = false;
        let mut write_pending = false;
        if let Some(a) = self.acts.open.get_mut(&id) {
            if let Some(m) = a.member_mut(key) {
                m.state = MemberState::Done;
                m.failed |= failed;
                if m.in_write {
                    m.in_write = false;
                    a.writes_outstanding = a.writes_outstanding.saturating_sub(1);
                    write_done = a.writes_outstanding == 0;
                }
            }
            if failed
                && !a.failed
                && !a.write_issued
                && policy == ActionFailurePolicy::DeadLetterAll
            {
                a.failed = true;
                fail_all = true;
            }
            write_pending = !a.write_issued;
        }
        self.acts.pop(key, id);
        if fail_all {
            self.counters.actions_dead_lettered += 1;
            self.fail_action(id, now);
        } else if write_done {
            self.finish_parked(id, now);
        } else if write_pending {
            self.maybe_issue_group(id, now);
        }
        self.close_if_done(id);
        self.after_pop(key.clone(), now);
    }

    /// The failure policy dead-letters the whole action: every member not yet finished.
    fn fail_action(&mut self, id: u64, now: Tick) {
        let Some(a) = self.acts.open.get_mut(&id) else {
            return;
        };
        let corr = a.correlation.clone();
        let mut waiting = Vec::new();
        let mut others = Vec::new();
        for m in &mut a.members {
            match m.state {
                MemberState::Waiting => {
                    m.state = MemberState::Done;
                    m.failed = true;
                    waiting.push((m.key.clone(), m.pending.take()));
                }
                MemberState::Started | MemberState::Fetched => others.push(m.key.clone()),
                MemberState::Done => {}
            }
        }
        let message = format!("another member of business action {corr} failed");
        for (key, pending) in waiting {
            self.acts.pop(&key, id);
            if let Some(p) = pending.filter(|p| !p.notes.is_empty()) {
                let mut record = self.key_dead_letter(
                    &key,
                    p.max_version,
                    &p.notes,
                    ACTION_REASON,
                    &message,
                    ErrorClass::Permanent,
                    0,
                    now.since(p.first_at),
                );
                record
                    .headers
                    .push((CORRELATION_HEADER.to_owned(), corr.to_string()));
                self.issue_dead_letter(record, p.notes);
            }
            self.after_pop(key, now);
        }
        for key in others {
            let flight = self
                .keys
                .get(&key)
                .and_then(|s| s.flight.as_deref())
                .filter(|f| f.action == Some(id))
                .map(|f| f.phase);
            match flight {
                // Its fetch is running: it is dead-lettered when the fetch ends.
                Some(Phase::Fetching) | Some(Phase::Writing) => {}
                Some(Phase::Parked) => {
                    self.dead_letter_flight(
                        &key,
                        ACTION_REASON,
                        &message,
                        ErrorClass::Permanent,
                        0,
                        now,
                    );
                }
                None => {
                    // Between attempts (backoff): its notes wait in the key's pending entry.
                    let pending = self.keys.get_mut(&key).and_then(|s| {
                        s.clear_retry();
                        s.pending.take()
                    });
                    if let Some(p) = pending.filter(|p| !p.notes.is_empty()) {
                        let mut notes = Notes::new();
                        for n in p.notes.iter() {
                            if n.slot == REFRESH_SLOT {
                                self.refresh_done.push((
                                    n.offset as u64,
                                    RefreshOutcome::Failed(message.clone()),
                                ));
                            } else {
                                notes.push(*n);
                            }
                        }
                        if !notes.is_empty() {
                            let mut record = self.key_dead_letter(
                                &key,
                                p.max_version,
                                &notes,
                                ACTION_REASON,
                                &message,
                                ErrorClass::Permanent,
                                0,
                                now.since(p.first_at),
                            );
                            record
                                .headers
                                .push((CORRELATION_HEADER.to_owned(), corr.to_string()));
                            self.issue_dead_letter(record, notes);
                        }
                    }
                    self.action_member_ended(&key, id, true, now);
                    self.after_flight(&key, now);
                }
            }
        }
        self.close_if_done(id);
    }

    /// Partitions are going away: actions with notes on them that were not yet written.
    fn actions_touching(&self, slots: &[u32]) -> Vec<u64> {
        if self.acts.is_empty() {
            return Vec::new();
        }
        let on = |notes: &Notes| notes.iter().any(|n| slots.contains(&n.slot));
        self.acts
            .open
            .iter()
            .filter(|(_, a)| !a.write_issued)
            .filter(|(id, a)| {
                a.members.iter().any(|m| {
                    m.pending.as_ref().is_some_and(|p| on(&p.notes))
                        || self.keys.get(&m.key).is_some_and(|s| {
                            s.flight
                                .as_ref()
                                .is_some_and(|f| f.action == Some(**id) && on(&f.batch.notes))
                                || (m.state == MemberState::Started
                                    && s.pending.as_ref().is_some_and(|p| on(&p.notes)))
                        })
                })
            })
            .map(|(id, _)| *id)
            .collect()
    }

    /// An action was split (by a revoke, or it timed out short of its announced size): its
    /// members fall back to normal writes and it counts as incomplete.
    fn dissolve_action(&mut self, id: u64, now: Tick) {
        self.acts.stop_collecting(id);
        let Some(a) = self.acts.open.remove(&id) else {
            return;
        };
        if self.acts.collecting.get(&a.correlation) == Some(&id) {
            self.acts.collecting.remove(&a.correlation);
        }
        self.acts.remember_closed(a.correlation.clone());
        self.counters.actions_incomplete += 1;
        crate::metrics::action_incomplete();
        crate::metrics::actions_open(self.acts.open.len());
        for m in a.members {
            self.acts.pop(&m.key, id);
            match m.state {
                MemberState::Waiting => {
                    if let Some(p) = m.pending {
                        self.pending_normal(m.key.clone(), p, m.fields, now, true);
                    }
                }
                MemberState::Started | MemberState::Fetched => {
                    let parked = match self.keys.get_mut(&m.key).and_then(|s| s.flight.as_mut()) {
                        Some(f) if f.action == Some(id) => {
                            f.action = None;
                            (f.phase == Phase::Parked).then(|| {
                                (
                                    f.batch.notes.is_empty(),
                                    f.change.clone(),
                                    f.validators.take(),
                                )
                            })
                        }
                        _ => None,
                    };
                    match parked {
                        Some((true, _, _)) => {
                            self.counters.abandoned += 1;
                            if let Some(s) = self.keys.get_mut(&m.key) {
                                s.flight = None;
                            }
                            self.after_flight(&m.key, now);
                        }
                        Some((false, Some(change), validators)) => {
                            self.begin_write(&m.key, change, validators);
                        }
                        Some((false, None, _)) => self.finish_success(&m.key, now),
                        None => {}
                    }
                }
                MemberState::Done => {}
            }
            self.after_pop(m.key, now);
        }
    }
}

fn state_attempts(state: Option<&KeyState>) -> u32 {
    state.and_then(KeyState::retry).map_or(0, |r| r.attempts)
}
