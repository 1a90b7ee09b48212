//! The consumer interface: how records, rebalances and commits reach the engine.
//!
//! The engine does not talk to a Kafka client directly. A consumer driver is a pair of channels:
//! it sends [`ConsumerEvent`]s (records, assignments, revokes, losses) and obeys
//! [`ConsumerCommand`]s (commit, pause, resume, close). [`crate::kafka`] implements it on
//! librdkafka (the consumer polled on its own thread, so rebalance callbacks can block it without
//! blocking the engine); [`MemoryConsumer`] implements it in memory so tests can drive the whole
//! runtime, rebalances included, under a paused clock.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

use crate::decode::RecordView;
use crate::engine::TopicPartition;

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
        }
    }
}

/// Offsets to commit, one per partition (the next offset to consume).
pub type Offsets = Vec<(TopicPartition, i64)>;

/// What a consumer driver tells the engine.
#[derive(Debug)]
pub enum ConsumerEvent {
    /// Records, in partition order.
    Records(Vec<OwnedRecord>),
    /// Partitions were assigned (incrementally or in full). Sent even when the list is empty, so
    /// the engine knows it joined the group.
    Assigned(Vec<TopicPartition>),
    /// Partitions are being revoked. The engine drains writes already issued (within its
    /// deadline) and answers with the offsets to commit synchronously before letting go.
    Revoke {
        /// The partitions.
        partitions: Vec<TopicPartition>,
        /// Where the engine answers.
        reply: std::sync::mpsc::SyncSender<Offsets>,
    },
    /// Partitions were lost (session expired, fenced): no drain, no commit.
    Lost(Vec<TopicPartition>),
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
    /// Commit these offsets synchronously and report the result.
    Commit {
        /// The offsets.
        offsets: Offsets,
        /// The result.
        reply: oneshot::Sender<Result<(), String>>,
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

/// The engine's end of a consumer driver.
#[derive(Debug)]
pub struct ConsumerChannels {
    /// Events from the consumer.
    pub events: mpsc::UnboundedReceiver<ConsumerEvent>,
    /// Commands to the consumer.
    pub commands: mpsc::UnboundedSender<ConsumerCommand>,
}

/// Shared state of an in-memory topic set.
#[derive(Debug, Default)]
struct MemoryState {
    partitions: BTreeMap<TopicPartition, Vec<OwnedRecord>>,
    committed: BTreeMap<TopicPartition, i64>,
    commit_log: Vec<(TopicPartition, i64)>,
}

/// In-memory topics and a consumer over them, for tests and examples without a broker.
///
/// Produce records with [`MemoryConsumer::produce`]; the consumer task assigns every partition
/// at start and delivers records from the last committed offset. Tests can revoke, lose and
/// re-assign partitions through [`MemoryControl`].
#[derive(Debug, Clone, Default)]
pub struct MemoryConsumer {
    state: Arc<Mutex<MemoryState>>,
}

/// Rebalance controls of a running in-memory consumer.
#[derive(Debug, Clone)]
pub struct MemoryControl {
    tx: mpsc::UnboundedSender<ControlMsg>,
}

#[derive(Debug)]
enum ControlMsg {
    Revoke(Vec<TopicPartition>, oneshot::Sender<Offsets>),
    Lose(Vec<TopicPartition>),
    Assign(Vec<TopicPartition>),
}

impl MemoryControl {
    /// Revoke partitions (the engine drains and answers with offsets, which are committed).
    pub async fn revoke(&self, tps: Vec<TopicPartition>) -> Offsets {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(ControlMsg::Revoke(tps, tx)).is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Lose partitions (no commit).
    pub fn lose(&self, tps: Vec<TopicPartition>) {
        let _ = self.tx.send(ControlMsg::Lose(tps));
    }

    /// Assign partitions again (delivery restarts from their committed offsets).
    pub fn assign(&self, tps: Vec<TopicPartition>) {
        let _ = self.tx.send(ControlMsg::Assign(tps));
    }
}

impl MemoryConsumer {
    /// Empty topics.
    pub fn new() -> Self {
        Self::default()
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
        let Ok(mut s) = self.state.lock() else {
            return -1;
        };
        let log = s
            .partitions
            .entry(TopicPartition::new(topic, partition))
            .or_default();
        let offset = log.last().map_or(0, |r| r.offset + 1) + gap;
        log.push(OwnedRecord {
            topic: topic.into(),
            partition,
            offset,
            key: key.map(<[u8]>::to_vec),
            payload: Some(payload.to_vec()),
            headers: Vec::new(),
        });
        offset
    }

    /// The next offset after the last record of each partition.
    pub fn end_offsets(&self) -> BTreeMap<TopicPartition, i64> {
        let Ok(s) = self.state.lock() else {
            return BTreeMap::new();
        };
        s.partitions
            .iter()
            .filter_map(|(tp, log)| Some((tp.clone(), log.last()?.offset + 1)))
            .collect()
    }

    /// Committed offsets.
    pub fn committed(&self) -> BTreeMap<TopicPartition, i64> {
        self.state
            .lock()
            .map(|s| s.committed.clone())
            .unwrap_or_default()
    }

    /// Every commit in order.
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
        let state = self.state.clone();
        tokio::spawn(memory_consumer_task(state, ev_tx, cmd_rx, ctl_rx));
        (
            ConsumerChannels {
                events: ev_rx,
                commands: cmd_tx,
            },
            MemoryControl { tx: ctl_tx },
        )
    }
}

async fn memory_consumer_task(
    state: Arc<Mutex<MemoryState>>,
    events: mpsc::UnboundedSender<ConsumerEvent>,
    mut commands: mpsc::UnboundedReceiver<ConsumerCommand>,
    mut control: mpsc::UnboundedReceiver<ControlMsg>,
) {
    // Position per owned partition (next offset to deliver).
    let mut owned: BTreeMap<TopicPartition, i64> = BTreeMap::new();
    let mut paused: BTreeSet<TopicPartition> = BTreeSet::new();
    let all: Vec<TopicPartition> = state
        .lock()
        .map(|s| s.partitions.keys().cloned().collect())
        .unwrap_or_default();
    assign(&state, &events, &mut owned, all);
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(5));
    let mut control_open = true;
    loop {
        tokio::select! {
            cmd = commands.recv() => match cmd {
                None => return,
                Some(ConsumerCommand::Commit { offsets, reply }) => {
                    let r = commit(&state, &owned, &offsets);
                    let _ = reply.send(r);
                }
                Some(ConsumerCommand::Pause(tps)) => paused.extend(tps),
                Some(ConsumerCommand::Resume(tps)) => {
                    for tp in tps { paused.remove(&tp); }
                }
                Some(ConsumerCommand::Close { reply }) => {
                    let _ = reply.send(());
                    return;
                }
            },
            ctl = control.recv(), if control_open => match ctl {
                None => control_open = false,
                Some(ControlMsg::Revoke(tps, done)) => {
                    let (tx, rx) = std::sync::mpsc::sync_channel(1);
                    if events.send(ConsumerEvent::Revoke { partitions: tps.clone(), reply: tx }).is_err() {
                        return;
                    }
                    // The engine answers from its own task; wait without blocking the runtime.
                    let offsets = tokio::task::spawn_blocking(move || rx.recv().unwrap_or_default())
                        .await
                        .unwrap_or_default();
                    let owned_before = owned.clone();
                    let _ = commit(&state, &owned_before, &offsets);
                    for tp in &tps { owned.remove(tp); paused.remove(tp); }
                    let _ = done.send(offsets);
                }
                Some(ControlMsg::Lose(tps)) => {
                    for tp in &tps { owned.remove(tp); paused.remove(tp); }
                    let _ = events.send(ConsumerEvent::Lost(tps));
                }
                Some(ControlMsg::Assign(tps)) => assign(&state, &events, &mut owned, tps),
            },
            _ = tick.tick() => {
                let mut batch = Vec::new();
                if let Ok(s) = state.lock() {
                    for (tp, pos) in owned.iter_mut() {
                        if paused.contains(tp) { continue; }
                        if let Some(log) = s.partitions.get(tp) {
                            let start = log.partition_point(|r| r.offset < *pos);
                            for r in log.iter().skip(start).take(500) {
                                batch.push(r.clone());
                                *pos = r.offset + 1;
                            }
                        }
                    }
                }
                if !batch.is_empty() && events.send(ConsumerEvent::Records(batch)).is_err() {
                    return;
                }
            }
        }
    }
}

fn assign(
    state: &Arc<Mutex<MemoryState>>,
    events: &mpsc::UnboundedSender<ConsumerEvent>,
    owned: &mut BTreeMap<TopicPartition, i64>,
    tps: Vec<TopicPartition>,
) {
    if let Ok(s) = state.lock() {
        for tp in &tps {
            owned.insert(tp.clone(), s.committed.get(tp).copied().unwrap_or(0));
        }
    }
    let _ = events.send(ConsumerEvent::Assigned(tps));
}

fn commit(
    state: &Arc<Mutex<MemoryState>>,
    owned: &BTreeMap<TopicPartition, i64>,
    offsets: &Offsets,
) -> Result<(), String> {
    let mut s = state.lock().map_err(|_| "state poisoned".to_owned())?;
    for (tp, o) in offsets {
        if !owned.contains_key(tp) {
            return Err(format!("partition {tp} is not owned"));
        }
        s.committed.insert(tp.clone(), *o);
        s.commit_log.push((tp.clone(), *o));
    }
    Ok(())
}
