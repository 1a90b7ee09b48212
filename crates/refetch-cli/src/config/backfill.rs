//! `[backfill]` and `[reconcile]`: the full copy behind the notifications (see
//! `docs/backfill.md`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[backfill]`: how `refetch backfill` keeps its checkpoint and retries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackfillSection {
    /// The checkpoint file (the next page to load per entity type, written after the sink
    /// acknowledged a page). Default: next to the configuration file, named
    /// `<config file name>.backfill.json`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_file: Option<PathBuf>,
    /// How long one listing page keeps being retried while the source fails transiently (5xx,
    /// 429, an open breaker) before the backfill stops; the checkpoint keeps what was done.
    #[serde(with = "humantime_serde")]
    pub retry_for: Duration,
}

impl Default for BackfillSection {
    fn default() -> Self {
        BackfillSection {
            state_file: None,
            retry_for: Duration::from_secs(300),
        }
    }
}

impl BackfillSection {
    /// The checkpoint file for the configuration file at `config`.
    pub fn state_path(&self, config: &Path) -> PathBuf {
        match &self.state_file {
            Some(p) => p.clone(),
            None => {
                let name = config
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "refetch".to_owned());
                config.with_file_name(format!("{name}.backfill.json"))
            }
        }
    }
}

/// `[reconcile]`: `refetch reconcile` and the scheduled reconcile inside `refetch run`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReconcileSection {
    /// Run a reconcile inside `refetch run` this often (for example `"6h"`), after a first wait
    /// of one interval. Unset (the default): never; run `refetch reconcile` on demand instead.
    /// Each instance of a consumer group covers only the keys of the partitions it owns.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub interval: Option<Duration>,
    /// The notification topic whose partition ownership decides which keys a scheduled
    /// reconcile covers (the topic must be keyed by entity id). Default: the first `[[topics]]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// Sink rows read per page when comparing versions.
    pub page_size: usize,
    /// Drifted keys handed to the engine at once for repair.
    pub repair_batch: usize,
    /// How many keys of each drift kind the report names.
    pub sample: usize,
    /// How long a reconcile waits for the suspected orphans of one batch to settle. Their deletes
    /// go through the gone guard, which holds them while gone outcomes are abnormally frequent;
    /// those still held after this are reported (and the reconcile fails) instead of awaited.
    #[serde(with = "humantime_serde")]
    pub orphan_wait: Duration,
}

impl Default for ReconcileSection {
    fn default() -> Self {
        ReconcileSection {
            interval: None,
            topic: None,
            page_size: 1000,
            repair_batch: 256,
            sample: 10,
            orphan_wait: Duration::from_secs(60),
        }
    }
}
