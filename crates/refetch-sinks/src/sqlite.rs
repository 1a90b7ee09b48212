//! SQLite sink: the embedded default. Version-guarded upserts into one table of a local file.
//!
//! Same table idea as the [PostgreSQL sink](crate::postgres): `entity_type`, `entity_id`
//! (primary key), `version`, `version_kind`, `content_type`, `body` (JSON text when the body is
//! JSON), `body_raw` (a BLOB otherwise), `deleted` (tombstone flag, 0/1), `updated_at`
//! (ISO 8601 UTC) and `fetched_at` (microseconds since the Unix epoch, when the fetch of the held
//! state started), and the same guards: comparable versions (both set, same kind) decide by
//! version (equal ones by fetch time), anything else by fetch time, so a state read earlier never overwrites one read later
//! (see [`WriteContext::fetched_at`]); deletes are guarded by fetch time too, as a guarded
//! `DELETE` or a tombstone that keeps the version and the delete's fetch time. A table without
//! `fetched_at` gets it added at start-up. Keys compare with SQLite's `BINARY` collation, which
//! is byte order, like [`EntityKey`]'s `Ord`.
//!
//! Durability: the database runs in WAL mode with `synchronous=FULL`, so a committed transaction
//! is on disk when `COMMIT` returns; one batch is one `IMMEDIATE` transaction and is acknowledged
//! after it commits. SQLite is a blocking library, so one dedicated thread owns the connection
//! and serves writes and reads from a channel; the async side never blocks.
//!
//! Failures: a locked or busy database (another process holding the write lock longer than
//! `busy_timeout`), I/O errors and a full disk are transient; a constraint violation or an
//! oversized value belongs to one record, and the batch is then written record by record, each in
//! its own transaction, so only the bad record is reported.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use refetch::{Change, EntityKey, Sink, SinkError, Version, WriteContext, WriteReport};
use rusqlite::{Connection, ErrorCode, OptionalExtension, TransactionBehavior, params};
use tokio::sync::oneshot;

use crate::body::{json_text, version_from_parts, version_parts};
use crate::config::{DeleteMode, SqliteConfig};
use crate::factory::SinkBuildError;
use crate::stored::{HeldVersion, StoredEntity, stored_body};

const SINK: &str = "sqlite";

/// Writes entity states to a table of an embedded SQLite database.
#[derive(Debug)]
pub struct SqliteSink {
    path: PathBuf,
    commands: mpsc::Sender<Command>,
    max_batch: usize,
}

type Reply<T> = oneshot::Sender<Result<T, SinkError>>;

enum Command {
    /// Changes and, per change, when its fetch started (empty: unknown).
    Write(Vec<Change>, Vec<SystemTime>, Reply<WriteReport>),
    HeldVersion(EntityKey, Reply<Option<Version>>),
    Get(EntityKey, Reply<Option<StoredEntity>>),
    Snapshot(Reply<BTreeMap<EntityKey, StoredEntity>>),
    ListVersions(Option<EntityKey>, usize, Reply<Vec<HeldVersion>>),
}

/// The statements, with the table name quoted in.
struct Statements {
    upsert: String,
    delete: String,
    held_version: String,
    get: String,
    all: String,
    list_first: String,
    list_after: String,
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

const NOW: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";

/// The fetch-time guard of an update of `{t}` by a change fetched at `fresh`: a state read
/// earlier never overwrites one read later; an unknown time on either side passes.
fn fetched_guard(t: &str, fresh: &str) -> String {
    format!("({t}.fetched_at IS NULL OR {fresh} IS NULL OR {t}.fetched_at <= {fresh})")
}

/// Microseconds since the Unix epoch (negative before it), as `fetched_at` stores them.
fn micros(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_micros()).map_or(i64::MIN, |m| -m),
    }
}

impl Statements {
    fn new(table: &str, deletes: DeleteMode) -> Self {
        let t = quote_ident(table);
        let cols = "entity_type, entity_id, version, version_kind, content_type, body, body_raw, deleted, updated_at, fetched_at";
        Statements {
            // Comparable versions (both set, same kind) decide by version, equal ones by
            // fetch time; anything else by fetch time.
            upsert: format!(
                "INSERT INTO {t} ({cols}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 0, {NOW}, ?8) \
                 ON CONFLICT (entity_type, entity_id) DO UPDATE SET \
                   version = excluded.version, version_kind = excluded.version_kind, \
                   content_type = excluded.content_type, body = excluded.body, \
                   body_raw = excluded.body_raw, deleted = 0, updated_at = excluded.updated_at, \
                   fetched_at = excluded.fetched_at \
                 WHERE CASE \
                   WHEN {t}.version IS NOT NULL AND excluded.version IS NOT NULL \
                     AND {t}.version_kind IS excluded.version_kind \
                   THEN {t}.version < excluded.version \
                     OR ({t}.version = excluded.version AND {guard}) \
                   ELSE {guard} END",
                guard = fetched_guard(&t, "excluded.fetched_at"),
            ),
            delete: match deletes {
                DeleteMode::Delete => format!(
                    "DELETE FROM {t} WHERE entity_type = ?1 AND entity_id = ?2 AND {guard}",
                    guard = fetched_guard(&t, "?3"),
                ),
                DeleteMode::Tombstone => format!(
                    "INSERT INTO {t} (entity_type, entity_id, deleted, updated_at, fetched_at) \
                     VALUES (?1, ?2, 1, {NOW}, ?3) \
                     ON CONFLICT (entity_type, entity_id) DO UPDATE SET \
                       content_type = NULL, body = NULL, body_raw = NULL, deleted = 1, \
                       updated_at = excluded.updated_at, fetched_at = excluded.fetched_at \
                     WHERE {guard}",
                    guard = fetched_guard(&t, "excluded.fetched_at"),
                ),
            },
            held_version: format!(
                "SELECT version, version_kind FROM {t} WHERE entity_type = ?1 AND entity_id = ?2"
            ),
            get: format!(
                "SELECT version, version_kind, content_type, body, body_raw, deleted FROM {t} \
                 WHERE entity_type = ?1 AND entity_id = ?2"
            ),
            all: format!(
                "SELECT entity_type, entity_id, version, version_kind, content_type, body, body_raw, deleted \
                 FROM {t} ORDER BY entity_type, entity_id"
            ),
            list_first: format!(
                "SELECT entity_type, entity_id, version, version_kind, deleted FROM {t} \
                 ORDER BY entity_type, entity_id LIMIT ?1"
            ),
            list_after: format!(
                "SELECT entity_type, entity_id, version, version_kind, deleted FROM {t} \
                 WHERE (entity_type, entity_id) > (?2, ?3) \
                 ORDER BY entity_type, entity_id LIMIT ?1"
            ),
        }
    }
}

/// How a failed statement is handled.
enum Failure {
    Transient(String),
    Record(String),
}

fn classify(e: &rusqlite::Error) -> Failure {
    match e.sqlite_error_code() {
        Some(ErrorCode::ConstraintViolation | ErrorCode::TooBig | ErrorCode::TypeMismatch) => {
            Failure::Record(e.to_string())
        }
        _ => Failure::Transient(e.to_string()),
    }
}

impl SqliteSink {
    /// Open (or create) the database, set WAL and `synchronous=FULL`, create the table if
    /// configured and check it, and start the thread that owns the connection.
    pub async fn open(cfg: &SqliteConfig) -> Result<Self, SinkBuildError> {
        if cfg.table.is_empty() || cfg.table.contains('\0') {
            return Err(SinkBuildError::config(
                SINK,
                format!("table name {:?} must be non-empty without NUL", cfg.table),
            ));
        }
        let cfg = cfg.clone();
        let max_batch = cfg.max_batch.max(1);
        let (ready_tx, ready_rx) = oneshot::channel();
        let (commands, rx) = mpsc::channel();
        let path = cfg.path.clone();
        std::thread::Builder::new()
            .name("refetch-sqlite".into())
            .spawn(move || match open_connection(&cfg) {
                Ok(conn) => {
                    let _ = ready_tx.send(Ok(()));
                    serve(conn, Statements::new(&cfg.table, cfg.deletes), rx);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(|e| SinkBuildError::unavailable(SINK, format!("cannot start thread: {e}")))?;
        ready_rx
            .await
            .map_err(|_| SinkBuildError::unavailable(SINK, "the SQLite thread ended"))??;
        Ok(SqliteSink {
            path,
            commands,
            max_batch,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, SinkError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .map_err(|_| SinkError::transient("the SQLite thread has stopped"))?;
        rx.await
            .map_err(|_| SinkError::transient("the SQLite thread dropped the request"))?
    }

    /// The stored row of `key`, tombstones included.
    pub async fn get(&self, key: &EntityKey) -> Result<Option<StoredEntity>, SinkError> {
        self.ask(|r| Command::Get(key.clone(), r)).await
    }

    /// Held keys and versions in key order (byte order of type, then id), `limit` at a time,
    /// starting after `after`. Tombstones are included (flagged). For reconciliation, like
    /// [`PostgresSink::list_versions`](crate::postgres::PostgresSink::list_versions).
    pub async fn list_versions(
        &self,
        after: Option<&EntityKey>,
        limit: usize,
    ) -> Result<Vec<HeldVersion>, SinkError> {
        self.ask(|r| Command::ListVersions(after.cloned(), limit, r))
            .await
    }

    /// Every stored row by key, tombstones included (for convergence checks and the demo).
    pub async fn snapshot(&self) -> Result<BTreeMap<EntityKey, StoredEntity>, SinkError> {
        self.ask(Command::Snapshot).await
    }
}

fn open_connection(cfg: &SqliteConfig) -> Result<Connection, SinkBuildError> {
    let fail = |what: &str, e: rusqlite::Error| {
        SinkBuildError::unavailable(SINK, format!("{what} {}: {e}", cfg.path.display()))
    };
    let conn = Connection::open(&cfg.path).map_err(|e| fail("cannot open", e))?;
    // The busy timeout first: switching to WAL needs a lock another process opening the same
    // file may hold for a moment (two `refetch` processes starting together).
    conn.busy_timeout(cfg.busy_timeout)
        .map_err(|e| fail("cannot set busy_timeout on", e))?;
    let deadline = std::time::Instant::now() + cfg.busy_timeout;
    let mode: String = loop {
        match conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)) {
            Ok(mode) => break mode,
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => return Err(fail("cannot set WAL mode on", e)),
        }
    };
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(SinkBuildError::unavailable(
            SINK,
            format!(
                "{} refuses WAL mode (journal_mode is {mode})",
                cfg.path.display()
            ),
        ));
    }
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(|e| fail("cannot set synchronous=FULL on", e))?;
    let t = quote_ident(&cfg.table);
    if cfg.create_table {
        conn.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS {t} ( \
               entity_type TEXT NOT NULL, \
               entity_id TEXT NOT NULL, \
               version INTEGER, \
               version_kind TEXT, \
               content_type TEXT, \
               body TEXT, \
               body_raw BLOB, \
               deleted INTEGER NOT NULL DEFAULT 0, \
               updated_at TEXT NOT NULL DEFAULT ({NOW}), \
               fetched_at INTEGER, \
               PRIMARY KEY (entity_type, entity_id))"
        ))
        .map_err(|e| fail("cannot create the table in", e))?;
    }
    let fetched_at = check_table(&conn, &cfg.table).map_err(|message| SinkBuildError::Schema {
        sink: SINK,
        message,
    })?;
    if fetched_at == FetchedAt::Missing {
        add_fetched_at(&conn, &cfg.table)
            .map_err(|e| fail("cannot add column fetched_at in", e))?;
    }
    Ok(conn)
}

/// Expected columns and whether the sink writes NULL into them (SQLite types are only
/// affinities, so names and nullability are what can be wrong).
const COLUMNS: &[(&str, bool)] = &[
    ("entity_type", false),
    ("entity_id", false),
    ("version", true),
    ("version_kind", true),
    ("content_type", true),
    ("body", true),
    ("body_raw", true),
    ("deleted", false),
    ("updated_at", false),
    ("fetched_at", true),
];

/// Add the `fetched_at` column to a table created before the fetch-time guard existed (a
/// nullable column: SQLite only changes the schema, no row is rewritten). Rows written before
/// have no time and are not guarded until their next write. Only done for a table that matches
/// otherwise ([`check_table`] found nothing else wrong).
fn add_fetched_at(conn: &Connection, table: &str) -> rusqlite::Result<()> {
    let columns = |conn: &Connection| -> rusqlite::Result<Vec<String>> {
        conn.prepare("SELECT name FROM pragma_table_info(?1)")?
            .query_map([table], |r| r.get(0))?
            .collect()
    };
    match conn.execute_batch(&format!(
        "ALTER TABLE {} ADD COLUMN fetched_at INTEGER",
        quote_ident(table)
    )) {
        Ok(()) => {
            tracing::info!(
                sink = SINK,
                table,
                "added column fetched_at (the fetch-time guard)"
            );
            Ok(())
        }
        // Another process added it at the same moment.
        Err(e) if columns(conn)?.iter().any(|c| c == "fetched_at") => {
            tracing::debug!(sink = SINK, error = %e, "fetched_at added by another process");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// Whether a table that otherwise matches has the `fetched_at` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FetchedAt {
    Present,
    /// A table created before the fetch-time guard: the sink adds the column.
    Missing,
}

fn check_table(conn: &Connection, table: &str) -> Result<FetchedAt, String> {
    let db = |e: rusqlite::Error| format!("cannot inspect table {table:?}: {e}");
    let mut stmt = conn
        .prepare("SELECT name, \"notnull\", dflt_value IS NOT NULL, pk FROM pragma_table_info(?1)")
        .map_err(db)?;
    let cols: Vec<(String, bool, bool, i64)> = stmt
        .query_map([table], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .map_err(db)?
        .collect::<Result<_, _>>()
        .map_err(db)?;
    if cols.is_empty() {
        return Err(format!(
            "table {table:?} does not exist (create it, or set create_table = true)"
        ));
    }
    let mut problems = Vec::new();
    let mut fetched_at = FetchedAt::Present;
    for (name, writes_null) in COLUMNS {
        match cols.iter().find(|c| c.0 == *name) {
            None if *name == "fetched_at" => fetched_at = FetchedAt::Missing,
            None => problems.push(format!("missing column {name}")),
            Some((_, notnull, _, _)) if *writes_null && *notnull => problems.push(format!(
                "column {name} is NOT NULL, but the sink writes NULL there"
            )),
            Some(_) => {}
        }
    }
    for (name, notnull, has_default, _) in &cols {
        if !COLUMNS.iter().any(|c| c.0 == name) && *notnull && !has_default {
            problems.push(format!(
                "extra column {name} is NOT NULL without a default, so the sink cannot insert rows"
            ));
        }
    }
    let mut pk: Vec<&str> = cols
        .iter()
        .filter(|c| c.3 > 0)
        .map(|c| c.0.as_str())
        .collect();
    pk.sort_unstable();
    if pk != ["entity_id", "entity_type"] && !has_unique_index(conn, table).map_err(db)? {
        problems.push("no primary key or unique index on (entity_type, entity_id)".to_owned());
    }
    if problems.is_empty() {
        Ok(fetched_at)
    } else {
        Err(format!("table {table:?}: {}", problems.join("; ")))
    }
}

fn has_unique_index(conn: &Connection, table: &str) -> rusqlite::Result<bool> {
    let mut stmt = conn.prepare(
        "SELECT il.name FROM pragma_index_list(?1) il WHERE il.\"unique\" = 1 AND il.partial = 0",
    )?;
    let names: Vec<String> = stmt
        .query_map([table], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for name in names {
        let mut cols: Vec<String> = conn
            .prepare("SELECT name FROM pragma_index_info(?1)")?
            .query_map([&name], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        cols.sort_unstable();
        if cols == ["entity_id", "entity_type"] {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The connection thread: serve commands until every sender is gone.
fn serve(mut conn: Connection, sql: Statements, rx: mpsc::Receiver<Command>) {
    while let Ok(cmd) = rx.recv() {
        match cmd {
            Command::Write(batch, fetched_at, reply) => {
                let _ = reply.send(write_batch(&mut conn, &sql, &batch, &fetched_at));
            }
            Command::HeldVersion(key, reply) => {
                let r = conn
                    .prepare_cached(&sql.held_version)
                    .and_then(|mut s| {
                        s.query_row(params![key.entity_type(), key.id()], |r| {
                            Ok(version_from_parts(
                                r.get(0)?,
                                r.get::<_, Option<String>>(1)?.as_deref(),
                            ))
                        })
                        .optional()
                    })
                    .map(Option::flatten)
                    .map_err(|e| SinkError::transient(e.to_string()));
                let _ = reply.send(r);
            }
            Command::Get(key, reply) => {
                let r = conn
                    .prepare_cached(&sql.get)
                    .and_then(|mut s| {
                        s.query_row(params![key.entity_type(), key.id()], |r| {
                            Ok(StoredEntity {
                                key: key.clone(),
                                version: version_from_parts(
                                    r.get(0)?,
                                    r.get::<_, Option<String>>(1)?.as_deref(),
                                ),
                                content_type: r.get(2)?,
                                body: stored_body(r.get(3)?, r.get(4)?),
                                deleted: r.get::<_, i64>(5)? != 0,
                            })
                        })
                        .optional()
                    })
                    .map_err(|e| SinkError::transient(e.to_string()));
                let _ = reply.send(r);
            }
            Command::ListVersions(after, limit, reply) => {
                let r = list_versions(&conn, &sql, after.as_ref(), limit)
                    .map_err(|e| SinkError::transient(e.to_string()));
                let _ = reply.send(r);
            }
            Command::Snapshot(reply) => {
                let r = snapshot(&conn, &sql).map_err(|e| SinkError::transient(e.to_string()));
                let _ = reply.send(r);
            }
        }
    }
}

fn list_versions(
    conn: &Connection,
    sql: &Statements,
    after: Option<&EntityKey>,
    limit: usize,
) -> rusqlite::Result<Vec<HeldVersion>> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let row = |r: &rusqlite::Row<'_>| {
        Ok(HeldVersion {
            key: EntityKey::new(r.get::<_, String>(0)?, r.get::<_, String>(1)?),
            version: version_from_parts(r.get(2)?, r.get::<_, Option<String>>(3)?.as_deref()),
            deleted: r.get::<_, i64>(4)? != 0,
        })
    };
    match after {
        None => conn
            .prepare_cached(&sql.list_first)?
            .query_map(params![limit], row)?
            .collect(),
        Some(k) => conn
            .prepare_cached(&sql.list_after)?
            .query_map(params![limit, k.entity_type(), k.id()], row)?
            .collect(),
    }
}

fn snapshot(
    conn: &Connection,
    sql: &Statements,
) -> rusqlite::Result<BTreeMap<EntityKey, StoredEntity>> {
    let mut stmt = conn.prepare_cached(&sql.all)?;
    let rows = stmt.query_map([], |r| {
        let key = EntityKey::new(r.get::<_, String>(0)?, r.get::<_, String>(1)?);
        Ok(StoredEntity {
            key,
            version: version_from_parts(r.get(2)?, r.get::<_, Option<String>>(3)?.as_deref()),
            content_type: r.get(4)?,
            body: stored_body(r.get(5)?, r.get(6)?),
            deleted: r.get::<_, i64>(7)? != 0,
        })
    })?;
    let mut out = BTreeMap::new();
    for row in rows {
        let row = row?;
        out.insert(row.key.clone(), row);
    }
    Ok(out)
}

/// Write `batch` in one transaction (`fetched_at[i]` is when change `i`'s fetch started, if
/// known). Returns how many statements changed a row.
fn write_rows(
    conn: &mut Connection,
    sql: &Statements,
    batch: &[Change],
    fetched_at: &[Option<i64>],
) -> Result<usize, Failure> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(|e| classify(&e))?;
    let mut changed = 0;
    for (i, change) in batch.iter().enumerate() {
        let key = change.key();
        let at = fetched_at.get(i).copied().flatten();
        let n = match change {
            Change::Delete { .. } => tx
                .prepare_cached(&sql.delete)
                .and_then(|mut s| s.execute(params![key.entity_type(), key.id(), at])),
            Change::Upsert { entity, .. } => {
                let json = json_text(entity);
                let raw = if json.is_some() {
                    None
                } else {
                    Some(&entity.body[..])
                };
                let (version, kind) = version_parts(entity.version);
                tx.prepare_cached(&sql.upsert).and_then(|mut s| {
                    s.execute(params![
                        key.entity_type(),
                        key.id(),
                        version,
                        kind,
                        entity.content_type.as_deref(),
                        json,
                        raw,
                        at
                    ])
                })
            }
        }
        .map_err(|e| classify(&e))?;
        changed += n;
    }
    tx.commit().map_err(|e| classify(&e))?;
    Ok(changed)
}

fn write_batch(
    conn: &mut Connection,
    sql: &Statements,
    batch: &[Change],
    fetched_at: &[SystemTime],
) -> Result<WriteReport, SinkError> {
    let times: Vec<Option<i64>> = (0..batch.len())
        .map(|i| fetched_at.get(i).copied().map(micros))
        .collect();
    let message = match write_rows(conn, sql, batch, &times) {
        Ok(changed) => {
            let skipped = batch.len().saturating_sub(changed);
            if skipped > 0 {
                metrics::counter!("refetch_sink_version_guard_skips_total", "sink" => SINK)
                    .increment(skipped as u64);
            }
            return Ok(WriteReport::all_durable());
        }
        Err(Failure::Transient(m)) => return Err(SinkError::transient(m)),
        Err(Failure::Record(m)) => m,
    };
    if batch.len() == 1 {
        return Ok(WriteReport {
            failed: vec![(0, SinkError::permanent(message))],
        });
    }
    tracing::warn!(sink = SINK, error = %message, "a record was refused; writing the batch one record at a time");
    let mut failed = Vec::new();
    for (i, change) in batch.iter().enumerate() {
        match write_rows(
            conn,
            sql,
            std::slice::from_ref(change),
            std::slice::from_ref(&times[i]),
        ) {
            Ok(_) => {}
            Err(Failure::Transient(m)) => return Err(SinkError::transient(m)),
            Err(Failure::Record(m)) => {
                tracing::warn!(sink = SINK, index = i, key = %change.key(), error = %m, "record refused");
                failed.push((i, SinkError::permanent(m)));
            }
        }
    }
    Ok(WriteReport { failed })
}

impl SqliteSink {
    async fn write_timed(
        &self,
        batch: &[Change],
        fetched_at: &[SystemTime],
    ) -> Result<WriteReport, SinkError> {
        if batch.is_empty() {
            return Ok(WriteReport::all_durable());
        }
        let started = Instant::now();
        let result = self
            .ask(|r| Command::Write(batch.to_vec(), fetched_at.to_vec(), r))
            .await;
        if let Err(e) = &result {
            tracing::warn!(sink = SINK, records = batch.len(), error = %e, "batch not written");
        }
        crate::metrics::record_batch(SINK, batch.len(), started, &result);
        result
    }
}

#[async_trait]
impl Sink for SqliteSink {
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
        self.ask(|r| Command::HeldVersion(key.clone(), r)).await
    }

    fn tracks_versions(&self) -> bool {
        true
    }

    fn max_batch(&self) -> usize {
        self.max_batch
    }

    async fn check(&self) -> Result<(), SinkError> {
        self.held_version(&EntityKey::new("", "")).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests;
