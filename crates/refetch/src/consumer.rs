//! The consumer interface: how records, rebalances and commits reach the engine.
//!
//! The engine does not talk to a Kafka client directly. A consumer driver is a pair of channels:
//! it sends [`ConsumerEvent`]s (records, assignments, revokes, losses, positions) and obeys
//! [`ConsumerCommand`]s (commit, pause, resume, close). [`crate::kafka`] implements it on
//! librdkafka (the consumer polled on its own thread, so rebalance callbacks can block it without
//! blocking the engine); [`MemoryConsumer`] implements it in memory so tests can drive the whole
//! runtime, rebalances included, under a paused clock.
//!
//! Every assignment a driver makes gets a fresh [`Epoch`]; revokes, losses, positions and commits
//! name the [`Assignment`] (partition + epoch) they belong to. A driver must drop a commit whose
//! assignment is no longer current (revoked, lost or replaced) instead of sending it to the
//! broker: the broker accepts commits from a member for partitions it does not own, so a commit
//! queued before a revoke could otherwise move the new owner's committed offset backwards.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::assignment::{Assignment, Epoch, EpochCounter, TopicPartition};
use crate::decode::RecordView;

/// A record owned by the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedRecord {
    /// Topic.
    pub topic: Arc<str>,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Key bytes.
    pub key: Option<Vec<u8>>,
    /// Payload bytes.
    pub payload: Option<Vec<u8>>,
    /// Headers.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// Produce (or log-append) time in milliseconds since the Unix epoch, when known.
    pub timestamp: Option<i64>,
}

impl OwnedRecord {
    /// A borrowed view for decoders.
    pub fn view(&self) -> RecordView<'_> {
        RecordView {
            topic: &self.topic,
            partition: self.partition,
            offset: self.offset,
            key: self.key.as_deref(),
            payload: self.payload.as_deref(),
            headers: &self.headers,
            timestamp: self.timestamp,
        }
    }

    /// Bytes the record holds in memory (counted against the engine's byte cap while queued).
    pub fn size(&self) -> usize {
        64 + self.key.as_ref().map_or(0, Vec::len)
            + self.payload.as_ref().map_or(0, Vec::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
                .sum::<usize>()
    }
}

/// The consumer's group metadata (member id, generation), opaque to the engine: a transactional
/// sink that commits offsets to the group hands it to the broker, which fences a member that is
/// no longer current. The librdkafka driver puts an `rdkafka::consumer::ConsumerGroupMetadata` in
/// it.
#[derive(Clone)]
pub struct GroupMetadata(Arc<dyn std::any::Any + Send + Sync>);

impl GroupMetadata {
    /// Wrap a client's group metadata.
    pub fn new<T: std::any::Any + Send + Sync>(metadata: T) -> Self {
        GroupMetadata(Arc::new(metadata))
    }

    /// The client's group metadata, if it is a `T`.
    pub fn downcast_ref<T: std::any::Any>(&self) -> Option<&T> {
        self.0.downcast_ref::<T>()
    }
}

impl std::fmt::Debug for GroupMetadata {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GroupMetadata(..)")
    }
}

/// Reads the consumer's current group metadata (it changes with every rebalance), from any
/// thread; `None` while the consumer has none (not joined, or closed).
#[derive(Clone)]
pub struct GroupMetadataSource(Arc<dyn Fn() -> Option<GroupMetadata> + Send + Sync>);

impl GroupMetadataSource {
    /// A source that calls `read`.
    pub fn new(read: impl Fn() -> Option<GroupMetadata> + Send + Sync + 'static) -> Self {
        GroupMetadataSource(Arc::new(read))
    }

    /// The metadata now.
    pub fn current(&self) -> Option<GroupMetadata> {
        (self.0)()
    }
}

impl std::fmt::Debug for GroupMetadataSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GroupMetadataSource(..)")
    }
}

/// Offsets to commit (the next offset to consume), each for the assignment it belongs to.
pub type Offsets = Vec<(Assignment, i64)>;

/// Commit metadata per partition (the satisfied ranges above the committed offset, see
/// [`crate::offsets::StoredOffset::encode_ranges`]); partitions not named commit empty metadata.
pub type CommitMetadata = Vec<(TopicPartition, String)>;

/// The largest commit metadata a broker takes by default (`offset.metadata.max.bytes`); a
/// commit with more is refused (`OFFSET_METADATA_TOO_LARGE`).
pub const BROKER_METADATA_MAX_BYTES: usize = 4096;

/// How a commit ended: the offsets that reached the broker (entries whose assignment was no
/// longer current were dropped), or why it failed.
pub type CommitResult = Result<Offsets, String>;

/// What a consumer driver tells the engine.
#[derive(Debug)]
pub enum ConsumerEvent {
    /// Records, in partition order. Their bytes were added to [`ConsumerChannels::queued`].
    Records(Vec<OwnedRecord>),
    /// Partitions were assigned (incrementally or in full), each in a new epoch. Sent even when
    /// the list is empty, so the engine knows it joined the group.
    Assigned(Vec<Assignment>),
    /// Assignments are being revoked. The engine drains writes already issued and answers by
    /// `deadline` with the offsets to commit before letting go; the driver waits for the answer
    /// until shortly after `deadline`, then lets go without committing.
    Revoke {
        /// The assignments.
        assignments: Vec<Assignment>,
        /// Where the engine answers.
        reply: std::sync::mpsc::SyncSender<Offsets>,
        /// When the driver stops waiting (set by the driver, so both sides use one clock).
        deadline: tokio::time::Instant,
    },
    /// What the group had committed for new assignments when they began, with the satisfied
    /// ranges its commit metadata named (sent right after [`ConsumerEvent::Assigned`], before
    /// any of their records; assignments with no commit are left out).
    CommittedRanges(Vec<(Assignment, crate::offsets::StoredOffset)>),
    /// Assignments were lost (session expired, fenced): no drain, no commit.
    Lost(Vec<Assignment>),
    /// The consumer's position (next offset it will deliver) of assignments, sent after records:
    /// past transaction markers it is ahead of the last record delivered.
    Positions(Vec<(Assignment, i64)>),
    /// How many partitions the subscribed topics have in all (from metadata; sent when it is
    /// first known and whenever it changes). A group-wide source budget is split by it.
    PartitionCount(usize),
    /// Where the consumer's group metadata can be read (sent once, before the first
    /// assignment, by drivers that have it).
    GroupMetadata(GroupMetadataSource),
    /// Whether the brokers can be reached changed.
    Broker {
        /// At least one broker answers.
        reachable: bool,
        /// What the client said.
        reason: String,
    },
    /// A client error worth reporting.
    Error {
        /// What happened.
        message: String,
        /// The consumer cannot continue.
        fatal: bool,
    },
}

/// What the engine tells a consumer driver.
#[derive(Debug)]
pub enum ConsumerCommand {
    /// Commit these offsets and report which reached the broker. Entries whose assignment is no
    /// longer current are dropped by the driver.
    Commit {
        /// The offsets.
        offsets: Offsets,
        /// Metadata to commit with them.
        metadata: CommitMetadata,
        /// The result.
        reply: oneshot::Sender<CommitResult>,
    },
    /// Pause fetching these partitions.
    Pause(Vec<TopicPartition>),
    /// Resume fetching these partitions.
    Resume(Vec<TopicPartition>),
    /// Close the consumer (rebalance handlers no longer wait for the engine) and report when done.
    Close {
        /// Done.
        reply: oneshot::Sender<()>,
    },
}

/// Bytes of records a driver sent that the engine has not taken yet. The driver adds a batch's
/// bytes before sending it; the engine subtracts them when it takes the batch.
#[derive(Debug, Clone, Default)]
pub struct QueuedBytes(Arc<AtomicUsize>);

impl QueuedBytes {
    /// A new gauge at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Count the bytes of `records` as queued.
    pub fn add(&self, records: &[OwnedRecord]) {
        let n: usize = records.iter().map(OwnedRecord::size).sum();
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The records were taken by the engine.
    pub fn sub(&self, records: &[OwnedRecord]) {
        let n: usize = records.iter().map(OwnedRecord::size).sum();
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(n))
            });
    }

    /// Bytes queued now.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// The engine's end of a consumer driver.
#[derive(Debug)]
pub struct ConsumerChannels {
    /// Events from the consumer.
    pub events: mpsc::UnboundedReceiver<ConsumerEvent>,
    /// Commands to the consumer.
    pub commands: mpsc::UnboundedSender<ConsumerCommand>,
    /// Bytes of records sent and not yet taken (counted by the engine's byte cap).
    pub queued: QueuedBytes,
}

// ----- in memory ---------------------------------------------------------------------------------

/// One partition's log: records, and the offset the next record gets (past markers).
#[derive(Debug, Default)]
struct Log {
    records: Vec<OwnedRecord>,
    end: i64,
}

/// Shared state of an in-memory topic set: the broker side.
#[derive(Debug, Default)]
struct MemoryState {
    partitions: BTreeMap<TopicPartition, Log>,
    committed: BTreeMap<TopicPartition, i64>,
    /// The metadata committed with each offset (empty when none was given, as a broker keeps it).
    committed_metadata: BTreeMap<TopicPartition, String>,
    commit_log: Vec<(TopicPartition, i64)>,
    /// Records handed to the engine so far (re-deliveries included).
    delivered: u64,
}

/// In-memory topics and a consumer over them, for tests and examples without a broker.
///
/// Produce records with [`MemoryConsumer::produce`]; the consumer task assigns every partition
/// at start and delivers records from the last committed offset. Tests can revoke, lose and
/// re-assign partitions through [`MemoryControl`].
///
/// It is as strict as the real thing where that matters: the broker side accepts any commit it
/// is sent, for partitions owned or not, backwards or not (as a broker does for a member of the
/// current generation), so only the driver's epoch check keeps stale commits out; a revoke waits
/// for the engine's answer only until its deadline and then lets go uncommitted, as the
/// librdkafka driver does.
#[derive(Debug, Clone)]
pub struct MemoryConsumer {
    state: Arc<Mutex<MemoryState>>,
    revoke_timeout: Duration,
}

impl Default for MemoryConsumer {
    fn default() -> Self {
        MemoryConsumer {
            state: Arc::default(),
            revoke_timeout: Duration::from_secs(10),
        }
    }
}

/// Rebalance controls of a running in-memory consumer.
#[derive(Debug, Clone)]
pub struct MemoryControl {
    tx: mpsc::UnboundedSender<ControlMsg>,
}

#[derive(Debug)]
enum ControlMsg {
    /// Revoke: the deadline told to the engine, how long the handler waits for the answer
    /// (normally the same deadline plus a moment), and where to report what was committed.
    Revoke(
        Vec<TopicPartition>,
        Option<Duration>,
        Option<Duration>,
        oneshot::Sender<Vec<(TopicPartition, i64)>>,
    ),
    Paused(oneshot::Sender<Vec<TopicPartition>>),
    Lose(Vec<TopicPartition>),
    Assign(Vec<TopicPartition>),
    /// Commit these offsets at the broker as another member would (no epoch check).
    CommitAsOther(Vec<(TopicPartition, i64)>),
}

impl MemoryControl {
    /// Revoke partitions: the engine drains and answers with offsets, which are committed.
    /// Returns what was committed (nothing when the engine did not answer before the revoke's
    /// deadline).
    pub async fn revoke(&self, tps: Vec<TopicPartition>) -> Vec<(TopicPartition, i64)> {
        self.revoke_within(tps, None).await
    }

    /// Revoke partitions with a deadline of its own (instead of the consumer's revoke timeout).
    pub async fn revoke_within(
        &self,
        tps: Vec<TopicPartition>,
        timeout: Option<Duration>,
    ) -> Vec<(TopicPartition, i64)> {
        let (tx, rx) = oneshot::channel();
        if self
            .tx
            .send(ControlMsg::Revoke(tps, timeout, None, tx))
            .is_err()
        {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// A revoke whose handler gives up after `gives_up` although it told the engine it would
    /// wait `told` (a handler whose deadline and the engine's started at different times). The
    /// partitions are let go uncommitted when it gives up.
    pub async fn revoke_impatient(
        &self,
        tps: Vec<TopicPartition>,
        told: Duration,
        gives_up: Duration,
    ) -> Vec<(TopicPartition, i64)> {
        let (tx, rx) = oneshot::channel();
        if self
            .tx
            .send(ControlMsg::Revoke(tps, Some(told), Some(gives_up), tx))
            .is_err()
        {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// The partitions the consumer has paused now.
    pub async fn paused(&self) -> Vec<TopicPartition> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(ControlMsg::Paused(tx)).is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Lose partitions (no commit).
    pub fn lose(&self, tps: Vec<TopicPartition>) {
        let _ = self.tx.send(ControlMsg::Lose(tps));
    }

    /// Assign partitions again, each in a new epoch (delivery restarts from their committed
    /// offsets).
    pub fn assign(&self, tps: Vec<TopicPartition>) {
        let _ = self.tx.send(ControlMsg::Assign(tps));
    }

    /// Commit offsets as another member of the group would (the new owner after a rebalance).
    pub fn commit_as_other_member(&self, offsets: Vec<(TopicPartition, i64)>) {
        let _ = self.tx.send(ControlMsg::CommitAsOther(offsets));
    }
}

impl MemoryConsumer {
    /// Empty topics.
    pub fn new() -> Self {
        Self::default()
    }

    /// How long a revoke waits for the engine's answer before letting go uncommitted (default
    /// 10 s).
    pub fn with_revoke_timeout(mut self, timeout: Duration) -> Self {
        self.revoke_timeout = timeout;
        self
    }

    /// Create a topic with `partitions` partitions.
    pub fn create_topic(&self, topic: &str, partitions: i32) {
        if let Ok(mut s) = self.state.lock() {
            for p in 0..partitions {
                s.partitions
                    .entry(TopicPartition::new(topic, p))
                    .or_default();
            }
        }
    }

    /// Append a record; offsets may leave gaps (`gap` extra offsets are skipped first, as a
    /// compacted topic or a transaction marker would). Returns the offset.
    pub fn produce(
        &self,
        topic: &str,
        partition: i32,
        key: Option<&[u8]>,
        payload: &[u8],
        gap: i64,
    ) -> i64 {
        self.append(topic, partition, key, payload, gap, None)
    }

    /// Append a record stamped as produced at `timestamp` (milliseconds since the Unix epoch), as
    /// a Kafka producer stamps it. Records appended with [`MemoryConsumer::produce`] carry no
    /// timestamp (the engine then treats them as fresh).
    pub fn produce_at(
        &self,
        topic: &str,
        partition: i32,
        key: Option<&[u8]>,
        payload: &[u8],
        timestamp: i64,
    ) -> i64 {
        self.append(topic, partition, key, payload, 0, Some(timestamp))
    }

    fn append(
        &self,
        topic: &str,
        partition: i32,
        key: Option<&[u8]>,
        payload: &[u8],
        gap: i64,
        timestamp: Option<i64>,
    ) -> i64 {
        let Ok(mut s) = self.state.lock() else {
            return -1;
        };
        let log = s
            .partitions
            .entry(TopicPartition::new(topic, partition))
            .or_default();
        let offset = log.end + gap.max(0);
        log.end = offset + 1;
        log.records.push(OwnedRecord {
            topic: topic.into(),
            partition,
            offset,
            key: key.map(<[u8]>::to_vec),
            payload: Some(payload.to_vec()),
            headers: Vec::new(),
            timestamp,
        });
        offset
    }

    /// Append a transaction marker: it takes an offset but is never delivered.
    pub fn produce_marker(&self, topic: &str, partition: i32) -> i64 {
        let Ok(mut s) = self.state.lock() else {
            return -1;
        };
        let log = s
            .partitions
            .entry(TopicPartition::new(topic, partition))
            .or_default();
        let offset = log.end;
        log.end += 1;
        offset
    }

    /// The next offset after the last record (or marker) of each partition.
    pub fn end_offsets(&self) -> BTreeMap<TopicPartition, i64> {
        let Ok(s) = self.state.lock() else {
            return BTreeMap::new();
        };
        s.partitions
            .iter()
            .filter(|(_, log)| log.end > 0)
            .map(|(tp, log)| (tp.clone(), log.end))
            .collect()
    }

    /// Committed offsets.
    pub fn committed(&self) -> BTreeMap<TopicPartition, i64> {
        self.state
            .lock()
            .map(|s| s.committed.clone())
            .unwrap_or_default()
    }

    /// The metadata committed with each partition's offset (empty for commits without any).
    pub fn committed_metadata(&self) -> BTreeMap<TopicPartition, String> {
        self.state
            .lock()
            .map(|s| s.committed_metadata.clone())
            .unwrap_or_default()
    }

    /// How many records the consumer has handed to the engine so far (re-deliveries after a
    /// rebalance included): what the engine has taken in, counted outside the engine.
    pub fn delivered(&self) -> u64 {
        self.state.lock().map(|s| s.delivered).unwrap_or(0)
    }

    /// Every commit that reached the broker side, in order.
    pub fn commit_log(&self) -> Vec<(TopicPartition, i64)> {
        self.state
            .lock()
            .map(|s| s.commit_log.clone())
            .unwrap_or_default()
    }

    /// Start a consumer task over every partition. Returns the engine's channels and the
    /// rebalance controls.
    pub fn start(&self) -> (ConsumerChannels, MemoryControl) {
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let queued = QueuedBytes::new();
        let driver = MemoryDriver {
            state: self.state.clone(),
            events: ev_tx,
            queued: queued.clone(),
            owned: BTreeMap::new(),
            paused: BTreeSet::new(),
            epochs: EpochCounter::new(),
            revoke_timeout: self.revoke_timeout,
            reported: BTreeMap::new(),
        };
        tokio::spawn(driver.run(cmd_rx, ctl_rx));
        (
            ConsumerChannels {
                events: ev_rx,
                commands: cmd_tx,
                queued,
            },
            MemoryControl { tx: ctl_tx },
        )
    }
}

/// The in-memory driver: the member's side (assignments, epochs, positions, the epoch check on
/// commits) over the shared broker state.
struct MemoryDriver {
    state: Arc<Mutex<MemoryState>>,
    events: mpsc::UnboundedSender<ConsumerEvent>,
    queued: QueuedBytes,
    /// Owned partitions: the assignment's epoch and the position (next offset to deliver).
    owned: BTreeMap<TopicPartition, (Epoch, i64)>,
    paused: BTreeSet<TopicPartition>,
    epochs: EpochCounter,
    revoke_timeout: Duration,
    /// Positions last reported.
    reported: BTreeMap<TopicPartition, i64>,
}

impl MemoryDriver {
    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<ConsumerCommand>,
        mut control: mpsc::UnboundedReceiver<ControlMsg>,
    ) {
        let all: Vec<TopicPartition> = self
            .state
            .lock()
            .map(|s| s.partitions.keys().cloned().collect())
            .unwrap_or_default();
        let total = all.len();
        self.assign(all);
        let _ = self.events.send(ConsumerEvent::PartitionCount(total));
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        let mut control_open = true;
        loop {
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    None => return,
                    Some(ConsumerCommand::Commit { offsets, metadata, reply }) => {
                        let r = self.commit(&offsets, &metadata);
                        let _ = reply.send(r);
                    }
                    Some(ConsumerCommand::Pause(tps)) => self.paused.extend(tps),
                    Some(ConsumerCommand::Resume(tps)) => {
                        for tp in tps { self.paused.remove(&tp); }
                    }
                    Some(ConsumerCommand::Close { reply }) => {
                        let _ = reply.send(());
                        return;
                    }
                },
                ctl = control.recv(), if control_open => match ctl {
                    None => control_open = false,
                    Some(ControlMsg::Revoke(tps, told, gives_up, done)) => {
                        let told = told.unwrap_or(self.revoke_timeout);
                        let gives_up = gives_up.unwrap_or(told + Duration::from_millis(250));
                        let committed = self.revoke(tps, told, gives_up, &mut commands).await;
                        let _ = done.send(committed);
                    }
                    Some(ControlMsg::Paused(reply)) => {
                        let _ = reply.send(self.paused.iter().cloned().collect());
                    }
                    Some(ControlMsg::Lose(tps)) => {
                        let lost: Vec<Assignment> = tps.iter().filter_map(|tp| self.release(tp)).collect();
                        let _ = self.events.send(ConsumerEvent::Lost(lost));
                    }
                    Some(ControlMsg::Assign(tps)) => self.assign(tps),
                    Some(ControlMsg::CommitAsOther(offsets)) => {
                        if let Ok(mut s) = self.state.lock() {
                            for (tp, o) in offsets {
                                s.committed.insert(tp.clone(), o);
                                s.committed_metadata.remove(&tp);
                                s.commit_log.push((tp, o));
                            }
                        }
                    }
                },
                _ = tick.tick() => {
                    if !self.deliver() {
                        return;
                    }
                }
            }
        }
    }

    fn assignment(&self, tp: &TopicPartition) -> Option<Assignment> {
        self.owned
            .get(tp)
            .map(|(e, _)| Assignment::new(tp.clone(), *e))
    }

    fn release(&mut self, tp: &TopicPartition) -> Option<Assignment> {
        let a = self.assignment(tp);
        self.owned.remove(tp);
        self.paused.remove(tp);
        self.reported.remove(tp);
        a
    }

    fn assign(&mut self, tps: Vec<TopicPartition>) {
        let mut out = Vec::new();
        let mut ranges = Vec::new();
        if let Ok(s) = self.state.lock() {
            for tp in tps {
                let epoch = self.epochs.next_epoch();
                let from = s.committed.get(&tp).copied().unwrap_or(0);
                self.owned.insert(tp.clone(), (epoch, from));
                // A new assignment starts unpaused, as a real consumer's does: the engine
                // re-applies its pause state.
                self.paused.remove(&tp);
                let a = Assignment::new(tp, epoch);
                if let Some(&o) = s.committed.get(&a.tp) {
                    let text = s.committed_metadata.get(&a.tp).map_or("", String::as_str);
                    if let Ok(stored) = crate::offsets::StoredOffset::decode(o, text) {
                        ranges.push((a.clone(), stored));
                    }
                }
                out.push(a);
            }
        }
        let _ = self.events.send(ConsumerEvent::Assigned(out));
        if !ranges.is_empty() {
            let _ = self.events.send(ConsumerEvent::CommittedRanges(ranges));
        }
    }

    /// The member's commit: entries whose assignment is not current are dropped (the epoch
    /// check); the broker side accepts the rest, whatever they are.
    /// Commit as a broker does: the offsets of current assignments, each with its metadata
    /// (or none, which clears what was there); metadata over the broker's default limit fails
    /// the commit (`OFFSET_METADATA_TOO_LARGE`).
    fn commit(&self, offsets: &Offsets, metadata: &CommitMetadata) -> CommitResult {
        let current: Offsets = offsets
            .iter()
            .filter(|(a, _)| self.owned.get(&a.tp).is_some_and(|(e, _)| *e == a.epoch))
            .cloned()
            .collect();
        let meta = |tp: &TopicPartition| {
            metadata
                .iter()
                .find(|(t, _)| t == tp)
                .map_or("", |(_, m)| m.as_str())
        };
        if let Some((a, _)) = current
            .iter()
            .find(|(a, _)| meta(&a.tp).len() > BROKER_METADATA_MAX_BYTES)
        {
            return Err(format!(
                "OFFSET_METADATA_TOO_LARGE: {} bytes of metadata for {} (at most {BROKER_METADATA_MAX_BYTES})",
                meta(&a.tp).len(),
                a.tp
            ));
        }
        let mut s = self.state.lock().map_err(|_| "state poisoned".to_owned())?;
        for (a, o) in &current {
            s.committed.insert(a.tp.clone(), *o);
            s.committed_metadata
                .insert(a.tp.clone(), meta(&a.tp).to_owned());
            s.commit_log.push((a.tp.clone(), *o));
        }
        Ok(current)
    }

    async fn revoke(
        &mut self,
        tps: Vec<TopicPartition>,
        told: Duration,
        gives_up: Duration,
        commands: &mut mpsc::UnboundedReceiver<ConsumerCommand>,
    ) -> Vec<(TopicPartition, i64)> {
        let assignments: Vec<Assignment> =
            tps.iter().filter_map(|tp| self.assignment(tp)).collect();
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let started = tokio::time::Instant::now();
        let deadline = started + told;
        if self
            .events
            .send(ConsumerEvent::Revoke {
                assignments: assignments.clone(),
                reply: tx,
                deadline,
            })
            .is_err()
        {
            return Vec::new();
        }
        // Wait for the answer until shortly after the deadline, as the librdkafka driver does.
        // Meanwhile commands are still served in order (a real consumer's commits do not wait
        // for the rebalance handler).
        let give_up = started + gives_up;
        let answer = loop {
            match rx.try_recv() {
                Ok(offsets) => break Some(offsets),
                Err(std::sync::mpsc::TryRecvError::Disconnected) => break None,
                Err(std::sync::mpsc::TryRecvError::Empty) => {}
            }
            if tokio::time::Instant::now() >= give_up {
                break None;
            }
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(ConsumerCommand::Commit { offsets, metadata, reply }) => {
                        let r = self.commit(&offsets, &metadata);
                        let _ = reply.send(r);
                    }
                    Some(ConsumerCommand::Pause(p)) => self.paused.extend(p),
                    Some(ConsumerCommand::Resume(p)) => {
                        for tp in p { self.paused.remove(&tp); }
                    }
                    Some(ConsumerCommand::Close { reply }) => {
                        let _ = reply.send(());
                    }
                    None => {}
                },
                () = tokio::time::sleep(Duration::from_millis(1)) => {}
            }
        };
        let mut committed = Vec::new();
        if let Some(offsets) = answer {
            let revoked: Offsets = offsets
                .into_iter()
                .filter(|(a, _)| assignments.iter().any(|r| r.same(a)))
                .collect();
            if let Ok(r) = self.commit(&revoked, &Vec::new()) {
                committed = r.into_iter().map(|(a, o)| (a.tp, o)).collect();
            }
        }
        for tp in &tps {
            self.release(tp);
        }
        committed
    }

    /// Deliver up to 500 records per partition; then report positions that moved. Returns
    /// `false` when the engine is gone.
    fn deliver(&mut self) -> bool {
        let mut batch = Vec::new();
        let mut positions = Vec::new();
        if let Ok(mut guard) = self.state.lock() {
            let s = &mut *guard;
            for (tp, (epoch, pos)) in self.owned.iter_mut() {
                if self.paused.contains(tp) {
                    continue;
                }
                let Some(log) = s.partitions.get(tp) else {
                    continue;
                };
                let start = log.records.partition_point(|r| r.offset < *pos);
                let mut n = 0;
                for r in log.records.iter().skip(start).take(500) {
                    batch.push(r.clone());
                    *pos = r.offset + 1;
                    n += 1;
                }
                s.delivered += n as u64;
                if start + n == log.records.len() {
                    // Everything delivered: markers after the last record move the position.
                    *pos = (*pos).max(log.end);
                }
                if self.reported.get(tp) != Some(pos) {
                    self.reported.insert(tp.clone(), *pos);
                    positions.push((Assignment::new(tp.clone(), *epoch), *pos));
                }
            }
        }
        if !batch.is_empty() {
            self.queued.add(&batch);
            if self.events.send(ConsumerEvent::Records(batch)).is_err() {
                return false;
            }
        }
        if !positions.is_empty()
            && self
                .events
                .send(ConsumerEvent::Positions(positions))
                .is_err()
        {
            return false;
        }
        true
    }
}
