//! PostgreSQL sink: version-guarded upserts into one table, one transaction per batch.
//!
//! ## Table
//!
//! | column | type | |
//! |---|---|---|
//! | `entity_type` | `text` | primary key, part 1 |
//! | `entity_id` | `text` | primary key, part 2 |
//! | `version` | `bigint` NULL | the fetched version (integer or microseconds) |
//! | `version_kind` | `text` NULL | `int` or `timestamp` |
//! | `content_type` | `text` NULL | as fetched |
//! | `body` | `jsonb` NULL | the body when it is JSON |
//! | `body_raw` | `bytea` NULL | the body when it is not JSON (or JSON `jsonb` cannot hold: `\u0000`) |
//! | `deleted` | `boolean` NOT NULL DEFAULT false | tombstone flag |
//! | `updated_at` | `timestamptz` NOT NULL DEFAULT now() | time of the last write |
//! | `fetched_at` | `timestamptz` NULL | when the fetch of the held state started (the fetch-time guard) |
//!
//! With `create_table = true` the sink creates the schema and table (key columns with
//! `COLLATE "C"`, so key order is byte order, the order [`PostgresSink::list_versions`] pages
//! in). At start-up it always checks the table and lists every mismatch (missing column, wrong
//! type, `NOT NULL` where the sink writes `NULL`, no unique index on the key); a table whose only
//! mismatch is a missing `fetched_at` (created by an earlier version) gets the column added (a
//! nullable column without a default: a catalog-only change, done under a short
//! `lock_timeout`).
//!
//! ## Version guard
//!
//! When both sides carry a version of the same kind, an upsert replaces the row unless the held
//! version is *greater*: `t.version <= EXCLUDED.version`. Equal versions are decided by fetch
//! time (below), which lets a retry (same fetch) and a later flight of the same version (a newer
//! state with the same timestamp tick) through, but not an older read of that version arriving
//! late, for example over the tombstone that kept it. A skipped (older) write is still an
//! acknowledgement: the table holds something newer.
//!
//! ## Fetch-time guard
//!
//! Versions that cannot be compared (either side has none, or the kinds differ) fall back to the
//! time the engine started each fetch ([`WriteContext::fetched_at`]), stored in `fetched_at`: a
//! state read earlier never overwrites one read later, so the late write of a former owner of
//! the partition (a write already on the wire when its assignment ended) cannot bring back an
//! older state. Equal times overwrite (an idempotent retry). A write without a time
//! ([`Sink::write`], or a row written before the column existed) cannot be compared and
//! overwrites, as before. This assumes the clocks of the instances agree to well within the
//! time between two changes of one entity.
//!
//! Deletes are guarded by fetch time too (a delete carries no version): a delete whose fetch
//! started before the held state's does not remove it. `deletes = "delete"` runs a guarded
//! `DELETE ... WHERE fetched_at <= $t`; `deletes = "tombstone"` turns the row into a tombstone
//! that keeps its version and records the delete's fetch time, so an older state arriving later
//! (another instance, a replayed notification) cannot resurrect it either. With hard deletes the
//! row is gone, so a late older upsert after a delete recreates it: use tombstones when several
//! writers may race.
//!
//! ## Failures
//!
//! A batch is one transaction whose statements are pipelined; it is acknowledged after
//! `COMMIT` returns (if the server runs with `synchronous_commit = off`, the sink turns it back on
//! for its own transactions). Connection errors, serialization failures, deadlocks, shutdowns,
//! resource exhaustion and also schema errors (a dropped table) are transient: the engine
//! retries and the pool replaces broken connections, so the sink recovers when the server does.
//! Data and constraint errors (SQLSTATE classes 22, 23, 54) belong to one record: the sink then
//! writes the batch's records one by one, each in its own transaction, and reports only the
//! rejected ones as permanent in [`WriteReport::failed`].
//!
//! ## Exactly-once (`delivery = "exactly_once"`)
//!
//! The database transaction spans batches until the engine commits it; the commit also stores
//! the next offset of every partition it covers in the offsets table (in the same transaction),
//! and a new assignment starts from the stored offset. See the `eos` module for the table and
//! the fencing of a former owner.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use refetch::{
    Change, Delivery, EntityKey, OffsetStore, Sink, SinkError, StoredOffset, TopicPartition,
    TransactionCommit, TransactionError, Version, WriteContext, WriteReport,
};
use tokio_postgres::NoTls;
use tokio_postgres::types::ToSql;

use crate::body::{json_text, version_from_parts, version_parts};
use crate::config::{DeleteMode, PostgresConfig};
use crate::factory::SinkBuildError;
use crate::stored::{HeldVersion, StoredEntity, stored_body};

mod eos;

const SINK: &str = "postgres";

/// Writes entity states to a PostgreSQL table.
pub struct PostgresSink {
    pool: Pool,
    table: String,
    sql: Statements,
    force_sync_commit: bool,
    max_batch: usize,
    /// Set with `delivery = "exactly_once"`.
    eos: Option<eos::Eos>,
}

impl std::fmt::Debug for PostgresSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSink")
            .field("table", &self.table)
            .field("max_batch", &self.max_batch)
            .finish_non_exhaustive()
    }
}

struct Statements {
    upsert: String,
    delete: String,
    held_version: String,
    get: String,
    list_first: String,
    list_after: String,
}

/// Quote an SQL identifier (`"name"`, inner quotes doubled).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn check_ident(what: &str, name: &str) -> Result<(), SinkBuildError> {
    if name.is_empty() || name.contains('\0') || name.len() > 63 {
        return Err(SinkBuildError::config(
            SINK,
            format!("{what} name {name:?} must be 1 to 63 bytes without NUL"),
        ));
    }
    Ok(())
}

/// The fetch-time guard of an update of `t` by a change fetched at `fresh` (a parameter): a
/// state read earlier never overwrites one read later; an unknown time on either side cannot be
/// compared and passes.
fn fetched_guard(fresh: &str) -> String {
    format!("(t.fetched_at IS NULL OR {fresh} IS NULL OR t.fetched_at <= {fresh})")
}

impl Statements {
    fn new(table: &str, deletes: DeleteMode) -> Self {
        let cols = "entity_type, entity_id, version, version_kind, content_type, body, body_raw, deleted, updated_at, fetched_at";
        // Comparable versions (both set, same kind) decide by version, equal ones by fetch
        // time; anything else by fetch time.
        let upsert = format!(
            "INSERT INTO {table} AS t ({cols}) \
             VALUES ($1, $2, $3, $4, $5, $6::text::jsonb, $7, false, now(), $8::timestamptz) \
             ON CONFLICT (entity_type, entity_id) DO UPDATE SET \
               version = EXCLUDED.version, version_kind = EXCLUDED.version_kind, \
               content_type = EXCLUDED.content_type, body = EXCLUDED.body, \
               body_raw = EXCLUDED.body_raw, deleted = false, updated_at = EXCLUDED.updated_at, \
               fetched_at = EXCLUDED.fetched_at \
             WHERE CASE \
               WHEN t.version IS NOT NULL AND EXCLUDED.version IS NOT NULL \
                 AND t.version_kind IS NOT DISTINCT FROM EXCLUDED.version_kind \
               THEN t.version < EXCLUDED.version \
                 OR (t.version = EXCLUDED.version AND {guard}) \
               ELSE {guard} END",
            guard = fetched_guard("EXCLUDED.fetched_at"),
        );
        let delete = match deletes {
            DeleteMode::Delete => format!(
                "DELETE FROM {table} AS t WHERE entity_type = $1 AND entity_id = $2 AND {guard}",
                guard = fetched_guard("$3::timestamptz"),
            ),
            DeleteMode::Tombstone => format!(
                "INSERT INTO {table} AS t (entity_type, entity_id, deleted, updated_at, fetched_at) \
                 VALUES ($1, $2, true, now(), $3::timestamptz) \
                 ON CONFLICT (entity_type, entity_id) DO UPDATE SET \
                   content_type = NULL, body = NULL, body_raw = NULL, deleted = true, \
                   updated_at = EXCLUDED.updated_at, fetched_at = EXCLUDED.fetched_at \
                 WHERE {guard}",
                guard = fetched_guard("EXCLUDED.fetched_at"),
            ),
        };
        let list = |filter: &str| {
            format!(
                "SELECT entity_type::text, entity_id::text, version, version_kind::text, deleted \
                 FROM {table} {filter} \
                 ORDER BY entity_type COLLATE \"C\", entity_id COLLATE \"C\" LIMIT $1"
            )
        };
        Statements {
            upsert,
            delete,
            held_version: format!(
                "SELECT version, version_kind::text FROM {table} \
                 WHERE entity_type = $1 AND entity_id = $2"
            ),
            get: format!(
                "SELECT version, version_kind::text, content_type::text, body::text, body_raw, deleted \
                 FROM {table} WHERE entity_type = $1 AND entity_id = $2"
            ),
            list_first: list(""),
            list_after: list(
                "WHERE (entity_type COLLATE \"C\", entity_id COLLATE \"C\") \
                 > ($2::text COLLATE \"C\", $3::text COLLATE \"C\")",
            ),
        }
    }
}

/// The parameters of one change.
struct Row<'a> {
    delete: bool,
    entity_type: &'a str,
    id: &'a str,
    version: Option<i64>,
    version_kind: Option<&'static str>,
    content_type: Option<&'a str>,
    json: Option<&'a str>,
    raw: Option<&'a [u8]>,
    /// When the change's fetch started, if known (the fetch-time guard).
    fetched_at: Option<SystemTime>,
}

impl<'a> Row<'a> {
    fn new(change: &'a Change, fetched_at: Option<SystemTime>) -> Self {
        let key = change.key();
        match change {
            Change::Delete { .. } => Row {
                delete: true,
                entity_type: key.entity_type(),
                id: key.id(),
                version: None,
                version_kind: None,
                content_type: None,
                json: None,
                raw: None,
                fetched_at,
            },
            Change::Upsert { entity, .. } => {
                // jsonb cannot hold U+0000; such a body is kept verbatim in body_raw instead.
                let json = json_text(entity).filter(|t| !t.contains("\\u0000"));
                let (version, version_kind) = version_parts(entity.version);
                Row {
                    delete: false,
                    entity_type: key.entity_type(),
                    id: key.id(),
                    version,
                    version_kind,
                    content_type: entity.content_type.as_deref(),
                    json,
                    raw: if json.is_some() {
                        None
                    } else {
                        Some(&entity.body[..])
                    },
                    fetched_at,
                }
            }
        }
    }

    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        if self.delete {
            vec![&self.entity_type, &self.id, &self.fetched_at]
        } else {
            vec![
                &self.entity_type,
                &self.id,
                &self.version,
                &self.version_kind,
                &self.content_type,
                &self.json,
                &self.raw,
                &self.fetched_at,
            ]
        }
    }
}

/// How a failed statement or transaction is handled.
#[derive(Debug)]
enum Failure {
    /// The database or connection failed; retry the batch.
    Transient(String),
    /// A record was refused (data or constraint error); `index` when the statement is known.
    Record {
        index: Option<usize>,
        message: String,
    },
}

/// A readable, secret-free description of a driver error.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
            if let Some(c) = db.constraint() {
                let _ = write!(s, " (constraint {c})");
            }
            if let Some(col) = db.column() {
                let _ = write!(s, " (column {col})");
            }
            s
        }
        None if e.is_closed() => "connection closed".to_owned(),
        None => e.to_string(),
    }
}

/// Is this SQLSTATE about the record rather than the database? Data exceptions (22),
/// integrity constraint violations (23) and program limits such as an oversized index row (54).
fn is_record_error(code: &str) -> bool {
    code.starts_with("22") || code.starts_with("23") || code.starts_with("54")
}

fn classify(e: &tokio_postgres::Error, index: Option<usize>) -> Failure {
    match e.code() {
        Some(code) if is_record_error(code.code()) => Failure::Record {
            index,
            message: describe(e),
        },
        _ => Failure::Transient(describe(e)),
    }
}

static NEXT_BATCH: AtomicU64 = AtomicU64::new(1);

impl PostgresSink {
    /// Connect, create the table if configured, and check its shape.
    pub async fn connect(cfg: &PostgresConfig) -> Result<Self, SinkBuildError> {
        check_ident("schema", &cfg.schema)?;
        check_ident("table", &cfg.table)?;
        let mut pg: tokio_postgres::Config = cfg.url.expose().parse().map_err(|e| {
            SinkBuildError::config(
                SINK,
                format!(
                    "cannot parse the connection URL {}: {e}",
                    cfg.url.redacted()
                ),
            )
        })?;
        pg.connect_timeout(cfg.connect_timeout);
        pg.keepalives(true);
        pg.keepalives_idle(Duration::from_secs(30));
        if pg.get_application_name().is_none() {
            pg.application_name("refetch");
        }
        if !cfg.statement_timeout.is_zero() {
            pg.options(format!(
                "-c statement_timeout={}",
                cfg.statement_timeout.as_millis()
            ));
        }
        let manager = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(cfg.pool_size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(cfg.connect_timeout))
            .create_timeout(Some(cfg.connect_timeout))
            .recycle_timeout(Some(cfg.connect_timeout))
            .build()
            .map_err(|e| SinkBuildError::config(SINK, format!("cannot build the pool: {e}")))?;

        let schema_q = quote_ident(&cfg.schema);
        let table = format!("{schema_q}.{}", quote_ident(&cfg.table));
        let client = pool.get().await.map_err(|e| {
            SinkBuildError::unavailable(
                SINK,
                format!("cannot connect to {}: {e}", cfg.url.redacted()),
            )
        })?;
        let db_err = |what: &str, e: tokio_postgres::Error| {
            SinkBuildError::unavailable(SINK, format!("{what}: {}", describe(&e)))
        };
        if cfg.create_table {
            let ddl = format!(
                "CREATE SCHEMA IF NOT EXISTS {schema_q}; \
                 CREATE TABLE IF NOT EXISTS {table} ( \
                   entity_type text COLLATE \"C\" NOT NULL, \
                   entity_id text COLLATE \"C\" NOT NULL, \
                   version bigint, \
                   version_kind text, \
                   content_type text, \
                   body jsonb, \
                   body_raw bytea, \
                   deleted boolean NOT NULL DEFAULT false, \
                   updated_at timestamptz NOT NULL DEFAULT now(), \
                   fetched_at timestamptz, \
                   PRIMARY KEY (entity_type, entity_id))"
            );
            if let Err(e) = client.batch_execute(&ddl).await {
                // Two instances creating the table at once: one loses with a duplicate error.
                let racing = matches!(
                    e.code().map(|c| c.code()),
                    Some("23505" | "42P06" | "42P07")
                );
                if !racing {
                    return Err(db_err("cannot create the table", e));
                }
            }
        }
        if check_table(&client, &cfg.schema, &cfg.table, &table).await? == FetchedAt::Missing {
            add_fetched_at(&client, &table).await?;
        }
        let sync = client
            .query_one("SHOW synchronous_commit", &[])
            .await
            .map_err(|e| db_err("cannot read synchronous_commit", e))?;
        let sync: String = sync.get(0);
        let force_sync_commit = sync == "off";
        if force_sync_commit {
            tracing::warn!(
                sink = SINK,
                "the server runs with synchronous_commit = off; the sink sets it on for its own transactions"
            );
        }
        let eos = match cfg.delivery {
            Delivery::AtLeastOnce => None,
            Delivery::ExactlyOnce => {
                check_ident("offsets table", &cfg.offsets_table)?;
                let sql = eos::OffsetStatements::new(&cfg.schema, &cfg.offsets_table);
                if let Err(e) = client.batch_execute(sql.create()).await {
                    let racing = matches!(
                        e.code().map(|c| c.code()),
                        Some("23505" | "42P06" | "42P07")
                    );
                    if !racing {
                        return Err(db_err("cannot create the offsets table", e));
                    }
                }
                Some(eos::Eos::new(sql))
            }
        };
        drop(client);
        tracing::info!(sink = SINK, table = %table, exactly_once = eos.is_some(), "PostgreSQL sink ready");
        Ok(PostgresSink {
            pool,
            sql: Statements::new(&table, cfg.deletes),
            table,
            force_sync_commit,
            max_batch: cfg.max_batch.max(1),
            eos,
        })
    }

    /// The quoted, schema-qualified table name.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Write `rows` in one transaction. Returns how many statements changed a row.
    async fn write_rows(&self, rows: &[Row<'_>]) -> Result<u64, Failure> {
        let mut client = self
            .pool
            .get()
            .await
            .map_err(|e| Failure::Transient(format!("no connection: {e}")))?;
        let upsert = client
            .prepare_cached(&self.sql.upsert)
            .await
            .map_err(|e| classify(&e, None))?;
        let delete = client
            .prepare_cached(&self.sql.delete)
            .await
            .map_err(|e| classify(&e, None))?;
        let tx = client.transaction().await.map_err(|e| classify(&e, None))?;
        if self.force_sync_commit {
            tx.batch_execute("SET LOCAL synchronous_commit TO on")
                .await
                .map_err(|e| classify(&e, None))?;
        }
        let params: Vec<_> = rows.iter().map(Row::params).collect();
        // Issued together, the statements are pipelined on the connection.
        let results = futures::future::join_all(rows.iter().zip(&params).map(|(row, p)| {
            let stmt = if row.delete { &delete } else { &upsert };
            tx.execute(stmt, p)
        }))
        .await;
        let mut changed = 0;
        // After the first error the others only say "current transaction is aborted" (25P02):
        // the cause is the first error that says something else.
        let aborted = |e: &tokio_postgres::Error| e.code().map(|c| c.code()) == Some("25P02");
        let mut cause: Option<(usize, tokio_postgres::Error)> = None;
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
            return Err(classify(&e, Some(i)));
        }
        tx.commit().await.map_err(|e| classify(&e, None))?;
        Ok(changed)
    }

    async fn write_batch(
        &self,
        batch: &[Change],
        fetched_at: &[SystemTime],
        batch_id: u64,
    ) -> Result<WriteReport, SinkError> {
        let rows: Vec<Row<'_>> = batch
            .iter()
            .enumerate()
            .map(|(i, c)| Row::new(c, fetched_at.get(i).copied()))
            .collect();
        let message = match self.write_rows(&rows).await {
            Ok(changed) => {
                let skipped = batch.len() as u64 - changed.min(batch.len() as u64);
                if skipped > 0 {
                    metrics::counter!("refetch_sink_version_guard_skips_total", "sink" => SINK)
                        .increment(skipped);
                    tracing::debug!(
                        sink = SINK,
                        batch_id,
                        skipped,
                        "older states (by version or fetch time) not written over newer ones"
                    );
                }
                return Ok(WriteReport::all_durable());
            }
            Err(Failure::Transient(m)) => return Err(SinkError::transient(m)),
            Err(Failure::Record { index, message }) => {
                tracing::warn!(sink = SINK, batch_id, index, error = %message,
                    "a record was refused; writing the batch one record at a time");
                message
            }
        };
        if rows.len() == 1 {
            return Ok(WriteReport {
                failed: vec![(0, SinkError::permanent(message))],
            });
        }
        let mut failed = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            match self.write_rows(std::slice::from_ref(row)).await {
                Ok(_) => {}
                Err(Failure::Transient(m)) => return Err(SinkError::transient(m)),
                Err(Failure::Record { message, .. }) => {
                    tracing::warn!(sink = SINK, batch_id, index = i, key = %batch[i].key(), error = %message, "record refused");
                    failed.push((i, SinkError::permanent(message)));
                }
            }
        }
        Ok(WriteReport { failed })
    }

    /// The stored row of `key`, if any (a read helper for checks and tests).
    pub async fn get(&self, key: &EntityKey) -> Result<Option<StoredEntity>, SinkError> {
        let client = self.client().await?;
        let row = client
            .query_opt(&self.sql.get, &[&key.entity_type(), &key.id()])
            .await
            .map_err(|e| SinkError::transient(describe(&e)))?;
        Ok(row.map(|row| StoredEntity {
            key: key.clone(),
            version: version_from_parts(row.get(0), row.get::<_, Option<&str>>(1)),
            content_type: row.get(2),
            body: stored_body(row.get(3), row.get(4)),
            deleted: row.get(5),
        }))
    }

    /// Held keys and versions in key order (byte order of type, then id), `limit` at a time,
    /// starting after `after`. Tombstones are included (flagged). For reconciliation.
    pub async fn list_versions(
        &self,
        after: Option<&EntityKey>,
        limit: usize,
    ) -> Result<Vec<HeldVersion>, SinkError> {
        let client = self.client().await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = match after {
            None => client.query(&self.sql.list_first, &[&limit]).await,
            Some(k) => {
                client
                    .query(&self.sql.list_after, &[&limit, &k.entity_type(), &k.id()])
                    .await
            }
        }
        .map_err(|e| SinkError::transient(describe(&e)))?;
        Ok(rows
            .iter()
            .map(|row| HeldVersion {
                key: EntityKey::new(row.get::<_, &str>(0), row.get::<_, &str>(1)),
                version: version_from_parts(row.get(2), row.get::<_, Option<&str>>(3)),
                deleted: row.get(4),
            })
            .collect())
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, SinkError> {
        self.pool
            .get()
            .await
            .map_err(|e| SinkError::transient(format!("no connection: {e}")))
    }
}

/// Expected columns: name, accepted `information_schema` types, whether the sink writes NULL.
const COLUMNS: &[(&str, &[&str], bool)] = &[
    ("entity_type", &["text", "character varying"], false),
    ("entity_id", &["text", "character varying"], false),
    ("version", &["bigint"], true),
    ("version_kind", &["text", "character varying"], true),
    ("content_type", &["text", "character varying"], true),
    ("body", &["jsonb"], true),
    ("body_raw", &["bytea"], true),
    ("deleted", &["boolean"], false),
    (
        "updated_at",
        &["timestamp with time zone", "timestamp without time zone"],
        false,
    ),
    ("fetched_at", &["timestamp with time zone"], true),
];

/// Add the `fetched_at` column to a table created before the fetch-time guard existed. The
/// column is nullable without a default, so PostgreSQL only changes the catalog (no rewrite); the
/// lock it needs is taken with a short `lock_timeout` so a long transaction on the table fails
/// the start-up instead of queueing every other query behind it. Rows written before have no
/// time and are not guarded until their next write. Only done for a table that matches
/// otherwise ([`check_table`] found nothing else wrong).
async fn add_fetched_at(
    client: &tokio_postgres::Client,
    quoted: &str,
) -> Result<(), SinkBuildError> {
    let ddl = format!(
        "BEGIN; SET LOCAL lock_timeout = '5s'; \
         ALTER TABLE {quoted} ADD COLUMN IF NOT EXISTS fetched_at timestamptz; COMMIT"
    );
    match client.batch_execute(&ddl).await {
        Ok(()) => {
            tracing::info!(sink = SINK, table = %quoted, "added column fetched_at (the fetch-time guard)");
            Ok(())
        }
        // Another instance added it at the same moment.
        Err(e) if e.code().map(|c| c.code()) == Some("42701") => {
            let _ = client.batch_execute("ROLLBACK").await;
            Ok(())
        }
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            let message = format!(
                "table {quoted} has no column fetched_at and the sink could not add it ({}): \
                 run ALTER TABLE {quoted} ADD COLUMN fetched_at timestamptz",
                describe(&e)
            );
            // Not allowed to alter the table: an operator must add it. Anything else (the lock
            // not granted in time, a connection lost) may pass on the next start.
            Err(match e.code().map(|c| c.code()) {
                Some("42501") => SinkBuildError::Schema {
                    sink: SINK,
                    message,
                },
                _ => SinkBuildError::unavailable(SINK, message),
            })
        }
    }
}

/// Whether a table that otherwise matches has the `fetched_at` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FetchedAt {
    Present,
    /// A table created before the fetch-time guard: the sink adds the column.
    Missing,
}

async fn check_table(
    client: &tokio_postgres::Client,
    schema: &str,
    table: &str,
    quoted: &str,
) -> Result<FetchedAt, SinkBuildError> {
    let unavailable = |e: tokio_postgres::Error| {
        SinkBuildError::unavailable(SINK, format!("cannot inspect {quoted}: {}", describe(&e)))
    };
    let rows = client
        .query(
            "SELECT column_name::text, data_type::text, is_nullable = 'YES', column_default IS NOT NULL \
             FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2",
            &[&schema, &table],
        )
        .await
        .map_err(unavailable)?;
    if rows.is_empty() {
        return Err(SinkBuildError::Schema {
            sink: SINK,
            message: format!(
                "table {quoted} does not exist (create it, or set create_table = true)"
            ),
        });
    }
    let actual: Vec<(String, String, bool, bool)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let mut problems = Vec::new();
    let mut fetched_at = FetchedAt::Present;
    for (name, types, writes_null) in COLUMNS {
        match actual.iter().find(|c| c.0 == *name) {
            None if *name == "fetched_at" => fetched_at = FetchedAt::Missing,
            None => problems.push(format!("missing column {name} ({})", types[0])),
            Some((_, ty, nullable, _)) => {
                if !types.contains(&ty.as_str()) {
                    problems.push(format!(
                        "column {name} has type {ty}, expected {}",
                        types.join(" or ")
                    ));
                }
                if *writes_null && !nullable {
                    problems.push(format!(
                        "column {name} is NOT NULL, but the sink writes NULL there"
                    ));
                }
            }
        }
    }
    for (name, _, nullable, has_default) in &actual {
        if !COLUMNS.iter().any(|c| c.0 == name) && !nullable && !has_default {
            problems.push(format!(
                "extra column {name} is NOT NULL without a default, so the sink cannot insert rows"
            ));
        }
    }
    let unique = client
        .query_opt(
            "SELECT 1 FROM pg_index i \
             JOIN pg_class c ON c.oid = i.indrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2 AND i.indisunique AND i.indpred IS NULL \
               AND i.indnkeyatts = 2 \
               AND (SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_attribute a \
                    WHERE a.attrelid = c.oid AND a.attnum = ANY(i.indkey::int2[])) \
                   = ARRAY['entity_id', 'entity_type'] \
             LIMIT 1",
            &[&schema, &table],
        )
        .await
        .map_err(unavailable)?;
    if unique.is_none() {
        problems.push("no primary key or unique index on (entity_type, entity_id)".to_owned());
    }
    if problems.is_empty() {
        Ok(fetched_at)
    } else {
        Err(SinkBuildError::Schema {
            sink: SINK,
            message: format!("table {quoted}: {}", problems.join("; ")),
        })
    }
}

impl PostgresSink {
    async fn write_timed(
        &self,
        batch: &[Change],
        fetched_at: &[SystemTime],
    ) -> Result<WriteReport, SinkError> {
        if batch.is_empty() {
            return Ok(WriteReport::all_durable());
        }
        let started = Instant::now();
        let batch_id = NEXT_BATCH.fetch_add(1, Ordering::Relaxed);
        let result = if self.eos.is_some() {
            self.write_in_transaction(batch, fetched_at, batch_id).await
        } else {
            self.write_batch(batch, fetched_at, batch_id).await
        };
        if let Err(e) = &result {
            tracing::warn!(sink = SINK, batch_id, records = batch.len(), error = %e, "batch not written");
        }
        crate::metrics::record_batch(SINK, batch.len(), started, &result);
        result
    }
}

#[async_trait]
impl Sink for PostgresSink {
    /// Writes with the fetch-time guard: each change's [`WriteContext::fetched_at`] is stored and
    /// compared (see the module docs).
    async fn write_with(
        &self,
        batch: &[Change],
        ctx: &WriteContext<'_>,
    ) -> Result<WriteReport, SinkError> {
        self.write_timed(batch, ctx.fetched_at).await
    }

    /// Writes without fetch times: unversioned changes overwrite (nothing to compare).
    async fn write(&self, batch: &[Change]) -> Result<WriteReport, SinkError> {
        self.write_timed(batch, &[]).await
    }

    async fn held_version(&self, key: &EntityKey) -> Result<Option<Version>, SinkError> {
        let client = self.client().await?;
        let row = client
            .query_opt(&self.sql.held_version, &[&key.entity_type(), &key.id()])
            .await
            .map_err(|e| SinkError::transient(describe(&e)))?;
        Ok(row.and_then(|r| version_from_parts(r.get(0), r.get::<_, Option<&str>>(1))))
    }

    fn tracks_versions(&self) -> bool {
        true
    }

    fn max_batch(&self) -> usize {
        self.max_batch
    }

    async fn check(&self) -> Result<(), SinkError> {
        let client = self.client().await?;
        client
            .simple_query("SELECT 1")
            .await
            .map_err(|e| SinkError::transient(describe(&e)))?;
        Ok(())
    }

    fn offset_store(&self) -> Option<OffsetStore> {
        self.eos.as_ref().map(|_| OffsetStore::Sink)
    }

    async fn commit_transaction(
        &self,
        commit: &TransactionCommit<'_>,
    ) -> Result<(), TransactionError> {
        self.commit_in_transaction(commit).await
    }

    async fn abort_transaction(&self) -> Result<(), TransactionError> {
        if self.eos.is_none() {
            return Ok(());
        }
        self.abort_in_transaction().await
    }

    async fn stored_offsets(
        &self,
        group_id: &str,
        partitions: &[TopicPartition],
    ) -> Result<Vec<(TopicPartition, StoredOffset)>, SinkError> {
        self.claim_stored(group_id, partitions).await
    }
}

#[cfg(test)]
mod tests;
