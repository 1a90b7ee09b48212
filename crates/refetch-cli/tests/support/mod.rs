//! What the binary-level tests of `run`'s lifecycle share: a topic, a group and its dead-letter
//! topic on the test broker, a local REST source, a JSON Lines sink, the configuration file, and
//! the `refetch` child process with its log.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::self_named_constructors,
    dead_code
)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use refetch::{EntityKey, Version};
use refetch_sinks::jsonl::read_latest;
use refetch_testkit::http_source::{HttpSource, HttpSourceOptions};
use refetch_testkit::kafka;
use refetch_testkit::names::unique;
use refetch_testkit::process::{tail, wait_for};
use serde_json::json;
use tokio::process::{Child, Command};

/// A broker topic, group, source and sink for one test.
pub struct Env {
    pub brokers: String,
    pub topic: String,
    pub group: String,
    pub source: HttpSource,
    pub dir: tempfile::TempDir,
    pub sink: PathBuf,
    pub config: PathBuf,
}

impl Env {
    /// A fresh topic of `partitions`, its group's dead-letter topic, a source and a sink path.
    pub async fn new(prefix: &str, partitions: i32) -> Env {
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
        let dir = tempfile::tempdir().unwrap();
        let sink = dir.path().join("sink.jsonl");
        let config = dir.path().join("refetch.toml");
        Env {
            brokers,
            topic,
            group,
            source,
            dir,
            sink,
            config,
        }
    }

    /// A configuration for `topics` (JSON decoder with versions), `window`, `level`, plus `extra`.
    pub fn config_text(&self, topics: &[&str], window: &str, level: &str, extra: &str) -> String {
        let mut text = format!(
            r#"[kafka]
brokers = "{brokers}"
group_id = "{group}"
"#,
            brokers = self.brokers,
            group = self.group
        );
        for t in topics {
            text.push_str(&format!(
                "\n[[topics]]\nname = \"{t}\"\ndecoder = {{ kind = \"json\", fixed_type = \"customer\", id = \"/id\", version = {{ pointer = \"/version\" }} }}\n"
            ));
        }
        text.push_str(&format!(
            r#"
[engine]
window = "{window}"
max_wait = "1s"
commit_interval = "100ms"
shutdown_deadline = "10s"

[fetcher.sources.customer]
url = "{base}/customer/{{id}}"
version = {{ pointer = "/version", kind = "integer" }}

[sink]
kind = "jsonl"
path = "{sink}"

[ops]
listen = "127.0.0.1:0"

[log]
level = "{level}"
{extra}"#,
            base = self.source.base_url(),
            sink = self.sink.display()
        ));
        text
    }

    /// Write the configuration file.
    pub fn write_config(&self, text: &str) {
        std::fs::write(&self.config, text).unwrap();
    }

    /// Change customer `id` at the source and notify it on `topic` (keyed by id) with its version.
    pub async fn change(
        &self,
        topic: &str,
        ids: impl IntoIterator<Item = u32>,
    ) -> Vec<(String, i64)> {
        let mut notified = Vec::new();
        let mut records = Vec::new();
        for i in ids {
            let id = i.to_string();
            let v = self.source.put("customer", &id, json!({ "n": i }));
            records.push((
                Some(id.clone().into_bytes()),
                json!({ "id": id, "version": v }).to_string().into_bytes(),
            ));
            notified.push((id, v));
        }
        kafka::produce(&self.brokers, topic, records).await.unwrap();
        notified
    }

    /// The version the sink holds for customer `id`.
    pub fn held(&self, id: &str) -> Option<Version> {
        read_latest(&self.sink)
            .ok()?
            .get(&EntityKey::new("customer", id))
            .and_then(|e| e.version)
    }

    /// Wait until the sink holds every `(id, version)` at that version or newer.
    pub async fn wait_held(&self, notified: &[(String, i64)], child: &Run) {
        let what = format!("{} entities in the sink", notified.len());
        wait_for(&what, Duration::from_secs(60), || {
            let ok = notified
                .iter()
                .all(|(id, v)| matches!(self.held(id), Some(Version::Int(h)) if h >= *v));
            async move { ok }
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", child.log_tail()));
    }

    /// Wait until the group's committed offsets on `topic` reach its end offsets.
    pub async fn wait_committed(&self, topic: &str, child: &Run) {
        let ends = kafka::end_offsets(&self.brokers, topic).await.unwrap();
        wait_for(
            "committed offsets to reach the end",
            Duration::from_secs(60),
            || {
                let (b, g, t, ends) = (
                    self.brokers.clone(),
                    self.group.clone(),
                    topic.to_owned(),
                    ends.clone(),
                );
                async move {
                    let committed = kafka::committed_offsets(&b, &g, &t)
                        .await
                        .unwrap_or_default();
                    ends.iter()
                        .all(|(p, e)| *e == 0 || committed.get(p) == Some(e))
                }
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", child.log_tail()));
    }
}

/// The `refetch` binary the tests drive: `REFETCH_TEST_BIN` when set (to run a test file against
/// a binary built from another commit), otherwise the one cargo built for this test.
pub fn refetch_bin() -> PathBuf {
    std::env::var_os("REFETCH_TEST_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_refetch")))
}

/// A `refetch` child process with its stdout and stderr in a log file. Killed when dropped.
pub struct Run {
    child: Child,
    log: PathBuf,
}

impl Run {
    /// Start `refetch ARGS` without `RUST_LOG` (so `[log] level` applies), logging to `log`.
    pub fn start(args: &[&str], log: &Path) -> Run {
        Run::start_in(args, Path::new("."), log)
    }

    /// [`Run::start`] in folder `dir`.
    pub fn start_in(args: &[&str], dir: &Path, log: &Path) -> Run {
        let file = std::fs::File::create(log).unwrap();
        let child = Command::new(refetch_bin())
            .args(args)
            .current_dir(dir)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        Run {
            child,
            log: log.to_path_buf(),
        }
    }

    /// `refetch run --config CONFIG`.
    pub fn run(env: &Env, log: &str) -> Run {
        Run::start(
            &["run", "--config", env.config.to_str().unwrap()],
            &env.dir.path().join(log),
        )
    }

    /// Everything logged so far, without terminal colour codes.
    pub fn log(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.log).unwrap_or_default())
    }

    /// The end of the log, for failure messages.
    pub fn log_tail(&self) -> String {
        tail(&self.log(), 60)
    }

    /// Wait until the log contains `needle` `times` times.
    pub async fn wait_log(&self, needle: &str, times: usize) {
        wait_for(
            &format!("{needle:?} x{times} in the log"),
            Duration::from_secs(60),
            || {
                let n = self.log().matches(needle).count();
                async move { n >= times }
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", self.log_tail()));
    }

    /// Send a signal (`TERM`, `INT`, `HUP`).
    pub async fn signal(&self, name: &str) {
        let pid = self.child.id().expect("running");
        let ok = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(pid.to_string())
            .status()
            .await
            .unwrap();
        assert!(ok.success(), "kill -{name} {pid}");
    }

    /// Is the process still running?
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Wait up to `within` for the exit code.
    pub async fn exit_code(&mut self, within: Duration) -> Option<i32> {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => status.unwrap().code(),
            Err(_) => panic!("still running after {within:?}\n{}", self.log_tail()),
        }
    }

    /// The operations endpoint's address of the latest generation, from the log.
    pub fn ops_addr(&self) -> String {
        let log = self.log();
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains("operations endpoint on http://"))
            .unwrap_or_else(|| panic!("no endpoint logged:\n{}", self.log_tail()));
        let at = line.find("http://").unwrap() + "http://".len();
        line[at..].split('/').next().unwrap().to_owned()
    }
}

/// `GET http://ADDR/PATH` as text (a plain HTTP/1.1 request, no client library).
pub async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// The value of a Prometheus sample line `name{labels} value` in `metrics`.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// `text` without ANSI escape sequences (`ESC [ ... letter`).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
