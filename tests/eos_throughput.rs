//! Throughput of exactly-once delivery against at-least-once, on the real broker and the real
//! PostgreSQL server, in one run: the Kafka topic sink with and without transactions, and the
//! PostgreSQL sink with and without stored offsets.
//!
//! Run with `cargo bench -p refetch-integration-tests --bench eos_throughput` (with
//! `REFETCH_TEST_KAFKA` and `REFETCH_TEST_PG` set, as `scripts/test` does). Each variant drains
//! the same backlog of notifications (distinct keys, an in-memory source, so the sink and the
//! commits are what is measured) through an in-process pipeline, from the moment it owns its
//! partitions until the consumer group's committed offsets reach the end. Variants run in turn,
//! `ROUNDS` times each (interleaved), and the medians (and the best rounds) are compared. Without `--bench` (as
//! `cargo test --all-targets` runs it) it does nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use refetch::decode::JsonDecoder;
use refetch::{Delivery, EngineConfig, Pipeline, Sink};
use refetch_sinks::{KafkaConfig, PostgresConfig, Secret};
use refetch_testkit::kafka;
use refetch_testkit::memory::VersionedSource;
use refetch_testkit::names::unique;
use serde_json::json;

const NOTIFICATIONS: usize = 50_000;
const ROUNDS: usize = 5;

fn engine() -> EngineConfig {
    EngineConfig {
        window: Duration::from_millis(20),
        max_wait: Duration::from_millis(100),
        commit_interval: Duration::from_millis(500),
        ..EngineConfig::default()
    }
}

/// Drain the backlog of `topic` into `sink` with a new group; notifications per second.
async fn drain(brokers: &str, topic: &str, source: &VersionedSource, sink: Arc<dyn Sink>) -> f64 {
    let group = unique("eos_bench_group");
    kafka::create_topic(brokers, &format!("{group}.dlq"), 1)
        .await
        .unwrap();
    let pipeline = Pipeline::builder::<VersionedSource, Arc<dyn Sink>>()
        .fetcher(source.clone())
        .sink(sink)
        .kafka(refetch::KafkaConfig::new(
            brokers,
            group.clone(),
            vec![topic.to_owned()],
        ))
        .decoder(JsonDecoder::fixed_type("customer", "/id"))
        .engine(engine())
        .build()
        .unwrap();
    let handle = pipeline.handle();
    let task = tokio::spawn(pipeline.run(std::future::pending()));
    let end = kafka::end_offsets(brokers, topic).await.unwrap();
    // The clock starts when the pipeline owns its partitions.
    loop {
        if let Some(st) = handle.status().await {
            if st.joined && !st.engine.partitions.is_empty() {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    loop {
        let c = kafka::committed_offsets(brokers, &group, topic)
            .await
            .unwrap_or_default();
        if end.iter().all(|(p, o)| c.get(p) == Some(o)) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "drain stalled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    handle.shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(60), task).await;
    NOTIFICATIONS as f64 / took.as_secs_f64()
}

async fn kafka_sink(brokers: &str, delivery: Delivery) -> Arc<dyn Sink> {
    let topic = unique("eos_bench_out");
    kafka::create_topic(brokers, &topic, 4).await.unwrap();
    let cfg = KafkaConfig {
        brokers: brokers.to_owned(),
        topic,
        delivery,
        transactional_id_prefix: Some(unique("eos_bench_txn")),
        instance_id: Some("bench".into()),
        ..KafkaConfig::default()
    };
    refetch_sinks::build_sink(&refetch_sinks::SinkConfig::Kafka(cfg))
        .await
        .unwrap()
}

async fn postgres_sink(url: &str, delivery: Delivery) -> Arc<dyn Sink> {
    let (_client, schema) = refetch_testkit::postgres::fresh_schema().await.unwrap();
    let cfg = PostgresConfig {
        url: Secret::new(url.to_owned()),
        schema,
        table: "customers".into(),
        create_table: true,
        delivery,
        ..PostgresConfig::default()
    };
    refetch_sinks::build_sink(&refetch_sinks::SinkConfig::Postgres(cfg))
        .await
        .unwrap()
}

fn best(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!(
            "eos_throughput: run with `cargo bench -p refetch-integration-tests --bench eos_throughput`"
        );
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let brokers = kafka::brokers().unwrap();
        let pg = refetch_testkit::postgres::url().unwrap();
        let topic = unique("eos_bench_in");
        kafka::create_topic(&brokers, &topic, 4).await.unwrap();
        let source = VersionedSource::new();
        let mut records = Vec::with_capacity(NOTIFICATIONS);
        for i in 0..NOTIFICATIONS {
            let id = format!("c{i}");
            source.change(&refetch::EntityKey::new("customer", id.clone()));
            records.push((Some(id.clone().into_bytes()), json!({"id": id}).to_string().into_bytes()));
        }
        kafka::produce(&brokers, &topic, records).await.unwrap();
        let mut results: Vec<(&str, Vec<f64>)> = vec![
            ("kafka at_least_once", Vec::new()),
            ("kafka exactly_once", Vec::new()),
            ("postgres at_least_once", Vec::new()),
            ("postgres exactly_once", Vec::new()),
        ];
        for round in 0..ROUNDS {
            for (i, (name, r)) in results.iter_mut().enumerate() {
                let sink = match i {
                    0 => kafka_sink(&brokers, Delivery::AtLeastOnce).await,
                    1 => kafka_sink(&brokers, Delivery::ExactlyOnce).await,
                    2 => postgres_sink(&pg, Delivery::AtLeastOnce).await,
                    _ => postgres_sink(&pg, Delivery::ExactlyOnce).await,
                };
                let rate = drain(&brokers, &topic, &source, sink).await;
                println!("round {round}: {name}: {rate:.0} notifications/s");
                r.push(rate);
            }
        }
        println!();
        println!("| sink | delivery | median of {ROUNDS} (notifications/s) | best | rounds |");
        println!("|---|---|---|---|---|");
        for (name, r) in &results {
            let (sink, delivery) = name.split_once(' ').unwrap_or((name, ""));
            let rounds: Vec<String> = r.iter().map(|x| format!("{x:.0}")).collect();
            println!(
                "| {sink} | {delivery} | {:.0} | {:.0} | {} |",
                median(r),
                best(r),
                rounds.join(", ")
            );
        }
        println!();
        println!(
            "exactly_once / at_least_once, medians (best): kafka {:.2} ({:.2}); postgres with stored offsets {:.2} ({:.2})",
            median(&results[1].1) / median(&results[0].1),
            best(&results[1].1) / best(&results[0].1),
            median(&results[3].1) / median(&results[2].1),
            best(&results[3].1) / best(&results[2].1)
        );
    });
}
