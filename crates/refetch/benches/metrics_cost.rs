//! What a metric update costs with the Prometheus recorder installed, as the binary runs it.
//!
//! Run: `cargo bench -p refetch --no-default-features --bench metrics_cost`
//!
//! With a recorder installed, every `counter!()` / `gauge!()` / `histogram!()` call builds its
//! key (name and labels; owned label values allocate) and looks it up in the recorder's
//! registry. A handle obtained once skips both. The cases:
//!
//! - `lookup/*`: the macro at the call site, the way the engine's per-record, per-fetch and
//!   per-write call sites are written (unlabeled, a static label, owned labels as the HTTP
//!   fetcher and the per-partition gauges pass them);
//! - `handle/*`: the same update through a handle kept from registration;
//! - `engine/*`: the engine's own functions after `refetch::metrics::register()` (which keeps
//!   handles for the hot series) and one it still looks up.

#![allow(clippy::expect_used)] // set-up of a benchmark process

use std::hint::black_box;
use std::time::Duration;

use criterion::Criterion;
use metrics_exporter_prometheus::PrometheusBuilder;

fn main() {
    let recorder = PrometheusBuilder::new()
        .set_buckets(refetch::metrics::FETCH_BUCKETS)
        .expect("buckets")
        .build_recorder();
    metrics::set_global_recorder(recorder).expect("the only recorder");
    refetch::metrics::register();

    let mut c = Criterion::default().configure_from_args();
    let mut g = c.benchmark_group("lookup");
    g.bench_function("counter_unlabeled", |b| {
        b.iter(|| metrics::counter!("bench_unlabeled_total").increment(black_box(1)))
    });
    g.bench_function("counter_static_label", |b| {
        b.iter(|| metrics::counter!("bench_static_total", "outcome" => "found").increment(1))
    });
    let source = String::from("customer");
    g.bench_function("counter_owned_labels", |b| {
        b.iter(|| {
            metrics::counter!("bench_owned_total", "source" => source.clone(), "outcome" => "found")
                .increment(1)
        })
    });
    g.bench_function("histogram_owned_label", |b| {
        b.iter(|| {
            metrics::histogram!("bench_seconds", "source" => source.clone()).record(black_box(0.01))
        })
    });
    let topic = String::from("customer-changes");
    g.bench_function("gauge_partition_labels", |b| {
        b.iter(|| {
            metrics::gauge!("bench_offset", "topic" => topic.clone(), "partition" => 3.to_string())
                .set(black_box(42.0))
        })
    });
    g.finish();

    let mut g = c.benchmark_group("handle");
    let counter = metrics::counter!("bench_static_total", "outcome" => "found");
    g.bench_function("counter", |b| b.iter(|| counter.increment(black_box(1))));
    let hist = metrics::histogram!("bench_seconds", "source" => source.clone());
    g.bench_function("histogram", |b| b.iter(|| hist.record(black_box(0.01))));
    g.finish();

    let mut g = c.benchmark_group("engine");
    g.bench_function("fetch_latency_registered", |b| {
        b.iter(|| refetch::metrics::fetch_latency(black_box(Duration::from_millis(12))))
    });
    g.bench_function("record_batch_registered", |b| {
        b.iter(|| refetch::metrics::record_batch(black_box(1)))
    });
    g.bench_function("source_outage_lookup", |b| {
        b.iter(|| refetch::metrics::source_outage(black_box("customer"), false))
    });
    g.finish();
    c.final_summary();
}
