//! The engine's side of business actions: applying the decisions of [`crate::action`] to the
//! member keys' flights.
//!
//! The action bookkeeping (collection, completion, member states, per-key queues) lives in
//! [`crate::action::Actions`] and never touches the key table; this file is where the
//! coordinator turns "member k of action a may start / is fetched / failed" into flights started,
//! parked, written together or dead-lettered.

use super::{ACTION_REASON, Action, Engine, WriteGroup, WriteJob};
use crate::action::{ActionFailurePolicy, ActionTag, CORRELATION_HEADER, Completed, MemberState};
use crate::clock::Tick;
use crate::coalesce::{KeyState, NoteRef, Notes, Pending, Phase};
use crate::decode::Fields;
use crate::dlq::{self, KeyFailure};
use crate::error::ErrorClass;
use crate::fetch::Validators;
use crate::key::{EntityKey, Version};
use crate::partitions::PartRef;
use crate::sink::Change;

/// Whether a key's next flight serves an action.
pub(super) enum Claim {
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
    pub(super) fn add_action_note(
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
            self.counters.add_action_late_member();
            let windows = self.windows_for(None, now);
            self.add_note(key, version, fields, note, now, windows);
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
    pub(super) fn poll_actions(&mut self, now: Tick) {
        for id in self.acts.due(now) {
            self.complete_action(id, Completed::ByTimeout, now);
        }
        while self.fetches_in_flight < self.cfg.fetch_concurrency {
            let Some(key) = self.acts.ready.pop_front() else {
                break;
            };
            if self.keys.state_of(&key).is_some_and(|s| s.flight.is_some()) {
                continue;
            }
            self.start_key(key, now);
        }
    }

    /// Start a flight of `key`, whose notes may still wait in its action (its entry is made for
    /// them, and forgotten again if nothing started).
    fn start_key(&mut self, key: EntityKey, now: Tick) {
        let id = match self.keys.find(&key) {
            Some(id) => id,
            None => self.keys.insert(key, KeyState::default()),
        };
        self.start_flight(id, now);
        self.keys.remove_if_idle(id);
    }

    /// Shutdown: every collecting action completes now.
    pub(super) fn complete_all_collecting(&mut self, now: Tick) {
        let collecting: Vec<u64> = self.acts.collecting.values().copied().collect();
        for id in collecting {
            self.complete_action(id, Completed::ByTimeout, now);
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
    pub(super) fn try_start_member(&mut self, key: EntityKey, now: Tick) {
        if self.keys.state_of(&key).is_some_and(|s| s.flight.is_some()) {
            return;
        }
        if self.fetches_in_flight < self.cfg.fetch_concurrency {
            self.start_key(key, now);
        } else {
            self.acts.ready.push_back(key);
        }
    }

    /// Before a flight of `key` starts: if the key serves a running action, move the member's
    /// notes into the key's pending entry and return the action.
    pub(super) fn claim_member(&mut self, key: &EntityKey, now: Tick) -> Claim {
        let free = if self.acts.in_collecting(key) {
            Claim::Blocked
        } else {
            Claim::Free
        };
        let Some(id) = self.acts.head(key) else {
            return free;
        };
        let Some(m) = self.acts.open.get_mut(&id).and_then(|a| a.member_mut(key)) else {
            return free;
        };
        match m.state {
            MemberState::Waiting => m.state = MemberState::Started,
            MemberState::Started => return Claim::Action(id),
            MemberState::Fetched | MemberState::Done => return free,
        }
        let (pending, fields) = self.acts.take_member_pending(id, key);
        if let Some(p) = pending {
            self.pending_normal(key.clone(), p, fields, now, false);
        }
        Claim::Action(id)
    }

    /// Does the key's current action still need a flight of this key?
    pub(super) fn head_wants_start(&self, key: &EntityKey) -> bool {
        self.acts
            .head(key)
            .and_then(|id| self.acts.open.get(&id))
            .filter(|a| a.running)
            .and_then(|a| a.member(key))
            .is_some_and(|m| matches!(m.state, MemberState::Waiting | MemberState::Started))
    }

    /// `key` left an action's queue: start its next action if that one runs, or schedule its
    /// ordinary pending notes.
    fn after_pop(&mut self, key: EntityKey, now: Tick) {
        if self.head_wants_start(&key) {
            self.try_start_member(key, now);
        } else if let Some(id) = self.keys.find(&key) {
            self.keys.schedule(id);
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
        let id = match self.keys.find(&key) {
            Some(id) => {
                if let Some(entry) = self.keys.get_mut(id) {
                    let state = &mut entry.state;
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
                id
            }
            None => {
                let mut state = KeyState::with_pending(p);
                if let Some(f) = fields {
                    state.set_fields(f);
                }
                self.keys.insert(key, state)
            }
        };
        if schedule {
            self.keys.schedule(id);
        }
    }

    /// An action member fetched (or unchanged): park its flight until the action's write.
    pub(super) fn park(
        &mut self,
        key: &EntityKey,
        id: u64,
        change: Option<Change>,
        validators: Option<Validators>,
        now: Tick,
    ) {
        let Some(kid) = self.keys.find(key) else {
            return;
        };
        self.keys.set_flight_change(kid, change);
        let Some(f) = self.keys.get_mut(kid).and_then(|e| e.state.flight.as_mut()) else {
            return;
        };
        f.phase = Phase::Parked;
        f.validators = validators;
        if let Some(m) = self.acts.open.get_mut(&id).and_then(|a| a.member_mut(key)) {
            m.state = MemberState::Fetched;
        }
        self.maybe_issue_group(id, now);
    }

    /// The flight of `key` serving action `id`, if parked: its id and its change.
    fn parked_flight(&self, key: &EntityKey, id: u64) -> Option<(u64, Option<&Change>)> {
        self.keys
            .state_of(key)
            .and_then(|s| s.flight.as_deref())
            .filter(|f| f.action == Some(id) && f.phase == Phase::Parked)
            .map(|f| (f.id, f.change.as_ref()))
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
            if let Some((flight, Some(change))) = self.parked_flight(key, id) {
                writes.push((key.clone(), flight, change.clone()));
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
            let Some(kid) = self.keys.find(&key) else {
                continue;
            };
            let (refs, fence, fetched_at, inputs) =
                match self.keys.get(kid).and_then(|e| e.state.flight.as_ref()) {
                    Some(f) => (
                        f.batch
                            .notes
                            .iter()
                            .map(|n| n.part)
                            .collect::<Vec<PartRef>>(),
                        self.fence_of(&f.batch.notes),
                        f.fetched_at,
                        self.inputs_of(&f.batch.notes),
                    ),
                    None => continue,
                };
            self.parts.hold(refs);
            if let Some(f) = self.keys.get_mut(kid).and_then(|e| e.state.flight.as_mut()) {
                f.phase = Phase::Writing;
            }
            self.actions.push(Action::Write(WriteJob {
                flight,
                change,
                group: Some(WriteGroup { action: id, size }),
                fence,
                fetched_at,
                inputs,
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
                if let Some(kid) = self.keys.find(&key) {
                    self.finish_success(kid, now);
                }
            }
        }
    }

    fn close_if_done(&mut self, id: u64) {
        let done =
            self.acts.open.get(&id).is_some_and(|a| {
                a.running && a.members.iter().all(|m| m.state == MemberState::Done)
            });
        if done {
            self.acts.remove(id);
            crate::metrics::actions_open(self.acts.open.len());
        }
    }

    /// `key`'s flight for action `id` ended (written, unchanged, dead-lettered or abandoned).
    pub(super) fn action_member_ended(
        &mut self,
        key: &EntityKey,
        id: u64,
        failed: bool,
        now: Tick,
    ) {
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

    fn action_record(
        &self,
        key: &EntityKey,
        p: &Pending,
        notes: &Notes,
        message: &str,
        corr: &str,
        now: Tick,
    ) -> dlq::DeadLetter {
        let coords = self.coordinates(notes);
        let mut record = dlq::for_key(
            key,
            p.max_version,
            &coords,
            &KeyFailure {
                reason: ACTION_REASON,
                message,
                class: ErrorClass::Permanent,
                attempts: 0,
                age: now.since(p.first_at),
            },
        );
        record
            .headers
            .push((CORRELATION_HEADER.to_owned(), corr.to_owned()));
        record
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
                    waiting.push(m.key.clone());
                }
                MemberState::Started | MemberState::Fetched => others.push(m.key.clone()),
                MemberState::Done => {}
            }
        }
        let message = format!("another member of business action {corr} failed");
        for key in waiting {
            let (pending, _) = self.acts.take_member_pending(id, &key);
            self.acts.pop(&key, id);
            if let Some(p) = pending.filter(|p| !p.notes.is_empty()) {
                let record = self.action_record(&key, &p, &p.notes, &message, &corr, now);
                self.issue_dead_letter(record, p.notes);
            }
            self.after_pop(key, now);
        }
        for key in others {
            let kid = self.keys.find(&key);
            let flight = kid
                .and_then(|k| self.keys.get(k))
                .and_then(|e| e.state.flight.as_deref())
                .filter(|f| f.action == Some(id))
                .map(|f| f.phase);
            match (flight, kid) {
                // Its fetch is running: it is dead-lettered when the fetch ends.
                (Some(Phase::Fetching) | Some(Phase::Writing), _) => {}
                (Some(Phase::Parked), Some(kid)) => {
                    self.dead_letter_flight(
                        kid,
                        ACTION_REASON,
                        &message,
                        ErrorClass::Permanent,
                        0,
                        now,
                    );
                }
                _ => {
                    // Between attempts (backoff): its notes wait in the key's pending entry,
                    // maybe with later, unrelated notifications: only the action's go.
                    let only = self
                        .acts
                        .action_notes(id, &key)
                        .cloned()
                        .unwrap_or_default();
                    let pending = kid.and_then(|k| self.keys.get_mut(k)).and_then(|e| {
                        e.state.clear_retry();
                        let mut p = e.state.pending.take()?;
                        let (mine, rest): (Notes, Notes) =
                            p.notes.iter().copied().partition(|n| only.contains(n));
                        if !rest.is_empty() {
                            let mut keep = p.clone();
                            keep.notes = rest;
                            e.state.pending = Some(keep);
                        }
                        p.notes = mine;
                        Some(p)
                    });
                    if let Some(p) = pending.filter(|p| !p.notes.is_empty()) {
                        let mut notes = Notes::new();
                        for n in p.notes.iter() {
                            if n.is_refresh() {
                                self.refresh_done.push((
                                    n.offset as u64,
                                    super::RefreshOutcome::Failed(message.clone()),
                                ));
                            } else {
                                notes.push(*n);
                            }
                        }
                        if !notes.is_empty() {
                            let record = self.action_record(&key, &p, &notes, &message, &corr, now);
                            self.issue_dead_letter(record, notes);
                        }
                    }
                    self.action_member_ended(&key, id, true, now);
                    if let Some(k) = self.keys.find(&key) {
                        self.after_flight(k, now);
                    }
                }
            }
        }
        self.close_if_done(id);
    }

    /// Assignments are going away: actions with notes on them that were not yet written.
    pub(super) fn actions_touching(&self, refs: &[PartRef]) -> Vec<u64> {
        if self.acts.is_empty() {
            return Vec::new();
        }
        let on = |notes: &Notes| notes.iter().any(|n| refs.contains(&n.part));
        self.acts
            .open
            .iter()
            .filter(|(_, a)| !a.write_issued)
            .filter(|(id, a)| {
                a.members.iter().any(|m| {
                    m.pending.as_ref().is_some_and(|p| on(&p.notes))
                        || self.keys.state_of(&m.key).is_some_and(|s| {
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
    pub(super) fn dissolve_action(&mut self, id: u64, now: Tick) {
        self.acts.stop_collecting(id);
        let Some(correlation) = self.acts.open.get(&id).map(|a| a.correlation.clone()) else {
            return;
        };
        // Members still holding their notes hand them back before the action goes.
        let waiting: Vec<EntityKey> = self
            .acts
            .open
            .get(&id)
            .map(|a| {
                a.members
                    .iter()
                    .filter(|m| m.state == MemberState::Waiting)
                    .map(|m| m.key.clone())
                    .collect()
            })
            .unwrap_or_default();
        let mut handed = Vec::new();
        for key in waiting {
            let (p, f) = self.acts.take_member_pending(id, &key);
            handed.push((key, p, f));
        }
        let Some(a) = self.acts.remove(id) else {
            return;
        };
        if self.acts.collecting.get(&correlation) == Some(&id) {
            self.acts.collecting.remove(&correlation);
        }
        self.acts.remember_closed(correlation);
        self.counters.add_action_incomplete();
        crate::metrics::actions_open(self.acts.open.len());
        for (key, p, f) in handed {
            if let Some(p) = p {
                self.pending_normal(key, p, f, now, true);
            }
        }
        for m in a.members {
            self.acts.pop(&m.key, id);
            match m.state {
                MemberState::Waiting | MemberState::Done => {}
                MemberState::Started | MemberState::Fetched => {
                    let kid = self.keys.find(&m.key);
                    let parked = match kid
                        .and_then(|k| self.keys.get_mut(k))
                        .and_then(|e| e.state.flight.as_mut())
                    {
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
                    match (parked, kid) {
                        (Some((true, _, _)), Some(k)) => {
                            self.counters.abandoned += 1;
                            self.keys.take_flight(k);
                            self.after_flight(k, now);
                        }
                        (Some((false, Some(change), validators)), Some(k)) => {
                            self.begin_write(k, change, validators);
                        }
                        (Some((false, None, _)), Some(k)) => self.finish_success(k, now),
                        _ => {}
                    }
                }
            }
            self.after_pop(m.key, now);
        }
    }
}
