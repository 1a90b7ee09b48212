//! Observability of `refetch run` against a real broker, checked from the outside:
//!
//! - `/metrics` matches the one metrics table of `docs/operations.md` exactly (names, types,
//!   labels, help text; units follow the naming scheme), every series exists before its first
//!   event, no series is exported both with and without a label, every latency is a
//!   histogram, and every metric the monitoring kit (`monitoring/`: alert rules, their unit
//!   tests, the Grafana dashboard) names is on `/metrics`;
//! - `/metrics` and `/status.json` agree on every counter both expose, after a workload that
//!   exercises coalescing, versions held in flight, deletes and dead letters.
//!
//! Needs a real broker: run with `scripts/test` (or `REFETCH_TEST_KAFKA=host:port cargo test -p
//! refetch-cli --test observability -- --include-ignored`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod obs_support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use obs_support::{Metrics, Setup, get, status_json};
use refetch_testkit::kafka;
use refetch_testkit::process::{repo_root, terminate, wait_for};

/// One row of the metrics table in docs/operations.md.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    name: String,
    kind: String,
    unit: String,
    labels: BTreeSet<String>,
    meaning: String,
}

fn unquote(cell: &str) -> String {
    cell.trim().trim_matches('`').to_owned()
}

/// The rows of the table whose header is `| name | type | unit | labels | meaning |`.
fn docs_table() -> Vec<Row> {
    let text = std::fs::read_to_string(repo_root().join("docs/operations.md")).unwrap();
    let mut rows = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        if line.starts_with("| name | type | unit | labels | meaning |") {
            assert!(!inside && rows.is_empty(), "one metrics table only");
            inside = true;
            continue;
        }
        if !inside {
            continue;
        }
        if !line.starts_with('|') {
            break;
        }
        if line.starts_with("|---") {
            continue;
        }
        let cells: Vec<&str> = line.trim_matches('|').split(" | ").collect();
        assert_eq!(cells.len(), 5, "a row of five cells: {line}");
        let labels = match cells[3].trim() {
            "" | "–" => BTreeSet::new(),
            l => l.split(',').map(unquote).collect(),
        };
        rows.push(Row {
            name: unquote(cells[0]),
            kind: cells[1].trim().to_owned(),
            unit: cells[2].trim().to_owned(),
            labels,
            meaning: cells[4].trim().to_owned(),
        });
    }
    assert!(!rows.is_empty(), "docs/operations.md has no metrics table");
    rows
}

/// The table `/metrics` describes, in the docs' format (printed when they differ).
fn table_of(m: &Metrics, docs: &[Row]) -> String {
    let labels = m.label_names();
    let mut out =
        String::from("| name | type | unit | labels | meaning |\n|---|---|---|---|---|\n");
    for (name, ty) in &m.types {
        let unit = docs
            .iter()
            .find(|r| &r.name == name)
            .map_or("?", |r| r.unit.as_str());
        let l = labels.get(name).cloned().unwrap_or_default();
        let l = if l.is_empty() {
            "–".to_owned()
        } else {
            l.iter()
                .map(|x| format!("`{x}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        out.push_str(&format!(
            "| `{name}` | {ty} | {unit} | {l} | {} |\n",
            m.help.get(name).map_or("", String::as_str)
        ));
    }
    out
}

/// Every `refetch_*` metric name in `text` (histogram suffixes map to their histogram).
fn metric_names_in(text: &str, m: &Metrics) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("refetch_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let preceded =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        if !preceded {
            out.insert(m.metric_of(&text[start..end]).to_owned());
        }
        i = end;
    }
    out
}

/// The unit a name's suffix promises, if any.
fn unit_of_suffix(name: &str) -> Option<&'static str> {
    if name.ends_with("_seconds") {
        Some("seconds")
    } else if name.ends_with("_offset") {
        Some("offset")
    } else {
        None
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn metrics_match_the_docs_exactly_and_cover_the_monitoring_kit() {
    let setup = Setup::new("obs_metrics", 2).await;
    let config = setup.config("a", "");
    let mut a = setup.start("a", &config, &[]).await;

    // Before any notification: every series already exists (with zero values).
    let (code, before) = get(&a.addr, "/metrics").await;
    assert_eq!(code, 200);
    let before = Metrics::parse(&before);
    for name in [
        "refetch_dead_letters_total",
        "refetch_gone_guard_tripped",
        "refetch_fetch_seconds",
        "refetch_notification_to_durable_seconds",
        "refetch_source_outage",
        "refetch_breaker_open",
        "refetch_broker_reachable",
        "refetch_http_requests_total",
        "refetch_sink_writes_total",
    ] {
        assert!(
            before.types.contains_key(name),
            "{name} is missing before its first event"
        );
    }
    assert_eq!(
        before.sum("refetch_dead_letters_total", &[("reason", "fetch")]),
        0.0
    );

    // A workload: every partition receives notifications and commits.
    let ids: Vec<(String, i64)> = (0..30)
        .map(|i| {
            let id = i.to_string();
            let v = setup
                .source
                .put("customer", &id, serde_json::json!({"n": i}));
            (id, v)
        })
        .collect();
    setup.announce(&ids).await;
    let ends = kafka::end_offsets(&setup.brokers, &setup.topic)
        .await
        .unwrap();
    wait_for(
        "every partition committed and its lag known",
        Duration::from_secs(60),
        || {
            let addr = a.addr.clone();
            let ends = ends.clone();
            async move {
                let doc = status_json(&addr).await;
                let lag = doc["lag"].as_array().cloned().unwrap_or_default();
                lag.len() == ends.len()
                    && lag.iter().all(|p| {
                        let end = ends.get(&(p["partition"].as_i64().unwrap() as i32));
                        p["lag"] == 0 && end.is_some_and(|e| p["end"] == *e)
                    })
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", a.child.log()));

    let (code, text) = get(&a.addr, "/metrics").await;
    assert_eq!(code, 200);
    let m = Metrics::parse(&text);
    let docs = docs_table();
    let generated = table_of(&m, &docs);

    // Names and types.
    let documented: BTreeMap<&str, &Row> = docs.iter().map(|r| (r.name.as_str(), r)).collect();
    assert_eq!(documented.len(), docs.len(), "a metric documented twice");
    let exported: BTreeSet<&str> = m.types.keys().map(String::as_str).collect();
    let listed: BTreeSet<&str> = documented.keys().copied().collect();
    assert_eq!(
        exported, listed,
        "docs/operations.md and /metrics list different series; /metrics says:\n{generated}"
    );
    let labels = m.label_names();
    for (name, ty) in &m.types {
        let row = documented[name.as_str()];
        assert_eq!(&row.kind, ty, "type of {name}; /metrics says:\n{generated}");
        assert_eq!(
            m.help.get(name),
            Some(&row.meaning),
            "help of {name}; /metrics says:\n{generated}"
        );
        assert_eq!(
            labels.get(name).cloned().unwrap_or_default(),
            row.labels,
            "labels of {name}; /metrics says:\n{generated}"
        );
        if let Some(unit) = unit_of_suffix(name) {
            assert_eq!(row.unit, unit, "unit of {name}");
        }
        assert!(!row.unit.is_empty(), "unit of {name}");
        // Naming scheme: counters end in _total and only counters do.
        assert_eq!(
            ty == "counter",
            name.ends_with("_total"),
            "{name} is a {ty}"
        );
        assert_ne!(ty, "summary", "{name}: summaries cannot be aggregated");
    }
    // Every library series carries the unit its catalogue gives.
    for s in refetch::metrics::SERIES
        .iter()
        .chain(refetch_http::telemetry::SERIES)
        .chain(refetch_sinks::metrics::SERIES)
    {
        assert_eq!(documented[s.name].unit, s.unit, "unit of {}", s.name);
    }
    // No series is exported both with and without a label (nor with two label sets).
    for s in &m.samples {
        let metric = m.metric_of(&s.name);
        let names: BTreeSet<String> = s.labels.keys().filter(|k| *k != "le").cloned().collect();
        assert_eq!(
            Some(&names),
            labels.get(metric),
            "{} is exported with two label sets",
            s.name
        );
    }
    // The workload is visible.
    assert_eq!(m.sum("refetch_records_total", &[]), 30.0);
    assert!(m.sum("refetch_fetch_seconds_count", &[]) >= 30.0);
    assert_eq!(m.sum("refetch_consumer_lag", &[]), 0.0);
    assert_eq!(
        m.sum("refetch_log_end_offset", &[]),
        ends.values().sum::<i64>() as f64
    );
    assert_eq!(m.sum("refetch_broker_reachable", &[]), 1.0);
    assert_eq!(m.sum("refetch_ready", &[]), 1.0);

    // Every metric the monitoring kit names exists.
    let kit = repo_root().join("monitoring");
    let mut named = BTreeSet::new();
    for file in ["alerts.yml", "alerts.test.yml", "grafana/refetch.json"] {
        let text = std::fs::read_to_string(kit.join(file))
            .unwrap_or_else(|e| panic!("monitoring/{file}: {e}"));
        let names = metric_names_in(&text, &m);
        assert!(!names.is_empty(), "monitoring/{file} names no metric");
        named.extend(names);
    }
    let missing: Vec<&String> = named
        .iter()
        .filter(|n| !m.types.contains_key(n.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "the monitoring kit names series /metrics does not have: {missing:?}"
    );

    let status = terminate(&mut a.child, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0), "{}", a.child.log());
}

/// A status counter, the metric that counts the same, and the labels of its samples to sum.
type Pair = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
);

/// The counters `/status.json` and `/metrics` both expose: the status counter and the sum of
/// the metric's samples whose labels match.
const SHARED: &[Pair] = &[
    ("records", "refetch_records_total", &[]),
    ("coalesced", "refetch_notifications_coalesced_total", &[]),
    (
        "satisfied_by_version",
        "refetch_notifications_satisfied_by_version_total",
        &[],
    ),
    ("ignored", "refetch_records_ignored_total", &[]),
    ("decode_errors", "refetch_decode_errors_total", &[]),
    (
        "keys_on_several_partitions",
        "refetch_keys_on_several_partitions_total",
        &[],
    ),
    ("found", "refetch_fetches_total", &[("outcome", "found")]),
    ("gone", "refetch_fetches_total", &[("outcome", "gone")]),
    (
        "unchanged",
        "refetch_fetches_total",
        &[("outcome", "unchanged")],
    ),
    (
        "stale_reads",
        "refetch_fetches_total",
        &[("outcome", "stale")],
    ),
    (
        "fetch_permanent",
        "refetch_fetches_total",
        &[("outcome", "permanent")],
    ),
    ("writes", "refetch_writes_total", &[("outcome", "durable")]),
    ("dead_letters", "refetch_dead_letters_total", &[]),
    (
        "actions_completed_by_count",
        "refetch_actions_completed_total",
        &[("by", "count")],
    ),
    (
        "actions_completed_by_timeout",
        "refetch_actions_completed_total",
        &[("by", "timeout")],
    ),
    (
        "actions_incomplete",
        "refetch_actions_incomplete_total",
        &[],
    ),
    (
        "action_late_members",
        "refetch_action_late_members_total",
        &[],
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn metrics_and_status_json_agree_on_every_counter_both_expose() {
    let setup = Setup::new("obs_agree", 2).await;
    // Fetches take long enough for later notifications to arrive while they are in flight.
    setup.source.set_latency(Duration::from_millis(1500));
    let config = setup.config("a", "");
    let mut a = setup.start("a", &config, &[]).await;

    const N: usize = 40;
    for i in 0..N {
        setup
            .source
            .set("customer", &i.to_string(), 5, serde_json::json!({"n": i}));
    }
    // Version 1 of every entity starts a fetch; versions 2 to 5 arrive during it and are
    // covered by the version 5 it reads (satisfied by the held version, no second fetch).
    let first: Vec<(String, i64)> = (0..N).map(|i| (i.to_string(), 1)).collect();
    setup.announce(&first).await;
    wait_for(
        "every first fetch in flight",
        Duration::from_secs(30),
        || {
            let addr = a.addr.clone();
            async move {
                let e = &status_json(&addr).await["status"]["engine"];
                e["fetches_in_flight"].as_u64() == Some(N as u64)
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", a.child.log()));
    let later: Vec<(String, i64)> = (0..N)
        .flat_map(|i| (2..=5).map(move |v| (i.to_string(), v)))
        .collect();
    setup.announce(&later).await;
    // Deletes, a repeat that is already held, and records that cannot be decoded.
    for i in 0..5 {
        setup.source.delete("customer", &format!("gone-{i}"));
    }
    let gone: Vec<(String, i64)> = (0..5).map(|i| (format!("gone-{i}"), 1)).collect();
    setup.announce(&gone).await;
    // Version 3 of entity 0 once version 5 is written: satisfied on arrival.
    wait_for("the first round written", Duration::from_secs(30), || {
        let addr = a.addr.clone();
        async move {
            let e = &status_json(&addr).await["status"]["engine"];
            e["counters"]["writes"].as_u64() >= Some(N as u64)
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", a.child.log()));
    setup.announce(&[("0".to_owned(), 3)]).await;
    kafka::produce(
        &setup.brokers,
        &setup.topic,
        (0..3).map(|i| (Some(format!("bad-{i}").into_bytes()), b"not json".to_vec())),
    )
    .await
    .unwrap();

    let produced = (N + N * 4 + 5 + 1 + 3) as u64;
    let ends = kafka::end_offsets(&setup.brokers, &setup.topic)
        .await
        .unwrap();
    wait_for(
        "the workload to be committed",
        Duration::from_secs(60),
        || {
            let addr = a.addr.clone();
            let ends = ends.clone();
            async move {
                let doc = status_json(&addr).await;
                let e = &doc["status"]["engine"];
                let parts = e["partitions"].as_array().cloned().unwrap_or_default();
                e["counters"]["records"] == produced
                    && e["pending_keys"] == 0
                    && e["dead_letters_in_flight"] == 0
                    && parts.len() == ends.len()
                    && parts.iter().all(|p| {
                        ends.get(&(p["partition"].as_i64().unwrap() as i32))
                            .is_some_and(|o| p["committed"] == *o)
                    })
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", a.child.log()));

    // Quiet now: the two endpoints are read back to back, then the status again to show
    // nothing moved in between.
    let doc = status_json(&a.addr).await;
    let m = Metrics::parse(&get(&a.addr, "/metrics").await.1);
    let again = status_json(&a.addr).await;
    let counters = &doc["status"]["engine"]["counters"];
    assert_eq!(
        counters, &again["status"]["engine"]["counters"],
        "the pipeline was not quiet"
    );
    // The workload reached the paths it was built for.
    // Versions 2 to 5 of every entity came in while its fetch was in flight, and that fetch
    // read version 5: 4 per entity; and the late version 3 of entity 0 on arrival.
    assert_eq!(
        counters["satisfied_by_version"].as_u64(),
        Some(4 * N as u64 + 1),
        "{counters}"
    );
    assert!(counters["gone"].as_u64().unwrap() > 0, "{counters}");
    assert!(
        counters["decode_errors"].as_u64().unwrap() == 3,
        "{counters}"
    );

    let mut disagree = Vec::new();
    for (field, metric, labels) in SHARED {
        let status = counters[*field]
            .as_u64()
            .unwrap_or_else(|| panic!("status.json has no counter {field}: {counters}"));
        let metric_value = m.sum(metric, labels);
        if metric_value != status as f64 {
            disagree.push(format!(
                "{field}: status.json {status}, /metrics {metric}{labels:?} {metric_value}"
            ));
        }
    }
    // Fetch failures: transient ones are split by whether the attempt reached the source.
    let transient = m.sum("refetch_fetches_total", &[("outcome", "transient")])
        + m.sum("refetch_fetches_total", &[("outcome", "not_attempted")]);
    if transient != counters["fetch_transient"].as_u64().unwrap() as f64 {
        disagree.push(format!(
            "fetch_transient: status.json {}, /metrics {transient}",
            counters["fetch_transient"]
        ));
    }
    let failed_writes = m.sum("refetch_writes_total", &[("outcome", "transient")])
        + m.sum("refetch_writes_total", &[("outcome", "permanent")]);
    if failed_writes != counters["write_failures"].as_u64().unwrap() as f64 {
        disagree.push(format!(
            "write_failures: status.json {}, /metrics {failed_writes}",
            counters["write_failures"]
        ));
    }
    assert!(
        disagree.is_empty(),
        "/metrics and /status.json disagree:\n{}\nstatus counters: {counters}",
        disagree.join("\n")
    );

    let status = terminate(&mut a.child, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0), "{}", a.child.log());
}
