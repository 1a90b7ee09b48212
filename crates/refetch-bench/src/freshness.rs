//! Freshness: from a save to the first durable write of its entity at or above its version.
//!
//! The driver knows every save: when it changed the entity at the source (live saves) or when it
//! produced the save's first notification (backlog saves, whose record timestamp it sets). The
//! contender's processes append every acknowledged write to their durable logs
//! ([`crate::probe::DurableLog`]). A save's freshness is the time from the save to the first
//! logged write of its entity with a version at least the save's, whichever process wrote it, so
//! the figure covers rebalances and restarts. A save that no write covers by the end of the run
//! is counted as uncovered (the run was capped, or the contender lost it).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::probe::{Histogram, parse_durable_line};
use crate::workload::entity_index;

/// One save: `(entity, version, unix micros)`.
pub type Save = (u32, i64, u64);

/// What [`measure`] found.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Freshness {
    /// p50 over all saves, ms.
    pub p50_ms: Option<f64>,
    /// p99 over all saves, ms.
    pub p99_ms: Option<f64>,
    /// p50 over the saves of healthy entities (neither slow nor poisoned), ms.
    pub healthy_p50_ms: Option<f64>,
    /// p99 over the saves of healthy entities, ms.
    pub healthy_p99_ms: Option<f64>,
    /// Saves no durable write covers.
    pub uncovered: u64,
    /// Saves measured.
    pub saves: u64,
}

/// Durable writes per entity, `(unix micros, version)` in time order.
pub fn read_logs(logs: &[PathBuf]) -> HashMap<u32, Vec<(u64, i64)>> {
    let mut writes: HashMap<u32, Vec<(u64, i64)>> = HashMap::new();
    for path in logs {
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        for line in text.lines() {
            if let Some((id, v, t)) = parse_durable_line(line)
                && let Some(e) = entity_index(id)
            {
                writes.entry(e).or_default().push((t, v));
            }
        }
    }
    for w in writes.values_mut() {
        w.sort_unstable();
    }
    writes
}

/// The freshness of `saves` against the durable writes; `unhealthy` entities are left out of
/// the healthy figures.
pub fn measure(
    saves: &[Save],
    writes: &HashMap<u32, Vec<(u64, i64)>>,
    unhealthy: &HashSet<u32>,
) -> Freshness {
    // Per entity: (time, running max version), so a save finds its first covering write by a
    // binary search.
    let covering: HashMap<u32, Vec<(u64, i64)>> = writes
        .iter()
        .map(|(e, w)| {
            let mut max = i64::MIN;
            let run = w
                .iter()
                .map(|&(t, v)| {
                    max = max.max(v);
                    (t, max)
                })
                .collect();
            (*e, run)
        })
        .collect();
    let mut all = Histogram::default();
    let mut healthy = Histogram::default();
    let mut uncovered = 0;
    for &(e, v, at) in saves {
        let first = covering.get(&e).and_then(|run| {
            let i = run.partition_point(|&(_, max)| max < v);
            run.get(i).map(|&(t, _)| t)
        });
        match first {
            Some(t) => {
                let micros = t.saturating_sub(at);
                all.record(micros);
                if !unhealthy.contains(&e) {
                    healthy.record(micros);
                }
            }
            None => uncovered += 1,
        }
    }
    Freshness {
        p50_ms: all.quantile_ms(0.5),
        p99_ms: all.quantile_ms(0.99),
        healthy_p50_ms: healthy.quantile_ms(0.5),
        healthy_p99_ms: healthy.quantile_ms(0.99),
        uncovered,
        saves: saves.len() as u64,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_first_write_at_or_above_the_version_counts() {
        let writes = HashMap::from([(1, vec![(1_000, 1), (5_000, 3), (9_000, 2)]), (2, vec![])]);
        let saves = [
            (1, 1, 0),     // covered at 1 ms
            (1, 2, 2_000), // covered by v3 at 5 ms: 3 ms
            (1, 4, 0),     // never
            (2, 1, 0),     // never
            (3, 1, 0),     // unhealthy and never
        ];
        let f = measure(&saves, &writes, &HashSet::from([3]));
        assert_eq!((f.saves, f.uncovered), (5, 3));
        let p99 = f.p99_ms.unwrap();
        assert!((2.9..=3.1).contains(&p99), "{p99}");
        let p50 = f.p50_ms.unwrap();
        assert!((0.9..=1.1).contains(&p50), "{p50}");
    }

    #[test]
    fn unhealthy_entities_are_left_out_of_the_healthy_figures() {
        let writes = HashMap::from([(1, vec![(10_000, 1)]), (2, vec![(1_000_000, 1)])]);
        let saves = [(1, 1, 0), (2, 1, 0)];
        let f = measure(&saves, &writes, &HashSet::from([2]));
        assert!(f.p99_ms.unwrap() > 900.0);
        assert!(f.healthy_p99_ms.unwrap() < 11.0);
    }

    #[test]
    fn a_write_before_the_save_counts_as_zero() {
        // A backlog save whose entity was already written at a later version (the source was
        // ahead): it is fresh at once.
        let writes = HashMap::from([(1, vec![(1_000, 5)])]);
        let f = measure(&[(1, 2, 5_000)], &writes, &HashSet::new());
        assert_eq!(f.uncovered, 0);
        assert!(f.p99_ms.unwrap() < 0.01);
    }

    #[test]
    fn logs_of_several_processes_merge_in_time_order() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.log");
        let b = dir.path().join("b.log");
        std::fs::write(&a, "e1 2 3000\ne2 1 100\n").unwrap();
        std::fs::write(&b, "e1 1 2000\ngarbage\n").unwrap();
        let w = read_logs(&[a, b, dir.path().join("missing.log")]);
        assert_eq!(w[&1], vec![(2000, 1), (3000, 2)]);
        assert_eq!(w[&2], vec![(100, 1)]);
    }
}
