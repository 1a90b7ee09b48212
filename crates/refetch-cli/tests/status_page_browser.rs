//! The status page in a real headless browser (Debian's chromium):
//!
//! - `/` of a running `refetch demo` loads twice while notifications flow, and the numbers it
//!   renders move;
//! - `/` of a `refetch run` (real broker) shows the healthy state with rates, lag per partition
//!   and the sink section, then, once deletes trip the gone guard and the source goes down, a
//!   prominent degraded state with every reason. A screenshot of the degraded page is saved
//!   under the target folder and its path printed.
//!
//! Needs `chromium` on the PATH (`apt-get install -y chromium`) and, for the second, a real
//! broker; run with `scripts/test` or `cargo test -p refetch-cli --test status_page_browser --
//! --include-ignored`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod obs_support;

use std::time::Duration;

use obs_support::{Setup, status_json};
use refetch_testkit::process::{spawn, terminate, wait_for, wait_for_value};
use tokio::process::Command;

/// The DOM of `url` after chromium loaded and rendered it.
async fn dump_dom(url: &str) -> String {
    let out = chromium(&["--dump-dom".to_owned()], url).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Save a screenshot of `url` to `path`.
async fn screenshot(url: &str, path: &std::path::Path) {
    chromium(
        &[
            "--window-size=1280,1800".to_owned(),
            "--hide-scrollbars".to_owned(),
            format!("--screenshot={}", path.display()),
        ],
        url,
    )
    .await;
    let png = std::fs::read(path).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "a PNG at {}", path.display());
}

/// Run headless chromium on `url` with `args`; its standard output.
async fn chromium(args: &[String], url: &str) -> Vec<u8> {
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
            .args(args)
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
    out.stdout
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

/// The text of the element with `id` (tags stripped).
fn text_of(dom: &str, id: &str) -> String {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in the DOM:\n{dom}"));
    let start = at + dom[at..].find('>').unwrap() + 1;
    let mut depth = 1;
    let mut out = String::new();
    let mut rest = &dom[start..];
    while let Some(lt) = rest.find('<') {
        out.push_str(&rest[..lt]);
        let gt = rest[lt..].find('>').unwrap() + lt;
        let tag = &rest[lt + 1..gt];
        if tag.starts_with('/') {
            depth -= 1;
            if depth == 0 {
                break;
            }
        } else if !tag.ends_with('/') && !["br", "meta", "img"].iter().any(|t| tag.starts_with(t)) {
            depth += 1;
        }
        out.push(' ');
        rest = &rest[gt + 1..];
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs chromium and a real broker: run scripts/test"]
async fn the_status_page_shows_health_then_a_degraded_state_with_its_reasons() {
    let setup = Setup::new("obs_page", 2).await;
    let config = setup.config(
        "page",
        "[engine.gone_guard]\nwindow = 20\nmin_samples = 5\nmax_ratio = 0.2\n\n\
         [fetcher.sources.customer.breaker]\nfailures = 2\ncooldown = \"120s\"\n",
    );
    let mut run = setup.start("page", &config, &[]).await;
    let url = format!("http://{}/", run.addr);

    // Healthy: a workload flows; rates, lag per partition and the sink section show it.
    let ids: Vec<(String, i64)> = (0..60)
        .map(|i| {
            let id = i.to_string();
            let v = setup
                .source
                .put("customer", &id, serde_json::json!({"n": i}));
            (id, v)
        })
        .collect();
    setup.announce(&ids).await;
    let healthy = wait_for_value(
        "a healthy page with the workload",
        Duration::from_secs(60),
        || {
            let url = url.clone();
            async move {
                let dom = dump_dom(&url).await;
                (figure(&dom, "writes") >= 60
                    && !text_of(&dom, "writes-rate").starts_with("0.0")
                    && text_of(&dom, "lag") == "0")
                    .then_some(dom)
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", run.child.log()));
    assert!(
        text_of(&healthy, "state").starts_with("Healthy"),
        "{healthy}"
    );
    assert!(healthy.contains("id=\"ready\">ready</span>"), "{healthy}");
    assert!(!healthy.contains("id=\"reasons\""), "{healthy}");
    let partitions = text_of(&healthy, "partitions");
    assert!(
        partitions.contains("log end") && partitions.contains("lag to end"),
        "{partitions}"
    );
    assert!(
        partitions.contains(&format!("{}/0", setup.topic)),
        "{partitions}"
    );
    let sink = text_of(&healthy, "sink");
    assert!(sink.contains("batches written"), "{sink}");
    assert!(
        text_of(&healthy, "sink-batches").parse::<u64>().unwrap() > 0,
        "{sink}"
    );
    assert_eq!(text_of(&healthy, "sink-errors"), "0 / 0", "{sink}");
    assert_eq!(text_of(&healthy, "broker"), "reachable");

    // Degraded: every announced entity is gone at the source (the gone guard trips and holds
    // the deletes), then the source goes down (its breaker opens).
    let deleted: Vec<(String, i64)> = (0..10)
        .map(|i| {
            let id = i.to_string();
            let v = setup.source.delete("customer", &id).unwrap();
            (id, v)
        })
        .collect();
    setup.announce(&deleted).await;
    wait_for("readiness to fail", Duration::from_secs(60), || {
        let addr = run.addr.clone();
        async move { status_json(&addr).await["ready"] == false }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", run.child.log()));
    setup.source.set_down(true).await.unwrap();
    let more: Vec<(String, i64)> = (100..110).map(|i| (i.to_string(), 1)).collect();
    setup.announce(&more).await;
    let degraded = wait_for_value(
        "a degraded page with both reasons",
        Duration::from_secs(60),
        || {
            let url = url.clone();
            async move {
                let dom = dump_dom(&url).await;
                let state = text_of(&dom, "state");
                (state.contains("gone guard") && state.contains("circuit breaker open"))
                    .then_some(dom)
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", run.child.log()));
    let state = text_of(&degraded, "state");
    assert!(state.starts_with("Degraded"), "{state}");
    assert!(degraded.contains("class=\"state degraded\""), "{degraded}");
    assert!(
        degraded.contains("id=\"ready\">not ready</span>"),
        "{degraded}"
    );
    // Every reason the pipeline gives for not being ready is on the page.
    let doc = status_json(&run.addr).await;
    for reason in doc["status"]["not_ready"].as_array().unwrap() {
        let reason = reason.as_str().unwrap();
        assert!(state.contains(reason), "{reason:?} not in {state:?}");
    }
    assert!(state.contains("source `customer`"), "{state}");
    assert_eq!(doc["degraded"], true);

    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page-degraded.png");
    screenshot(&url, &shot).await;
    println!("screenshot of the degraded status page: {}", shot.display());
    eprintln!("screenshot of the degraded status page: {}", shot.display());

    setup.source.set_down(false).await.unwrap();
    let status = terminate(&mut run.child, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0), "{}", run.child.log());
}
