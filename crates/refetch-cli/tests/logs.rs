//! Logs of `refetch run` as a log pipeline sees them, with brokers that cannot be reached (a
//! closed port between 29000 and 29999; no broker needed):
//!
//! - in JSON mode every line is one JSON object, the fatal error that ends the process
//!   included, and the Kafka clients' repeated errors are de-duplicated and rate-limited
//!   (a handful of lines with counts, where the clients report hundreds);
//! - in text mode, written to a file, no line holds an ANSI colour code.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use refetch_testkit::process::spawn;

/// A closed port in the private range.
fn closed_port() -> u16 {
    for port in 29500..29999 {
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between 29500 and 29999");
}

fn config(dir: &Path, format: &str) -> std::path::PathBuf {
    let broker = closed_port();
    let path = dir.join(format!("{format}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"
[kafka]
brokers = "127.0.0.1:{broker}"
group_id = "logs-test"

[[topics]]
name = "changes"
decoder = {{ kind = "json", fixed_type = "customer", id = "/id" }}

[fetcher.sources.customer]
url = "http://127.0.0.1:{broker}/customer/{{id}}"

[sink]
kind = "stdout"

[ops]
listen = "127.0.0.1:0"

[log]
level = "info"
format = "{format}"
"#
        ),
    )
    .unwrap();
    path
}

/// Run `refetch run` until it gives up on the brokers; its exit code and standard error.
async fn run_until_it_fails(dir: &Path, format: &str) -> (Option<i32>, String) {
    let cfg = config(dir, format);
    let mut child = spawn(
        env!("CARGO_BIN_EXE_refetch"),
        ["run", "--config", cfg.to_str().unwrap()],
        [("RUST_LOG", "info")],
        dir.join(format!("{format}.log")),
    )
    .unwrap();
    let status = child.wait(Duration::from_secs(90)).await.unwrap();
    (status.code(), child.log())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_json_to_the_last_line_and_repeated_client_errors_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let (code, log) = run_until_it_fails(dir.path(), "json").await;
    assert_eq!(code, Some(1), "{log}");
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}\n{log}")))
        .collect();
    let last = lines.last().expect("some lines");
    assert_eq!(last["level"], "ERROR", "{last}");
    assert!(
        last["message"]
            .as_str()
            .is_some_and(|m| m.contains("cannot reach the Kafka brokers")),
        "the fatal line is the last: {last}"
    );
    // The clients' lines: few, each distinct text once plus a summary per interval, and the
    // summaries count what they stand for.
    let client: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l["target"] == "rdkafka").collect();
    assert!(!client.is_empty(), "the broker failure is reported:\n{log}");
    assert!(
        client.len() <= 20,
        "{} client lines in one start-up attempt:\n{log}",
        client.len()
    );
    assert!(
        lines
            .iter()
            .all(|l| l["target"] != "librdkafka" && l["target"] != "rdkafka::client"),
        "every client line goes through the de-duplicating client log:\n{log}"
    );
    let counted: u64 = client.iter().filter_map(|l| l["count"].as_u64()).sum();
    assert!(
        counted > client.len() as u64,
        "repeats are counted, not dropped ({counted} in {} lines):\n{log}",
        client.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_logs_written_to_a_file_hold_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let (code, log) = run_until_it_fails(dir.path(), "text").await;
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains(" ERROR "), "{log}");
    assert!(
        log.contains("error: cannot reach the Kafka brokers"),
        "{log}"
    );
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escape codes in a log file:\n{log}"
    );
}
