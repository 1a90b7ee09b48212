//! `refetch backfill` and `refetch reconcile` as an operator runs them: the real binary against a
//! local paging source (offset, page, cursor and `Link` styles) whose entities change during the
//! run, with SQLite and PostgreSQL sinks.
//!
//! The backfill crash test needs no services. Reconcile repairs through the engine's refresh
//! pipeline, whose dead-letter producer needs a broker (and the PostgreSQL case a server): run
//! those with `scripts/test`, or `REFETCH_TEST_KAFKA=host:port REFETCH_TEST_PG=postgres://...
//! cargo test -p refetch-cli --test backfill -- --include-ignored`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use refetch::{Change, Entity, EntityKey, Sink, Version};
use refetch_sinks::sqlite::SqliteSink;
use refetch_sinks::stored::StoredBody;
use refetch_sinks::{DeleteMode, PostgresConfig, SqliteConfig};
use refetch_testkit::http_source::{Fault, HttpSource, HttpSourceOptions};
use refetch_testkit::kafka;
use refetch_testkit::names::unique;
use refetch_testkit::process::{kill9, spawn, wait_for, wait_for_value};
use serde_json::{Value, json};

async fn refetch(args: &[&str]) -> (i32, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_refetch"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// The `[fetcher.sources.customer.listing]` table for a paging style.
fn listing(style: &str, base: &str, page_size: usize, complete: bool) -> String {
    let urls = match style {
        "offset" => format!(r#"url = "{base}/customer?offset={{offset}}&limit={{limit}}""#),
        "page" => format!(r#"url = "{base}/customer?page={{page}}&per_page={{limit}}""#),
        "cursor" => format!(
            "url = \"{base}/customer?limit={{limit}}\"\ncursor_url = \"{base}/customer?cursor={{cursor}}&limit={{limit}}\""
        ),
        "link" => format!(r#"url = "{base}/customer?limit={{limit}}""#),
        other => panic!("{other}"),
    };
    format!(
        "paging = \"{style}\"\n{urls}\npage_size = {page_size}\ncomplete = {complete}\ntotal = \"/total\"\n"
    )
}

fn write_config(
    dir: &Path,
    brokers: &str,
    group: &str,
    topic: &str,
    base: &str,
    listing: &str,
    sink: &str,
) -> PathBuf {
    let config = dir.join("refetch.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[kafka]
brokers = "{brokers}"
group_id = "{group}"

[[topics]]
name = "{topic}"
decoder = {{ kind = "json", fixed_type = "customer", id = "/id" }}

[engine]
window = "20ms"
max_wait = "200ms"
commit_interval = "100ms"

[fetcher.sources.customer]
url = "{base}/customer/{{id}}"
version = {{ pointer = "/version", kind = "integer" }}
not_found = {{ pointer = "/error", equals = "not_found" }}

[fetcher.sources.customer.listing]
{listing}

[sink]
{sink}

[ops]
listen = "127.0.0.1:0"
"#
        ),
    )
    .unwrap();
    config
}

fn sqlite_sink(path: &Path) -> String {
    format!("kind = \"sqlite\"\npath = \"{}\"", path.display())
}

/// What a table sink holds: id -> (version, body), tombstones left out.
type Held = BTreeMap<String, (Option<Version>, Option<Value>)>;

async fn sqlite_held(path: &Path) -> Held {
    let sink = SqliteSink::open(&SqliteConfig {
        path: path.to_path_buf(),
        ..SqliteConfig::default()
    })
    .await
    .unwrap();
    sink.snapshot()
        .await
        .unwrap()
        .into_iter()
        .filter(|(k, e)| k.entity_type() == "customer" && !e.deleted)
        .map(|(k, e)| {
            let body = match e.body {
                Some(StoredBody::Json(v)) => Some(v),
                _ => None,
            };
            (k.id().to_owned(), (e.version, body))
        })
        .collect()
}

/// The source's live entities: id -> (version, body as a fetch returns it).
fn source_state(source: &HttpSource) -> BTreeMap<String, (i64, Value)> {
    source
        .snapshot()
        .into_iter()
        .filter_map(|((t, id), s)| (t == "customer").then_some((id, s?)))
        .collect()
}

fn assert_equal(held: &Held, source: &HttpSource) {
    let want = source_state(source);
    let held_ids: BTreeSet<&String> = held.keys().collect();
    let want_ids: BTreeSet<&String> = want.keys().collect();
    assert_eq!(held_ids, want_ids, "sink and source hold different ids");
    for (id, (v, body)) in &want {
        let (hv, hb) = &held[id];
        assert_eq!(*hv, Some(Version::Int(*v)), "version of {id}");
        assert_eq!(hb.as_ref(), Some(body), "body of {id}");
    }
}

fn listing_requests(source: &HttpSource) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for r in source.recorded() {
        if r.target.starts_with("/customer?") {
            *out.entry(r.target).or_default() += 1;
        }
    }
    out
}

fn state_pages(path: &Path) -> Option<(u64, bool)> {
    let v: Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    let t = &v["types"]["customer"];
    Some((t["pages"].as_u64()?, t["done"].as_bool()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_killed_midway_resumes_from_its_checkpoint() {
    let source = HttpSource::start(HttpSourceOptions::default())
        .await
        .unwrap();
    let ids: Vec<String> = (0..300).map(|i| format!("c{i:04}")).collect();
    for id in &ids {
        source.put("customer", id, json!({"name": id}));
    }
    // Every listing page takes a while, so the kill lands mid-way.
    source.set_latency(Duration::from_millis(40));
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("sink.db");
    let config = write_config(
        dir.path(),
        "127.0.0.1:9",
        "unused",
        "unused",
        &source.base_url(),
        &listing("cursor", &source.base_url(), 10, true),
        &sqlite_sink(&db),
    );
    let cfg = config.to_str().unwrap();
    let state = dir.path().join("refetch.toml.backfill.json");

    // Entities change while the first run loads them.
    let mutator = source.spawn_mutator(&["customer"], &ids, 100.0);
    let mut first = spawn(
        env!("CARGO_BIN_EXE_refetch"),
        ["backfill", "--config", cfg],
        [("RUST_LOG", "warn")],
        dir.path().join("first.log"),
    )
    .unwrap();
    let pages_before_kill = wait_for_value(
        "five acknowledged pages in the checkpoint",
        Duration::from_secs(30),
        || {
            let state = state.clone();
            async move { state_pages(&state).filter(|(p, _)| *p >= 5).map(|(p, _)| p) }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", first.log()));
    kill9(&mut first).await.unwrap();
    let (at_kill, done) = state_pages(&state).unwrap();
    assert!(at_kill >= pages_before_kill);
    assert!(!done, "the kill came too late: the backfill had finished");
    let mutations = mutator.stop().await;
    assert!(!mutations.is_empty());

    let (code, out) = refetch(&["backfill", "--config", cfg]).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("resuming after {at_kill} page(s)")),
        "{out}"
    );
    assert!(out.contains("backfill summary"), "{out}");
    assert_eq!(state_pages(&state), Some((30, true)));

    // No page was loaded twice, except the one in flight when the process died.
    let requests = listing_requests(&source);
    assert_eq!(requests.len(), 30, "{requests:#?}");
    let twice: Vec<_> = requests.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.len() <= 1 && twice.iter().all(|(_, n)| **n == 2),
        "pages loaded more than once: {twice:?}"
    );

    // Every entity is in the sink; those that did not change after the run started are
    // exactly the source's, the others are at most as new (reconcile repairs those).
    let held = sqlite_held(&db).await;
    let want = source_state(&source);
    assert_eq!(
        held.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    let changed: BTreeSet<&str> = mutations.iter().map(|m| m.id.as_str()).collect();
    for (id, (v, body)) in &want {
        let (hv, hb) = &held[id];
        let Some(Version::Int(hv)) = hv else {
            panic!("{id} has no version")
        };
        assert!(hv <= v, "{id}: sink {hv} newer than source {v}");
        if !changed.contains(id.as_str()) {
            assert_eq!((hv, hb.as_ref()), (v, Some(body)), "{id}");
        }
    }

    // A finished backfill starts over on the next run.
    source.set_latency(Duration::ZERO);
    let (code, out) = refetch(&["backfill", "--config", cfg]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("starting over"), "{out}");
    assert_equal(&sqlite_held(&db).await, &source);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_pages_in_each_style() {
    let source = HttpSource::start(HttpSourceOptions::default())
        .await
        .unwrap();
    for i in 0..57 {
        source.put("customer", &format!("{i}"), json!({"n": i}));
    }
    for style in ["offset", "page", "cursor", "link"] {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("sink.db");
        let config = write_config(
            dir.path(),
            "127.0.0.1:9",
            "unused",
            "unused",
            &source.base_url(),
            &listing(style, &source.base_url(), 8, true),
            &sqlite_sink(&db),
        );
        // The source fails transiently at first: the page is retried.
        source.fail_next(2, Fault::Status(503));
        let (code, out) = refetch(&["backfill", "--config", config.to_str().unwrap()]).await;
        assert_eq!(code, 0, "{style}: {out}");
        assert!(
            out.contains("customer: 8 page(s), 57 item(s) (57 written from the listing"),
            "{style}: {out}"
        );
        assert_equal(&sqlite_held(&db).await, &source);
        if style == "link" {
            let (code, out) = refetch(&[
                "backfill",
                "--config",
                config.to_str().unwrap(),
                "--type",
                "customer",
                "--restart",
            ])
            .await;
            assert_eq!(code, 0, "{out}");
            assert!(!out.contains("starting over"), "{out}");
            assert!(out.contains("customer: 8 page(s), 57 item(s)"), "{out}");
            let (code, out) = refetch(&[
                "backfill",
                "--config",
                config.to_str().unwrap(),
                "--type",
                "order",
            ])
            .await;
            assert_eq!(code, 2, "{out}");
            assert!(
                out.contains("has no [fetcher.sources.order.listing]"),
                "{out}"
            );
        }
    }
}

/// Plant drift in a table sink: rows missing, stale, orphaned; returns the expected counts.
async fn plant_drift(sink: &dyn Sink, source: &HttpSource) -> (u64, u64, u64) {
    let mut changes = Vec::new();
    // Missing: 0..5 are never written. Stale: 5..12 hold version 1 of a newer entity.
    for i in 5..12 {
        let id = format!("c{i:03}");
        source.put("customer", &id, json!({"n": i, "edit": 2}));
        changes.push(Change::Upsert {
            key: EntityKey::new("customer", id.as_str()),
            entity: Entity::json(
                json!({"id": id, "type": "customer", "version": 1, "data": {"n": i}}).to_string(),
                Some(Version::Int(1)),
            ),
        });
    }
    // In sync: the rest.
    for (id, (v, body)) in source_state(source) {
        let n: usize = id[1..].parse().unwrap();
        if n >= 12 {
            changes.push(Change::Upsert {
                key: EntityKey::new("customer", id.as_str()),
                entity: Entity::json(body.to_string(), Some(Version::Int(v))),
            });
        }
    }
    // Orphaned: deleted at the source without a notification. Few enough that the gone guard
    // (at most 20% gone) lets their deletes through once the other repairs were found.
    for i in 40..42 {
        let id = format!("c{i:03}");
        source.delete("customer", &id);
    }
    // ... and another type, which a customer reconcile leaves alone.
    changes.push(Change::Upsert {
        key: EntityKey::new("zzz", "1"),
        entity: Entity::json("{}", None),
    });
    sink.write(&changes).await.unwrap();
    (5, 7, 2)
}

async fn reconcile_repairs_planted_drift(
    sink_toml: String,
    sink: &dyn Sink,
    read: impl AsyncFn() -> Held,
) {
    let brokers = kafka::brokers().unwrap();
    let group = unique("reconcile");
    kafka::create_topic(&brokers, &format!("{group}.dlq"), 1)
        .await
        .unwrap();
    let source = HttpSource::start(HttpSourceOptions::default())
        .await
        .unwrap();
    for i in 0..60 {
        source.put("customer", &format!("c{i:03}"), json!({"n": i}));
    }
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &brokers,
        &group,
        "unused",
        &source.base_url(),
        &listing("offset", &source.base_url(), 7, false),
        &sink_toml,
    );
    let cfg = config.to_str().unwrap();
    let (missing, stale, orphaned) = plant_drift(sink, &source).await;

    let (code, out) = refetch(&["reconcile", "--config", cfg, "--dry-run"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("dry run"), "{out}");
    assert!(read().await.len() < 60, "a dry run repairs nothing");

    let (code, out) = refetch(&["reconcile", "--config", cfg]).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("missing   {missing}  e.g. c000")),
        "{out}"
    );
    assert!(
        out.contains(&format!("stale     {stale}  e.g. c005")),
        "{out}"
    );
    assert!(
        out.contains(&format!("orphaned  {orphaned}  e.g. c040")),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "repaired  {} (failed 0)",
            missing + stale + orphaned
        )),
        "{out}"
    );
    assert_equal(&read().await, &source);

    // Nothing left to find.
    let (code, out) = refetch(&["reconcile", "--config", cfg]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("0 drifted"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn reconcile_repairs_planted_drift_in_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("sink.db");
    let sink = SqliteSink::open(&SqliteConfig {
        path: db.clone(),
        deletes: DeleteMode::Delete,
        ..SqliteConfig::default()
    })
    .await
    .unwrap();
    let read = async || sqlite_held(&db).await;
    reconcile_repairs_planted_drift(sqlite_sink(&db), &sink, read).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker and PostgreSQL: run scripts/test"]
async fn reconcile_repairs_planted_drift_in_postgres() {
    let (_client, schema) = refetch_testkit::postgres::fresh_schema().await.unwrap();
    let url = refetch_testkit::postgres::url().unwrap();
    let cfg = PostgresConfig {
        url: refetch_sinks::Secret::new(url.clone()),
        schema: schema.clone(),
        create_table: true,
        deletes: DeleteMode::Tombstone,
        ..PostgresConfig::default()
    };
    let sink = refetch_sinks::postgres::PostgresSink::connect(&cfg)
        .await
        .unwrap();
    let toml = format!(
        "kind = \"postgres\"\nurl = \"{url}\"\nschema = \"{schema}\"\ndeletes = \"tombstone\"\ncreate_table = true"
    );
    let read = async || {
        let mut out = Held::new();
        let mut after: Option<EntityKey> = None;
        loop {
            let page = sink.list_versions(after.as_ref(), 50).await.unwrap();
            let Some(last) = page.last() else { break };
            after = Some(last.key.clone());
            for h in page {
                if h.key.entity_type() == "customer" && !h.deleted {
                    let body = match sink.get(&h.key).await.unwrap().and_then(|e| e.body) {
                        Some(StoredBody::Json(v)) => Some(v),
                        _ => None,
                    };
                    out.insert(h.key.id().to_owned(), (h.version, body));
                }
            }
        }
        out
    };
    reconcile_repairs_planted_drift(toml, &sink, read).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn reconcile_beside_a_running_pipeline_converges() {
    let brokers = kafka::brokers().unwrap();
    let topic = unique("reconcile_run");
    let group = unique("reconcile_run_group");
    kafka::create_topic(&brokers, &topic, 3).await.unwrap();
    kafka::create_topic(&brokers, &format!("{group}.dlq"), 1)
        .await
        .unwrap();
    let source = HttpSource::start(HttpSourceOptions::default())
        .await
        .unwrap();
    let ids: Vec<String> = (0..120).map(|i| format!("c{i:03}")).collect();
    for id in &ids {
        source.put("customer", id, json!({"n": id}));
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("sink.db");
    let config = write_config(
        dir.path(),
        &brokers,
        &group,
        &topic,
        &source.base_url(),
        &listing("link", &source.base_url(), 16, false),
        &sqlite_sink(&db),
    );
    let cfg = config.to_str().unwrap();
    let mut run = spawn(
        env!("CARGO_BIN_EXE_refetch"),
        ["run", "--config", cfg],
        [("RUST_LOG", "info,rdkafka=warn")],
        dir.path().join("run.log"),
    )
    .unwrap();

    // Changes at the source; every third notification is lost upstream.
    let mut mutator = source.spawn_mutator(&["customer"], &ids, 150.0);
    let mut records = Vec::new();
    let mut lost = 0;
    let stop_at = tokio::time::Instant::now() + Duration::from_secs(4);
    let path = config.clone();
    let mut reconcile = Some(tokio::spawn(async move {
        refetch(&["reconcile", "--config", path.to_str().unwrap()]).await
    }));
    let mut concurrent = None;
    while tokio::time::Instant::now() < stop_at {
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(100), mutator.next()).await
        {
            if m.version % 3 == 0 {
                lost += 1;
            } else {
                records.push((
                    Some(m.id.clone().into_bytes()),
                    json!({"id": m.id}).to_string().into_bytes(),
                ));
            }
        }
        if records.len() >= 20 {
            kafka::produce(&brokers, &topic, records.drain(..))
                .await
                .unwrap();
        }
        if reconcile.as_ref().is_some_and(|r| r.is_finished()) {
            concurrent = Some(reconcile.take().unwrap().await.unwrap());
        }
    }
    mutator.stop().await;
    kafka::produce(&brokers, &topic, records.drain(..))
        .await
        .unwrap();
    let (code, out) = match concurrent {
        Some(r) => r,
        None => reconcile.take().unwrap().await.unwrap(),
    };
    assert_eq!(code, 0, "reconcile during changes: {out}");
    assert!(lost > 0);

    // Once the run caught up, one more reconcile repairs what the lost notifications left stale.
    let ends = kafka::end_offsets(&brokers, &topic).await.unwrap();
    wait_for(
        "the run to commit every notification",
        Duration::from_secs(60),
        || {
            let (b, g, t, ends) = (brokers.clone(), group.clone(), topic.clone(), ends.clone());
            async move {
                let committed = kafka::committed_offsets(&b, &g, &t)
                    .await
                    .unwrap_or_default();
                ends.iter()
                    .all(|(p, e)| *e == 0 || committed.get(p) == Some(e))
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", run.log()));
    let (code, out) = refetch(&["reconcile", "--config", cfg]).await;
    assert_eq!(code, 0, "{out}");
    assert_equal(&sqlite_held(&db).await, &source);
    let (code, out) = refetch(&["reconcile", "--config", cfg]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("0 drifted"), "{out}");
    refetch_testkit::process::terminate(&mut run, Duration::from_secs(30))
        .await
        .unwrap();
}

fn ops_addr(log: &str) -> Option<String> {
    log.lines().find_map(|l| {
        let rest = &l
            [l.find("operations endpoint on http://")? + "operations endpoint on http://".len()..];
        rest.split('/').next().map(str::to_owned)
    })
}

async fn owned_partitions(addr: &str) -> Option<usize> {
    let body = reqwest::get(format!("http://{addr}/status.json"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let doc: Value = serde_json::from_str(&body).ok()?;
    Some(doc["status"]["engine"]["partitions"].as_array()?.len())
}

async fn drift_metric(addr: &str, kind: &str) -> u64 {
    let Ok(resp) = reqwest::get(format!("http://{addr}/metrics")).await else {
        return 0;
    };
    let text = resp.text().await.unwrap_or_default();
    let prefix = format!("refetch_reconcile_drift_total{{kind=\"{kind}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn scheduled_reconcile_covers_each_key_once_across_instances() {
    let brokers = kafka::brokers().unwrap();
    let topic = unique("sched_reconcile");
    let group = unique("sched_reconcile_group");
    kafka::create_topic(&brokers, &topic, 3).await.unwrap();
    kafka::create_topic(&brokers, &format!("{group}.dlq"), 1)
        .await
        .unwrap();
    let source = HttpSource::start(HttpSourceOptions::default())
        .await
        .unwrap();
    let ids: Vec<String> = (0..90).map(|i| format!("c{i:03}")).collect();
    for id in &ids {
        source.put("customer", id, json!({"n": id}));
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("sink.db");
    // The sink starts in sync.
    let sink = SqliteSink::open(&SqliteConfig {
        path: db.clone(),
        deletes: DeleteMode::Delete,
        ..SqliteConfig::default()
    })
    .await
    .unwrap();
    let in_sync: Vec<Change> = source_state(&source)
        .into_iter()
        .map(|(id, (v, body))| Change::Upsert {
            key: EntityKey::new("customer", id.as_str()),
            entity: Entity::json(body.to_string(), Some(Version::Int(v))),
        })
        .collect();
    sink.write(&in_sync).await.unwrap();
    let config = write_config(
        dir.path(),
        &brokers,
        &group,
        &topic,
        &source.base_url(),
        &listing("cursor", &source.base_url(), 25, false),
        &sqlite_sink(&db),
    );
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("\n[reconcile]\ninterval = \"1s\"\n");
    std::fs::write(&config, text).unwrap();
    let cfg = config.to_str().unwrap();
    let mut instances = Vec::new();
    let mut addrs = Vec::new();
    for name in ["a", "b"] {
        let child = spawn(
            env!("CARGO_BIN_EXE_refetch"),
            ["run", "--config", cfg],
            [("RUST_LOG", "info,rdkafka=warn")],
            dir.path().join(format!("{name}.log")),
        )
        .unwrap();
        let addr = wait_for_value("the ops address", Duration::from_secs(30), || {
            let log = child.log();
            async move { ops_addr(&log) }
        })
        .await
        .unwrap();
        instances.push(child);
        addrs.push(addr);
    }
    wait_for(
        "both instances to own partitions",
        Duration::from_secs(60),
        || {
            let addrs = addrs.clone();
            async move {
                let a = owned_partitions(&addrs[0]).await.unwrap_or(0);
                let b = owned_partitions(&addrs[1]).await.unwrap_or(0);
                a > 0 && b > 0 && a + b == 3
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", instances[0].log(), instances[1].log()));

    // Drift behind the pipeline's back: rows lost in the sink, changes never announced.
    source.reset_counters();
    let missing: Vec<&String> = ids.iter().step_by(3).collect();
    let stale: Vec<&String> = ids.iter().skip(1).step_by(6).collect();
    let deletes: Vec<Change> = missing
        .iter()
        .map(|id| Change::Delete {
            key: EntityKey::new("customer", id.as_str()),
        })
        .collect();
    sink.write(&deletes).await.unwrap();
    for id in &stale {
        source.put("customer", id, json!({"n": id, "changed": true}));
    }
    let (n_missing, n_stale) = (missing.len() as u64, stale.len() as u64);
    let drift_seen = || {
        let addrs = addrs.clone();
        async move {
            let mut m = 0;
            let mut s = 0;
            for a in &addrs {
                m += drift_metric(a, "missing").await;
                s += drift_metric(a, "stale").await;
            }
            (m, s)
        }
    };
    wait_for(
        "the scheduled reconciles to repair the drift",
        Duration::from_secs(60),
        || {
            let db = db.clone();
            let want = source_state(&source);
            async move {
                let held = sqlite_held(&db).await;
                want.iter().all(|(id, (v, _))| {
                    held.get(id)
                        .is_some_and(|(hv, _)| *hv == Some(Version::Int(*v)))
                }) && held.len() == want.len()
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", instances[0].log(), instances[1].log()));
    assert_equal(&sqlite_held(&db).await, &source);
    if let Err(e) = wait_for("the drift metrics", Duration::from_secs(10), || {
        let f = drift_seen();
        async move { f.await == (n_missing, n_stale) }
    })
    .await
    {
        panic!(
            "{e}: (missing, stale) = {:?}, expected {:?}",
            drift_seen().await,
            (n_missing, n_stale)
        );
    }
    // Each drifted key was fetched by exactly one instance, once.
    for id in missing.iter().chain(stale.iter()) {
        assert_eq!(source.requests_for("customer", id), 1, "{id}");
    }
    for mut child in instances {
        let status = refetch_testkit::process::terminate(&mut child, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(status.code(), Some(0), "{}", child.log());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn reconcile_reports_orphans_whose_deletes_the_gone_guard_holds() {
    let brokers = kafka::brokers().unwrap();
    let group = unique("reconcile_guard");
    kafka::create_topic(&brokers, &format!("{group}.dlq"), 1)
        .await
        .unwrap();
    let source = HttpSource::start(HttpSourceOptions::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("sink.db");
    let sink = SqliteSink::open(&SqliteConfig {
        path: db.clone(),
        deletes: DeleteMode::Delete,
        ..SqliteConfig::default()
    })
    .await
    .unwrap();
    // A listing that names a third of what the sink holds (think: a filter in the listing URL):
    // most held rows look orphaned, and their fetches all say gone.
    let mut rows = Vec::new();
    for i in 0..30 {
        let id = format!("c{i:03}");
        if i % 3 == 0 {
            source.put("customer", &id, json!({"n": i}));
        }
        rows.push(Change::Upsert {
            key: EntityKey::new("customer", id.as_str()),
            entity: Entity::json(
                json!({"id": id, "type": "customer", "version": 1, "data": {"n": i}}).to_string(),
                Some(Version::Int(1)),
            ),
        });
    }
    sink.write(&rows).await.unwrap();
    let config = write_config(
        dir.path(),
        &brokers,
        &group,
        "unused",
        &source.base_url(),
        &listing("cursor", &source.base_url(), 50, false),
        &sqlite_sink(&db),
    );
    let mut text = std::fs::read_to_string(&config).unwrap();
    // The guard judges only once it has `min_samples` outcomes: the 30 fetches of this
    // reconcile are enough with 20 (with the default 50 the 20 deletes would wait
    // `gone_guard.wait` for evidence that never comes, then be written as lone deletes).
    text.push_str("\n[reconcile]\norphan_wait = \"2s\"\n");
    text = text.replace(
        "commit_interval = \"100ms\"\n",
        "commit_interval = \"100ms\"\ngone_guard = { min_samples = 20 }\n",
    );
    std::fs::write(&config, text).unwrap();
    let started = std::time::Instant::now();
    let (code, out) = refetch(&["reconcile", "--config", config.to_str().unwrap()]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("orphaned  20"), "{out}");
    assert!(out.contains("suspected orphan(s) not deleted"), "{out}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "bounded by orphan_wait"
    );
    let held = sqlite_held(&db).await;
    assert!(
        held.len() > 10,
        "the guard kept most suspected orphans: {} rows left",
        held.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn backfill_through_the_engine_beside_a_running_pipeline_converges() {
    let brokers = kafka::brokers().unwrap();
    let topic = unique("backfill_run");
    let group = unique("backfill_run_group");
    kafka::create_topic(&brokers, &topic, 3).await.unwrap();
    kafka::create_topic(&brokers, &format!("{group}.dlq"), 1)
        .await
        .unwrap();
    let source = HttpSource::start(HttpSourceOptions::default())
        .await
        .unwrap();
    let ids: Vec<String> = (0..200).map(|i| format!("c{i:03}")).collect();
    for id in &ids {
        source.put("customer", id, json!({"n": id}));
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("sink.db");
    let config = write_config(
        dir.path(),
        &brokers,
        &group,
        &topic,
        &source.base_url(),
        &listing("offset", &source.base_url(), 20, false),
        &sqlite_sink(&db),
    );
    let cfg = config.to_str().unwrap();
    let mut run = spawn(
        env!("CARGO_BIN_EXE_refetch"),
        ["run", "--config", cfg],
        [("RUST_LOG", "info,rdkafka=warn")],
        dir.path().join("run.log"),
    )
    .unwrap();
    // Every change is announced; the backfill loads the same entities meanwhile.
    let mut mutator = source.spawn_mutator(&["customer"], &ids, 200.0);
    let path = config.clone();
    let backfill =
        tokio::spawn(
            async move { refetch(&["backfill", "--config", path.to_str().unwrap()]).await },
        );
    let mut records = Vec::new();
    let stop_at = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < stop_at {
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(100), mutator.next()).await
        {
            records.push((
                Some(m.id.clone().into_bytes()),
                json!({"id": m.id}).to_string().into_bytes(),
            ));
        }
        if records.len() >= 20 {
            kafka::produce(&brokers, &topic, records.drain(..))
                .await
                .unwrap();
        }
    }
    for m in mutator.stop().await {
        records.push((
            Some(m.id.clone().into_bytes()),
            json!({"id": m.id}).to_string().into_bytes(),
        ));
    }
    kafka::produce(&brokers, &topic, records.drain(..))
        .await
        .unwrap();
    let (code, out) = backfill.await.unwrap();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("refreshed through the engine"), "{out}");
    let ends = kafka::end_offsets(&brokers, &topic).await.unwrap();
    wait_for(
        "the run to commit every notification",
        Duration::from_secs(60),
        || {
            let (b, g, t, ends) = (brokers.clone(), group.clone(), topic.clone(), ends.clone());
            async move {
                let committed = kafka::committed_offsets(&b, &g, &t)
                    .await
                    .unwrap_or_default();
                ends.iter()
                    .all(|(p, e)| *e == 0 || committed.get(p) == Some(e))
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", run.log()));
    // The version guard kept the newer state wherever the two processes raced.
    assert_equal(&sqlite_held(&db).await, &source);
    refetch_testkit::process::terminate(&mut run, Duration::from_secs(30))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn sinks_without_a_version_guard_get_every_id_through_the_engine() {
    let brokers = kafka::brokers().unwrap();
    let group = unique("backfill_jsonl");
    kafka::create_topic(&brokers, &format!("{group}.dlq"), 1)
        .await
        .unwrap();
    let source = HttpSource::start(HttpSourceOptions::default())
        .await
        .unwrap();
    for i in 0..12 {
        source.put("customer", &format!("c{i:02}"), json!({"n": i}));
    }
    let dir = tempfile::tempdir().unwrap();
    let out_file = dir.path().join("out.jsonl");
    let config = write_config(
        dir.path(),
        &brokers,
        &group,
        "unused",
        &source.base_url(),
        &listing("link", &source.base_url(), 5, true),
        &format!("kind = \"jsonl\"\npath = \"{}\"", out_file.display()),
    );
    let cfg = config.to_str().unwrap();
    let (code, out) = refetch(&["backfill", "--config", cfg]).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("12 item(s) (0 written from the listing, 12 refreshed through the engine"),
        "{out}"
    );
    let held = refetch_sinks::jsonl::read_latest(&out_file).unwrap();
    assert_eq!(held.len(), 12);
    for i in 0..12 {
        assert!(held.contains_key(&EntityKey::new("customer", format!("c{i:02}").as_str())));
    }
    let (code, out) = refetch(&["reconcile", "--config", cfg]).await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("not supported for the jsonl sink"), "{out}");
}
