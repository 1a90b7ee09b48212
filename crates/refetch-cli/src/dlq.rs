//! `refetch dlq list|redrive`: inspect the dead-letter topic and run dead letters again.
//!
//! Dead letters are read with a consumer that *assigns* the topic's partitions (no group, no
//! commits), from the beginning up to the end offsets read when the command started, so listing
//! never changes anything and always terminates.
//!
//! Redrive modes:
//! - default: refresh the entities the records name (`refetch.entity.type`/`refetch.entity.id`)
//!   through a refresh pipeline, i.e. the engine's single flight (so per-key order holds beside a
//!   running `refetch run`:
//!   anything that writes entities goes through it);
//! - `--to-retry-topic`: republish the records to the configured retry topic, which `refetch run`
//!   subscribes to (its records are decoded from those headers);
//! - `--to-source-topic`: records that kept their original key and payload (reasons `decode`,
//!   `id_too_long`, `unknown_type`) are written back to their `refetch.source.topic`; only with
//!   this explicit flag, since it writes to a topic refetch does not own.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use refetch::EntityKey;
use refetch::dlq::{header, reason};

use crate::cli::{DlqCommand, DlqListArgs, DlqRedriveArgs};
use crate::config::Config;
use crate::logging;
use crate::signals::Signals;

const TIMEOUT: Duration = Duration::from_secs(10);

/// One dead letter as read back.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadRecord {
    /// Partition in the dead-letter topic.
    pub partition: i32,
    /// Offset in the dead-letter topic.
    pub offset: i64,
    /// The record key, as text (lossy).
    pub key: Option<String>,
    /// The payload, as text (lossy).
    pub payload: Option<String>,
    /// Every header, as text (lossy).
    pub headers: Vec<(String, String)>,
    #[serde(skip)]
    raw_key: Option<Vec<u8>>,
    #[serde(skip)]
    raw_payload: Option<Vec<u8>>,
}

impl DeadRecord {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The entity the record names, if any.
    pub fn entity(&self) -> Option<EntityKey> {
        match (
            self.header(header::ENTITY_TYPE),
            self.header(header::ENTITY_ID),
        ) {
            (Some(t), Some(id)) if !t.is_empty() && !id.is_empty() => Some(EntityKey::new(t, id)),
            _ => None,
        }
    }

    /// Did the record keep the original notification's key and payload?
    pub fn keeps_original(&self) -> bool {
        matches!(
            self.header(header::REASON),
            Some(reason::DECODE | reason::ID_TOO_LONG | reason::UNKNOWN_TYPE)
        )
    }
}

/// `refetch dlq ...`.
pub async fn command(cmd: &DlqCommand, signals: Signals) -> anyhow::Result<ExitCode> {
    match cmd {
        DlqCommand::List(a) => list(a).await,
        DlqCommand::Redrive(a) => redrive(a, &signals).await,
    }
}

/// Read every record of the dead-letter topic (up to the end offsets at the start).
pub async fn read_dead_letters(
    cfg: &Config,
    limit: Option<usize>,
) -> anyhow::Result<Vec<DeadRecord>> {
    let kafka = cfg.kafka_config();
    let topic = kafka.dead_letter_topic.clone();
    let mut client = rdkafka::ClientConfig::new();
    client.set("bootstrap.servers", &kafka.brokers);
    for (k, v) in &kafka.properties {
        client.set(k, v);
    }
    client
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("group.id", format!("{}.dlq-reader", kafka.group_id));
    tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<DeadRecord>> {
        let consumer: BaseConsumer = client.create().context("creating the reader")?;
        let md = consumer
            .fetch_metadata(Some(&topic), TIMEOUT)
            .with_context(|| format!("reading the metadata of `{topic}`"))?;
        let Some(t) = md.topics().first().filter(|t| t.error().is_none()) else {
            bail!("dead-letter topic `{topic}` does not exist");
        };
        let mut ends = BTreeMap::new();
        let mut tpl = TopicPartitionList::new();
        for p in t.partitions() {
            let (low, high) = consumer
                .fetch_watermarks(&topic, p.id(), TIMEOUT)
                .with_context(|| format!("reading the end offset of {topic}/{}", p.id()))?;
            if high > low {
                ends.insert(p.id(), high);
                tpl.add_partition_offset(&topic, p.id(), Offset::Offset(low))?;
            }
        }
        let mut out = Vec::new();
        if ends.is_empty() {
            return Ok(out);
        }
        consumer.assign(&tpl)?;
        let mut positions: BTreeMap<i32, i64> = BTreeMap::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while ends
            .iter()
            .any(|(p, end)| positions.get(p).copied().unwrap_or(-1) + 1 < *end)
        {
            if limit.is_some_and(|l| out.len() >= l) {
                break;
            }
            if std::time::Instant::now() > deadline {
                bail!("reading `{topic}` did not reach its end offsets within 60 s");
            }
            match consumer.poll(Duration::from_millis(500)) {
                Some(Ok(m)) => {
                    positions.insert(m.partition(), m.offset());
                    let headers = m
                        .headers()
                        .map(|hs| {
                            hs.iter()
                                .map(|h: Header<'_, &[u8]>| {
                                    (
                                        h.key.to_owned(),
                                        h.value
                                            .map(|v| String::from_utf8_lossy(v).into_owned())
                                            .unwrap_or_default(),
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    out.push(DeadRecord {
                        partition: m.partition(),
                        offset: m.offset(),
                        key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                        payload: m.payload().map(|p| String::from_utf8_lossy(p).into_owned()),
                        headers,
                        raw_key: m.key().map(<[u8]>::to_vec),
                        raw_payload: m.payload().map(<[u8]>::to_vec),
                    });
                }
                Some(Err(e)) => bail!("reading `{topic}`: {e}"),
                None => {}
            }
        }
        out.sort_by_key(|r| (r.partition, r.offset));
        Ok(out)
    })
    .await
    .context("the reader task panicked")?
}

async fn list(a: &DlqListArgs) -> anyhow::Result<ExitCode> {
    let cfg = match crate::config::load_for_command(&a.config.config) {
        Ok(l) => l.config,
        Err(code) => return Ok(code),
    };
    logging::init("warn", cfg.log.format);
    let records = read_dead_letters(&cfg, a.limit).await?;
    for r in &records {
        if a.json {
            println!("{}", serde_json::to_string(r)?);
            continue;
        }
        println!(
            "{}/{}  key={}",
            r.partition,
            r.offset,
            r.key.as_deref().unwrap_or("(none)")
        );
        for (k, v) in r.headers.iter().filter(|(k, _)| k.starts_with("refetch.")) {
            println!("    {k}: {v}");
        }
        if let Some(p) = &r.payload {
            let shown: String = p.chars().take(300).collect();
            let more = if p.chars().count() > 300 { " …" } else { "" };
            println!("    payload: {shown}{more}");
        }
    }
    if !a.json {
        println!(
            "{} dead letter(s) in `{}`",
            records.len(),
            cfg.kafka.dead_letter_topic()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_coordinates(s: &str) -> anyhow::Result<(i32, i64)> {
    let (p, o) = s
        .split_once(':')
        .with_context(|| format!("`{s}` is not PARTITION:OFFSET"))?;
    Ok((
        p.parse()
            .with_context(|| format!("bad partition in `{s}`"))?,
        o.parse().with_context(|| format!("bad offset in `{s}`"))?,
    ))
}

/// The records a redrive selects.
pub fn select<'a>(
    records: &'a [DeadRecord],
    a: &DlqRedriveArgs,
) -> anyhow::Result<Vec<&'a DeadRecord>> {
    let coordinates = a
        .records
        .iter()
        .map(|s| parse_coordinates(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if !a.all && coordinates.is_empty() && a.reason.is_none() && a.entity_type.is_none() {
        bail!("choose the records: --all, --record PARTITION:OFFSET, --reason or --entity-type");
    }
    Ok(records
        .iter()
        .filter(|r| coordinates.is_empty() || coordinates.contains(&(r.partition, r.offset)))
        .filter(|r| {
            a.reason
                .as_deref()
                .is_none_or(|x| r.header(header::REASON) == Some(x))
        })
        .filter(|r| {
            a.entity_type
                .as_deref()
                .is_none_or(|x| r.header(header::ENTITY_TYPE) == Some(x))
        })
        .collect())
}

async fn redrive(a: &DlqRedriveArgs, signals: &Signals) -> anyhow::Result<ExitCode> {
    let cfg = match crate::config::load_for_command(&a.config.config) {
        Ok(l) => l.config,
        Err(code) => return Ok(code),
    };
    logging::init("warn", cfg.log.format);
    let records = read_dead_letters(&cfg, None).await?;
    let chosen = select(&records, a)?;
    if chosen.is_empty() {
        println!("no dead letter matches");
        return Ok(ExitCode::SUCCESS);
    }
    if a.to_retry_topic || a.to_source_topic {
        return republish(&cfg, &chosen, a).await;
    }
    let mut keys: Vec<EntityKey> = Vec::new();
    for r in &chosen {
        match r.entity() {
            Some(k) => {
                if !keys.contains(&k) {
                    keys.push(k);
                }
            }
            None => println!(
                "{}/{}  skipped: names no entity (reason {}); use --to-source-topic for records \
                 that kept their original payload",
                r.partition,
                r.offset,
                r.header(header::REASON).unwrap_or("unknown")
            ),
        }
    }
    if a.dry_run {
        for k in &keys {
            println!("{k}\twould refresh");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let outcomes = crate::refresh::refresh_keys(&cfg, keys.clone(), signals).await?;
    let mut failed = 0;
    for k in &keys {
        match outcomes.iter().find(|(key, _)| key == k).map(|(_, o)| o) {
            Some(refetch::RefreshOutcome::Done) => println!("{k}\trefreshed"),
            Some(
                refetch::RefreshOutcome::Failed(why) | refetch::RefreshOutcome::DeleteHeld(why),
            ) => {
                failed += 1;
                println!("{k}\tFAILED: {why}");
            }
            None => {
                failed += 1;
                println!("{k}\tnot refreshed: interrupted");
            }
        }
    }
    Ok(if signals.stopped_by().is_some() {
        ExitCode::from(crate::exit::INTERRUPTED)
    } else if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn republish(
    cfg: &Config,
    chosen: &[&DeadRecord],
    a: &DlqRedriveArgs,
) -> anyhow::Result<ExitCode> {
    let kafka = cfg.kafka_config();
    let retry_topic = cfg.kafka.retry_topic.clone();
    if a.to_retry_topic && retry_topic.is_none() {
        bail!(
            "--to-retry-topic needs `[kafka] retry_topic` (conventionally `{}.retry`), which \
             `refetch run` then subscribes to",
            cfg.kafka.group_id
        );
    }
    let producer: FutureProducer = kafka
        .producer_client_config()
        .create()
        .context("creating the producer")?;
    let mut sent = 0;
    let mut skipped = 0;
    for r in chosen {
        let target = if a.to_retry_topic {
            if r.entity().is_none() {
                println!(
                    "{}/{}  skipped: names no entity; the retry topic is decoded from \
                     refetch.entity.* headers",
                    r.partition, r.offset
                );
                skipped += 1;
                continue;
            }
            retry_topic.clone().unwrap_or_default()
        } else {
            match (r.keeps_original(), r.header(header::SOURCE_TOPIC)) {
                (true, Some(t)) => t.to_owned(),
                _ => {
                    println!(
                        "{}/{}  skipped: its payload is a dead-letter summary, not the original \
                         notification; redrive it without --to-source-topic",
                        r.partition, r.offset
                    );
                    skipped += 1;
                    continue;
                }
            }
        };
        if a.dry_run {
            println!("{}/{}  would go to `{target}`", r.partition, r.offset);
            continue;
        }
        let mut headers = OwnedHeaders::new();
        let mut kept: Vec<(String, String)> = if a.to_retry_topic {
            r.headers.clone()
        } else {
            Vec::new()
        };
        kept.push((
            "refetch.redrive.from".to_owned(),
            format!("{}/{}/{}", kafka.dead_letter_topic, r.partition, r.offset),
        ));
        for (k, v) in &kept {
            headers = headers.insert(Header {
                key: k.as_str(),
                value: Some(v.as_bytes()),
            });
        }
        let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&target).headers(headers);
        let entity_key = r.entity().map(|k| k.to_string());
        let key: Option<&[u8]> = if a.to_retry_topic {
            entity_key.as_deref().map(str::as_bytes)
        } else {
            r.raw_key.as_deref()
        };
        if let Some(k) = key {
            rec = rec.key(k);
        }
        if let Some(p) = r.raw_payload.as_deref() {
            rec = rec.payload(p);
        }
        match producer.send(rec, Duration::from_secs(30)).await {
            Ok(d) => {
                sent += 1;
                println!(
                    "{}/{}  -> {target}/{}/{}",
                    r.partition, r.offset, d.partition, d.offset
                );
            }
            Err((e, _)) => bail!("producing to `{target}` failed: {e}"),
        }
    }
    if !a.dry_run {
        println!("{sent} record(s) republished, {skipped} skipped");
    }
    Ok(ExitCode::SUCCESS)
}
