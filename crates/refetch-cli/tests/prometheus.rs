//! The monitoring kit against the real tools:
//!
//! - `promtool check rules` and `promtool test rules` on `monitoring/`, and every alert has a unit
//!   test that fires and one that stays quiet;
//! - a real Prometheus server scraping two `refetch run` instances of one consumer group (real
//!   broker, local source): a `histogram_quantile` over both instances, the lag per partition
//!   while the source is down, an alert of `monitoring/alerts.yml` firing, and every query of
//!   the Grafana dashboard evaluated by Prometheus (each parses and returns series).
//!
//! Needs Debian's `prometheus` package (`apt-get install -y prometheus`: the server and
//! promtool) and, for the server test, a real broker: run with `scripts/test` (or
//! `REFETCH_TEST_KAFKA=host:port cargo test -p refetch-cli --test prometheus -- --include-ignored`).
//! Prometheus listens on a free port between 29000 and 29999, scrapes and evaluates every second.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod obs_support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use obs_support::{Setup, status_json};
use refetch_testkit::kafka::{self, OutRecord};
use refetch_testkit::process::{repo_root, spawn, terminate, wait_for, wait_for_value};
use serde_json::Value;

fn monitoring() -> std::path::PathBuf {
    repo_root().join("monitoring")
}

fn promtool(args: &[&str]) -> String {
    let out = std::process::Command::new("promtool")
        .args(args)
        .current_dir(monitoring())
        .output()
        .expect("promtool runs (install it with `apt-get install -y prometheus`)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// `alert: Name` entries of the rule file.
fn alerts() -> BTreeSet<String> {
    std::fs::read_to_string(monitoring().join("alerts.yml"))
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .map(str::to_owned)
        .collect()
}

#[test]
#[ignore = "needs promtool: run scripts/test"]
fn the_alert_rules_pass_promtool_and_every_alert_is_unit_tested_both_ways() {
    let alerts = alerts();
    assert!(alerts.len() >= 8, "{alerts:?}");
    let checked = promtool(&["check", "rules", "alerts.yml"]);
    assert!(
        checked.contains(&format!("SUCCESS: {} rules found", alerts.len())),
        "{checked}"
    );
    promtool(&["test", "rules", "alerts.test.yml"]);

    // Every alert has a case where it fires and one where it stays quiet.
    let tests = std::fs::read_to_string(monitoring().join("alerts.test.yml")).unwrap();
    let mut fires: BTreeSet<String> = BTreeSet::new();
    let mut quiet: BTreeSet<String> = BTreeSet::new();
    let mut current: Option<String> = None;
    for line in tests.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("alertname: ") {
            current = Some(name.to_owned());
        } else if let Some(rest) = line.strip_prefix("exp_alerts:") {
            let name = current.clone().expect("exp_alerts after an alertname");
            if rest.trim() == "[]" {
                quiet.insert(name);
            } else {
                fires.insert(name);
            }
        }
    }
    assert_eq!(fires, alerts, "alerts without a firing test");
    assert_eq!(quiet, alerts, "alerts without a quiet test");
}

/// A free port in the private range (29000-29999).
fn free_port() -> u16 {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
        ^ std::process::id();
    for i in 0..1000u32 {
        let port = 29000 + ((seed.wrapping_add(i.wrapping_mul(7919))) % 1000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between 29000 and 29999");
}

/// One Prometheus HTTP API query: the result vector (`status` must be `success`).
async fn query(prom: &str, q: &str) -> Result<Vec<Value>, String> {
    let url = url::Url::parse_with_params(&format!("http://{prom}/api/v1/query"), [("query", q)])
        .unwrap();
    let resp = reqwest::get(url).await.map_err(|e| e.to_string())?;
    let text = resp.text().await.map_err(|e| e.to_string())?;
    let body: Value = serde_json::from_str(&text).map_err(|e| format!("{e}: {text}"))?;
    if body["status"] != "success" {
        return Err(format!("{q}: {body}"));
    }
    Ok(body["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

fn value_of(sample: &Value) -> f64 {
    sample["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

fn write_prometheus_config(dir: &Path, targets: &[&str]) -> std::path::PathBuf {
    let path = dir.join("prometheus.yml");
    let targets = targets
        .iter()
        .map(|t| format!("'{t}'"))
        .collect::<Vec<_>>()
        .join(", ");
    std::fs::write(
        &path,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: refetch\n    static_configs:\n      - targets: [{targets}]\n",
            rules = monitoring().join("alerts.yml").display()
        ),
    )
    .unwrap();
    path
}

/// Every query of the dashboard, with Grafana's variables replaced.
fn dashboard_queries() -> Vec<(String, String)> {
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(monitoring().join("grafana/refetch.json")).unwrap(),
    )
    .unwrap();
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "30s")
                .replace("$instance", ".*");
            out.push((panel["title"].as_str().unwrap().to_owned(), expr));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker and Prometheus: run scripts/test"]
async fn prometheus_scrapes_two_instances_aggregates_latency_sees_lag_and_fires_an_alert() {
    const PARTITIONS: i32 = 4;
    let setup = Setup::new("obs_prom", PARTITIONS).await;
    // Every fetch takes about 100 ms, so the group's p90 lies in the (0.1, 0.25] bucket.
    setup.source.set_latency(Duration::from_millis(100));
    let a_config = setup.config("a", "");
    let b_config = setup.config("b", "");
    let mut a = setup.start("a", &a_config, &[]).await;
    let mut b = setup.start("b", &b_config, &[]).await;
    wait_for(
        "the partitions to be shared",
        Duration::from_secs(60),
        || {
            let (a, b) = (a.addr.clone(), b.addr.clone());
            async move {
                let parts = |d: Value| {
                    d["status"]["engine"]["partitions"]
                        .as_array()
                        .map_or(0, Vec::len)
                };
                parts(status_json(&a).await) == 2 && parts(status_json(&b).await) == 2
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\nA:\n{}\nB:\n{}", a.child.log(), b.child.log()));

    let port = free_port();
    let prom = format!("127.0.0.1:{port}");
    let config = write_prometheus_config(setup.dir.path(), &[&a.addr, &b.addr]);
    let checked = std::process::Command::new("promtool")
        .args(["check", "config"])
        .arg(&config)
        .output()
        .expect("promtool runs");
    assert!(checked.status.success(), "{checked:?}");
    let mut server = spawn(
        "prometheus",
        [
            format!("--config.file={}", config.display()),
            format!(
                "--storage.tsdb.path={}",
                setup.dir.path().join("tsdb").display()
            ),
            format!("--web.listen-address={prom}"),
            "--log.level=warn".to_owned(),
        ],
        std::iter::empty::<(&str, &str)>(),
        setup.dir.path().join("prometheus.log"),
    )
    .expect("prometheus runs (install it with `apt-get install -y prometheus`)");
    wait_for(
        "Prometheus to scrape both instances",
        Duration::from_secs(60),
        || {
            let prom = prom.clone();
            async move {
                query(&prom, "up{job=\"refetch\"} == 1")
                    .await
                    .is_ok_and(|r| r.len() == 2)
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", server.log()));

    // Notifications for keys on every partition, while Prometheus scrapes.
    let ids: Vec<(String, i64)> = (0..80)
        .map(|i| {
            let id = format!("c{i}");
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
        "the first round to be committed",
        Duration::from_secs(60),
        || {
            let (brokers, group, topic, ends) = (
                setup.brokers.clone(),
                setup.group.clone(),
                setup.topic.clone(),
                ends.clone(),
            );
            async move {
                kafka::committed_offsets(&brokers, &group, &topic)
                    .await
                    .is_ok_and(|c| c == ends)
            }
        },
    )
    .await
    .unwrap();

    // A quantile over both instances: their buckets add up.
    let p90 = wait_for_value("the group's fetch p90", Duration::from_secs(30), || {
        let prom = prom.clone();
        async move {
            let per_instance = query(
                &prom,
                "sum by (instance) (increase(refetch_fetch_seconds_count[1m])) > 0",
            )
            .await
            .ok()?;
            if per_instance.len() != 2 {
                return None;
            }
            let r = query(
                &prom,
                "histogram_quantile(0.9, sum by (le) (rate(refetch_fetch_seconds_bucket[1m])))",
            )
            .await
            .ok()?;
            r.first().map(value_of).filter(|v| v.is_finite())
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", server.log()));
    assert!(
        (0.1..=0.25).contains(&p90),
        "p90 of ~100 ms fetches over both instances: {p90}"
    );

    // The source goes down; ten notifications per partition wait: the lag per partition is
    // exactly those ten, each reported by the instance that owns the partition.
    setup.source.set_down(true).await.unwrap();
    let mut records = Vec::new();
    for p in 0..PARTITIONS {
        for i in 0..10 {
            let id = format!("down-{p}-{i}");
            records.push(OutRecord {
                partition: Some(p),
                ..OutRecord::keyed(
                    id.clone().into_bytes(),
                    serde_json::json!({"id": id, "version": 1})
                        .to_string()
                        .into_bytes(),
                )
            });
        }
    }
    kafka::produce_records(&setup.brokers, &setup.topic, records)
        .await
        .unwrap();
    let lags = wait_for_value("lag 10 on every partition", Duration::from_secs(60), || {
        let prom = prom.clone();
        async move {
            let r = query(&prom, "refetch_consumer_lag{job=\"refetch\"}")
                .await
                .ok()?;
            let lags: BTreeMap<String, (String, f64)> = r
                .iter()
                .map(|s| {
                    (
                        s["metric"]["partition"].as_str().unwrap_or("").to_owned(),
                        (
                            s["metric"]["instance"].as_str().unwrap_or("").to_owned(),
                            value_of(s),
                        ),
                    )
                })
                .collect();
            (r.len() == PARTITIONS as usize && lags.values().all(|(_, v)| *v == 10.0))
                .then_some(lags)
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nA:\n{}\nB:\n{}", a.child.log(), b.child.log()));
    let owners: BTreeSet<&str> = lags.values().map(|(i, _)| i.as_str()).collect();
    assert_eq!(
        owners.len(),
        2,
        "both instances report their partitions: {lags:?}"
    );
    let end_total = query(&prom, "sum(refetch_log_end_offset)").await.unwrap();
    assert_eq!(
        value_of(&end_total[0]),
        (ends.values().sum::<i64>() + 10 * PARTITIONS as i64) as f64
    );

    // A record that cannot be decoded is dead-lettered at once: the kit's alert fires.
    kafka::produce(
        &setup.brokers,
        &setup.topic,
        [(Some(b"broken".to_vec()), b"not json".to_vec())],
    )
    .await
    .unwrap();
    let alert = wait_for_value(
        "RefetchDeadLettersRising to fire",
        Duration::from_secs(60),
        || {
            let prom = prom.clone();
            async move {
                let text = reqwest::get(format!("http://{prom}/api/v1/alerts"))
                    .await
                    .ok()?
                    .text()
                    .await
                    .ok()?;
                let body: Value = serde_json::from_str(&text).ok()?;
                body["data"]["alerts"]
                    .as_array()?
                    .iter()
                    .find(|a| {
                        a["labels"]["alertname"] == "RefetchDeadLettersRising"
                            && a["state"] == "firing"
                    })
                    .cloned()
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", server.log()));
    assert_eq!(alert["labels"]["reason"], "decode", "{alert}");
    assert_eq!(alert["labels"]["severity"], "ticket", "{alert}");

    // Every dashboard query is valid PromQL and finds series.
    let mut empty = Vec::new();
    for (title, expr) in dashboard_queries() {
        match query(&prom, &expr).await {
            Ok(r) if r.is_empty() => empty.push(format!("{title}: {expr}")),
            Ok(_) => {}
            Err(e) => panic!("dashboard panel {title:?}: {e}"),
        }
    }
    assert!(
        empty.is_empty(),
        "dashboard queries without series:\n{}",
        empty.join("\n")
    );

    setup.source.set_down(false).await.unwrap();
    for child in [&mut a.child, &mut b.child] {
        let status = terminate(child, Duration::from_secs(30)).await.unwrap();
        assert_eq!(status.code(), Some(0), "{}", child.log());
    }
    let status = terminate(&mut server, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(
        status.success() || status.code().is_none(),
        "{}",
        server.log()
    );
}
