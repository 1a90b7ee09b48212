//! Exactly-once delivery through the whole runtime on the in-memory consumer, under a paused
//! clock: a transactional sink that loses transactions the way a database does (a write that
//! drops the connection, a commit that fails), a crash (the pipeline dropped without a
//! shutdown, its open transaction lost) and a restart on the same sink. Every input offset must
//! be covered by exactly one committed output, and the sink must end equal to the source.

use std::collections::BTreeMap;
use std::time::Duration;

use refetch::decode::JsonDecoder;
use refetch::{
    Coordinate, EngineConfig, EntityKey, MemoryConsumer, MemoryDeadLetters, Pipeline,
    TopicPartition,
};
use refetch_testkit::memory::VersionedSource;
use refetch_testkit::txn_sink::TransactionalSink;

const TOPIC: &str = "crm.customers";
const GROUP: &str = "eos-memory";

fn key(i: usize) -> EntityKey {
    EntityKey::new("customer", format!("c{i}"))
}

fn cfg() -> EngineConfig {
    EngineConfig {
        window: Duration::from_millis(20),
        max_wait: Duration::from_millis(200),
        commit_interval: Duration::from_millis(50),
        sink_linger: Duration::from_millis(1),
        fetch_backoff: refetch::Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(200),
            multiplier: 2.0,
        },
        retry_budget: 10_000,
        ..EngineConfig::default()
    }
}

/// One pipeline run on `topics` writing to `sink`.
struct Run {
    task: tokio::task::JoinHandle<Result<refetch::RunReport, refetch::PipelineError>>,
    handle: refetch::PipelineHandle,
}

fn start(topics: &MemoryConsumer, source: &VersionedSource, sink: &TransactionalSink) -> Run {
    start_with(topics, source, sink, cfg()).0
}

fn start_with(
    topics: &MemoryConsumer,
    source: &VersionedSource,
    sink: &TransactionalSink,
    engine: EngineConfig,
) -> (Run, refetch::consumer::MemoryControl) {
    let (channels, control) = topics.start();
    let pipeline = Pipeline::builder::<VersionedSource, TransactionalSink>()
        .fetcher(source.clone())
        .sink(sink.clone())
        .consumer(channels)
        .group_id(GROUP)
        .dead_letters(MemoryDeadLetters::new())
        .decoder(JsonDecoder::fixed_type("customer", "/id"))
        .engine(engine)
        .build()
        .expect("pipeline builds");
    let handle = pipeline.handle();
    let task = tokio::spawn(pipeline.run(std::future::pending()));
    (Run { task, handle }, control)
}

/// Change key `i` at the source and notify it on `partition` (no version in the
/// notification: only a fetch satisfies it). Returns the input offset.
fn change(topics: &MemoryConsumer, source: &VersionedSource, i: usize, partition: i32) -> i64 {
    source.change(&key(i));
    topics.produce(
        TOPIC,
        partition,
        None,
        format!(r#"{{"id":"c{i}"}}"#).as_bytes(),
        0,
    )
}

/// The partition key `i` is always notified on (one partition per key).
fn part(i: usize) -> i32 {
    (i % 2) as i32
}

/// Wait until the sink stored every partition's end offset.
async fn until_stored(topics: &MemoryConsumer, sink: &TransactionalSink, within: Duration) {
    let end = topics.end_offsets();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let done = end.iter().all(|(tp, o)| {
            sink.stored(GROUP, tp)
                .is_some_and(|s| s.offset >= *o && s.covered.is_empty())
        });
        if done {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the sink never stored the end offsets {end:?}: {:?}",
            end.keys()
                .map(|tp| (tp.clone(), sink.stored(GROUP, tp)))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// How many committed outputs cover each input offset (partition, offset).
fn covered_counts(sink: &TransactionalSink) -> BTreeMap<(i32, i64), usize> {
    let mut covered: BTreeMap<(i32, i64), usize> = BTreeMap::new();
    for o in sink.committed() {
        for Coordinate {
            partition, offset, ..
        } in o.inputs
        {
            *covered.entry((partition, offset)).or_default() += 1;
        }
    }
    covered
}

/// Every input offset is covered by exactly one committed output, and the sink holds the
/// source's latest state of every key.
fn check_exactly_once(topics: &MemoryConsumer, source: &VersionedSource, sink: &TransactionalSink) {
    let twice = sink.covered_twice();
    assert!(
        twice.is_empty(),
        "input offsets covered by two committed outputs: {twice:?}"
    );
    let covered = covered_counts(sink);
    for (tp, end) in topics.end_offsets() {
        for offset in 0..end {
            assert_eq!(
                covered.get(&(tp.partition, offset)).copied(),
                Some(1),
                "{tp} offset {offset} is not covered once"
            );
        }
    }
    let held = sink.held();
    for (k, e) in source.snapshot() {
        assert_eq!(
            held.get(&k).copied().flatten(),
            Some(e.version),
            "{k}: the sink does not hold the source's state"
        );
    }
}

/// A key stuck in retries holds its partition's stored offset while later offsets of the
/// partition are written and committed. A crash then loses the open transaction; the restart
/// reads what the sink stored (the offset and the satisfied ranges above it) and takes the
/// stored records as satisfied on arrival, so none is written twice, although the consumer
/// group's committed offset (which follows the stored one, for lag) is behind them.
#[tokio::test(start_paused = true)]
async fn a_crash_and_a_restart_cover_every_offset_once() {
    let topics = MemoryConsumer::new();
    topics.create_topic(TOPIC, 2);
    let source = VersionedSource::new();
    let sink = TransactionalSink::new();
    // Key 0 keeps failing: its offset (0 of partition 0) stays open.
    source.poison(key(0));
    let first = start(&topics, &source, &sink);
    for round in 0..3 {
        for i in 0..20 {
            change(&topics, &source, i, part(i));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        if round == 1 {
            // A write that drops the connection and a commit that fails: both transactions
            // are lost, their notifications fetched again.
            sink.fail_writes(1);
            sink.fail_commits(1);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let p0 = TopicPartition::new(TOPIC, 0);
    let stored = sink.stored(GROUP, &p0).expect("partition 0 stored");
    assert_eq!(stored.offset, 0, "key 0's offset holds the stored offset");
    assert!(
        !stored.covered.is_empty(),
        "the offsets written after it are stored as satisfied ranges: {stored:?}"
    );
    let (commits, aborts) = sink.transactions();
    assert!(
        commits > 0 && aborts >= 2,
        "commits {commits}, aborts {aborts}"
    );
    // What the lost transactions held was fetched and written again: every offset but key 0's
    // is covered once already.
    let covered = covered_counts(&sink);
    for (tp, end) in topics.end_offsets() {
        for offset in 0..end {
            let of_key_0 = tp.partition == 0 && offset % 10 == 0;
            let n = covered.get(&(tp.partition, offset)).copied().unwrap_or(0);
            assert_eq!(n, usize::from(!of_key_0), "{tp} offset {offset}");
        }
    }
    // More changes, then a crash with an open transaction.
    sink.set_delay(Duration::from_millis(30));
    for i in 1..20 {
        change(&topics, &source, i, part(i));
    }
    tokio::time::sleep(Duration::from_millis(60)).await;
    first.task.abort();
    let _ = first.task.await;
    drop(first.handle);
    sink.set_delay(Duration::ZERO);
    // The restart (a new connection: the crashed one's open transaction is gone): key 0 can be
    // fetched again, more changes come in.
    source.unpoison(&key(0));
    let sink = sink.session();
    let second = start(&topics, &source, &sink);
    for i in 0..20 {
        change(&topics, &source, i, part(i));
    }
    until_stored(&topics, &sink, Duration::from_secs(30)).await;
    check_exactly_once(&topics, &source, &sink);
    second.handle.shutdown();
    let report = tokio::time::timeout(Duration::from_secs(30), second.task)
        .await
        .expect("stops")
        .expect("no panic")
        .expect("no error");
    assert!(
        report.status.counters.stored_on_arrival > 0,
        "the restart took records the sink stored as satisfied"
    );
    // The consumer group's offsets follow the sink's (for lag tooling).
    let committed = topics.committed();
    for (tp, end) in topics.end_offsets() {
        assert_eq!(committed.get(&tp).copied(), Some(end), "{tp}");
    }
}

/// A partition lost while the open transaction holds its writes: the transaction must abort
/// (committing it would commit writes whose offsets the partition's next owner reads again);
/// the partition assigned back is read from what the sink stored, and every offset is still
/// covered once.
#[tokio::test(start_paused = true)]
async fn a_transaction_holding_writes_of_a_lost_partition_aborts() {
    let topics = MemoryConsumer::new();
    topics.create_topic(TOPIC, 2);
    let source = VersionedSource::new();
    let sink = TransactionalSink::new();
    let engine = EngineConfig {
        commit_interval: Duration::from_millis(1_000),
        ..cfg()
    };
    let (run, control) = start_with(&topics, &source, &sink, engine);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    for i in 0..20 {
        change(&topics, &source, i, part(i));
    }
    // Written (provisionally) well before the next commit; then partition 0 is lost.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (commits_before, aborts_before) = sink.transactions();
    control.lose(vec![TopicPartition::new(TOPIC, 0)]);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let (_, aborts) = sink.transactions();
    assert!(
        aborts > aborts_before,
        "the transaction holding partition 0's writes aborted (commits before {commits_before})"
    );
    control.assign(vec![TopicPartition::new(TOPIC, 0)]);
    for i in 0..20 {
        change(&topics, &source, i, part(i));
    }
    until_stored(&topics, &sink, Duration::from_secs(30)).await;
    check_exactly_once(&topics, &source, &sink);
    run.handle.shutdown();
    tokio::time::timeout(Duration::from_secs(30), run.task)
        .await
        .expect("stops")
        .expect("no panic")
        .expect("no error");
}
