//! Restarts fetch only what was not satisfied: at-least-once commits carry the satisfied offsets
//! above the commit point in their metadata (`engine.commit_ranges_max_bytes`), and the next
//! run (a restart, or the next owner after a rebalance) takes the records they cover as
//! satisfied on arrival.
//!
//! One scenario, three consumers: the in-memory one (strict like a broker: metadata over 4 KiB
//! fails the commit), librdkafka's mock cluster, and the real broker of `scripts/kafka`. A key
//! that keeps failing holds the commit point at its notification; 20 keys behind it are written.
//! The first run stops, a second run of the same group starts with the key healed: it fetches
//! the failing key, and none of the 20 again. With ranges turned off the same run fetches all 20
//! again, so the check can fail.

use std::time::Duration;

use refetch::decode::JsonDecoder;
use refetch::{
    EngineConfig, EntityKey, KafkaConfig, MemoryConsumer, Pipeline, PipelineBuilder, RunReport,
};
use refetch_testkit::kafka;
use refetch_testkit::memory::{RecordingSink, VersionedSource};
use refetch_testkit::mock::MockKafka;
use refetch_testkit::names::unique;

const HEALTHY: usize = 20;

fn key(name: &str) -> EntityKey {
    EntityKey::new("customer", name)
}

fn healthy(i: usize) -> EntityKey {
    key(&format!("c{i}"))
}

/// Unversioned notifications: nothing but the offsets can tell a replay from a change.
fn notifications() -> Vec<Vec<u8>> {
    std::iter::once(r#"{"id":"stuck"}"#.to_owned())
        .chain((0..HEALTHY).map(|i| format!(r#"{{"id":"c{i}"}}"#)))
        .map(String::into_bytes)
        .collect()
}

fn engine(ranges: bool) -> EngineConfig {
    EngineConfig {
        window: Duration::from_millis(20),
        max_wait: Duration::from_millis(100),
        commit_interval: Duration::from_millis(200),
        commit_linger: Duration::from_millis(20),
        commit_ranges_max_bytes: if ranges { 4000 } else { 0 },
        // The stuck key keeps failing without being dead-lettered.
        retry_budget: 1_000,
        shutdown_deadline: Duration::from_secs(2),
        rebalance_drain: Duration::from_secs(2),
        ..EngineConfig::default()
    }
}

enum Driver {
    Memory(MemoryConsumer),
    /// A broker; `create` says whether the scenario creates its topics (the mock cluster's
    /// are created through its own interface).
    Kafka {
        brokers: String,
        group: String,
        create: bool,
    },
}

const TOPIC_MEMORY: &str = "crm.customers";

impl Driver {
    fn topic(&self, kafka_topic: &str) -> String {
        match self {
            Driver::Memory(_) => TOPIC_MEMORY.to_owned(),
            Driver::Kafka { .. } => kafka_topic.to_owned(),
        }
    }

    fn attach(
        &self,
        b: PipelineBuilder<VersionedSource, RecordingSink>,
        topic: &str,
    ) -> PipelineBuilder<VersionedSource, RecordingSink> {
        match self {
            Driver::Memory(m) => b.consumer(m.start().0),
            Driver::Kafka { brokers, group, .. } => {
                let mut k = KafkaConfig::new(brokers, group, vec![topic.to_owned()]);
                k.dead_letter_topic = format!("{topic}.dlq");
                k.consumer_properties
                    .insert("session.timeout.ms".into(), "6000".into());
                k.consumer_properties
                    .insert("heartbeat.interval.ms".into(), "500".into());
                b.kafka(k)
            }
        }
    }
}

struct Run {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<RunReport, refetch::PipelineError>>,
}

fn start(
    driver: &Driver,
    topic: &str,
    source: &VersionedSource,
    sink: &RecordingSink,
    ranges: bool,
) -> Run {
    let b = Pipeline::builder::<VersionedSource, RecordingSink>()
        .fetcher(source.clone())
        .sink(sink.clone())
        .decoder(JsonDecoder::fixed_type("customer", "/id"))
        .engine(engine(ranges));
    let mut b = driver.attach(b, topic);
    if let Driver::Memory(_) = driver {
        b = b.dead_letters(refetch::MemoryDeadLetters::new());
    }
    let pipeline = b.build().expect("valid pipeline");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(pipeline.run(async move {
        let _ = stopped.await;
    }));
    Run { stop, task }
}

impl Run {
    async fn stop(self) -> RunReport {
        let _ = self.stop.send(());
        self.task
            .await
            .expect("pipeline task")
            .expect("pipeline run")
    }
}

async fn until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Fetches of the healthy keys in the second run, and the records it took as satisfied on
/// arrival.
async fn scenario(driver: Driver, kafka_topic: &str, ranges: bool) -> (u64, u64) {
    let topic = driver.topic(kafka_topic);
    match &driver {
        Driver::Memory(m) => {
            m.create_topic(&topic, 1);
            for p in notifications() {
                m.produce(&topic, 0, None, &p, 0);
            }
        }
        Driver::Kafka {
            brokers, create, ..
        } => {
            if *create {
                kafka::create_topic(brokers, &topic, 1)
                    .await
                    .expect("topic");
                kafka::create_topic(brokers, &format!("{topic}.dlq"), 1)
                    .await
                    .expect("dlq topic");
            }
            kafka::produce(
                brokers,
                &topic,
                notifications().into_iter().map(|p| (None, p)),
            )
            .await
            .expect("produce");
        }
    }
    let source = VersionedSource::new();
    source.change(&key("stuck"));
    for i in 0..HEALTHY {
        source.change(&healthy(i));
    }
    source.poison(key("stuck"));
    let sink = RecordingSink::new();

    let first = start(&driver, &topic, &source, &sink, ranges);
    until("the healthy keys written", Duration::from_secs(60), || {
        (0..HEALTHY).all(|i| sink.held().contains_key(&healthy(i)))
    })
    .await;
    // Let a commit carry the writes, then stop (the final commit carries them too).
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.stop().await;
    let before: u64 = (0..HEALTHY).map(|i| source.fetches_of(&healthy(i))).sum();
    assert_eq!(
        before, HEALTHY as u64,
        "one fetch per healthy key in the first run"
    );
    if let Driver::Memory(m) = &driver {
        let meta = m.committed_metadata();
        assert_eq!(
            !meta.values().all(String::is_empty),
            ranges,
            "commit metadata: {meta:?}"
        );
    }

    source.unpoison(&key("stuck"));
    let second = start(&driver, &topic, &source, &sink, ranges);
    until("the stuck key written", Duration::from_secs(60), || {
        sink.held().contains_key(&key("stuck"))
    })
    .await;
    // Give replays (without ranges) the time to be fetched before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let report = second.stop().await;
    assert!(sink.diff(&source).is_empty(), "{:?}", sink.diff(&source));
    let after: u64 = (0..HEALTHY).map(|i| source.fetches_of(&healthy(i))).sum();
    (after - before, report.status.counters.stored_on_arrival)
}

#[tokio::test(start_paused = true)]
async fn a_restart_fetches_only_what_the_last_commit_left_unsatisfied_memory() {
    let (refetched, on_arrival) = scenario(Driver::Memory(MemoryConsumer::new()), "", true).await;
    assert_eq!(refetched, 0, "no healthy key fetched again");
    assert_eq!(on_arrival, HEALTHY as u64);
    let (refetched, on_arrival) = scenario(Driver::Memory(MemoryConsumer::new()), "", false).await;
    assert_eq!(
        refetched, HEALTHY as u64,
        "without ranges every healthy key is fetched again"
    );
    assert_eq!(on_arrival, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_fetches_only_what_the_last_commit_left_unsatisfied_mock_cluster() {
    let m = MockKafka::start(1).expect("mock cluster");
    let topic = unique("restart_ranges");
    m.create_topic(&topic, 1).expect("topic");
    m.create_topic(&format!("{topic}.dlq"), 1)
        .expect("dlq topic");
    let brokers = m.bootstrap_servers().to_owned();
    let (refetched, on_arrival) = scenario(
        Driver::Kafka {
            brokers,
            group: unique("restart_ranges_group"),
            create: false,
        },
        &topic,
        true,
    )
    .await;
    assert_eq!(refetched, 0, "no healthy key fetched again");
    assert_eq!(on_arrival, HEALTHY as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn a_restart_fetches_only_what_the_last_commit_left_unsatisfied_real_broker() {
    let brokers = kafka::brokers().expect("REFETCH_TEST_KAFKA");
    let (refetched, on_arrival) = scenario(
        Driver::Kafka {
            brokers: brokers.clone(),
            group: unique("restart_ranges_group"),
            create: true,
        },
        &unique("restart_ranges"),
        true,
    )
    .await;
    assert_eq!(refetched, 0, "no healthy key fetched again");
    assert_eq!(on_arrival, HEALTHY as u64);
    let (refetched, on_arrival) = scenario(
        Driver::Kafka {
            brokers,
            group: unique("restart_ranges_group"),
            create: true,
        },
        &unique("restart_ranges"),
        false,
    )
    .await;
    assert_eq!(
        refetched, HEALTHY as u64,
        "without ranges every healthy key is fetched again"
    );
    assert_eq!(on_arrival, 0);
}

/// Ranges are bounded: with every other key stuck, 1,000 one-offset ranges would need about
/// 4 KiB of metadata, more than a broker takes (the in-memory consumer refuses such a commit as
/// a broker does). The commit carries the ranges nearest the commit point within the bound, and
/// the offsets commit.
#[tokio::test(start_paused = true)]
async fn commit_ranges_stay_within_the_brokers_metadata_limit() {
    let m = MemoryConsumer::new();
    m.create_topic(TOPIC_MEMORY, 1);
    let source = VersionedSource::new();
    for i in 0..2_000 {
        let k = key(&format!("k{i}"));
        source.change(&k);
        if i % 2 == 0 {
            source.poison(k);
        }
        m.produce(
            TOPIC_MEMORY,
            0,
            None,
            format!(r#"{{"id":"k{i}"}}"#).as_bytes(),
            0,
        );
    }
    let sink = RecordingSink::new();
    let driver = Driver::Memory(m);
    let run = start(&driver, TOPIC_MEMORY, &source, &sink, true);
    until("the healthy keys written", Duration::from_secs(60), || {
        sink.held().len() == 1_000
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let Driver::Memory(m) = &driver else {
        unreachable!()
    };
    let tp = refetch::TopicPartition::new(TOPIC_MEMORY, 0);
    assert_eq!(
        m.committed().get(&tp),
        Some(&0),
        "the commit point is committed"
    );
    let meta = m.committed_metadata().get(&tp).cloned().unwrap_or_default();
    assert!(
        meta.len() > 3_900 && meta.len() <= 4_000,
        "{} bytes of ranges",
        meta.len()
    );
    let covered = refetch::offsets::StoredOffset::decode(0, &meta)
        .expect("readable")
        .covered;
    assert_eq!(covered.first(), Some(&(1, 1)), "the nearest range first");
    run.stop().await;
}
