//! The memory caps count honest bytes: the heap the engine really holds per pending key (measured
//! with a counting allocator) stays close to what [`Engine::memory`] reports for it.
//!
//! One test in this binary on purpose: the allocator counts every thread's allocations.

#![allow(unsafe_code)] // a counting global allocator

use std::sync::Arc;
use std::sync::atomic::Ordering;

use refetch::clock::Tick;
use refetch::decode::{JsonDecoder, RecordView};
use refetch::engine::{Decoders, Engine, TopicPartition};
use refetch::{Assignment, EngineConfig, Epoch};

#[path = "support/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::LIVE;

/// (measured heap bytes, accounted key bytes) for `keys` pending keys with ids of `id_len` bytes,
/// one notification each.
fn measure(keys: usize, id_len: usize) -> (f64, f64) {
    let payloads: Vec<Vec<u8>> = (0..keys)
        .map(|i| format!(r#"{{"id":"{i:0id_len$}"}}"#).into_bytes())
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
    let accounted_before = e.memory().key_bytes;
    for (o, p) in payloads.iter().enumerate() {
        let record = RecordView {
            topic: "notes",
            partition: 0,
            offset: o as i64,
            key: None,
            payload: Some(p),
            headers: &[],
            timestamp: None,
        };
        e.on_record(&record, Tick(0));
    }
    let measured = LIVE.load(Ordering::SeqCst) - before;
    assert_eq!(e.pending_keys(), keys);
    let accounted = e.memory().key_bytes - accounted_before;
    (measured as f64, accounted as f64)
}

#[test]
fn accounted_key_bytes_follow_the_heap_really_held() {
    // Key counts at and between the growth steps of the engine's vectors, short and long ids.
    for (keys, id_len) in [(100_000, 64), (20_000, 64), (60_000, 16), (10_000, 200)] {
        let (measured, accounted) = measure(keys, id_len);
        let ratio = measured / accounted;
        eprintln!(
            "{keys} keys, {id_len}-byte ids: {:.0} B/key held, {:.0} B/key accounted ({ratio:.2})",
            measured / keys as f64,
            accounted / keys as f64
        );
        assert!(
            (0.8..=1.25).contains(&ratio),
            "{keys} keys with {id_len}-byte ids: {measured} bytes held against {accounted} accounted"
        );
    }
}
