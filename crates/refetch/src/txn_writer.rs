//! The writer of a transactional sink (exactly-once delivery).
//!
//! One task calls the sink, one thing at a time, in the order the engine asked: write batches
//! (gathered like the at-least-once writer's, up to `sink_batch_max` within `sink_linger`),
//! commits and aborts. So a commit never overlaps a write, every write is in exactly one
//! transaction, and transactions are numbered the same way here and in the engine: the count of
//! commits and aborts so far.
//!
//! - Every write result is reported with the transaction it was written in.
//! - A write that fails ends the open transaction: the writer aborts it, reports the abort (the
//!   engine fetches again what the transaction's writes satisfied), and retries the batch in the
//!   next transaction (transient failures with backoff, without end; a permanent failure is
//!   split into units as in the at-least-once writer). An attempt dropped because an assignment
//!   ended mid-write aborts too: what it wrote is unknown.
//! - A commit waits until every write before it is reported, then asks the pipeline what to
//!   store ([`TxnGo`]): the engine's plan then matches the transaction's writes exactly.
//! - A sink that fails for good (a fenced producer) stops the writer and the pipeline.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::FutureExt;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::assignment::{Assignment, Fence};
use crate::config::{Backoff, EngineConfig};
use crate::consumer::GroupMetadata;
use crate::dispatch::{Completion, group_rest, jitter, panic_message, sink_panicked, units};
use crate::dlq::Coordinate;
use crate::engine::{WriteJob, WriteResult};
use crate::offsets::StoredOffset;
use crate::sink::{Change, Sink, SinkError, TransactionCommit, TransactionError, WriteContext};

/// What the transaction writer is asked to do.
// Writes are the common command; boxing them would cost an allocation per write.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub(crate) enum TxnCommand {
    /// Write in the open transaction.
    Write(WriteJob),
    /// Commit the open transaction (after every write before this command).
    Commit,
    /// Abort the open transaction.
    Abort,
}

/// The pipeline's answer when the writer reached a commit.
#[derive(Debug)]
pub(crate) enum TxnGo {
    /// Commit, storing these offsets.
    Commit {
        offsets: Vec<(Assignment, StoredOffset)>,
        group_metadata: Option<GroupMetadata>,
    },
    /// Not now (what to store does not fit the sink yet); the transaction stays open.
    Postpone,
    /// Abort instead.
    Abort(String),
}

/// Where the engine's writes and transaction requests go.
pub(crate) struct TxnWriter {
    tx: mpsc::UnboundedSender<TxnCommand>,
    settings: tokio::sync::watch::Sender<(usize, Duration)>,
    sink_max: usize,
}

impl TxnWriter {
    /// Queue a write.
    pub fn send(&self, job: WriteJob) {
        let _ = self.tx.send(TxnCommand::Write(job));
    }

    /// Commit the open transaction after the writes queued so far.
    pub fn commit(&self) {
        let _ = self.tx.send(TxnCommand::Commit);
    }

    /// Abort the open transaction after the writes queued so far.
    pub fn abort(&self) {
        let _ = self.tx.send(TxnCommand::Abort);
    }

    /// Apply new batching settings (`sink_batch_max`, `sink_linger`) from the next batch on.
    pub fn reconfigure(&self, cfg: &EngineConfig) {
        let _ = self
            .settings
            .send((cfg.sink_batch_max.min(self.sink_max), cfg.sink_linger));
    }
}

/// Start the transaction writer for `group_id`.
pub(crate) fn start_txn_writer<S: Sink + ?Sized>(
    sink: Arc<S>,
    cfg: &EngineConfig,
    group_id: String,
    done: mpsc::UnboundedSender<Completion>,
    stop: CancellationToken,
) -> TxnWriter {
    let (tx, rx) = mpsc::unbounded_channel::<TxnCommand>();
    let sink_max = sink.max_batch().max(1);
    let (settings, settings_rx) =
        tokio::sync::watch::channel((cfg.sink_batch_max.min(sink_max), cfg.sink_linger));
    let w = Writer {
        sink,
        group_id,
        backoff: cfg.sink_backoff,
        done,
        txn: 0,
        dirty: false,
    };
    tokio::spawn(async move {
        tokio::select! {
            biased;
            () = stop.cancelled() => {}
            () = w.run(rx, settings_rx) => {}
        }
    });
    TxnWriter {
        tx,
        settings,
        sink_max,
    }
}

/// The sink failed for good: the writer stops.
struct Fatal(String);

struct Writer<S: ?Sized> {
    sink: Arc<S>,
    group_id: String,
    backoff: Backoff,
    done: mpsc::UnboundedSender<Completion>,
    /// The open transaction.
    txn: u64,
    /// Something was written in the open transaction.
    dirty: bool,
}

impl<S: Sink + ?Sized> Writer<S> {
    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<TxnCommand>,
        settings: tokio::sync::watch::Receiver<(usize, Duration)>,
    ) {
        let mut next: Option<TxnCommand> = None;
        loop {
            let cmd = match next.take() {
                Some(c) => c,
                None => match rx.recv().await {
                    Some(c) => c,
                    None => return,
                },
            };
            let r = match cmd {
                TxnCommand::Write(first) => {
                    let (batch_max, linger) = *settings.borrow();
                    let mut batch = vec![first];
                    let mut group_left = group_rest(&batch[0]);
                    let until = tokio::time::Instant::now() + linger;
                    while batch.len() < batch_max || group_left > 0 {
                        let got = if group_left > 0 {
                            rx.recv().await
                        } else {
                            match tokio::time::timeout_at(until, rx.recv()).await {
                                Ok(c) => c,
                                Err(_) => break,
                            }
                        };
                        match got {
                            Some(TxnCommand::Write(job)) => {
                                group_left = match group_left {
                                    0 => group_rest(&job),
                                    n => n - 1,
                                };
                                batch.push(job);
                            }
                            Some(other) => {
                                next = Some(other);
                                break;
                            }
                            None => break,
                        }
                    }
                    let jobs: Vec<&WriteJob> = batch.iter().collect();
                    match Box::pin(self.write(&jobs)).await {
                        Ok(results) => {
                            let _ = self.done.send(Completion::TxnWritten(
                                batch
                                    .iter()
                                    .zip(results)
                                    .map(|(j, (r, t))| (j.change.key().clone(), j.flight, r, t))
                                    .collect(),
                            ));
                            Ok(())
                        }
                        Err(f) => Err(f),
                    }
                }
                TxnCommand::Commit => self.commit().await,
                TxnCommand::Abort => self.abort("asked by the engine").await,
            };
            if let Err(Fatal(message)) = r {
                tracing::error!(error = %message, "transactional sink failed for good: stopping");
                let _ = self.done.send(Completion::TxnFatal(message));
                return;
            }
        }
    }

    /// Abort the open transaction and report it.
    async fn abort(&mut self, why: &str) -> Result<(), Fatal> {
        let r = match AssertUnwindSafe(self.sink.abort_transaction())
            .catch_unwind()
            .await
        {
            Ok(r) => r,
            Err(p) => Err(TransactionError::fatal(format!(
                "sink panicked in abort_transaction: {}",
                panic_message(&*p)
            ))),
        };
        if let Err(TransactionError::Fatal { message }) = r {
            return Err(Fatal(message));
        }
        if let Err(TransactionError::Aborted { message }) = &r {
            tracing::warn!(error = %message, "aborting the transaction failed; it is rolled back by the target");
        }
        tracing::info!(txn = self.txn, reason = why, "transaction aborted");
        let _ = self.done.send(Completion::TxnEnded {
            txn: self.txn,
            result: Err(TransactionError::aborted(why)),
        });
        self.txn += 1;
        self.dirty = false;
        Ok(())
    }

    async fn commit(&mut self) -> Result<(), Fatal> {
        let (tx, rx) = oneshot::channel();
        if self
            .done
            .send(Completion::TxnReady {
                txn: self.txn,
                dirty: self.dirty,
                reply: tx,
            })
            .is_err()
        {
            return Ok(());
        }
        let (offsets, group_metadata) = match rx.await {
            Ok(TxnGo::Commit {
                offsets,
                group_metadata,
            }) => (offsets, group_metadata),
            Ok(TxnGo::Postpone) | Err(_) => return Ok(()),
            Ok(TxnGo::Abort(why)) => return self.abort(&why).await,
        };
        let commit = TransactionCommit::new(&self.group_id, &offsets)
            .with_group_metadata(group_metadata.as_ref());
        let r = match AssertUnwindSafe(self.sink.commit_transaction(&commit))
            .catch_unwind()
            .await
        {
            Ok(r) => r,
            Err(p) => Err(TransactionError::aborted(format!(
                "sink panicked in commit_transaction: {}",
                panic_message(&*p)
            ))),
        };
        match r {
            Ok(()) => {
                tracing::debug!(
                    txn = self.txn,
                    partitions = offsets.len(),
                    "transaction committed"
                );
                let _ = self.done.send(Completion::TxnEnded {
                    txn: self.txn,
                    result: Ok(offsets),
                });
                self.txn += 1;
                self.dirty = false;
                Ok(())
            }
            Err(TransactionError::Fatal { message }) => Err(Fatal(message)),
            Err(TransactionError::Aborted { message }) => {
                tracing::warn!(txn = self.txn, error = %message, "transaction did not commit");
                self.abort(&format!("commit failed: {message}")).await
            }
        }
    }

    /// Write a batch in the open transaction, retrying as the at-least-once writer does; every
    /// failure aborts the transaction first. Each result comes with the transaction it is in.
    async fn write(&mut self, batch: &[&WriteJob]) -> Result<Vec<(WriteResult, u64)>, Fatal> {
        let mut out: Vec<Option<(WriteResult, u64)>> = vec![None; batch.len()];
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
                    *slot = Some((WriteResult::Abandoned, self.txn));
                }
            }
            if live.is_empty() {
                return Ok(finish(out, self.txn));
            }
            attempt += 1;
            let changes: Vec<Change> = live.iter().map(|&i| batch[i].change.clone()).collect();
            let fetched_at: Vec<SystemTime> = live.iter().map(|&i| batch[i].fetched_at).collect();
            let inputs: Vec<&[Coordinate]> =
                live.iter().map(|&i| batch[i].inputs.as_slice()).collect();
            let mut fence = Fence::unfenced();
            let mut any_fenced = false;
            for &i in &live {
                any_fenced |= !batch[i].fence.is_unfenced();
                fence.merge(&batch[i].fence);
            }
            let ctx = WriteContext::new(&fetched_at).with_inputs(&inputs);
            let started = tokio::time::Instant::now();
            self.dirty = true;
            let r = tokio::select! {
                biased;
                () = fence.any_ended(), if any_fenced => None,
                r = AssertUnwindSafe(self.sink.write_with(&changes, &ctx)).catch_unwind() => Some(match r {
                    Ok(r) => r,
                    Err(p) => Err(sink_panicked(&*p)),
                }),
            };
            let Some(r) = r else {
                tracing::warn!(
                    size = changes.len(),
                    "an assignment of this batch ended while its write was pending: aborting the transaction and retrying the live writes"
                );
                self.abort("an assignment ended during a write").await?;
                continue;
            };
            crate::metrics::sink_batch(started.elapsed(), changes.len());
            match r {
                Ok(report) => {
                    for &i in &live {
                        out[i] = Some((WriteResult::Durable, self.txn));
                    }
                    for (j, e) in report.failed {
                        if let Some(&i) = live.get(j) {
                            out[i] = Some((WriteResult::Failed(e), self.txn));
                        }
                    }
                    return Ok(finish(out, self.txn));
                }
                Err(e) => {
                    self.abort(&format!("a write failed: {e}")).await?;
                    match e {
                        SinkError::Permanent { message } => {
                            let jobs: Vec<&WriteJob> = live.iter().map(|&i| batch[i]).collect();
                            if jobs.len() == 1 {
                                out[live[0]] = Some((
                                    WriteResult::Failed(SinkError::Permanent { message }),
                                    self.txn,
                                ));
                                return Ok(finish(out, self.txn));
                            }
                            tracing::warn!(error = %message, size = jobs.len(),
                                "sink refused a batch permanently; writing its records one unit at a time");
                            let parts = units(&jobs);
                            let parts: Vec<&[&WriteJob]> = if parts.len() > 1 {
                                parts
                            } else {
                                jobs.chunks(1).collect()
                            };
                            let mut results = Vec::with_capacity(jobs.len());
                            for part in parts {
                                let r = Box::pin(self.write(part)).await?;
                                results.extend(r);
                            }
                            for (&i, r) in live.iter().zip(results) {
                                out[i] = Some(r);
                            }
                            return Ok(finish(out, self.txn));
                        }
                        e @ SinkError::Transient { .. } => {
                            let delay = self.backoff.delay(
                                attempt,
                                e.class().retry_after(),
                                jitter(attempt),
                            );
                            if attempt == 1 || attempt % 10 == 0 {
                                tracing::warn!(error = %e, attempt, delay_ms = delay.as_millis() as u64,
                                    "sink unavailable; retrying the batch in a new transaction");
                            }
                            tokio::select! {
                                () = tokio::time::sleep(delay) => {}
                                () = fence.any_ended(), if any_fenced => {}
                            }
                        }
                    }
                }
            }
        }
    }
}

fn finish(out: Vec<Option<(WriteResult, u64)>>, txn: u64) -> Vec<(WriteResult, u64)> {
    out.into_iter()
        .map(|r| r.unwrap_or((WriteResult::Abandoned, txn)))
        .collect()
}
