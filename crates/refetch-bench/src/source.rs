//! The benchmark's REST source: versioned entities on `127.0.0.1`, with the faults the workloads
//! need, counting every request per entity.
//!
//! | request | answer |
//! |---|---|
//! | `GET /entity/{id}` | `200 {"id":..,"type":"entity","version":N,"data":{..}}`, `404` when unknown |
//! | `GET /entity?ids=a,b,c` | `200 {"items":[...]}` with the bodies of the ids that exist |
//!
//! Before it answers, a request waits for a slot when the source has a capacity (a fixed pool
//! of workers: the source is then the limit of the whole system), then for the latency: the
//! fixed one, or a slow entity's own (the slow tail; a batch waits for its slowest id). While
//! poisoning is on, a request that names a poisoned entity gets `500`.
//!
//! It is a separate server from `refetch_testkit::http_source` because the workloads need
//! per-entity latency and a capacity limit, and the driver needs counters cheap enough not to
//! become the bottleneck at 100,000 requests per second.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::Response;
use tokio::sync::{Semaphore, oneshot};

use crate::workload::{ENTITY_TYPE, entity_id, entity_index};

/// How the source answers; see the [module docs](self).
#[derive(Debug, Clone, Default)]
pub struct SourceOptions {
    /// Latency of every answer.
    pub latency: Duration,
    /// Entities with a latency of their own.
    pub slow: HashMap<u32, Duration>,
    /// Entities that fail while poisoning is on.
    pub poisoned: HashSet<u32>,
    /// Requests served at once (0: no limit).
    pub capacity: usize,
}

struct Shared {
    store: Mutex<HashMap<u32, i64>>,
    per_key: Mutex<HashMap<u32, u64>>,
    total: AtomicU64,
    poison_on: AtomicBool,
    opts: SourceOptions,
    slots: Option<Semaphore>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running source. Cheap to clone: clones share one server.
#[derive(Clone)]
pub struct BenchSource {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: Arc<Mutex<Option<oneshot::Sender<()>>>>,
}

impl BenchSource {
    /// Start on `127.0.0.1`, any free port.
    pub async fn start(opts: SourceOptions) -> anyhow::Result<BenchSource> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the bench source")?;
        let addr = listener.local_addr()?;
        let slots = (opts.capacity > 0).then(|| Semaphore::new(opts.capacity));
        let shared = Arc::new(Shared {
            store: Mutex::new(HashMap::new()),
            per_key: Mutex::new(HashMap::new()),
            total: AtomicU64::new(0),
            poison_on: AtomicBool::new(false),
            opts,
            slots,
        });
        let (tx, rx) = oneshot::channel::<()>();
        let app = Router::new().fallback(handle).with_state(shared.clone());
        tokio::spawn(async move {
            let server = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = rx.await;
            });
            if let Err(e) = server.await {
                tracing::warn!(error = %e, "bench source stopped");
            }
        });
        Ok(BenchSource {
            shared,
            addr,
            stop: Arc::new(Mutex::new(Some(tx))),
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replace every entity's version and forget the counters; poisoning off.
    pub fn reset(&self, versions: &HashMap<u32, i64>) {
        *lock(&self.shared.store) = versions.clone();
        lock(&self.shared.per_key).clear();
        self.shared.total.store(0, Ordering::SeqCst);
        self.set_poison(false);
    }

    /// Forget the request counters.
    pub fn reset_counters(&self) {
        lock(&self.shared.per_key).clear();
        self.shared.total.store(0, Ordering::SeqCst);
    }

    /// Change an entity: returns its new version.
    pub fn put(&self, entity: u32) -> i64 {
        let mut store = lock(&self.shared.store);
        let v = store.entry(entity).or_insert(0);
        *v += 1;
        *v
    }

    /// Turn the poisoned entities' failures on or off.
    pub fn set_poison(&self, on: bool) {
        self.shared.poison_on.store(on, Ordering::SeqCst);
    }

    /// Every entity's current version.
    pub fn versions(&self) -> HashMap<u32, i64> {
        lock(&self.shared.store).clone()
    }

    /// Requests answered (faulty ones included).
    pub fn total_requests(&self) -> u64 {
        self.shared.total.load(Ordering::SeqCst)
    }

    /// Entity reads: requests per entity summed (a batch naming 100 ids counts 100).
    pub fn entity_reads(&self) -> u64 {
        lock(&self.shared.per_key).values().sum()
    }

    /// Stop serving.
    pub fn shutdown(&self) {
        if let Some(tx) = lock(&self.stop).take() {
            let _ = tx.send(());
        }
    }
}

fn body(id: &str, version: i64) -> String {
    format!(
        "{{\"id\":\"{id}\",\"type\":\"{ENTITY_TYPE}\",\"version\":{version},\"data\":{{\"n\":{version}}}}}"
    )
}

fn answer(status: StatusCode, text: String) -> Response {
    let mut r = Response::new(Body::from(text));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let path = req.uri().path();
    let prefix = format!("/{ENTITY_TYPE}");
    let ids: Vec<u32> = if let Some(id) = path.strip_prefix(&format!("{prefix}/")) {
        match entity_index(id) {
            Some(i) => vec![i],
            None => return answer(StatusCode::NOT_FOUND, "{\"error\":\"not_found\"}".into()),
        }
    } else if path == prefix {
        let q = req.uri().query().unwrap_or("");
        let raw = q
            .split('&')
            .find_map(|p| p.strip_prefix("ids="))
            .unwrap_or("");
        raw.split(',')
            .flat_map(|s| s.split("%2C"))
            .filter_map(entity_index)
            .collect()
    } else {
        return answer(StatusCode::NOT_FOUND, "no route".into());
    };
    let batch = path == prefix;
    shared.total.fetch_add(1, Ordering::Relaxed);
    {
        let mut per_key = lock(&shared.per_key);
        for &i in &ids {
            *per_key.entry(i).or_default() += 1;
        }
    }
    let _slot = match &shared.slots {
        Some(s) => s.acquire().await.ok(),
        None => None,
    };
    let latency = ids
        .iter()
        .filter_map(|i| shared.opts.slow.get(i))
        .max()
        .copied()
        .unwrap_or(shared.opts.latency);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if shared.poison_on.load(Ordering::Relaxed)
        && ids.iter().any(|i| shared.opts.poisoned.contains(i))
    {
        return answer(
            StatusCode::INTERNAL_SERVER_ERROR,
            "{\"error\":\"injected\"}".into(),
        );
    }
    let store = lock(&shared.store);
    if batch {
        let items: Vec<String> = ids
            .iter()
            .filter_map(|&i| store.get(&i).map(|&v| body(&entity_id(i), v)))
            .collect();
        answer(
            StatusCode::OK,
            format!("{{\"items\":[{}]}}", items.join(",")),
        )
    } else {
        match ids.first().and_then(|i| store.get(i).map(|&v| (*i, v))) {
            Some((i, v)) => answer(StatusCode::OK, body(&entity_id(i), v)),
            None => answer(StatusCode::NOT_FOUND, "{\"error\":\"not_found\"}".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Instant;

    use super::*;

    async fn get(url: &str) -> (u16, String) {
        let r = reqwest::get(url).await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    #[tokio::test]
    async fn answers_counts_slows_and_poisons() {
        let src = BenchSource::start(SourceOptions {
            latency: Duration::ZERO,
            slow: HashMap::from([(7, Duration::from_millis(300))]),
            poisoned: HashSet::from([1]),
            capacity: 0,
        })
        .await
        .unwrap();
        src.reset(&HashMap::from([(1, 3), (7, 1), (9, 2)]));
        let base = src.base_url();
        assert_eq!(src.put(9), 3);
        let (s, b) = get(&format!("{base}/entity/e9")).await;
        assert_eq!((s, b.contains("\"version\":3")), (200, true), "{b}");
        assert_eq!(get(&format!("{base}/entity/e4")).await.0, 404);
        let (s, b) = get(&format!("{base}/entity?ids=e9,e1,e4")).await;
        assert_eq!(s, 200);
        assert_eq!(b.matches("\"id\"").count(), 2, "{b}");
        let t = Instant::now();
        assert_eq!(get(&format!("{base}/entity/e7")).await.0, 200);
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "a slow entity is slow"
        );
        src.set_poison(true);
        assert_eq!(get(&format!("{base}/entity/e1")).await.0, 500);
        assert_eq!(get(&format!("{base}/entity/e9")).await.0, 200);
        src.set_poison(false);
        assert_eq!(get(&format!("{base}/entity/e1")).await.0, 200);
        assert_eq!(src.total_requests(), 7);
        // e9 x3 (two single, one batch), e1 x3, e4 x2, e7 x1
        assert_eq!(src.entity_reads(), 9);
        src.shutdown();
    }

    #[tokio::test]
    async fn capacity_queues_requests_beyond_the_pool() {
        let src = BenchSource::start(SourceOptions {
            latency: Duration::from_millis(100),
            capacity: 2,
            ..SourceOptions::default()
        })
        .await
        .unwrap();
        src.reset(&HashMap::from([(1, 1)]));
        let url = format!("{}/entity/e1", src.base_url());
        let t = Instant::now();
        let all = futures::future::join_all((0..4).map(|_| get(&url))).await;
        assert!(all.iter().all(|(s, _)| *s == 200));
        // 4 requests through 2 slots of 100 ms: two rounds.
        assert!(
            t.elapsed() >= Duration::from_millis(200),
            "{:?}",
            t.elapsed()
        );
        src.shutdown();
    }
}
