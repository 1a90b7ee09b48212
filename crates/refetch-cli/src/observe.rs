//! What the binary observes around the engine: fetch latency (the engine reports notification to
//! durable-write latency; the time a source takes to answer is measured here) and the HTTP
//! fetcher's circuit breakers, for the status page and the demo's summary.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use refetch::stats::LatencyHistogram;
use refetch::{FetchError, FetchOutcome, FetchRequest, Fetcher, async_trait};

type BreakerProbe = Box<dyn Fn() -> Vec<(String, bool)> + Send + Sync>;

/// Fetch latency and breaker states, shared by the fetcher wrapper and the status page.
pub struct FetchStats {
    latency: Mutex<LatencyHistogram>,
    breakers: BreakerProbe,
}

impl std::fmt::Debug for FetchStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetchStats").finish_non_exhaustive()
    }
}

/// A snapshot of [`FetchStats`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct FetchSnapshot {
    /// Requests timed (a batched request counts once per key).
    pub fetches: u64,
    /// Fetch latency p50, milliseconds.
    pub p50_ms: Option<f64>,
    /// Fetch latency p99, milliseconds.
    pub p99_ms: Option<f64>,
    /// Circuit breaker per entity type: `true` while open (fetches not attempted).
    pub breakers_open: Vec<(String, bool)>,
}

impl FetchStats {
    /// Stats whose breaker states come from `breakers`.
    pub fn new(breakers: impl Fn() -> Vec<(String, bool)> + Send + Sync + 'static) -> Self {
        FetchStats {
            latency: Mutex::new(LatencyHistogram::default()),
            breakers: Box::new(breakers),
        }
    }

    fn record(&self, d: Duration, n: usize) {
        if let Ok(mut h) = self.latency.lock() {
            for _ in 0..n {
                h.record(d);
            }
        }
    }

    /// The current figures.
    pub fn snapshot(&self) -> FetchSnapshot {
        let (fetches, p50, p99) = match self.latency.lock() {
            Ok(h) => (h.count(), h.quantile(0.5), h.quantile(0.99)),
            Err(_) => (0, None, None),
        };
        let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
        FetchSnapshot {
            fetches,
            p50_ms: ms(p50),
            p99_ms: ms(p99),
            breakers_open: (self.breakers)(),
        }
    }
}

/// A fetcher that times every request of the fetcher it wraps.
pub struct ObservedFetcher<F> {
    inner: F,
    stats: Arc<FetchStats>,
}

impl<F> ObservedFetcher<F> {
    /// Wrap `inner`, recording into `stats`.
    pub fn new(inner: F, stats: Arc<FetchStats>) -> Self {
        ObservedFetcher { inner, stats }
    }
}

#[async_trait]
impl<F: Fetcher> Fetcher for ObservedFetcher<F> {
    async fn fetch(&self, request: &FetchRequest) -> Result<FetchOutcome, FetchError> {
        let started = Instant::now();
        let r = self.inner.fetch(request).await;
        if !matches!(r, Err(FetchError::NotAttempted { .. })) {
            self.stats.record(started.elapsed(), 1);
        }
        r
    }

    fn handles(&self, entity_type: &str) -> bool {
        self.inner.handles(entity_type)
    }

    fn batch_limit(&self, entity_type: &str) -> usize {
        self.inner.batch_limit(entity_type)
    }

    async fn fetch_batch(
        &self,
        requests: &[FetchRequest],
    ) -> Vec<Result<FetchOutcome, FetchError>> {
        let started = Instant::now();
        let r = self.inner.fetch_batch(requests).await;
        let attempted = r
            .iter()
            .filter(|x| !matches!(x, Err(FetchError::NotAttempted { .. })))
            .count();
        self.stats.record(started.elapsed(), attempted);
        r
    }
}
