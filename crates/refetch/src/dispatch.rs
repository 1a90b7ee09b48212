//! Dispatch: runs the engine's fetch, write and dead-letter jobs and reports their completions.
//!
//! - Fetches run as tasks (the engine bounds how many are in flight). Keys of one type are
//!   grouped into batched requests when the fetcher offers them. A job whose notifications are all
//!   versioned first asks the sink which version it holds (after a restart this skips stale
//!   notifications without touching the source).
//! - Writes are gathered into batches (up to `sink_batch_max`, waiting at most `sink_linger`) and
//!   written by up to `sink_concurrency` batches at once. A batch that fails transiently is
//!   retried with backoff without end: a sink that is down never loses or dead-letters data, it
//!   stops commits and, through backpressure, consumption. A batch that fails permanently is split
//!   into single records so only the bad record is rejected.
//! - Dead letters are produced with retries; a permanent failure is reported once (the engine
//!   pauses and fails readiness) and then retried slowly until the topic works again.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures::FutureExt;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::assignment::Fence;
use crate::config::EngineConfig;
use crate::consumer::{CommitResult, Offsets};
use crate::dlq::DeadLetter;
use crate::dlq::DeadLetterFailure;
use crate::engine::{DeadLetterJob, FetchJob, FetchResult, WriteJob, WriteResult};
use crate::fetch::{FetchError, FetchRequest, Fetcher};
use crate::key::EntityKey;
use crate::sink::{Change, Sink, SinkError, WriteContext};

/// How a dead letter ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DeadLetterResult {
    /// The broker acknowledged it.
    Acked,
    /// The topic refuses writes for good (reported once; retries go on slowly).
    Broken(String),
    /// Every assignment it served ended: retries stopped.
    Abandoned,
}

/// A finished job, reported back to the engine's task.
#[derive(Debug)]
pub(crate) enum Completion {
    Fetched {
        key: EntityKey,
        flight: u64,
        result: FetchResult,
    },
    Written(Vec<(EntityKey, u64, WriteResult)>),
    DeadLettered {
        id: u64,
        result: DeadLetterResult,
    },
    Committed {
        sent: Offsets,
        result: CommitResult,
    },
    /// Writes of a transactional sink, each with the transaction it was written in.
    TxnWritten(Vec<(EntityKey, u64, WriteResult, u64)>),
    /// The transaction writer reached a commit: every write before it was reported. It waits
    /// for the answer.
    TxnReady {
        txn: u64,
        /// Something was written in the transaction.
        dirty: bool,
        reply: tokio::sync::oneshot::Sender<crate::txn_writer::TxnGo>,
    },
    /// A transaction ended: committed with these offsets stored, or aborted.
    TxnEnded {
        txn: u64,
        result: Result<
            Vec<(crate::assignment::Assignment, crate::offsets::StoredOffset)>,
            crate::sink::TransactionError,
        >,
    },
    /// The transactional sink failed for good.
    TxnFatal(String),
    /// What the sink stored for new assignments.
    Stored {
        assignments: Vec<crate::assignment::Assignment>,
        result: Result<
            Vec<(
                crate::assignment::TopicPartition,
                crate::offsets::StoredOffset,
            )>,
            SinkError,
        >,
    },
}

/// Where dead letters are written.
#[async_trait]
pub trait DeadLetterWriter: Send + Sync + 'static {
    /// Write one dead letter durably.
    async fn send(&self, record: &DeadLetter) -> Result<(), DeadLetterFailure>;
}

/// Dead letters kept in memory (for tests and embedded use without a dead-letter topic).
#[derive(Debug, Default, Clone)]
pub struct MemoryDeadLetters {
    records: Arc<std::sync::Mutex<Vec<DeadLetter>>>,
}

impl MemoryDeadLetters {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every dead letter written so far.
    pub fn records(&self) -> Vec<DeadLetter> {
        self.records.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

#[async_trait]
impl DeadLetterWriter for MemoryDeadLetters {
    async fn send(&self, record: &DeadLetter) -> Result<(), DeadLetterFailure> {
        self.records
            .lock()
            .map_err(|_| DeadLetterFailure::Permanent("store poisoned".into()))?
            .push(record.clone());
        Ok(())
    }
}

/// The text of a caught panic.
pub(crate) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_owned()
    }
}

/// Runs fetch jobs.
pub(crate) struct FetchDispatcher<F: ?Sized, S: ?Sized> {
    pub fetcher: Arc<F>,
    pub sink: Arc<S>,
    pub done: mpsc::UnboundedSender<Completion>,
    /// Cancelled when the pipeline's run ends: no task outlives it.
    pub stop: CancellationToken,
}

impl<F: Fetcher + ?Sized, S: Sink + ?Sized> FetchDispatcher<F, S> {
    pub fn dispatch(&self, jobs: Vec<FetchJob>) {
        if jobs.is_empty() {
            return;
        }
        // Group by entity type where the fetcher batches.
        let mut singles = Vec::new();
        let mut groups: Vec<(Arc<str>, usize, Vec<FetchJob>)> = Vec::new();
        for job in jobs {
            let t = job.request.key.entity_type_arc().clone();
            let limit = self.fetcher.batch_limit(&t);
            if limit <= 1 {
                singles.push(job);
                continue;
            }
            match groups
                .iter_mut()
                .find(|(gt, lim, g)| *gt == t && g.len() < *lim)
            {
                Some((_, _, g)) => g.push(job),
                None => groups.push((t, limit, vec![job])),
            }
        }
        for job in singles {
            let fetcher = self.fetcher.clone();
            let sink = self.sink.clone();
            let done = self.done.clone();
            let stop = self.stop.clone();
            let span = tracing::debug_span!("flight", key = %job.request.key, flight = job.flight);
            tokio::spawn(tracing::Instrument::instrument(
                async move {
                    let result = tokio::select! {
                        biased;
                        () = stop.cancelled() => return,
                        () = job.fence.ended() => FetchResult::Abandoned,
                        r = fetch_one(&*fetcher, &*sink, &job) => r,
                    };
                    let _ = done.send(Completion::Fetched {
                        key: job.request.key,
                        flight: job.flight,
                        result,
                    });
                },
                span,
            ));
        }
        for (_, _, chunk) in groups {
            let fetcher = self.fetcher.clone();
            let sink = self.sink.clone();
            let done = self.done.clone();
            let stop = self.stop.clone();
            tokio::spawn(async move {
                tokio::select! {
                    biased;
                    () = stop.cancelled() => {}
                    () = fetch_batch(&*fetcher, &*sink, chunk, &done) => {}
                }
            });
        }
    }
}

async fn held_covers<S: Sink + ?Sized>(sink: &S, job: &FetchJob) -> Option<FetchResult> {
    if !job.check_sink_first {
        return None;
    }
    let min = job.request.min_version?;
    match AssertUnwindSafe(sink.held_version(&job.request.key))
        .catch_unwind()
        .await
    {
        Ok(Ok(Some(held))) if held.held_covers(&min) => Some(FetchResult::AlreadyHeld(held)),
        Ok(Ok(_)) => None,
        Ok(Err(e)) => {
            tracing::debug!(key = %job.request.key, error = %e, "held_version failed; fetching");
            None
        }
        Err(p) => {
            tracing::error!(key = %job.request.key, panic = %panic_message(&*p), "sink panicked in held_version; fetching");
            None
        }
    }
}

/// A fetcher call that panicked: a transient error of the key (logged and counted), never a
/// stalled flight.
fn fetch_panicked(key: &EntityKey, p: &(dyn std::any::Any + Send)) -> FetchError {
    let msg = panic_message(p);
    tracing::error!(key = %key, panic = %msg, "fetcher panicked");
    crate::metrics::panicked("fetcher");
    FetchError::transient(format!("fetcher panicked: {msg}"))
}

async fn fetch_one<F: Fetcher + ?Sized, S: Sink + ?Sized>(
    fetcher: &F,
    sink: &S,
    job: &FetchJob,
) -> FetchResult {
    if let Some(r) = held_covers(sink, job).await {
        return r;
    }
    let started = tokio::time::Instant::now();
    let r = match AssertUnwindSafe(fetcher.fetch(&job.request))
        .catch_unwind()
        .await
    {
        Ok(Ok(o)) => FetchResult::Outcome(o),
        Ok(Err(e)) => FetchResult::Error(e),
        Err(p) => FetchResult::Error(fetch_panicked(&job.request.key, &*p)),
    };
    crate::metrics::fetch_latency(started.elapsed());
    r
}

async fn fetch_batch<F: Fetcher + ?Sized, S: Sink + ?Sized>(
    fetcher: &F,
    sink: &S,
    jobs: Vec<FetchJob>,
    done: &mpsc::UnboundedSender<Completion>,
) {
    let mut to_fetch = Vec::with_capacity(jobs.len());
    for job in jobs {
        if !job.fence.is_live() {
            let _ = done.send(Completion::Fetched {
                key: job.request.key,
                flight: job.flight,
                result: FetchResult::Abandoned,
            });
            continue;
        }
        match held_covers(sink, &job).await {
            Some(r) => {
                let _ = done.send(Completion::Fetched {
                    key: job.request.key,
                    flight: job.flight,
                    result: r,
                });
            }
            None => to_fetch.push(job),
        }
    }
    if to_fetch.is_empty() {
        return;
    }
    let requests: Vec<FetchRequest> = to_fetch.iter().map(|j| j.request.clone()).collect();
    let mut fence = Fence::unfenced();
    let mut all_fenced = true;
    for j in &to_fetch {
        all_fenced &= !j.fence.is_unfenced();
        fence.merge(&j.fence);
    }
    let started = tokio::time::Instant::now();
    let fetched = tokio::select! {
        biased;
        // Every job's assignments ended: nobody needs the answer.
        () = fence.ended(), if all_fenced => None,
        r = AssertUnwindSafe(fetcher.fetch_batch(&requests)).catch_unwind() => Some(r),
    };
    crate::metrics::fetch_latency(started.elapsed());
    let (abandoned, mut results) = match fetched {
        None => (true, Vec::new().into_iter()),
        Some(Ok(r)) => (false, r.into_iter()),
        Some(Err(p)) => {
            let e = fetch_panicked(&to_fetch[0].request.key, &*p);
            (false, vec![Err(e); to_fetch.len()].into_iter())
        }
    };
    for job in to_fetch {
        let result = if abandoned {
            FetchResult::Abandoned
        } else {
            match results.next() {
                Some(Ok(o)) => FetchResult::Outcome(o),
                Some(Err(e)) => FetchResult::Error(e),
                None => FetchResult::Error(FetchError::transient(
                    "batch fetch returned fewer results than requests",
                )),
            }
        };
        let _ = done.send(Completion::Fetched {
            key: job.request.key,
            flight: job.flight,
            result,
        });
    }
}

/// The sink writer: where write jobs go, and its batching settings (changeable live).
pub(crate) struct SinkWriter {
    tx: mpsc::UnboundedSender<WriteJob>,
    settings: tokio::sync::watch::Sender<(usize, Duration)>,
    sink_max: usize,
}

impl SinkWriter {
    /// Queue a write.
    pub fn send(&self, job: WriteJob) {
        let _ = self.tx.send(job);
    }

    /// Apply new batching settings (`sink_batch_max`, `sink_linger`) from the next batch on.
    pub fn reconfigure(&self, cfg: &EngineConfig) {
        let _ = self
            .settings
            .send((cfg.sink_batch_max.min(self.sink_max), cfg.sink_linger));
    }
}

/// Start the sink writer task.
pub(crate) fn start_sink_writer<S: Sink + ?Sized>(
    sink: Arc<S>,
    cfg: &EngineConfig,
    done: mpsc::UnboundedSender<Completion>,
    stop: CancellationToken,
) -> SinkWriter {
    let (tx, mut rx) = mpsc::unbounded_channel::<WriteJob>();
    let sink_max = sink.max_batch().max(1);
    let (settings, settings_rx) =
        tokio::sync::watch::channel((cfg.sink_batch_max.min(sink_max), cfg.sink_linger));
    let backoff = cfg.sink_backoff;
    let permits = Arc::new(Semaphore::new(cfg.sink_concurrency));
    tokio::spawn(async move {
        loop {
            let (batch_max, linger) = *settings_rx.borrow();
            let first = tokio::select! {
                biased;
                () = stop.cancelled() => return,
                job = rx.recv() => match job {
                    Some(job) => job,
                    None => return,
                },
            };
            let mut batch = vec![first];
            // Writes of a business action are issued consecutively and go in one batch, even
            // past `batch_max`: this is what makes the action atomic in a transactional sink.
            let mut group_left = group_rest(&batch[0]);
            let until = tokio::time::Instant::now() + linger;
            while batch.len() < batch_max || group_left > 0 {
                let next = if group_left > 0 {
                    rx.recv().await
                } else {
                    match tokio::time::timeout_at(until, rx.recv()).await {
                        Ok(job) => job,
                        Err(_) => break,
                    }
                };
                let Some(job) = next else {
                    break;
                };
                group_left = match group_left {
                    0 => group_rest(&job),
                    n => n - 1,
                };
                batch.push(job);
            }
            let permit = tokio::select! {
                biased;
                () = stop.cancelled() => return,
                p = permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let sink = sink.clone();
            let done = done.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let jobs: Vec<&WriteJob> = batch.iter().collect();
                let results = tokio::select! {
                    biased;
                    () = stop.cancelled() => return,
                    r = write_with_retry(&*sink, &jobs, backoff) => r,
                };
                drop(permit);
                let _ = done.send(Completion::Written(
                    batch
                        .iter()
                        .zip(results)
                        .map(|(j, r)| (j.change.key().clone(), j.flight, r))
                        .collect(),
                ));
            });
        }
    });
    SinkWriter {
        tx,
        settings,
        sink_max,
    }
}

/// How many more writes of `job`'s action group follow it.
pub(crate) fn group_rest(job: &WriteJob) -> usize {
    job.group.map_or(0, |g| g.size.saturating_sub(1))
}

/// Split a batch into units that must stay together: each action group, and every other write
/// on its own.
pub(crate) fn units<'a, 'b>(batch: &'b [&'a WriteJob]) -> Vec<&'b [&'a WriteJob]> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < batch.len() {
        let len = match batch[i].group {
            Some(g) => {
                let n = batch[i..]
                    .iter()
                    .take_while(|j| j.group.is_some_and(|h| h.action == g.action))
                    .count();
                n.max(1)
            }
            None => 1,
        };
        out.push(&batch[i..i + len]);
        i += len;
    }
    out
}

/// A sink call that panicked: a transient failure of the batch, retried like any other.
pub(crate) fn sink_panicked(p: &(dyn std::any::Any + Send)) -> SinkError {
    let msg = panic_message(p);
    tracing::error!(panic = %msg, "sink panicked");
    crate::metrics::panicked("sink");
    SinkError::transient(format!("sink panicked: {msg}"))
}

/// Write a batch, retrying transient failures without end. Before every attempt, writes whose
/// assignments all ended are dropped (reported `Abandoned`): a retry after the assignment ended
/// would be a zombie write. An attempt that has not completed when one of its writes' assignments
/// ends is dropped and retried without the stale writes.
async fn write_with_retry<S: Sink + ?Sized>(
    sink: &S,
    batch: &[&WriteJob],
    backoff: crate::config::Backoff,
) -> Vec<WriteResult> {
    let mut out: Vec<Option<WriteResult>> = vec![None; batch.len()];
    let mut attempt = 0u32;
    loop {
        let mut live: Vec<usize> = Vec::with_capacity(batch.len());
        for (i, slot) in out.iter_mut().enumerate() {
            if slot.is_some() {
                continue;
            }
            if batch[i].fence.is_live() {
                live.push(i);
            } else {
                *slot = Some(WriteResult::Abandoned);
            }
        }
        if live.is_empty() {
            return out
                .into_iter()
                .map(|r| r.unwrap_or(WriteResult::Abandoned))
                .collect();
        }
        attempt += 1;
        let changes: Vec<Change> = live.iter().map(|&i| batch[i].change.clone()).collect();
        let fetched_at: Vec<SystemTime> = live.iter().map(|&i| batch[i].fetched_at).collect();
        let mut fence = Fence::unfenced();
        let mut any_fenced = false;
        for &i in &live {
            any_fenced |= !batch[i].fence.is_unfenced();
            fence.merge(&batch[i].fence);
        }
        let inputs: Vec<&[crate::dlq::Coordinate]> =
            live.iter().map(|&i| batch[i].inputs.as_slice()).collect();
        let ctx = WriteContext::new(&fetched_at).with_inputs(&inputs);
        let started = tokio::time::Instant::now();
        let r = tokio::select! {
            biased;
            () = fence.any_ended(), if any_fenced => {
                tracing::warn!(size = changes.len(),
                    "an assignment of this batch ended while its write was pending: dropping the attempt and retrying the live writes");
                continue;
            }
            r = AssertUnwindSafe(sink.write_with(&changes, &ctx)).catch_unwind() => match r {
                Ok(r) => r,
                Err(p) => Err(sink_panicked(&*p)),
            },
        };
        crate::metrics::sink_batch(started.elapsed(), changes.len());
        match r {
            Ok(report) => {
                for &i in &live {
                    out[i] = Some(WriteResult::Durable);
                }
                for (j, e) in report.failed {
                    if let Some(&i) = live.get(j) {
                        out[i] = Some(WriteResult::Failed(e));
                    }
                }
                return out
                    .into_iter()
                    .map(|r| r.unwrap_or(WriteResult::Abandoned))
                    .collect();
            }
            Err(SinkError::Permanent { message }) => {
                let jobs: Vec<&WriteJob> = live.iter().map(|&i| batch[i]).collect();
                if jobs.len() == 1 {
                    out[live[0]] = Some(WriteResult::Failed(SinkError::Permanent { message }));
                } else {
                    tracing::warn!(error = %message, size = jobs.len(),
                        "sink refused a batch permanently; writing its records one by one");
                    // An action group is retried as a unit first; a group that fails on its own
                    // is split so only the bad record is rejected.
                    let parts = units(&jobs);
                    let parts: Vec<&[&WriteJob]> = if parts.len() > 1 {
                        parts
                    } else {
                        jobs.chunks(1).collect()
                    };
                    let mut results = Vec::with_capacity(jobs.len());
                    for part in parts {
                        let r = Box::pin(write_with_retry(sink, part, backoff)).await;
                        results.extend(r);
                    }
                    for (&i, r) in live.iter().zip(results) {
                        out[i] = Some(r);
                    }
                }
                return out
                    .into_iter()
                    .map(|r| r.unwrap_or(WriteResult::Abandoned))
                    .collect();
            }
            Err(e @ SinkError::Transient { .. }) => {
                let delay = backoff.delay(attempt, e.class().retry_after(), jitter(attempt));
                if attempt == 1 || attempt % 10 == 0 {
                    tracing::warn!(error = %e, attempt, delay_ms = delay.as_millis() as u64,
                        "sink unavailable; retrying the batch (nothing is committed meanwhile)");
                }
                // The wait ends early when an assignment ends: its writes are dropped then.
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = fence.any_ended(), if any_fenced => {}
                }
            }
        }
    }
}

pub(crate) fn jitter(seed: u32) -> f64 {
    let x = (u64::from(seed) ^ 0x5DEE_CE66D).wrapping_mul(0x2545_F491_4F6C_DD1D);
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// Produce one dead letter with retries; reports `Acked` on acknowledgement, `Broken` once when
/// the topic refuses writes for good (retrying slowly afterwards), and `Abandoned` when every
/// assignment it serves ended.
pub(crate) fn dispatch_dead_letter(
    writer: Arc<dyn DeadLetterWriter>,
    job: DeadLetterJob,
    done: mpsc::UnboundedSender<Completion>,
    stop: CancellationToken,
) {
    tokio::spawn(async move {
        let DeadLetterJob { id, record, fence } = job;
        let mut record = record;
        let mut attempt = 0u32;
        let mut reported_broken = false;
        let mut max_payload = 512 * 1024;
        let report = |result| {
            let _ = done.send(Completion::DeadLettered { id, result });
        };
        loop {
            if stop.is_cancelled() {
                return;
            }
            if !fence.is_live() {
                report(DeadLetterResult::Abandoned);
                return;
            }
            attempt += 1;
            let sent = tokio::select! {
                biased;
                () = stop.cancelled() => return,
                r = AssertUnwindSafe(writer.send(&record)).catch_unwind() => r,
            };
            let wait = match sent {
                Ok(Ok(())) => {
                    report(DeadLetterResult::Acked);
                    return;
                }
                Ok(Err(DeadLetterFailure::TooLarge(msg))) => {
                    // Key, headers and payload together must fit; each round halves the limit
                    // (never below 1 KiB) and waits a moment, so it never spins.
                    tracing::warn!(error = %msg, max = max_payload, "dead letter too large; truncating it to fit");
                    record.fit(max_payload);
                    max_payload = (max_payload / 2).max(1024);
                    Duration::from_millis(50)
                }
                Ok(Err(DeadLetterFailure::Permanent(msg))) => {
                    if !reported_broken {
                        reported_broken = true;
                        report(DeadLetterResult::Broken(msg));
                    }
                    Duration::from_secs(5)
                }
                Ok(Err(DeadLetterFailure::Transient(msg))) => {
                    tracing::warn!(error = %msg, attempt, "dead letter not acknowledged; retrying");
                    Duration::from_millis(200u64.saturating_mul(1 << attempt.min(6)))
                }
                Err(p) => {
                    let msg = panic_message(&*p);
                    tracing::error!(panic = %msg, "dead-letter writer panicked; retrying");
                    Duration::from_millis(200u64.saturating_mul(1 << attempt.min(6)))
                }
            };
            tokio::select! {
                biased;
                () = stop.cancelled() => return,
                () = fence.ended(), if !fence.is_unfenced() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::WriteGroup;
    use crate::key::EntityKey;

    fn job(flight: u64, group: Option<(u64, usize)>) -> WriteJob {
        WriteJob {
            flight,
            change: Change::Delete {
                key: EntityKey::new("c", flight.to_string()),
            },
            group: group.map(|(action, size)| WriteGroup { action, size }),
            fence: Fence::unfenced(),
            fetched_at: SystemTime::UNIX_EPOCH,
            inputs: Vec::new(),
        }
    }

    #[test]
    fn an_action_group_is_one_unit_and_other_writes_stand_alone() {
        let batch = [
            job(1, None),
            job(2, Some((7, 3))),
            job(3, Some((7, 3))),
            job(4, Some((7, 3))),
            job(5, Some((8, 1))),
            job(6, None),
        ];
        let refs: Vec<&WriteJob> = batch.iter().collect();
        let sizes: Vec<usize> = units(&refs).iter().map(|u| u.len()).collect();
        assert_eq!(sizes, vec![1, 3, 1, 1]);
        assert_eq!(
            group_rest(&batch[1]),
            2,
            "two more writes of the group follow"
        );
        assert_eq!(group_rest(&batch[0]), 0);
    }

    /// A sink that refuses any batch holding `bad` permanently (as a constraint violation in a
    /// transaction would), and records the batches it accepted.
    #[derive(Default)]
    struct Refusing {
        accepted: std::sync::Mutex<Vec<Vec<u64>>>,
    }

    #[async_trait]
    impl Sink for Refusing {
        async fn write(&self, batch: &[Change]) -> Result<crate::sink::WriteReport, SinkError> {
            let ids: Vec<u64> = batch
                .iter()
                .filter_map(|c| c.key().id().parse().ok())
                .collect();
            if ids.contains(&6) {
                return Err(SinkError::permanent("constraint violated"));
            }
            if let Ok(mut a) = self.accepted.lock() {
                a.push(ids);
            }
            Ok(crate::sink::WriteReport::default())
        }
    }

    #[tokio::test]
    async fn a_refused_batch_is_retried_by_units_keeping_the_action_together() {
        let sink = Refusing::default();
        let batch = [
            job(1, None),
            job(2, Some((7, 3))),
            job(3, Some((7, 3))),
            job(4, Some((7, 3))),
            job(6, None),
        ];
        let backoff = crate::config::Backoff {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(1),
            multiplier: 1.0,
        };
        let refs: Vec<&WriteJob> = batch.iter().collect();
        let results = write_with_retry(&sink, &refs, backoff).await;
        assert!(matches!(results[4], WriteResult::Failed(_)));
        assert!(
            results[..4]
                .iter()
                .all(|r| matches!(r, WriteResult::Durable))
        );
        let accepted = sink.accepted.lock().map(|a| a.clone()).unwrap_or_default();
        assert_eq!(accepted, vec![vec![1], vec![2, 3, 4]]);
    }
}
