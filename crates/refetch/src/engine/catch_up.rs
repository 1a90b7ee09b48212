//! Catch-up: a notification read long after it was produced has waited out its debounce window
//! already, so it does not pay the window again.
//!
//! The trailing window exists to merge the notifications one save emits; they are produced
//! within the window of each other. A record's timestamp (the producer's `CreateTime`, or the
//! broker's `LogAppendTime`) says when its save happened. When the engine reads it `age` later,
//! its siblings were produced by then too, and they are either in the same poll or right behind
//! it: the key waits `window - age`, but at least `catch_up_linger`, so the rest of the backlog
//! just read still merges. Max-wait shrinks the same way, so a key that is hot in a backlog is
//! fetched after the linger instead of after max-wait.
//!
//! Nothing else changes: a notification that arrives while its key's fetch is in flight still
//! starts a follow-up (invariant 2), and offsets are still committed only after the write
//! (invariant 4). A wrong clock costs fetches, not correctness: a producer clock ahead of the
//! engine's makes records look fresh (the full window), one behind makes them look old (the
//! linger, so fewer notifications merge).

use super::Engine;
use crate::clock::{Tick, millis};

impl Engine {
    /// Say which wall-clock time `Tick(0)` is, in milliseconds since the Unix epoch (the
    /// runtime passes its [`crate::clock::Clock`]'s origin; by default the engine's creation).
    /// Record timestamps are compared with it to tell how long ago a notification was produced.
    pub fn set_wall_origin(&mut self, ms: i64) {
        self.wall_origin_ms = ms;
    }

    /// The debounce window and max-wait (ms) for a notification produced at `timestamp`
    /// received at `now`: the configured ones for a fresh notification; what is left of them,
    /// but at least the catch-up linger, for one produced earlier (catch-up).
    pub(crate) fn windows_for(&self, timestamp: Option<i64>, now: Tick) -> (u64, u64) {
        let window = millis(self.cfg.window);
        let max_wait = millis(self.cfg.max_wait);
        let Some(ts) = timestamp.filter(|_| self.cfg.catch_up) else {
            return (window, max_wait);
        };
        let wall_now = self
            .wall_origin_ms
            .saturating_add(i64::try_from(now.0).unwrap_or(i64::MAX));
        let Ok(age) = u64::try_from(wall_now.saturating_sub(ts)) else {
            // Stamped in the future (a producer's clock ahead): the full window.
            return (window, max_wait);
        };
        if age == 0 {
            return (window, max_wait);
        }
        let linger = millis(self.cfg.catch_up_linger).min(window);
        (
            window.saturating_sub(age).max(linger),
            max_wait.saturating_sub(age).max(linger),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use crate::assignment::{Assignment, Epoch, TopicPartition};
    use crate::clock::Tick;
    use crate::config::EngineConfig;
    use crate::decode::{JsonDecoder, RecordView};
    use crate::engine::{Action, Decoders, Engine};

    /// Wall-clock time of `Tick(0)` in these tests.
    const ORIGIN: i64 = 1_800_000_000_000;

    fn engine(catch_up: bool) -> Engine {
        let cfg = EngineConfig {
            window: Duration::from_millis(200),
            max_wait: Duration::from_secs(2),
            catch_up,
            catch_up_linger: Duration::from_millis(20),
            ..EngineConfig::default()
        };
        let decoders =
            Decoders::new().default_decoder(Arc::new(JsonDecoder::fixed_type("customer", "/id")));
        let mut e = Engine::new(cfg, decoders, Box::new(|_: &str| true), false);
        e.set_wall_origin(ORIGIN);
        e.assign(&[Assignment::new(TopicPartition::new("t", 0), Epoch(1))]);
        e
    }

    fn record(e: &mut Engine, offset: i64, id: &str, timestamp: Option<i64>, now: Tick) {
        let payload = format!(r#"{{"id":"{id}"}}"#);
        e.on_record(
            &RecordView {
                topic: "t",
                partition: 0,
                offset,
                key: None,
                payload: Some(payload.as_bytes()),
                headers: &[],
                timestamp,
            },
            now,
        );
    }

    /// The first tick from `from` (in steps of 1 ms, up to 5 s) at which a fetch is issued.
    fn first_fetch_at(e: &mut Engine, from: u64) -> Option<u64> {
        (from..from + 5_000).find(|&t| {
            e.poll(Tick(t));
            e.take_actions()
                .iter()
                .any(|a| matches!(a, Action::Fetch(_)))
        })
    }

    #[test]
    fn a_notification_produced_long_ago_waits_only_the_linger() {
        let mut e = engine(true);
        // Read at tick 1000, produced 10 s before.
        record(&mut e, 0, "c1", Some(ORIGIN + 1_000 - 10_000), Tick(1_000));
        assert_eq!(first_fetch_at(&mut e, 1_000), Some(1_020));
    }

    #[test]
    fn a_notification_produced_within_the_window_waits_what_is_left_of_it() {
        let mut e = engine(true);
        record(&mut e, 0, "c1", Some(ORIGIN + 1_000 - 150), Tick(1_000));
        assert_eq!(first_fetch_at(&mut e, 1_000), Some(1_050));
    }

    #[test]
    fn fresh_future_stamped_or_unstamped_notifications_wait_the_full_window() {
        for ts in [Some(ORIGIN + 1_000), Some(ORIGIN + 60_000), None] {
            let mut e = engine(true);
            record(&mut e, 0, "c1", ts, Tick(1_000));
            assert_eq!(
                first_fetch_at(&mut e, 1_000),
                Some(1_200),
                "timestamp {ts:?}"
            );
        }
    }

    #[test]
    fn with_catch_up_off_an_old_notification_waits_the_full_window() {
        let mut e = engine(false);
        record(&mut e, 0, "c1", Some(ORIGIN - 60_000), Tick(1_000));
        assert_eq!(first_fetch_at(&mut e, 1_000), Some(1_200));
    }

    #[test]
    fn a_key_hot_in_a_backlog_is_fetched_after_the_linger_not_after_max_wait() {
        let mut e = engine(true);
        // One old notification of the same key every 5 ms: the trailing window alone would
        // never end, max-wait would end it after 2 s.
        let mut fetched = None;
        for i in 0..400u64 {
            let now = 1_000 + i * 5;
            record(&mut e, i as i64, "hot", Some(ORIGIN - 60_000), Tick(now));
            e.poll(Tick(now));
            if e.take_actions()
                .iter()
                .any(|a| matches!(a, Action::Fetch(_)))
            {
                fetched = Some(now);
                break;
            }
        }
        assert_eq!(fetched, Some(1_020));
    }

    #[test]
    fn an_old_notification_never_moves_a_fresh_keys_deadline_earlier() {
        let mut e = engine(true);
        record(&mut e, 0, "c1", Some(ORIGIN + 1_000), Tick(1_000));
        record(&mut e, 1, "c1", Some(ORIGIN - 60_000), Tick(1_010));
        assert_eq!(first_fetch_at(&mut e, 1_010), Some(1_200));
    }
}
