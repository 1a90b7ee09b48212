//! The workload: which entities change, how often, what notifications that produces, how the
//! source answers and how the contender's instances come and go.
//!
//! A workload has two parts:
//!
//! - a **backlog**, produced before a contender starts: a sequence of *saves* (entity `e` reaches
//!   version `v + 1`), each publishing a burst of identical notifications, with a share delivered
//!   late (moved back by up to `delay_window` positions, so a hot entity's versions reach the
//!   topic out of order);
//! - a **live stream**, made while the contender runs: saves at a steady rate, each changing the
//!   entity at the source first and then emitting a number of events spread over a time span (the
//!   "one save, several events" of an outbox that fires per touched table).
//!
//! Keys are drawn uniformly or from a Zipf distribution (rank `r` is entity `e{r}`, so `e0` is the
//! hottest). Generation is deterministic for a seed, so every contender sees the same topic
//! contents, the same live changes and the same faults.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::seq::index::sample;
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
            KeyDistribution::Zipf(s) => write!(f, "Zipf s={s}"),
        }
    }
}

/// The live stream made while a contender runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveSpec {
    /// Saves made at the source.
    pub saves: usize,
    /// Saves per second.
    pub rate: f64,
    /// How the saved entities are drawn.
    pub distribution: KeyDistribution,
    /// Fewest events one save emits.
    pub events_min: usize,
    /// Most events one save emits.
    pub events_max: usize,
    /// A save's events are spread over a span drawn uniformly from `0..=spread_ms` (the first
    /// event is sent at the save, the others at uniform offsets inside the span).
    pub spread_ms: u64,
    /// Whether the events carry the saved version. Unversioned events name only the entity (an
    /// outbox row per touched table), so nothing but timing can tell them apart.
    pub versioned: bool,
}

impl LiveSpec {
    /// No live stream.
    pub fn none() -> Self {
        LiveSpec {
            saves: 0,
            rate: 1.0,
            distribution: KeyDistribution::Uniform,
            events_min: 1,
            events_max: 1,
            spread_ms: 0,
            versioned: true,
        }
    }

    /// How long the live stream lasts.
    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.saves as f64 / self.rate.max(0.001))
    }
}

/// How the source answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceSpec {
    /// Latency of every answer, ms.
    pub latency_ms: u64,
    /// Share of entities whose every fetch is slow (the slow tail).
    pub slow_key_share: f64,
    /// A slow entity's latency, drawn per entity from this range (ms).
    pub slow_ms: (u64, u64),
    /// The hottest entities (`e0`, `e1`, ...) that answer `500` for a while.
    pub poison_hottest: usize,
    /// When they start failing, ms after the contender's first record.
    pub poison_after_ms: u64,
    /// For how long they fail, ms.
    pub poison_for_ms: u64,
    /// Requests served at once; more wait for a slot (0: no limit). A source with a fixed pool of
    /// workers, so the source is the limit of the whole system.
    pub capacity: usize,
}

impl SourceSpec {
    /// A source with this fixed latency and no faults.
    pub fn latency(ms: u64) -> Self {
        SourceSpec {
            latency_ms: ms,
            slow_key_share: 0.0,
            slow_ms: (0, 0),
            poison_hottest: 0,
            poison_after_ms: 0,
            poison_for_ms: 0,
            capacity: 0,
        }
    }
}

/// How the contender's instances (processes of one consumer group) come and go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceSpec {
    /// Instances started together at the beginning.
    pub initial: usize,
    /// A further instance joins this long after the first record (ms).
    pub join_at_ms: Option<u64>,
    /// ... and leaves (a graceful stop) at this time (ms).
    pub leave_at_ms: Option<u64>,
    /// Every this many ms one instance is killed with SIGKILL and restarted at once.
    pub kill_every_ms: Option<u64>,
    /// Static group membership (`group.instance.id` per instance slot, reused by a restarted
    /// instance): a restart takes its partitions back at once instead of waiting for the killed
    /// member's session to time out (45 s). Used where instances restart, not where they leave
    /// (a static member that leaves keeps its partitions until its session times out).
    #[serde(default)]
    pub static_membership: bool,
}

impl InstanceSpec {
    /// One instance, nothing happens to it.
    pub fn one() -> Self {
        InstanceSpec {
            initial: 1,
            join_at_ms: None,
            leave_at_ms: None,
            kill_every_ms: None,
            static_membership: false,
        }
    }
}

/// What to generate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadSpec {
    /// A short name for tables and file names.
    pub name: String,
    /// What the workload shows, one sentence.
    pub purpose: String,
    /// Notifications in the backlog produced before a contender starts.
    pub notifications: usize,
    /// Distinct entities.
    pub entities: usize,
    /// How backlog keys are drawn.
    pub distribution: KeyDistribution,
    /// Notifications per backlog save (burst duplicates).
    pub burst: usize,
    /// Share of backlog notifications delivered late (0.0 to 1.0).
    pub late_share: f64,
    /// How many positions a late notification moves back, at most.
    pub delay_window: usize,
    /// The live stream.
    pub live: LiveSpec,
    /// The source.
    pub source: SourceSpec,
    /// `jsonl` (append + fsync per batch) or `null` (discard).
    pub sink: String,
    /// The contender's instances.
    pub instances: InstanceSpec,
    /// Fetches in flight per instance for every contender (default: each contender's own, 64).
    pub fetch_slots: Option<usize>,
    /// Random seed.
    pub seed: u64,
    /// Measure no receipt latency (keeps the in-process probe's per-notification memory out of
    /// peak RSS).
    pub no_latency: bool,
}

/// A generated backlog.
#[derive(Debug, Clone)]
pub struct Workload {
    /// `(entity index, version, save index)` per notification, in topic order.
    pub notifications: Vec<(u32, i64, u32)>,
    /// The version every touched entity has after the backlog.
    pub final_versions: HashMap<u32, i64>,
    /// `(entity, version)` per backlog save.
    pub saves: Vec<(u32, i64)>,
}

/// One step of the live stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveItem {
    /// When, from the start of the stream.
    pub at: Duration,
    /// Which entity.
    pub entity: u32,
    /// The live save it belongs to.
    pub save: u32,
    /// `true`: change the entity at the source; `false`: publish one event of that save.
    pub is_save: bool,
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

/// The index of an id made by [`entity_id`].
pub fn entity_index(id: &str) -> Option<u32> {
    id.strip_prefix('e')?.parse().ok()
}

/// The notification payload for `id`, with its version when there is one.
pub fn payload(id: &str, version: Option<i64>) -> Vec<u8> {
    match version {
        Some(v) => format!("{{\"id\":\"{id}\",\"version\":{v}}}").into_bytes(),
        None => format!("{{\"id\":\"{id}\"}}").into_bytes(),
    }
}

/// Parse a payload made by [`payload`] (the loops' decoder).
pub fn parse_payload(bytes: &[u8]) -> Option<(String, Option<i64>)> {
    #[derive(Deserialize)]
    struct P {
        id: String,
        version: Option<i64>,
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
        // (sort position, entity, version, save)
        let mut out: Vec<(u64, u32, i64, u32)> = Vec::with_capacity(self.notifications + burst);
        let mut saves = Vec::new();
        let mut pos = 0u64;
        while out.len() < self.notifications {
            let e = sampler.sample(&mut rng);
            let v = versions.entry(e).or_insert(0);
            *v += 1;
            let save = saves.len() as u32;
            saves.push((e, *v));
            for _ in 0..burst.min(self.notifications - out.len()) {
                let late =
                    self.delay_window > 0 && rng.random_bool(self.late_share.clamp(0.0, 1.0));
                let shift = if late {
                    rng.random_range(1..=self.delay_window as u64)
                } else {
                    0
                };
                out.push((pos * 2 + shift * 2 + u64::from(late), e, *v, save));
                pos += 1;
            }
        }
        out.sort_by_key(|&(p, ..)| p);
        Workload {
            notifications: out.into_iter().map(|(_, e, v, s)| (e, v, s)).collect(),
            final_versions: versions,
            saves,
        }
    }

    /// The live stream: saves and their events, in time order (a save comes before its events).
    pub fn live_timeline(&self) -> Vec<LiveItem> {
        let live = &self.live;
        let mut rng = StdRng::seed_from_u64(self.seed ^ 0x9e37_79b9_7f4a_7c15);
        let sampler = KeySampler::new(live.distribution, self.entities);
        let interval = 1.0 / live.rate.max(0.001);
        let mut items = Vec::new();
        for i in 0..live.saves {
            let entity = sampler.sample(&mut rng);
            let at = Duration::from_secs_f64(i as f64 * interval);
            let save = i as u32;
            items.push(LiveItem {
                at,
                entity,
                save,
                is_save: true,
            });
            let lo = live.events_min.max(1);
            let n = rng.random_range(lo..=live.events_max.max(lo));
            let span = if live.spread_ms == 0 {
                0
            } else {
                rng.random_range(0..=live.spread_ms)
            };
            for k in 0..n {
                let off = if k == 0 || span == 0 {
                    0
                } else {
                    rng.random_range(0..=span)
                };
                items.push(LiveItem {
                    at: at + Duration::from_millis(off),
                    entity,
                    save,
                    is_save: false,
                });
            }
        }
        // Stable: at equal times a save stays before its events.
        items.sort_by_key(|it| (it.at, it.save, !it.is_save));
        items
    }

    /// Live events (notifications) in the stream.
    pub fn live_events(&self) -> usize {
        self.live_timeline().iter().filter(|i| !i.is_save).count()
    }

    /// The entities whose every fetch is slow, with their latency.
    pub fn slow_keys(&self) -> HashMap<u32, Duration> {
        let n = (self.entities as f64 * self.source.slow_key_share).round() as usize;
        if n == 0 {
            return HashMap::new();
        }
        let mut rng = StdRng::seed_from_u64(self.seed ^ 0x510e_7a11);
        let (lo, hi) = self.source.slow_ms;
        sample(&mut rng, self.entities, n.min(self.entities))
            .into_iter()
            .map(|i| {
                let ms = rng.random_range(lo..=hi.max(lo));
                (i as u32, Duration::from_millis(ms))
            })
            .collect()
    }

    /// The entities that fail for a while (the hottest ones).
    pub fn poisoned_keys(&self) -> HashSet<u32> {
        (0..self.source.poison_hottest.min(self.entities) as u32).collect()
    }

    /// Entities excluded from the "healthy keys" freshness: the slow and the poisoned ones.
    pub fn unhealthy_keys(&self) -> HashSet<u32> {
        let mut s: HashSet<u32> = self.slow_keys().into_keys().collect();
        s.extend(self.poisoned_keys());
        s
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    pub(crate) fn spec() -> WorkloadSpec {
        WorkloadSpec {
            name: "t".into(),
            purpose: "test".into(),
            notifications: 10_000,
            entities: 500,
            distribution: KeyDistribution::Zipf(1.0),
            burst: 4,
            late_share: 0.1,
            delay_window: 200,
            live: LiveSpec {
                saves: 100,
                rate: 100.0,
                distribution: KeyDistribution::Uniform,
                events_min: 3,
                events_max: 6,
                spread_ms: 1500,
                versioned: false,
            },
            source: SourceSpec {
                slow_key_share: 0.02,
                slow_ms: (500, 1000),
                poison_hottest: 3,
                ..SourceSpec::latency(0)
            },
            sink: "null".into(),
            instances: InstanceSpec::one(),
            fetch_slots: None,
            seed: 7,
            no_latency: false,
        }
    }

    #[test]
    fn bursts_versions_and_late_delivery() {
        let w = spec().generate();
        assert_eq!(w.notifications.len(), 10_000);
        assert_eq!(w.saves.len(), 2_500);
        let mut max: HashMap<u32, i64> = HashMap::new();
        let mut out_of_order = 0;
        for &(e, v, s) in &w.notifications {
            assert_eq!(w.saves[s as usize], (e, v), "a notification names its save");
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
        let hottest = w.final_versions.get(&0).copied().unwrap();
        assert!(
            hottest > 10 * (2_500 / 500) as i64,
            "e0 is the hottest entity: {hottest} saves"
        );
    }

    #[test]
    fn live_saves_emit_their_events_spread_after_the_save() {
        let s = spec();
        let items = s.live_timeline();
        let mut save_at = HashMap::new();
        let mut events: HashMap<u32, Vec<Duration>> = HashMap::new();
        for it in &items {
            if it.is_save {
                save_at.insert(it.save, it.at);
            } else {
                let at = save_at.get(&it.save).copied();
                assert!(at.is_some(), "an event comes after its save");
                events.entry(it.save).or_default().push(it.at - at.unwrap());
            }
        }
        assert_eq!(save_at.len(), 100);
        assert!(events.values().all(|e| (3..=6).contains(&e.len())));
        assert!(events.values().all(|e| e.contains(&Duration::ZERO)));
        let widest = events
            .values()
            .filter_map(|e| e.iter().max())
            .max()
            .copied()
            .unwrap();
        assert!(widest > Duration::from_millis(700) && widest <= Duration::from_millis(1500));
        assert!(items.windows(2).all(|w| w[0].at <= w[1].at));
        assert_eq!(s.live.duration(), Duration::from_secs(1));
    }

    #[test]
    fn faults_are_deterministic_and_named() {
        let s = spec();
        assert_eq!(s.slow_keys(), s.slow_keys());
        assert_eq!(s.slow_keys().len(), 10);
        assert!(
            s.slow_keys()
                .values()
                .all(|d| (500..=1000).contains(&(d.as_millis() as u64)))
        );
        assert_eq!(s.poisoned_keys(), HashSet::from([0, 1, 2]));
        assert!(s.unhealthy_keys().len() >= 10);
        assert_eq!(s.generate().notifications, s.generate().notifications);
        assert_eq!(s.live_timeline(), s.live_timeline());
    }

    #[test]
    fn payload_round_trip() {
        assert_eq!(
            parse_payload(&payload("e5", Some(3))),
            Some(("e5".into(), Some(3)))
        );
        assert_eq!(
            parse_payload(&payload("e5", None)),
            Some(("e5".into(), None))
        );
        assert_eq!(entity_index("e42"), Some(42));
        assert_eq!(entity_index("x"), None);
    }
}
