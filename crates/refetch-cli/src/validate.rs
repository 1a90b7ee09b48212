//! `refetch validate [--connect]`: check a configuration file, and optionally everything it
//! points at, one line per check.

use std::process::ExitCode;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use refetch::kafka::DeadLetterProducer;
use refetch::{KafkaConfig, Sink};

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
    // Building the fetcher resolves its `${VAR}`s and checks URL templates.
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
        Ok("exists and has partitions".to_owned())
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
    let sink = async {
        let sink = wiring::build_sink(&cfg.sink)
            .await
            .map_err(|e| format!("{e:#}"))?;
        sink.check().await.map_err(|e| e.to_string())?;
        Ok("reachable".to_owned())
    };
    r.line(&format!("sink {}", cfg.sink.kind()), sink.await);
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

async fn get_health(client: &reqwest::Client, url: &str) -> Result<String, String> {
    let resolved = crate::config::resolve_env(url, &|n| std::env::var(n).ok())?;
    let resp = client
        .get(&resolved)
        .send()
        .await
        .map_err(|e| format!("GET {}: {e}", redact(&resolved)))?;
    if resp.status().is_success() {
        Ok(format!(
            "GET {} answered {}",
            redact(&resolved),
            resp.status()
        ))
    } else {
        Err(format!(
            "GET {} answered {}",
            redact(&resolved),
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
