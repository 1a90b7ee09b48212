//! Shared helpers of the HTTP fetcher's tests: a local source, a fetcher pointed at it, and a
//! metrics snapshot reader.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use metrics_util::CompositeKey;
use metrics_util::debugging::{DebugValue, Snapshotter};
use refetch::{EntityKey, FetchRequest};
use refetch_http::{HttpFetcher, SourceConfig};
use refetch_testkit::http_source::{HttpSource, HttpSourceOptions};

/// A started source and the single-entity URL template for `customer`.
pub async fn source() -> HttpSource {
    HttpSource::start(HttpSourceOptions::default())
        .await
        .expect("source starts")
}

/// `{base}/customer/{id}`.
pub fn template(src: &HttpSource) -> String {
    format!("{}/customer/{{id}}", src.base_url())
}

/// A fetcher for `customer` built from `cfg`.
pub fn fetcher(cfg: SourceConfig) -> HttpFetcher {
    HttpFetcher::builder()
        .source("customer", cfg)
        .build()
        .expect("valid configuration")
}

/// A plain request for customer `id`.
pub fn req(id: &str) -> FetchRequest {
    FetchRequest::new(EntityKey::new("customer", id))
}

/// Reads a [`metrics_util::debugging::DebuggingRecorder`]. Its snapshots drain counters and
/// histograms (and zero gauges), so this keeps running totals across reads.
pub struct Metrics {
    snapshotter: Snapshotter,
    seen: Vec<(CompositeKey, DebugValue)>,
}

impl Metrics {
    /// Read through `snapshotter`.
    pub fn new(snapshotter: Snapshotter) -> Self {
        Metrics {
            snapshotter,
            seen: Vec::new(),
        }
    }

    fn refresh(&mut self) {
        for (key, _, _, value) in self.snapshotter.snapshot().into_vec() {
            match self.seen.iter_mut().find(|(k, _)| *k == key) {
                None => self.seen.push((key, value)),
                Some((_, held)) => match (held, value) {
                    (DebugValue::Counter(a), DebugValue::Counter(b)) => *a += b,
                    (DebugValue::Histogram(a), DebugValue::Histogram(b)) => a.extend(b),
                    (held, value) => *held = value,
                },
            }
        }
    }

    fn find(&mut self, name: &str, labels: &[(&str, &str)]) -> Option<&DebugValue> {
        self.refresh();
        self.seen
            .iter()
            .find(|(k, _)| {
                k.key().name() == name
                    && labels.iter().all(|(ln, lv)| {
                        k.key().labels().any(|l| l.key() == *ln && l.value() == *lv)
                    })
            })
            .map(|(_, v)| v)
    }

    /// The total of a counter (0 when absent) with `labels` among its labels.
    pub fn counter(&mut self, name: &str, labels: &[(&str, &str)]) -> u64 {
        match self.find(name, labels) {
            Some(DebugValue::Counter(c)) => *c,
            _ => 0,
        }
    }

    /// The gauge's value as last set before this read (a gauge not set since the previous read
    /// reads 0: the recorder zeroes gauges on every snapshot).
    pub fn gauge(&mut self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        match self.find(name, labels) {
            Some(DebugValue::Gauge(g)) => Some(g.into_inner()),
            _ => None,
        }
    }

    /// How many samples a histogram received.
    pub fn histogram_len(&mut self, name: &str, labels: &[(&str, &str)]) -> usize {
        match self.find(name, labels) {
            Some(DebugValue::Histogram(h)) => h.len(),
            _ => 0,
        }
    }
}
