//! The demo's REST source: a small CRM whose customers change in bursts.
//!
//! An axum server on `127.0.0.1` (an ephemeral port) serving `GET /customers/{id}` as JSON with
//! the customer's version, `404 {"error":"not_found"}` for customers that do not exist (yet), and
//! `GET /health`. [`DemoSource::save`] plays one user "save" in the CRM: it changes several
//! fields of one customer at once (phone, address, email, ...), bumps the version, and returns
//! the field events a CRM would announce for it, one notification each, which is what makes
//! coalescing worthwhile: one fetch answers them all.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use rand::Rng;
use serde_json::{Value, json};

/// The fields one save can change, in the order a save's events announce them.
pub const FIELDS: [&str; 8] = [
    "phone",
    "address",
    "email",
    "name",
    "segment",
    "language",
    "newsletter",
    "owner",
];

/// One customer at the source.
#[derive(Debug, Clone, PartialEq)]
pub struct Customer {
    /// Incremented by every save.
    pub version: i64,
    /// Field values.
    pub fields: BTreeMap<&'static str, String>,
}

impl Customer {
    /// The JSON the source serves for customer `id`.
    pub fn body(&self, id: &str) -> Value {
        let mut doc = serde_json::Map::new();
        doc.insert("id".into(), json!(id));
        doc.insert("version".into(), json!(self.version));
        for (k, v) in &self.fields {
            doc.insert((*k).into(), json!(v));
        }
        Value::Object(doc)
    }
}

/// A field event announced by a save: `customer` events name the customer, `address` events name
/// the address and carry `customer_id` (routed to the customer by the decoder).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldEvent {
    /// The customer the event is about (also the record key, so all events of a customer land
    /// on one partition).
    pub customer_id: String,
    /// The notification payload (JSON).
    pub payload: String,
}

#[derive(Debug, Default)]
struct Inner {
    customers: Mutex<BTreeMap<String, Customer>>,
    requests: AtomicU64,
}

/// The running demo source. Dropping it stops the server.
#[derive(Debug)]
pub struct DemoSource {
    inner: Arc<Inner>,
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for DemoSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DemoSource {
    /// Start the server on `127.0.0.1:0` with no customers (the first save creates one).
    pub async fn start() -> std::io::Result<DemoSource> {
        let inner = Arc::new(Inner::default());
        let app = Router::new()
            .route("/customers/{id}", get(get_customer))
            .route("/health", get(|| async { "ok" }))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "demo source stopped");
            }
        });
        Ok(DemoSource { inner, addr, task })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests served so far.
    pub fn requests(&self) -> u64 {
        self.inner.requests.load(Ordering::Relaxed)
    }

    /// One save of customer `id`: change `events` fields (starting at a random one), bump the
    /// version, and return one field event per changed field.
    pub fn save(&self, id: &str, events: usize, rng: &mut impl Rng) -> Vec<FieldEvent> {
        let Ok(mut customers) = self.inner.customers.lock() else {
            return Vec::new();
        };
        let c = customers.entry(id.to_owned()).or_insert_with(|| Customer {
            version: 0,
            fields: BTreeMap::new(),
        });
        c.version += 1;
        let start = rng.random_range(0..FIELDS.len());
        let mut out = Vec::with_capacity(events);
        for i in 0..events {
            let field = FIELDS[(start + i) % FIELDS.len()];
            let value = match field {
                "phone" => format!(
                    "+41 44 {:03} {:02} {:02}",
                    rng.random_range(100..1000),
                    rng.random_range(10..100),
                    rng.random_range(10..100)
                ),
                "address" => format!(
                    "{} Bahnhofstrasse, {}",
                    rng.random_range(1..200),
                    ["Zürich", "Basel", "Bern", "Genève", "Lugano"][rng.random_range(0..5)]
                ),
                "email" => format!("customer{id}.{}@example.com", rng.random_range(0..10_000)),
                "name" => format!(
                    "{} {}",
                    ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Ken"][rng.random_range(0..6)],
                    [
                        "Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Thompson"
                    ][rng.random_range(0..6)]
                ),
                "segment" => ["retail", "sme", "enterprise"][rng.random_range(0..3)].to_owned(),
                "language" => ["de", "fr", "it", "en"][rng.random_range(0..4)].to_owned(),
                "newsletter" => rng.random_bool(0.5).to_string(),
                _ => format!("agent-{}", rng.random_range(1..40)),
            };
            c.fields.insert(field, value);
            let payload = if field == "address" {
                json!({"type": "address", "id": format!("addr-{id}"), "customer_id": id, "field": field})
            } else {
                json!({"type": "customer", "id": id, "field": field})
            };
            out.push(FieldEvent {
                customer_id: id.to_owned(),
                payload: payload.to_string(),
            });
        }
        out
    }

    /// Every customer with its current state.
    pub fn snapshot(&self) -> BTreeMap<String, Customer> {
        self.inner
            .customers
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default()
    }
}

async fn get_customer(State(inner): State<Arc<Inner>>, Path(id): Path<String>) -> Response {
    inner.requests.fetch_add(1, Ordering::Relaxed);
    let found = inner
        .customers
        .lock()
        .ok()
        .and_then(|c| c.get(&id).map(|c| c.body(&id)));
    match found {
        Some(body) => axum::Json(body).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"error": "not_found"})),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[tokio::test]
    async fn serves_saved_customers_with_their_version() {
        let source = DemoSource::start().await.expect("starts");
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let events = source.save("7", 3, &mut rng);
        assert_eq!(events.len(), 3);
        assert!(events.iter().all(|e| e.customer_id == "7"));
        source.save("7", 2, &mut rng);
        let url = format!("{}/customers/7", source.base_url());
        let text = reqwest::get(&url)
            .await
            .expect("GET")
            .text()
            .await
            .expect("body");
        let body: Value = serde_json::from_str(&text).expect("json");
        assert_eq!(body["version"], json!(2));
        assert_eq!(body, source.snapshot()["7"].body("7"));
        let missing = reqwest::get(format!("{}/customers/8", source.base_url()))
            .await
            .expect("GET");
        assert_eq!(missing.status(), 404);
        assert_eq!(source.requests(), 2);
    }
}
