//! `refetch-bench`: produce a workload to a real broker, run each contender against it, and publish
//! a table and a chart. See `docs/benchmarks.md`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use refetch_bench::contender::{self, ContenderArgs, ContenderKind};
use refetch_bench::driver::{DriverOptions, Row, WorkloadRun};
use refetch_bench::{chart, preset, report};

#[derive(Parser)]
#[command(
    version,
    about = "Benchmark refetch against the raw consumer, a hand-rolled loop and peers"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run workloads and write `<out>/<workload>.{md,json,png}`.
    Run {
        /// Bootstrap servers.
        #[arg(long, env = "REFETCH_TEST_KAFKA")]
        brokers: String,
        /// Workloads: dup-heavy, throughput, rss-small, rss-large.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "dup-heavy,throughput,rss-small,rss-large"
        )]
        workloads: Vec<String>,
        /// Run only these contenders (default: each workload's list).
        #[arg(long, value_delimiter = ',', value_enum)]
        contenders: Vec<ContenderKind>,
        /// Multiply every workload's notification count (0.1 for a quick run).
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        /// Time cap per contender, from its first record.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "120s")]
        cap: Duration,
        /// Partitions per topic.
        #[arg(long, default_value_t = 4)]
        partitions: i32,
        /// Results folder.
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
        /// The Java peers' Maven project.
        #[arg(long, default_value = "bench/peers")]
        peers: PathBuf,
    },
    /// Run one contender (started by `run`; speaks a line protocol on stdin/stdout).
    Contender(ContenderArgs),
    /// Render `<out>/<workload>.md` and `.png` again from `<out>/<workload>.json`.
    Render {
        /// Workloads to render.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "dup-heavy,throughput,rss-small,rss-large"
        )]
        workloads: Vec<String>,
        /// Results folder.
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
}

#[derive(serde::Deserialize)]
struct Saved {
    workload: refetch_bench::workload::WorkloadSpec,
    rows: Vec<Row>,
}

fn publish(
    out: &std::path::Path,
    name: &str,
    spec: &refetch_bench::workload::WorkloadSpec,
    rows: &[Row],
) -> anyhow::Result<()> {
    let table = report::table(spec, rows);
    println!("{table}");
    std::fs::write(out.join(format!("{name}.md")), &table)?;
    chart::write_png(&out.join(format!("{name}.png")), &spec.name, rows)?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rdkafka=warn".into()),
        )
        .init();
    match Cli::parse().command {
        Cmd::Contender(args) => contender::run(args).await,
        Cmd::Render { workloads, out } => {
            for name in workloads {
                let path = out.join(format!("{name}.json"));
                let saved: Saved = serde_json::from_slice(
                    &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
                )?;
                publish(&out, &name, &saved.workload, &saved.rows)?;
            }
            Ok(())
        }
        Cmd::Run {
            brokers,
            workloads,
            contenders,
            scale,
            cap,
            partitions,
            out,
            peers,
        } => {
            let run_id = format!(
                "{}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)?
                    .as_secs()
            );
            let opts = DriverOptions {
                brokers,
                exe: std::env::current_exe().context("locating this executable")?,
                partitions,
                cap,
                work_dir: out.join("tmp"),
                run_id,
                peers_dir: peers,
            };
            std::fs::create_dir_all(&out)?;
            for name in workloads {
                let Some((spec, default_contenders)) = preset(&name, scale) else {
                    bail!(
                        "unknown workload {name:?} (dup-heavy, throughput, rss-small, rss-large)"
                    );
                };
                let kinds = if contenders.is_empty() {
                    default_contenders
                } else {
                    contenders.clone()
                };
                let run = WorkloadRun::start(spec.clone()).await?;
                let mut rows: Vec<Row> = Vec::new();
                for kind in kinds {
                    let row = run.run(&opts, kind).await;
                    eprintln!("{}", serde_json::to_string(&row)?);
                    rows.push(row);
                }
                run.shutdown().await;
                publish(&out, &name, &spec, &rows)?;
                std::fs::write(
                    out.join(format!("{name}.json")),
                    serde_json::to_vec_pretty(
                        &serde_json::json!({"workload": spec, "rows": rows}),
                    )?,
                )?;
            }
            Ok(())
        }
    }
}
