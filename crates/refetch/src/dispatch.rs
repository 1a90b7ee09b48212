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

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Semaphore, mpsc};

use crate::config::EngineConfig;
use crate::dlq::DeadLetter;
use crate::dlq::DeadLetterFailure;
use crate::engine::{DeadLetterJob, FetchJob, FetchResult, TopicPartition, WriteJob, WriteResult};
use crate::fetch::{FetchRequest, Fetcher};
use crate::key::EntityKey;
use crate::sink::{Change, Sink, SinkError};

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
        result: Result<(), String>,
    },
    Committed {
        offsets: Vec<(TopicPartition, u32, i64)>,
        result: Result<(), String>,
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

/// Runs fetch jobs.
pub(crate) struct FetchDispatcher<F: ?Sized, S: ?Sized> {
    pub fetcher: Arc<F>,
    pub sink: Arc<S>,
    pub done: mpsc::UnboundedSender<Completion>,
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
            let span = tracing::debug_span!("flight", key = %job.request.key, flight = job.flight);
            tokio::spawn(tracing::Instrument::instrument(
                async move {
                    let result = fetch_one(&*fetcher, &*sink, &job).await;
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
            {
                let fetcher = self.fetcher.clone();
                let sink = self.sink.clone();
                let done = self.done.clone();
                tokio::spawn(async move {
                    fetch_batch(&*fetcher, &*sink, chunk, &done).await;
                });
            }
        }
    }
}

async fn held_covers<S: Sink + ?Sized>(sink: &S, job: &FetchJob) -> Option<FetchResult> {
    if !job.check_sink_first {
        return None;
    }
    let min = job.request.min_version?;
    match sink.held_version(&job.request.key).await {
        Ok(Some(held)) if held.held_covers(&min) => Some(FetchResult::AlreadyHeld(held)),
        Ok(_) => None,
        Err(e) => {
            tracing::debug!(key = %job.request.key, error = %e, "held_version failed; fetching");
            None
        }
    }
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
    let r = match fetcher.fetch(&job.request).await {
        Ok(o) => FetchResult::Outcome(o),
        Err(e) => FetchResult::Error(e),
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
    let started = tokio::time::Instant::now();
    let mut results = fetcher.fetch_batch(&requests).await.into_iter();
    crate::metrics::fetch_latency(started.elapsed());
    for job in to_fetch {
        let result = match results.next() {
            Some(Ok(o)) => FetchResult::Outcome(o),
            Some(Err(e)) => FetchResult::Error(e),
            None => FetchResult::Error(crate::fetch::FetchError::transient(
                "batch fetch returned fewer results than requests",
            )),
        };
        let _ = done.send(Completion::Fetched {
            key: job.request.key,
            flight: job.flight,
            result,
        });
    }
}

/// Start the sink writer task. Returns the channel write jobs go to.
pub(crate) fn start_sink_writer<S: Sink + ?Sized>(
    sink: Arc<S>,
    cfg: &EngineConfig,
    done: mpsc::UnboundedSender<Completion>,
) -> mpsc::UnboundedSender<WriteJob> {
    let (tx, mut rx) = mpsc::unbounded_channel::<WriteJob>();
    let batch_max = cfg.sink_batch_max.min(sink.max_batch().max(1));
    let linger = cfg.sink_linger;
    let backoff = cfg.sink_backoff;
    let permits = Arc::new(Semaphore::new(cfg.sink_concurrency));
    tokio::spawn(async move {
        loop {
            let Some(first) = rx.recv().await else {
                return;
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
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let sink = sink.clone();
            let done = done.clone();
            tokio::spawn(async move {
                let results = write_with_retry(&*sink, &batch, backoff).await;
                drop(permit);
                let _ = done.send(Completion::Written(
                    batch
                        .into_iter()
                        .zip(results)
                        .map(|(j, r)| (j.change.key().clone(), j.flight, r))
                        .collect(),
                ));
            });
        }
    });
    tx
}

/// How many more writes of `job`'s action group follow it.
fn group_rest(job: &WriteJob) -> usize {
    job.group.map_or(0, |g| g.size.saturating_sub(1))
}

/// Split a batch into units that must stay together: each action group, and every other write
/// on its own.
fn units(batch: &[WriteJob]) -> Vec<&[WriteJob]> {
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

async fn write_with_retry<S: Sink + ?Sized>(
    sink: &S,
    batch: &[WriteJob],
    backoff: crate::config::Backoff,
) -> Vec<WriteResult> {
    let changes: Vec<Change> = batch.iter().map(|j| j.change.clone()).collect();
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let started = tokio::time::Instant::now();
        let r = sink.write(&changes).await;
        crate::metrics::sink_batch(started.elapsed(), changes.len());
        match r {
            Ok(report) => {
                let mut out: Vec<WriteResult> = vec![WriteResult::Durable; changes.len()];
                for (i, e) in report.failed {
                    if let Some(slot) = out.get_mut(i) {
                        *slot = WriteResult::Failed(e);
                    }
                }
                return out;
            }
            Err(SinkError::Permanent { message }) => {
                if changes.len() == 1 {
                    return vec![WriteResult::Failed(SinkError::Permanent { message })];
                }
                tracing::warn!(error = %message, size = changes.len(),
                    "sink refused a batch permanently; writing its records one by one");
                // An action group is retried as a unit first; a group that fails on its own is
                // split so only the bad record is rejected.
                let parts = units(batch);
                let parts: Vec<&[WriteJob]> = if parts.len() > 1 {
                    parts
                } else {
                    batch.iter().map(std::slice::from_ref).collect()
                };
                let mut out = Vec::with_capacity(batch.len());
                for part in parts {
                    let r = Box::pin(write_with_retry(sink, part, backoff)).await;
                    out.extend(r);
                }
                return out;
            }
            Err(e @ SinkError::Transient { .. }) => {
                let delay = backoff.delay(attempt, e.class().retry_after(), jitter(attempt));
                if attempt == 1 || attempt % 10 == 0 {
                    tracing::warn!(error = %e, attempt, delay_ms = delay.as_millis() as u64,
                        "sink unavailable; retrying the batch (nothing is committed meanwhile)");
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

fn jitter(seed: u32) -> f64 {
    let x = (u64::from(seed) ^ 0x5DEE_CE66D).wrapping_mul(0x2545_F491_4F6C_DD1D);
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// Produce one dead letter with retries; reports `Ok` on acknowledgement and `Err` once when the
/// topic refuses writes for good (retrying slowly afterwards).
pub(crate) fn dispatch_dead_letter(
    writer: Arc<dyn DeadLetterWriter>,
    job: DeadLetterJob,
    done: mpsc::UnboundedSender<Completion>,
) {
    tokio::spawn(async move {
        let mut record = job.record;
        let mut attempt = 0u32;
        let mut reported_broken = false;
        let mut max_payload = 512 * 1024;
        loop {
            attempt += 1;
            match writer.send(&record).await {
                Ok(()) => {
                    let _ = done.send(Completion::DeadLettered {
                        id: job.id,
                        result: Ok(()),
                    });
                    return;
                }
                Err(DeadLetterFailure::TooLarge(msg)) => {
                    tracing::warn!(error = %msg, max_payload, "dead letter too large; truncating");
                    record.truncate(max_payload);
                    max_payload = (max_payload / 4).max(1024);
                    continue;
                }
                Err(DeadLetterFailure::Permanent(msg)) => {
                    if !reported_broken {
                        reported_broken = true;
                        let _ = done.send(Completion::DeadLettered {
                            id: job.id,
                            result: Err(msg),
                        });
                    }
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
                Err(DeadLetterFailure::Transient(msg)) => {
                    let delay = Duration::from_millis(200u64.saturating_mul(1 << attempt.min(6)));
                    tracing::warn!(error = %msg, attempt, "dead letter not acknowledged; retrying");
                    tokio::time::sleep(delay).await;
                }
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
        }
    }

    #[test]
    fn an_action_group_is_one_unit_and_other_writes_stand_alone() {
        let batch = vec![
            job(1, None),
            job(2, Some((7, 3))),
            job(3, Some((7, 3))),
            job(4, Some((7, 3))),
            job(5, Some((8, 1))),
            job(6, None),
        ];
        let sizes: Vec<usize> = units(&batch).iter().map(|u| u.len()).collect();
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
        let batch = vec![
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
        let results = write_with_retry(&sink, &batch, backoff).await;
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
