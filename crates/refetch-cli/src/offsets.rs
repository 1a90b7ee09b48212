//! `refetch offsets [--reset-to TIME [--execute]]`: the group's committed offsets, end offsets and
//! lag per partition, and moving the committed offsets (for a replay or to skip a backlog).
//!
//! Like `kafka-consumer-groups --reset-offsets`, `--reset-to` only prints the plan; nothing is
//! committed without `--execute`. Reading uses a client that does not join the group. Executing
//! commits with a client that assigns the partitions outside the group's membership, which the
//! broker accepts only while no member is active: stop every `refetch run` of the group first.

use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::cli::OffsetsArgs;

const TIMEOUT: Duration = Duration::from_secs(10);

/// Where to reset to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResetTo {
    /// The first offset still held.
    Earliest,
    /// The end (skip everything not yet consumed).
    Latest,
    /// The first offset at or after this time (milliseconds since the epoch).
    Time(i64),
}

/// Parse `earliest`, `latest`, an RFC 3339 timestamp or a duration ago (`2h`).
pub fn parse_reset(s: &str, now: SystemTime) -> anyhow::Result<ResetTo> {
    match s {
        "earliest" => return Ok(ResetTo::Earliest),
        "latest" => return Ok(ResetTo::Latest),
        _ => {}
    }
    if let Ok(ts) = s.parse::<jiff::Timestamp>() {
        return Ok(ResetTo::Time(ts.as_millisecond()));
    }
    if let Ok(ago) = humantime::parse_duration(s) {
        let at = now
            .checked_sub(ago)
            .context("the duration reaches before 1970")?;
        let ms = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        return Ok(ResetTo::Time(ms));
    }
    bail!(
        "`{s}` is not a reset target: expected `earliest`, `latest`, an RFC 3339 timestamp \
         (2026-01-01T00:00:00Z) or a duration ago (2h)"
    )
}

/// One row of the offsets table.
#[derive(Debug, Clone)]
pub struct Row {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Committed offset of the group, if any.
    pub committed: Option<i64>,
    /// First offset held.
    pub low: i64,
    /// End offset (high watermark).
    pub end: i64,
}

impl Row {
    /// Records not yet committed (from the start of the log without a commit).
    pub fn lag(&self) -> i64 {
        (self.end - self.committed.unwrap_or(self.low)).max(0)
    }
}

/// `refetch offsets`.
pub async fn command(a: &OffsetsArgs) -> anyhow::Result<ExitCode> {
    let cfg = match crate::config::load_for_command(&a.config.config) {
        Ok(l) => l.config,
        Err(code) => return Ok(code),
    };
    crate::logging::init("warn", cfg.log.format);
    let kafka = cfg.kafka_config();
    let reset = match &a.reset_to {
        Some(s) => Some(match parse_reset(s, SystemTime::now()) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("error: --reset-to: {e}");
                return Ok(ExitCode::from(2));
            }
        }),
        None => None,
    };
    let mut client = kafka.consumer_client_config();
    client.set("enable.auto.commit", "false");
    let topics = kafka.topics.clone();
    let execute = a.execute;
    let group = kafka.group_id.clone();
    tokio::task::spawn_blocking(move || -> anyhow::Result<ExitCode> {
        let consumer: BaseConsumer = client.create().context("creating the client")?;
        let rows = read_rows(&consumer, &topics)?;
        let Some(reset) = reset else {
            print_rows(&group, &rows);
            return Ok(ExitCode::SUCCESS);
        };
        let targets = targets(&consumer, &rows, &reset)?;
        println!("reset plan for group `{group}`:");
        println!(
            "{:<40} {:>9} {:>12} {:>12} {:>12}",
            "topic/partition", "", "committed", "new", "end"
        );
        for (row, target) in rows.iter().zip(&targets) {
            println!(
                "{:<40} {:>9} {:>12} {:>12} {:>12}",
                format!("{}/{}", row.topic, row.partition),
                "",
                row.committed
                    .map_or_else(|| "-".to_owned(), |c| c.to_string()),
                target,
                row.end
            );
        }
        if !execute {
            println!(
                "plan only: nothing committed (add --execute to commit these offsets for group \
                 `{group}`, with every `refetch run` of the group stopped)"
            );
            return Ok(ExitCode::SUCCESS);
        }
        let mut tpl = TopicPartitionList::new();
        for (row, target) in rows.iter().zip(&targets) {
            tpl.add_partition_offset(&row.topic, row.partition, Offset::Offset(*target))?;
        }
        consumer.assign(&tpl)?;
        consumer.commit(&tpl, CommitMode::Sync).with_context(|| {
            format!(
                "committing the new offsets for group `{group}` failed; the broker refuses \
                 commits from outside the group while it has active members: stop every \
                 `refetch run` of the group and try again"
            )
        })?;
        println!("committed new offsets for group `{group}`");
        Ok(ExitCode::SUCCESS)
    })
    .await
    .context("the offsets task panicked")?
}

fn read_rows(consumer: &BaseConsumer, topics: &[String]) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let mut tpl = TopicPartitionList::new();
    for topic in topics {
        let md = consumer
            .fetch_metadata(Some(topic), TIMEOUT)
            .with_context(|| format!("reading the metadata of `{topic}`"))?;
        let Some(t) = md.topics().first().filter(|t| t.error().is_none()) else {
            bail!("topic `{topic}` does not exist");
        };
        for p in t.partitions() {
            let (low, end) = consumer
                .fetch_watermarks(topic, p.id(), TIMEOUT)
                .with_context(|| format!("reading the watermarks of {topic}/{}", p.id()))?;
            tpl.add_partition(topic, p.id());
            rows.push(Row {
                topic: topic.clone(),
                partition: p.id(),
                committed: None,
                low,
                end,
            });
        }
    }
    let committed = consumer
        .committed_offsets(tpl, TIMEOUT)
        .context("reading the group's committed offsets")?;
    for e in committed.elements() {
        if let Offset::Offset(o) = e.offset() {
            if let Some(r) = rows
                .iter_mut()
                .find(|r| r.topic == e.topic() && r.partition == e.partition())
            {
                r.committed = Some(o);
            }
        }
    }
    rows.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    Ok(rows)
}

fn print_rows(group: &str, rows: &[Row]) {
    println!("group `{group}`");
    println!(
        "{:<40} {:>12} {:>12} {:>12}",
        "topic/partition", "committed", "end", "lag"
    );
    let mut total = 0;
    for r in rows {
        total += r.lag();
        println!(
            "{:<40} {:>12} {:>12} {:>12}",
            format!("{}/{}", r.topic, r.partition),
            r.committed
                .map_or_else(|| "-".to_owned(), |c| c.to_string()),
            r.end,
            r.lag()
        );
    }
    println!("{:<40} {:>12} {:>12} {:>12}", "total", "", "", total);
}

fn targets(consumer: &BaseConsumer, rows: &[Row], reset: &ResetTo) -> anyhow::Result<Vec<i64>> {
    match reset {
        ResetTo::Earliest => Ok(rows.iter().map(|r| r.low).collect()),
        ResetTo::Latest => Ok(rows.iter().map(|r| r.end).collect()),
        ResetTo::Time(ms) => {
            let mut tpl = TopicPartitionList::new();
            for r in rows {
                tpl.add_partition_offset(&r.topic, r.partition, Offset::Offset(*ms))?;
            }
            let found = consumer
                .offsets_for_times(tpl, TIMEOUT)
                .context("looking up offsets by time")?;
            Ok(rows
                .iter()
                .map(|r| {
                    let at = found
                        .find_partition(&r.topic, r.partition)
                        .map(|e| e.offset());
                    match at {
                        Some(Offset::Offset(o)) => o,
                        // No record at or after the time: the end.
                        _ => r.end,
                    }
                })
                .collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_targets_parse() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(10_000);
        assert_eq!(parse_reset("earliest", now).unwrap(), ResetTo::Earliest);
        assert_eq!(parse_reset("latest", now).unwrap(), ResetTo::Latest);
        assert_eq!(
            parse_reset("1970-01-01T00:00:01Z", now).unwrap(),
            ResetTo::Time(1000)
        );
        assert_eq!(parse_reset("1h", now).unwrap(), ResetTo::Time(6_400_000));
        let err = parse_reset("yesterday", now).unwrap_err().to_string();
        assert!(err.contains("RFC 3339"), "{err}");
    }

    #[test]
    fn lag_counts_from_the_log_start_without_a_commit() {
        let mut r = Row {
            topic: "t".into(),
            partition: 0,
            committed: None,
            low: 5,
            end: 12,
        };
        assert_eq!(r.lag(), 7);
        r.committed = Some(10);
        assert_eq!(r.lag(), 2);
    }
}
