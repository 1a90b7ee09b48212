//! # refetch-bench
//!
//! The side-by-side benchmark of issue 8: refetch against the raw Kafka consumer (the upper bound),
//! a hand-rolled fetch-per-notification loop, and (from `bench/peers/`) peer frameworks, on the
//! same real broker, the same source and the same kind of sink, in one run.
//!
//! | module | concept |
//! |---|---|
//! | [`workload`] | what is produced: keys, bursts, late delivery, live saves |
//! | [`probe`] | notification-to-durable latency and durable versions, measured the same way for all |
//! | [`contender`] | the Rust contenders, each run as its own process |
//! | [`driver`] | one topic and one child process per contender; convergence against the source |
//! | [`report`] | the Markdown table with ratios against the baselines of the same run |
//! | [`chart`] | a PNG bar chart per workload (built-in drawing, no font files) |
//!
//! The command is `refetch-bench run` (see `docs/benchmarks.md`).

pub mod chart;
pub mod contender;
pub mod driver;
pub mod probe;
pub mod report;
pub mod workload;

use contender::ContenderKind;
use workload::{KeyDistribution, WorkloadSpec};

/// Every contender in table order (the last three are the Java peers).
pub const ALL_CONTENDERS: [ContenderKind; 7] = [
    ContenderKind::Raw,
    ContenderKind::HandRolled,
    ContenderKind::ParallelConsumer,
    ContenderKind::KafkaStreams,
    ContenderKind::Camel,
    ContenderKind::RefetchDefault,
    ContenderKind::RefetchTuned,
];

/// The named workloads and the contenders each runs. `scale` multiplies the notification counts.
pub fn preset(name: &str, scale: f64) -> Option<(WorkloadSpec, Vec<ContenderKind>)> {
    let n = |x: usize| ((x as f64 * scale).round() as usize).max(100);
    let base = WorkloadSpec {
        name: name.to_owned(),
        notifications: n(200_000),
        entities: 20_000,
        distribution: KeyDistribution::Zipf(1.0),
        burst: 4,
        late_share: 0.05,
        delay_window: 1_000,
        live_saves: n(2_000),
        live_rate: 1_000.0,
        source_latency_ms: 5,
        sink: "jsonl".to_owned(),
        seed: 42,
        no_latency: false,
    };
    let throughput = WorkloadSpec {
        notifications: n(1_000_000),
        distribution: KeyDistribution::Uniform,
        live_saves: 0,
        source_latency_ms: 0,
        sink: "null".to_owned(),
        ..base.clone()
    };
    Some(match name {
        "dup-heavy" => (base, ALL_CONTENDERS.to_vec()),
        "throughput" => (
            throughput,
            vec![
                ContenderKind::Raw,
                ContenderKind::HandRolled,
                ContenderKind::RefetchDefault,
                ContenderKind::RefetchTuned,
            ],
        ),
        "rss-small" | "rss-large" => (
            WorkloadSpec {
                notifications: n(if name == "rss-small" {
                    100_000
                } else {
                    1_000_000
                }),
                no_latency: true,
                ..throughput
            },
            vec![ContenderKind::Raw, ContenderKind::RefetchDefault],
        ),
        _ => return None,
    })
}
