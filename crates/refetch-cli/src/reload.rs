//! SIGHUP: re-read the configuration file and apply what changed.
//!
//! The new file is loaded and checked exactly like at start-up. An invalid file changes nothing:
//! the problems are logged (with their lines) and counted, and the pipeline keeps running. A valid
//! file is compared with the running configuration key by key ([`diff`]), and every changed key
//! is classified ([`classify`]):
//! - [`Apply::Live`]: applied to the running process without stopping anything;
//! - [`Apply::Rebuild`]: the pipeline drains, commits and is rebuilt with the new file in the same
//!   process (the consumer leaves the group after its final commit and the new one resumes from
//!   the committed offsets, so no notification is lost);
//! - [`Apply::NotUsed`]: a key `run` does not read (`[validate]`, `[backfill]`): nothing to do;
//! - [`Apply::ProcessRestart`]: a key that only a new process can apply (`log.format`): logged.
//!
//! Live: the log level, the engine's window, max-wait, fetch concurrency, caps, commit interval
//! and sink batching (`PipelineHandle::reconfigure`), and the HTTP fetcher's rate limits,
//! concurrency and breakers (`HttpFetcher::reconfigure`; a fetcher change it refuses takes the
//! rebuild path after all). See [`LIVE`].
//!
//! Every reload is counted in `refetch_config_reloads_total{result}`: `applied`, `unchanged`,
//! `invalid` (the file was refused) or `failed` (valid, but the new pipeline could not be built;
//! the old one keeps running).

use std::fmt;

use serde_json::Value;

use crate::config::Config;

/// The metric counting reloads by result.
pub const RELOADS_METRIC: &str = "refetch_config_reloads_total";

/// The results a reload is counted under.
pub const RESULTS: [&str; 4] = ["applied", "unchanged", "invalid", "failed"];

/// Describe the reload counter and register every result at zero (after the recorder is
/// installed), so dashboards see the series before the first reload.
pub fn register_metrics() {
    metrics::describe_counter!(
        RELOADS_METRIC,
        metrics::Unit::Count,
        "Configuration reloads (SIGHUP) by result: applied (live or by rebuilding the pipeline), \
         unchanged, invalid (the file was refused; the pipeline keeps running) or failed (the new \
         pipeline could not be built; the old one keeps running)."
    );
    for result in RESULTS {
        metrics::counter!(RELOADS_METRIC, "result" => result).absolute(0);
    }
}

/// Count one reload.
pub fn count(result: &'static str) {
    metrics::counter!(RELOADS_METRIC, "result" => result).increment(1);
}

/// How a changed key is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Apply {
    /// At once, in the running pipeline.
    Live,
    /// By draining, committing and rebuilding the pipeline in this process.
    Rebuild,
    /// Not read by `run`.
    NotUsed,
    /// Only a new process applies it.
    ProcessRestart,
}

/// Keys applied live (`PipelineHandle::reconfigure`, `HttpFetcher::reconfigure`, the log
/// filter). `*` stands for one key of any name.
pub const LIVE: &[&str] = &[
    "log.level",
    "engine.window",
    "engine.max_wait",
    "engine.fetch_concurrency",
    "engine.sink_batch_max",
    "engine.sink_linger",
    "engine.max_pending_keys",
    "engine.max_pending_bytes",
    "engine.max_outstanding_per_partition",
    "engine.resume_ratio",
    "engine.commit_interval",
    "fetcher.sources.*.rate_limit",
    "fetcher.sources.*.burst",
    "fetcher.sources.*.concurrency",
    "fetcher.sources.*.breaker",
];

/// Keys (and tables) `run` does not read.
const NOT_USED: &[&str] = &["validate", "backfill"];

/// Keys only a new process applies.
const PROCESS_RESTART: &[&str] = &["log.format"];

/// One changed key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The key path (`engine.window`, `topics[1]`).
    pub path: String,
    /// How it is applied.
    pub apply: Apply,
}

/// Every changed key between two configurations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diff {
    /// The changes, in key order.
    pub changes: Vec<Change>,
}

impl Diff {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// The paths changed with `apply`.
    pub fn paths(&self, apply: Apply) -> Vec<&str> {
        self.changes
            .iter()
            .filter(|c| c.apply == apply)
            .map(|c| c.path.as_str())
            .collect()
    }

    /// Does any change need the pipeline rebuilt?
    pub fn needs_rebuild(&self) -> bool {
        self.changes.iter().any(|c| c.apply == Apply::Rebuild)
    }
}

impl fmt::Display for Diff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .changes
            .iter()
            .map(|c| format!("{} ({:?})", c.path, c.apply))
            .collect();
        f.write_str(&parts.join(", "))
    }
}

/// Does `path` match `pattern` (or lie under it)? `*` matches one key.
fn matches(pattern: &str, path: &str) -> bool {
    let p: Vec<&str> = pattern.split('.').collect();
    let k: Vec<&str> = path.split('.').collect();
    k.len() >= p.len()
        && p.iter().zip(&k).all(|(p, k)| {
            *p == "*" || p == k || (k.starts_with(p) && k.as_bytes().get(p.len()) == Some(&b'['))
        })
}

/// How a change of `path` is applied.
pub fn classify(path: &str) -> Apply {
    if LIVE.iter().any(|p| matches(p, path)) {
        Apply::Live
    } else if NOT_USED.iter().any(|p| matches(p, path)) {
        Apply::NotUsed
    } else if PROCESS_RESTART.iter().any(|p| matches(p, path)) {
        Apply::ProcessRestart
    } else {
        Apply::Rebuild
    }
}

/// Compare two configurations key by key. Secrets are compared but never named by value.
pub fn diff(old: &Config, new: &Config) -> Diff {
    let (Ok(a), Ok(b)) = (serde_json::to_value(old), serde_json::to_value(new)) else {
        // Cannot happen for plain data; rebuild to be safe.
        return Diff {
            changes: vec![Change {
                path: "(configuration)".to_owned(),
                apply: Apply::Rebuild,
            }],
        };
    };
    let mut paths = Vec::new();
    walk(&a, &b, String::new(), &mut paths);
    Diff {
        changes: paths
            .into_iter()
            .map(|path| Change {
                apply: classify(&path),
                path,
            })
            .collect(),
    }
}

fn walk(a: &Value, b: &Value, path: String, out: &mut Vec<String>) {
    let child = |k: &str| {
        if path.is_empty() {
            k.to_owned()
        } else {
            format!("{path}.{k}")
        }
    };
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                match (x.get(k), y.get(k)) {
                    (Some(va), Some(vb)) => walk(va, vb, child(k), out),
                    _ => out.push(child(k)),
                }
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (va, vb)) in x.iter().zip(y).enumerate() {
                walk(va, vb, format!("{path}[{i}]"), out);
            }
        }
        _ if a != b => out.push(path),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        crate::config::load_str(text, std::path::Path::new("t.toml"), &|_| None)
            .unwrap_or_else(|e| panic!("{e}"))
            .config
    }

    const BASE: &str = r#"
[kafka]
brokers = "127.0.0.1:9092"
group_id = "g"
[[topics]]
name = "a"
decoder = { kind = "json", fixed_type = "customer" }
[fetcher.sources.customer]
url = "http://127.0.0.1:1/c/{id}"
rate_limit = 10.0
[sink]
kind = "jsonl"
path = "out.jsonl"
[log]
level = "info"
"#;

    #[test]
    fn changes_are_classified_by_how_they_can_be_applied() {
        let old = config(BASE);
        assert!(diff(&old, &old).is_empty());
        let new = config(
            &(BASE
                .replace("level = \"info\"", "level = \"debug\"\nformat = \"json\"")
                .replace("rate_limit = 10.0", "rate_limit = 20.0")
                .replace("group_id = \"g\"", "group_id = \"h\"")
                + "[validate]\nhealth_urls = { customer = \"http://127.0.0.1:1/h\" }\n[engine]\nwindow = \"1s\"\nmax_wait = \"3s\"\n"),
        );
        let d = diff(&old, &new);
        assert_eq!(d.paths(Apply::Live), ["log.level"]);
        assert_eq!(d.paths(Apply::ProcessRestart), ["log.format"]);
        assert_eq!(d.paths(Apply::NotUsed), ["validate.health_urls.customer"]);
        let rebuild = d.paths(Apply::Rebuild);
        for p in [
            "engine.window",
            "engine.max_wait",
            "fetcher.sources.customer.rate_limit",
            "kafka.group_id",
        ] {
            assert!(rebuild.contains(&p), "{p} in {rebuild:?}");
        }
        assert!(d.needs_rebuild());
        // A second topic is one change of the topic list.
        let more = config(&BASE.replace(
            "[fetcher.sources.customer]",
            "[[topics]]\nname = \"b\"\ndecoder = { kind = \"record_key\", entity_type = \"customer\" }\n[fetcher.sources.customer]",
        ));
        assert_eq!(diff(&old, &more).paths(Apply::Rebuild), ["topics"]);
        // A live-only change does not rebuild.
        let live = config(&BASE.replace("level = \"info\"", "level = \"warn\""));
        assert!(!diff(&old, &live).needs_rebuild());
    }

    #[test]
    fn patterns_match_keys_and_what_lies_under_them() {
        assert!(matches(
            "fetcher.sources.*.rate_limit",
            "fetcher.sources.order.rate_limit"
        ));
        assert!(!matches(
            "fetcher.sources.*.rate_limit",
            "fetcher.sources.order.burst"
        ));
        assert!(matches("validate", "validate.health_urls.customer"));
        assert!(matches("topics", "topics[2].name"));
        assert!(!matches("log.level", "log.format"));
        for p in LIVE {
            assert_eq!(
                classify(p.replace('*', "customer").as_str()),
                Apply::Live,
                "{p}"
            );
        }
        assert_eq!(classify("engine.sink_concurrency"), Apply::Rebuild);
        assert_eq!(classify("fetcher.sources.customer.url"), Apply::Rebuild);
    }
}
