//! Standard output sink: prints each change as one JSON line, for trying refetch out.
//!
//! The line format is the one of the [JSON Lines sink](crate::jsonl). The batch is acknowledged
//! once standard output has been flushed; that is not durable storage, so use this sink only
//! to watch what a pipeline would write.

use std::io::Write;
use std::time::Instant;

use async_trait::async_trait;
use refetch::{Change, Sink, SinkError, WriteReport};

use crate::jsonl::encode_line;

const SINK: &str = "stdout";

/// Prints changes on standard output.
#[derive(Debug, Default)]
pub struct StdoutSink {
    _private: (),
}

impl StdoutSink {
    /// A sink printing to this process's standard output.
    pub fn new() -> Self {
        StdoutSink::default()
    }
}

/// Render a batch as the text this sink prints: one line per change.
pub fn render(batch: &[Change]) -> String {
    let mut out = String::new();
    for change in batch {
        out.push_str(&encode_line(change));
        out.push('\n');
    }
    out
}

#[async_trait]
impl Sink for StdoutSink {
    async fn write(&self, batch: &[Change]) -> Result<WriteReport, SinkError> {
        let started = Instant::now();
        let text = render(batch);
        let result = tokio::task::spawn_blocking(move || {
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes()).and_then(|()| out.flush())
        })
        .await
        .map_err(|e| SinkError::transient(format!("stdout task failed: {e}")))
        .and_then(|r| r.map_err(|e| SinkError::transient(format!("stdout write failed: {e}"))))
        .map(|()| WriteReport::all_durable());
        crate::metrics::record_batch(SINK, batch.len(), started, &result);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use refetch::{Entity, EntityKey, Version};

    #[test]
    fn renders_one_line_per_change() {
        let text = render(&[
            Change::Upsert {
                key: EntityKey::new("order", "7"),
                entity: Entity::json(r#"{"total": 3}"#, Some(Version::Int(2))),
            },
            Change::Delete {
                key: EntityKey::new("order", "8"),
            },
        ]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let first: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(first["body"]["total"], 3);
        assert_eq!(first["op"], "upsert");
        let second: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        assert_eq!(second["op"], "delete");
        assert_eq!(second["id"], "8");
    }

    #[tokio::test]
    async fn write_acknowledges_after_printing() {
        let sink = StdoutSink::new();
        let report = sink
            .write(&[Change::Delete {
                key: EntityKey::new("order", "1"),
            }])
            .await
            .unwrap();
        assert!(report.failed.is_empty());
    }
}
