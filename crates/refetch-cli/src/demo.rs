//! `refetch demo`: the whole pattern in one process, with nothing to install.
//!
//! - librdkafka's **mock cluster** runs in-process; the notification topic has 3 partitions, so
//!   the real Kafka code path runs: consumer group join, cooperative rebalance, commits, the
//!   idempotent dead-letter producer.
//! - [`crate::demo_source`] is the REST source: customers change in saves, each save announced by
//!   several field events (`--duplicates`), some customers much more often than others.
//! - The real HTTP fetcher (`refetch-http`) fetches `GET /customers/{id}`; `address` events are
//!   routed to their customer by the JSON decoder.
//! - The SQLite sink (`refetch-sinks`) writes to a temporary folder.
//!
//! The demo waits until the committed offsets reach the end offsets, shuts the pipeline down,
//! prints a summary (coalescing ratio, latency, offsets) and checks that the sink holds exactly
//! the source's state for every customer that changed (and nothing else); it exits 1 if not. SIGINT/SIGTERM stop it early
//! (gracefully: the summary is printed, the equality check is skipped).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rand::{Rng, SeedableRng};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use refetch::{Sink, Version};
use refetch_http::{HttpFetcherConfig, NotFoundConfig, SourceConfig, VersionConfig};
use refetch_sinks::SqliteConfig;
use refetch_sinks::sqlite::SqliteSink;
use refetch_sinks::stored::StoredBody;

use crate::cli::DemoArgs;
use crate::config::{
    Config, DecoderSection, EngineSection, JsonDecoderSection, KafkaSection, RouteSection,
    TopicSection,
};
use crate::demo_source::DemoSource;
use crate::signals::Signals;
use crate::{logging, ops, wiring};

/// The demo's notification topic.
pub const TOPIC: &str = "demo.customer-changes";
/// The demo's consumer group.
pub const GROUP: &str = "refetch-demo";
/// Partitions of the notification topic.
pub const PARTITIONS: i32 = 3;

/// The configuration the demo runs with (what a user would write in a file).
pub fn demo_config(brokers: &str, source_base: &str, window: Duration) -> Config {
    let mut fetcher = HttpFetcherConfig::default();
    fetcher.sources.insert(
        "customer".to_owned(),
        SourceConfig {
            version: Some(VersionConfig {
                pointer: Some("/version".to_owned()),
                header: None,
                kind: refetch::VersionKind::Integer,
            }),
            not_found: Some(NotFoundConfig {
                pointer: Some("/error".to_owned()),
                equals: Some("not_found".to_owned()),
                contains: None,
            }),
            concurrency: 64,
            ..SourceConfig::new(format!("{source_base}/customers/{{id}}"))
        },
    );
    let engine = EngineSection {
        window,
        max_wait: (window * 10).max(Duration::from_secs(2)),
        commit_interval: Duration::from_millis(200),
        ..EngineSection::default()
    };
    Config {
        kafka: KafkaSection {
            brokers: brokers.to_owned(),
            group_id: GROUP.to_owned(),
            ..KafkaSection::default()
        },
        topics: vec![TopicSection {
            name: TOPIC.to_owned(),
            decoder: DecoderSection::Json(JsonDecoderSection {
                type_pointer: Some("/type".to_owned()),
                routes: vec![RouteSection {
                    from_type: "address".to_owned(),
                    to_type: "customer".to_owned(),
                    id: "/customer_id".to_owned(),
                    version: None,
                }],
                ..JsonDecoderSection::default()
            }),
        }],
        engine,
        fetcher,
        ..Config::default()
    }
}

/// `refetch demo`.
pub async fn demo(args: &DemoArgs, signals: Signals) -> anyhow::Result<ExitCode> {
    logging::init("warn", crate::config::LogFormat::Text);
    let started = Instant::now();
    let prometheus = ops::install_recorder();

    let cluster = rdkafka::mocking::MockCluster::new(1).context("starting the mock cluster")?;
    cluster
        .create_topic(TOPIC, PARTITIONS, 1)
        .context("creating the notification topic")?;
    cluster
        .create_topic(&format!("{GROUP}.dlq"), 1, 1)
        .context("creating the dead-letter topic")?;
    let brokers = cluster.bootstrap_servers();

    let source = DemoSource::start()
        .await
        .context("starting the demo source")?;
    let folder = tempfile::tempdir().context("creating a temporary folder")?;
    let sink = Arc::new(
        SqliteSink::open(&SqliteConfig {
            path: folder.path().join("demo.db"),
            table: "customers".to_owned(),
            ..SqliteConfig::default()
        })
        .await
        .context("opening the SQLite sink")?,
    );

    let cfg = demo_config(&brokers, &source.base_url(), args.window);
    if let Some(i) = cfg.check().first() {
        anyhow::bail!("demo configuration: {}: {}", i.path, i.message);
    }
    let (fetcher, stats) = wiring::build_fetcher(&cfg.fetcher)?;
    let pipeline = wiring::consuming_pipeline(&cfg, fetcher, sink.clone() as Arc<dyn Sink>, None)?;
    let handle = pipeline.handle();

    let _ops = match args.listen.0 {
        Some(listen) => match ops::serve(
            listen,
            ops::OpsState {
                handle: handle.clone(),
                prometheus,
                fetch: stats.clone(),
                title: format!("{GROUP} (demo)"),
                started,
                observed: crate::observe::Observed::from_config(&cfg),
            },
        )
        .await
        {
            Ok(server) => {
                eprintln!("status page: http://{}/", server.addr);
                eprintln!(
                    "(served while the demo runs: a few seconds at the default rate; `--rate 500` \
                     takes about a minute)"
                );
                Some(server)
            }
            Err(e) => {
                eprintln!(
                    "status page not served ({listen}: {e}); use --listen to pick another address"
                );
                None
            }
        },
        None => None,
    };

    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let interrupted = interrupted.clone();
        let handle = handle.clone();
        let signal = signals.stopped();
        tokio::spawn(async move {
            signal.await;
            interrupted.store(true, Ordering::SeqCst);
            handle.shutdown();
        });
    }
    let run = tokio::spawn(pipeline.run(std::future::pending::<()>()));

    eprintln!(
        "streaming {} notifications about {} customers ({} events per save, window {}) through \
         the mock cluster ({brokers}), the demo source ({}) and SQLite ({})",
        args.notifications,
        args.entities,
        args.duplicates,
        humantime::format_duration(args.window),
        source.base_url(),
        folder.path().join("demo.db").display()
    );
    let bar = progress_bar(args.notifications as u64);

    // Produce: saves at the source, then their field events (outbox order).
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("linger.ms", "5")
        .set("enable.idempotence", "true")
        .create()
        .context("creating the demo producer")?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let hot = (args.entities / 10).max(1);
    let mut deliveries = Vec::with_capacity(args.notifications);
    let mut produced = 0usize;
    let produce_started = Instant::now();
    let mut last_status = Instant::now();
    while produced < args.notifications && !interrupted.load(Ordering::SeqCst) {
        if args.rate > 0 {
            let allowed = (produce_started.elapsed().as_secs_f64() * f64::from(args.rate)) as usize;
            if produced >= allowed {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        }
        // Half of the saves go to a tenth of the customers: some are edited again and again.
        let n = args.entities.max(1);
        let id = if rng.random_bool(0.5) {
            rng.random_range(0..hot)
        } else {
            rng.random_range(0..n)
        };
        let events = (args.duplicates as usize).min(args.notifications - produced);
        for e in source.save(&id.to_string(), events, &mut rng) {
            let mut record = FutureRecord::to(TOPIC)
                .key(e.customer_id.as_bytes())
                .payload(e.payload.as_bytes());
            loop {
                match producer.send_result(record) {
                    Ok(f) => {
                        deliveries.push(f);
                        break;
                    }
                    Err((err, back)) => {
                        if !matches!(
                            err.rdkafka_error_code(),
                            Some(rdkafka::types::RDKafkaErrorCode::QueueFull)
                        ) {
                            anyhow::bail!("producing a notification failed: {err}");
                        }
                        record = back;
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
            }
            produced += 1;
        }
        if last_status.elapsed() > Duration::from_millis(100) {
            last_status = Instant::now();
            update_bar(&bar, &handle).await;
        }
    }
    let _ = producer.flush(Duration::from_secs(30));
    let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
    for d in deliveries {
        match d.await {
            Ok(Ok(delivery)) => {
                let end = ends.entry(delivery.partition).or_insert(0);
                *end = (*end).max(delivery.offset + 1);
            }
            Ok(Err((e, _))) => anyhow::bail!("a notification was not delivered: {e}"),
            Err(_) => anyhow::bail!("a notification's delivery report was lost"),
        }
    }

    // Completion: committed offsets reach the end offsets.
    let deadline = Instant::now() + Duration::from_secs(120) + args.window * 4;
    let mut finished = false;
    while !interrupted.load(Ordering::SeqCst) && !run.is_finished() {
        update_bar(&bar, &handle).await;
        if let Some(st) = handle.status().await {
            let committed = committed_by_partition(&st);
            if ends
                .iter()
                .all(|(p, end)| committed.get(p).is_some_and(|c| c >= end))
            {
                finished = true;
                break;
            }
        }
        if Instant::now() > deadline {
            bar.abandon_with_message("timed out");
            eprintln!("the committed offsets did not reach the end offsets within the deadline");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    update_bar(&bar, &handle).await;
    bar.finish();
    handle.shutdown();
    let report = run.await.context("the pipeline task panicked")??;
    let elapsed = started.elapsed();

    let st = &report.status;
    let c = &st.counters;
    let fetch = stats.snapshot();
    let committed: BTreeMap<i32, i64> = st
        .partitions
        .iter()
        .filter(|p| p.topic == TOPIC)
        .filter_map(|p| Some((p.partition, p.committed?)))
        .collect();
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1} ms"));
    println!();
    println!("refetch demo summary ({:.1} s)", elapsed.as_secs_f64());
    println!("  {:<34} {}", "notifications produced", produced);
    println!("  {:<34} {}", "notifications consumed", c.notifications);
    println!("  {:<34} {}", "fetches", c.fetches);
    println!(
        "  {:<34} {}",
        "coalescing ratio",
        if c.fetches > 0 {
            format!(
                "{:.2} notifications per fetch",
                c.notifications as f64 / c.fetches as f64
            )
        } else {
            "-".to_owned()
        }
    );
    println!("  {:<34} {}", "requests at the source", source.requests());
    println!("  {:<34} {}", "durable writes", c.writes);
    println!("  {:<34} {}", "dead letters", c.dead_letters);
    println!(
        "  {:<34} {} / {}",
        "notification → durable p50 / p99",
        ms(st.latency_p50_ms),
        ms(st.latency_p99_ms)
    );
    println!(
        "  {:<34} {} / {}",
        "fetch latency p50 / p99",
        ms(fetch.p50_ms),
        ms(fetch.p99_ms)
    );
    println!("  {:<34} {:>10} {:>10}", "partition", "committed", "end");
    for p in 0..PARTITIONS {
        println!(
            "  {:<34} {:>10} {:>10}",
            format!("{TOPIC}/{p}"),
            committed
                .get(&p)
                .map_or_else(|| "-".to_owned(), |o| o.to_string()),
            ends.get(&p).copied().unwrap_or(0)
        );
    }

    if interrupted.load(Ordering::SeqCst) {
        println!("interrupted: stopped gracefully; the sink check is skipped");
        return Ok(ExitCode::SUCCESS);
    }
    if !finished {
        println!("FAILED: the pipeline did not commit every notification");
        return Ok(ExitCode::FAILURE);
    }
    let mismatches = compare(&source, &sink).await?;
    let customers = source.snapshot().len();
    if mismatches.is_empty() {
        println!(
            "check: the sink equals the source for all {customers} customers that changed \
             (of {} at the source), and holds nothing else",
            args.entities
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "FAILED: {} of {customers} customers differ between sink and source",
            mismatches.len()
        );
        for m in mismatches.iter().take(10) {
            println!("  {m}");
        }
        Ok(ExitCode::FAILURE)
    }
}

fn committed_by_partition(st: &refetch::Status) -> BTreeMap<i32, i64> {
    st.engine
        .partitions
        .iter()
        .filter(|p| p.topic == TOPIC)
        .filter_map(|p| Some((p.partition, p.committed?)))
        .collect()
}

fn progress_bar(len: u64) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{elapsed_precise} [{bar:36.cyan/blue}] {pos}/{len} committed · {msg}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

async fn update_bar(bar: &ProgressBar, handle: &refetch::PipelineHandle) {
    if let Some(st) = handle.status().await {
        let committed: i64 = committed_by_partition(&st).values().sum();
        bar.set_position(committed.max(0) as u64);
        let c = &st.engine.counters;
        let ratio = if c.fetches > 0 {
            c.notifications as f64 / c.fetches as f64
        } else {
            0.0
        };
        bar.set_message(format!(
            "{} consumed · {} fetches · ratio {ratio:.2} · {} pending",
            c.notifications, c.fetches, st.engine.pending_keys
        ));
    }
}

/// Customers whose state in the sink differs from the source, described.
pub async fn compare(source: &DemoSource, sink: &SqliteSink) -> anyhow::Result<Vec<String>> {
    let held = sink
        .snapshot()
        .await
        .map_err(|e| anyhow::anyhow!("reading the sink: {e}"))?;
    let mut out = Vec::new();
    let at_source = source.snapshot();
    for (id, customer) in &at_source {
        let key = refetch::EntityKey::new("customer", id.as_str());
        match held.get(&key) {
            None => out.push(format!("customer {id}: missing in the sink")),
            Some(row) => {
                if row.version != Some(Version::Int(customer.version)) {
                    out.push(format!(
                        "customer {id}: sink holds version {:?}, source {}",
                        row.version, customer.version
                    ));
                } else if row.body != Some(StoredBody::Json(customer.body(id))) {
                    out.push(format!(
                        "customer {id}: body differs at version {}",
                        customer.version
                    ));
                }
            }
        }
    }
    for key in held.keys() {
        if key.entity_type() != "customer" || !at_source.contains_key(key.id()) {
            out.push(format!("{key}: in the sink but not at the source"));
        }
    }
    Ok(out)
}
