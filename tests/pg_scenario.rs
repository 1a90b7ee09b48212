//! A real-broker scenario with the PostgreSQL sink, shared by `chaos.rs`, `soak.rs` and
//! `secrets.rs` (included with `#[path]`, so `lib.rs` stays as it is): topic and group, a local
//! HTTP source whose entities change, `refetch run` processes writing to a PostgreSQL table, and
//! the end checks (the table equals the source, committed offsets reach the end, the dead-letter
//! topic holds only what is expected).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use rdkafka::producer::{FutureProducer, FutureRecord};
use refetch::{EntityKey, Version};
use refetch_integration_tests::refetch_binary;
use refetch_sinks::postgres::PostgresSink;
use refetch_sinks::stored::StoredBody;
use refetch_sinks::{PostgresConfig, Secret};
use refetch_testkit::http_source::{HttpSource, HttpSourceOptions};
use refetch_testkit::kafka;
use refetch_testkit::names::unique;
use refetch_testkit::process::{ChildProcess, spawn, wait_for, wait_for_value};
use serde_json::json;

pub struct PgScenario {
    pub brokers: String,
    pub pg_url: String,
    pub topic: String,
    pub group: String,
    pub schema: String,
    pub source: HttpSource,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub notifications: usize,
    /// Extra TOML appended to the `[fetcher.sources.customer]` table.
    pub source_extra: String,
    /// The `[sink] url` as written to the config (may hold `${VAR}`).
    pub sink_url: String,
    pub log_level: String,
    /// The brokers `refetch run` connects to (default: `brokers`, which the test itself uses).
    pub run_brokers: String,
    /// Extra TOML lines for the `[kafka]` table (for example `properties = { ... }`).
    pub kafka_extra: String,
    producer: FutureProducer,
}

impl PgScenario {
    pub async fn new(
        brokers: String,
        pg_url: String,
        name: &str,
        partitions: i32,
    ) -> anyhow::Result<PgScenario> {
        let topic = unique(name);
        let group = unique(&format!("{name}_group"));
        kafka::create_topic(&brokers, &topic, partitions).await?;
        kafka::create_topic(&brokers, &format!("{group}.dlq"), 1).await?;
        let source = HttpSource::start(HttpSourceOptions::default()).await?;
        // REFETCH_KEEP=1 keeps the scenario's folder (config and process logs) for inspection.
        let dir = tempfile::Builder::new()
            .prefix(&format!("refetch-{name}-"))
            .disable_cleanup(std::env::var_os("REFETCH_KEEP").is_some())
            .tempdir()?;
        if std::env::var_os("REFETCH_KEEP").is_some() {
            eprintln!("scenario folder kept: {}", dir.path().display());
        }
        let config = dir.path().join("refetch.toml");
        let producer: FutureProducer = kafka::client_config(&brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "180000")
            .create()
            .context("creating the Kafka producer")?;
        let s = PgScenario {
            producer,
            run_brokers: brokers.clone(),
            kafka_extra: String::new(),
            brokers,
            sink_url: pg_url.clone(),
            pg_url,
            topic,
            schema: unique("chaos"),
            group,
            source,
            dir,
            config,
            notifications: 0,
            source_extra: String::new(),
            log_level: "info".into(),
        };
        s.write_config()?;
        Ok(s)
    }

    pub fn write_config(&self) -> anyhow::Result<()> {
        std::fs::write(&self.config, self.config_text())?;
        Ok(())
    }

    fn config_text(&self) -> String {
        format!(
            r#"
[kafka]
brokers = "{brokers}"
group_id = "{group}"
group_protocol = "classic"
consumer_properties = {{ "session.timeout.ms" = "6000", "heartbeat.interval.ms" = "500" }}
{kafka_extra}

[[topics]]
name = "{topic}"
decoder = {{ kind = "json", fixed_type = "customer", id = "/id" }}

[engine]
window = "50ms"
max_wait = "500ms"
commit_interval = "200ms"
shutdown_deadline = "10s"
rebalance_drain = "5s"

[fetcher.sources.customer]
url = "{source}/customer/{{id}}"
timeout = "1s"
version = {{ pointer = "/version", kind = "integer" }}
not_found = {{ pointer = "/error", equals = "not_found" }}
{extra}

[sink]
kind = "postgres"
url = "{url}"
schema = "{schema}"
table = "customers"
create_table = true
connect_timeout = "2s"

[ops]
listen = "127.0.0.1:0"

[log]
level = "{level}"
"#,
            brokers = self.run_brokers,
            kafka_extra = self.kafka_extra,
            group = self.group,
            topic = self.topic,
            source = self.source.base_url(),
            extra = self.source_extra,
            url = self.sink_url,
            schema = self.schema,
            level = self.log_level,
        )
    }

    /// Starts `refetch run` with this scenario's config and extra environment.
    pub fn spawn(&self, name: &str, env: &[(&str, &str)]) -> anyhow::Result<ChildProcess> {
        let mut vars: Vec<(String, String)> = vec![(
            "RUST_LOG".into(),
            format!("{},rdkafka=warn", self.log_level),
        )];
        vars.extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        spawn(
            refetch_binary()?,
            [
                "run",
                "--config",
                self.config.to_str().context("utf-8 path")?,
            ],
            vars,
            self.dir.path().join(format!("{name}.log")),
        )
    }

    /// Waits until the process has joined the group.
    pub async fn joined(&self, child: &ChildProcess) -> anyhow::Result<()> {
        wait_for(
            "the process to join the group",
            Duration::from_secs(90),
            || {
                let log = child.log();
                async move { log.contains("partitions assigned") }
            },
        )
        .await
        .with_context(|| refetch_testkit::process::tail(&child.log(), 40))
    }

    /// The operations endpoint's address, from the process's log.
    pub async fn ops_addr(&self, child: &ChildProcess) -> anyhow::Result<String> {
        wait_for_value("the ops endpoint", Duration::from_secs(60), || {
            let log = child.log();
            async move {
                log.lines()
                    .find_map(|l| l.split("operations endpoint on http://").nth(1))
                    .and_then(|rest| rest.split('/').next())
                    .map(str::to_owned)
            }
        })
        .await
    }

    /// Changes `ids` at the source and announces each change with `1 + dupes` keyed
    /// notifications (the outbox order: change first, then notify). Retries the produce until
    /// the broker takes it (a broker restart only delays it).
    pub async fn change(&mut self, ids: &[usize], dupes: usize) -> anyhow::Result<()> {
        let mut records = Vec::new();
        for &i in ids {
            let id = i.to_string();
            let v = self.source.put(
                "customer",
                &id,
                json!({"name": format!("customer {i}"), "n": self.notifications}),
            );
            for _ in 0..=dupes {
                records.push((
                    Some(id.clone().into_bytes()),
                    json!({"id": id, "v": v}).to_string().into_bytes(),
                ));
            }
        }
        let n = records.len();
        // Enqueue everything, then await every delivery: the idempotent producer retries through
        // a broker restart within its message timeout.
        let mut deliveries = Vec::with_capacity(n);
        for (key, payload) in &records {
            let mut record =
                FutureRecord::<[u8], [u8]>::to(&self.topic).payload(payload.as_slice());
            if let Some(k) = key {
                record = record.key(k.as_slice());
            }
            match self.producer.send_result(record) {
                Ok(d) => deliveries.push(d),
                Err((e, _)) => bail!("enqueueing a notification: {e}"),
            }
        }
        for d in deliveries {
            match d.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => bail!("delivering a notification: {e}"),
                Err(_) => bail!("the producer dropped a delivery"),
            }
        }
        self.notifications += n;
        Ok(())
    }

    pub async fn committed(&self) -> anyhow::Result<BTreeMap<i32, i64>> {
        kafka::committed_offsets(&self.brokers, &self.group, &self.topic).await
    }

    /// Waits until the committed offsets equal the end offsets.
    pub async fn until_committed(
        &self,
        within: Duration,
        logs: &[&ChildProcess],
    ) -> anyhow::Result<()> {
        refetch_integration_tests::until_committed(
            &self.brokers,
            &self.group,
            &self.topic,
            within,
            logs,
        )
        .await
    }

    /// (entities checked, differences) between the source and the table, ids in `skip` left out.
    pub async fn differences(
        &self,
        skip: &std::collections::BTreeSet<String>,
    ) -> anyhow::Result<(usize, Vec<String>)> {
        let sink = PostgresSink::connect(&PostgresConfig {
            url: Secret::new(self.pg_url.clone()),
            schema: self.schema.clone(),
            table: "customers".into(),
            ..PostgresConfig::default()
        })
        .await?;
        let mut checked = 0;
        let mut diff = Vec::new();
        for ((t, id), state) in self.source.snapshot() {
            if skip.contains(&id) {
                continue;
            }
            let Some((version, body)) = state else {
                continue;
            };
            checked += 1;
            let row = sink.get(&EntityKey::new(t.as_str(), id.as_str())).await?;
            match row {
                Some(r)
                    if !r.deleted
                        && r.version == Some(Version::Int(version))
                        && r.body == Some(StoredBody::Json(body.clone())) => {}
                other => diff.push(format!("{id}: source v{version}, sink {other:?}")),
            }
        }
        Ok((checked, diff))
    }

    /// Records of the dead-letter topic.
    pub async fn dead_letters(&self) -> anyhow::Result<Vec<kafka::ReadRecord>> {
        kafka::read_all(
            &self.brokers,
            &format!("{}.dlq", self.group),
            true,
            Duration::from_secs(20),
        )
        .await
    }
}

/// Resident set size (KiB) and open file descriptors of a process, from /proc.
pub fn rss_and_fds(pid: u32) -> Option<(u64, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some((rss, fds))
}

/// A plain HTTP GET of `path` on `addr` (the ops endpoint); returns the body.
pub async fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await??;
    let text = String::from_utf8_lossy(&out).into_owned();
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or(text))
}

/// A gauge's value from a Prometheus text page.
pub fn gauge(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.split([' ', '{']).next() == Some(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
