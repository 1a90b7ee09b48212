//! The status page in a real headless browser: Debian's chromium loads `/` from a running
//! `refetch demo` twice while notifications flow, and the numbers it renders move.
//!
//! Needs `chromium` on the PATH (`apt-get install -y chromium`); run with `scripts/test` or
//! `cargo test -p refetch-cli --test status_page_browser -- --include-ignored`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use refetch_testkit::process::{spawn, terminate, wait_for_value};
use tokio::process::Command;

/// The DOM of `url` after chromium loaded and rendered it.
async fn dump_dom(url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("--dump-dom")
            .arg(url)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium finished within 60 s")
    .expect("chromium runs (install it with `apt-get install -y chromium`)");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The number in `<b id="{id}">N</b>`.
fn figure(dom: &str, id: &str) -> u64 {
    let start = format!("<b id=\"{id}\">");
    let at = dom
        .find(&start)
        .unwrap_or_else(|| panic!("no #{id} in the DOM:\n{dom}"))
        + start.len();
    dom[at..]
        .split('<')
        .next()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("#{id} is not a number in:\n{dom}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs chromium: run scripts/test"]
async fn the_status_page_renders_in_chromium_and_its_numbers_move() {
    let dir = tempfile::tempdir().unwrap();
    let mut demo = spawn(
        env!("CARGO_BIN_EXE_refetch"),
        [
            "demo",
            "--notifications",
            "200000",
            "--rate",
            "1000",
            "--listen",
            "127.0.0.1:0",
        ],
        [("RUST_LOG", "warn")],
        dir.path().join("demo.log"),
    )
    .unwrap();
    let addr = wait_for_value("the status page address", Duration::from_secs(30), || {
        let log = demo.log();
        async move {
            log.lines()
                .find_map(|l| l.strip_prefix("status page: http://"))
                .map(|a| a.trim_end_matches('/').to_owned())
        }
    })
    .await
    .unwrap();
    let url = format!("http://{addr}/");

    // First load once notifications flow, then load again until the page shows more.
    let first = wait_for_value("a page with notifications", Duration::from_secs(60), || {
        let url = url.clone();
        async move {
            let dom = dump_dom(&url).await;
            (figure(&dom, "notifications") > 0).then_some(dom)
        }
    })
    .await
    .unwrap();
    let second = wait_for_value("the numbers to change", Duration::from_secs(60), || {
        let (url, before) = (url.clone(), figure(&first, "notifications"));
        async move {
            let dom = dump_dom(&url).await;
            (figure(&dom, "notifications") > before).then_some(dom)
        }
    })
    .await
    .unwrap();

    assert!(figure(&second, "fetches") >= figure(&first, "fetches"));
    for dom in [&first, &second] {
        assert!(
            dom.contains("<title>refetch · refetch-demo (demo)</title>"),
            "{dom}"
        );
        assert!(dom.contains("Coalescing ratio"), "{dom}");
        assert!(dom.contains("demo.customer-changes/0"), "{dom}");
        assert!(dom.contains("demo.customer-changes/2"), "{dom}");
        assert!(
            dom.contains("http-equiv=\"refresh\" content=\"2\""),
            "{dom}"
        );
    }
    // Customers were fetched, so the source's breaker is listed (closed).
    assert!(second.contains("<td>customer</td>"), "{second}");

    let status = terminate(&mut demo, Duration::from_secs(60)).await.unwrap();
    assert_eq!(status.code(), Some(0), "{}", demo.log());
}
