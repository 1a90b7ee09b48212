//! JSON Lines sink: append one JSON object per change to a file, `fsync` before acknowledging.
//!
//! The simplest durable sink: an append-only change log. Each line is
//!
//! ```json
//! {"type":"customer","id":"42","op":"upsert","version":7,"version_kind":"int","content_type":"application/json","body":{"name":"Ada"}}
//! {"type":"customer","id":"43","op":"delete"}
//! ```
//!
//! A JSON body is embedded as JSON (with insignificant whitespace removed, so a pretty-printed
//! body stays on one line; member order and number spelling are kept); any other body is stored
//! as `"body_base64"`. A batch is written with one `write` and acknowledged after `sync_data`
//! returns, so an acknowledged batch survives a crash or power loss. A crash in the middle of a
//! write can leave a partial last line: it was never acknowledged, and [`JsonlSink::open`] cuts it
//! off before appending. A failed write is rolled back the same way (the file is truncated to its
//! length before the batch).
//!
//! The log is not version-guarded: lines are in the order the engine wrote them, which per key is
//! flight order. [`read_latest`] folds a file into the latest state per key.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use refetch::{Change, EntityKey, Sink, SinkError, Version, WriteReport};
use serde::Deserialize;

use crate::body::{base64_decode, base64_encode, json_text, version_from_parts, version_parts};
use crate::config::JsonlConfig;
use crate::factory::SinkBuildError;

const SINK: &str = "jsonl";

/// Appends changes to a JSON Lines file, durably.
#[derive(Debug)]
pub struct JsonlSink {
    path: PathBuf,
    file: Arc<Mutex<File>>,
    max_batch: usize,
}

impl JsonlSink {
    /// Open (or create) the file, cut off a partial last line left by a crash, and append from
    /// there.
    pub async fn open(cfg: &JsonlConfig) -> Result<Self, SinkBuildError> {
        let path = cfg.path.clone();
        let file = tokio::task::spawn_blocking({
            let path = path.clone();
            move || open_for_append(&path)
        })
        .await
        .map_err(|e| SinkBuildError::unavailable(SINK, format!("open task failed: {e}")))?
        .map_err(|e| {
            SinkBuildError::unavailable(SINK, format!("cannot open {}: {e}", path.display()))
        })?;
        Ok(JsonlSink {
            path,
            file: Arc::new(Mutex::new(file)),
            max_batch: cfg.max_batch.max(1),
        })
    }

    /// The file this sink appends to.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn open_for_append(path: &Path) -> std::io::Result<File> {
    let existed = path.exists();
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    if !existed {
        // Make the new directory entry durable too.
        sync_parent_dir(path)?;
    }
    let len = file.metadata()?.len();
    let keep = complete_prefix_len(&mut file, len)?;
    if keep < len {
        tracing::warn!(
            path = %path.display(),
            dropped_bytes = len - keep,
            "cutting off a partial last line left by an interrupted write (it was never acknowledged)"
        );
        file.set_len(keep)?;
        file.sync_data()?;
    }
    file.seek(SeekFrom::Start(keep))?;
    Ok(file)
}

/// The length of the file up to and including its last newline.
fn complete_prefix_len(file: &mut File, len: u64) -> std::io::Result<u64> {
    let mut end = len;
    let mut buf = vec![0u8; 8192];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let n = (end - start) as usize;
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut buf[..n])?;
        if let Some(pos) = buf[..n].iter().rposition(|&b| b == b'\n') {
            return Ok(start + pos as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

fn sync_parent_dir(path: &Path) -> std::io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

/// Append `data` and `fsync`; on failure, cut the file back to where it was.
fn append_durably(file: &mut File, data: &[u8]) -> std::io::Result<()> {
    let start = file.seek(SeekFrom::End(0))?;
    let result = file.write_all(data).and_then(|()| file.sync_data());
    if let Err(e) = result {
        let _ = file.set_len(start);
        let _ = file.seek(SeekFrom::Start(start));
        let _ = file.sync_data();
        return Err(e);
    }
    Ok(())
}

#[async_trait]
impl Sink for JsonlSink {
    async fn write(&self, batch: &[Change]) -> Result<WriteReport, SinkError> {
        let started = Instant::now();
        let mut data = Vec::with_capacity(batch.len() * 128);
        for change in batch {
            data.extend_from_slice(encode_line(change).as_bytes());
            data.push(b'\n');
        }
        let file = Arc::clone(&self.file);
        let result = tokio::task::spawn_blocking(move || {
            let mut file = file
                .lock()
                .map_err(|_| SinkError::transient("jsonl file lock poisoned"))?;
            append_durably(&mut file, &data)
                .map_err(|e| SinkError::transient(format!("append failed: {e}")))
        })
        .await
        .map_err(|e| SinkError::transient(format!("write task failed: {e}")))
        .and_then(|r| r)
        .map(|()| WriteReport::all_durable());
        if let Err(e) = &result {
            tracing::warn!(sink = SINK, path = %self.path.display(), error = %e, "batch not written");
        }
        crate::metrics::record_batch(SINK, batch.len(), started, &result);
        result
    }

    fn max_batch(&self) -> usize {
        self.max_batch
    }
}

/// Encode one change as a JSON object on one line (without the newline).
pub fn encode_line(change: &Change) -> String {
    let key = change.key();
    let mut out = String::with_capacity(128);
    out.push_str("{\"type\":");
    push_json_string(&mut out, key.entity_type());
    out.push_str(",\"id\":");
    push_json_string(&mut out, key.id());
    match change {
        Change::Delete { .. } => out.push_str(",\"op\":\"delete\""),
        Change::Upsert { entity, .. } => {
            out.push_str(",\"op\":\"upsert\"");
            let (version, kind) = version_parts(entity.version);
            if let (Some(v), Some(k)) = (version, kind) {
                out.push_str(&format!(",\"version\":{v},\"version_kind\":\"{k}\""));
            }
            if let Some(ct) = &entity.content_type {
                out.push_str(",\"content_type\":");
                push_json_string(&mut out, ct);
            }
            match json_text(entity) {
                Some(json) => {
                    out.push_str(",\"body\":");
                    compact_json_into(&mut out, json);
                }
                None => {
                    out.push_str(",\"body_base64\":\"");
                    out.push_str(&base64_encode(&entity.body));
                    out.push('"');
                }
            }
        }
    }
    out.push('}');
    out
}

fn push_json_string(out: &mut String, s: &str) {
    // Serializing a &str cannot fail.
    out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned()));
}

/// Copy valid JSON text, dropping whitespace outside strings (the only place a newline can be).
fn compact_json_into(out: &mut String, json: &str) {
    let mut in_string = false;
    let mut escaped = false;
    for c in json.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !matches!(c, ' ' | '\t' | '\n' | '\r') {
            out.push(c);
        }
    }
}

/// The latest state of one key in a JSON Lines file.
#[derive(Debug, Clone, PartialEq)]
pub struct JsonlEntry {
    /// The version of the last upsert, if it had one.
    pub version: Option<Version>,
    /// The content type of the last upsert.
    pub content_type: Option<String>,
    /// The body of the last upsert.
    pub body: JsonlBody,
}

/// A body as stored in a JSON Lines file.
#[derive(Debug, Clone, PartialEq)]
pub enum JsonlBody {
    /// A JSON body, parsed.
    Json(serde_json::Value),
    /// Any other body, decoded from base64.
    Raw(Vec<u8>),
}

#[derive(Deserialize)]
struct LineIn {
    #[serde(rename = "type")]
    entity_type: String,
    id: String,
    op: String,
    version: Option<i64>,
    version_kind: Option<String>,
    content_type: Option<String>,
    body: Option<serde_json::Value>,
    body_base64: Option<String>,
}

/// Why a JSON Lines file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum JsonlReadError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A complete line is not a change record.
    #[error("{path}:{line}: {message}")]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// Fold a JSON Lines file into the latest state per key: an upsert replaces the key's entry, a
/// delete removes it. A partial last line (an interrupted, never acknowledged write) is ignored.
pub fn read_latest(path: &Path) -> Result<BTreeMap<EntityKey, JsonlEntry>, JsonlReadError> {
    let io = |source| JsonlReadError::Io {
        path: path.to_owned(),
        source,
    };
    let mut reader = BufReader::new(File::open(path).map_err(io)?);
    let mut state = BTreeMap::new();
    let mut line = String::new();
    let mut n = 0;
    loop {
        line.clear();
        let read = reader.read_line(&mut line).map_err(io)?;
        if read == 0 || !line.ends_with('\n') {
            break;
        }
        n += 1;
        let bad = |message: String| JsonlReadError::Line {
            path: path.to_owned(),
            line: n,
            message,
        };
        let rec: LineIn = serde_json::from_str(line.trim_end()).map_err(|e| bad(e.to_string()))?;
        let key = EntityKey::new(rec.entity_type.as_str(), rec.id.as_str());
        match rec.op.as_str() {
            "delete" => {
                state.remove(&key);
            }
            "upsert" => {
                let body = match (rec.body, rec.body_base64) {
                    (Some(v), _) => JsonlBody::Json(v),
                    (None, Some(b)) => JsonlBody::Raw(
                        base64_decode(&b).ok_or_else(|| bad("invalid body_base64".into()))?,
                    ),
                    (None, None) => return Err(bad("upsert without a body".into())),
                };
                state.insert(
                    key,
                    JsonlEntry {
                        version: version_from_parts(rec.version, rec.version_kind.as_deref()),
                        content_type: rec.content_type,
                        body,
                    },
                );
            }
            other => return Err(bad(format!("unknown op {other:?}"))),
        }
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use refetch::Entity;

    fn upsert(id: &str, body: &str, v: i64) -> Change {
        Change::Upsert {
            key: EntityKey::new("customer", id),
            entity: Entity::json(body.to_owned(), Some(Version::Int(v))),
        }
    }

    #[test]
    fn lines_embed_json_compactly_and_other_bodies_as_base64() {
        let line = encode_line(&upsert(
            "4\n2",
            "{\n  \"a\": \"x y\\\"\\n\",\n  \"n\": 1.50\n}",
            3,
        ));
        assert!(!line.contains('\n'), "{line}");
        assert_eq!(
            line,
            r#"{"type":"customer","id":"4\n2","op":"upsert","version":3,"version_kind":"int","content_type":"application/json","body":{"a":"x y\"\n","n":1.50}}"#
        );
        let raw = Change::Upsert {
            key: EntityKey::new("blob", "1"),
            entity: Entity {
                body: Bytes::from_static(&[0, 159, 146, 150]),
                content_type: Some("application/octet-stream".into()),
                version: Some(Version::Timestamp(5)),
                validators: None,
            },
        };
        let line = encode_line(&raw);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["body_base64"], "AJ+Slg==");
        assert_eq!(v["version_kind"], "timestamp");
        let del = encode_line(&Change::Delete {
            key: EntityKey::new("customer", "9"),
        });
        assert_eq!(del, r#"{"type":"customer","id":"9","op":"delete"}"#);
    }

    #[tokio::test]
    async fn appends_and_folds_to_latest_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let sink = JsonlSink::open(&JsonlConfig {
            path: path.clone(),
            ..JsonlConfig::default()
        })
        .await
        .unwrap();
        sink.write(&[upsert("1", r#"{"v":1}"#, 1), upsert("2", r#"{"v":1}"#, 1)])
            .await
            .unwrap();
        sink.write(&[
            upsert("1", r#"{"v":2}"#, 2),
            Change::Delete {
                key: EntityKey::new("customer", "2"),
            },
        ])
        .await
        .unwrap();
        let state = read_latest(&path).unwrap();
        assert_eq!(state.len(), 1);
        let e = &state[&EntityKey::new("customer", "1")];
        assert_eq!(e.version, Some(Version::Int(2)));
        assert_eq!(e.body, JsonlBody::Json(serde_json::json!({"v": 2})));
    }

    #[tokio::test]
    async fn a_partial_last_line_is_cut_off_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let good = encode_line(&upsert("1", "{}", 1));
        std::fs::write(&path, format!("{good}\n{{\"type\":\"cust")).unwrap();
        // The reader ignores the partial line too.
        assert_eq!(read_latest(&path).unwrap().len(), 1);
        let sink = JsonlSink::open(&JsonlConfig {
            path: path.clone(),
            ..JsonlConfig::default()
        })
        .await
        .unwrap();
        sink.write(&[upsert("2", "{}", 1)]).await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert_eq!(read_latest(&path).unwrap().len(), 2);
    }

    /// Kill -9 right after an acknowledgement: the acknowledged lines are in the file. The test
    /// runs itself as the child process (see `crash_test`).
    #[test]
    fn acknowledged_lines_survive_sigkill() {
        const ENV: &str = "REFETCH_SINKS_CRASH_JSONL";
        const NAME: &str = "jsonl::tests::acknowledged_lines_survive_sigkill";
        if let Some(path) = crate::crash_test::child_target(ENV) {
            crate::crash_test::act_as_child(async move {
                let sink = JsonlSink::open(&JsonlConfig {
                    path,
                    ..JsonlConfig::default()
                })
                .await
                .unwrap();
                let batch: Vec<Change> = (0..50)
                    .map(|i| upsert(&i.to_string(), r#"{"x":true}"#, 1))
                    .collect();
                sink.write(&batch).await.unwrap();
            });
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("crash.jsonl");
        crate::crash_test::run_child_until_acked(NAME, ENV, &path);
        let state = read_latest(&path).unwrap();
        assert_eq!(state.len(), 50);
        assert!(
            state
                .values()
                .all(|e| e.body == JsonlBody::Json(serde_json::json!({"x": true})))
        );
    }
}
