//! # refetch-bench
//!
//! The side-by-side benchmark of issues 8 and 18: refetch against the raw Kafka consumer (the
//! upper bound), the micro-batch loops a competent team writes in an afternoon
//! (`concurrent-loop`, `batch-dedupe`), and peer frameworks (Kafka Streams, Apache Camel, from
//! `bench/peers/`), on the same real broker, the same source and the same kind of sink, in one
//! invocation, on workloads where the designs differ.
//!
//! | module | concept |
//! |---|---|
//! | [`workload`] | what is produced: backlog, live saves with spread events, faults, instances |
//! | [`source`] | the REST source: latency, slow tail, poisoned keys, capacity, request counts |
//! | [`probe`] | inside a contender: receipt-to-durable latency and the durable log |
//! | [`freshness`] | save-to-durable freshness from the driver's saves and the durable logs |
//! | [`contender`] | the Rust contenders, each run as its own process |
//! | [`driver`] | topic, processes, schedule, completion, CPU and RSS from `/proc`, convergence |
//! | [`report`] | the Markdown tables, ratios against raw and `batch-dedupe`, target verdicts |
//! | [`chart`] | a PNG chart per workload (`plotters`, DejaVu Sans) |
//!
//! The command is `refetch-bench run` (see `docs/benchmarks.md`).

pub mod chart;
pub mod contender;
pub mod driver;
pub mod freshness;
pub mod probe;
pub mod report;
pub mod source;
pub mod workload;

use contender::ContenderKind;
use workload::{InstanceSpec, KeyDistribution, LiveSpec, SourceSpec, WorkloadSpec};

/// The contenders of every table, in table order (Kafka Streams and Camel are the Java peers).
pub const DEFAULT_CONTENDERS: [ContenderKind; 7] = [
    ContenderKind::Raw,
    ContenderKind::ConcurrentLoop,
    ContenderKind::BatchDedupe,
    ContenderKind::KafkaStreams,
    ContenderKind::Camel,
    ContenderKind::RefetchDefault,
    ContenderKind::RefetchTuned,
];

/// Every named workload, in the order of a full run.
pub const WORKLOADS: [&str; 16] = [
    "dup-heavy",
    "throughput",
    "live-bursts",
    "slow-tail",
    "poison",
    "rebalance",
    "restarts",
    "scale-out-1",
    "scale-out-2",
    "scale-out-4",
    "latency-0ms",
    "latency-1ms",
    "latency-10ms",
    "latency-100ms",
    "cpu-wait",
    "smoke",
];

/// A live-only workload: a small warm-up backlog (so every contender has a first record before
/// the stream starts) and the live stream.
fn live_only(name: &str, purpose: &str, live: LiveSpec, entities: usize) -> WorkloadSpec {
    WorkloadSpec {
        name: name.to_owned(),
        purpose: purpose.to_owned(),
        notifications: 400,
        entities,
        distribution: KeyDistribution::Uniform,
        burst: 1,
        late_share: 0.0,
        delay_window: 0,
        live,
        source: SourceSpec::latency(5),
        sink: "jsonl".to_owned(),
        instances: InstanceSpec::one(),
        fetch_slots: None,
        seed: 42,
        no_latency: false,
    }
}

/// The named workloads and the contenders each runs. `scale` multiplies the backlog's
/// notification count and the number of live saves (the rate stays, so the stream is shorter).
pub fn preset(name: &str, scale: f64) -> Option<(WorkloadSpec, Vec<ContenderKind>)> {
    let n = |x: usize| ((x as f64 * scale).round() as usize).max(100);
    let all = DEFAULT_CONTENDERS.to_vec();
    let stream =
        |saves: usize, rate: f64, dist, events: (usize, usize), spread_ms, versioned| LiveSpec {
            saves: n(saves),
            rate,
            distribution: dist,
            events_min: events.0,
            events_max: events.1,
            spread_ms,
            versioned,
        };
    let dup_heavy = WorkloadSpec {
        name: name.to_owned(),
        purpose: "A duplicate-heavy backlog with live saves on top".to_owned(),
        notifications: n(200_000),
        entities: 20_000,
        distribution: KeyDistribution::Zipf(1.0),
        burst: 4,
        late_share: 0.05,
        delay_window: 1_000,
        live: stream(2_000, 1_000.0, KeyDistribution::Zipf(1.0), (4, 4), 0, true),
        source: SourceSpec::latency(5),
        sink: "jsonl".to_owned(),
        instances: InstanceSpec::one(),
        fetch_slots: None,
        seed: 42,
        no_latency: false,
    };
    let throughput = WorkloadSpec {
        purpose: "Catch-up on a large backlog at a zero-latency source with a null sink".to_owned(),
        notifications: n(1_000_000),
        distribution: KeyDistribution::Uniform,
        live: LiveSpec::none(),
        source: SourceSpec::latency(0),
        sink: "null".to_owned(),
        ..dup_heavy.clone()
    };
    let sweep = |ms: u64| WorkloadSpec {
        purpose: format!(
            "A duplicate-heavy backlog against a source answering in {ms} ms (the latency sweep)"
        ),
        notifications: n(50_000),
        entities: 5_000,
        live: LiveSpec::none(),
        source: SourceSpec::latency(ms),
        sink: "null".to_owned(),
        ..dup_heavy.clone()
    };
    let scale_out = |instances: usize| WorkloadSpec {
        purpose: format!(
            "A backlog against a source with a fixed pool of 32 workers, {instances} instance(s) in one group"
        ),
        notifications: n(200_000),
        entities: 50_000,
        distribution: KeyDistribution::Uniform,
        live: LiveSpec::none(),
        source: SourceSpec {
            capacity: 32,
            ..SourceSpec::latency(10)
        },
        sink: "null".to_owned(),
        instances: InstanceSpec {
            initial: instances,
            ..InstanceSpec::one()
        },
        ..dup_heavy.clone()
    };
    Some(match name {
        "dup-heavy" => {
            let mut c = all;
            c.insert(1, ContenderKind::HandRolled);
            c.insert(5, ContenderKind::ParallelConsumer);
            (dup_heavy, c)
        }
        "throughput" => (throughput, all),
        "live-bursts" => (
            live_only(
                name,
                "A steady live stream whose saves emit several unversioned events spread over up to 1.5 s (one save, several outbox events)",
                stream(4_000, 200.0, KeyDistribution::Uniform, (3, 6), 1_500, false),
                20_000,
            ),
            all,
        ),
        "slow-tail" => (
            WorkloadSpec {
                source: SourceSpec {
                    slow_key_share: 0.01,
                    slow_ms: (500, 1_000),
                    ..SourceSpec::latency(5)
                },
                ..live_only(
                    name,
                    "A live stream where 1% of entities (so about 1% of fetches) take 500–1,000 ms",
                    stream(5_000, 250.0, KeyDistribution::Uniform, (1, 2), 0, true),
                    20_000,
                )
            },
            all,
        ),
        "poison" => (
            WorkloadSpec {
                source: SourceSpec {
                    poison_hottest: 10,
                    poison_after_ms: 4_000,
                    poison_for_ms: 10_000,
                    ..SourceSpec::latency(5)
                },
                ..live_only(
                    name,
                    "A live stream where the 10 hottest entities fail for 10 s",
                    stream(5_000, 250.0, KeyDistribution::Zipf(1.0), (1, 2), 0, true),
                    20_000,
                )
            },
            all,
        ),
        "rebalance" => (
            WorkloadSpec {
                instances: InstanceSpec {
                    initial: 1,
                    join_at_ms: Some(6_000),
                    leave_at_ms: Some(13_000),
                    kill_every_ms: None,
                    static_membership: false,
                },
                ..live_only(
                    name,
                    "A live stream while a second instance joins the group and later leaves it",
                    stream(5_000, 250.0, KeyDistribution::Zipf(0.8), (1, 3), 300, true),
                    20_000,
                )
            },
            all,
        ),
        "restarts" => (
            WorkloadSpec {
                source: SourceSpec {
                    poison_hottest: 5,
                    poison_after_ms: 2_000,
                    poison_for_ms: 8_000,
                    ..SourceSpec::latency(5)
                },
                instances: InstanceSpec {
                    kill_every_ms: Some(5_000),
                    static_membership: true,
                    ..InstanceSpec::one()
                },
                ..live_only(
                    name,
                    "A sparse live stream while the instance is killed with SIGKILL and restarted every 5 s, and the 5 hottest entities fail for 8 s (keys in backoff)",
                    stream(3_000, 100.0, KeyDistribution::Zipf(0.5), (1, 1), 0, true),
                    50_000,
                )
            },
            all,
        ),
        "scale-out-1" => (scale_out(1), all),
        "scale-out-2" => (scale_out(2), all),
        "scale-out-4" => (scale_out(4), all),
        "latency-0ms" => (sweep(0), all),
        "latency-1ms" => (sweep(1), all),
        "latency-10ms" => (sweep(10), all),
        "latency-100ms" => (sweep(100), all),
        "cpu-wait" => (
            WorkloadSpec {
                purpose: "CPU time while every fetch slot waits on a slow source (4 slots, 20 ms): a process that sleeps while it waits uses a small share of the wall time".to_owned(),
                notifications: n(2_000),
                entities: 2_000,
                distribution: KeyDistribution::Uniform,
                burst: 1,
                late_share: 0.0,
                live: LiveSpec::none(),
                source: SourceSpec::latency(20),
                sink: "null".to_owned(),
                fetch_slots: Some(4),
                ..dup_heavy.clone()
            },
            vec![
                ContenderKind::ConcurrentLoop,
                ContenderKind::BatchDedupe,
                ContenderKind::RefetchDefault,
            ],
        ),
        "smoke" => (
            WorkloadSpec {
                purpose: "The harness in miniature (the smoke test)".to_owned(),
                notifications: n(1_600),
                entities: 200,
                delay_window: 100,
                live: stream(100, 200.0, KeyDistribution::Uniform, (2, 3), 300, true),
                source: SourceSpec::latency(1),
                ..dup_heavy.clone()
            },
            vec![
                ContenderKind::Raw,
                ContenderKind::ConcurrentLoop,
                ContenderKind::BatchDedupe,
                ContenderKind::RefetchDefault,
            ],
        ),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_named_workload_has_a_preset_with_its_name() {
        for w in WORKLOADS {
            let (spec, contenders) = preset(w, 1.0).unwrap_or_else(|| panic!("{w}"));
            assert_eq!(spec.name, w);
            assert!(!contenders.is_empty());
            assert!(!crate::report::describe(&spec).is_empty());
        }
        assert!(preset("nope", 1.0).is_none());
    }

    #[test]
    fn scale_shrinks_backlog_and_stream() {
        let (full, _) = preset("live-bursts", 1.0).unwrap_or_else(|| panic!());
        let (small, _) = preset("live-bursts", 0.1).unwrap_or_else(|| panic!());
        assert_eq!(full.live.saves, 4_000);
        assert_eq!(small.live.saves, 400);
        assert_eq!(full.live.rate, small.live.rate);
    }
}
