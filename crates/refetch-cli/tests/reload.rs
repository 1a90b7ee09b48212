//! SIGHUP reloads the configuration of a running `refetch run`, through the real binary against
//! the test broker: a live change (the log level) is applied without stopping anything, an
//! invalid file is refused and counted while the pipeline keeps running, and a change that needs
//! a rebuild (a new topic, a new window) drains, commits and rebuilds the pipeline in the same
//! process without losing a notification produced before, during or after the reload.
//!
//! Needs a real broker: `scripts/test`, or `REFETCH_TEST_KAFKA=host:port cargo test -p
//! refetch-cli --test reload -- --include-ignored`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use refetch_testkit::kafka;
use refetch_testkit::names::unique;
use support::{Env, Run, http_get, sample};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn sighup_applies_the_log_level_live_and_refuses_an_invalid_file() {
    let env = Env::new("reload_live", 2).await;
    let topic = env.topic.clone();
    let config = env.config_text(&[&topic], "20ms", "info,rdkafka=warn", "");
    env.write_config(&config);
    let mut run = Run::run(&env, "run.log");
    run.wait_log("refetch running", 1).await;
    let first = env.change(&topic, 1..=10).await;
    env.wait_held(&first, &run).await;

    // Live: the log level. Nothing is rebuilt; a debug line appears at once.
    env.write_config(&config.replace("info,rdkafka=warn", "debug,rdkafka=warn"));
    run.signal("HUP").await;
    run.wait_log("configuration reloaded: applied live", 1)
        .await;
    run.wait_log("log level applied", 1).await;
    let second = env.change(&topic, 11..=20).await;
    env.wait_held(&second, &run).await;

    // Invalid: refused with the file's line, counted, and the pipeline keeps running.
    let broken = config
        .replace("info,rdkafka=warn", "debug,rdkafka=warn")
        .replace("max_wait = \"1s\"", "max_wait = \"1s\"\nwindoww = \"5s\"");
    env.write_config(&broken);
    run.signal("HUP").await;
    run.wait_log("configuration reload refused", 1).await;
    let line = broken
        .lines()
        .position(|l| l.starts_with("windoww"))
        .unwrap()
        + 1;
    assert!(
        run.log()
            .contains(&format!("refetch.toml:{line}:1: `engine.windoww`")),
        "{}",
        run.log_tail()
    );
    assert!(run.running());
    let third = env.change(&topic, 21..=30).await;
    env.wait_held(&third, &run).await;

    // The same file again: nothing changed.
    env.write_config(&config.replace("info,rdkafka=warn", "debug,rdkafka=warn"));
    run.signal("HUP").await;
    run.wait_log("configuration reloaded: nothing changed", 1)
        .await;

    let metrics = http_get(&run.ops_addr(), "/metrics").await;
    for (result, n) in [
        ("applied", 1.0),
        ("invalid", 1.0),
        ("unchanged", 1.0),
        ("failed", 0.0),
    ] {
        let series = format!("refetch_config_reloads_total{{result=\"{result}\"}}");
        assert_eq!(sample(&metrics, &series), Some(n), "{series}\n{metrics}");
    }
    let log = run.log();
    assert!(!log.contains("rebuilding the pipeline"), "{log}");
    assert_eq!(log.matches("refetch running").count(), 1, "{log}");

    env.wait_committed(&topic, &run).await;
    run.signal("TERM").await;
    assert_eq!(
        run.exit_code(Duration::from_secs(60)).await,
        Some(0),
        "{}",
        run.log_tail()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn sighup_rebuilds_the_pipeline_for_a_new_topic_without_losing_a_notification() {
    let env = Env::new("reload_rebuild", 3).await;
    let topic = env.topic.clone();
    let second_topic = unique("reload_rebuild_b");
    kafka::create_topic(&env.brokers, &second_topic, 2)
        .await
        .unwrap();
    let config = env.config_text(&[&topic], "20ms", "info,rdkafka=warn", "");
    env.write_config(&config);
    let mut run = Run::run(&env, "run.log");
    run.wait_log("refetch running", 1).await;
    let mut notified = env.change(&topic, 1..=50).await;

    // Keep producing while the pipeline is drained and rebuilt.
    let producer = async {
        let mut out = Vec::new();
        for b in 0..10u32 {
            out.extend(
                env.change(&env.topic, (100 + b * 20)..=(119 + b * 20))
                    .await,
            );
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
        out
    };
    let reload = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        env.write_config(&env.config_text(
            &[&topic, &second_topic],
            "50ms",
            "info,rdkafka=warn",
            "",
        ));
        run.signal("HUP").await;
    };
    let (during, ()) = tokio::join!(producer, reload);
    notified.extend(during);
    run.wait_log("draining, committing and rebuilding the pipeline", 1)
        .await;
    run.wait_log("pipeline drained and committed", 1).await;
    run.wait_log("refetch running", 2).await;
    assert!(run.log().contains("generation=2"), "{}", run.log_tail());

    // The new topic is consumed, and so is everything on the old one.
    notified.extend(env.change(&second_topic, 1000..=1020).await);
    notified.extend(env.change(&topic, 2000..=2020).await);
    env.wait_held(&notified, &run).await;
    env.wait_committed(&topic, &run).await;
    env.wait_committed(&second_topic, &run).await;

    let metrics = http_get(&run.ops_addr(), "/metrics").await;
    assert_eq!(
        sample(&metrics, "refetch_config_reloads_total{result=\"applied\"}"),
        Some(1.0),
        "{metrics}"
    );
    run.signal("TERM").await;
    assert_eq!(
        run.exit_code(Duration::from_secs(60)).await,
        Some(0),
        "{}",
        run.log_tail()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real broker: run scripts/test"]
async fn a_reload_whose_pipeline_cannot_be_built_keeps_the_running_one() {
    let env = Env::new("reload_failed", 1).await;
    let topic = env.topic.clone();
    let config = env.config_text(&[&topic], "20ms", "info,rdkafka=warn", "");
    env.write_config(&config);
    let mut run = Run::run(&env, "run.log");
    run.wait_log("refetch running", 1).await;
    // A valid file whose dead-letter topic does not exist: the new pipeline is refused before
    // the running one is touched.
    env.write_config(&config.replace(
        &format!("group_id = \"{}\"", env.group),
        &format!(
            "group_id = \"{}\"\ndead_letter_topic = \"{}\"",
            env.group,
            unique("missing_dlq")
        ),
    ));
    run.signal("HUP").await;
    run.wait_log("configuration reload failed", 1).await;
    assert!(
        run.log().contains("dead-letter topic"),
        "{}",
        run.log_tail()
    );
    let after = env.change(&topic, 1..=10).await;
    env.wait_held(&after, &run).await;
    let metrics = http_get(&run.ops_addr(), "/metrics").await;
    assert_eq!(
        sample(&metrics, "refetch_config_reloads_total{result=\"failed\"}"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(run.log().matches("refetch running").count(), 1);
    run.signal("TERM").await;
    assert_eq!(
        run.exit_code(Duration::from_secs(60)).await,
        Some(0),
        "{}",
        run.log_tail()
    );
}
