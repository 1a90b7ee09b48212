//! Soak: one `refetch run` process (PostgreSQL sink, shared broker and server) under steady load
//! for a set time, sampling its resident memory, open file descriptors and pending keys every few
//! seconds. They must stay flat: after a warm-up, the last third's peak may not exceed the first
//! third's peak by more than a margin, and file descriptors may not grow. The samples are
//! written as CSV next to the printed summary.
//!
//! Not part of the default run (`test = false` in Cargo.toml). Run on demand:
//! `REFETCH_SOAK_SECONDS=600 cargo test -p refetch-integration-tests --test soak -- --nocapture`
//! (defaults: 600 s, 400 notifications per second (200 changes, each announced twice) over 20,000
//! entities, a sample every 5 s; the CSV goes
//! to `$REFETCH_SOAK_CSV`, default `target/soak.csv`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "pg_scenario.rs"]
mod pg_scenario;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use pg_scenario::{PgScenario, gauge, http_get, rss_and_fds};
use rand::{Rng, SeedableRng};
use refetch_testkit::process::terminate;
use refetch_testkit::{kafka, postgres};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: f64,
    rss_kib: u64,
    fds: usize,
    pending: f64,
    notifications: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_stays_flat() {
    let seconds: u64 = env_or("REFETCH_SOAK_SECONDS", 600);
    let rate: usize = env_or("REFETCH_SOAK_RATE", 400);
    let entities: usize = env_or("REFETCH_SOAK_ENTITIES", 20_000);
    let every = Duration::from_secs(env_or("REFETCH_SOAK_SAMPLE_SECONDS", 5));
    let mut s = PgScenario::new(
        kafka::brokers().unwrap(),
        postgres::url().unwrap(),
        "soak",
        6,
    )
    .await
    .unwrap();
    let mut child = s.spawn("soak", &[]).unwrap();
    s.joined(&child).await.unwrap();
    let pid = child.id().unwrap();
    let addr = s.ops_addr(&child).await.unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let started = Instant::now();
    let tick = Duration::from_millis(200);
    let per_tick = (rate as f64 * tick.as_secs_f64()).ceil() as usize;
    let mut samples: Vec<Sample> = Vec::new();
    let mut next_sample = Instant::now();
    while started.elapsed() < Duration::from_secs(seconds) {
        let t = Instant::now();
        let ids: Vec<usize> = (0..per_tick / 2)
            .map(|_| rng.random_range(0..entities))
            .collect();
        s.change(&ids, 1).await.unwrap();
        if Instant::now() >= next_sample {
            let (rss_kib, fds) = rss_and_fds(pid).expect("the process runs");
            let page = http_get(&addr, "/metrics").await.unwrap_or_default();
            let pending = gauge(&page, "refetch_pending_keys").unwrap_or(f64::NAN);
            let sample = Sample {
                at: started.elapsed().as_secs_f64(),
                rss_kib,
                fds,
                pending,
                notifications: s.notifications,
            };
            eprintln!("{sample:?}");
            samples.push(sample);
            next_sample += every;
        }
        if let Some(rest) = tick.checked_sub(t.elapsed()) {
            tokio::time::sleep(rest).await;
        }
    }
    s.until_committed(Duration::from_secs(120), &[&child])
        .await
        .unwrap();
    let status = terminate(&mut child, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));

    let mut csv = String::from("seconds,rss_kib,fds,pending_keys,notifications\n");
    for x in &samples {
        let _ = writeln!(
            csv,
            "{:.1},{},{},{},{}",
            x.at, x.rss_kib, x.fds, x.pending, x.notifications
        );
    }
    let path = std::env::var("REFETCH_SOAK_CSV").unwrap_or_else(|_| {
        refetch_testkit::process::repo_root()
            .join("target/soak.csv")
            .display()
            .to_string()
    });
    std::fs::write(&path, &csv).unwrap();

    // Skip the first 20% (warm-up: pools, caches, allocator arenas), then compare thirds.
    let warm: Vec<Sample> = samples.iter().copied().skip(samples.len() / 5).collect();
    assert!(
        warm.len() >= 6,
        "too few samples ({}) for a verdict",
        warm.len()
    );
    let third = warm.len() / 3;
    let (first, last) = (&warm[..third], &warm[warm.len() - third..]);
    let peak = |xs: &[Sample], f: fn(&Sample) -> f64| xs.iter().map(f).fold(0.0, f64::max);
    let rss = (
        peak(first, |x| x.rss_kib as f64),
        peak(last, |x| x.rss_kib as f64),
    );
    let fds = (peak(first, |x| x.fds as f64), peak(last, |x| x.fds as f64));
    let pending = (peak(first, |x| x.pending), peak(last, |x| x.pending));
    let summary = format!(
        "soak: {seconds}s at {rate} notifications/s ({} notifications, {entities} entities), {} samples; \
         peak RSS first/last third {:.1}/{:.1} MiB, fds {}/{}, pending keys {}/{}; csv {path}",
        s.notifications,
        samples.len(),
        rss.0 / 1024.0,
        rss.1 / 1024.0,
        fds.0,
        fds.1,
        pending.0,
        pending.1
    );
    println!("{summary}");
    eprintln!("{summary}");
    assert!(
        rss.1 <= rss.0 * 1.25 + 8.0 * 1024.0,
        "resident memory grows: {summary}"
    );
    assert!(fds.1 <= fds.0 + 4.0, "file descriptors grow: {summary}");
    assert!(
        pending.1 <= (pending.0 * 2.0).max(rate as f64),
        "pending keys grow: {summary}"
    );
}
