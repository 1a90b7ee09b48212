//! Secrets from the environment never leave the process except to where they belong: `refetch
//! run` gets a source API key header, a bearer token and the PostgreSQL password through
//! `${VAR}` references, runs at debug level (and trace for refetch's own crates) through normal
//! work, failing fetches (401 from the source) and a sink it cannot reach; its logs, error
//! messages, `/metrics`, `/status.json`, `/readyz` and the status page are searched for every
//! secret. The source itself must have received the API key (so the test is not vacuous).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "pg_scenario.rs"]
mod pg_scenario;

use std::time::Duration;

use pg_scenario::{PgScenario, http_get};
use refetch_testkit::http_source::Fault;
use refetch_testkit::process::{terminate, wait_for};
use refetch_testkit::{kafka, postgres};

const API_KEY: &str = "ApiKey-3f9c1e7a-SECRET";
const TOKEN: &str = "Tok-8d2b44c0-SECRET";
const PG_PASSWORD: &str = "PgPw-51ae09bd-SECRET";

fn assert_clean(what: &str, text: &str) {
    for secret in [API_KEY, TOKEN, PG_PASSWORD] {
        assert!(!text.contains(secret), "{what} contains a secret:\n{}", {
            let at = text.find(secret).unwrap_or(0);
            &text[at.saturating_sub(300)..(at + 100).min(text.len())]
        });
        // Nor a recognisable part of it (a truncated or split print).
        assert!(
            !text.contains(&secret[..12]),
            "{what} contains part of a secret"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_appear_in_logs_errors_metrics_or_status() {
    let pg = postgres::url().unwrap();
    // The shared test server trusts local connections, so the password is carried but unused;
    // what matters is that refetch never prints it.
    let with_password = pg.replacen(
        "postgres://postgres@",
        "postgres://postgres:${PG_PASSWORD}@",
        1,
    );
    assert_ne!(with_password, pg, "the URL has the expected form: {pg}");
    let mut s = PgScenario::new(kafka::brokers().unwrap(), pg.clone(), "secrets", 2)
        .await
        .unwrap();
    s.sink_url = with_password;
    s.log_level = "debug".into();
    s.source_extra = r#"headers = { "X-Api-Key" = "${CRM_API_KEY}" }
auth = { kind = "bearer", token = "${CRM_TOKEN}" }"#
        .into();
    s.write_config().unwrap();
    let env = [
        ("CRM_API_KEY", API_KEY),
        ("CRM_TOKEN", TOKEN),
        ("PG_PASSWORD", PG_PASSWORD),
        (
            "RUST_LOG",
            "debug,refetch=trace,refetch_http=trace,refetch_sinks=trace",
        ),
    ];
    // Key 3 fails with 401 (permanent: dead-lettered with the error), key 4 with 503 a few times.
    s.source.poison("customer", "3", Fault::Status(401));
    s.source.fail_next(3, Fault::Status(503));
    let mut child = s.spawn("run", &env).unwrap();
    s.joined(&child).await.unwrap();
    let ids: Vec<usize> = (0..20).collect();
    s.change(&ids, 1).await.unwrap();
    s.until_committed(Duration::from_secs(60), &[&child])
        .await
        .unwrap();
    let addr = s.ops_addr(&child).await.unwrap();
    let mut pages = Vec::new();
    for path in ["/metrics", "/status.json", "/readyz", "/healthz", "/"] {
        let body = http_get(&addr, path).await.unwrap();
        assert!(!body.is_empty(), "{path} answered");
        pages.push((path, body));
    }
    let status = terminate(&mut child, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));

    // The secrets were used: the source saw the key and the token.
    let recorded = s.source.recorded();
    assert!(
        recorded
            .iter()
            .any(|r| r.header("x-api-key") == Some(API_KEY))
    );
    assert!(
        recorded
            .iter()
            .any(|r| r.header("authorization") == Some(&format!("Bearer {TOKEN}")))
    );
    let log = child.log();
    assert!(log.contains("DEBUG"), "the log runs at debug level");
    assert_clean("the debug log", &log);
    for (path, body) in &pages {
        assert_clean(path, body);
    }
    let dead = s.dead_letters().await.unwrap();
    assert!(!dead.is_empty(), "the 401 key is dead-lettered");
    for d in &dead {
        assert_eq!(d.header("refetch.entity.id"), Some(&b"3"[..]));
        for (name, value) in &d.headers {
            assert_clean(
                name,
                &String::from_utf8_lossy(value.as_deref().unwrap_or_default()),
            );
        }
    }

    // A sink it cannot reach: the start-up error names the URL without the password.
    s.sink_url = "postgres://postgres:${PG_PASSWORD}@127.0.0.1:1/refetch".into();
    s.write_config().unwrap();
    let mut failing = s.spawn("unreachable", &env).unwrap();
    wait_for("the failing start to exit", Duration::from_secs(60), || {
        let done = failing.try_wait().ok().flatten().is_some();
        async move { done }
    })
    .await
    .unwrap();
    let log = failing.log();
    assert!(
        log.to_lowercase().contains("error"),
        "the start-up fails with an error: {log}"
    );
    assert_clean("the start-up error", &log);
    let validate = std::process::Command::new(refetch_integration_tests::refetch_binary().unwrap())
        .args([
            "validate",
            "--connect",
            "--config",
            s.config.to_str().unwrap(),
        ])
        .envs(env)
        .output()
        .unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&validate.stdout),
        String::from_utf8_lossy(&validate.stderr)
    );
    assert!(!validate.status.success(), "{out}");
    assert_clean("validate --connect", &out);
}
