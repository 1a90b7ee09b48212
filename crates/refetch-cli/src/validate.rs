//! `refetch validate [--connect] [--deny-warnings]`: check a configuration file, and optionally
//! everything it points at, one line per check.
//!
//! `validate` changes nothing: it creates no file, no table and no topic. With `--connect` the
//! broker is asked for metadata (the dead-letter topic must exist with partitions), each source
//! is reached, and the sink is checked without being created: a file sink's file (or, when it
//! does not exist yet, its folder) must be writable, and a PostgreSQL sink's table is checked
//! but never created (with `create_table = true` a missing table is reported as one that `run`
//! will create).

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use refetch::kafka::DeadLetterProducer;
use refetch::{KafkaConfig, Sink};
use refetch_sinks::{PostgresConfig, SinkConfig};

use crate::cli::ValidateArgs;
use crate::config::Config;
use crate::wiring;

const TIMEOUT: Duration = Duration::from_secs(10);

struct Report {
    failed: usize,
}

impl Report {
    fn line(&mut self, what: &str, result: Result<String, String>) {
        match result {
            Ok(detail) => println!("ok      {what}: {detail}"),
            Err(why) => {
                self.failed += 1;
                println!("FAILED  {what}: {why}");
            }
        }
    }
}

/// `refetch validate`.
pub async fn validate(args: &ValidateArgs) -> anyhow::Result<ExitCode> {
    let loaded = match crate::config::load_for_command(&args.config.config) {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    if args.deny_warnings && !loaded.warnings.is_empty() {
        eprintln!(
            "error: invalid configuration: {} warning(s), and --deny-warnings makes them errors",
            loaded.warnings.len()
        );
        for w in &loaded.warnings {
            eprintln!("warning: {w}");
        }
        return Ok(ExitCode::from(crate::exit::CONFIG));
    }
    let cfg = loaded.config;
    let mut r = Report { failed: 0 };
    r.line(
        "configuration",
        Ok(format!(
            "{} ({} topic(s), {} source(s), {} sink)",
            args.config.config.display(),
            cfg.topics.len(),
            cfg.fetcher.sources.len(),
            cfg.sink.kind()
        )),
    );
    for w in &loaded.warnings {
        println!("warning {w}");
    }
    // Loading built every source already; this is the fetcher `run` would use.
    r.line(
        "fetcher",
        wiring::build_fetcher(&cfg.fetcher)
            .map(|_| {
                format!(
                    "entity types {}",
                    cfg.fetcher
                        .sources
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
            .map_err(|e| format!("{e:#}")),
    );
    if args.connect {
        connect_checks(&cfg, &mut r).await;
    }
    if r.failed == 0 {
        Ok(ExitCode::SUCCESS)
    } else {
        println!("{} check(s) failed", r.failed);
        Ok(ExitCode::FAILURE)
    }
}

async fn connect_checks(cfg: &Config, r: &mut Report) {
    let kafka = cfg.kafka_config();
    r.line(
        &format!("broker {}", kafka.brokers),
        broker_metadata(&kafka).await,
    );
    let dlq = async {
        let p = DeadLetterProducer::new(&kafka).map_err(|e| e.to_string())?;
        p.check(TIMEOUT).await.map_err(|e| e.to_string())?;
        Ok("exists with partitions (broker metadata; nothing is written)".to_owned())
    };
    r.line(
        &format!("dead-letter topic {}", kafka.dead_letter_topic),
        dlq.await,
    );
    let client = reqwest::Client::builder()
        .timeout(TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .build();
    match client {
        Ok(client) => {
            for (entity_type, source) in &cfg.fetcher.sources {
                let what = format!("source {entity_type}");
                let result = match cfg.validate.health_urls.get(entity_type) {
                    Some(url) => get_health(&client, url).await,
                    None => head_origin(&client, &source.url).await,
                };
                r.line(&what, result);
            }
        }
        Err(e) => r.line("sources", Err(format!("cannot create an HTTP client: {e}"))),
    }
    r.line(
        &format!("sink {}", cfg.sink.kind()),
        sink_check(&cfg.sink).await,
    );
}

/// The sink, checked without creating anything.
pub async fn sink_check(sink: &SinkConfig) -> Result<String, String> {
    match sink {
        SinkConfig::Jsonl(c) => file_writable(&c.path, None),
        SinkConfig::Sqlite(c) => file_writable(&c.path, Some(b"SQLite format 3\0")),
        SinkConfig::Postgres(c) => {
            // Never create the table here: check it as `run` would find it.
            let probe = SinkConfig::Postgres(PostgresConfig {
                create_table: false,
                ..c.clone()
            });
            match reach(&probe).await {
                Ok(detail) => Ok(detail),
                Err(e) if c.create_table && e.contains("does not exist") => Ok(format!(
                    "reachable; {e}: `run` creates it (create_table = true)"
                )),
                Err(e) => Err(e),
            }
        }
        other => reach(other).await,
    }
}

async fn reach(cfg: &SinkConfig) -> Result<String, String> {
    let sink = wiring::build_sink(cfg)
        .await
        .map_err(|e| format!("{e:#}"))?;
    sink.check().await.map_err(|e| e.to_string())?;
    Ok("reachable".to_owned())
}

/// A file sink's file: writable if it exists (and of the right kind, by its first bytes), or
/// else its folder writable. Creates nothing.
fn file_writable(path: &Path, magic: Option<&[u8]>) -> Result<String, String> {
    use rustix::fs::{Access, access};
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => Err(format!("{} is not a file", path.display())),
        Ok(m) => {
            access(path, Access::READ_OK | Access::WRITE_OK)
                .map_err(|e| format!("{} is not writable: {e}", path.display()))?;
            if let Some(magic) = magic
                && m.len() > 0
            {
                let mut head = vec![0u8; magic.len()];
                let mut f = std::fs::File::open(path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
                std::io::Read::read_exact(&mut f, &mut head)
                    .map_err(|_| format!("{} is not a SQLite database", path.display()))?;
                if head != magic {
                    return Err(format!("{} is not a SQLite database", path.display()));
                }
            }
            Ok(format!("{} exists and is writable", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let folder = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            if !folder.is_dir() {
                return Err(format!(
                    "{} does not exist and its folder {} does not exist either",
                    path.display(),
                    folder.display()
                ));
            }
            access(folder, Access::WRITE_OK | Access::EXEC_OK).map_err(|e| {
                format!(
                    "cannot create {} in {}: {e}",
                    path.display(),
                    folder.display()
                )
            })?;
            Ok(format!(
                "{} does not exist yet; its folder is writable (`run` creates it)",
                path.display()
            ))
        }
        Err(e) => Err(format!("cannot inspect {}: {e}", path.display())),
    }
}

/// Broker metadata: every configured topic exists with partitions.
pub async fn broker_metadata(kafka: &KafkaConfig) -> Result<String, String> {
    let config = kafka.consumer_client_config();
    let topics = kafka.topics.clone();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = config.create().map_err(|e| e.to_string())?;
        let md = consumer
            .fetch_metadata(None, TIMEOUT)
            .map_err(|e| format!("no metadata within {TIMEOUT:?}: {e}"))?;
        let mut parts = vec![format!("{} broker(s)", md.brokers().len())];
        for t in &topics {
            match md.topics().iter().find(|m| m.name() == t) {
                Some(m) if m.error().is_none() && !m.partitions().is_empty() => {
                    parts.push(format!("{t}: {} partition(s)", m.partitions().len()));
                }
                Some(m) => return Err(format!("topic `{t}` is not usable: {:?}", m.error())),
                None => return Err(format!("topic `{t}` does not exist")),
            }
        }
        Ok(parts.join(", "))
    })
    .await
    .map_err(|e| e.to_string())?
}

async fn get_health(client: &reqwest::Client, resolved: &str) -> Result<String, String> {
    // `${VAR}` was resolved when the file was loaded.
    let resp = client
        .get(resolved)
        .send()
        .await
        .map_err(|e| format!("GET {}: {e}", redact(resolved)))?;
    if resp.status().is_success() {
        Ok(format!(
            "GET {} answered {}",
            redact(resolved),
            resp.status()
        ))
    } else {
        Err(format!(
            "GET {} answered {}",
            redact(resolved),
            resp.status()
        ))
    }
}

/// The scheme, host and port of a URL template (placeholders are only allowed in the path and
/// query, so the origin is plain text).
pub fn origin_of(template: &str) -> Result<String, String> {
    let filled = template.replace(['{', '}'], "");
    let url = url::Url::parse(&filled).map_err(|e| format!("url {template:?}: {e}"))?;
    let host = url
        .host_str()
        .ok_or_else(|| format!("url {template:?} has no host"))?;
    Ok(match url.port() {
        Some(p) => format!("{}://{host}:{p}/", url.scheme()),
        None => format!("{}://{host}/", url.scheme()),
    })
}

async fn head_origin(client: &reqwest::Client, template: &str) -> Result<String, String> {
    let origin = origin_of(template)?;
    let resp = client
        .head(&origin)
        .send()
        .await
        .map_err(|e| format!("HEAD {origin}: {e}"))?;
    Ok(format!(
        "HEAD {origin} answered {} (any answer counts as reachable)",
        resp.status()
    ))
}

fn redact(url: &str) -> String {
    refetch_sinks::secret::redact_url(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_drop_paths_and_placeholders() {
        assert_eq!(
            origin_of("https://crm.example/api/customers/{id}").as_deref(),
            Ok("https://crm.example/")
        );
        assert_eq!(
            origin_of("http://127.0.0.1:8080/t/{tenant}/c/{id}?x={id}").as_deref(),
            Ok("http://127.0.0.1:8080/")
        );
        assert!(origin_of("not a url/{id}").is_err());
    }
}
