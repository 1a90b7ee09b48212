//! The operations endpoint: metrics, health, readiness, a JSON status and a status page.
//!
//! | path | answer |
//! |---|---|
//! | `/metrics` | Prometheus text: every `refetch_*` series of the engine, fetcher, sink and binary, each with `# HELP`, registered at start-up with its zero value; latencies are histograms; per-partition log-end offset and lag to the end |
//! | `/healthz` | `200 ok` while the pipeline task answers, `503` once it stopped |
//! | `/readyz` | `200 ready` only when the pipeline is ready (joined its group, gone guard not tripped, dead-letter topic writable, not shutting down, ...); otherwise `503` and one reason per line |
//! | `/status.json` | the engine's status (counters, partitions, pending keys, latency), rates, lag per partition, the sink's batches, fetch latency, breaker states, and the degraded state with its reasons |
//! | `/` | a status page for people, refreshed every 2 s |
//! | `POST /gone-guard/reset` | an operator's decision that the deletes are real: the gone guard lets them through again |
//!
//! It binds to `127.0.0.1:9464` unless configured otherwise: the page shows entity types and
//! topic names, and nothing here needs to be reachable from other hosts unless a scraper is.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use refetch::metrics::{Kind, SIZE_BUCKETS};
use refetch::{PipelineHandle, Status};

use crate::observe::{
    self, FetchSnapshot, FetchStats, Observed, Observer, ObserverTask, PartitionLag, Rates,
    SinkSnapshot, SinkStats,
};

/// The recorder: every histogram of every crate with its own buckets (never a summary, which
/// cannot be aggregated across instances), and any other histogram with size-like buckets.
fn builder() -> PrometheusBuilder {
    let mut b = PrometheusBuilder::new();
    for s in observe::catalogue() {
        if s.kind == Kind::Histogram && !s.buckets.is_empty() {
            b = match b.set_buckets_for_metric(Matcher::Full(s.name.to_owned()), s.buckets) {
                Ok(b) => b,
                Err(_) => unreachable!("catalogue buckets are never empty"),
            };
        }
    }
    match b.set_buckets(SIZE_BUCKETS) {
        Ok(b) => b,
        Err(_) => unreachable!("SIZE_BUCKETS is not empty"),
    }
}

/// Install the Prometheus recorder as the global `metrics` recorder (once per process; later
/// calls return the same handle). `None` when another recorder was installed first.
pub fn install_recorder() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| match builder().install_recorder() {
            Ok(h) => {
                let upkeep = h.clone();
                // Histograms need periodic upkeep; a plain thread works with or without tokio.
                let _ = std::thread::Builder::new()
                    .name("metrics-upkeep".into())
                    .spawn(move || {
                        loop {
                            std::thread::sleep(Duration::from_secs(5));
                            upkeep.run_upkeep();
                        }
                    });
                Some(h)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot install the Prometheus recorder; /metrics is empty");
                None
            }
        })
        .clone()
}

/// What the endpoint serves from.
#[derive(Clone)]
pub struct OpsState {
    /// The running pipeline.
    pub handle: PipelineHandle,
    /// The Prometheus recorder's handle, if installed.
    pub prometheus: Option<PrometheusHandle>,
    /// Fetch latency and breakers.
    pub fetch: Arc<FetchStats>,
    /// A title for the page (the consumer group).
    pub title: String,
    /// When the process started.
    pub started: Instant,
    /// The pipeline's Kafka connection, sources and sink, for start-up registration of every
    /// series and the lag per partition ([`Observed::from_config`]).
    pub observed: Observed,
}

/// The state of the routes: what the caller gave and what [`serve`] started.
#[derive(Clone)]
struct Shared {
    ops: OpsState,
    observer: Arc<Observer>,
    sink: Arc<SinkStats>,
}

/// A served endpoint.
#[derive(Debug)]
pub struct OpsServer {
    /// The bound address (useful with port 0).
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    _observer: ObserverTask,
}

impl Drop for OpsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Register every series, start the observer (status, rates, watermarks) and serve the
/// endpoint on `listen` until the returned server is dropped.
pub async fn serve(listen: SocketAddr, state: OpsState) -> std::io::Result<OpsServer> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    observe::register(&state.observed);
    let observer = Arc::new(Observer::default());
    let observer_task = observer.start(state.handle.clone(), state.observed.kafka.as_ref());
    let app = routes(Shared {
        ops: state,
        observer,
        sink: SinkStats::global(),
    });
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "operations endpoint failed");
        }
    });
    Ok(OpsServer {
        addr,
        task,
        _observer: observer_task,
    })
}

/// The endpoint's routes, for a caller that serves them itself (no lag per partition: the
/// observer runs only under [`serve`]).
pub fn router(state: OpsState) -> Router {
    routes(Shared {
        ops: state,
        observer: Arc::new(Observer::default()),
        sink: SinkStats::global(),
    })
}

fn routes(shared: Shared) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/status.json", get(status_json))
        .route("/gone-guard/reset", axum::routing::post(reset_gone_guard))
        .with_state(shared)
}

async fn metrics(State(s): State<Shared>) -> Response {
    let mut body = s
        .ops
        .prometheus
        .as_ref()
        .map(|h| h.render())
        .unwrap_or_default();
    if s.ops.prometheus.is_some() {
        if !body.is_empty() && !body.ends_with("\n\n") {
            body.push('\n');
        }
        body.push_str(&s.observer.render_partitions());
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn healthz(State(s): State<Shared>) -> Response {
    match s.ops.handle.status().await {
        Some(_) => (StatusCode::OK, "ok\n").into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "pipeline stopped\n").into_response(),
    }
}

async fn readyz(State(s): State<Shared>) -> Response {
    match s.ops.handle.status().await {
        Some(st) if st.ready() => (StatusCode::OK, "ready\n").into_response(),
        Some(st) => {
            let mut body = String::from("not ready:\n");
            for r in &st.not_ready {
                let _ = writeln!(body, "- {r}");
            }
            (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
        }
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready:\n- pipeline stopped\n",
        )
            .into_response(),
    }
}

/// The query of `POST /gone-guard/reset`: `?source=<name>` resets one source's guard, no
/// query resets every source's.
#[derive(Debug, serde::Deserialize)]
struct ResetQuery {
    source: Option<String>,
}

async fn reset_gone_guard(State(s): State<Shared>, Query(q): Query<ResetQuery>) -> Response {
    if s.ops.handle.status().await.is_none() {
        return (StatusCode::SERVICE_UNAVAILABLE, "pipeline stopped\n").into_response();
    }
    match q.source.filter(|v| !v.is_empty()) {
        Some(source) => {
            tracing::warn!(source = %source, "gone guard of one source reset through the operations endpoint");
            s.ops.handle.reset_gone_guard_of(source.clone());
            (
                StatusCode::OK,
                format!("gone guard of {source} reset: its held deletes are released\n"),
            )
                .into_response()
        }
        None => {
            tracing::warn!("gone guard reset through the operations endpoint");
            s.ops.handle.reset_gone_guard();
            (
                StatusCode::OK,
                "gone guard reset: every held delete is released\n",
            )
                .into_response()
        }
    }
}

/// The document `/status.json` serves.
#[derive(Debug, serde::Serialize)]
pub struct StatusDocument {
    /// Ready for traffic.
    pub ready: bool,
    /// Not ready, or a source's breaker is open.
    pub degraded: bool,
    /// Why it is degraded: every reason the pipeline gives for not being ready, then every
    /// source whose circuit breaker is open.
    pub degraded_reasons: Vec<String>,
    /// Seconds since start.
    pub uptime_seconds: u64,
    /// Notifications per fetch.
    pub coalescing_ratio: Option<f64>,
    /// Notifications, fetches and writes per second over the last seconds.
    pub rates: Rates,
    /// Log-end offset and lag to the end per owned partition.
    pub lag: Vec<PartitionLag>,
    /// Whether the last watermark round reached the brokers (`null` before the first).
    pub broker_reachable: Option<bool>,
    /// The sink's batches, latency and errors.
    pub sink: SinkSnapshot,
    /// The pipeline's status.
    pub status: Status,
    /// Fetch latency and breakers.
    pub fetch: FetchSnapshot,
}

/// Everything the page and `/status.json` show, taken at one moment.
#[derive(Debug)]
pub struct View {
    /// The page title (the consumer group).
    pub title: String,
    /// The pipeline's status.
    pub status: Status,
    /// Fetch latency and breakers.
    pub fetch: FetchSnapshot,
    /// The sink's figures.
    pub sink: SinkSnapshot,
    /// Rates.
    pub rates: Rates,
    /// Lag per partition.
    pub lag: Vec<PartitionLag>,
    /// The brokers answered the last watermark round.
    pub broker_reachable: Option<bool>,
    /// Time since start.
    pub uptime: Duration,
}

impl View {
    /// Why the pipeline is degraded (empty: healthy): every not-ready reason, then every open
    /// circuit breaker.
    pub fn degraded_reasons(&self) -> Vec<String> {
        let mut out = self.status.not_ready.clone();
        for (source, open) in &self.fetch.breakers_open {
            if *open {
                out.push(format!(
                    "circuit breaker open for source `{source}`: its fetches are not attempted"
                ));
            }
        }
        out
    }
}

async fn view(s: &Shared) -> Option<View> {
    let status = s.ops.handle.status().await?;
    Some(View {
        title: s.ops.title.clone(),
        fetch: s.ops.fetch.snapshot(),
        sink: s.sink.snapshot(),
        rates: s.observer.rates(),
        lag: s.observer.partitions(),
        broker_reachable: s.observer.broker_reachable(),
        uptime: s.ops.started.elapsed(),
        status,
    })
}

async fn status_json(State(s): State<Shared>) -> Response {
    match view(&s).await {
        Some(v) => {
            let reasons = v.degraded_reasons();
            let doc = StatusDocument {
                ready: v.status.ready(),
                degraded: !reasons.is_empty(),
                degraded_reasons: reasons,
                uptime_seconds: v.uptime.as_secs(),
                coalescing_ratio: coalescing_ratio(&v.status),
                rates: v.rates,
                lag: v.lag,
                broker_reachable: v.broker_reachable,
                sink: v.sink,
                fetch: v.fetch,
                status: v.status,
            };
            axum::Json(doc).into_response()
        }
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({"error": "pipeline stopped"})),
        )
            .into_response(),
    }
}

/// Notifications per fetch (how much coalescing saves the source).
pub fn coalescing_ratio(status: &Status) -> Option<f64> {
    let c = &status.engine.counters;
    (c.fetches > 0).then(|| c.notifications as f64 / c.fetches as f64)
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn ms(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 1000.0 => format!("{:.2} s", v / 1000.0),
        Some(v) => format!("{v:.1} ms"),
        None => "–".to_owned(),
    }
}

fn opt(v: Option<i64>) -> String {
    v.map_or_else(|| "–".to_owned(), |v| v.to_string())
}

fn rate(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}/s")
    } else {
        format!("{v:.1}/s")
    }
}

async fn page(State(s): State<Shared>) -> Response {
    let Some(v) = view(&s).await else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Html(
                "<!doctype html><meta http-equiv=\"refresh\" content=\"2\"><title>refetch</title>\
                 <p>The pipeline has stopped.</p>"
                    .to_owned(),
            ),
        )
            .into_response();
    };
    Html(render_page(&v)).into_response()
}

/// The status page as HTML (refreshes itself every 2 seconds).
pub fn render_page(v: &View) -> String {
    let st = &v.status;
    let e = &st.engine;
    let c = &e.counters;
    let fetch = &v.fetch;
    let mut h = String::with_capacity(16 * 1024);
    let reasons = v.degraded_reasons();
    let ready = if st.ready() {
        "<span class=ok id=ready>ready</span>"
    } else {
        "<span class=bad id=ready>not ready</span>"
    };
    let _ = write!(
        h,
        "<!doctype html><html lang=en><head><meta charset=utf-8>\
         <meta http-equiv=\"refresh\" content=\"2\">\
         <title>refetch · {title}</title><style>\
         body{{font:14px system-ui,sans-serif;margin:1.5em;color:#222}}\
         h1{{font-size:1.3em}} h2{{font-size:1.1em;margin-top:1.5em}}\
         table{{border-collapse:collapse;margin:.5em 0 1em}}\
         td,th{{padding:.25em .8em;border-bottom:1px solid #ddd;text-align:right}}\
         th:first-child,td:first-child{{text-align:left}}\
         .ok{{color:#176f2c;font-weight:bold}} .bad{{color:#b3261e;font-weight:bold}}\
         .state{{border-radius:8px;padding:.8em 1.2em;margin:1em 0;font-size:1.1em}}\
         .state.healthy{{background:#e6f4ea;border:2px solid #176f2c}}\
         .state.degraded{{background:#fce8e6;border:3px solid #b3261e}}\
         .state strong{{font-size:1.5em;display:block}} .state ul{{margin:.4em 0 0;padding-left:1.2em}}\
         .grid{{display:flex;flex-wrap:wrap;gap:1em}} .card{{border:1px solid #ddd;border-radius:6px;padding:.6em 1em;min-width:10em}}\
         .card b{{display:block;font-size:1.4em}}</style></head><body>\
         <h1>refetch · {title}</h1><p>{ready} · up {up} · refreshes every 2 s</p>",
        title = esc(&v.title),
        up = humantime::format_duration(Duration::from_secs(v.uptime.as_secs())),
    );
    if reasons.is_empty() {
        h.push_str(
            "<div class=\"state healthy\" id=state><strong class=ok>Healthy</strong>\
             Ready, every source's breaker closed.</div>",
        );
    } else {
        let _ = write!(
            h,
            "<div class=\"state degraded\" id=state role=alert><strong class=bad>Degraded</strong>\
             <ul id=reasons>{}</ul></div>",
            reasons
                .iter()
                .map(|r| format!("<li>{}</li>", esc(r)))
                .collect::<String>()
        );
    }
    let ratio = if c.fetches > 0 {
        format!("{:.2}", c.notifications as f64 / c.fetches as f64)
    } else {
        "–".to_owned()
    };
    let oldest = e
        .oldest_pending_ms
        .map_or_else(|| "–".to_owned(), |v| ms(Some(v as f64)));
    let total_lag: Option<i64> = v
        .lag
        .iter()
        .map(|p| p.lag)
        .try_fold(0i64, |acc, l| l.map(|l| acc + l));
    let total_lag = if v.lag.is_empty() { None } else { total_lag };
    let cards: [(&str, &str, String); 16] = [
        (
            "notifications",
            "Notifications",
            c.notifications.to_string(),
        ),
        ("fetches", "Fetches", c.fetches.to_string()),
        ("ratio", "Coalescing ratio (notifications / fetches)", ratio),
        ("writes", "Durable writes", c.writes.to_string()),
        (
            "notifications-rate",
            "Notifications per second",
            rate(v.rates.notifications),
        ),
        ("fetches-rate", "Fetches per second", rate(v.rates.fetches)),
        ("writes-rate", "Writes per second", rate(v.rates.writes)),
        ("lag", "Lag to the end (records)", opt(total_lag)),
        ("pending", "Pending keys", e.pending_keys.to_string()),
        ("oldest", "Oldest pending", oldest),
        ("fetch-p50", "Fetch latency p50", ms(fetch.p50_ms)),
        ("fetch-p99", "Fetch latency p99", ms(fetch.p99_ms)),
        (
            "e2e-p50",
            "Notification → durable p50",
            ms(e.latency_p50_ms),
        ),
        (
            "e2e-p99",
            "Notification → durable p99",
            ms(e.latency_p99_ms),
        ),
        (
            "dead-letters",
            "Dead letters (issued / acknowledged)",
            format!("{} / {}", c.dead_letters, c.dead_letters_acked),
        ),
        (
            "errors",
            "Fetch errors (transient / permanent)",
            format!("{} / {}", c.fetch_transient, c.fetch_permanent),
        ),
    ];
    h.push_str("<div class=grid>");
    for (id, label, value) in cards {
        let _ = write!(
            h,
            "<div class=card>{label}<b id=\"{id}\">{}</b></div>",
            esc(&value)
        );
    }
    h.push_str("</div>");

    h.push_str(
        "<h2>Partitions</h2><table id=partitions><tr><th>topic / partition</th>\
        <th>consumed</th><th>committed</th><th>behind commit</th><th>log end</th>\
        <th>lag to end</th><th>held offsets</th><th>paused</th></tr>",
    );
    for p in &e.partitions {
        let consumed = p.last_received.map(|o| o + 1);
        let behind = match (consumed, p.committed) {
            (Some(a), Some(b)) => (a - b).max(0).to_string(),
            (Some(a), None) => a.to_string(),
            _ => "–".to_owned(),
        };
        let lag = v
            .lag
            .iter()
            .find(|l| l.topic == p.topic && l.partition == p.partition);
        let _ = write!(
            h,
            "<tr><td>{}/{}</td><td>{}</td><td>{}</td><td>{behind}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{}</td></tr>",
            esc(&p.topic),
            p.partition,
            opt(consumed),
            opt(p.committed),
            opt(lag.and_then(|l| l.end)),
            opt(lag.and_then(|l| l.lag)),
            p.outstanding,
            if p.paused { "paused" } else { "" }
        );
    }
    if e.partitions.is_empty() {
        h.push_str("<tr><td colspan=8>no partitions assigned</td></tr>");
    }
    h.push_str("</table>");
    let broker = match v.broker_reachable {
        Some(true) => "<span class=ok>reachable</span>",
        Some(false) => "<span class=bad>unreachable</span>",
        None => "–",
    };
    let _ = write!(
        h,
        "<p>Brokers (last log-end query): <span id=broker>{broker}</span></p>"
    );

    h.push_str(
        "<h2>Sources</h2><table id=breakers><tr><th>entity type</th><th>circuit breaker</th></tr>",
    );
    for (t, open) in &fetch.breakers_open {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td></tr>",
            esc(t),
            if *open {
                "<span class=bad>open</span>"
            } else {
                "<span class=ok>closed</span>"
            }
        );
    }
    h.push_str("</table>");

    let sink = &v.sink;
    let per_batch = if sink.batches > 0 {
        format!("{:.1}", sink.records as f64 / sink.batches as f64)
    } else {
        "–".to_owned()
    };
    let _ = write!(
        h,
        "<h2>Sink{kind}</h2><table id=sink>\
         <tr><td>batches written</td><td id=sink-batches>{}</td></tr>\
         <tr><td>records per batch</td><td>{per_batch}</td></tr>\
         <tr><td>batch latency p50 / p99</td><td>{} / {}</td></tr>\
         <tr><td>durable writes / failed records</td><td>{} / {}</td></tr>\
         <tr><td>failed batches / rejected records</td><td id=sink-errors>{} / {}</td></tr>\
         <tr><td>last error</td><td>{}</td></tr>\
         </table>",
        sink.batches,
        ms(sink.p50_ms),
        ms(sink.p99_ms),
        c.writes,
        c.write_failures,
        sink.failed_batches,
        sink.rejected_records,
        sink.last_error
            .as_deref()
            .map_or_else(|| "–".to_owned(), esc),
        kind = if sink.kind.is_empty() {
            String::new()
        } else {
            format!(" ({})", esc(&sink.kind))
        },
    );

    let _ = write!(
        h,
        "<h2>Details</h2><table id=details>\
         <tr><td>records consumed</td><td>{}</td></tr>\
         <tr><td>coalesced into a pending key</td><td>{}</td></tr>\
         <tr><td>satisfied by a held version</td><td>{}</td></tr>\
         <tr><td>found / gone / unchanged</td><td>{} / {} / {}</td></tr>\
         <tr><td>stale reads</td><td>{}</td></tr>\
         <tr><td>decode errors / ignored</td><td>{} / {}</td></tr>\
         <tr><td>fetches in flight</td><td>{}</td></tr>\
         <tr><td>gone guard</td><td>{} ({:.0}% gone)</td></tr>\
         <tr><td>dead-letter topic</td><td>{}</td></tr>\
         <tr><td>commits / failed</td><td>{} / {}</td></tr>\
         </table><p><a href=\"/status.json\">status.json</a> · <a href=\"/metrics\">metrics</a></p></body></html>",
        c.records,
        c.coalesced,
        c.satisfied_by_version,
        c.found,
        c.gone,
        c.unchanged,
        c.stale_reads,
        c.decode_errors,
        c.ignored,
        e.fetches_in_flight,
        if e.gone_guard_tripped {
            "<span class=bad>tripped: deletes held</span>"
        } else {
            "ok"
        },
        e.gone_ratio * 100.0,
        if e.dead_letter_broken {
            "<span class=bad>refuses writes</span>"
        } else {
            "ok"
        },
        c.commits,
        c.commit_failures,
    );
    h
}

#[cfg(test)]
mod tests;
