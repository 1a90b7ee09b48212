//! Embeds refetch with a custom `Fetcher` and a custom `Sink`, on librdkafka's in-process mock
//! cluster, so it runs with nothing installed: `cargo run -p refetch --example custom_pipeline`.
//!
//! A toy CRM changes customers in bursts (one "save" emits three field events); the pipeline
//! coalesces them, fetches each customer once per burst, writes it to an in-memory "target
//! database", and commits offsets only after the writes. At the end the target equals the CRM.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use refetch::decode::JsonDecoder;
use refetch::{
    Change, EngineConfig, Entity, EntityKey, FetchError, FetchOutcome, FetchRequest, Fetcher,
    KafkaConfig, Pipeline, Sink, SinkError, Version, VersionKind, WriteReport, async_trait,
};

/// The source system: customer id -> revision.
#[derive(Clone, Default)]
struct Crm(Arc<Mutex<BTreeMap<String, i64>>>);

#[async_trait]
impl Fetcher for Crm {
    async fn fetch(&self, req: &FetchRequest) -> Result<FetchOutcome, FetchError> {
        let crm = self
            .0
            .lock()
            .map_err(|_| FetchError::permanent("crm poisoned"))?;
        Ok(match crm.get(req.key.id()) {
            Some(rev) => FetchOutcome::Found(Entity::json(
                format!(r#"{{"id":{:?},"rev":{rev}}}"#, req.key.id()),
                Some(Version::Int(*rev)),
            )),
            None => FetchOutcome::Gone,
        })
    }
}

/// The target system: key -> revision, written in batches.
#[derive(Clone, Default)]
struct Target(Arc<Mutex<BTreeMap<EntityKey, i64>>>, Arc<Mutex<u64>>);

#[async_trait]
impl Sink for Target {
    async fn write(&self, batch: &[Change]) -> Result<WriteReport, SinkError> {
        let mut db = self
            .0
            .lock()
            .map_err(|_| SinkError::permanent("db poisoned"))?;
        for change in batch {
            match change {
                Change::Upsert { key, entity } => {
                    let rev = entity.version.map_or(0, |v| v.value());
                    // Version guard: never overwrite a newer revision.
                    if db.get(key).is_none_or(|held| *held <= rev) {
                        db.insert(key.clone(), rev);
                    }
                }
                Change::Delete { key } => {
                    db.remove(key);
                }
            }
        }
        if let Ok(mut n) = self.1.lock() {
            *n += batch.len() as u64;
        }
        Ok(WriteReport::all_durable())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cluster = MockCluster::new(1)?;
    cluster.create_topic("crm.customers", 3, 1)?;
    cluster.create_topic("example.dlq", 1, 1)?;
    let brokers = cluster.bootstrap_servers();

    // The CRM changes 500 customers, 3 events per save, 4 saves each.
    let crm = Crm::default();
    let producer: BaseProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()?;
    let mut notifications = 0;
    for _save in 0..4 {
        for c in 0..500 {
            let id = format!("c{c}");
            let rev = {
                let mut m = crm.0.lock().map_err(|_| "crm poisoned")?;
                let r = m.entry(id.clone()).or_insert(0);
                *r += 1;
                *r
            };
            for field in ["phone", "address", "email"] {
                let payload = format!(r#"{{"id":"{id}","rev":{rev},"field":"{field}"}}"#);
                producer
                    .send(BaseRecord::to("crm.customers").key(&id).payload(&payload))
                    .map_err(|(e, _)| e)?;
                notifications += 1;
            }
        }
    }
    producer.flush(Duration::from_secs(10))?;

    // The pipeline: about twenty lines.
    let target = Target::default();
    let mut kafka = KafkaConfig::new(brokers, "example", vec!["crm.customers".into()]);
    kafka.dead_letter_topic = "example.dlq".into();
    let pipeline = Pipeline::builder::<Crm, Target>()
        .kafka(kafka)
        .decoder(
            JsonDecoder::fixed_type("customer", "/id").with_version("/rev", VersionKind::Integer),
        )
        .fetcher(crm.clone())
        .sink(target.clone())
        .engine(EngineConfig {
            window: Duration::from_millis(100),
            ..EngineConfig::default()
        })
        .build()?;
    let handle = pipeline.handle();
    let running = tokio::spawn(pipeline.run(async {
        let _ = tokio::signal::ctrl_c().await;
    }));

    // Wait until every partition is committed to its end, then stop.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Some(status) = handle.status().await else {
            break;
        };
        let committed: i64 = status
            .engine
            .partitions
            .iter()
            .filter_map(|p| p.committed)
            .sum();
        if committed >= notifications as i64 || tokio::time::Instant::now() > deadline {
            break;
        }
    }
    handle.shutdown();
    let report = running.await??;

    let db = target.0.lock().map_err(|_| "db poisoned")?;
    let crm_state = crm.0.lock().map_err(|_| "crm poisoned")?;
    let converged = crm_state
        .iter()
        .all(|(id, rev)| db.get(&EntityKey::new("customer", id.as_str())) == Some(rev));
    let c = &report.status.counters;
    println!(
        "{notifications} notifications -> {} fetches -> {} writes; target equals CRM: {converged}",
        c.fetches, c.writes
    );
    if !converged {
        return Err("target differs from the CRM".into());
    }
    Ok(())
}
