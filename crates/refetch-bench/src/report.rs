//! The results table: Markdown with ratios against the baselines measured in the same run.

use std::fmt::Write as _;

use crate::driver::Row;
use crate::workload::WorkloadSpec;

fn opt(v: Option<f64>) -> String {
    v.map_or_else(|| "—".to_owned(), |v| format!("{v:.1}"))
}

fn ratio(a: f64, b: Option<f64>) -> String {
    match b {
        Some(b) if b > 0.0 && a > 0.0 => format!("{:.2}x", a / b),
        _ => "—".to_owned(),
    }
}

/// One line describing a workload.
pub fn describe(spec: &WorkloadSpec) -> String {
    format!(
        "{} notifications over {} entities ({}), {} per save, {:.0}% delivered up to {} positions late; \
         {} live saves at {}/s during each run; source latency {} ms; sink {}",
        spec.notifications,
        spec.entities,
        spec.distribution,
        spec.burst,
        spec.late_share * 100.0,
        spec.delay_window,
        spec.live_saves,
        spec.live_rate,
        spec.source_latency_ms,
        if spec.sink == "jsonl" {
            "JSON Lines + fsync"
        } else {
            "null"
        },
    ) + if spec.no_latency {
        "; latency not measured (peak-RSS run: the probe keeps no per-notification state)"
    } else {
        ""
    }
}

/// The Markdown table of one workload's rows.
pub fn table(spec: &WorkloadSpec, rows: &[Row]) -> String {
    let base = |name: &str| {
        rows.iter()
            .find(|r| r.contender == name && r.throughput > 0.0)
            .cloned()
    };
    let raw = base("raw");
    let hand = base("hand-rolled");
    let mut s = String::new();
    let _ = writeln!(s, "Workload `{}`: {}.\n", spec.name, describe(spec));
    let _ = writeln!(
        s,
        "| contender | notifications | committed | time (s) | throughput (n/s) | vs raw | requests | entity reads | reads vs hand-rolled | amplification | p50 (ms) | p99 (ms) | peak RSS (MiB) | converged | note |"
    );
    let _ = writeln!(
        s,
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for r in rows {
        // Reads per distinct (entity, version) pair, against the hand-rolled loop's (which reads
        // once per notification); for a capped contender both are of the part it consumed.
        let fewer = match &hand {
            Some(h) if r.amplification > 0.0 && h.amplification > 0.0 => {
                format!("{:.1}x fewer", h.amplification / r.amplification)
            }
            _ => "—".to_owned(),
        };
        let converged = match r.converged {
            Some(true) => "yes".to_owned(),
            Some(false) => format!("**no** ({} differ)", r.mismatched),
            None => "n/a".to_owned(),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.1}{} | {:.0} | {} | {} | {} | {} | {:.2} | {} | {} | {:.0} | {} | {} |",
            r.contender,
            r.notifications,
            r.committed,
            r.elapsed_s,
            if r.capped { " (cap)" } else { "" },
            r.throughput,
            ratio(r.throughput, raw.as_ref().map(|b| b.throughput)),
            r.fetches,
            r.entity_reads,
            if r.contender == "hand-rolled" || r.contender == "raw" {
                "—".to_owned()
            } else {
                fewer
            },
            r.amplification,
            opt(r.p50_ms),
            opt(r.p99_ms),
            r.peak_rss_mib,
            converged,
            r.note,
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::KeyDistribution;

    #[test]
    fn ratios_against_the_baselines_of_the_same_rows() {
        let spec = WorkloadSpec {
            name: "w".into(),
            notifications: 100,
            entities: 10,
            distribution: KeyDistribution::Uniform,
            burst: 2,
            late_share: 0.0,
            delay_window: 0,
            live_saves: 0,
            live_rate: 1.0,
            source_latency_ms: 0,
            sink: "null".into(),
            seed: 1,
            no_latency: false,
        };
        let row = |c: &str, t: f64, f: u64, committed: u64| Row {
            contender: c.into(),
            throughput: t,
            fetches: f,
            entity_reads: f,
            amplification: f as f64 / 10.0,
            notifications: 100,
            committed,
            ..Row::default()
        };
        let rows = vec![
            row("raw", 1000.0, 0, 100),
            row("hand-rolled", 100.0, 50, 50),
            row("refetch-default", 800.0, 10, 100),
        ];
        let t = table(&spec, &rows);
        let line = t
            .lines()
            .find(|l| l.starts_with("| refetch-default"))
            .unwrap_or("");
        assert!(line.contains("| 0.80x |"), "{line}");
        // hand-rolled read 5 times per pair, refetch once per pair.
        assert!(line.contains("5.0x fewer"), "{line}");
    }
}
