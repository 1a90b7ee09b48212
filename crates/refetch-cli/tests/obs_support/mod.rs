//! Shared by the observability tests: a real broker topic, a local HTTP source, `refetch run`
//! instances with their operations endpoint on a free port, and a parser of the Prometheus text
//! format.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use refetch_testkit::http_source::{HttpSource, HttpSourceOptions};
use refetch_testkit::kafka;
use refetch_testkit::names::unique;
use refetch_testkit::process::{ChildProcess, spawn, wait_for_value};

/// A topic (and its group's dead-letter topic) on the test broker, a local source and a
/// folder for configurations, sinks and logs.
pub struct Setup {
    /// The broker.
    pub brokers: String,
    /// The notification topic.
    pub topic: String,
    /// The consumer group.
    pub group: String,
    /// The source refetch fetches from.
    pub source: HttpSource,
    /// Configurations, sinks and logs.
    pub dir: tempfile::TempDir,
}

/// One running `refetch run`.
pub struct Instance {
    /// The process.
    pub child: ChildProcess,
    /// `host:port` of its operations endpoint.
    pub addr: String,
}

impl Setup {
    /// A fresh topic of `partitions` partitions, its group and dead-letter topic, and a source.
    pub async fn new(prefix: &str, partitions: i32) -> Setup {
        let brokers = kafka::brokers().unwrap();
        let topic = unique(prefix);
        let group = unique(&format!("{prefix}_group"));
        kafka::create_topic(&brokers, &topic, partitions)
            .await
            .unwrap();
        kafka::create_topic(&brokers, &format!("{group}.dlq"), 1)
            .await
            .unwrap();
        let source = HttpSource::start(HttpSourceOptions::default())
            .await
            .unwrap();
        Setup {
            brokers,
            topic,
            group,
            source,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// Write the configuration of instance `name` (its own SQLite file; `extra` is appended
    /// as more TOML) and return its path.
    pub fn config(&self, name: &str, extra: &str) -> PathBuf {
        let db = self.dir.path().join(format!("{name}.db"));
        let path = self.dir.path().join(format!("{name}.toml"));
        let text = format!(
            r#"
[kafka]
brokers = "{brokers}"
group_id = "{group}"
consumer_properties = {{ "session.timeout.ms" = "6000", "heartbeat.interval.ms" = "1000" }}

[[topics]]
name = "{topic}"
decoder = {{ kind = "json", fixed_type = "customer", id = "/id", version = "/version" }}

[engine]
window = "50ms"
max_wait = "500ms"
commit_interval = "200ms"
shutdown_deadline = "10s"
rebalance_drain = "5s"

[fetcher.sources.customer]
url = "{source}/customer/{{id}}"
version = {{ pointer = "/version", kind = "integer" }}
not_found = {{ pointer = "/error", equals = "not_found" }}

[sink]
kind = "sqlite"
path = "{db}"
table = "customers"
busy_timeout = "30s"

[ops]
listen = "127.0.0.1:0"

{extra}
"#,
            brokers = self.brokers,
            group = self.group,
            topic = self.topic,
            source = self.source.base_url(),
            db = db.display(),
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Start `refetch run` with `config` and wait for its operations endpoint and its first
    /// assignment.
    pub async fn start(&self, name: &str, config: &Path, env: &[(&str, &str)]) -> Instance {
        let mut vars = vec![("RUST_LOG", "info,rdkafka=warn")];
        vars.extend_from_slice(env);
        let child = spawn(
            env!("CARGO_BIN_EXE_refetch"),
            ["run", "--config", config.to_str().unwrap()],
            vars,
            self.dir.path().join(format!("{name}.log")),
        )
        .unwrap();
        let addr = wait_for_value(
            "the operations endpoint and an assignment",
            Duration::from_secs(60),
            || {
                let log = child.log();
                async move {
                    if !log.contains("partitions assigned") {
                        return None;
                    }
                    log.lines().find_map(|l| {
                        let at = l.find("operations endpoint on http://")?;
                        let rest = &l[at + "operations endpoint on http://".len()..];
                        rest.split('/').next().map(str::to_owned)
                    })
                }
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", child.log()));
        Instance { child, addr }
    }

    /// Announce `records` as `(id, version)` notifications (keyed by id).
    pub async fn announce(&self, records: &[(String, i64)]) {
        let records = records.iter().map(|(id, v)| {
            (
                Some(id.clone().into_bytes()),
                serde_json::json!({"id": id, "version": v})
                    .to_string()
                    .into_bytes(),
            )
        });
        kafka::produce(&self.brokers, &self.topic, records)
            .await
            .unwrap();
    }
}

/// `GET http://{addr}{path}`: status and body.
pub async fn get(addr: &str, path: &str) -> (u16, String) {
    let resp = reqwest::get(format!("http://{addr}{path}")).await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

/// `/status.json` of an instance.
pub async fn status_json(addr: &str) -> serde_json::Value {
    let (code, body) = get(addr, "/status.json").await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// One sample line of the Prometheus text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The series name as written (`x_bucket`, `x_sum`, ... for histograms).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// A parsed `/metrics` page.
#[derive(Debug, Default)]
pub struct Metrics {
    /// `# TYPE` per metric.
    pub types: BTreeMap<String, String>,
    /// `# HELP` per metric.
    pub help: BTreeMap<String, String>,
    /// Every sample.
    pub samples: Vec<Sample>,
}

impl Metrics {
    /// Parse the text format.
    pub fn parse(text: &str) -> Metrics {
        let mut m = Metrics::default();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
                m.help.insert(name.to_owned(), help.to_owned());
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, ty) = rest.split_once(' ').unwrap();
                m.types.insert(name.to_owned(), ty.to_owned());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => (n, parse_labels(l.trim_end_matches('}'))),
                None => (series, BTreeMap::new()),
            };
            m.samples.push(Sample {
                name: name.to_owned(),
                labels,
                value: value.parse().unwrap_or(f64::NAN),
            });
        }
        m
    }

    /// The metric a sample belongs to (`x` for `x_bucket` of histogram `x`).
    pub fn metric_of<'a>(&'a self, sample: &'a str) -> &'a str {
        if self.types.contains_key(sample) {
            return sample;
        }
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = sample.strip_suffix(suffix)
                && self.types.contains_key(base)
            {
                return base;
            }
        }
        sample
    }

    /// The label names each metric's samples carry (`le` of histogram buckets left out).
    pub fn label_names(&self) -> BTreeMap<String, BTreeSet<String>> {
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for s in &self.samples {
            let entry = out.entry(self.metric_of(&s.name).to_owned()).or_default();
            entry.extend(s.labels.keys().filter(|k| *k != "le").cloned());
        }
        out
    }

    /// The sum of the samples of `name` whose labels include every pair of `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
            })
            .map(|s| s.value)
            .sum()
    }
}

fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(match n {
                            'n' => '\n',
                            other => other,
                        });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.insert(key.trim_start_matches(',').trim().to_owned(), value);
        rest = &after[end..];
    }
    out
}
