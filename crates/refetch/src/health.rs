//! Source health and the gone-rate guard, judged per source.
//!
//! **Source health** is a sliding window of wall-clock time over the outcomes of every fetch of
//! one source (all its keys). It answers the question the retry budget depends on (invariant 5):
//! when a key's fetch fails, is that evidence about the key, or about the source?
//! - When most outcomes in the window failed *the same way* (every key answers 401, every key gets
//!   an HTML maintenance page, every request times out), the source is **in outage**: none of its
//!   keys is dead-lettered, however "permanent" each answer looks, and readiness fails. The
//!   outage ends only on evidence: when successes are back in the window.
//! - When other keys of the source succeeded in the window, the source is **healthy** and the
//!   failure is evidence about the key: it spends the key's retry budget (a permanent error
//!   dead-letters the key at once).
//! - With neither (a quiet stream, a single key, too few outcomes to judge), there is **no
//!   evidence**: the key keeps retrying with capped backoff and is counted as blocked.
//!
//! **The gone guard** (invariant 12) keeps, per source, the share of "gone" answers among recent
//! fetch outcomes. It judges only once it holds `min_samples` outcomes; while the share is
//! abnormal it is tripped and deletes of that source are held. A held key's retries are no new
//! evidence (they are not counted again), and an operator's reset releases every delete the
//! guard holds.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{Tick, millis};
use crate::config::GoneGuardConfig;
use crate::fetch::FailureCause;

/// The failure causes a window counts separately (index of [`cause_index`]).
const CAUSES: usize = 9;

fn cause_index(c: FailureCause) -> usize {
    match c {
        FailureCause::Auth => 0,
        FailureCause::ContentType => 1,
        FailureCause::Decode => 2,
        FailureCause::Server => 3,
        FailureCause::Timeout => 4,
        FailureCause::Connect => 5,
        FailureCause::Throttled => 6,
        FailureCause::Stale => 7,
        _ => 8,
        // (`Key` failures are never recorded: no request reached the source.)
    }
}

const ALL_CAUSES: [FailureCause; CAUSES] = [
    FailureCause::Auth,
    FailureCause::ContentType,
    FailureCause::Decode,
    FailureCause::Server,
    FailureCause::Timeout,
    FailureCause::Connect,
    FailureCause::Throttled,
    FailureCause::Stale,
    FailureCause::Other,
];

/// How health is judged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HealthConfig {
    /// How far back outcomes count.
    pub window: Duration,
    /// Outcomes needed in the window before an outage is declared.
    pub min_samples: usize,
    /// Share of outcomes failing with one cause above which the source is in outage.
    pub outage_ratio: f64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            window: Duration::from_secs(60),
            min_samples: 10,
            outage_ratio: 0.5,
        }
    }
}

/// Where a source's outcome counts stood at a key's failure: the next failure of the key
/// compares against it ("did the others mostly succeed since?").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FailureMark {
    ok: u64,
    failed: u64,
}

/// What a failure of one key says, given the source's recent outcomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Judgement {
    /// Other keys of the source succeed: evidence about the key (spends its budget).
    Healthy,
    /// Most outcomes fail with this cause: the source is down for everyone; hold the key.
    Outage(FailureCause),
    /// Nothing to judge by (no success in the window, too few outcomes): hold the key.
    NoEvidence,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    start: u64,
    ok: u32,
    failed: [u32; CAUSES],
}

/// The recent outcomes of one source, on the wall clock.
#[derive(Debug, Clone)]
pub struct SourceHealth {
    cfg: HealthConfig,
    bucket_ms: u64,
    buckets: VecDeque<Bucket>,
    outage: Option<FailureCause>,
    /// When the current outage was declared.
    outage_since: Option<Tick>,
    /// Successes and failures since the start (for evidence between two failures of a key).
    seq_ok: u64,
    seq_failed: u64,
    /// The last `min_samples` outcomes, newest last (true: success).
    recent: VecDeque<bool>,
}

/// Buckets per window: coarse enough to stay small, fine enough to age smoothly.
const BUCKETS: u64 = 12;

impl SourceHealth {
    /// An empty window.
    pub fn new(cfg: HealthConfig) -> Self {
        SourceHealth {
            bucket_ms: (millis(cfg.window) / BUCKETS).max(1),
            cfg,
            buckets: VecDeque::new(),
            outage: None,
            outage_since: None,
            seq_ok: 0,
            seq_failed: 0,
            recent: VecDeque::new(),
        }
    }

    fn expire(&mut self, now: Tick) {
        let window = millis(self.cfg.window);
        while self
            .buckets
            .front()
            .is_some_and(|b| now.0 >= b.start + self.bucket_ms + window)
        {
            self.buckets.pop_front();
        }
    }

    fn bucket(&mut self, now: Tick) -> &mut Bucket {
        let start = now.0 - now.0 % self.bucket_ms;
        if self.buckets.back().is_none_or(|b| b.start != start) {
            self.buckets.push_back(Bucket {
                start,
                ok: 0,
                failed: [0; CAUSES],
            });
        }
        // Just pushed or already there.
        let last = self.buckets.len() - 1;
        &mut self.buckets[last]
    }

    fn totals(&self) -> (u64, [u64; CAUSES]) {
        let mut ok = 0u64;
        let mut failed = [0u64; CAUSES];
        for b in &self.buckets {
            ok += u64::from(b.ok);
            for (t, f) in failed.iter_mut().zip(b.failed) {
                *t += u64::from(f);
            }
        }
        (ok, failed)
    }

    /// Re-judge the outage from the window: declared when enough outcomes are in and one cause
    /// holds more than its share; ended only when successes are back (evidence of recovery).
    fn judge(&mut self, now: Tick) {
        let (ok, failed) = self.totals();
        let n = ok + failed.iter().sum::<u64>();
        let (worst, count) = failed
            .iter()
            .enumerate()
            .max_by_key(|(_, c)| **c)
            .map(|(i, c)| (ALL_CAUSES[i], *c))
            .unwrap_or((FailureCause::Other, 0));
        let share = if n == 0 { 0.0 } else { count as f64 / n as f64 };
        // Recovery first: most of the last outcomes succeeded (successes are back), whatever
        // the older failures still in the window say.
        let recent_ok = self.recent.iter().filter(|o| **o).count();
        let recovered = ok > 0 && recent_ok * 2 > self.recent.len();
        if self.outage.is_some() && recovered {
            self.outage = None;
            self.outage_since = None;
            return;
        }
        if n >= self.cfg.min_samples as u64 && share > self.cfg.outage_ratio && !recovered {
            if self.outage.is_none() {
                self.outage_since = Some(now);
            }
            self.outage = Some(worst);
        }
    }

    /// A fetch of the source succeeded (found, unchanged or gone: the source answered).
    pub fn record_ok(&mut self, now: Tick) {
        self.expire(now);
        self.bucket(now).ok += 1;
        self.seq_ok += 1;
        self.recent_push(true);
        self.judge(now);
    }

    /// A fetch of the source failed with `cause`, for a key whose previous failure left the
    /// mark `previous` (`None` for its first failure); what it says about the key, and the mark
    /// to keep for its next failure. It is evidence about the key only when, since its previous
    /// failure, the source mostly succeeded for the other keys (the key keeps failing while
    /// others succeed in the same period) and the source is not in outage. A first failure alone
    /// is never evidence.
    pub fn record_failure(
        &mut self,
        now: Tick,
        cause: FailureCause,
        previous: Option<FailureMark>,
    ) -> (Judgement, FailureMark) {
        self.expire(now);
        self.bucket(now).failed[cause_index(cause)] += 1;
        self.seq_failed += 1;
        self.recent_push(false);
        self.judge(now);
        let mark = FailureMark {
            ok: self.seq_ok,
            failed: self.seq_failed,
        };
        if let Some(c) = self.outage {
            return (Judgement::Outage(c), mark);
        }
        let evidence = previous.is_some_and(|p| {
            let ok = self.seq_ok.saturating_sub(p.ok);
            // Failures of other keys since then (this one excluded).
            let failed = self.seq_failed.saturating_sub(p.failed + 1);
            ok >= 1 && ok > failed
        });
        if evidence {
            (Judgement::Healthy, mark)
        } else {
            (Judgement::NoEvidence, mark)
        }
    }

    /// Remember the last outcomes (success or not), for ending an outage on evidence.
    fn recent_push(&mut self, ok: bool) {
        let cap = self.cfg.min_samples.max(1);
        if self.recent.len() == cap {
            self.recent.pop_front();
        }
        self.recent.push_back(ok);
    }

    /// The cause of the current outage, if the source is in one.
    pub fn outage(&self) -> Option<FailureCause> {
        self.outage
    }

    /// Outcomes in the window, and the share of the most common failure cause.
    pub fn summary(&self, now: Tick) -> (u64, f64) {
        let window = millis(self.cfg.window);
        let mut ok = 0u64;
        let mut failed = [0u64; CAUSES];
        for b in self
            .buckets
            .iter()
            .filter(|b| now.0 < b.start + self.bucket_ms + window)
        {
            ok += u64::from(b.ok);
            for (t, f) in failed.iter_mut().zip(b.failed) {
                *t += u64::from(f);
            }
        }
        let n = ok + failed.iter().sum::<u64>();
        let worst = failed.iter().max().copied().unwrap_or(0);
        (n, if n == 0 { 0.0 } else { worst as f64 / n as f64 })
    }
}

/// A count-based window of boolean samples with a running count.
#[derive(Debug, Clone)]
struct Window {
    samples: VecDeque<bool>,
    hits: usize,
    capacity: usize,
}

impl Window {
    fn new(capacity: usize) -> Self {
        Window {
            samples: VecDeque::with_capacity(capacity.min(4096)),
            hits: 0,
            capacity: capacity.max(1),
        }
    }

    fn push(&mut self, hit: bool) {
        if self.samples.len() == self.capacity {
            if let Some(true) = self.samples.pop_front() {
                self.hits -= 1;
            }
        }
        self.samples.push_back(hit);
        if hit {
            self.hits += 1;
        }
    }

    fn ratio(&self) -> f64 {
        if self.samples.is_empty() {
            0.0
        } else {
            self.hits as f64 / self.samples.len() as f64
        }
    }

    fn len(&self) -> usize {
        self.samples.len()
    }

    fn clear(&mut self) {
        self.samples.clear();
        self.hits = 0;
    }
}

/// What the gone guard says of one "gone" answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GoneVerdict {
    /// Write the delete.
    Delete,
    /// Hold the delete back: gone answers of this source are abnormal (the guard is tripped).
    Hold,
    /// Not enough outcomes to judge yet, and the share so far is abnormal: wait a little for
    /// evidence (see [`GoneGuardConfig::wait`]).
    Wait,
}

/// The gone-rate guard of one source.
///
/// Deletes need evidence: a "gone" outcome becomes a delete while gone outcomes are a normal
/// share of the recent window (at most `max_ratio`). The guard judges only once the window holds
/// `min_samples` outcomes: before that, deletes pass (a lone delete on a fresh group is written).
/// Once judged abnormal it is tripped (readiness fails) and holds deletes until the share drops
/// or an operator resets it. Retries of a delete it holds are no new evidence.
#[derive(Debug, Clone)]
pub struct GoneGuard {
    cfg: GoneGuardConfig,
    gone: Window,
    tripped: bool,
}

impl GoneGuard {
    /// A guard with `cfg`.
    pub fn new(cfg: GoneGuardConfig) -> Self {
        GoneGuard {
            cfg,
            gone: Window::new(cfg.window),
            tripped: false,
        }
    }

    fn rejudge(&mut self) {
        if self.gone.len() >= self.cfg.min_samples {
            self.tripped = self.gone.ratio() > self.cfg.max_ratio;
        }
    }

    /// Evidence that entities of the source exist (found, unchanged, already held).
    pub fn record_present(&mut self) {
        self.gone.push(false);
        self.rejudge();
    }

    /// A gone answer. `counted_before` says the key's gone answer was already counted (its
    /// delete was held or is waiting): a retry's answer is no new evidence.
    pub fn record_gone(&mut self, counted_before: bool) -> GoneVerdict {
        if !counted_before {
            self.gone.push(true);
            self.rejudge();
        }
        self.verdict()
    }

    /// What a gone answer of this source gets now.
    pub fn verdict(&self) -> GoneVerdict {
        if self.tripped {
            GoneVerdict::Hold
        } else if self.gone.len() >= self.cfg.min_samples || self.gone.ratio() <= self.cfg.max_ratio
        {
            GoneVerdict::Delete
        } else {
            GoneVerdict::Wait
        }
    }

    /// Is the guard tripped (enough evidence of abnormal gone outcomes; readiness fails)?
    pub fn is_tripped(&self) -> bool {
        self.tripped
    }

    /// The current share of gone outcomes.
    pub fn ratio(&self) -> f64 {
        self.gone.ratio()
    }

    /// Outcomes in the window.
    pub fn samples(&self) -> usize {
        self.gone.len()
    }

    /// An operator's reset: forget the window (the held deletes are released by the engine).
    pub fn reset(&mut self) {
        self.gone.clear();
        self.tripped = false;
    }
}

/// Per-source state, bounded: a source not heard of for long is forgotten first.
#[derive(Debug)]
pub struct PerSource<T> {
    map: lru::LruCache<Arc<str>, T>,
}

impl<T> PerSource<T> {
    /// At most `capacity` sources.
    pub fn new(capacity: usize) -> Self {
        PerSource {
            map: lru::LruCache::new(
                std::num::NonZeroUsize::new(capacity).unwrap_or(std::num::NonZeroUsize::MIN),
            ),
        }
    }

    /// The state of `source`, made by `init` when absent.
    pub fn entry(&mut self, source: &Arc<str>, init: impl FnOnce() -> T) -> &mut T {
        if !self.map.contains(source) {
            self.map.put(source.clone(), init());
        }
        // Present: just put, or already there.
        self.map
            .get_mut(source)
            .unwrap_or_else(|| unreachable!("the entry was inserted above"))
    }

    /// The state of `source`, if known.
    pub fn get(&self, source: &str) -> Option<&T> {
        self.map.peek(source)
    }

    /// Every source and its state.
    pub fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &T)> {
        self.map.iter()
    }

    /// Every source and its state, mutable.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&Arc<str>, &mut T)> {
        self.map.iter_mut()
    }

    /// Sources known.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// No source known.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> HealthConfig {
        HealthConfig {
            window: Duration::from_secs(60),
            min_samples: 10,
            outage_ratio: 0.5,
        }
    }

    #[test]
    fn a_single_key_failing_on_a_quiet_stream_is_no_evidence_then_an_outage() {
        let mut h = SourceHealth::new(cfg());
        let mut mark = None;
        for i in 0..9 {
            let (j, m) = h.record_failure(Tick(i * 1000), FailureCause::Connect, mark);
            assert_eq!(j, Judgement::NoEvidence);
            mark = Some(m);
        }
        assert_eq!(
            h.record_failure(Tick(9_000), FailureCause::Connect, mark).0,
            Judgement::Outage(FailureCause::Connect)
        );
        // Two minutes later the window is empty, but the outage ends only on evidence.
        assert_eq!(
            h.record_failure(Tick(130_000), FailureCause::Connect, mark)
                .0,
            Judgement::Outage(FailureCause::Connect)
        );
        h.record_ok(Tick(131_000));
        assert!(
            h.outage().is_some(),
            "one success among failures is not a recovery"
        );
        for i in 0..5 {
            h.record_ok(Tick(131_100 + i));
        }
        assert_eq!(h.outage(), None, "most recent outcomes succeed: it ended");
    }

    #[test]
    fn only_successes_while_the_key_fails_are_evidence_about_the_key() {
        let mut h = SourceHealth::new(cfg());
        for i in 0..100 {
            h.record_ok(Tick(i * 100));
        }
        // The source goes down right after a healthy period: the keys failing since then are
        // not judged against the successes before.
        let (j, first) = h.record_failure(Tick(10_000), FailureCause::Server, None);
        assert_eq!(
            j,
            Judgement::NoEvidence,
            "a first failure alone is no evidence"
        );
        let (j, second) = h.record_failure(Tick(20_000), FailureCause::Server, Some(first));
        assert_eq!(j, Judgement::NoEvidence, "nothing succeeded since");
        // Other keys succeed while this one keeps failing: evidence about this key.
        h.record_ok(Tick(20_500));
        h.record_ok(Tick(20_600));
        assert_eq!(
            h.record_failure(Tick(21_000), FailureCause::Server, Some(second))
                .0,
            Judgement::Healthy
        );
        // Others mostly failing since (an outage beginning on a busy stream) is no evidence.
        let (_, mark) = h.record_failure(Tick(21_100), FailureCause::Auth, None);
        h.record_ok(Tick(21_200));
        for t in 0..3 {
            h.record_failure(Tick(21_300 + t), FailureCause::Auth, None);
        }
        assert_eq!(
            h.record_failure(Tick(21_400), FailureCause::Auth, Some(mark))
                .0,
            Judgement::NoEvidence
        );
    }

    #[test]
    fn one_cause_shared_by_most_outcomes_is_an_outage_however_permanent() {
        let mut h = SourceHealth::new(cfg());
        for i in 0..5 {
            h.record_ok(Tick(i));
        }
        let mut j = Judgement::Healthy;
        for i in 0..10 {
            j = h.record_failure(Tick(100 + i), FailureCause::Auth, None).0;
        }
        assert_eq!(j, Judgement::Outage(FailureCause::Auth));
        // Mixed causes below the share are not an outage.
        let mut h = SourceHealth::new(cfg());
        for i in 0..6 {
            h.record_ok(Tick(i));
        }
        let (_, mark) = h.record_failure(Tick(3), FailureCause::Timeout, None);
        for i in 0..6 {
            h.record_ok(Tick(4 + i));
        }
        h.record_failure(Tick(10), FailureCause::Auth, None);
        h.record_failure(Tick(11), FailureCause::Server, None);
        assert_eq!(
            h.record_failure(Tick(12), FailureCause::Timeout, Some(mark))
                .0,
            Judgement::Healthy
        );
    }

    #[test]
    fn the_gone_guard_judges_only_with_min_samples_and_ignores_held_retries() {
        let mut g = GoneGuard::new(GoneGuardConfig {
            window: 100,
            min_samples: 50,
            max_ratio: 0.2,
            wait: Duration::from_secs(10),
        });
        assert_eq!(
            g.record_gone(false),
            GoneVerdict::Wait,
            "unjudged yet: a lone delete waits for evidence (the engine writes it after `wait`)"
        );
        for _ in 0..48 {
            assert_eq!(g.record_gone(false), GoneVerdict::Wait);
        }
        assert!(!g.is_tripped());
        assert_eq!(
            g.record_gone(false),
            GoneVerdict::Hold,
            "50 samples, all gone"
        );
        assert!(g.is_tripped());
        let n = g.samples();
        for _ in 0..100 {
            assert_eq!(g.record_gone(true), GoneVerdict::Hold);
        }
        assert_eq!(g.samples(), n, "held retries are no new evidence");
        for _ in 0..100 {
            g.record_present();
        }
        assert!(!g.is_tripped(), "the share dropped");
        assert_eq!(g.record_gone(false), GoneVerdict::Delete);
        g.reset();
        assert_eq!(g.samples(), 0);
        // Amid other outcomes a delete passes at once, judged or not.
        for _ in 0..10 {
            g.record_present();
        }
        assert_eq!(g.record_gone(false), GoneVerdict::Delete);
    }

    #[test]
    fn per_source_state_is_bounded() {
        let mut p: PerSource<u32> = PerSource::new(2);
        for s in ["a", "b", "c"] {
            *p.entry(&Arc::from(s), || 0) += 1;
        }
        assert_eq!(p.len(), 2);
        assert!(p.get("a").is_none(), "the least recent is forgotten");
    }
}
