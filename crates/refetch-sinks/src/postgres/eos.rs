//! Exactly-once delivery into PostgreSQL: one database transaction spans batches until the
//! engine commits it, and the commit stores the input offsets in the same transaction.
//!
//! ## The offsets table
//!
//! | column | type | |
//! |---|---|---|
//! | `group_id` | `text` | primary key, part 1: the consumer group |
//! | `topic` | `text` | primary key, part 2 |
//! | `partition` | `integer` | primary key, part 3 |
//! | `next_offset` | `bigint` NULL | the next offset to consume (every offset below is in the table) |
//! | `covered` | `text` | satisfied ranges above `next_offset` ([`StoredOffset::encode_ranges`]) |
//! | `claim` | `bigint` | raised by every new owner of the partition: the fencing token |
//! | `updated_at` | `timestamptz` | time of the last commit |
//!
//! ## Fencing
//!
//! When a partition is assigned, the new owner reads its row and raises `claim` in one
//! statement ([`Sink::stored_offsets`](refetch::Sink::stored_offsets)); a commit stores offsets
//! only where `claim` is still the one it read. A former owner whose transaction commits late
//! (its revoke ran past the drain deadline) finds its claim gone and rolls back, writes
//! included. Raising the claim waits for the row lock of a transaction still holding it, so the
//! new owner reads the offsets after that transaction ended either way.
//!
//! Batches write under a savepoint each, so a record refused on its own (a data or constraint
//! error) rolls back only its batch, which is then written record by record, each under its own
//! savepoint: the transaction keeps every other write. A connection error loses the
//! transaction: the write fails and the engine aborts.

use std::collections::HashMap;

use refetch::{
    Change, SinkError, StoredOffset, TopicPartition, TransactionCommit, TransactionError,
    WriteReport,
};

use super::{Failure, PostgresSink, Row, SINK, classify, describe, quote_ident};

/// The statements on the offsets table.
pub(super) struct OffsetStatements {
    create: String,
    claim: String,
    store: String,
    read: String,
}

impl OffsetStatements {
    pub(super) fn new(schema: &str, table: &str) -> Self {
        let t = format!("{}.{}", quote_ident(schema), quote_ident(table));
        OffsetStatements {
            create: format!(
                "CREATE TABLE IF NOT EXISTS {t} ( \
                   group_id text COLLATE \"C\" NOT NULL, \
                   topic text COLLATE \"C\" NOT NULL, \
                   partition integer NOT NULL, \
                   next_offset bigint, \
                   covered text NOT NULL DEFAULT '', \
                   claim bigint NOT NULL DEFAULT 0, \
                   updated_at timestamptz NOT NULL DEFAULT now(), \
                   PRIMARY KEY (group_id, topic, partition))"
            ),
            claim: format!(
                "INSERT INTO {t} AS o (group_id, topic, partition, claim) VALUES ($1, $2, $3, 1) \
                 ON CONFLICT (group_id, topic, partition) DO UPDATE SET claim = o.claim + 1 \
                 RETURNING next_offset, covered::text, claim"
            ),
            store: format!(
                "UPDATE {t} SET next_offset = $4, covered = $5, updated_at = now() \
                 WHERE group_id = $1 AND topic = $2 AND partition = $3 AND claim = $6"
            ),
            read: format!(
                "SELECT next_offset, covered::text FROM {t} \
                 WHERE group_id = $1 AND topic = $2 AND partition = $3"
            ),
        }
    }

    /// The statement creating the table (when missing).
    pub(super) fn create(&self) -> &str {
        &self.create
    }
}

/// The connection holding the open transaction.
struct TxnConn {
    client: deadpool_postgres::Object,
    open: bool,
    /// A statement failed for the database's reasons: the transaction can only roll back.
    doomed: Option<String>,
}

/// The exactly-once state of a PostgreSQL sink.
pub(super) struct Eos {
    sql: OffsetStatements,
    conn: tokio::sync::Mutex<Option<TxnConn>>,
    /// The claim this instance holds per partition (read at assignment).
    claims: std::sync::Mutex<HashMap<TopicPartition, i64>>,
}

impl Eos {
    pub(super) fn new(sql: OffsetStatements) -> Self {
        Eos {
            sql,
            conn: tokio::sync::Mutex::new(None),
            claims: std::sync::Mutex::new(HashMap::new()),
        }
    }
}

impl PostgresSink {
    fn eos(&self) -> Result<&Eos, TransactionError> {
        self.eos
            .as_ref()
            .ok_or_else(|| TransactionError::fatal("the sink is not transactional"))
    }

    /// Begin the transaction on `c` unless it is open.
    async fn begin(&self, c: &mut TxnConn) -> Result<(), String> {
        if c.open {
            return Ok(());
        }
        let begin = if self.force_sync_commit {
            "BEGIN; SET LOCAL synchronous_commit TO on"
        } else {
            "BEGIN"
        };
        c.client
            .batch_execute(begin)
            .await
            .map_err(|e| describe(&e))?;
        c.open = true;
        Ok(())
    }

    /// The transaction's connection (a new one when there is none), begun.
    async fn txn_conn<'a>(
        &self,
        slot: &'a mut Option<TxnConn>,
    ) -> Result<&'a mut TxnConn, SinkError> {
        if slot.is_none() {
            let client = self
                .pool
                .get()
                .await
                .map_err(|e| SinkError::transient(format!("no connection: {e}")))?;
            *slot = Some(TxnConn {
                client,
                open: false,
                doomed: None,
            });
        }
        let Some(c) = slot.as_mut() else {
            return Err(SinkError::transient("no connection"));
        };
        if let Some(d) = &c.doomed {
            return Err(SinkError::transient(format!(
                "the open transaction must roll back first: {d}"
            )));
        }
        if let Err(m) = self.begin(c).await {
            *slot = None;
            return Err(SinkError::transient(m));
        }
        match slot.as_mut() {
            Some(c) => Ok(c),
            None => Err(SinkError::transient("no connection")),
        }
    }

    /// Write a batch in the open transaction (exactly-once).
    pub(super) async fn write_in_transaction(
        &self,
        batch: &[Change],
        fetched_at: &[std::time::SystemTime],
        batch_id: u64,
    ) -> Result<WriteReport, SinkError> {
        let Some(eos) = &self.eos else {
            return Err(SinkError::permanent("the sink is not transactional"));
        };
        let mut slot = eos.conn.lock().await;
        let c = self.txn_conn(&mut slot).await?;
        let rows: Vec<Row<'_>> = batch
            .iter()
            .enumerate()
            .map(|(i, c)| Row::new(c, fetched_at.get(i).copied()))
            .collect();
        match self
            .rows_under_savepoint(&c.client, &rows, "refetch_batch")
            .await
        {
            Ok(()) => return Ok(WriteReport::all_durable()),
            Err(Failure::Transient(m)) => {
                c.doomed = Some(m.clone());
                return Err(SinkError::transient(m));
            }
            Err(Failure::Record { index, message }) => {
                tracing::warn!(sink = SINK, batch_id, index, error = %message,
                    "a record was refused; writing the batch one record at a time in the transaction");
                if rows.len() == 1 {
                    return Ok(WriteReport {
                        failed: vec![(0, SinkError::permanent(message))],
                    });
                }
            }
        }
        let mut failed = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            match self
                .rows_under_savepoint(&c.client, std::slice::from_ref(row), "refetch_row")
                .await
            {
                Ok(()) => {}
                Err(Failure::Transient(m)) => {
                    c.doomed = Some(m.clone());
                    return Err(SinkError::transient(m));
                }
                Err(Failure::Record { message, .. }) => {
                    tracing::warn!(sink = SINK, batch_id, index = i, key = %batch[i].key(), error = %message, "record refused");
                    failed.push((i, SinkError::permanent(message)));
                }
            }
        }
        Ok(WriteReport { failed })
    }

    /// Run `rows` under a savepoint: rolled back to it on a record's error, released otherwise.
    async fn rows_under_savepoint(
        &self,
        client: &deadpool_postgres::Object,
        rows: &[Row<'_>],
        savepoint: &str,
    ) -> Result<(), Failure> {
        let upsert = client
            .prepare_cached(&self.sql.upsert)
            .await
            .map_err(|e| classify(&e, None))?;
        let delete = client
            .prepare_cached(&self.sql.delete)
            .await
            .map_err(|e| classify(&e, None))?;
        client
            .batch_execute(&format!("SAVEPOINT {savepoint}"))
            .await
            .map_err(|e| Failure::Transient(describe(&e)))?;
        let params: Vec<_> = rows.iter().map(Row::params).collect();
        let results = futures::future::join_all(rows.iter().zip(&params).map(|(row, p)| {
            let stmt = if row.delete { &delete } else { &upsert };
            client.execute(stmt, p)
        }))
        .await;
        let aborted = |e: &tokio_postgres::Error| e.code().map(|c| c.code()) == Some("25P02");
        let mut cause: Option<(usize, tokio_postgres::Error)> = None;
        let mut changed = 0u64;
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Ok(n) => changed += n,
                Err(e) => match &cause {
                    None => cause = Some((i, e)),
                    Some((_, c)) if aborted(c) && !aborted(&e) => cause = Some((i, e)),
                    Some(_) => {}
                },
            }
        }
        if let Some((i, e)) = cause {
            let failure = classify(&e, Some(i));
            if matches!(failure, Failure::Record { .. }) {
                client
                    .batch_execute(&format!("ROLLBACK TO SAVEPOINT {savepoint}"))
                    .await
                    .map_err(|e| Failure::Transient(describe(&e)))?;
            }
            return Err(failure);
        }
        client
            .batch_execute(&format!("RELEASE SAVEPOINT {savepoint}"))
            .await
            .map_err(|e| Failure::Transient(describe(&e)))?;
        let skipped = rows.len() as u64 - changed.min(rows.len() as u64);
        if skipped > 0 {
            metrics::counter!("refetch_sink_version_guard_skips_total", "sink" => SINK)
                .increment(skipped);
        }
        Ok(())
    }

    /// Commit the open transaction with the offsets it covers.
    pub(super) async fn commit_in_transaction(
        &self,
        commit: &TransactionCommit<'_>,
    ) -> Result<(), TransactionError> {
        let eos = self.eos()?;
        let mut slot = eos.conn.lock().await;
        let open = slot.as_ref().is_some_and(|c| c.open);
        if let Some(d) = slot.as_ref().and_then(|c| c.doomed.clone()) {
            return Err(TransactionError::aborted(d));
        }
        if !open && commit.offsets.is_empty() {
            return Ok(());
        }
        let c = self
            .txn_conn(&mut slot)
            .await
            .map_err(|e| TransactionError::aborted(e.to_string()))?;
        let store = c
            .client
            .prepare_cached(&eos.sql.store)
            .await
            .map_err(|e| TransactionError::aborted(describe(&e)));
        let store = match store {
            Ok(s) => s,
            Err(e) => {
                c.doomed = Some(e.to_string());
                return Err(e);
            }
        };
        for (a, stored) in commit.offsets {
            let claim = eos.claims.lock().ok().and_then(|m| m.get(&a.tp).copied());
            let Some(claim) = claim else {
                c.doomed = Some(format!("no claim on {}", a.tp));
                return Err(TransactionError::aborted(format!(
                    "partition {} was never claimed by this instance",
                    a.tp
                )));
            };
            let ranges = stored.encode_ranges();
            let r = c
                .client
                .execute(
                    &store,
                    &[
                        &commit.group_id,
                        &&*a.tp.topic,
                        &a.tp.partition,
                        &stored.offset,
                        &ranges,
                        &claim,
                    ],
                )
                .await;
            match r {
                Ok(1) => {}
                Ok(_) => {
                    let m = format!(
                        "partition {} is claimed by another instance now: this transaction is fenced",
                        a.tp
                    );
                    c.doomed = Some(m.clone());
                    return Err(TransactionError::aborted(m));
                }
                Err(e) => {
                    let m = describe(&e);
                    c.doomed = Some(m.clone());
                    return Err(TransactionError::aborted(m));
                }
            }
        }
        match c.client.batch_execute("COMMIT").await {
            Ok(()) => {
                c.open = false;
                Ok(())
            }
            Err(e) => {
                // The connection broke at COMMIT: whether it committed is unknown. The offsets
                // rows tell (they hold what this commit stored only if it committed).
                let m = describe(&e);
                *slot = None;
                drop(slot);
                if self.offsets_stored(commit).await {
                    tracing::warn!(sink = SINK, error = %m, "COMMIT failed but the offsets show it committed");
                    Ok(())
                } else {
                    Err(TransactionError::aborted(format!("COMMIT failed: {m}")))
                }
            }
        }
    }

    /// Do the offsets rows hold what `commit` stores (and is anything stored at all)?
    async fn offsets_stored(&self, commit: &TransactionCommit<'_>) -> bool {
        let Ok(eos) = self.eos() else {
            return false;
        };
        if commit.offsets.is_empty() {
            return false;
        }
        let Ok(client) = self.pool.get().await else {
            return false;
        };
        for (a, stored) in commit.offsets {
            let row = client
                .query_opt(
                    &eos.sql.read,
                    &[&commit.group_id, &&*a.tp.topic, &a.tp.partition],
                )
                .await;
            let Ok(Some(row)) = row else {
                return false;
            };
            let next: Option<i64> = row.get(0);
            let covered: String = row.get(1);
            if next != Some(stored.offset) || covered != stored.encode_ranges() {
                return false;
            }
        }
        true
    }

    /// Roll the open transaction back.
    pub(super) async fn abort_in_transaction(&self) -> Result<(), TransactionError> {
        let eos = self.eos()?;
        let mut slot = eos.conn.lock().await;
        let Some(c) = slot.as_mut() else {
            return Ok(());
        };
        if !c.open {
            c.doomed = None;
            return Ok(());
        }
        if let Err(e) = c.client.batch_execute("ROLLBACK").await {
            // A broken connection rolled the transaction back on the server already.
            tracing::debug!(sink = SINK, error = %describe(&e), "ROLLBACK failed; dropping the connection");
            *slot = None;
            return Ok(());
        }
        c.open = false;
        c.doomed = None;
        Ok(())
    }

    /// Claim these partitions for `group_id` and read what is stored for them.
    pub(super) async fn claim_stored(
        &self,
        group_id: &str,
        partitions: &[TopicPartition],
    ) -> Result<Vec<(TopicPartition, StoredOffset)>, SinkError> {
        let Some(eos) = &self.eos else {
            return Ok(Vec::new());
        };
        let client = self.client().await?;
        let claim = client
            .prepare_cached(&eos.sql.claim)
            .await
            .map_err(|e| SinkError::transient(describe(&e)))?;
        let mut out = Vec::new();
        for tp in partitions {
            let row = client
                .query_one(&claim, &[&group_id, &&*tp.topic, &tp.partition])
                .await
                .map_err(|e| SinkError::transient(describe(&e)))?;
            let next: Option<i64> = row.get(0);
            let covered: String = row.get(1);
            let claimed: i64 = row.get(2);
            if let Ok(mut m) = eos.claims.lock() {
                m.insert(tp.clone(), claimed);
            }
            if let Some(next) = next {
                let stored = StoredOffset::decode(next, &covered)
                    .map_err(|e| SinkError::permanent(format!("stored offsets of {tp}: {e}")))?;
                out.push((tp.clone(), stored));
            }
        }
        Ok(out)
    }
}
