use std::time::Duration;

use super::*;
use crate::stored::StoredBody;
use refetch::Entity;
use serde_json::json;

fn cfg(dir: &tempfile::TempDir, deletes: DeleteMode) -> SqliteConfig {
    SqliteConfig {
        path: dir.path().join("sink.db"),
        deletes,
        busy_timeout: Duration::from_millis(200),
        ..SqliteConfig::default()
    }
}

fn key(id: &str) -> EntityKey {
    EntityKey::new("customer", id)
}

fn upsert(id: &str, body: serde_json::Value, v: Option<i64>) -> Change {
    Change::Upsert {
        key: key(id),
        entity: Entity::json(body.to_string(), v.map(Version::Int)),
    }
}

async fn body_of(sink: &SqliteSink, id: &str) -> Option<StoredBody> {
    sink.get(&key(id)).await.unwrap().and_then(|e| e.body)
}

#[tokio::test]
async fn version_guard_and_held_version() {
    let dir = tempfile::tempdir().unwrap();
    let sink = SqliteSink::open(&cfg(&dir, DeleteMode::Delete))
        .await
        .unwrap();
    assert!(sink.tracks_versions());
    sink.write(&[upsert("1", json!({"v": 2}), Some(2))])
        .await
        .unwrap();
    sink.write(&[upsert("1", json!({"v": 1}), Some(1))])
        .await
        .unwrap();
    assert_eq!(
        body_of(&sink, "1").await,
        Some(StoredBody::Json(json!({"v": 2})))
    );
    sink.write(&[upsert("1", json!({"v": 3}), Some(3))])
        .await
        .unwrap();
    assert_eq!(
        body_of(&sink, "1").await,
        Some(StoredBody::Json(json!({"v": 3})))
    );
    assert_eq!(
        sink.held_version(&key("1")).await.unwrap(),
        Some(Version::Int(3))
    );
    sink.write(&[upsert("1", json!({"v": "none"}), None)])
        .await
        .unwrap();
    assert_eq!(sink.held_version(&key("1")).await.unwrap(), None);
    sink.write(&[Change::Upsert {
        key: key("2"),
        entity: Entity::json("{}", Some(Version::Timestamp(77))),
    }])
    .await
    .unwrap();
    assert_eq!(
        sink.held_version(&key("2")).await.unwrap(),
        Some(Version::Timestamp(77))
    );
    assert_eq!(sink.held_version(&key("absent")).await.unwrap(), None);
    sink.check().await.unwrap();
}

#[tokio::test]
async fn deletes_and_tombstones() {
    let dir = tempfile::tempdir().unwrap();
    let sink = SqliteSink::open(&cfg(&dir, DeleteMode::Delete))
        .await
        .unwrap();
    sink.write(&[upsert("1", json!({}), Some(1))])
        .await
        .unwrap();
    sink.write(&[Change::Delete { key: key("1") }])
        .await
        .unwrap();
    assert_eq!(sink.get(&key("1")).await.unwrap(), None);
    drop(sink);

    let dir = tempfile::tempdir().unwrap();
    let sink = SqliteSink::open(&cfg(&dir, DeleteMode::Tombstone))
        .await
        .unwrap();
    sink.write(&[upsert("1", json!({"a": 1}), Some(5))])
        .await
        .unwrap();
    sink.write(&[Change::Delete { key: key("1") }])
        .await
        .unwrap();
    let row = sink.get(&key("1")).await.unwrap().unwrap();
    assert!(row.deleted && row.body.is_none());
    assert_eq!(row.version, Some(Version::Int(5)));
    sink.write(&[upsert("1", json!({"a": "stale"}), Some(4))])
        .await
        .unwrap();
    assert!(sink.get(&key("1")).await.unwrap().unwrap().deleted);
    sink.write(&[upsert("1", json!({"a": 6}), Some(6))])
        .await
        .unwrap();
    let row = sink.get(&key("1")).await.unwrap().unwrap();
    assert!(!row.deleted);
    assert_eq!(row.body, Some(StoredBody::Json(json!({"a": 6}))));
}

#[tokio::test]
async fn one_bad_record_is_reported_alone() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(&dir, DeleteMode::Delete);
    let conn = Connection::open(&c.path).unwrap();
    conn.execute_batch(
        "CREATE TABLE refetch_entities (entity_type TEXT NOT NULL, entity_id TEXT NOT NULL \
         CHECK (entity_id <> 'bad'), version INTEGER, version_kind TEXT, content_type TEXT, \
         body TEXT, body_raw BLOB, deleted INTEGER NOT NULL DEFAULT 0, \
         updated_at TEXT NOT NULL DEFAULT '', PRIMARY KEY (entity_type, entity_id))",
    )
    .unwrap();
    drop(conn);
    let sink = SqliteSink::open(&c).await.unwrap();
    let report = sink
        .write(&[
            upsert("a", json!(1), Some(1)),
            upsert("bad", json!(2), Some(1)),
            upsert("c", json!(3), Some(1)),
        ])
        .await
        .unwrap();
    assert_eq!(report.failed.len(), 1, "{report:?}");
    assert_eq!(report.failed[0].0, 1);
    assert!(matches!(report.failed[0].1, SinkError::Permanent { .. }));
    let all = sink.snapshot().await.unwrap();
    assert_eq!(
        all.keys().cloned().collect::<Vec<_>>(),
        vec![key("a"), key("c")]
    );
}

#[tokio::test]
async fn a_locked_database_fails_the_batch_transiently_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(&dir, DeleteMode::Delete);
    let sink = SqliteSink::open(&c).await.unwrap();
    let other = Connection::open(&c.path).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let err = sink
        .write(&[
            upsert("a", json!(1), Some(1)),
            upsert("b", json!(1), Some(1)),
        ])
        .await
        .unwrap_err();
    assert!(matches!(err, SinkError::Transient { .. }), "{err:?}");
    other.execute_batch("ROLLBACK").unwrap();
    assert!(sink.snapshot().await.unwrap().is_empty());
    sink.write(&[upsert("a", json!(1), Some(1))]).await.unwrap();
    assert_eq!(sink.snapshot().await.unwrap().len(), 1);
}

#[tokio::test]
async fn non_json_bodies_are_kept_verbatim_and_snapshot_orders_by_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let sink = SqliteSink::open(&cfg(&dir, DeleteMode::Delete))
        .await
        .unwrap();
    let raw = Change::Upsert {
        key: key("b"),
        entity: Entity {
            body: bytes::Bytes::from_static(&[0xff, 0, 1]),
            content_type: Some("application/octet-stream".into()),
            version: None,
            validators: None,
        },
    };
    sink.write(&[
        raw,
        upsert("B", json!([1]), None),
        upsert("ä", json!(null), None),
    ])
    .await
    .unwrap();
    let all = sink.snapshot().await.unwrap();
    let ids: Vec<&str> = all.keys().map(|k| k.id()).collect();
    assert_eq!(ids, ["B", "b", "ä"]);
    assert_eq!(all[&key("b")].body, Some(StoredBody::Raw(vec![0xff, 0, 1])));
    assert_eq!(
        all[&key("ä")].body,
        Some(StoredBody::Json(serde_json::Value::Null))
    );
}

#[tokio::test]
async fn a_table_that_does_not_match_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(&dir, DeleteMode::Delete);
    let conn = Connection::open(&c.path).unwrap();
    conn.execute_batch(
        "CREATE TABLE wrong (entity_type TEXT, entity_id TEXT, version INTEGER, \
         body TEXT NOT NULL, deleted INTEGER, updated_at TEXT, owner TEXT NOT NULL)",
    )
    .unwrap();
    drop(conn);
    c.table = "wrong".into();
    c.create_table = false;
    let err = SqliteSink::open(&c).await.unwrap_err().to_string();
    for expected in [
        "missing column version_kind",
        "missing column body_raw",
        "column body is NOT NULL",
        "extra column owner",
        "no primary key",
    ] {
        assert!(err.contains(expected), "{expected:?} not in {err}");
    }
    c.table = "absent".into();
    let err = SqliteSink::open(&c).await.unwrap_err().to_string();
    assert!(err.contains("does not exist"), "{err}");
}

/// Kill -9 right after an acknowledgement: the acknowledged rows are in the database. The test
/// runs itself as the child process (see `crash_test`).
#[test]
fn acknowledged_rows_survive_sigkill() {
    const ENV: &str = "REFETCH_SINKS_CRASH_SQLITE";
    const NAME: &str = "sqlite::tests::acknowledged_rows_survive_sigkill";
    if let Some(path) = crate::crash_test::child_target(ENV) {
        crate::crash_test::act_as_child(async move {
            let sink = SqliteSink::open(&SqliteConfig {
                path,
                ..SqliteConfig::default()
            })
            .await
            .unwrap();
            let batch: Vec<Change> = (0..100)
                .map(|i| upsert(&i.to_string(), json!({"i": i}), Some(i)))
                .collect();
            sink.write(&batch).await.unwrap();
        });
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.db");
    crate::crash_test::run_child_until_acked(NAME, ENV, &path);
    let conn = Connection::open(&path).unwrap();
    let (count, sum): (i64, i64) = conn
        .query_row(
            "SELECT count(*), sum(version) FROM refetch_entities",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((count, sum), (100, (0..100).sum::<i64>()));
}

#[tokio::test]
async fn list_versions_pages_in_key_order_with_tombstones() {
    let dir = tempfile::tempdir().unwrap();
    let sink = SqliteSink::open(&cfg(&dir, DeleteMode::Tombstone))
        .await
        .unwrap();
    let mut batch: Vec<Change> = ["b", "a", "c", "a/b", "é"]
        .iter()
        .enumerate()
        .map(|(i, id)| upsert(id, json!({"i": i}), Some(i as i64 + 1)))
        .collect();
    batch.push(Change::Upsert {
        key: EntityKey::new("address", "9"),
        entity: Entity::json("{}", None),
    });
    sink.write(&batch).await.unwrap();
    sink.write(&[Change::Delete { key: key("c") }])
        .await
        .unwrap();
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let page = sink.list_versions(after.as_ref(), 2).await.unwrap();
        assert!(page.len() <= 2);
        let Some(last) = page.last() else { break };
        after = Some(last.key.clone());
        all.extend(page);
    }
    let keys: Vec<String> = all.iter().map(|h| h.key.to_string()).collect();
    let mut sorted: Vec<EntityKey> = all.iter().map(|h| h.key.clone()).collect();
    sorted.sort();
    assert_eq!(
        all.iter().map(|h| h.key.clone()).collect::<Vec<_>>(),
        sorted,
        "byte order like EntityKey's Ord: {keys:?}"
    );
    assert_eq!(all.len(), 6, "{keys:?}");
    assert_eq!(all[0].key, EntityKey::new("address", "9"));
    assert_eq!(all[0].version, None);
    let c = all.iter().find(|h| h.key == key("c")).unwrap();
    assert!(c.deleted, "tombstones are listed and flagged");
    let b = all.iter().find(|h| h.key == key("b")).unwrap();
    assert_eq!((b.version, b.deleted), (Some(Version::Int(1)), false));
    // Starting after (type, "") skips the types before it.
    let from_customer = sink
        .list_versions(Some(&EntityKey::new("customer", "")), 100)
        .await
        .unwrap();
    assert_eq!(from_customer.len(), 5);
}

/// Two processes starting at the same moment both switch the same new file to WAL: the second
/// waits for the first's lock (up to `busy_timeout`) instead of failing with "database is locked".
#[test]
fn concurrent_opens_of_a_new_file_both_succeed() {
    for round in 0..20 {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(&dir, DeleteMode::Delete);
        let handles: Vec<_> = (0..3)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || open_connection(&c).map(|_| ()))
            })
            .collect();
        for h in handles {
            h.join()
                .unwrap()
                .unwrap_or_else(|e| panic!("round {round}: {e}"));
        }
    }
}

// ----- the fetch-time guard ----------------------------------------------------------------------

/// A time `secs` seconds after a fixed base, as the engine's `fetched_at`.
fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
}

/// Write one change fetched at `t`, as the engine does.
async fn write_at(sink: &SqliteSink, change: Change, t: SystemTime) {
    let report = sink
        .write_with(&[change], &WriteContext::new(&[t]))
        .await
        .unwrap();
    assert!(report.failed.is_empty(), "{report:?}");
}

fn stored_fetched_at(path: &Path, id: &str) -> Option<i64> {
    let conn = Connection::open(path).unwrap();
    conn.query_row(
        "SELECT fetched_at FROM refetch_entities WHERE entity_type = 'customer' AND entity_id = ?1",
        [id],
        |r| r.get(0),
    )
    .unwrap()
}

/// An unversioned state read earlier never overwrites one read later (the late write of a former
/// owner of the partition), and a late delete fetched before the held state does not remove it.
#[tokio::test]
async fn unversioned_states_and_deletes_are_guarded_by_fetch_time() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(&dir, DeleteMode::Delete);
    let sink = SqliteSink::open(&c).await.unwrap();
    write_at(&sink, upsert("1", json!({"s": "new"}), None), at(20)).await;
    assert_eq!(stored_fetched_at(&c.path, "1"), Some(micros(at(20))));
    write_at(&sink, upsert("1", json!({"s": "late"}), None), at(10)).await;
    assert_eq!(
        body_of(&sink, "1").await,
        Some(StoredBody::Json(json!({"s": "new"}))),
        "a state fetched earlier overwrote one fetched later"
    );
    // Equal times overwrite: a retried batch is idempotent.
    write_at(&sink, upsert("1", json!({"s": "retry"}), None), at(20)).await;
    assert_eq!(
        body_of(&sink, "1").await,
        Some(StoredBody::Json(json!({"s": "retry"})))
    );
    // A versioned state over an unversioned row cannot compare versions: fetch time decides.
    write_at(&sink, upsert("1", json!({"s": "v9"}), Some(9)), at(15)).await;
    assert_eq!(
        body_of(&sink, "1").await,
        Some(StoredBody::Json(json!({"s": "retry"})))
    );
    // A late delete fetched before the held state does not remove it.
    write_at(&sink, Change::Delete { key: key("1") }, at(19)).await;
    assert!(
        sink.get(&key("1")).await.unwrap().is_some(),
        "a delete fetched earlier removed a state fetched later"
    );
    write_at(&sink, Change::Delete { key: key("1") }, at(21)).await;
    assert_eq!(sink.get(&key("1")).await.unwrap(), None);

    // Without a time (`write`) there is nothing to compare: it overwrites and leaves no time.
    write_at(&sink, upsert("2", json!({"s": "timed"}), None), at(30)).await;
    sink.write(&[upsert("2", json!({"s": "untimed"}), None)])
        .await
        .unwrap();
    assert_eq!(
        body_of(&sink, "2").await,
        Some(StoredBody::Json(json!({"s": "untimed"})))
    );
    assert_eq!(stored_fetched_at(&c.path, "2"), None);
}

/// Comparable versions keep deciding by version, whatever the fetch times say.
#[tokio::test]
async fn versioned_states_stay_guarded_by_version() {
    let dir = tempfile::tempdir().unwrap();
    let sink = SqliteSink::open(&cfg(&dir, DeleteMode::Delete))
        .await
        .unwrap();
    write_at(&sink, upsert("1", json!({"v": 2}), Some(2)), at(10)).await;
    write_at(&sink, upsert("1", json!({"v": 1}), Some(1)), at(20)).await;
    assert_eq!(
        body_of(&sink, "1").await,
        Some(StoredBody::Json(json!({"v": 2})))
    );
    write_at(&sink, upsert("1", json!({"v": 3}), Some(3)), at(5)).await;
    assert_eq!(
        body_of(&sink, "1").await,
        Some(StoredBody::Json(json!({"v": 3})))
    );
    // Equal versions: a later read (or a retry of the same) overwrites, an earlier one does not.
    write_at(&sink, upsert("1", json!({"v": "3b"}), Some(3)), at(6)).await;
    write_at(&sink, upsert("1", json!({"v": "3b"}), Some(3)), at(6)).await;
    write_at(&sink, upsert("1", json!({"v": "3-early"}), Some(3)), at(4)).await;
    assert_eq!(
        body_of(&sink, "1").await,
        Some(StoredBody::Json(json!({"v": "3b"}))),
        "an earlier read of an equal version overwrote a later one"
    );
}

/// A tombstone keeps the last version: a late write of that same version, read before the
/// delete (a former owner's write on the wire), must not resurrect the entity.
#[tokio::test]
async fn a_tombstone_is_not_resurrected_by_a_late_read_of_its_version() {
    let dir = tempfile::tempdir().unwrap();
    let sink = SqliteSink::open(&cfg(&dir, DeleteMode::Tombstone))
        .await
        .unwrap();
    write_at(&sink, upsert("1", json!({"v": 5}), Some(5)), at(10)).await;
    write_at(&sink, Change::Delete { key: key("1") }, at(20)).await;
    write_at(&sink, upsert("1", json!({"v": 5}), Some(5)), at(15)).await;
    let row = sink.get(&key("1")).await.unwrap().unwrap();
    assert!(
        row.deleted,
        "a read of v5 from before the delete resurrected the entity"
    );
    assert_eq!(row.version, Some(Version::Int(5)));
    write_at(&sink, upsert("1", json!({"v": 6}), Some(6)), at(12)).await;
    assert!(
        !sink.get(&key("1")).await.unwrap().unwrap().deleted,
        "a newer version comes back"
    );
}

/// Tombstones record the delete's fetch time: a late delete does not hide a newer state, and a
/// late upsert fetched before the delete does not resurrect the entity.
#[tokio::test]
async fn tombstones_are_guarded_by_fetch_time_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let sink = SqliteSink::open(&cfg(&dir, DeleteMode::Tombstone))
        .await
        .unwrap();
    write_at(&sink, upsert("1", json!({"s": "live"}), None), at(20)).await;
    write_at(&sink, Change::Delete { key: key("1") }, at(10)).await;
    let row = sink.get(&key("1")).await.unwrap().unwrap();
    assert!(
        !row.deleted,
        "a delete fetched earlier hid a state fetched later"
    );
    write_at(&sink, Change::Delete { key: key("1") }, at(30)).await;
    assert!(sink.get(&key("1")).await.unwrap().unwrap().deleted);
    write_at(&sink, upsert("1", json!({"s": "stale"}), None), at(25)).await;
    assert!(
        sink.get(&key("1")).await.unwrap().unwrap().deleted,
        "a state fetched before the delete resurrected the entity"
    );
    write_at(&sink, upsert("1", json!({"s": "back"}), None), at(40)).await;
    let row = sink.get(&key("1")).await.unwrap().unwrap();
    assert!(!row.deleted);
    assert_eq!(row.body, Some(StoredBody::Json(json!({"s": "back"}))));
}

/// A table created before the fetch-time guard gets the `fetched_at` column at start-up; its old
/// rows have no time (overwritten by the next write), new writes are guarded. A table that does
/// not match otherwise is refused without being altered.
#[tokio::test]
async fn a_table_without_fetched_at_gets_the_column_and_the_guard() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = cfg(&dir, DeleteMode::Delete);
    c.create_table = false;
    let conn = Connection::open(&c.path).unwrap();
    conn.execute_batch(
        "CREATE TABLE refetch_entities (entity_type TEXT NOT NULL, entity_id TEXT NOT NULL, \
         version INTEGER, version_kind TEXT, content_type TEXT, body TEXT, body_raw BLOB, \
         deleted INTEGER NOT NULL DEFAULT 0, updated_at TEXT NOT NULL DEFAULT '', \
         PRIMARY KEY (entity_type, entity_id)); \
         INSERT INTO refetch_entities (entity_type, entity_id, body) VALUES ('customer', 'old', '{}'); \
         CREATE TABLE wrong (entity_type TEXT, entity_id TEXT, body TEXT NOT NULL);",
    )
    .unwrap();
    drop(conn);
    let sink = SqliteSink::open(&c).await.unwrap();
    assert_eq!(stored_fetched_at(&c.path, "old"), None);
    write_at(&sink, upsert("old", json!({"s": "new"}), None), at(20)).await;
    write_at(&sink, upsert("old", json!({"s": "late"}), None), at(10)).await;
    assert_eq!(
        body_of(&sink, "old").await,
        Some(StoredBody::Json(json!({"s": "new"})))
    );
    drop(sink);
    // Opening again finds the column and changes nothing.
    let sink = SqliteSink::open(&c).await.unwrap();
    assert_eq!(stored_fetched_at(&c.path, "old"), Some(micros(at(20))));
    drop(sink);

    c.table = "wrong".into();
    assert!(SqliteSink::open(&c).await.is_err());
    let conn = Connection::open(&c.path).unwrap();
    let added: i64 = conn
        .query_row(
            "SELECT count(*) FROM pragma_table_info('wrong') WHERE name = 'fetched_at'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(added, 0, "a refused table is not altered");
}
