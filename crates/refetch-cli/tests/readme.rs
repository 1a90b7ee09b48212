//! Every command of the README's "Running the binary" section, run as written against the test
//! broker: `refetch.toml` is a configuration for a fresh topic and group, a local REST source
//! (with a listing, for backfill and reconcile) and a SQLite sink. `run` is started, waited for
//! and stopped with SIGTERM; every other command must exit 0.
//!
//! Needs a real broker: `scripts/test`, or `REFETCH_TEST_KAFKA=host:port cargo test -p
//! refetch-cli --test readme -- --include-ignored`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use serde_json::json;
use support::{Env, Run};

/// The commands of the README's "Running the binary" block, without their comments.
fn readme_commands() -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let section = readme
        .split("## Running the binary")
        .nth(1)
        .expect("the README has a Running the binary section");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a sh block");
    block
        .lines()
        .map(|l| l.split("  #").next().unwrap_or(l).trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn the_readme_shows_every_subcommand_but_the_demo() {
    let commands = readme_commands();
    for sub in [
        "validate",
        "run",
        "dlq list",
        "dlq redrive",
        "fetch",
        "offsets",
        "backfill",
        "reconcile",
        "completions",
    ] {
        assert!(
            commands
                .iter()
                .any(|c| c.starts_with(&format!("refetch {sub}"))),
            "{sub} missing from {commands:?}"
        );
    }
    assert!(
        commands.iter().all(|c| c.starts_with("refetch ")),
        "{commands:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn every_command_of_the_readme_runs_against_the_test_broker() {
    let env = Env::new("readme", 2).await;
    for i in 1..=42 {
        env.source
            .put("customer", &i.to_string(), json!({ "n": i }));
    }
    let db = env.dir.path().join("sink.db");
    let config = env
        .config_text(&[&env.topic], "20ms", "info,rdkafka=warn", "")
        .replace(
            &format!("kind = \"jsonl\"\npath = \"{}\"", env.sink.display()),
            &format!("kind = \"sqlite\"\npath = \"{}\"", db.display()),
        )
        .replace(
            "[sink]",
            &format!(
                "[fetcher.sources.customer.listing]\nurl = \"{}/customer?offset={{offset}}&limit={{limit}}\"\ntotal = \"/total\"\n\n[sink]",
                env.source.base_url()
            ),
        );
    // The README's commands run in a folder holding `refetch.toml`.
    env.write_config(&config);
    env.change(&env.topic, 1..=5).await;
    let commands = readme_commands();
    assert!(commands.len() >= 10, "{commands:?}");
    for command in commands {
        let (line, redirect) = match command.split_once(" > ") {
            Some((c, file)) => (c.to_owned(), Some(file.trim().to_owned())),
            None => (command.clone(), None),
        };
        let args: Vec<&str> = line.split_whitespace().skip(1).collect();
        if args.first() == Some(&"run") {
            let mut run = Run::start_in(&args, env.dir.path(), &env.dir.path().join("run.log"));
            run.wait_log("refetch running", 1).await;
            env.wait_committed(&env.topic, &run).await;
            run.signal("TERM").await;
            assert_eq!(
                run.exit_code(Duration::from_secs(60)).await,
                Some(0),
                "{command}\n{}",
                run.log_tail()
            );
            continue;
        }
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_refetch"))
            .args(&args)
            .current_dir(env.dir.path())
            .env("RUST_LOG", "warn")
            .output()
            .await
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.status.code(), Some(0), "`{command}`:\n{text}");
        if let Some(file) = redirect {
            std::fs::write(env.dir.path().join(&file), &out.stdout).unwrap();
            assert!(!out.stdout.is_empty(), "`{command}` printed nothing");
        }
    }
    // They did what they say: backfill loaded every listed customer into the sink.
    let sink = refetch_sinks::sqlite::SqliteSink::open(&refetch_sinks::SqliteConfig {
        path: db,
        ..refetch_sinks::SqliteConfig::default()
    })
    .await
    .unwrap();
    let held = sink.snapshot().await.unwrap();
    assert_eq!(held.len(), 42, "{:?}", held.keys().collect::<Vec<_>>());
    assert!(
        std::fs::read_to_string(env.dir.path().join("refetch.bash"))
            .unwrap()
            .contains("refetch")
    );
}
