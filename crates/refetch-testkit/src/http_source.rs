//! A local REST source of versioned JSON entities, with fault injection.
//!
//! [`HttpSource`] is an axum server bound to `127.0.0.1:0` that plays the part of the system a
//! refetch pipeline pulls from. Tests use it to check what a fetcher asked for (the raw request
//! target of every request is recorded), to drive entities through changes (see
//! [`HttpSource::spawn_mutator`]), and to inject the failures a real source produces: latency,
//! 5xx, 429 with `Retry-After`, an outage (the listener is really closed and later re-bound on
//! the same port, so clients see "connection refused"), bodies cut off mid-way, HTML instead of
//! JSON, huge bodies, redirects to another host, slow trickles and a gateway's 404.
//!
//! # Routes
//!
//! | request | answer |
//! |---|---|
//! | `GET /{type}/{id}` | `200` with the entity body, `ETag: "v{version}"`, `X-Version`, `Last-Modified`; `304` when `If-None-Match` matches (or, without it, when `If-Modified-Since` is not older than the change); `404 {"error":"not_found"}` when missing or deleted |
//! | `GET /{type}?ids=a,b,c` | `200 {"items":[...]}` with the bodies of the ids that exist (missing ids are absent) |
//! | `GET /{type}?offset=&limit=`, `?page=&per_page=` (pages from 1), `?cursor=&limit=` (ids after the cursor), `?limit=` (the first page) | a listing page in id (byte) order of the entities that exist: `200 {"items":[...],"total":N,"next_cursor":"id"\|null}` and, when more follow, `Link: <.../{type}?cursor=..&limit=..>; rel="next"` |
//! | anything else | `404` with a plain-text body (`no route`), which is *not* the source's own not-found answer |
//!
//! Path segments and batch ids are percent-decoded by the source itself (one segment is one id; the
//! batch value is split on the separator *before* decoding), so an id such as `a/b` arrives as
//! `a%2Fb` and is found. Entity bodies look like `{"id":..,"type":..,"version":N,"data":..}`.
//!
//! # Faults
//!
//! The source is `Clone` (a shared handle): switch faults while a test runs.
//! Per request, in this order: the fixed latency ([`HttpSource::set_latency`]), then the next queued
//! fault ([`HttpSource::fail_next`]), then a fault for a poisoned id ([`HttpSource::poison`]; a
//! batch request that names a poisoned id gets it too), then a fault drawn at random for an
//! entity request ([`HttpSource::set_random_faults`], optionally answered at once, before the
//! latency: a flaky source whose errors come back faster than its successes), then the standing
//! fault ([`HttpSource::set_fault`]). [`HttpSource::set_down`] closes and re-opens the listener.
//!
//! Listing pages report their total in the body; [`HttpSource::set_total_header`] moves it to a
//! response header (for example `X-Total-Count`).
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use refetch_testkit::http_source::{Fault, HttpSource, HttpSourceOptions};
//! let source = HttpSource::start(HttpSourceOptions::default()).await?;
//! let v = source.put("customer", "42", serde_json::json!({"name": "Ada"}));
//! source.fail_next(2, Fault::Status(500));
//! // ... point a fetcher at format!("{}/customer/{{id}}", source.base_url()) ...
//! assert_eq!(source.requests_for("customer", "42"), 0);
//! # let _ = v; Ok(()) }
//! ```

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use percent_encoding::percent_decode_str;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// How many requests [`HttpSource::recorded`] keeps (the oldest are dropped first).
pub const RECORD_LIMIT: usize = 100_000;

/// Options for [`HttpSource::start`].
#[derive(Debug, Clone)]
pub struct HttpSourceOptions {
    /// Fixed latency before every answer (can be changed later with [`HttpSource::set_latency`]).
    pub latency: Duration,
    /// The separator of the batch route's `ids` value (default `,`).
    pub batch_separator: char,
    /// Bind this port instead of a free one (0: any free port).
    pub port: u16,
}

impl Default for HttpSourceOptions {
    fn default() -> Self {
        HttpSourceOptions {
            latency: Duration::ZERO,
            batch_separator: ',',
            port: 0,
        }
    }
}

/// A failure the source can be told to produce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status and the body `{"error":"injected"}`.
    Status(u16),
    /// Answer with `status` and a `Retry-After` header of `value` (seconds or an HTTP date).
    RetryAfter {
        /// The status, usually 429 or 503.
        status: u16,
        /// The header value, verbatim.
        value: String,
    },
    /// A gateway's 404: `text/html` body `<html>404 Not Found</html>`, not the source's own
    /// `{"error":"not_found"}`.
    GatewayNotFound,
    /// `200` with `text/html` instead of JSON.
    Html,
    /// `200 application/json`, streamed (no `Content-Length`), this many bytes long.
    HugeBody(usize),
    /// The normal answer, but the connection is cut after half of the body (the declared
    /// `Content-Length` is never reached).
    DropMidBody,
    /// The normal answer, one byte of body every interval.
    Trickle(Duration),
    /// `302` to `base` followed by the request's own target (path and query), for example
    /// `http://127.0.0.2:9` to send the client to another host.
    Redirect(String),
}

/// Faults drawn at random per entity request (single or batch); see
/// [`HttpSource::set_random_faults`].
#[derive(Debug, Clone)]
pub struct RandomFaults {
    /// Each fault with the share of requests that get it (the shares add up to at most 1).
    pub faults: Vec<(f64, Fault)>,
    /// Answer a drawn fault at once, without waiting out the latency.
    pub instant: bool,
    /// Seed of the draws (runs are repeatable).
    pub seed: u64,
}

/// One request as the source received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// The method.
    pub method: String,
    /// The raw request target (path and query), exactly as sent.
    pub target: String,
    /// The request headers (names lower-case; values lossily decoded).
    pub headers: Vec<(String, String)>,
    /// When it arrived.
    pub at: Instant,
}

impl RecordedRequest {
    /// The value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One change made by a [`Mutator`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mutation {
    /// The entity type.
    pub entity_type: String,
    /// The id.
    pub id: String,
    /// The version the change produced.
    pub version: i64,
    /// Whether the change was a delete.
    pub deleted: bool,
}

/// Options for [`HttpSource::spawn_mutator_with`].
#[derive(Debug, Clone)]
pub struct MutatorOptions {
    /// Entity types to change.
    pub types: Vec<String>,
    /// Ids to change (every type uses the same ids).
    pub ids: Vec<String>,
    /// Changes per second.
    pub rate_per_sec: f64,
    /// Share of changes that are deletes (0.0 to 1.0).
    pub delete_ratio: f64,
    /// Seed of the random choices (runs are repeatable).
    pub seed: u64,
}

#[derive(Debug, Clone)]
struct Record {
    version: i64,
    data: Value,
    deleted: bool,
    modified: SystemTime,
}

#[derive(Debug, Default)]
struct FaultState {
    latency: Duration,
    next: VecDeque<(u64, Fault)>,
    standing: Option<Fault>,
    poisoned: HashMap<(String, String), Fault>,
    random: Option<(RandomFaults, rand::rngs::StdRng)>,
    total_header: Option<HeaderName>,
}

#[derive(Debug, Default)]
struct Stats {
    per_key: HashMap<(String, String), u64>,
    log: VecDeque<RecordedRequest>,
}

struct Running {
    shutdown: oneshot::Sender<()>,
    listener_closed: oneshot::Receiver<()>,
    task: JoinHandle<()>,
}

struct Shared {
    addr: SocketAddr,
    separator: char,
    store: Mutex<BTreeMap<(String, String), Record>>,
    faults: Mutex<FaultState>,
    stats: Mutex<Stats>,
    total: AtomicU64,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    server: tokio::sync::Mutex<Option<Running>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A local REST source; see the [module docs](self). Cheap to clone: clones share one server.
#[derive(Clone)]
pub struct HttpSource {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for HttpSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpSource")
            .field("addr", &self.shared.addr)
            .finish_non_exhaustive()
    }
}

/// A listener that signals when it is dropped (so [`HttpSource::set_down`] can wait until the
/// port really refuses connections).
struct NotifyingListener {
    inner: TcpListener,
    _dropped: oneshot::Sender<()>,
}

impl axum::serve::Listener for NotifyingListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok(pair) => return pair,
                Err(e) => {
                    tracing::debug!(error = %e, "http source accept failed");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

impl HttpSource {
    /// Start a source on `127.0.0.1` (port from `opts`, 0 for any).
    pub async fn start(opts: HttpSourceOptions) -> anyhow::Result<HttpSource> {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], opts.port)))
            .context("binding the http source on 127.0.0.1")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            addr,
            separator: opts.batch_separator,
            store: Mutex::new(BTreeMap::new()),
            faults: Mutex::new(FaultState {
                latency: opts.latency,
                ..FaultState::default()
            }),
            stats: Mutex::new(Stats::default()),
            total: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            server: tokio::sync::Mutex::new(None),
        });
        let running = serve(listener, Arc::downgrade(&shared));
        *shared.server.lock().await = Some(running);
        Ok(HttpSource { shared })
    }

    /// The bound address (stable across [`HttpSource::set_down`]).
    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    /// Stop serving: the listener closes at once, idle connections are closed, requests in
    /// progress finish. Idempotent.
    pub async fn shutdown(&self) {
        if let Err(e) = self.set_down(true).await {
            tracing::warn!(error = %e, "http source shutdown");
        }
    }

    /// Take the source down (`true`: the port refuses connections when this returns) or bring
    /// it back up on the same port (`false`).
    pub async fn set_down(&self, down: bool) -> anyhow::Result<()> {
        let mut server = self.shared.server.lock().await;
        if down {
            if let Some(running) = server.take() {
                let _ = running.shutdown.send(());
                tokio::time::timeout(Duration::from_secs(10), running.listener_closed)
                    .await
                    .context("the http source listener did not close")?
                    .ok();
                drop(running.task);
            }
            return Ok(());
        }
        if server.is_some() {
            return Ok(());
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match bind(self.shared.addr) {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "re-binding the http source");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => bail!("cannot re-bind {}: {e}", self.shared.addr),
            }
        };
        *server = Some(serve(listener, Arc::downgrade(&self.shared)));
        Ok(())
    }

    /// Create or change an entity; returns its new version (1 for a new one, else previous + 1).
    pub fn put(&self, entity_type: &str, id: &str, data: Value) -> i64 {
        let mut store = lock(&self.shared.store);
        let key = (entity_type.to_owned(), id.to_owned());
        let version = store.get(&key).map_or(1, |r| r.version + 1);
        store.insert(
            key,
            Record {
                version,
                data,
                deleted: false,
                modified: SystemTime::now(),
            },
        );
        version
    }

    /// Set an entity to an exact version (for example an older one, to play a stale replica).
    pub fn set(&self, entity_type: &str, id: &str, version: i64, data: Value) {
        lock(&self.shared.store).insert(
            (entity_type.to_owned(), id.to_owned()),
            Record {
                version,
                data,
                deleted: false,
                modified: SystemTime::now(),
            },
        );
    }

    /// Delete an entity; the deletion bumps the version. Returns the new version, or `None`
    /// when the entity does not exist (or is already deleted).
    pub fn delete(&self, entity_type: &str, id: &str) -> Option<i64> {
        let mut store = lock(&self.shared.store);
        let record = store.get_mut(&(entity_type.to_owned(), id.to_owned()))?;
        if record.deleted {
            return None;
        }
        record.version += 1;
        record.deleted = true;
        record.modified = SystemTime::now();
        Some(record.version)
    }

    /// The current version and body of an entity, `None` when missing or deleted.
    pub fn get(&self, entity_type: &str, id: &str) -> Option<(i64, Value)> {
        let store = lock(&self.shared.store);
        let r = store.get(&(entity_type.to_owned(), id.to_owned()))?;
        (!r.deleted).then(|| (r.version, body_of(entity_type, id, r)))
    }

    /// The source's final state, for convergence checks: every entity ever created, with
    /// `None` for the deleted ones.
    pub fn snapshot(&self) -> BTreeMap<(String, String), Option<(i64, Value)>> {
        lock(&self.shared.store)
            .iter()
            .map(|((t, i), r)| {
                let state = (!r.deleted).then(|| (r.version, body_of(t, i, r)));
                ((t.clone(), i.clone()), state)
            })
            .collect()
    }

    /// How many requests asked about this entity (single fetches plus batch requests naming it).
    pub fn requests_for(&self, entity_type: &str, id: &str) -> u64 {
        lock(&self.shared.stats)
            .per_key
            .get(&(entity_type.to_owned(), id.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    /// All requests received, faulty ones included.
    pub fn total_requests(&self) -> u64 {
        self.shared.total.load(Ordering::SeqCst)
    }

    /// The most requests that were being answered at the same time.
    pub fn max_concurrent_requests(&self) -> usize {
        self.shared.max_in_flight.load(Ordering::SeqCst)
    }

    /// The last [`RECORD_LIMIT`] requests, oldest first.
    pub fn recorded(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.stats).log.iter().cloned().collect()
    }

    /// Forget recorded requests and counters (not the entities or faults).
    pub fn reset_counters(&self) {
        let mut stats = lock(&self.shared.stats);
        stats.per_key.clear();
        stats.log.clear();
        self.shared.total.store(0, Ordering::SeqCst);
        self.shared.max_in_flight.store(0, Ordering::SeqCst);
    }

    /// Wait this long before every answer.
    pub fn set_latency(&self, latency: Duration) {
        lock(&self.shared.faults).latency = latency;
    }

    /// Answer the next `n` requests with `fault` (queued after earlier `fail_next` calls).
    pub fn fail_next(&self, n: u64, fault: Fault) {
        if n > 0 {
            lock(&self.shared.faults).next.push_back((n, fault));
        }
    }

    /// Answer every request with `fault` until [`HttpSource::clear_faults`] (`None` clears it).
    pub fn set_fault(&self, fault: Option<Fault>) {
        lock(&self.shared.faults).standing = fault;
    }

    /// Answer every request for this entity with `fault` (for example `Fault::Status(500)` or
    /// `Fault::Status(400)`), batch requests naming it included.
    pub fn poison(&self, entity_type: &str, id: &str, fault: Fault) {
        lock(&self.shared.faults)
            .poisoned
            .insert((entity_type.to_owned(), id.to_owned()), fault);
    }

    /// Answer a random share of entity requests (single and batch) with faults, until called
    /// with `None` (or [`HttpSource::clear_faults`]).
    pub fn set_random_faults(&self, faults: Option<RandomFaults>) {
        lock(&self.shared.faults).random = faults.map(|f| {
            let rng = rand::rngs::StdRng::seed_from_u64(f.seed);
            (f, rng)
        });
    }

    /// Report a listing page's total in response header `name` instead of the body's `total`
    /// (`None`: in the body again). Panics on an invalid header name.
    pub fn set_total_header(&self, name: Option<&str>) {
        lock(&self.shared.faults).total_header = name.map(|n| {
            HeaderName::from_bytes(n.as_bytes()).unwrap_or_else(|_| panic!("header name {n:?}"))
        });
    }

    /// Remove queued, standing, random and poison faults (latency stays).
    pub fn clear_faults(&self) {
        let mut f = lock(&self.shared.faults);
        f.next.clear();
        f.standing = None;
        f.poisoned.clear();
        f.random = None;
    }

    /// Keep changing random entities `ids` x `types` at `rate_per_sec` (no deletes); see
    /// [`HttpSource::spawn_mutator_with`].
    pub fn spawn_mutator(&self, types: &[&str], ids: &[String], rate_per_sec: f64) -> Mutator {
        self.spawn_mutator_with(MutatorOptions {
            types: types.iter().map(|t| (*t).to_owned()).collect(),
            ids: ids.to_vec(),
            rate_per_sec,
            delete_ratio: 0.0,
            seed: 7,
        })
    }

    /// Start a background task that changes a random entity at a steady rate and reports each
    /// change, so a test can publish a notification for it. Stop it with [`Mutator::stop`].
    pub fn spawn_mutator_with(&self, opts: MutatorOptions) -> Mutator {
        let (tx, rx) = mpsc::unbounded_channel();
        let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
        let source = self.clone();
        let period = if opts.rate_per_sec > 0.0 {
            Duration::from_secs_f64(1.0 / opts.rate_per_sec)
        } else {
            Duration::from_secs(3600)
        };
        let task = tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
            let mut ticker = tokio::time::interval(period);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut made = 0u64;
            if opts.types.is_empty() || opts.ids.is_empty() {
                return made;
            }
            loop {
                tokio::select! {
                    _ = &mut stop_rx => return made,
                    _ = ticker.tick() => {}
                }
                let t = &opts.types[rng.random_range(0..opts.types.len())];
                let id = &opts.ids[rng.random_range(0..opts.ids.len())];
                let delete = opts.delete_ratio > 0.0 && rng.random_bool(opts.delete_ratio.min(1.0));
                let change = if delete {
                    source.delete(t, id).map(|v| (v, true))
                } else {
                    None
                };
                let (version, deleted) = match change {
                    Some(c) => c,
                    None => {
                        let data = json!({"n": made, "r": rng.random_range(0..1_000_000u32)});
                        (source.put(t, id, data), false)
                    }
                };
                made += 1;
                let m = Mutation {
                    entity_type: t.clone(),
                    id: id.clone(),
                    version,
                    deleted,
                };
                if tx.send(m).is_err() {
                    return made;
                }
            }
        });
        Mutator {
            rx,
            stop: Some(stop_tx),
            task,
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Ok(mut server) = self.server.try_lock()
            && let Some(running) = server.take()
        {
            let _ = running.shutdown.send(());
        }
    }
}

/// A running background mutator (see [`HttpSource::spawn_mutator`]).
#[derive(Debug)]
pub struct Mutator {
    rx: mpsc::UnboundedReceiver<Mutation>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<u64>,
}

impl Mutator {
    /// The next change (waits for it); `None` after the mutator stopped and all were read.
    pub async fn next(&mut self) -> Option<Mutation> {
        self.rx.recv().await
    }

    /// A change already made, if any, without waiting.
    pub fn try_next(&mut self) -> Option<Mutation> {
        self.rx.try_recv().ok()
    }

    /// Stop changing entities; returns the changes not yet read.
    pub async fn stop(mut self) -> Vec<Mutation> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
        let mut rest = Vec::new();
        while let Ok(m) = self.rx.try_recv() {
            rest.push(m);
        }
        rest
    }
}

impl Drop for Mutator {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn serve(listener: TcpListener, shared: std::sync::Weak<Shared>) -> Running {
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let (closed_tx, closed_rx) = oneshot::channel::<()>();
    let listener = NotifyingListener {
        inner: listener,
        _dropped: closed_tx,
    };
    let app = Router::new().fallback(handle).with_state(shared);
    let task = tokio::spawn(async move {
        let server = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = shutdown_rx.await;
        });
        if let Err(e) = server.await {
            tracing::warn!(error = %e, "http source server stopped");
        }
    });
    Running {
        shutdown: shutdown_tx,
        listener_closed: closed_rx,
        task,
    }
}

fn body_of(entity_type: &str, id: &str, r: &Record) -> Value {
    json!({"id": id, "type": entity_type, "version": r.version, "data": r.data})
}

fn decode(s: &str) -> Option<String> {
    percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

/// What a request asks for.
enum Route {
    Single {
        entity_type: String,
        id: String,
    },
    Batch {
        entity_type: String,
        ids: Vec<String>,
    },
    List {
        entity_type: String,
        /// Where the page starts.
        start: ListStart,
        limit: usize,
    },
    Unknown,
}

/// Where a listing page starts.
enum ListStart {
    Offset(usize),
    After(String),
}

fn list_route(entity_type: String, q: &str) -> Route {
    let mut offset = None;
    let mut limit = None;
    let mut page = None;
    let mut cursor = None;
    for pair in q.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let Some(v) = decode(v) else {
            return Route::Unknown;
        };
        match k {
            "offset" => offset = v.parse::<usize>().ok(),
            "limit" | "per_page" => limit = v.parse::<usize>().ok(),
            "page" => page = v.parse::<usize>().ok(),
            "cursor" => cursor = Some(v),
            _ => {}
        }
    }
    let limit = limit.unwrap_or(100).clamp(1, 10_000);
    let start = match (offset, page, cursor) {
        (Some(o), None, None) => ListStart::Offset(o),
        (None, Some(p), None) if p >= 1 => ListStart::Offset((p - 1) * limit),
        (None, None, Some(c)) if !c.is_empty() => ListStart::After(c),
        (None, None, _) => ListStart::Offset(0),
        _ => return Route::Unknown,
    };
    Route::List {
        entity_type,
        start,
        limit,
    }
}

fn route(target: &str, separator: char) -> Route {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let Some(rest) = path.strip_prefix('/') else {
        return Route::Unknown;
    };
    let segments: Vec<&str> = rest.split('/').collect();
    match (segments.as_slice(), query) {
        ([t, id], None) if !t.is_empty() => match (decode(t), decode(id)) {
            (Some(entity_type), Some(id)) if !id.is_empty() => Route::Single { entity_type, id },
            _ => Route::Unknown,
        },
        ([t], Some(q)) if !t.is_empty() => {
            let Some(entity_type) = decode(t) else {
                return Route::Unknown;
            };
            let Some(raw) = q.split('&').find_map(|pair| pair.strip_prefix("ids=")) else {
                return list_route(entity_type, q);
            };
            let mut ids = Vec::new();
            for part in raw.split(separator) {
                match decode(part) {
                    Some(id) if !id.is_empty() => ids.push(id),
                    _ => return Route::Unknown,
                }
            }
            Route::Batch { entity_type, ids }
        }
        _ => Route::Unknown,
    }
}

struct InFlight<'a>(&'a Shared);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

fn http_date(t: SystemTime) -> String {
    let ts = jiff::Timestamp::try_from(t).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
    jiff::fmt::rfc2822::DateTimePrinter::new()
        .timestamp_to_rfc9110_string(&ts)
        .unwrap_or_default()
}

fn parse_http_date(s: &str) -> Option<jiff::Timestamp> {
    jiff::fmt::rfc2822::DateTimeParser::new()
        .parse_timestamp(s.trim())
        .ok()
}

fn plain(status: StatusCode, content_type: &str, body: impl Into<Body>) -> Response {
    let mut r = Response::new(body.into());
    *r.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    plain(status, "application/json", body.to_string())
}

async fn handle(State(shared): State<std::sync::Weak<Shared>>, req: Request) -> Response {
    let Some(shared) = shared.upgrade() else {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "stopped");
    };
    let target = req
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str().to_owned())
        .unwrap_or_else(|| req.uri().to_string());
    let route = route(&target, shared.separator);
    let now = shared.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    shared.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let _guard = InFlight(&shared);
    shared.total.fetch_add(1, Ordering::SeqCst);
    {
        let mut stats = lock(&shared.stats);
        match &route {
            Route::Single { entity_type, id } => {
                *stats
                    .per_key
                    .entry((entity_type.clone(), id.clone()))
                    .or_default() += 1;
            }
            Route::Batch { entity_type, ids } => {
                for id in ids {
                    *stats
                        .per_key
                        .entry((entity_type.clone(), id.clone()))
                        .or_default() += 1;
                }
            }
            Route::List { .. } | Route::Unknown => {}
        }
        if stats.log.len() >= RECORD_LIMIT {
            stats.log.pop_front();
        }
        stats.log.push_back(RecordedRequest {
            method: req.method().to_string(),
            target: target.clone(),
            headers: req
                .headers()
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            at: Instant::now(),
        });
    }

    let (latency, fault, total_header) = {
        let mut f = lock(&shared.faults);
        let mut fault = None;
        let mut instant = false;
        if let Some((n, queued)) = f.next.front_mut() {
            fault = Some(queued.clone());
            *n -= 1;
            if *n == 0 {
                f.next.pop_front();
            }
        }
        if fault.is_none() {
            fault = match &route {
                Route::Single { entity_type, id } => {
                    f.poisoned.get(&(entity_type.clone(), id.clone())).cloned()
                }
                Route::Batch { entity_type, ids } => ids
                    .iter()
                    .find_map(|id| f.poisoned.get(&(entity_type.clone(), id.clone())).cloned()),
                Route::List { .. } | Route::Unknown => None,
            };
        }
        if fault.is_none()
            && matches!(route, Route::Single { .. } | Route::Batch { .. })
            && let Some((random, rng)) = f.random.as_mut()
        {
            let draw: f64 = rng.random();
            let mut at = 0.0;
            for (share, candidate) in &random.faults {
                at += share;
                if draw < at {
                    fault = Some(candidate.clone());
                    instant = random.instant;
                    break;
                }
            }
        }
        let latency = if instant { Duration::ZERO } else { f.latency };
        (
            latency,
            fault.or_else(|| f.standing.clone()),
            f.total_header.clone(),
        )
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }

    match fault {
        Some(Fault::Status(code)) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return json_response(status, &json!({"error": "injected"}));
        }
        Some(Fault::RetryAfter { status, value }) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::TOO_MANY_REQUESTS);
            let mut r = json_response(status, &json!({"error": "slow down"}));
            if let Ok(v) = HeaderValue::from_str(&value) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            return r;
        }
        Some(Fault::GatewayNotFound) => {
            return plain(
                StatusCode::NOT_FOUND,
                "text/html",
                "<html><body><h1>404 Not Found</h1>nginx</body></html>",
            );
        }
        Some(Fault::Html) => {
            return plain(
                StatusCode::OK,
                "text/html; charset=utf-8",
                "<!doctype html><html><body>Please log in</body></html>",
            );
        }
        Some(Fault::HugeBody(len)) => {
            let chunk = Bytes::from(vec![b' '; 64 * 1024]);
            let stream = futures::stream::unfold(0usize, move |sent| {
                let chunk = chunk.clone();
                async move {
                    if sent >= len {
                        return None;
                    }
                    let n = chunk.len().min(len - sent);
                    Some((Ok::<_, Infallible>(chunk.slice(..n)), sent + n))
                }
            });
            return plain(
                StatusCode::OK,
                "application/json",
                Body::from_stream(stream),
            );
        }
        Some(Fault::Redirect(base)) => {
            let mut r = plain(StatusCode::FOUND, "text/plain", "moved");
            if let Ok(v) = HeaderValue::from_str(&format!("{base}{target}")) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            return r;
        }
        _ => {}
    }

    let (status, headers, body) = normal_answer(&shared, &route, req.headers(), total_header);
    let mut response = match fault {
        Some(Fault::DropMidBody) => {
            let half = body.slice(..body.len() / 2);
            // The pause lets hyper flush the head and the first half before the error aborts
            // the connection (otherwise nothing at all would be written).
            let stream = futures::stream::unfold(Some(half), |state| async move {
                match state {
                    Some(half) => Some((Ok(half), None)),
                    None => {
                        tokio::time::sleep(Duration::from_millis(30)).await;
                        let e = io::Error::new(io::ErrorKind::ConnectionReset, "dropped mid-body");
                        Some((Err(e), None))
                    }
                }
            });
            let mut r = plain(status, "application/json", Body::from_stream(stream));
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
            r
        }
        Some(Fault::Trickle(every)) => {
            let stream = futures::stream::unfold(0usize, move |at| {
                let body = body.clone();
                async move {
                    if at >= body.len() {
                        return None;
                    }
                    tokio::time::sleep(every).await;
                    Some((Ok::<_, Infallible>(body.slice(at..at + 1)), at + 1))
                }
            });
            plain(status, "application/json", Body::from_stream(stream))
        }
        _ => plain(status, "application/json", body),
    };
    for (name, value) in headers {
        response.headers_mut().insert(name, value);
    }
    response
}

fn normal_answer(
    shared: &Shared,
    route: &Route,
    request_headers: &HeaderMap,
    total_header: Option<HeaderName>,
) -> (StatusCode, Vec<(HeaderName, HeaderValue)>, Bytes) {
    let not_found = || {
        (
            StatusCode::NOT_FOUND,
            Vec::new(),
            Bytes::from(json!({"error": "not_found"}).to_string()),
        )
    };
    match route {
        Route::Unknown => (
            StatusCode::NOT_FOUND,
            vec![(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"))],
            Bytes::from_static(b"no route"),
        ),
        Route::Single { entity_type, id } => {
            let store = lock(&shared.store);
            let Some(record) = store
                .get(&(entity_type.clone(), id.clone()))
                .filter(|r| !r.deleted)
            else {
                return not_found();
            };
            let etag = format!("\"v{}\"", record.version);
            let last_modified = http_date(record.modified);
            let mut headers = vec![(header::ETAG, HeaderValue::from_str(&etag))];
            headers.push((header::LAST_MODIFIED, HeaderValue::from_str(&last_modified)));
            headers.push((
                HeaderName::from_static("x-version"),
                HeaderValue::from_str(&record.version.to_string()),
            ));
            let headers: Vec<_> = headers
                .into_iter()
                .filter_map(|(k, v)| v.ok().map(|v| (k, v)))
                .collect();
            let if_none_match = request_headers
                .get(header::IF_NONE_MATCH)
                .and_then(|v| v.to_str().ok());
            let unchanged = match if_none_match {
                Some(inm) => inm
                    .split(',')
                    .map(str::trim)
                    .any(|tag| tag == "*" || tag.strip_prefix("W/").unwrap_or(tag) == etag),
                None => request_headers
                    .get(header::IF_MODIFIED_SINCE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_http_date)
                    .and_then(|since| {
                        let modified = parse_http_date(&last_modified)?;
                        Some(modified <= since)
                    })
                    .unwrap_or(false),
            };
            if unchanged {
                return (StatusCode::NOT_MODIFIED, headers, Bytes::new());
            }
            let body = body_of(entity_type, id, record).to_string();
            (StatusCode::OK, headers, Bytes::from(body))
        }
        Route::List {
            entity_type,
            start,
            limit,
        } => list_answer(shared, entity_type, start, *limit, total_header),
        Route::Batch { entity_type, ids } => {
            let store = lock(&shared.store);
            let items: Vec<Value> = ids
                .iter()
                .filter_map(|id| {
                    store
                        .get(&(entity_type.clone(), id.clone()))
                        .filter(|r| !r.deleted)
                        .map(|r| body_of(entity_type, id, r))
                })
                .collect();
            (
                StatusCode::OK,
                Vec::new(),
                Bytes::from(json!({"items": items}).to_string()),
            )
        }
    }
}

fn list_answer(
    shared: &Shared,
    entity_type: &str,
    start: &ListStart,
    limit: usize,
    total_header: Option<HeaderName>,
) -> (StatusCode, Vec<(HeaderName, HeaderValue)>, Bytes) {
    let store = lock(&shared.store);
    let existing = store
        .range((entity_type.to_owned(), String::new())..)
        .take_while(|((t, _), _)| t == entity_type)
        .filter(|(_, r)| !r.deleted);
    let total = existing.clone().count();
    let rest: Vec<_> = match start {
        ListStart::Offset(o) => existing.skip(*o).collect(),
        ListStart::After(c) => existing.filter(|((_, id), _)| id > c).collect(),
    };
    let more = rest.len() > limit;
    let page: Vec<_> = rest.into_iter().take(limit).collect();
    let items: Vec<Value> = page
        .iter()
        .map(|((_, id), r)| body_of(entity_type, id, r))
        .collect();
    let next = if more {
        page.last().map(|((_, id), _)| id.clone())
    } else {
        None
    };
    let mut headers = Vec::new();
    if let Some(c) = &next {
        let encode = |s: &str| {
            percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
        };
        let link = format!(
            "<http://{}/{}?cursor={}&limit={limit}>; rel=\"next\"",
            shared.addr,
            encode(entity_type),
            encode(c)
        );
        if let Ok(v) = HeaderValue::from_str(&link) {
            headers.push((header::LINK, v));
        }
    }
    let body = match total_header {
        Some(name) => {
            headers.push((name, HeaderValue::from(total)));
            json!({"items": items, "next_cursor": next})
        }
        None => json!({"items": items, "total": total, "next_cursor": next}),
    };
    (StatusCode::OK, headers, Bytes::from(body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn raw_get(addr: SocketAddr, target: &str, extra: &str) -> anyhow::Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = TcpStream::connect(addr).await?;
        let req = format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    #[tokio::test]
    async fn serves_versions_etags_and_not_found() -> anyhow::Result<()> {
        let src = HttpSource::start(HttpSourceOptions::default()).await?;
        assert_eq!(src.put("customer", "a/b", json!({"x": 1})), 1);
        assert_eq!(src.put("customer", "a/b", json!({"x": 2})), 2);
        let r = raw_get(src.addr(), "/customer/a%2Fb", "").await?;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.contains("etag: \"v2\""), "{r}");
        assert!(r.contains("x-version: 2"), "{r}");
        assert!(r.contains(r#""data":{"x":2}"#), "{r}");
        let r = raw_get(src.addr(), "/customer/a%2Fb", "If-None-Match: \"v2\"\r\n").await?;
        assert!(r.starts_with("HTTP/1.1 304"), "{r}");
        assert_eq!(src.delete("customer", "a/b"), Some(3));
        let r = raw_get(src.addr(), "/customer/a%2Fb", "").await?;
        assert!(r.starts_with("HTTP/1.1 404") && r.contains(r#"{"error":"not_found"}"#));
        let r = raw_get(src.addr(), "/customer/a/b", "").await?;
        assert!(
            r.starts_with("HTTP/1.1 404") && r.contains("no route"),
            "{r}"
        );
        assert_eq!(src.requests_for("customer", "a/b"), 3);
        assert_eq!(src.total_requests(), 4);
        assert_eq!(src.recorded()[3].target, "/customer/a/b");
        assert_eq!(
            src.snapshot().get(&("customer".into(), "a/b".into())),
            Some(&None)
        );
        Ok(())
    }

    #[tokio::test]
    async fn batch_route_splits_before_decoding() -> anyhow::Result<()> {
        let src = HttpSource::start(HttpSourceOptions::default()).await?;
        src.put("c", "1", json!(1));
        src.put("c", "x,y", json!(2));
        let r = raw_get(src.addr(), "/c?ids=1,x%2Cy,missing", "").await?;
        let body = r.split("\r\n\r\n").nth(1).unwrap_or_default();
        let v: Value = serde_json::from_str(body)?;
        let ids: Vec<&str> = v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["id"].as_str())
            .collect();
        assert_eq!(ids, ["1", "x,y"]);
        assert_eq!(src.requests_for("c", "missing"), 1);
        Ok(())
    }

    #[tokio::test]
    async fn faults_apply_in_order_and_poison_sticks() -> anyhow::Result<()> {
        let src = HttpSource::start(HttpSourceOptions::default()).await?;
        src.put("c", "1", json!(1));
        src.put("c", "2", json!(2));
        src.fail_next(1, Fault::Status(503));
        src.poison("c", "2", Fault::Status(400));
        assert!(
            raw_get(src.addr(), "/c/1", "")
                .await?
                .starts_with("HTTP/1.1 503")
        );
        assert!(
            raw_get(src.addr(), "/c/1", "")
                .await?
                .starts_with("HTTP/1.1 200")
        );
        assert!(
            raw_get(src.addr(), "/c/2", "")
                .await?
                .starts_with("HTTP/1.1 400")
        );
        assert!(
            raw_get(src.addr(), "/c?ids=1,2", "")
                .await?
                .starts_with("HTTP/1.1 400")
        );
        src.set_fault(Some(Fault::RetryAfter {
            status: 429,
            value: "3".into(),
        }));
        let r = raw_get(src.addr(), "/c/1", "").await?;
        assert!(
            r.starts_with("HTTP/1.1 429") && r.contains("retry-after: 3"),
            "{r}"
        );
        src.clear_faults();
        assert!(
            raw_get(src.addr(), "/c/2", "")
                .await?
                .starts_with("HTTP/1.1 200")
        );
        Ok(())
    }

    #[tokio::test]
    async fn down_refuses_connections_and_comes_back_on_the_same_port() -> anyhow::Result<()> {
        let src = HttpSource::start(HttpSourceOptions::default()).await?;
        src.put("c", "1", json!(1));
        src.set_down(true).await?;
        assert!(TcpStream::connect(src.addr()).await.is_err());
        src.set_down(false).await?;
        assert!(
            raw_get(src.addr(), "/c/1", "")
                .await?
                .starts_with("HTTP/1.1 200")
        );
        src.shutdown().await;
        assert!(TcpStream::connect(src.addr()).await.is_err());
        Ok(())
    }

    #[tokio::test]
    async fn mutator_reports_every_change_it_makes() -> anyhow::Result<()> {
        let src = HttpSource::start(HttpSourceOptions::default()).await?;
        let ids: Vec<String> = (0..3).map(|i| i.to_string()).collect();
        let mut m = src.spawn_mutator_with(MutatorOptions {
            types: vec!["c".into()],
            ids,
            rate_per_sec: 500.0,
            delete_ratio: 0.3,
            seed: 1,
        });
        let mut seen = Vec::new();
        while seen.len() < 40 {
            match tokio::time::timeout(Duration::from_secs(5), m.next()).await? {
                Some(change) => seen.push(change),
                None => bail!("mutator ended early"),
            }
        }
        seen.extend(m.stop().await);
        let mut last: BTreeMap<String, &Mutation> = BTreeMap::new();
        for change in &seen {
            last.insert(change.id.clone(), change);
        }
        for (id, change) in last {
            let held = src.get("c", &id);
            if change.deleted {
                assert_eq!(held, None);
            } else {
                assert_eq!(held.map(|(v, _)| v), Some(change.version));
            }
        }
        Ok(())
    }

    #[tokio::test]
    async fn random_faults_hit_their_share_and_skip_the_latency() -> anyhow::Result<()> {
        let src = HttpSource::start(HttpSourceOptions {
            latency: Duration::from_millis(40),
            ..HttpSourceOptions::default()
        })
        .await?;
        src.put("c", "1", json!(1));
        src.set_random_faults(Some(RandomFaults {
            faults: vec![(0.5, Fault::Status(503))],
            instant: true,
            seed: 3,
        }));
        let (mut failed, mut fast_failures) = (0, 0);
        for _ in 0..40 {
            let started = Instant::now();
            let r = raw_get(src.addr(), "/c/1", "").await?;
            if r.starts_with("HTTP/1.1 503") {
                failed += 1;
                fast_failures += usize::from(started.elapsed() < Duration::from_millis(40));
            } else {
                assert!(r.starts_with("HTTP/1.1 200"), "{r}");
                assert!(started.elapsed() >= Duration::from_millis(40));
            }
        }
        assert!((8..=32).contains(&failed), "{failed} of 40");
        assert_eq!(fast_failures, failed, "drawn faults come back at once");
        // Listings are not entity requests; their total can move to a header.
        src.set_total_header(Some("X-Total-Count"));
        let r = raw_get(src.addr(), "/c?offset=0&limit=10", "").await?;
        assert!(r.contains("x-total-count: 1"), "{r}");
        assert!(!r.contains("\"total\""), "{r}");
        src.clear_faults();
        let r = raw_get(src.addr(), "/c/1", "").await?;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        Ok(())
    }

    #[tokio::test]
    async fn drop_mid_body_truncates() -> anyhow::Result<()> {
        let src = HttpSource::start(HttpSourceOptions::default()).await?;
        src.put("c", "1", json!({"long": "x".repeat(1000)}));
        src.fail_next(1, Fault::DropMidBody);
        let r = raw_get(src.addr(), "/c/1", "").await?;
        let body = r.split("\r\n\r\n").nth(1).unwrap_or_default();
        assert!(r.starts_with("HTTP/1.1 200"));
        assert!(serde_json::from_str::<Value>(body).is_err(), "{body}");
        Ok(())
    }
}
