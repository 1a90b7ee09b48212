//! Business actions against a real PostgreSQL: a reader that polls the table while the pipeline
//! runs never sees part of an action.
//!
//! Actions of three or four entities (members spread over two partitions, interleaved with
//! ordinary notifications) are written through the PostgreSQL sink with `sink_batch_max = 2`:
//! only the action grouping keeps an action in one batch, hence one transaction. A concurrent
//! reader polls the table in its own transactions and checks, for every action, that it sees
//! all of its entities or none, and (after a second round that changes every action's entities
//! again as a new action) never a mix of the two rounds' versions.
//!
//! Needs PostgreSQL (`REFETCH_TEST_PG`): run `scripts/test`, or
//! `cargo test -p refetch-integration-tests --test actions_postgres -- --ignored`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use refetch::action::{ActionConfig, ActionFailurePolicy};
use refetch::decode::{Correlation, CorrelationSource, JsonDecoder};
use refetch::{EngineConfig, EntityKey, MemoryConsumer, Pipeline, VersionKind};
use refetch_sinks::postgres::PostgresSink;
use refetch_sinks::{DeleteMode, PostgresConfig, Secret};
use refetch_testkit::memory::VersionedSource;

const TOPIC: &str = "crm.actions";
const ACTIONS: usize = 60;

/// Entities of action `a`: three or four.
fn members(a: usize) -> Vec<String> {
    (0..3 + a % 2).map(|m| format!("a{a}-m{m}")).collect()
}

/// The action an entity id belongs to (`a12-m3` -> 12); `None` for ordinary entities.
fn action_of(id: &str) -> Option<usize> {
    id.strip_prefix('a')?.split('-').next()?.parse().ok()
}

/// What the reader saw in one poll that it must never see.
fn partial_actions(rows: &[(String, i64)]) -> Vec<String> {
    let mut by_action: BTreeMap<usize, Vec<i64>> = BTreeMap::new();
    for (id, v) in rows {
        if let Some(a) = action_of(id) {
            by_action.entry(a).or_default().push(*v);
        }
    }
    let mut bad = Vec::new();
    for (a, versions) in by_action {
        let expected = members(a).len();
        if versions.len() != expected {
            bad.push(format!(
                "action {a}: {} of {expected} entities",
                versions.len()
            ));
        } else if versions.iter().any(|v| *v != versions[0]) {
            bad.push(format!("action {a}: versions of two rounds {versions:?}"));
        }
    }
    bad
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: run scripts/test"]
async fn a_concurrent_reader_never_sees_part_of_an_action() {
    let (reader, schema) = refetch_testkit::postgres::fresh_schema()
        .await
        .expect("schema");
    let cfg = PostgresConfig {
        url: Secret::new(refetch_testkit::postgres::url().expect("REFETCH_TEST_PG")),
        schema: schema.clone(),
        table: "entities".into(),
        create_table: true,
        deletes: DeleteMode::Delete,
        ..PostgresConfig::default()
    };
    let sink = PostgresSink::connect(&cfg).await.expect("sink");

    let topics = MemoryConsumer::new();
    topics.create_topic(TOPIC, 2);
    let source = VersionedSource::new();
    let (channels, _control) = topics.start();
    let pipeline = Pipeline::builder::<VersionedSource, PostgresSink>()
        .fetcher(source.clone())
        .sink(sink)
        .consumer(channels)
        .decoder(
            JsonDecoder::fixed_type("customer", "/id")
                .with_version("/v", VersionKind::Integer)
                .with_correlation(Correlation {
                    id: CorrelationSource::Pointer("/tx".into()),
                    size_pointer: Some("/of".into()),
                }),
        )
        .engine(EngineConfig {
            window: Duration::from_millis(10),
            max_wait: Duration::from_millis(200),
            commit_interval: Duration::from_millis(50),
            sink_batch_max: 2,
            sink_linger: Duration::from_millis(2),
            actions: ActionConfig {
                window: Duration::from_millis(100),
                max_wait: Duration::from_secs(2),
                on_failure: ActionFailurePolicy::DeadLetterAll,
                ..ActionConfig::default()
            },
            ..EngineConfig::default()
        })
        .dead_letters(refetch::MemoryDeadLetters::new())
        .build()
        .expect("pipeline");
    let handle = pipeline.handle();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(pipeline.run(async move {
        let _ = stopped.await;
    }));

    // The reader: one query per poll (one snapshot), as fast as it can, until told to stop.
    let done = Arc::new(AtomicBool::new(false));
    let reader_task = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut polls = 0u64;
            let mut seen_some_but_not_all = 0u64;
            let mut violations = Vec::new();
            while !done.load(Ordering::SeqCst) {
                let rows = reader
                    .query(
                        "SELECT entity_id, version FROM entities WHERE entity_type = 'customer'",
                        &[],
                    )
                    .await
                    .expect("reader query");
                let rows: Vec<(String, i64)> = rows
                    .iter()
                    .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
                    .collect();
                polls += 1;
                let actions_seen = rows
                    .iter()
                    .filter_map(|(id, _)| action_of(id))
                    .collect::<std::collections::BTreeSet<_>>()
                    .len();
                if actions_seen > 0 && actions_seen < ACTIONS {
                    seen_some_but_not_all += 1;
                }
                for v in partial_actions(&rows) {
                    violations.push(format!("poll {polls}: {v}"));
                }
            }
            (polls, seen_some_but_not_all, violations)
        })
    };

    let publish = |round: usize, a: usize| {
        let names = members(a);
        let n = names.len();
        // Members in reverse order, spread over both partitions, with ordinary changes between.
        for (i, name) in names.iter().enumerate().rev() {
            let v = source.change(&EntityKey::new("customer", name.as_str()));
            let payload = format!(r#"{{"id":"{name}","v":{v},"tx":"r{round}-a{a}","of":{n}}}"#);
            topics.produce(TOPIC, ((a + i) % 2) as i32, None, payload.as_bytes(), 0);
            let plain = format!("plain{}", (a * 7 + i) % 13);
            let v = source.change(&EntityKey::new("customer", plain.as_str()));
            let payload = format!(r#"{{"id":"{plain}","v":{v}}}"#);
            topics.produce(TOPIC, (i % 2) as i32, None, payload.as_bytes(), 0);
        }
    };
    let until_committed = |limit: Duration| {
        let topics = topics.clone();
        async move {
            let deadline = Instant::now() + limit;
            loop {
                let end = topics.end_offsets();
                let committed = topics.committed();
                if !end.is_empty() && end.iter().all(|(tp, o)| committed.get(tp) == Some(o)) {
                    return true;
                }
                if Instant::now() > deadline {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };

    // Round 1: every action creates its entities. Round 2: every action changes them again.
    for round in 1..=2 {
        for a in 0..ACTIONS {
            publish(round, a);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            until_committed(Duration::from_secs(60)).await,
            "round {round} not committed: {:?}",
            handle.status().await
        );
    }
    done.store(true, Ordering::SeqCst);
    let (polls, in_between, violations) = reader_task.await.expect("reader");
    let status = handle.status().await;
    let _ = stop.send(());
    let report = task.await.expect("pipeline task").expect("pipeline run");

    assert!(
        violations.is_empty(),
        "the reader saw part of an action ({} times), first: {:?}",
        violations.len(),
        violations.iter().take(5).collect::<Vec<_>>()
    );
    assert!(
        polls >= 20 && in_between >= 1,
        "the reader must race the writes: {polls} polls, {in_between} while actions were landing"
    );
    // The table equals the source.
    let check = refetch_testkit::postgres::connect().await.expect("connect");
    let rows = check
        .query(
            &format!("SELECT entity_id, version FROM {schema}.entities"),
            &[],
        )
        .await
        .expect("final query");
    let held: BTreeMap<String, i64> = rows
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1)))
        .collect();
    for (key, e) in source.snapshot() {
        assert_eq!(
            held.get(key.id()),
            Some(&e.version),
            "{key} in the table: {status:?}"
        );
    }
    let c = &report.status.counters;
    assert_eq!(c.actions_written, 2 * ACTIONS as u64, "{c:?}");
    assert_eq!(c.actions_incomplete, 0, "{c:?}");
    eprintln!(
        "{polls} reader polls, {in_between} while actions were landing; {} sink writes",
        c.writes
    );
}
