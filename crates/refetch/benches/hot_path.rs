//! The engine's hot path: decode + coalesce + offset tracking, and memory per pending key.
//!
//! Run: `cargo bench -p refetch --bench hot_path`
//!
//! - `decode/json_100b`: the JSON decoder alone on ~100-byte notifications (the baseline);
//! - `ingest/*`: a record through `Engine::on_record` (decode, version check, coalescing into
//!   the key's pending entry, offset tracking), over 10,000 hot keys and over distinct keys;
//! - before criterion runs, a counting allocator measures the heap the engine holds per pending
//!   key (64-byte ids) and prints it;
//! - `HOT_PATH_ONLY=decode|hot|distinct|setup` runs a fixed 1,000,000 notifications of one
//!   workload instead, for `perf stat -e instructions:u` (see docs/benchmarks.md).

#![allow(unsafe_code)] // a counting global allocator, for the memory figure only

use std::sync::Arc;
use std::sync::atomic::Ordering;

use criterion::{BatchSize, Criterion, Throughput};
use refetch::clock::Tick;
use refetch::decode::{JsonDecoder, NotificationDecoder, RecordView};
use refetch::engine::{Decoders, Engine, TopicPartition};
use refetch::{Assignment, EngineConfig, Epoch, VersionKind};

#[path = "../tests/support/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::LIVE;

fn payloads(keys: usize) -> Vec<Vec<u8>> {
    (0..keys)
        .map(|i| {
            format!(
                r#"{{"id":"customer-{i:08}","type":"customer","v":{},"field":"phone","src":"crm-eu"}}"#,
                i % 97
            )
            .into_bytes()
        })
        .collect()
}

fn decoder() -> JsonDecoder {
    JsonDecoder::fixed_type("customer", "/id").with_version("/v", VersionKind::Integer)
}

fn engine() -> Engine {
    let cfg = EngineConfig {
        max_pending_keys: usize::MAX / 2,
        max_outstanding_per_partition: usize::MAX / 2,
        ..EngineConfig::default()
    };
    let mut e = Engine::new(
        cfg,
        Decoders::new().default_decoder(Arc::new(decoder())),
        Box::new(|_| true),
        false,
    );
    e.assign(&[Assignment::new(TopicPartition::new("notes", 0), Epoch(1))]);
    e
}

fn view(payload: &[u8], offset: i64) -> RecordView<'_> {
    RecordView {
        topic: "notes",
        partition: 0,
        offset,
        key: None,
        payload: Some(payload),
        headers: &[],
        timestamp: None,
    }
}

/// Heap bytes the engine holds per pending key with 64-byte ids.
fn memory_per_pending_key() -> f64 {
    const KEYS: usize = 100_000;
    let ids: Vec<Vec<u8>> = (0..KEYS)
        .map(|i| format!(r#"{{"id":"{:064}"}}"#, i).into_bytes())
        .collect();
    let cfg = EngineConfig {
        max_pending_keys: usize::MAX / 2,
        max_outstanding_per_partition: usize::MAX / 2,
        ..EngineConfig::default()
    };
    let mut e = Engine::new(
        cfg,
        Decoders::new().default_decoder(Arc::new(JsonDecoder::fixed_type("customer", "/id"))),
        Box::new(|_| true),
        false,
    );
    e.assign(&[Assignment::new(TopicPartition::new("notes", 0), Epoch(1))]);
    let before = LIVE.load(Ordering::SeqCst);
    for (o, p) in ids.iter().enumerate() {
        e.on_record(&view(p, o as i64), Tick(0));
    }
    let after = LIVE.load(Ordering::SeqCst);
    assert_eq!(e.pending_keys(), KEYS);
    (after - before) as f64 / KEYS as f64
}

/// Fixed work for counting instructions (`perf stat -e instructions:u`), which a loaded machine
/// does not skew the way it skews wall-clock time: `HOT_PATH_ONLY=<workload>` runs 1,000,000
/// notifications of one workload (`decode`, `hot`, `distinct`) and exits; `setup` only builds
/// the payloads, to subtract.
fn fixed_work(workload: &str) {
    const N: usize = 1_000_000;
    const BATCH: usize = 100_000;
    let hot = payloads(10_000);
    let distinct = if workload == "distinct" {
        payloads(BATCH)
    } else {
        Vec::new()
    };
    match workload {
        "decode" => {
            let d = decoder();
            for i in 0..N {
                std::hint::black_box(d.decode(&view(&hot[i % hot.len()], 0)).is_ok());
            }
        }
        "hot" | "distinct" => {
            let input = if workload == "hot" { &hot } else { &distinct };
            for _ in 0..N / BATCH {
                let mut e = engine();
                for o in 0..BATCH {
                    e.on_record(&view(&input[o % input.len()], o as i64), Tick(0));
                }
                std::hint::black_box(e.pending_keys());
            }
        }
        _ => {}
    }
}

fn main() {
    if let Ok(workload) = std::env::var("HOT_PATH_ONLY") {
        fixed_work(&workload);
        return;
    }
    let per_key = memory_per_pending_key();
    println!(
        "memory: {per_key:.0} heap bytes per pending key (64-byte ids, one notification each, 100,000 keys; includes the offset tracker entry and timer)"
    );

    let mut c = Criterion::default().configure_from_args();
    let hot = payloads(10_000);
    let distinct = payloads(1_000_000);

    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(1));
    let d = decoder();
    let mut i = 0usize;
    g.bench_function("json_100b", |b| {
        b.iter(|| {
            i = (i + 1) % hot.len();
            d.decode(&view(&hot[i], 0))
        })
    });
    g.finish();

    let mut g = c.benchmark_group("ingest");
    const BATCH: usize = 100_000;
    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("hot_10k_keys", |b| {
        b.iter_batched_ref(
            engine,
            |e| {
                for o in 0..BATCH {
                    e.on_record(&view(&hot[o % hot.len()], o as i64), Tick(0));
                }
            },
            BatchSize::LargeInput,
        )
    });
    g.bench_function("distinct_keys", |b| {
        b.iter_batched_ref(
            engine,
            |e| {
                for (o, p) in distinct.iter().take(BATCH).enumerate() {
                    e.on_record(&view(p, o as i64), Tick(0));
                }
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
    c.final_summary();
}
