//! The outcome policy of issue 14 through the binary: `refetch run` against the test broker, a
//! real local HTTP source with injected faults, and a JSON Lines or SQLite sink.
//!
//! - A source that serves a maintenance page (`200 text/html`) or answers 401 to every id for a
//!   while is in outage: nothing is dead-lettered, `/readyz` fails with the outage reason while it
//!   lasts, and the sink converges once the source recovers. Each fault starts after a quiet spell
//!   longer than the health window; a 5xx for every id also right after the healthy period. The
//!   same maintenance page or 401 right after the healthy period are ignored: the engine
//!   dead-letters every key then (an open defect, see their `ignore` reason).
//! - A restart whose first fetches are mostly real deletes (a version-guarded SQLite sink): fewer
//!   than the gone guard's `min_samples` pass on their own; more trip the guard (readiness says
//!   so), and the operator's reset releases every delete it holds; the group reaches the log end.
//! - A flaky source (10% 503, 5% 429, errors faster than successes) never trips the breaker:
//!   nothing is short-circuited, nothing is dead-lettered, readiness stays ready.
//! - A lone delete on a fresh group is written and committed while `/readyz` stays ready;
//!   `refetch fetch --key` of deleted entities ends: `ok` while the fresh process's guard has too
//!   few samples to judge, a clear message and exit 1 for the deletes it holds once it trips.
//! - A key that fails alone (400, or 503 on that id only) while the others succeed is still
//!   dead-lettered.
//!
//! The settings are shortened so every case takes seconds: `engine.health_window = "3s"`,
//! `engine.fetch_backoff` 50 ms to 500 ms, `engine.gone_grace = "1s"`, breaker cooldown 1 s (see
//! [`ENGINE`] and [`SOURCE`]). `REFETCH_TEST_BIN` runs them against another build of the binary.
//!
//! Needs a real broker: `scripts/test`, or `REFETCH_TEST_KAFKA=host:port cargo test -p
//! refetch-cli --test outage -- --include-ignored`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use refetch::Version;
use refetch_sinks::SqliteConfig;
use refetch_sinks::jsonl::read_latest;
use refetch_sinks::sqlite::SqliteSink;
use refetch_testkit::http_source::{Fault, RandomFaults};
use refetch_testkit::kafka::{self, ReadRecord};
use serde_json::json;
use support::{Env, Run, http_get, refetch_bin, sample};

/// The `[engine]` settings every case shares (shortened windows and backoffs).
const ENGINE: &str = r#"window = "20ms"
max_wait = "200ms"
commit_interval = "100ms"
shutdown_deadline = "10s"
health_window = "3s"
gone_grace = "1s"
fetch_backoff = { initial = "50ms", max = "500ms", multiplier = 2.0 }
"#;

/// The source settings every case shares (a breaker that half-opens after 1 s).
const SOURCE: &str = r#"breaker = { cooldown = "1s" }
"#;

/// Which sink a case writes to.
enum SinkKind {
    /// JSON Lines at `Env::sink`.
    Jsonl,
    /// SQLite at `sink.db` in the case's folder (version-guarded upserts, rows deleted).
    Sqlite,
}

fn sqlite_path(env: &Env) -> PathBuf {
    env.dir.path().join("sink.db")
}

/// The configuration of a case: `env`'s topic and group, [`ENGINE`] plus `engine_extra`,
/// [`SOURCE`] for `customer` (404 `{"error":"not_found"}` is a deletion), `sink`.
fn config(env: &Env, engine_extra: &str, sink: &SinkKind) -> String {
    let sink = match sink {
        SinkKind::Jsonl => format!("kind = \"jsonl\"\npath = \"{}\"", env.sink.display()),
        SinkKind::Sqlite => format!(
            "kind = \"sqlite\"\npath = \"{}\"\ntable = \"customers\"\nbusy_timeout = \"30s\"",
            sqlite_path(env).display()
        ),
    };
    format!(
        r#"[kafka]
brokers = "{brokers}"
group_id = "{group}"

[[topics]]
name = "{topic}"
decoder = {{ kind = "json", fixed_type = "customer", id = "/id", version = {{ pointer = "/version" }} }}

[engine]
{ENGINE}{engine_extra}

[fetcher.sources.customer]
url = "{base}/customer/{{id}}"
version = {{ pointer = "/version", kind = "integer" }}
not_found = {{ pointer = "/error", equals = "not_found" }}
{SOURCE}
[sink]
{sink}

[ops]
listen = "127.0.0.1:0"

[log]
level = "info,rdkafka=warn"
"#,
        brokers = env.brokers,
        group = env.group,
        topic = env.topic,
        base = env.source.base_url(),
    )
}

/// `/readyz`: the status code and the body.
async fn readyz(run: &Run) -> (u16, String) {
    let response = http_get(&run.ops_addr(), "/readyz").await;
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

async fn metrics(run: &Run) -> String {
    http_get(&run.ops_addr(), "/metrics").await
}

/// The sum of every sample of `name` (any labels).
fn total(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Wait until `/readyz` answers `code` with a body containing `needle`.
async fn wait_ready_state(run: &Run, code: u16, needle: &str, within: Duration) -> String {
    let started = Instant::now();
    loop {
        let (c, body) = readyz(run).await;
        if c == code && body.contains(needle) {
            return body;
        }
        assert!(
            started.elapsed() < within,
            "/readyz did not answer {code} with {needle:?} within {within:?}; last: {c} {body}\n{}",
            run.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Wait until `/metrics` satisfies `ok` (the gauges are published on the commit tick, a little
/// after `/readyz`, which asks the engine); returns that scrape.
async fn wait_metrics(run: &Run, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let started = Instant::now();
    loop {
        let m = metrics(run).await;
        if ok(&m) {
            return m;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "metrics never showed {what}:\n{m}\n{}",
            run.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every record of the group's dead-letter topic.
async fn dead_letters(env: &Env) -> Vec<ReadRecord> {
    kafka::read_all(
        &env.brokers,
        &format!("{}.dlq", env.group),
        false,
        Duration::from_secs(30),
    )
    .await
    .unwrap()
}

fn dead_lettered_ids(records: &[ReadRecord]) -> Vec<String> {
    let mut ids: Vec<String> = records
        .iter()
        .map(|r| {
            String::from_utf8_lossy(r.header("refetch.entity.id").unwrap_or_default()).into_owned()
        })
        .collect();
    ids.sort();
    ids
}

/// The versions a JSON Lines sink holds.
fn jsonl_versions(env: &Env) -> BTreeMap<String, Option<Version>> {
    read_latest(&env.sink)
        .map(|m| {
            m.into_iter()
                .map(|(k, e)| (k.id().to_owned(), e.version))
                .collect()
        })
        .unwrap_or_default()
}

/// The versions a SQLite sink holds (tombstones excluded).
async fn sqlite_versions(env: &Env) -> BTreeMap<String, Option<Version>> {
    let sink = SqliteSink::open(&SqliteConfig {
        path: sqlite_path(env),
        table: "customers".into(),
        ..SqliteConfig::default()
    })
    .await
    .unwrap();
    sink.snapshot()
        .await
        .unwrap()
        .into_iter()
        .filter(|(_, row)| !row.deleted)
        .map(|(k, row)| (k.id().to_owned(), row.version))
        .collect()
}

/// What the source holds for `customer`: id and version of every entity that exists.
fn source_versions(env: &Env) -> BTreeMap<String, Option<Version>> {
    env.source
        .snapshot()
        .into_iter()
        .filter(|((t, _), _)| t == "customer")
        .filter_map(|((_, id), state)| state.map(|(v, _)| (id, Some(Version::Int(v)))))
        .collect()
}

/// Wait until the sink holds exactly what the source holds.
async fn wait_converged(env: &Env, sink: &SinkKind, run: &Run) {
    let started = Instant::now();
    loop {
        let held = match sink {
            SinkKind::Jsonl => jsonl_versions(env),
            SinkKind::Sqlite => sqlite_versions(env).await,
        };
        let want = source_versions(env);
        if held == want {
            return;
        }
        if started.elapsed() > Duration::from_secs(45) {
            let differ: Vec<_> = want
                .iter()
                .filter(|(id, v)| held.get(*id) != Some(v))
                .map(|(id, v)| format!("{id}: source {v:?}, sink {:?}", held.get(id)))
                .chain(
                    held.keys()
                        .filter(|id| !want.contains_key(*id))
                        .map(|id| format!("{id}: deleted at the source, still in the sink")),
                )
                .take(10)
                .collect();
            panic!(
                "the sink did not converge to the source: {differ:#?}\n{}",
                run.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Notify the deletion of customer `ids` (each deleted at the source first), with the delete's
/// version.
async fn delete_and_notify(env: &Env, ids: impl IntoIterator<Item = u32>) {
    let mut records = Vec::new();
    for i in ids {
        let id = i.to_string();
        let v = env.source.delete("customer", &id).unwrap();
        records.push((
            Some(id.clone().into_bytes()),
            json!({ "id": id, "version": v }).to_string().into_bytes(),
        ));
    }
    kafka::produce(&env.brokers, &env.topic, records)
        .await
        .unwrap();
}

async fn stop(mut run: Run) {
    run.signal("TERM").await;
    assert_eq!(
        run.exit_code(Duration::from_secs(60)).await,
        Some(0),
        "{}",
        run.log_tail()
    );
}

/// A source that answers every id with `fault` for a while (after a healthy period and `quiet`
/// time without traffic, with new changes announced during the fault), then recovers.
async fn a_source_in_outage_then_recovering(
    prefix: &str,
    fault: Fault,
    cause: &str,
    quiet: Duration,
) {
    let env = Env::new(prefix, 2).await;
    env.write_config(&config(&env, "", &SinkKind::Jsonl));
    let run = Run::run(&env, "run.log");
    run.wait_log("refetch running", 1).await;
    wait_ready_state(&run, 200, "ready", Duration::from_secs(30)).await;

    // Healthy: the sink follows the source.
    let first = env.change(&env.topic, 1..=20).await;
    env.wait_held(&first, &run).await;
    tokio::time::sleep(quiet).await;

    // The fault: every id gets it, for longer than the health window, while changes keep
    // coming (of known entities and of new ones).
    env.source.set_fault(Some(fault));
    let fault_started = Instant::now();
    env.change(&env.topic, 1..=20).await;
    let reason = "source customer in outage";
    let body = wait_ready_state(&run, 503, reason, Duration::from_secs(20)).await;
    assert!(body.contains(cause), "the cause is named: {body}");
    wait_metrics(&run, "the outage and the keys it blocks", |m| {
        sample(m, "refetch_source_outage{source=\"customer\"}") == Some(1.0)
            && sample(m, "refetch_keys_blocked").is_some_and(|n| n > 0.0)
    })
    .await;
    env.change(&env.topic, 21..=30).await;
    // Readiness keeps failing for as long as the fault lasts (at least twice the health window).
    while fault_started.elapsed() < Duration::from_secs(7) {
        let (code, body) = readyz(&run).await;
        assert!(
            code == 503 && body.contains(reason),
            "ready again during the fault: {code} {body}\n{}",
            run.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let m = metrics(&run).await;
    assert_eq!(
        total(&m, "refetch_dead_letters_total"),
        0.0,
        "dead letters during the outage:\n{m}"
    );

    // Recovery: the sink converges, readiness comes back, the group reaches the end.
    env.source.clear_faults();
    let recovered = Instant::now();
    wait_converged(&env, &SinkKind::Jsonl, &run).await;
    let converged_after = recovered.elapsed();
    wait_ready_state(&run, 200, "ready", Duration::from_secs(30)).await;
    eprintln!(
        "{prefix}: converged {converged_after:?} and ready again {:?} after the source recovered",
        recovered.elapsed()
    );
    env.wait_committed(&env.topic, &run).await;
    let m = wait_metrics(&run, "the outage over", |m| {
        sample(m, "refetch_source_outage{source=\"customer\"}") == Some(0.0)
    })
    .await;
    let letters = dead_letters(&env).await;
    assert!(
        letters.is_empty(),
        "dead-lettered during an outage: {:?}\n{}",
        dead_lettered_ids(&letters),
        run.log_tail()
    );
    assert_eq!(total(&m, "refetch_dead_letters_total"), 0.0, "{m}");
    stop(run).await;
}

/// Longer than [`ENGINE`]'s `health_window`: the healthy period's successes have left it.
const QUIET: Duration = Duration::from_secs(4);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn a_maintenance_page_for_every_id_is_an_outage_not_poison() {
    a_source_in_outage_then_recovering("outage_html", Fault::Html, "content_type", QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn an_expired_credential_is_an_outage_not_poison() {
    a_source_in_outage_then_recovering("outage_401", Fault::Status(401), "auth", QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn a_5xx_for_every_id_right_after_a_healthy_period_is_an_outage_not_poison() {
    a_source_in_outage_then_recovering(
        "outage_503_hot",
        Fault::Status(503),
        "server",
        Duration::ZERO,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "engine defect (issue 14): a permanent failure is judged against successes from \
            before the fault, so a maintenance page that starts while the source's earlier \
            successes are still in the health window dead-letters every key at once"]
async fn a_maintenance_page_right_after_a_healthy_period_is_an_outage_not_poison() {
    a_source_in_outage_then_recovering(
        "outage_html_hot",
        Fault::Html,
        "content_type",
        Duration::ZERO,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "engine defect (issue 14): a permanent failure is judged against successes from \
            before the fault, so a 401 for every id that starts while the source's earlier \
            successes are still in the health window dead-letters every key at once"]
async fn an_expired_credential_right_after_a_healthy_period_is_an_outage_not_poison() {
    a_source_in_outage_then_recovering(
        "outage_401_hot",
        Fault::Status(401),
        "auth",
        Duration::ZERO,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn a_restart_whose_first_fetches_are_real_deletes_reaches_the_log_end() {
    let env = Env::new("outage_deletes", 3).await;
    let sink = SinkKind::Sqlite;
    env.write_config(&config(&env, "", &sink));

    // Run 1: 200 entities reach the sink; the group commits everything; a clean stop.
    let run = Run::run(&env, "run1.log");
    run.wait_log("refetch running", 1).await;
    env.change(&env.topic, 1..=200).await;
    wait_converged(&env, &sink, &run).await;
    env.wait_committed(&env.topic, &run).await;
    stop(run).await;

    // While refetch is down, 40 entities are deleted (and 5 others changed): fewer deletes than
    // the gone guard's min_samples (50), so it cannot judge them abnormal; they are written.
    delete_and_notify(&env, 1..=40).await;
    env.change(&env.topic, 196..=200).await;
    let run = Run::run(&env, "run2.log");
    run.wait_log("refetch running", 1).await;
    wait_converged(&env, &sink, &run).await;
    env.wait_committed(&env.topic, &run).await;
    let (code, body) = readyz(&run).await;
    assert_eq!(code, 200, "{body}");
    stop(run).await;

    // Down again: 120 more are deleted. Now the guard has its samples and all of them say gone:
    // it trips, and readiness says why. The deletes it holds wait for the operator.
    delete_and_notify(&env, 41..=160).await;
    let run = Run::run(&env, "run3.log");
    run.wait_log("refetch running", 1).await;
    wait_ready_state(
        &run,
        503,
        "gone guard of source customer tripped",
        Duration::from_secs(30),
    )
    .await;
    // Every delete is either written or held (each held one is logged once).
    let started = Instant::now();
    let held = loop {
        let rows = sqlite_versions(&env).await;
        let written = (41..=160u32)
            .filter(|i| !rows.contains_key(&i.to_string()))
            .count();
        let held = run.log().matches("delete held back").count();
        if written + held == 120 {
            break held;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{written} deletes written, {held} held, of 120\n{}",
            run.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(held > 0, "the guard held nothing");
    wait_metrics(&run, "the guard tripped", |m| {
        sample(m, "refetch_gone_guard_tripped") == Some(1.0)
    })
    .await;

    // The operator decides the deletes are real: every held delete is released at once, the
    // group reaches the log end and readiness comes back.
    let reset = http_post(&run.ops_addr(), "/gone-guard/reset").await;
    assert!(reset.starts_with("HTTP/1.1 200"), "{reset}");
    wait_converged(&env, &sink, &run).await;
    env.wait_committed(&env.topic, &run).await;
    wait_ready_state(&run, 200, "ready", Duration::from_secs(30)).await;
    let letters = dead_letters(&env).await;
    assert!(letters.is_empty(), "{:?}", dead_lettered_ids(&letters));
    stop(run).await;
}

/// `POST http://ADDR/PATH` with an empty body, as text.
async fn http_post(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn a_flaky_source_never_trips_the_breaker() {
    const N: u32 = 300;
    let env = Env::new("outage_flaky", 4).await;
    env.write_config(&config(&env, "", &SinkKind::Jsonl));
    env.source.set_latency(Duration::from_millis(25));
    let run = Run::run(&env, "run.log");
    run.wait_log("refetch running", 1).await;
    wait_ready_state(&run, 200, "ready", Duration::from_secs(30)).await;

    // The same workload twice: from a healthy source, then from a flaky one whose errors come
    // back at once while successes take their 25 ms.
    let started = Instant::now();
    let healthy = env.change(&env.topic, 1..=N).await;
    env.wait_held(&healthy, &run).await;
    let healthy_took = started.elapsed();

    env.source.set_random_faults(Some(RandomFaults {
        faults: vec![(0.10, Fault::Status(503)), (0.05, Fault::Status(429))],
        instant: true,
        seed: 14,
    }));
    let started = Instant::now();
    let mut flaky = Vec::new();
    for _ in 0..3 {
        flaky = env.change(&env.topic, 1..=N).await;
    }
    // Readiness and the breaker's gauge, sampled while the flaky rounds run (judged after the
    // run, so that the first failure reported is the most telling one).
    let mut unready = None;
    let mut breaker_gauge = Vec::new();
    let mut degraded = std::collections::BTreeSet::new();
    let watch = async {
        loop {
            let (code, body) = readyz(&run).await;
            if code != 200 && unready.is_none() {
                unready = Some(body);
            }
            breaker_gauge.push(sample(
                &metrics(&run).await,
                "refetch_breaker_open{source=\"customer\"}",
            ));
            let status = http_get(&run.ops_addr(), "/status.json").await;
            let doc: serde_json::Value = status
                .split_once("\r\n\r\n")
                .and_then(|(_, b)| serde_json::from_str(b).ok())
                .unwrap_or_default();
            if let Some(reasons) = doc["degraded_reasons"].as_array() {
                degraded.extend(reasons.iter().filter_map(|r| r.as_str().map(str::to_owned)));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        () = env.wait_held(&flaky, &run) => {}
        () = watch => {}
    }
    let flaky_took = started.elapsed();
    eprintln!(
        "{N} entities from a healthy source: {healthy_took:?}; three rounds from a flaky one: \
         {flaky_took:?}"
    );
    env.source.clear_faults();
    wait_converged(&env, &SinkKind::Jsonl, &run).await;
    env.wait_committed(&env.topic, &run).await;

    let m = metrics(&run).await;
    assert_eq!(
        total(&m, "refetch_http_not_attempted_total"),
        0.0,
        "fetches short-circuited:\n{m}"
    );
    let log = run.log();
    assert!(
        !log.contains("circuit breaker opened"),
        "{}",
        run.log_tail()
    );
    assert!(
        breaker_gauge.iter().all(|g| *g == Some(0.0)),
        "the breaker's gauge while the source was flaky: {breaker_gauge:?}"
    );
    assert_eq!(unready, None, "not ready under a flaky source");
    assert!(
        degraded.is_empty(),
        "the status page said degraded: {degraded:?}"
    );
    assert!(
        total(&m, "refetch_fetches_total{outcome=\"transient\"}") > 0.0
            || env.source.total_requests() > u64::from(4 * N),
        "the faults were injected:\n{m}"
    );
    assert_eq!(total(&m, "refetch_dead_letters_total"), 0.0, "{m}");
    let letters = dead_letters(&env).await;
    assert!(letters.is_empty(), "{:?}", dead_lettered_ids(&letters));
    stop(run).await;
}

/// `refetch fetch --config CONFIG --key customer:ID...`: exit code and output, within a minute.
async fn refetch_fetch(config: &Path, ids: impl IntoIterator<Item = u32>) -> (i32, String) {
    let mut cmd = tokio::process::Command::new(refetch_bin());
    cmd.args(["fetch", "--config", config.to_str().unwrap()]);
    for id in ids {
        cmd.args(["--key", &format!("customer:{id}")]);
    }
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        cmd.env("RUST_LOG", "warn").kill_on_drop(true).output(),
    )
    .await
    .expect("refetch fetch did not end within a minute")
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// How many delete lines the JSON Lines sink has for customer `id`.
fn delete_lines(env: &Env, id: &str) -> usize {
    std::fs::read_to_string(&env.sink)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["op"] == "delete" && v["id"] == id)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn a_lone_delete_on_a_fresh_group_is_written_and_fetch_of_deleted_keys_ends() {
    let env = Env::new("outage_lone_delete", 1).await;
    env.write_config(&config(&env, "", &SinkKind::Jsonl));
    for i in 1..=80 {
        env.source
            .put("customer", &i.to_string(), json!({ "n": i }));
    }
    let run = Run::run(&env, "run.log");
    run.wait_log("refetch running", 1).await;
    wait_ready_state(&run, 200, "ready", Duration::from_secs(30)).await;

    // The only notification this group ever sees announces a delete.
    delete_and_notify(&env, [7]).await;
    let ends = kafka::end_offsets(&env.brokers, &env.topic).await.unwrap();
    let started = Instant::now();
    loop {
        let (code, body) = readyz(&run).await;
        assert_eq!(code, 200, "a lone delete made the pipeline unready: {body}");
        let committed = kafka::committed_offsets(&env.brokers, &env.group, &env.topic)
            .await
            .unwrap_or_default();
        if delete_lines(&env, "7") == 1 && committed == ends {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the lone delete was not written and committed (delete lines: {}, committed \
             {committed:?} of {ends:?})\n{}",
            delete_lines(&env, "7"),
            run.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop(run).await;

    // A fresh process deletes a deleted entity and exits 0.
    let (code, out) = refetch_fetch(&env.config, [7]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("customer:7\tok"), "{out}");
    assert_eq!(delete_lines(&env, "7"), 2, "written again");

    // Sixty deleted entities at once: the first 49 pass while the fresh guard cannot judge; the
    // 50th sample trips it, and every delete it holds ends with a clear message and exit 1.
    for i in 11..=70 {
        env.source.delete("customer", &i.to_string()).unwrap();
    }
    let (code, out) = refetch_fetch(&env.config, 11..=70).await;
    assert_eq!(code, 1, "{out}");
    let ok = out.lines().filter(|l| l.ends_with("\tok")).count();
    let held: Vec<&str> = out.lines().filter(|l| l.contains("\tFAILED: ")).collect();
    assert_eq!(ok + held.len(), 60, "{out}");
    assert!(
        ok >= 49,
        "deletes before the guard could judge were held: {out}"
    );
    assert!(!held.is_empty(), "{out}");
    for line in &held {
        assert!(
            line.contains("is held: the gone guard of source customer is tripped"),
            "{line}"
        );
    }
    let written = (11..=70)
        .filter(|i| delete_lines(&env, &i.to_string()) == 1)
        .count();
    assert_eq!(written, ok, "every `ok` was written, no held one was");
    let letters = dead_letters(&env).await;
    assert!(letters.is_empty(), "{:?}", dead_lettered_ids(&letters));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn a_key_failing_alone_while_the_others_succeed_is_dead_lettered() {
    let env = Env::new("outage_poison", 2).await;
    env.write_config(&config(&env, "", &SinkKind::Jsonl));
    let run = Run::run(&env, "run.log");
    run.wait_log("refetch running", 1).await;
    wait_ready_state(&run, 200, "ready", Duration::from_secs(30)).await;

    // 13 is refused (400, permanent), 17 always gets a 503 (transient): the source serves every
    // other key, so both are poison.
    env.source.poison("customer", "13", Fault::Status(400));
    env.source.poison("customer", "17", Fault::Status(503));
    let notified = env.change(&env.topic, 1..=30).await;
    // The other keys keep succeeding while 17 retries.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        env.change(&env.topic, (1..=30).filter(|i| *i != 13 && *i != 17))
            .await;
    }
    let others: Vec<_> = notified
        .into_iter()
        .filter(|(id, _)| id != "13" && id != "17")
        .collect();
    env.wait_held(&others, &run).await;
    env.wait_committed(&env.topic, &run).await;
    let letters = dead_letters(&env).await;
    assert_eq!(
        dead_lettered_ids(&letters),
        ["13", "17"],
        "{}",
        run.log_tail()
    );
    for r in &letters {
        assert_eq!(r.header("refetch.reason"), Some(&b"fetch"[..]));
    }
    let (code, body) = readyz(&run).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(env.held("13"), None);
    assert_eq!(env.held("17"), None);
    stop(run).await;
}
