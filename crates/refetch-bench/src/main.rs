//! `refetch-bench`: produce a workload to a real broker, run each contender against it, and publish
//! a table and a chart per workload. See `docs/benchmarks.md`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use refetch_bench::contender::{self, ContenderArgs, ContenderKind};
use refetch_bench::driver::{DriverOptions, Row, WorkloadRun};
use refetch_bench::workload::WorkloadSpec;
use refetch_bench::{WORKLOADS, chart, preset, report};

const AFTER_HELP: &str = "\
Examples:
  # everything, as published in docs/benchmarks.md (about 40 minutes on 2 cores, see docs/benchmarks.md)
  export REFETCH_TEST_KAFKA=127.0.0.1:19092
  mvn -B -q -f bench/peers/pom.xml package
  cargo build --release -p refetch-bench
  target/release/refetch-bench run --out bench/results

  # one workload, three contenders, a tenth of the size
  target/release/refetch-bench run --workloads live-bursts \\
      --contenders batch-dedupe,refetch-default,refetch-tuned --scale 0.1 --out /tmp/bench

  # list the workloads, rebuild tables, charts and targets from the saved JSON
  target/release/refetch-bench list
  target/release/refetch-bench render --out bench/results";

#[derive(Parser)]
#[command(
    version,
    about = "Benchmark refetch against the raw consumer, the loops a team would write and peer frameworks",
    long_about = "Benchmark refetch against the raw Kafka consumer, the micro-batch loops a team would write \
(concurrent-loop, batch-dedupe) and peer frameworks (Kafka Streams, Apache Camel), on a real broker, \
the same local REST source and the same sink, in one invocation. Each contender runs as its own \
process; CPU time and peak RSS are read from /proc, completion from the group's commits, and \
freshness from the save to the first durable write at or above its version.",
    after_help = AFTER_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run workloads and write `<out>/<workload>.{md,json,png}` and `<out>/targets.md`.
    Run {
        /// Bootstrap servers of the broker.
        #[arg(long, env = "REFETCH_TEST_KAFKA")]
        brokers: String,
        /// Workloads, comma-separated (`refetch-bench list` shows them); default: all but `smoke`.
        #[arg(long, value_delimiter = ',')]
        workloads: Vec<String>,
        /// Run only these contenders (default: each workload's own list).
        #[arg(long, value_delimiter = ',', value_enum)]
        contenders: Vec<ContenderKind>,
        /// Multiply every backlog and live stream (0.1 for a quick run).
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        /// Time cap per contender, from its first record.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "30s")]
        cap: Duration,
        /// Partitions per topic.
        #[arg(long, default_value_t = 4)]
        partitions: i32,
        /// Results folder.
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
        /// The Java peers' Maven project (build it with `mvn -B -q -f bench/peers/pom.xml package`).
        #[arg(long, default_value = "bench/peers")]
        peers: PathBuf,
        /// The TrueType font of the charts (default: DejaVu Sans from fonts-dejavu-core).
        #[arg(long, env = "REFETCH_BENCH_FONT")]
        font: Option<PathBuf>,
    },
    /// List the workloads, their contenders and what each shows.
    List,
    /// Run one contender (started by `run`; speaks a line protocol on stdin/stdout).
    #[command(hide = true)]
    Contender(ContenderArgs),
    /// Render `<out>/<workload>.md` and `.png` and `<out>/targets.md` again from the saved JSON.
    Render {
        /// Workloads to render (default: every `<out>/<workload>.json` there is).
        #[arg(long, value_delimiter = ',')]
        workloads: Vec<String>,
        /// Results folder.
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
        /// The TrueType font of the charts.
        #[arg(long, env = "REFETCH_BENCH_FONT")]
        font: Option<PathBuf>,
        /// Also replace the tables in this Markdown file: the text between
        /// `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` becomes `<out>/NAME.md`
        /// (`targets` for the targets table).
        #[arg(long)]
        doc: Option<PathBuf>,
    },
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Saved {
    workload: WorkloadSpec,
    rows: Vec<Row>,
    #[serde(default)]
    invocation: serde_json::Value,
}

fn has_unhealthy(spec: &WorkloadSpec) -> bool {
    spec.source.slow_key_share > 0.0 || spec.source.poison_hottest > 0
}

fn publish(out: &Path, spec: &WorkloadSpec, rows: &[Row]) -> anyhow::Result<()> {
    let table = report::table(spec, rows);
    println!("{table}");
    std::fs::write(out.join(format!("{}.md", spec.name)), &table)?;
    chart::write_png(
        &out.join(format!("{}.png", spec.name)),
        &format!("Workload {}", spec.name),
        rows,
        has_unhealthy(spec),
    )?;
    Ok(())
}

/// Every saved workload in `out`, in the order of [`WORKLOADS`].
fn saved(out: &Path, only: &[String]) -> anyhow::Result<Vec<Saved>> {
    let mut all = Vec::new();
    for name in WORKLOADS {
        if !only.is_empty() && !only.iter().any(|w| w == name) {
            continue;
        }
        let path = out.join(format!("{name}.json"));
        if !path.exists() {
            if !only.is_empty() {
                bail!("{} does not exist", path.display());
            }
            continue;
        }
        let s: Saved = serde_json::from_slice(
            &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
        )
        .with_context(|| format!("parsing {}", path.display()))?;
        all.push(s);
    }
    Ok(all)
}

/// Replace every `<!-- bench:NAME -->...<!-- /bench:NAME -->` block of `text` with the content of
/// `<out>/NAME.md`; blocks whose file is missing stay as they are.
pub fn splice(text: &str, out: &Path) -> anyhow::Result<String> {
    let mut result = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("<!-- bench:") {
        let open_end = rest[start..]
            .find("-->")
            .map(|i| start + i + 3)
            .context("an unclosed <!-- bench: marker")?;
        let name = rest[start + 11..open_end - 3].trim().to_owned();
        let close = format!("<!-- /bench:{name} -->");
        let close_at = rest[open_end..]
            .find(&close)
            .map(|i| open_end + i)
            .with_context(|| format!("no {close} after <!-- bench:{name} -->"))?;
        result.push_str(&rest[..open_end]);
        match std::fs::read_to_string(out.join(format!("{name}.md"))) {
            Ok(table) => {
                result.push('\n');
                result.push_str(table.trim_end());
                result.push('\n');
            }
            Err(_) => result.push_str(&rest[open_end..close_at]),
        }
        result.push_str(&close);
        rest = &rest[close_at + close.len()..];
    }
    result.push_str(rest);
    Ok(result)
}

fn write_targets(out: &Path) -> anyhow::Result<()> {
    let results: Vec<(WorkloadSpec, Vec<Row>)> = saved(out, &[])?
        .into_iter()
        .map(|s| (s.workload, s.rows))
        .collect();
    let table = report::targets_table(&report::verdicts(&results));
    println!("{table}");
    std::fs::write(out.join("targets.md"), table)?;
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
        Cmd::List => {
            for name in WORKLOADS {
                if let Some((spec, contenders)) = preset(name, 1.0) {
                    let c: Vec<&str> = contenders.iter().map(|k| k.label()).collect();
                    println!(
                        "{name}\n  {}\n  contenders: {}\n",
                        report::describe(&spec),
                        c.join(", ")
                    );
                }
            }
            Ok(())
        }
        Cmd::Render {
            workloads,
            out,
            font,
            doc,
        } => {
            chart::load_font(font.as_deref())?;
            for s in saved(&out, &workloads)? {
                publish(&out, &s.workload, &s.rows)?;
            }
            write_targets(&out)?;
            if let Some(doc) = doc {
                let text = std::fs::read_to_string(&doc)
                    .with_context(|| format!("reading {}", doc.display()))?;
                std::fs::write(&doc, splice(&text, &out)?)?;
                eprintln!("updated the tables in {}", doc.display());
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
            font,
        } => {
            // Fail before an hour of measuring, not after.
            chart::load_font(font.as_deref())?;
            let workloads: Vec<String> = if workloads.is_empty() {
                WORKLOADS
                    .iter()
                    .filter(|w| **w != "smoke")
                    .map(|w| (*w).to_owned())
                    .collect()
            } else {
                workloads
            };
            for name in &workloads {
                if preset(name, scale).is_none() {
                    bail!("unknown workload {name:?} (`refetch-bench list` shows them)");
                }
            }
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
                run_id: run_id.clone(),
                peers_dir: peers,
            };
            std::fs::create_dir_all(&out)?;
            let started = Instant::now();
            for name in workloads {
                let Some((spec, default_contenders)) = preset(&name, scale) else {
                    continue;
                };
                let kinds = if contenders.is_empty() {
                    default_contenders
                } else {
                    contenders.clone()
                };
                let w_started = Instant::now();
                let run = WorkloadRun::start(spec.clone()).await?;
                let mut rows: Vec<Row> = Vec::new();
                for kind in kinds {
                    let row = run.run(&opts, kind).await;
                    eprintln!("{}", serde_json::to_string(&row)?);
                    rows.push(row);
                }
                run.shutdown();
                publish(&out, &spec, &rows)?;
                let invocation = serde_json::json!({
                    "run_id": run_id,
                    "scale": scale,
                    "cap_s": cap.as_secs_f64(),
                    "partitions": partitions,
                    "workload_seconds": w_started.elapsed().as_secs_f64(),
                });
                std::fs::write(
                    out.join(format!("{name}.json")),
                    serde_json::to_vec_pretty(&Saved {
                        workload: spec,
                        rows,
                        invocation,
                    })?,
                )?;
            }
            write_targets(&out)?;
            eprintln!(
                "invocation {run_id} took {:.0} s",
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn splice_replaces_marked_blocks_with_their_tables() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.md"), "| new a |\n").unwrap();
        let text = "x\n<!-- bench:a -->\nold\n<!-- /bench:a -->\ny <!-- bench:b -->keep<!-- /bench:b --> z";
        let out = splice(text, dir.path()).unwrap();
        assert_eq!(
            out,
            "x\n<!-- bench:a -->\n| new a |\n<!-- /bench:a -->\ny <!-- bench:b -->keep<!-- /bench:b --> z"
        );
        assert!(splice("<!-- bench:a -->", dir.path()).is_err());
    }
}
