//! The engine's state machine, free of I/O.
//!
//! [`Engine`] decides what to do next; it performs no I/O and reads no clock. Callers feed it
//! records, completions and the current [`Tick`], and take the [`Action`]s it produces (fetch
//! this, write that, dead-letter this). The async runtime in [`crate::pipeline`] drives it against
//! Kafka, a `Fetcher` and a `Sink`; tests drive it directly, which is how the property tests check
//! the invariants of the design notes.
//!
//! The engine coordinates one module per concern, each with its own tests:
//!
//! | concern | module |
//! |---|---|
//! | the partitions owned, their assignments (partition + epoch), offsets and pause state | [`crate::partitions`] |
//! | what a received record is (decode, screen ids and types) | [`crate::intake`] |
//! | pending notifications per key, single flight and follow-ups | [`crate::coalesce`] |
//! | the key table (a slab with generation-checked handles) and its timers | [`crate::keys`] |
//! | what a fetch or write result means (retry, budget, stale reads, the gone guard) | [`crate::outcome`] |
//! | what the sink acknowledged (versions, validators, tombstones) | [`crate::acked`] |
//! | dead-letter records and those awaiting acknowledgement | [`crate::dlq`] |
//! | business actions (members written together) | [`crate::action`], glued in `engine/actions.rs` |
//!
//! Invariants kept here (numbers from the design notes):
//! 1. the commit point of a partition never passes a received, unsatisfied notification;
//! 2. a notification received while its key is in flight starts a follow-up;
//! 3. at most one flight per key; a key's writes are issued in flight order, and a flight whose
//!    assignments all ended still blocks the key until its write is dropped or lands;
//! 4. a key is fetched at most once per window plus one follow-up per flight;
//! 5. a key in backoff holds only its own partition's commit point; only attempts against a
//!    healthy source spend the retry budget;
//! 6. caps on outstanding offsets, pending keys and bytes (keys, action members, bodies awaiting
//!    the sink, dead letters awaiting acknowledgement, records queued from the consumer) produce
//!    pause decisions; a new assignment starts in the desired pause state;
//! 7. every job carries the [`Fence`] of its assignments, and completions, commits and revokes of
//!    an older assignment never touch the current one.

mod actions;
mod catch_up;
mod txn;

pub use txn::TransactionPlan;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::acked::{Acked, AckedCache};
use crate::action::Actions;
use crate::assignment::{Assignment, Fence};
use crate::clock::Tick;
use crate::coalesce::{Flight, KeyState, NoteRef, Notes, Pending, Phase, RetryState};
use crate::config::EngineConfig;
use crate::consumer::{CommitMetadata, Offsets};
use crate::decode::{Fields, RecordView};
use crate::dlq::{self, Coordinate, DeadLetter, KeyFailure, header, reason};
use crate::error::ErrorClass;
use crate::fetch::{FetchError, FetchOutcome, FetchRequest, Validators};
use crate::intake::{Intake, Screen};
use crate::key::{EntityKey, Version};
use crate::keys::{KeyId, KeyTable};
use crate::outcome::{FetchContext, FetchVerdict, GuardState, Policy, SourceOutage, WriteVerdict};
use crate::partitions::{AssignOutcome, PartRef, PartitionTable};
use crate::sink::{Change, SinkError};
use crate::stats::{Counters, LatencyHistogram};

pub use crate::assignment::TopicPartition;
pub use crate::intake::Decoders;

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
    /// The assignments the fetch serves: when all of them end, the fetch is abandoned.
    pub fence: Fence,
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
    /// The assignments the write serves: when all of them end, the write is dropped (not
    /// retried, and an attempt that has not completed is cancelled).
    pub fence: Fence,
    /// When the fetch of this change started, on the wall clock (for sinks that guard
    /// unversioned entities by fetch time).
    pub fetched_at: SystemTime,
    /// The input offsets the change covers, for sinks that want them
    /// ([`crate::Sink::wants_inputs`]); empty otherwise.
    pub inputs: Vec<crate::dlq::Coordinate>,
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
    /// The assignments whose notifications it satisfies: retries stop when all of them end.
    pub fence: Fence,
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
    /// The job's assignments all ended before it completed; its result was dropped.
    Abandoned,
}

/// How a write of one change ended.
#[derive(Debug, Clone)]
pub enum WriteResult {
    /// Durable.
    Durable,
    /// This record failed (on its own, or with its batch).
    Failed(SinkError),
    /// The job's assignments all ended before the write completed: it was dropped, and whether
    /// an attempt already on its way reached the sink is unknown.
    Abandoned,
}

/// The outcome of an on-demand refresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshOutcome {
    /// A fetch that started after the request was written (or said unchanged).
    Done,
    /// The key could not be refreshed.
    Failed(String),
    /// The source says the entity is gone, but its source's gone guard holds the delete (gone
    /// answers are abnormally frequent); the message says so. An operator reset releases it.
    DeleteHeld(String),
}

impl RefreshOutcome {
    /// Did the refresh reach the sink?
    pub fn is_done(&self) -> bool {
        matches!(self, RefreshOutcome::Done)
    }
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

/// A snapshot of one partition, for status pages.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PartitionStatus {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// The epoch of this member's assignment of the partition.
    pub epoch: u64,
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
    /// A revoke is draining the partition.
    pub revoking: bool,
}

/// Memory the caps count, for status pages.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct MemoryStatus {
    /// Keys pending or in flight, plus members collected by business actions.
    pub keys: usize,
    /// Approximate bytes of keys and action members.
    pub key_bytes: usize,
    /// Bytes of fetched bodies waiting for the sink.
    pub body_bytes: usize,
    /// Bytes of dead letters waiting for the broker's acknowledgement.
    pub dead_letter_bytes: usize,
    /// Bytes of records received by the consumer and not yet taken by the engine.
    pub queued_bytes: usize,
}

impl MemoryStatus {
    /// All bytes the byte cap counts.
    pub fn total_bytes(&self) -> usize {
        self.key_bytes + self.body_bytes + self.dead_letter_bytes + self.queued_bytes
    }
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
    /// What the memory caps count.
    pub memory: MemoryStatus,
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
    /// Keys held without evidence against them (source in outage, no other key of their source
    /// succeeding, breaker open, delete held).
    pub blocked_keys: usize,
    /// Sources in outage.
    pub outages: Vec<SourceOutage>,
    /// Every source's gone guard.
    pub gone_guards: Vec<GuardState>,
}

/// Names the source serving an entity type.
pub type SourceOf = Box<dyn Fn(&str) -> Arc<str> + Send + Sync>;

/// Dead-letter reason of members dead-lettered because another member of their action failed.
const ACTION_REASON: &str = "action";

/// The engine's state machine. See the module docs.
pub struct Engine {
    cfg: EngineConfig,
    screen: Screen,
    sink_tracks_versions: bool,
    /// The source serving an entity type (the unit of health and of the gone guard).
    source_of: SourceOf,
    /// Sources by entity type, as `source_of` answered (bounded).
    sources: HashMap<Arc<str>, Arc<str>>,

    parts: PartitionTable,
    keys: KeyTable,
    acked: AckedCache,
    policy: Policy,
    dead: dlq::InFlight,
    /// Business actions (notifications with a correlation id).
    acts: Actions,
    /// Transactions of a transactional sink (exactly-once delivery), when there is one.
    txn: Option<txn::Transactions>,
    /// The sink wants the input offsets of each write.
    wants_inputs: bool,

    fetches_in_flight: usize,
    next_flight: u64,
    refresh_done: Vec<(u64, RefreshOutcome)>,
    /// The latest tick seen (revokes carry no tick of their own).
    last_tick: Tick,
    /// The wall-clock time of `Tick(0)`, in milliseconds since the Unix epoch: how a record's
    /// timestamp is compared with the engine's ticks (catch-up).
    wall_origin_ms: i64,
    globally_paused: bool,
    shutting_down: bool,
    /// Bytes of records the consumer received that the engine has not taken yet.
    queued_bytes: usize,

    actions: Vec<Action>,
    counters: Counters,
    latency: LatencyHistogram,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("keys", &self.keys.len())
            .field("partitions", &self.parts.len())
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
        let screen = Screen::new(decoders, handles, cfg.max_id_len, cfg.unknown_types);
        Engine {
            acked: AckedCache::new(cfg.version_cache_capacity),
            policy: Policy::new(cfg.clone()),
            acts: Actions::new(cfg.actions),
            txn: None,
            wants_inputs: false,
            cfg,
            screen,
            sink_tracks_versions,
            source_of: Box::new(|t: &str| Arc::from(t)),
            sources: HashMap::new(),
            parts: PartitionTable::new(),
            keys: KeyTable::new(),
            dead: dlq::InFlight::new(),
            fetches_in_flight: 0,
            next_flight: 1,
            refresh_done: Vec::new(),
            last_tick: Tick(0),
            wall_origin_ms: crate::clock::wall_now_ms(),
            globally_paused: false,
            shutting_down: false,
            queued_bytes: 0,
            actions: Vec::new(),
            counters: Counters::default(),
            latency: LatencyHistogram::default(),
        }
    }

    /// Name the source serving each entity type (for example [`crate::Fetcher::source_name`]):
    /// health and the gone guard are judged per source. By default each type is its own source.
    pub fn with_sources(mut self, source_of: SourceOf) -> Self {
        self.source_of = source_of;
        self.sources.clear();
        self
    }

    /// The source serving `key`'s type.
    fn source(&mut self, key: &EntityKey) -> Arc<str> {
        if let Some(s) = self.sources.get(key.entity_type()) {
            return s.clone();
        }
        let s = (self.source_of)(key.entity_type());
        // Types come from payloads; keep the map bounded whatever they announce.
        if self.sources.len() < 1024 {
            self.sources
                .insert(key.entity_type_arc().clone(), s.clone());
        }
        s
    }

    /// The settings.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// Apply settings that can change while running: the debounce window and max-wait (for
    /// notifications received from now on), fetch concurrency and the caps. Everything else in
    /// `cfg` is ignored (it needs a new pipeline).
    pub fn reconfigure(&mut self, cfg: &EngineConfig) {
        self.cfg.window = cfg.window;
        self.cfg.max_wait = cfg.max_wait;
        self.cfg.catch_up = cfg.catch_up;
        self.cfg.catch_up_linger = cfg.catch_up_linger;
        self.cfg.fetch_concurrency = cfg.fetch_concurrency;
        self.cfg.max_outstanding_per_partition = cfg.max_outstanding_per_partition;
        self.cfg.max_pending_keys = cfg.max_pending_keys;
        self.cfg.max_pending_bytes = cfg.max_pending_bytes;
        self.cfg.resume_ratio = cfg.resume_ratio;
    }

    // ----- assignment --------------------------------------------------------------------------

    /// Partitions were assigned. A partition assigned again in a newer epoch without a revoke in
    /// between is treated as lost first (its notes are forgotten, its writes fenced). A new
    /// assignment starts in the desired pause state: the caller re-applies [`Engine::paused`].
    pub fn assign(&mut self, assignments: &[Assignment]) {
        for a in assignments {
            match self.parts.assign(a, self.globally_paused) {
                AssignOutcome::New(_) => {
                    tracing::debug!(assignment = %a, "partition assigned");
                }
                AssignOutcome::Replaced { old, .. } => {
                    tracing::warn!(assignment = %a,
                        "partition assigned again without a revoke: the older assignment's work is dropped");
                    // The old slot already ended inside `assign`; drop what referred to it.
                    self.forget_notes_of(&[old], true);
                }
                AssignOutcome::Unchanged(_) => {}
            }
        }
    }

    fn current_refs(&self, assignments: &[Assignment]) -> Vec<PartRef> {
        assignments
            .iter()
            .filter_map(|a| self.parts.current(a))
            .collect()
    }

    /// Begin a revoke: no new work for these assignments; their pending notifications are
    /// dropped and fetches in flight stop counting them. Writes already issued are awaited (see
    /// [`Engine::revoke_drained`]). Assignments that are not current (an older epoch) are
    /// ignored.
    pub fn revoke_begin(&mut self, assignments: &[Assignment]) {
        let refs = self.current_refs(assignments);
        for &r in &refs {
            if let Some(p) = self.parts.resolve_mut(r) {
                p.revoking = true;
            }
        }
        self.forget_notes_of(&refs, false);
    }

    /// Are all writes issued for these assignments acknowledged? (An assignment that is not
    /// current has nothing to wait for.)
    pub fn revoke_drained(&self, assignments: &[Assignment]) -> bool {
        assignments.iter().all(|a| {
            self.parts
                .current(a)
                .and_then(|r| self.parts.resolve(r))
                .is_none_or(|p| p.writes_in_flight == 0)
        })
    }

    /// Finish a revoke: returns the offsets to commit synchronously before letting go, ends the
    /// assignments (jobs fenced only by them are dropped) and forgets them. Assignments that are
    /// not current are ignored: a stale revoke never touches a newer assignment.
    pub fn revoke_finish(&mut self, assignments: &[Assignment]) -> Vec<(Assignment, i64)> {
        let refs = self.current_refs(assignments);
        let mut out = Vec::new();
        for &r in &refs {
            if let Some(p) = self.parts.resolve(r) {
                if let Some(offset) = p.tracker.pending_commit() {
                    out.push((p.assignment.clone(), offset));
                }
            }
        }
        self.end_assignments(&refs);
        out
    }

    /// Assignments were lost (session expired, fenced): drop their state with no drain and no
    /// commit.
    pub fn lose(&mut self, assignments: &[Assignment]) {
        let refs = self.current_refs(assignments);
        self.end_assignments(&refs);
    }

    fn end_assignments(&mut self, refs: &[PartRef]) {
        if refs.is_empty() {
            return;
        }
        self.forget_notes_of(refs, true);
        self.forget_provisional_of(refs);
        for r in refs {
            self.parts.end(r.slot);
        }
    }

    /// Remove notes of `refs` from pending entries, action members and flights still fetching
    /// (and, with `also_writing`, from flights writing: a flight left with no note is
    /// abandoned, its write fenced).
    fn forget_notes_of(&mut self, refs: &[PartRef], also_writing: bool) {
        if refs.is_empty() {
            return;
        }
        let gone = |n: &NoteRef| refs.contains(&n.part);
        let touched = self.actions_touching(refs);
        self.acts.forget_notes(&gone);
        let mut idle = Vec::new();
        for (id, entry) in self.keys.iter_mut() {
            let state = &mut entry.state;
            if let Some(p) = &mut state.pending {
                p.notes.retain(|n| !gone(n));
                if p.notes.is_empty() && !state.refresh_requested() {
                    state.pending = None;
                }
            }
            if let Some(f) = &mut state.flight {
                if f.phase != Phase::Writing || also_writing {
                    f.batch.notes.retain(|n| !gone(n));
                    if f.phase == Phase::Writing && f.batch.notes.is_empty() {
                        f.abandoned = true;
                    }
                }
            }
            if state.is_idle() {
                idle.push(id);
            }
        }
        for id in idle {
            self.keys.remove(id);
        }
        let now = self.last_tick;
        for id in touched {
            self.dissolve_action(id, now);
        }
    }

    /// The consumer's position of these assignments (the next offset it will deliver): past
    /// transaction markers, the commit point of a fully satisfied partition follows it.
    pub fn observe_positions(&mut self, positions: &[(Assignment, i64)]) {
        for (a, pos) in positions {
            if let Some(p) = self
                .parts
                .current(a)
                .and_then(|r| self.parts.resolve_mut(r))
            {
                p.tracker.observe_position(*pos);
            }
        }
    }

    /// Bytes of records the consumer received that the engine has not taken yet (they count
    /// against the byte cap).
    pub fn set_queued_bytes(&mut self, bytes: usize) {
        self.queued_bytes = bytes;
    }

    // ----- records ---------------------------------------------------------------------------

    /// Take one received record.
    pub fn on_record(&mut self, record: &RecordView<'_>, now: Tick) {
        self.counters.add_records(1);
        self.take_record(record, now);
    }

    /// Take a batch of received records (counted once).
    pub fn on_records<'a>(
        &mut self,
        records: impl ExactSizeIterator<Item = RecordView<'a>>,
        now: Tick,
    ) {
        self.counters.add_records(records.len() as u64);
        for r in records {
            self.take_record(&r, now);
        }
    }

    fn take_record(&mut self, record: &RecordView<'_>, now: Tick) {
        let Some(slot) = self.parts.lookup(record.topic, record.partition) else {
            self.counters.unassigned_records += 1;
            tracing::debug!(
                topic = record.topic,
                partition = record.partition,
                offset = record.offset,
                "record for a partition this engine does not own; ignored"
            );
            return;
        };
        let (generation, revoking, paused) = match self.parts.get(slot) {
            Some(p) => (p.generation, p.revoking, p.paused),
            None => return,
        };
        if revoking {
            self.counters.unassigned_records += 1;
            return;
        }
        if paused || self.globally_paused {
            self.counters.records_while_paused += 1;
        }
        if self
            .parts
            .get_mut(slot)
            .is_some_and(|p| p.tracker.stored_covers(record.offset))
        {
            // The sink stored this record's offset before this assignment (exactly-once): it
            // is covered by a committed write already.
            self.counters.stored_on_arrival += 1;
            self.track(slot, record.offset, true);
            return;
        }
        let note = NoteRef {
            part: PartRef { slot, generation },
            offset: record.offset,
        };
        match self.screen.take(record, &mut self.counters) {
            Intake::Satisfied => {
                self.track(slot, record.offset, true);
            }
            Intake::DeadLetter(dl) => {
                if self.track(slot, record.offset, false) {
                    self.issue_dead_letter(dl, std::iter::once(note).collect());
                }
            }
            Intake::Note {
                key,
                version,
                fields,
                action,
            } => {
                if let Some(v) = version {
                    if self
                        .acked
                        .version(&key, &self.parts)
                        .is_some_and(|held| held.held_covers(&v))
                    {
                        self.counters.add_satisfied_by_version(1);
                        self.track(slot, record.offset, true);
                        return;
                    }
                }
                if !self.track(slot, record.offset, false) {
                    return;
                }
                match action {
                    None => {
                        let windows = self.windows_for(record.timestamp, now);
                        self.add_note(key, version, fields, note, now, windows)
                    }
                    Some(tag) => self.add_action_note(&tag, key, version, fields, note, now),
                }
            }
        }
    }

    /// Record an offset in its partition's tracker. Returns `false` for a duplicate delivery
    /// (offset not above the last one), which is already covered.
    fn track(&mut self, slot: u32, offset: i64, satisfied: bool) -> bool {
        let Some(p) = self.parts.get_mut(slot) else {
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
                tracing::warn!(partition = %p.tp(), error = %e, "duplicate delivery ignored");
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
        (window, max_wait): (u64, u64),
    ) {
        let id = match self.keys.find(&key) {
            Some(id) => {
                let Some(entry) = self.keys.get_mut(id) else {
                    return;
                };
                let state = &mut entry.state;
                let elsewhere = state
                    .pending
                    .iter()
                    .flat_map(|p| p.notes.first())
                    .chain(state.flight.iter().flat_map(|f| f.batch.notes.first()))
                    .any(|n| {
                        n.part.slot != note.part.slot && !n.is_refresh() && !note.is_refresh()
                    });
                let mut schedule = false;
                match &mut state.pending {
                    Some(p) => {
                        p.merge(now, window, max_wait, note, version);
                        self.counters.add_coalesced();
                    }
                    None => {
                        state.pending = Some(Pending::new(now, window, note, version));
                        schedule = true;
                    }
                }
                if let Some(f) = fields {
                    state.set_fields(f);
                }
                if elsewhere {
                    // Invariant 10: per-key order across instances needs one partition per key
                    // (or versions). Count the evidence that it does not hold.
                    self.counters.add_key_on_several_partitions();
                }
                if !schedule {
                    return;
                }
                id
            }
            None => {
                let mut state = KeyState::with_pending(Pending::new(now, window, note, version));
                if let Some(f) = fields {
                    state.set_fields(f);
                }
                self.keys.insert(key, state)
            }
        };
        self.keys.schedule(id);
    }

    /// Ask for an on-demand refresh of `key` (not tied to a Kafka offset). The outcome is
    /// reported through [`Engine::take_refresh_outcomes`] with `waiter`.
    pub fn refresh(&mut self, key: EntityKey, waiter: u64, now: Tick) {
        let note = NoteRef {
            part: PartRef::REFRESH,
            offset: waiter as i64,
        };
        if !self.screen.handles(key.entity_type()) {
            self.refresh_done.push((
                waiter,
                RefreshOutcome::Failed(format!(
                    "no fetcher serves entity type {:?}",
                    key.entity_type()
                )),
            ));
            return;
        }
        let windows = self.windows_for(None, now);
        self.add_note(key.clone(), None, None, note, now, windows);
        if let Some(id) = self.keys.find(&key) {
            if let Some(entry) = self.keys.get_mut(id) {
                entry.state.set_refresh_requested(true);
                if let Some(p) = &mut entry.state.pending {
                    p.deadline = p.deadline.min(now);
                }
            }
            self.keys.schedule(id);
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
        while let Some((flight, id)) = self.keys.pop_write_retry(now) {
            self.retry_write(id, flight);
        }
        while self.fetches_in_flight < self.cfg.fetch_concurrency {
            let Some(id) = self.keys.pop_due(now) else {
                break;
            };
            self.start_flight(id, now);
        }
    }

    /// Re-issue a single record's write after its backoff, if its flight still writes and still
    /// serves a current assignment (a retry after the assignment ended is a zombie write).
    fn retry_write(&mut self, id: KeyId, flight: u64) {
        let Some(entry) = self.keys.get(id) else {
            return;
        };
        let Some(f) = entry.state.flight.as_ref() else {
            return;
        };
        if f.id != flight || f.phase != Phase::Writing {
            return;
        }
        let current = f
            .batch
            .notes
            .iter()
            .any(|n| n.is_refresh() || self.parts.resolve(n.part).is_some());
        if f.abandoned || !current {
            let Some(key) = self.keys.key(id) else {
                return;
            };
            self.on_write_done(&key, flight, WriteResult::Abandoned, self.last_tick);
            return;
        }
        let Some(change) = f.change.clone() else {
            return;
        };
        let job = WriteJob {
            flight,
            change,
            group: None,
            fence: self.fence_of(&f.batch.notes),
            fetched_at: f.fetched_at,
            inputs: self.inputs_of(&f.batch.notes),
        };
        self.actions.push(Action::Write(job));
    }

    /// The fence of the assignments behind `notes`: unfenced when they are only refreshes,
    /// already ended when none of their assignments is current any more.
    fn fence_of(&self, notes: &Notes) -> Fence {
        let fence = Fence::of(
            notes
                .iter()
                .filter(|n| !n.is_refresh())
                .filter_map(|n| self.parts.resolve(n.part))
                .map(|p| p.token.clone()),
        );
        if fence.is_unfenced() && notes.iter().any(|n| !n.is_refresh()) {
            return Fence::ended_already();
        }
        fence
    }

    fn start_flight(&mut self, id: KeyId, now: Tick) {
        let Some(key) = self.keys.key(id) else {
            return;
        };
        let action = if self.acts.is_empty() {
            None
        } else {
            match self.claim_member(&key, now) {
                actions::Claim::Free => None,
                actions::Claim::Action(a) => Some(a),
                // An action holding the key is still collecting: its notes wait for it (they
                // ride along with the action's fetch, or are scheduled if it dissolves).
                actions::Claim::Blocked => return,
            }
        };
        let cached = self.acked.get(&key, &self.parts).cloned();
        let Some(entry) = self.keys.get_mut(id) else {
            return;
        };
        let state = &mut entry.state;
        let Some(batch) = state.pending.take() else {
            return;
        };
        state.set_refresh_requested(false);
        let flight = self.next_flight;
        self.next_flight += 1;
        let check_sink_first = self.sink_tracks_versions && batch.all_versioned && cached.is_none();
        let request = FetchRequest {
            key: key.clone(),
            fields: state.fields(),
            validators: cached.filter(|a| !a.deleted).and_then(|a| a.validators),
            min_version: batch.max_version,
        };
        let fence = {
            let f = Fence::of(
                batch
                    .notes
                    .iter()
                    .filter(|n| !n.is_refresh())
                    .filter_map(|n| self.parts.resolve(n.part))
                    .map(|p| p.token.clone()),
            );
            if f.is_unfenced() && batch.notes.iter().any(|n| !n.is_refresh()) {
                Fence::ended_already()
            } else {
                f
            }
        };
        state.flight = Some(Box::new(Flight {
            id: flight,
            phase: Phase::Fetching,
            batch,
            change: None,
            change_bytes: 0,
            validators: None,
            write_failures: 0,
            action,
            fetched_at: SystemTime::now(),
            abandoned: false,
        }));
        self.fetches_in_flight += 1;
        self.counters.fetches += 1;
        tracing::trace!(key = %key, flight, "fetch started");
        self.actions.push(Action::Fetch(FetchJob {
            flight,
            request,
            check_sink_first,
            fence,
        }));
    }

    /// Take the actions produced so far.
    pub fn take_actions(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }

    /// When [`Engine::poll`] next has something to do, if anything is scheduled. While every
    /// fetch slot is taken, due keys wait for a fetch to complete (which wakes the caller), so
    /// they set no deadline: a deadline already in the past would make the caller spin.
    pub fn next_wakeup(&self) -> Option<Tick> {
        let keys = (self.fetches_in_flight < self.cfg.fetch_concurrency)
            .then(|| self.keys.next_timer())
            .flatten();
        let retries = self.keys.next_write_retry();
        let actions = self.acts.next_wakeup();
        [keys, retries, actions].into_iter().flatten().min()
    }

    // ----- completions -----------------------------------------------------------------------

    /// A fetch job ended.
    pub fn on_fetch_done(&mut self, key: &EntityKey, flight: u64, result: FetchResult, now: Tick) {
        let Some(id) = self.keys.find(key) else {
            return;
        };
        let live: Vec<bool> = {
            let Some(f) = self.keys.get(id).and_then(|e| e.state.flight.as_ref()) else {
                return;
            };
            if f.id != flight || f.phase != Phase::Fetching {
                return;
            }
            f.batch
                .notes
                .iter()
                .map(|n| self.parts.is_live(n.part))
                .collect()
        };
        self.fetches_in_flight = self.fetches_in_flight.saturating_sub(1);
        let Some(f) = self.keys.get_mut(id).and_then(|e| e.state.flight.as_mut()) else {
            return;
        };
        let mut i = 0;
        f.batch.notes.retain(|_| {
            let keep = live.get(i).copied().unwrap_or(false);
            i += 1;
            keep
        });
        let action = f.action;
        if f.batch.notes.is_empty() || matches!(result, FetchResult::Abandoned) {
            // Every notification belonged to assignments this engine no longer owns.
            self.counters.abandoned += 1;
            self.keys.take_flight(id);
            if let Some(a) = action {
                self.action_member_ended(key, a, false, now);
            }
            self.after_flight(id, now);
            return;
        }
        let min = f.batch.max_version;
        if let Some(a) = action {
            if self.acts.open.get(&a).is_some_and(|x| x.failed) {
                let attempts = self.retry_of(id).map_or(0, |r| r.attempts) + 1;
                self.dead_letter_flight(
                    id,
                    ACTION_REASON,
                    "another member of the business action failed",
                    ErrorClass::Permanent,
                    attempts,
                    now,
                );
                return;
            }
        }
        let retry = self.retry_of(id);
        let source = self.source(key);
        let held = self.acked.version(key, &self.parts);
        let age = self
            .keys
            .get(id)
            .and_then(|e| e.state.flight.as_ref())
            .map_or(Duration::ZERO, |f| now.since(f.batch.first_at));
        let ctx = FetchContext {
            key,
            source: &source,
            min,
            held,
            age,
            retry,
            now,
        };
        match self.policy.judge_fetch(&ctx, result, &mut self.counters) {
            FetchVerdict::Write { change, validators } => match action {
                Some(a) => self.park(key, a, Some(change), validators, now),
                None => self.begin_write(id, change, validators),
            },
            FetchVerdict::Satisfied { held } => {
                if let Some(v) = held {
                    let owner = self.owner_of(id);
                    self.acked.put(
                        key.clone(),
                        Acked {
                            version: Some(v),
                            validators: None,
                            deleted: false,
                            owner,
                        },
                    );
                }
                match action {
                    Some(a) => self.park(key, a, None, None, now),
                    None => self.finish_success(id, now),
                }
            }
            FetchVerdict::Retry {
                retry,
                delay,
                refresh_failure,
            } => {
                if let Some(message) = refresh_failure {
                    self.fail_refreshes(id, RefreshOutcome::DeleteHeld(message));
                }
                self.back_off(id, retry, delay, now)
            }
            FetchVerdict::DeadLetter {
                reason,
                message,
                class,
                attempts,
            } => self.dead_letter_flight(id, reason, &message, class, attempts, now),
        }
    }

    /// Answer the on-demand refreshes riding on `id`'s flight now, with `outcome`, instead of
    /// keeping them waiting (their Kafka notifications keep waiting).
    fn fail_refreshes(&mut self, id: KeyId, outcome: RefreshOutcome) {
        let Some(f) = self.keys.get_mut(id).and_then(|e| e.state.flight.as_mut()) else {
            return;
        };
        let mut failed = Vec::new();
        f.batch.notes.retain(|n| {
            if n.is_refresh() {
                failed.push(n.offset as u64);
                false
            } else {
                true
            }
        });
        for waiter in failed {
            self.refresh_done.push((waiter, outcome.clone()));
        }
    }

    fn retry_of(&self, id: KeyId) -> Option<RetryState> {
        self.keys.get(id).and_then(|e| e.state.retry())
    }

    /// The assignment that owns what a flight of `id` writes: its first note on a current
    /// assignment (the refresh reference when it has none).
    fn owner_of(&self, id: KeyId) -> PartRef {
        self.keys
            .get(id)
            .and_then(|e| e.state.flight.as_ref())
            .and_then(|f| {
                f.batch
                    .notes
                    .iter()
                    .find(|n| !n.is_refresh() && self.parts.resolve(n.part).is_some())
            })
            .map_or(PartRef::REFRESH, |n| n.part)
    }

    /// A transient failure: keep the notes pending and fetch again after `delay`.
    fn back_off(&mut self, id: KeyId, mut retry: RetryState, delay: Duration, now: Tick) {
        retry.next_at = now.after(delay);
        let Some(f) = self.keys.take_flight(id) else {
            return;
        };
        if f.batch.notes.is_empty() {
            // Only refreshes rode on it, and they were answered: nothing is left to retry.
            if let Some(e) = self.keys.get_mut(id) {
                e.state.clear_retry();
            }
            self.after_flight(id, now);
            return;
        }
        let Some(entry) = self.keys.get_mut(id) else {
            return;
        };
        let state = &mut entry.state;
        *state.retry_or_insert(retry) = retry;
        let batch = f.batch;
        match &mut state.pending {
            Some(p) => p.absorb(batch),
            None => state.pending = Some(batch),
        }
        self.keys.schedule(id);
    }

    fn begin_write(&mut self, id: KeyId, change: Change, validators: Option<Validators>) {
        let Some(f) = self.keys.get(id).and_then(|e| e.state.flight.as_ref()) else {
            return;
        };
        let refs: Vec<PartRef> = f.batch.notes.iter().map(|n| n.part).collect();
        let fence = self.fence_of(&f.batch.notes);
        let inputs = self.inputs_of(&f.batch.notes);
        let fetched_at = f.fetched_at;
        let flight = f.id;
        self.parts.hold(refs);
        self.keys.set_flight_change(id, Some(change.clone()));
        if let Some(f) = self.keys.get_mut(id).and_then(|e| e.state.flight.as_mut()) {
            f.phase = Phase::Writing;
            f.validators = validators;
        }
        self.actions.push(Action::Write(WriteJob {
            flight,
            change,
            group: None,
            fence,
            fetched_at,
            inputs,
        }));
    }

    /// The distinct assignments behind `notes` (what a write of them holds).
    fn held_of(notes: &Notes) -> Vec<PartRef> {
        let mut held: Vec<PartRef> = Vec::new();
        for n in notes {
            if !n.is_refresh() && !held.contains(&n.part) {
                held.push(n.part);
            }
        }
        held
    }

    /// A write of one change ended.
    pub fn on_write_done(&mut self, key: &EntityKey, flight: u64, result: WriteResult, now: Tick) {
        let Some(id) = self.keys.find(key) else {
            return;
        };
        let Some(f) = self.keys.get(id).and_then(|e| e.state.flight.as_ref()) else {
            return;
        };
        if f.id != flight || f.phase != Phase::Writing {
            return;
        }
        let held = Self::held_of(&f.batch.notes);
        let abandoned = f.abandoned;
        match result {
            WriteResult::Durable => {
                let (version, validators) = match (&f.change, &f.validators) {
                    (Some(Change::Upsert { entity, .. }), v) => (entity.version, v.clone()),
                    _ => (None, None),
                };
                let deleted = matches!(f.change, Some(Change::Delete { .. }));
                let notified = f.batch.max_version;
                self.parts.release(&held);
                self.counters.add_write_durable();
                let owner = self.owner_of(id);
                if deleted {
                    // A tombstone: late notifications at or below the delete's version need no
                    // fetch (nothing is remembered when the delete was not versioned).
                    match notified {
                        Some(v) => self.acked.put(
                            key.clone(),
                            Acked {
                                version: Some(v),
                                validators: None,
                                deleted: true,
                                owner,
                            },
                        ),
                        None => self.acked.forget(key),
                    }
                } else {
                    self.acked.put(
                        key.clone(),
                        Acked {
                            version,
                            validators,
                            deleted: false,
                            owner,
                        },
                    );
                }
                self.finish_success(id, now);
            }
            WriteResult::Abandoned => {
                self.parts.release(&held);
                self.abandon_flight(id, now);
            }
            WriteResult::Failed(_) if abandoned => {
                self.parts.release(&held);
                self.abandon_flight(id, now);
            }
            WriteResult::Failed(e) => {
                self.counters.add_write_failure(e.class().label());
                let failures = f.write_failures + 1;
                match self.policy.judge_write_failure(failures, &e) {
                    WriteVerdict::DeadLetter {
                        message,
                        class,
                        attempts,
                    } => {
                        self.parts.release(&held);
                        self.dead_letter_flight(id, reason::SINK, &message, class, attempts, now);
                    }
                    WriteVerdict::Retry { failures, delay } => {
                        if let Some(f) = self.keys.get_mut(id).and_then(|e| e.state.flight.as_mut())
                        {
                            f.write_failures = failures;
                        }
                        self.keys.push_write_retry(now.after(delay), flight, id);
                    }
                }
            }
        }
    }

    /// A flight whose assignments all ended: drop it (its notes are dead) and let the key's
    /// follow-up, if any, start.
    fn abandon_flight(&mut self, id: KeyId, now: Tick) {
        self.counters.abandoned += 1;
        let Some(f) = self.keys.take_flight(id) else {
            return;
        };
        for n in f.batch.notes.iter().filter(|n| n.is_refresh()) {
            self.refresh_done.push((
                n.offset as u64,
                RefreshOutcome::Failed("the write was dropped".into()),
            ));
        }
        if let (Some(a), Some(key)) = (f.action, self.keys.key(id)) {
            self.action_member_ended(&key, a, false, now);
        }
        self.after_flight(id, now);
    }

    /// The flight's notes are satisfied: release their offsets and end the flight.
    fn finish_success(&mut self, id: KeyId, now: Tick) {
        let Some(f) = self.keys.take_flight(id) else {
            return;
        };
        let Some(key) = self.keys.key(id) else {
            return;
        };
        if let Some(e) = self.keys.get_mut(id) {
            e.state.clear_retry();
        }
        let action = f.action;
        self.latency.record(now.since(f.batch.first_at));
        crate::metrics::latency(now.since(f.batch.first_at));
        for n in &f.batch.notes {
            self.satisfy(n, RefreshOutcome::Done);
        }
        // Rule (b): a follow-up whose every notification is covered by the acknowledged version
        // needs no fetch.
        let held = self.acked.version(&key, &self.parts);
        if let Some(held) = held {
            let covered = self
                .keys
                .get(id)
                .and_then(|e| e.state.pending.as_ref())
                .is_some_and(|p| {
                    p.all_versioned && p.max_version.is_some_and(|v| held.held_covers(&v))
                });
            if covered {
                if let Some(p) = self.keys.get_mut(id).and_then(|e| e.state.pending.take()) {
                    self.counters.add_satisfied_by_version(p.notes.len() as u64);
                    for n in &p.notes {
                        self.satisfy(n, RefreshOutcome::Done);
                    }
                }
            }
        }
        if let Some(a) = action {
            self.action_member_ended(&key, a, false, now);
        }
        self.after_flight(id, now);
    }

    /// After a flight ended: schedule the follow-up, or forget the key.
    fn after_flight(&mut self, id: KeyId, now: Tick) {
        let Some(key) = self.keys.key(id) else {
            return;
        };
        if !self.acts.is_empty() && self.head_wants_start(&key) {
            // The key's next action waited for this flight.
            self.keys.remove_if_idle(id);
            self.try_start_member(key, now);
            return;
        }
        if !self.keys.remove_if_idle(id) {
            self.keys.schedule(id);
        }
    }

    fn satisfy(&mut self, n: &NoteRef, outcome: RefreshOutcome) {
        if n.is_refresh() {
            self.refresh_done.push((n.offset as u64, outcome));
            return;
        }
        if let Some(p) = self.parts.resolve_mut(n.part) {
            p.tracker.satisfy(n.offset);
        }
    }

    fn coordinates(&self, notes: &Notes) -> Vec<Coordinate> {
        notes
            .iter()
            .filter_map(|n| {
                let p = self.parts.resolve(n.part)?;
                Some(Coordinate {
                    topic: p.tp().topic.clone(),
                    partition: p.tp().partition,
                    offset: n.offset,
                })
            })
            .collect()
    }

    /// The input offsets of `notes`, when the sink wants them in its writes.
    fn inputs_of(&self, notes: &Notes) -> Vec<Coordinate> {
        if self.wants_inputs {
            self.coordinates(notes)
        } else {
            Vec::new()
        }
    }

    /// Tell the engine whether the sink wants the input offsets of each write
    /// ([`crate::Sink::wants_inputs`]).
    pub fn set_wants_inputs(&mut self, on: bool) {
        self.wants_inputs = on;
    }

    fn dead_letter_flight(
        &mut self,
        id: KeyId,
        why: &'static str,
        message: &str,
        class: ErrorClass,
        attempts: u32,
        now: Tick,
    ) {
        let Some(key) = self.keys.key(id) else {
            return;
        };
        self.acked.forget(&key);
        if let Some(e) = self.keys.get_mut(id) {
            e.state.clear_retry();
        }
        let Some(f) = self.keys.take_flight(id) else {
            return;
        };
        let action = f.action;
        // A failed business action dead-letters only the notes its members brought: ordinary
        // notifications that rode along with the member's fetch are pending again.
        let only = match (why, action) {
            (ACTION_REASON, Some(a)) => self.acts.action_notes(a, &key).cloned(),
            _ => None,
        };
        let mut notes = Notes::new();
        let mut riders = Notes::new();
        for n in f.batch.notes.iter().copied() {
            if only.as_ref().is_some_and(|o| !o.contains(&n)) {
                riders.push(n);
            } else if n.is_refresh() {
                self.refresh_done
                    .push((n.offset as u64, RefreshOutcome::Failed(message.to_owned())));
            } else {
                notes.push(n);
            }
        }
        if !riders.is_empty() {
            let mut p = f.batch.clone();
            p.notes = riders;
            p.deadline = now;
            if let Some(e) = self.keys.get_mut(id) {
                match &mut e.state.pending {
                    Some(existing) => existing.absorb(p),
                    None => e.state.pending = Some(p),
                }
            }
        }
        if !notes.is_empty() {
            let coords = self.coordinates(&notes);
            let mut record = dlq::for_key(
                &key,
                f.batch.max_version,
                &coords,
                &KeyFailure {
                    reason: why,
                    message,
                    class,
                    attempts,
                    age: now.since(f.batch.first_at),
                },
            );
            if let Some(corr) = action.and_then(|a| self.acts.open.get(&a)) {
                record.headers.push((
                    crate::action::CORRELATION_HEADER.to_owned(),
                    corr.correlation.to_string(),
                ));
            }
            self.issue_dead_letter(record, notes);
        }
        if let Some(a) = action {
            self.action_member_ended(&key, a, true, now);
        }
        self.after_flight(id, now);
    }

    fn issue_dead_letter(&mut self, record: DeadLetter, notes: Notes) {
        let held = self.parts.hold(notes.iter().map(|n| n.part));
        let fence = self.fence_of(&notes);
        let id = self.dead.issue(&record, notes, held);
        let why = record.header(header::REASON).unwrap_or("unknown");
        self.counters.add_dead_letter(why);
        tracing::warn!(
            reason = why,
            error = record.header(header::ERROR).unwrap_or(""),
            entity = record.header(header::ENTITY_ID).unwrap_or(""),
            "dead-lettering"
        );
        self.actions
            .push(Action::DeadLetter(DeadLetterJob { id, record, fence }));
    }

    /// A dead letter was acknowledged by the broker (`Ok`), or failed for good (`Err`: the topic
    /// is missing or not writable; consumption pauses and readiness fails). Transient failures
    /// are retried by the producer side and are not reported here.
    pub fn on_dead_letter_done(&mut self, id: u64, result: Result<(), String>) {
        match result {
            Ok(()) => {
                if let Some(e) = self.dead.acked(id) {
                    self.parts.release(&e.held);
                    self.counters.dead_letters_acked += 1;
                    for n in &e.notes {
                        self.satisfy(n, RefreshOutcome::Done);
                    }
                }
            }
            Err(message) => {
                if !self.dead.broken {
                    tracing::error!(error = %message, "dead-letter topic refuses writes: pausing consumption");
                }
                self.dead.broken = true;
            }
        }
    }

    /// A dead letter's retries stopped because every assignment it served ended: its
    /// notifications are gone with those assignments (the new owner handles them).
    pub fn on_dead_letter_abandoned(&mut self, id: u64) {
        if let Some(e) = self.dead.acked(id) {
            self.parts.release(&e.held);
        }
    }

    /// Dead letters issued and not yet acknowledged.
    pub fn dead_letter_pending(&self) -> usize {
        self.dead.len()
    }

    // ----- commits ---------------------------------------------------------------------------

    /// Offsets worth committing now: current assignments (not being revoked) whose commit point
    /// moved since the last successful commit.
    pub fn commits(&self) -> Vec<(Assignment, i64)> {
        self.parts.commits()
    }

    /// What to commit now (at-least-once), with commit metadata: the offsets whose commit point
    /// moved, or whose satisfied ranges above it did, and those ranges as text (empty when
    /// there are none, or with `engine.commit_ranges_max_bytes = 0`). After a restart the
    /// consumer hands the ranges back ([`crate::consumer::ConsumerEvent::Committed`]) and
    /// [`Engine::start_from_stored`] takes their records as satisfied.
    pub fn commits_with_ranges(&mut self) -> (Offsets, CommitMetadata) {
        let max = self.cfg.commit_ranges_max_bytes;
        let mut offsets = Vec::new();
        let mut metadata = Vec::new();
        for (a, o, ranges) in self.parts.commits_with_ranges(max) {
            if !ranges.is_empty() {
                metadata.push((a.tp.clone(), ranges));
            }
            offsets.push((a, o));
        }
        (offsets, metadata)
    }

    /// A commit succeeded. Ignored unless `assignment` is still current.
    pub fn committed(&mut self, assignment: &Assignment, offset: i64) {
        if self.parts.committed(assignment, offset) {
            self.counters.commits += 1;
            crate::metrics::committed(&assignment.tp, offset);
        }
    }

    /// A commit failed; nothing local changes, it is retried at the next interval.
    pub fn commit_failed(&mut self) {
        self.counters.commit_failures += 1;
    }

    // ----- backpressure ----------------------------------------------------------------------

    /// What the memory caps count now.
    pub fn memory(&self) -> MemoryStatus {
        let (members, member_bytes) = self.acts.held();
        MemoryStatus {
            keys: self.keys.len() + members,
            key_bytes: self.keys.key_bytes() + member_bytes,
            body_bytes: self.keys.body_bytes(),
            dead_letter_bytes: self.dead.bytes(),
            queued_bytes: self.queued_bytes,
        }
    }

    /// Pause decisions since the last call: a partition pauses when its outstanding offsets reach
    /// the cap; all pause when pending keys (action members included) or bytes (keys, bodies
    /// awaiting the sink, dead letters awaiting acknowledgement, records queued from the
    /// consumer) reach theirs, or the dead-letter topic is broken. Resumes happen below the
    /// low-water mark.
    pub fn pause_changes(&mut self) -> PauseChanges {
        let mem = self.memory();
        let keys = mem.keys;
        let bytes = mem.total_bytes();
        let low = self.cfg.resume_ratio;
        if self.globally_paused {
            let below = (keys as f64) < self.cfg.max_pending_keys as f64 * low
                && (bytes as f64) < self.cfg.max_pending_bytes as f64 * low;
            if below && !self.dead.broken {
                self.globally_paused = false;
            }
        } else if keys >= self.cfg.max_pending_keys
            || bytes >= self.cfg.max_pending_bytes
            || self.dead.broken
        {
            self.globally_paused = true;
        }
        let cap = self.cfg.max_outstanding_per_partition;
        let globally = self.globally_paused;
        let mut out = PauseChanges::default();
        for p in self.parts.iter_mut() {
            let n = p.tracker.outstanding();
            let own = if p.paused {
                (n as f64) >= cap as f64 * low
            } else {
                n >= cap
            };
            let want = globally || own;
            if want != p.paused {
                p.paused = want;
                if want {
                    out.pause.push(p.tp().clone());
                } else {
                    out.resume.push(p.tp().clone());
                }
            }
        }
        out
    }

    /// Partitions that should be paused now (re-applied after every assignment: a consumer may
    /// forget the pause state of a partition when assignments change).
    pub fn paused(&self) -> Vec<TopicPartition> {
        self.parts
            .iter()
            .filter(|p| p.paused)
            .map(|p| p.tp().clone())
            .collect()
    }

    // ----- shutdown --------------------------------------------------------------------------

    /// Stop waiting out debounce windows: every pending key becomes due now (keys in backoff
    /// keep their backoff).
    pub fn flush(&mut self, now: Tick) {
        self.shutting_down = true;
        self.complete_all_collecting(now);
        let mut due = Vec::new();
        for (id, entry) in self.keys.iter_mut() {
            if let Some(p) = &mut entry.state.pending {
                p.deadline = p.deadline.min(now);
                due.push(id);
            }
        }
        for id in due {
            self.keys.schedule(id);
        }
    }

    /// Is there work in flight (fetches, writes, dead letters)?
    pub fn has_work_in_flight(&self) -> bool {
        self.fetches_in_flight > 0
            || !self.dead.is_empty()
            || self.keys.iter().any(|(_, e)| e.state.flight.is_some())
    }

    /// Is there nothing pending and nothing in flight?
    pub fn is_idle(&self) -> bool {
        self.keys.is_empty() && self.dead.is_empty() && self.acts.is_empty()
    }

    /// Business actions collecting or being fetched and written.
    pub fn open_actions(&self) -> usize {
        self.acts.open.len()
    }

    /// Does the engine hold anything for `key`: pending notifications, a flight, or a
    /// membership in an open business action?
    pub fn holds_key(&self, key: &EntityKey) -> bool {
        self.keys.find(key).is_some() || self.acts.holds(key)
    }

    // ----- introspection ---------------------------------------------------------------------

    /// Counters since start.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Reset the gone guard of `source` (every source with `None`): an operator decided the
    /// gone answers are real. Every delete the guard held is released through the normal path:
    /// the key is fetched again now and, still gone, deleted.
    pub fn reset_gone_guard(&mut self, source: Option<&str>) {
        self.policy.reset_gone_guard(source);
        let now = self.last_tick;
        let mut released = Vec::new();
        let held: Vec<(KeyId, EntityKey)> = self
            .keys
            .iter()
            .filter(|(_, e)| e.state.retry().is_some_and(|r| r.gone_held))
            .filter_map(|(id, _)| Some((id, self.keys.key(id)?)))
            .collect();
        for (id, key) in held {
            if source.is_some_and(|s| *self.source(&key) != *s) {
                continue;
            }
            if let Some(e) = self.keys.get_mut(id) {
                if let Some(r) = e.state.retry_mut() {
                    r.gone_held = false;
                    r.released = true;
                    r.next_at = now;
                }
            }
            released.push(id);
        }
        tracing::info!(
            source = source.unwrap_or("(all)"),
            released = released.len(),
            "gone guard reset: held deletes released"
        );
        for id in released {
            self.keys.schedule(id);
        }
    }

    /// Sources in outage now (most of their recent outcomes fail the same way).
    pub fn outages(&self) -> Vec<SourceOutage> {
        self.policy.outages(self.last_tick)
    }

    /// Every source's gone guard.
    pub fn gone_guards(&self) -> Vec<GuardState> {
        self.policy.guards()
    }

    /// Keys held without evidence against them (their source in outage, no other key of their
    /// source succeeding, a breaker open, a delete held).
    pub fn blocked_keys(&self) -> usize {
        self.keys
            .iter()
            .filter(|(_, e)| e.state.retry().is_some_and(|r| r.blocked))
            .count()
    }

    /// Is the gone guard holding deletes back?
    pub fn gone_guard_tripped(&self) -> bool {
        self.policy.gone_guard_tripped()
    }

    /// Has the dead-letter topic refused writes for good?
    pub fn dead_letter_broken(&self) -> bool {
        self.dead.broken
    }

    /// Keys with pending notifications or a flight.
    pub fn pending_keys(&self) -> usize {
        self.keys.len()
    }

    /// Approximate bytes held (everything the byte cap counts).
    pub fn pending_bytes(&self) -> usize {
        self.memory().total_bytes()
    }

    /// Partitions owned.
    pub fn owned_partitions(&self) -> Vec<TopicPartition> {
        self.parts.iter().map(|p| p.tp().clone()).collect()
    }

    /// The current assignment of `tp`, if owned.
    pub fn assignment_of(&self, tp: &TopicPartition) -> Option<Assignment> {
        self.parts
            .iter()
            .find(|p| p.tp() == tp)
            .map(|p| p.assignment.clone())
    }

    /// Assignments owned (partition + epoch).
    pub fn assignments(&self) -> Vec<Assignment> {
        self.parts.iter().map(|p| p.assignment.clone()).collect()
    }

    /// A status snapshot.
    pub fn status(&self, now: Tick) -> EngineStatus {
        let oldest = self
            .keys
            .iter()
            .filter_map(|(_, e)| {
                let s = &e.state;
                let p = s.pending.as_ref().map(|p| p.first_at);
                let f = s.flight.as_ref().map(|f| f.batch.first_at);
                match (p, f) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            })
            .min();
        let mut partitions: Vec<PartitionStatus> = self
            .parts
            .iter()
            .map(|p| PartitionStatus {
                topic: p.tp().topic.to_string(),
                partition: p.tp().partition,
                epoch: p.assignment.epoch.0,
                last_received: p.tracker.last_received(),
                commit_point: p.tracker.commit_point(),
                committed: p.tracker.last_committed(),
                outstanding: p.tracker.outstanding(),
                paused: p.paused,
                revoking: p.revoking,
            })
            .collect();
        partitions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        EngineStatus {
            counters: self.counters.clone(),
            partitions,
            pending_keys: self.keys.len(),
            memory: self.memory(),
            oldest_pending_ms: oldest.map(|t| now.since(t).as_millis() as u64),
            fetches_in_flight: self.fetches_in_flight,
            dead_letters_in_flight: self.dead.len(),
            gone_guard_tripped: self.policy.gone_guard_tripped(),
            gone_ratio: self.policy.gone_ratio(),
            dead_letter_broken: self.dead.broken,
            globally_paused: self.globally_paused,
            latency_p50_ms: self.latency.quantile(0.5).map(|d| d.as_secs_f64() * 1000.0),
            latency_p99_ms: self
                .latency
                .quantile(0.99)
                .map(|d| d.as_secs_f64() * 1000.0),
            open_actions: self.acts.open.len(),
            blocked_keys: self.blocked_keys(),
            outages: self.policy.outages(now.max(self.last_tick)),
            gone_guards: self.policy.guards(),
        }
    }
}
