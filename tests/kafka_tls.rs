//! TLS and SASL/SCRAM to Kafka: a PRIVATE broker with a SASL_SSL listener (`scripts/kafka` with
//! `REFETCH_KAFKA_SASL_SSL_PORT`: a test CA and a broker certificate made by openssl, SCRAM users
//! created when the storage is formatted). `refetch run` connects through that listener only
//! (SCRAM-SHA-512 over TLS, the CA from the test, the password from the environment), converges
//! and commits; a wrong password and an untrusted CA are refused by `refetch validate --connect`,
//! and the password never appears in its output or the logs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "pg_scenario.rs"]
mod pg_scenario;

use std::collections::BTreeSet;
use std::time::Duration;

use pg_scenario::PgScenario;
use refetch_testkit::postgres;
use refetch_testkit::process::{run_script, run_script_blocking, terminate};

const PORT: u16 = 19582;
const SASL_PORT: u16 = 19584;
const PASSWORD: &str = "Scram-7c41f0e2-Password";

struct Broker {
    env: Vec<(&'static str, String)>,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = run_script_blocking("kafka", &["reset"], &self.env);
    }
}

fn properties(ca: &str, password_var: &str) -> String {
    format!(
        r#"properties = {{ "security.protocol" = "SASL_SSL", "sasl.mechanisms" = "SCRAM-SHA-512", "sasl.username" = "refetch", "sasl.password" = "${{{password_var}}}", "ssl.ca.location" = "{ca}" }}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_scram_over_tls_to_a_private_broker() {
    let broker = Broker {
        env: vec![
            ("REFETCH_KAFKA_PORT", PORT.to_string()),
            ("REFETCH_KAFKA_SASL_SSL_PORT", SASL_PORT.to_string()),
            ("REFETCH_KAFKA_SASL_PASSWORD", PASSWORD.to_string()),
        ],
    };
    let out = run_script("kafka", &["up", "--fresh"], &broker.env)
        .await
        .unwrap();
    let ca = out
        .split_whitespace()
        .find_map(|w| w.strip_prefix("REFETCH_TEST_KAFKA_CA="))
        .expect("the script names the CA")
        .to_owned();
    // Topics are made over the PLAINTEXT listener; refetch only ever sees the SASL_SSL one.
    let mut s = PgScenario::new(
        format!("127.0.0.1:{PORT}"),
        postgres::url().unwrap(),
        "tls",
        3,
    )
    .await
    .unwrap();
    s.run_brokers = format!("127.0.0.1:{SASL_PORT}");
    s.kafka_extra = properties(&ca, "KAFKA_PASSWORD");
    s.log_level = "debug".into();
    s.write_config().unwrap();
    let ids: Vec<usize> = (0..300).collect();
    s.change(&ids, 2).await.unwrap();
    let env = [
        ("KAFKA_PASSWORD", PASSWORD),
        ("RUST_LOG", "debug,rdkafka=info"),
    ];
    let mut child = s.spawn("run", &env).unwrap();
    s.joined(&child).await.unwrap();
    s.change(&ids[..100], 0).await.unwrap();
    s.until_committed(Duration::from_secs(90), &[&child])
        .await
        .unwrap();
    let status = terminate(&mut child, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0), "{}", child.log());
    let (checked, diff) = s.differences(&BTreeSet::new()).await.unwrap();
    assert_eq!((checked, diff.len()), (300, 0), "{diff:?}");
    assert!(s.dead_letters().await.unwrap().is_empty());
    let log = child.log();
    assert!(!log.contains(PASSWORD), "the SASL password is logged");

    let validate = |env: Vec<(&'static str, String)>| {
        let out = std::process::Command::new(refetch_integration_tests::refetch_binary().unwrap())
            .args([
                "validate",
                "--connect",
                "--config",
                s.config.to_str().unwrap(),
            ])
            .envs(env)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, text) = validate(vec![("KAFKA_PASSWORD", PASSWORD.into())]);
    assert!(ok, "validate --connect with the right password: {text}");
    let wrong = "Wrong-19d0-Password";
    let (ok, text) = validate(vec![("KAFKA_PASSWORD", wrong.into())]);
    assert!(!ok, "a wrong password is refused: {text}");
    assert!(
        !text.contains(wrong) && !text.contains(PASSWORD),
        "the password is printed: {text}"
    );
    // A CA that did not sign the broker's certificate: the TLS handshake fails.
    let other_ca = s.dir.path().join("other-ca.pem");
    let made = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=other CA", "-keyout"])
        .arg(s.dir.path().join("other-ca.key"))
        .arg("-out")
        .arg(&other_ca)
        .output()
        .unwrap();
    assert!(made.status.success());
    s.kafka_extra = properties(other_ca.to_str().unwrap(), "KAFKA_PASSWORD");
    s.write_config().unwrap();
    let (ok, text) = validate(vec![("KAFKA_PASSWORD", PASSWORD.into())]);
    assert!(!ok, "an untrusted broker certificate is refused: {text}");
    assert!(!text.contains(PASSWORD));
    drop(broker);
}
