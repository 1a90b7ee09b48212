//! `refetch backfill` against a source that reports a listing's total only in a response header
//! (`X-Total-Count`), configured as `total = { header = "X-Total-Count" }`: the progress bar has
//! its length and an ETA, as an operator sees it on a terminal.
//!
//! The bar is drawn only when standard error is a terminal, so the binary runs under
//! `script(1)` (util-linux), which gives it a pseudo-terminal and copies what it draws. No broker
//! or database is needed: the listing's items are complete and the SQLite sink guards on versions,
//! so the backfill writes them directly.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use refetch_testkit::http_source::{HttpSource, HttpSourceOptions};
use serde_json::json;

/// Entities in the source, and items per listing page.
const ENTITIES: usize = 60;
const PAGE: usize = 5;

fn write_config(dir: &Path, base: &str, total: &str) -> String {
    let path = dir.join("refetch.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[kafka]
brokers = "127.0.0.1:9"
group_id = "unused"

[[topics]]
name = "unused"
decoder = {{ kind = "json", fixed_type = "customer", id = "/id" }}

[fetcher.sources.customer]
url = "{base}/customer/{{id}}"
version = {{ pointer = "/version", kind = "integer" }}

[fetcher.sources.customer.listing]
url = "{base}/customer?offset={{offset}}&limit={{limit}}"
paging = "offset"
page_size = {PAGE}
complete = true
total = {total}

[sink]
kind = "sqlite"
path = "{db}"

[ops]
listen = "127.0.0.1:0"
"#,
            db = dir.join("sink.db").display()
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_owned()
}

/// Run `refetch backfill --config <config>` on a pseudo-terminal; its exit code and everything
/// it drew (escape sequences and carriage returns included).
async fn backfill_on_a_terminal(config: &str) -> (i32, String) {
    let command = format!(
        "'{}' backfill --config '{config}'",
        env!("CARGO_BIN_EXE_refetch")
    );
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("script")
            .args(["-q", "-e", "-f", "-c", &command, "/dev/null"])
            .env("RUST_LOG", "warn")
            .env("TERM", "xterm")
            .env("COLUMNS", "160")
            .output(),
    )
    .await
    .expect("the backfill finished within a minute")
    .expect("script(1) from util-linux runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// The positions drawn as `N/<ENTITIES> items`, and whether each such frame shows an ETA.
fn frames(drawn: &str) -> Vec<(usize, bool)> {
    let marker = format!("/{ENTITIES} items");
    drawn
        .split(['\r', '\n'])
        .filter_map(|frame| {
            let at = frame.find(&marker)?;
            let digits: String = frame[..at]
                .chars()
                .rev()
                .take_while(char::is_ascii_digit)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            let pos = digits.parse().ok()?;
            let eta = frame[at..]
                .split_once("ETA ")
                .is_some_and(|(_, rest)| rest.starts_with(|c: char| c.is_ascii_digit()));
            Some((pos, eta))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_shows_progress_and_an_eta_from_a_total_header() {
    let source = HttpSource::start(HttpSourceOptions::default())
        .await
        .unwrap();
    for i in 0..ENTITIES {
        source.put("customer", &format!("c{i:03}"), json!({"n": i}));
    }
    // Only the header carries the total; each page takes a while, so the bar is drawn often.
    source.set_total_header(Some("X-Total-Count"));
    source.set_latency(Duration::from_millis(150));

    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &source.base_url(),
        r#"{ header = "X-Total-Count" }"#,
    );
    let (code, drawn) = backfill_on_a_terminal(&config).await;
    assert_eq!(code, 0, "{drawn}");
    assert!(
        drawn.contains(&format!(
            "customer: {} page(s), {ENTITIES} item(s) ({ENTITIES} written from the listing",
            ENTITIES / PAGE + 1
        )),
        "{drawn}"
    );
    let seen = frames(&drawn);
    assert!(
        seen.len() >= 3,
        "too few progress frames with a length: {seen:?}\n{drawn}"
    );
    assert!(
        seen.iter().all(|(_, eta)| *eta),
        "a frame without an ETA: {seen:?}\n{drawn}"
    );
    let positions: Vec<usize> = seen.iter().map(|(p, _)| *p).collect();
    assert!(
        positions.windows(2).all(|w| w[0] <= w[1]),
        "progress went back: {positions:?}"
    );
    assert!(
        positions.iter().any(|p| *p > 0 && *p < ENTITIES),
        "no frame mid-way: {positions:?}"
    );

    // The same source with the total read from the body, where it is not: the bar has no
    // length, so neither `N/60` nor an ETA is drawn. The header is what gave them.
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &source.base_url(), r#""/total""#);
    let (code, drawn) = backfill_on_a_terminal(&config).await;
    assert_eq!(code, 0, "{drawn}");
    assert!(frames(&drawn).is_empty(), "{drawn}");
    assert!(!drawn.contains("ETA"), "{drawn}");
    assert!(
        drawn.contains("items"),
        "the spinner still counts items: {drawn}"
    );
}

/// Issue 19: an invalid `listing.total` is a configuration error (exit 2) that names the key's
/// place and says what is expected.
#[tokio::test]
async fn a_total_of_the_wrong_shape_is_refused_with_its_place() {
    for (total, says) in [
        (
            r#"{ heder = "X-Total-Count" }"#,
            "unknown key `heder`, expected `header` or `pointer`",
        ),
        (
            r#""X-Total-Count""#,
            "for a response header write total = { header = \"X-Total-Count\" }",
        ),
        (
            "12",
            "a JSON pointer such as \"/total\", or a table such as { header = \"X-Total-Count\" }",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let config = write_config(dir.path(), "http://127.0.0.1:9", total);
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_refetch"))
            .args(["validate", "--config", &config])
            .output()
            .await
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(2), "{total}: {text}");
        assert!(text.contains(says), "{total}: {text}");
        assert!(text.contains("refetch.toml:19:"), "{total}: {text}");
    }
}
