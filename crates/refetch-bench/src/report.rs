//! The results tables: Markdown with ratios against the raw consumer and the `batch-dedupe` loop
//! measured in the same invocation, and the verdict on issue 18's targets.

use std::fmt::Write as _;

use crate::driver::Row;
use crate::workload::WorkloadSpec;

fn ms(v: Option<f64>) -> String {
    match v {
        None => "—".to_owned(),
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.1}"),
    }
}

fn ratio(a: f64, b: Option<f64>) -> String {
    match b {
        Some(b) if b > 0.0 && a > 0.0 => format!("{:.2}x", a / b),
        _ => "—".to_owned(),
    }
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// One paragraph describing a workload.
pub fn describe(spec: &WorkloadSpec) -> String {
    let mut parts = Vec::new();
    if spec.notifications > 0 {
        parts.push(format!(
            "backlog of {} notifications over {} entities ({}), {} per save, {:.0}% delivered up to {} positions late",
            thousands(spec.notifications as u64),
            thousands(spec.entities as u64),
            spec.distribution,
            spec.burst,
            spec.late_share * 100.0,
            spec.delay_window
        ));
    }
    let l = &spec.live;
    if l.saves > 0 {
        let events = if l.events_min == l.events_max {
            format!("{}", l.events_min)
        } else {
            format!("{}–{}", l.events_min, l.events_max)
        };
        parts.push(format!(
            "live stream of {} saves at {}/s ({:.1} s, {}), each emitting {} {} events{}",
            thousands(l.saves as u64),
            l.rate,
            l.duration().as_secs_f64(),
            l.distribution,
            events,
            if l.versioned {
                "versioned"
            } else {
                "unversioned"
            },
            if l.spread_ms > 0 {
                format!(" spread over 0–{:.1} s", l.spread_ms as f64 / 1000.0)
            } else {
                " at once".to_owned()
            }
        ));
    }
    let s = &spec.source;
    let mut src = format!("source latency {} ms", s.latency_ms);
    if s.slow_key_share > 0.0 {
        src.push_str(&format!(
            ", {:.0}% of entities answer in {}–{} ms",
            s.slow_key_share * 100.0,
            s.slow_ms.0,
            s.slow_ms.1
        ));
    }
    if s.poison_hottest > 0 {
        src.push_str(&format!(
            ", the {} hottest entities answer 500 from {:.0} s to {:.0} s",
            s.poison_hottest,
            s.poison_after_ms as f64 / 1000.0,
            (s.poison_after_ms + s.poison_for_ms) as f64 / 1000.0
        ));
    }
    if s.capacity > 0 {
        src.push_str(&format!(
            ", {} requests at once at most (≈{:.0} requests/s: the source is the limit)",
            s.capacity,
            s.capacity as f64 * 1000.0 / s.latency_ms.max(1) as f64
        ));
    }
    parts.push(src);
    parts.push(format!(
        "sink {}",
        if spec.sink == "jsonl" {
            "JSON Lines + fsync"
        } else {
            "null"
        }
    ));
    let i = &spec.instances;
    let mut inst = format!(
        "{} instance{}",
        i.initial,
        if i.initial == 1 { "" } else { "s" }
    );
    if let Some(j) = i.join_at_ms {
        inst.push_str(&format!(", a second joins at {:.0} s", j as f64 / 1000.0));
    }
    if let Some(l) = i.leave_at_ms {
        inst.push_str(&format!(" and leaves at {:.0} s", l as f64 / 1000.0));
    }
    if let Some(k) = i.kill_every_ms {
        inst.push_str(&format!(
            ", SIGKILL and restart every {:.0} s while the stream runs",
            k as f64 / 1000.0
        ));
    }
    parts.push(inst);
    if let Some(s) = spec.fetch_slots {
        parts.push(format!("{s} fetches in flight for every contender"));
    }
    format!("{}: {}.", spec.purpose, parts.join("; "))
}

/// Whether the workload has entities left out of the healthy freshness figures.
fn has_unhealthy(spec: &WorkloadSpec) -> bool {
    spec.source.slow_key_share > 0.0 || spec.source.poison_hottest > 0
}

/// The Markdown table of one workload's rows.
pub fn table(spec: &WorkloadSpec, rows: &[Row]) -> String {
    let base = |name: &str| {
        rows.iter()
            .find(|r| r.contender == name && r.throughput > 0.0)
            .cloned()
    };
    let raw = base("raw");
    let bd = base("batch-dedupe");
    let healthy = has_unhealthy(spec);
    let cpu_wall = spec.fetch_slots.is_some();
    let mut s = String::new();
    let _ = writeln!(s, "Workload `{}`. {}\n", spec.name, describe(spec));
    let mut head = vec![
        "contender",
        "instances",
        "notifications",
        "committed",
        "time (s)",
        "throughput (n/s)",
        "vs raw",
        "vs batch-dedupe",
        "entity reads",
        "reads per save",
        "reads vs batch-dedupe",
        "freshness p50 (ms)",
        "freshness p99 (ms)",
    ];
    if healthy {
        head.push("healthy keys p99 (ms)");
    }
    head.extend([
        "receipt p99 (ms)",
        "commit tail (ms)",
        "CPU-s",
        "CPU-s per 1M",
    ]);
    if cpu_wall {
        head.push("CPU % of wall");
    }
    head.extend(["peak RSS (MiB)", "converged", "note"]);
    let _ = writeln!(s, "| {} |", head.join(" | "));
    let _ = writeln!(s, "|{}", "---|".repeat(head.len()));
    for r in rows {
        let writes = r.contender != "raw";
        let converged = match r.converged {
            Some(true) => "yes".to_owned(),
            Some(false) => format!("**no** ({} differ)", r.mismatched),
            None => "n/a".to_owned(),
        };
        let mut cells = vec![
            r.contender.clone(),
            r.instances.clone(),
            thousands(r.notifications),
            thousands(r.committed),
            format!("{:.1}{}", r.elapsed_s, if r.capped { " (cap)" } else { "" }),
            format!("{:.0}", r.throughput),
            ratio(r.throughput, raw.as_ref().map(|b| b.throughput)),
            ratio(r.throughput, bd.as_ref().map(|b| b.throughput)),
            if writes {
                thousands(r.entity_reads)
            } else {
                "—".into()
            },
            if writes {
                format!("{:.2}", r.reads_per_save)
            } else {
                "—".into()
            },
            if writes {
                ratio(
                    r.entity_reads as f64,
                    bd.as_ref().map(|b| b.entity_reads as f64),
                )
            } else {
                "—".into()
            },
            ms(r.freshness.p50_ms),
            ms(r.freshness.p99_ms),
        ];
        if healthy {
            cells.push(ms(r.freshness.healthy_p99_ms));
        }
        cells.extend([
            ms(r.receipt_p99_ms),
            ms(r.commit_tail_ms),
            format!("{:.1}", r.cpu_s),
            format!("{:.1}", r.cpu_per_million),
        ]);
        if cpu_wall {
            cells.push(if r.elapsed_s > 0.0 {
                format!("{:.0}%", 100.0 * r.cpu_s / r.elapsed_s)
            } else {
                "—".into()
            });
        }
        cells.extend([format!("{:.0}", r.peak_rss_mib), converged, r.note.clone()]);
        let _ = writeln!(s, "| {} |", cells.join(" | "));
    }
    s
}

/// One target of issue 18 and its verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// The target.
    pub target: String,
    /// The workload it is judged on.
    pub workload: String,
    /// The measured figures.
    pub measured: String,
    /// `Some(true)`: met; `Some(false)`: missed; `None`: not measured in this invocation.
    pub met: Option<bool>,
}

fn row<'a>(rows: &'a [Row], name: &str) -> Option<&'a Row> {
    rows.iter()
        .find(|r| r.contender == name && r.note.find("failed").is_none())
}

/// Judge issue 18's targets on `results` (workload, rows), refetch-default against batch-dedupe
/// of the same invocation.
pub fn verdicts(results: &[(WorkloadSpec, Vec<Row>)]) -> Vec<Verdict> {
    let mut out = Vec::new();
    let get = |w: &str| results.iter().find(|(s, _)| s.name == w);
    let pair = |w: &str| {
        get(w).and_then(|(s, rows)| {
            Some((
                s.clone(),
                row(rows, "refetch-default")?.clone(),
                row(rows, "batch-dedupe")?.clone(),
            ))
        })
    };
    let missing = |target: &str, w: &str| Verdict {
        target: target.to_owned(),
        workload: w.to_owned(),
        measured: "not run in this invocation".into(),
        met: None,
    };

    let t = "live-bursts: at most half batch-dedupe's entity reads";
    out.push(match pair("live-bursts") {
        Some((_, r, b)) => Verdict {
            target: t.into(),
            workload: "live-bursts".into(),
            measured: format!(
                "{} against {} reads ({:.2}x)",
                thousands(r.entity_reads),
                thousands(b.entity_reads),
                r.entity_reads as f64 / b.entity_reads.max(1) as f64
            ),
            met: Some(r.entity_reads * 2 <= b.entity_reads),
        },
        None => missing(t, "live-bursts"),
    });
    let t = "live-bursts: freshness p99 within window + max fetch latency + 100 ms";
    out.push(match pair("live-bursts") {
        Some((s, r, _)) => {
            let bound = 200.0 + s.source.latency_ms as f64 + 100.0;
            let p99 = r.freshness.p99_ms.unwrap_or(f64::INFINITY);
            Verdict {
                target: t.into(),
                workload: "live-bursts".into(),
                measured: format!(
                    "p99 {} ms against 200 + {} + 100 = {bound:.0} ms",
                    ms(r.freshness.p99_ms),
                    s.source.latency_ms
                ),
                met: Some(p99 <= bound),
            }
        }
        None => missing(t, "live-bursts"),
    });
    for w in ["dup-heavy", "throughput"] {
        let t = format!("{w}: throughput at least batch-dedupe's");
        out.push(match pair(w) {
            Some((_, r, b)) => Verdict {
                target: t,
                workload: w.into(),
                measured: format!(
                    "{:.0} against {:.0} n/s ({:.2}x)",
                    r.throughput,
                    b.throughput,
                    r.throughput / b.throughput.max(1e-9)
                ),
                met: Some(r.throughput >= b.throughput),
            },
            None => missing(&t, w),
        });
        let t = format!("{w}: receipt p99 within 1.5x batch-dedupe's");
        out.push(match pair(w) {
            Some((_, r, b)) => {
                let (rp, bp) = (r.receipt_p99_ms, b.receipt_p99_ms);
                Verdict {
                    target: t,
                    workload: w.into(),
                    measured: format!(
                        "{} against {} ms ({})",
                        ms(rp),
                        ms(bp),
                        ratio(rp.unwrap_or(0.0), bp)
                    ),
                    met: match (rp, bp) {
                        (Some(a), Some(b)) => Some(a <= 1.5 * b),
                        _ => None,
                    },
                }
            }
            None => missing(&t, w),
        });
    }
    for w in ["poison", "slow-tail"] {
        let t = format!("{w}: healthy keys' freshness p99 at least 5x better than batch-dedupe's");
        out.push(match pair(w) {
            Some((_, r, b)) => {
                let (rp, bp) = (r.freshness.healthy_p99_ms, b.freshness.healthy_p99_ms);
                Verdict {
                    target: t,
                    workload: w.into(),
                    measured: format!(
                        "{} against {} ms ({} better)",
                        ms(rp),
                        ms(bp),
                        ratio(bp.unwrap_or(0.0), rp)
                    ),
                    met: match (rp, bp) {
                        (Some(a), Some(b)) => Some(a * 5.0 <= b),
                        _ => None,
                    },
                }
            }
            None => missing(&t, w),
        });
    }
    for w in ["dup-heavy", "throughput"] {
        let t = format!(
            "{w}: commits follow the commit point promptly (commit tail within batch-dedupe's + 100 ms)"
        );
        out.push(match pair(w) {
            Some((_, r, b)) => Verdict {
                target: t,
                workload: w.into(),
                measured: format!(
                    "{} against {} ms from the last durable write to the group's commits at the end",
                    ms(r.commit_tail_ms),
                    ms(b.commit_tail_ms)
                ),
                met: match (r.commit_tail_ms, b.commit_tail_ms) {
                    (Some(a), Some(b)) => Some(a <= b + 100.0),
                    _ => None,
                },
            },
            None => missing(&t, w),
        });
    }
    let t = "no spin while fetch slots are full: CPU under 10% of wall time";
    out.push(
        match get("cpu-wait").and_then(|(_, rows)| row(rows, "refetch-default")) {
            Some(r) => {
                let share = if r.elapsed_s > 0.0 {
                    r.cpu_s / r.elapsed_s
                } else {
                    f64::INFINITY
                };
                Verdict {
                    target: t.into(),
                    workload: "cpu-wait".into(),
                    measured: format!(
                        "{:.1} CPU-s in {:.1} s of wall time ({:.0}%)",
                        r.cpu_s,
                        r.elapsed_s,
                        share * 100.0
                    ),
                    met: Some(share < 0.10),
                }
            }
            None => missing(t, "cpu-wait"),
        },
    );
    let t = "restarts: fetches per save below the loop without coalescing (concurrent-loop)";
    out.push(
        match get("restarts").and_then(|(_, rows)| {
            Some((
                row(rows, "refetch-default")?.clone(),
                row(rows, "concurrent-loop")?.clone(),
            ))
        }) {
            Some((r, c)) => Verdict {
                target: t.into(),
                workload: "restarts".into(),
                measured: format!(
                    "{:.2} against {:.2} reads per save",
                    r.reads_per_save, c.reads_per_save
                ),
                met: Some(r.reads_per_save < c.reads_per_save),
            },
            None => missing(t, "restarts"),
        },
    );
    // CPU per notification on every workload.
    for (s, rows) in results {
        if let (Some(r), Some(b)) = (row(rows, "refetch-default"), row(rows, "batch-dedupe")) {
            out.push(Verdict {
                target: "CPU per notification at most batch-dedupe's".into(),
                workload: s.name.clone(),
                measured: format!(
                    "{:.1} against {:.1} CPU-s per 1M ({:.2}x)",
                    r.cpu_per_million,
                    b.cpu_per_million,
                    r.cpu_per_million / b.cpu_per_million.max(1e-9)
                ),
                met: Some(r.cpu_per_million <= b.cpu_per_million),
            });
        }
    }
    out
}

/// The targets table.
pub fn targets_table(verdicts: &[Verdict]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| target | workload | refetch-default vs the same invocation | verdict |"
    );
    let _ = writeln!(s, "|---|---|---|---|");
    for v in verdicts {
        let verdict = match v.met {
            Some(true) => "met",
            Some(false) => "**missed**",
            None => "not measured",
        };
        let _ = writeln!(
            s,
            "| {} | `{}` | {} | {} |",
            v.target, v.workload, v.measured, verdict
        );
    }
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::freshness::Freshness;
    use crate::workload::{InstanceSpec, KeyDistribution, LiveSpec, SourceSpec};

    fn spec(name: &str) -> WorkloadSpec {
        WorkloadSpec {
            name: name.into(),
            purpose: "p".into(),
            notifications: 100,
            entities: 10,
            distribution: KeyDistribution::Uniform,
            burst: 2,
            late_share: 0.0,
            delay_window: 0,
            live: LiveSpec::none(),
            source: SourceSpec::latency(5),
            sink: "null".into(),
            instances: InstanceSpec::one(),
            fetch_slots: None,
            seed: 1,
            no_latency: false,
        }
    }

    fn r(c: &str, throughput: f64, reads: u64, p99: f64, cpu: f64) -> Row {
        Row {
            contender: c.into(),
            throughput,
            entity_reads: reads,
            notifications: 1000,
            committed: 1000,
            freshness: Freshness {
                p99_ms: Some(p99),
                healthy_p99_ms: Some(p99),
                ..Freshness::default()
            },
            receipt_p99_ms: Some(p99),
            cpu_per_million: cpu,
            ..Row::default()
        }
    }

    #[test]
    fn ratios_against_raw_and_batch_dedupe_of_the_same_rows() {
        let rows = vec![
            r("raw", 1000.0, 0, 0.0, 1.0),
            r("batch-dedupe", 500.0, 100, 50.0, 3.0),
            r("refetch-default", 800.0, 40, 500.0, 4.0),
        ];
        let t = table(&spec("w"), &rows);
        let line = t
            .lines()
            .find(|l| l.starts_with("| refetch-default"))
            .unwrap();
        assert!(line.contains("| 0.80x | 1.60x |"), "{line}");
        assert!(
            line.contains("| 0.40x |"),
            "reads against batch-dedupe: {line}"
        );
        assert!(t.contains("CPU-s per 1M"), "{t}");
    }

    #[test]
    fn verdicts_name_met_and_missed_targets() {
        let results = vec![
            (
                spec("live-bursts"),
                vec![
                    r("batch-dedupe", 500.0, 100, 50.0, 3.0),
                    r("refetch-default", 500.0, 40, 400.0, 2.0),
                ],
            ),
            (
                spec("dup-heavy"),
                vec![
                    r("batch-dedupe", 500.0, 100, 100.0, 3.0),
                    r("refetch-default", 400.0, 90, 2000.0, 5.0),
                ],
            ),
        ];
        let v = verdicts(&results);
        let find = |t: &str, w: &str| {
            v.iter()
                .find(|x| x.target.starts_with(t) && x.workload == w)
                .unwrap()
                .met
        };
        assert_eq!(find("live-bursts: at most half", "live-bursts"), Some(true));
        // 400 ms against the 305 ms bound.
        assert_eq!(find("live-bursts: freshness", "live-bursts"), Some(false));
        assert_eq!(find("dup-heavy: throughput", "dup-heavy"), Some(false));
        assert_eq!(find("dup-heavy: receipt", "dup-heavy"), Some(false));
        assert_eq!(find("CPU per notification", "live-bursts"), Some(true));
        assert_eq!(find("CPU per notification", "dup-heavy"), Some(false));
        assert_eq!(find("restarts", "restarts"), None);
        let t = targets_table(&v);
        assert!(
            t.contains("**missed**") && t.contains("not measured"),
            "{t}"
        );
    }

    #[test]
    fn numbers_get_thousands_separators() {
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(999), "999");
    }
}
