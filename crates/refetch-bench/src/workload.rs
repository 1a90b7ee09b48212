//! The workload: which entities change, how often, and what notifications that produces.
//!
//! A workload is a sequence of *saves* (entity `e` reaches version `v + 1`). Every save publishes a
//! burst of identical notifications (one save = several events, as with an outbox that fires per
//! touched table), and a share of notifications is delivered late (moved back by up to
//! `delay_window` positions), so a hot entity's versions reach the topic out of order. Keys are
//! drawn uniformly or from a Zipf distribution (a few hot entities take most saves).
//!
//! Generation is deterministic for a seed, so every contender sees the same topic contents and the
//! same changes during its run.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// The entity type every notification names.
pub const ENTITY_TYPE: &str = "entity";

/// How keys are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum KeyDistribution {
    /// Every entity equally likely.
    Uniform,
    /// Zipf with this exponent (rank `r` has weight `1 / r^s`).
    Zipf(f64),
}

impl std::fmt::Display for KeyDistribution {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyDistribution::Uniform => write!(f, "uniform"),
            KeyDistribution::Zipf(s) => write!(f, "zipf(s={s})"),
        }
    }
}

impl std::str::FromStr for KeyDistribution {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "uniform" {
            return Ok(KeyDistribution::Uniform);
        }
        if let Some(exp) = s.strip_prefix("zipf:") {
            return exp
                .parse::<f64>()
                .map(KeyDistribution::Zipf)
                .map_err(|e| format!("zipf exponent {exp:?}: {e}"));
        }
        if s == "zipf" {
            return Ok(KeyDistribution::Zipf(1.0));
        }
        Err(format!("expected `uniform`, `zipf` or `zipf:S`, got {s:?}"))
    }
}

/// What to generate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadSpec {
    /// A short name for tables and file names.
    pub name: String,
    /// Notifications in the backlog produced before a contender starts.
    pub notifications: usize,
    /// Distinct entities.
    pub entities: usize,
    /// How keys are drawn.
    pub distribution: KeyDistribution,
    /// Notifications per save (burst duplicates).
    pub burst: usize,
    /// Share of notifications delivered late (0.0 to 1.0).
    pub late_share: f64,
    /// How many positions a late notification moves back, at most.
    pub delay_window: usize,
    /// Saves made at the source while a contender runs (each followed by its burst).
    pub live_saves: usize,
    /// Rate of those saves per second.
    pub live_rate: f64,
    /// Fixed latency of every source answer, milliseconds.
    pub source_latency_ms: u64,
    /// `jsonl` (append + fsync per batch) or `null` (discard).
    pub sink: String,
    /// Random seed.
    pub seed: u64,
    /// Measure peak RSS without the latency probe (the table then shows no latency).
    #[serde(default)]
    pub no_latency: bool,
}

/// A generated backlog.
#[derive(Debug, Clone)]
pub struct Workload {
    /// `(entity index, version)` per notification, in topic order.
    pub notifications: Vec<(u32, i64)>,
    /// The version every touched entity has after the backlog.
    pub final_versions: HashMap<u32, i64>,
    /// Saves in the backlog (= distinct (entity, version) pairs notified).
    pub saves: usize,
}

/// Draws entity indexes.
#[derive(Debug, Clone)]
pub struct KeySampler {
    cdf: Option<Vec<f64>>,
    entities: usize,
}

impl KeySampler {
    /// A sampler over `entities` entities.
    pub fn new(distribution: KeyDistribution, entities: usize) -> Self {
        let entities = entities.max(1);
        let cdf = match distribution {
            KeyDistribution::Uniform => None,
            KeyDistribution::Zipf(s) => {
                let mut acc = 0.0;
                let mut cdf = Vec::with_capacity(entities);
                for r in 1..=entities {
                    acc += 1.0 / (r as f64).powf(s);
                    cdf.push(acc);
                }
                for c in &mut cdf {
                    *c /= acc;
                }
                Some(cdf)
            }
        };
        KeySampler { cdf, entities }
    }

    /// One entity index.
    pub fn sample(&self, rng: &mut impl Rng) -> u32 {
        match &self.cdf {
            None => rng.random_range(0..self.entities) as u32,
            Some(cdf) => {
                let u: f64 = rng.random();
                let i = cdf.partition_point(|&c| c < u);
                i.min(self.entities - 1) as u32
            }
        }
    }
}

/// The id of entity `index`.
pub fn entity_id(index: u32) -> String {
    format!("e{index}")
}

/// The notification payload for `(id, version)`.
pub fn payload(id: &str, version: i64) -> Vec<u8> {
    format!("{{\"id\":\"{id}\",\"version\":{version}}}").into_bytes()
}

/// Parse a payload made by [`payload`] (the hand-rolled loop's decoder).
pub fn parse_payload(bytes: &[u8]) -> Option<(String, i64)> {
    #[derive(Deserialize)]
    struct P {
        id: String,
        version: i64,
    }
    serde_json::from_slice::<P>(bytes)
        .ok()
        .map(|p| (p.id, p.version))
}

impl WorkloadSpec {
    /// Generate the backlog.
    pub fn generate(&self) -> Workload {
        let mut rng = StdRng::seed_from_u64(self.seed);
        let sampler = KeySampler::new(self.distribution, self.entities);
        let burst = self.burst.max(1);
        let mut versions: HashMap<u32, i64> = HashMap::new();
        // (sort position, entity, version)
        let mut out: Vec<(u64, u32, i64)> = Vec::with_capacity(self.notifications + burst);
        let mut saves = 0usize;
        let mut pos = 0u64;
        while out.len() < self.notifications {
            let e = sampler.sample(&mut rng);
            let v = versions.entry(e).or_insert(0);
            *v += 1;
            saves += 1;
            for _ in 0..burst.min(self.notifications - out.len()) {
                let late =
                    self.delay_window > 0 && rng.random_bool(self.late_share.clamp(0.0, 1.0));
                let shift = if late {
                    rng.random_range(1..=self.delay_window as u64)
                } else {
                    0
                };
                out.push((pos * 2 + shift * 2 + u64::from(late), e, *v));
                pos += 1;
            }
        }
        out.sort_by_key(|&(p, _, _)| p);
        Workload {
            notifications: out.into_iter().map(|(_, e, v)| (e, v)).collect(),
            final_versions: versions,
            saves,
        }
    }

    /// The live saves made while a contender runs: `(entity index)` in order (the versions follow
    /// from the source's state at that moment).
    pub fn live_keys(&self) -> Vec<u32> {
        let mut rng = StdRng::seed_from_u64(self.seed ^ 0x9e37_79b9_7f4a_7c15);
        let sampler = KeySampler::new(self.distribution, self.entities);
        (0..self.live_saves)
            .map(|_| sampler.sample(&mut rng))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn spec() -> WorkloadSpec {
        WorkloadSpec {
            name: "t".into(),
            notifications: 10_000,
            entities: 500,
            distribution: KeyDistribution::Zipf(1.0),
            burst: 4,
            late_share: 0.1,
            delay_window: 200,
            live_saves: 10,
            live_rate: 100.0,
            source_latency_ms: 0,
            sink: "null".into(),
            seed: 7,
            no_latency: false,
        }
    }

    #[test]
    fn bursts_versions_and_late_delivery() {
        let w = spec().generate();
        assert_eq!(w.notifications.len(), 10_000);
        assert_eq!(w.saves, 2_500);
        // Each entity's highest notified version is its final version.
        let mut max: HashMap<u32, i64> = HashMap::new();
        let mut out_of_order = 0;
        for &(e, v) in &w.notifications {
            let m = max.entry(e).or_insert(0);
            if v < *m {
                out_of_order += 1;
            }
            *m = (*m).max(v);
        }
        assert_eq!(max, w.final_versions);
        assert!(
            out_of_order > 0,
            "late notifications reorder a hot key's versions"
        );
        // Zipf: the hottest entity takes far more than a uniform share.
        let hottest = w.final_versions.values().max().copied().unwrap();
        assert!(
            hottest > 10 * (2_500 / 500) as i64,
            "hottest entity has {hottest} saves"
        );
    }

    #[test]
    fn deterministic_for_a_seed() {
        assert_eq!(
            spec().generate().notifications,
            spec().generate().notifications
        );
        assert_eq!(spec().live_keys(), spec().live_keys());
    }

    #[test]
    fn payload_round_trip_and_distribution_parse() {
        assert_eq!(parse_payload(&payload("e5", 3)), Some(("e5".into(), 3)));
        assert_eq!(
            "zipf:0.9".parse::<KeyDistribution>(),
            Ok(KeyDistribution::Zipf(0.9))
        );
        assert!("pareto".parse::<KeyDistribution>().is_err());
    }
}
