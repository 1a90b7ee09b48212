//! A PNG chart per workload, drawn with `plotters`: throughput, entity reads, freshness p99 and
//! CPU-seconds per million notifications, one horizontal bar per contender, its value printed
//! after the bar.
//!
//! Text is rendered from a TrueType font through `ab_glyph` (no system font libraries): DejaVu
//! Sans from Debian's `fonts-dejavu-core` by default, or the file named by `--font` /
//! `REFETCH_BENCH_FONT`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{FontStyle, register_font};

use crate::driver::Row;

/// The font family the charts use (registered by [`load_font`]).
const FAMILY: &str = "sans-serif";

/// Where DejaVu Sans lives on common distributions (Debian's `fonts-dejavu-core` first).
pub const FONT_CANDIDATES: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
];

static FONT: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// Load the chart font once per process: `path`, else `REFETCH_BENCH_FONT`, else the first of
/// [`FONT_CANDIDATES`] that exists.
pub fn load_font(path: Option<&Path>) -> anyhow::Result<PathBuf> {
    let r = FONT.get_or_init(|| {
        let chosen = path
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("REFETCH_BENCH_FONT").map(PathBuf::from))
            .or_else(|| {
                FONT_CANDIDATES
                    .iter()
                    .map(PathBuf::from)
                    .find(|p| p.exists())
            })
            .ok_or_else(|| {
                "no TrueType font found: install fonts-dejavu-core (apt-get install \
                 fonts-dejavu-core) or pass --font FILE.ttf"
                    .to_owned()
            })?;
        let bytes = std::fs::read(&chosen)
            .map_err(|e| format!("reading the font {}: {e}", chosen.display()))?;
        // plotters keeps registered fonts for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        register_font(FAMILY, FontStyle::Normal, bytes)
            .map_err(|_| format!("{} is not a usable TrueType font", chosen.display()))?;
        Ok(chosen)
    });
    r.clone().map_err(|e| anyhow!(e))
}

/// A number as a short label: `1.2M`, `35k`, `412`, `3.5`.
pub fn human(v: f64) -> String {
    if v == 0.0 {
        "0".to_owned()
    } else if v >= 1_000_000.0 {
        format!("{:.2}M", v / 1_000_000.0)
    } else if v >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// One panel: its title and the value per row (`None`: not measured).
type Panel = (&'static str, fn(&Row) -> Option<f64>);

fn panels(healthy: bool) -> [Panel; 4] {
    [
        ("Throughput, notifications/s (higher is better)", |r| {
            (r.throughput > 0.0).then_some(r.throughput)
        }),
        ("Entity reads at the source (lower is better)", |r| {
            (r.contender != "raw" && r.note.find("failed").is_none())
                .then_some(r.entity_reads as f64)
        }),
        if healthy {
            (
                "Freshness p99 of healthy keys, ms: save to durable write (lower is better)",
                |r| r.freshness.healthy_p99_ms,
            )
        } else {
            (
                "Freshness p99, ms: save to durable write (lower is better)",
                |r| r.freshness.p99_ms,
            )
        },
        (
            "CPU-seconds per million notifications (lower is better)",
            |r| (r.cpu_per_million > 0.0).then_some(r.cpu_per_million),
        ),
    ]
}

const COLORS: [RGBColor; 9] = [
    RGBColor(120, 120, 120),
    RGBColor(214, 96, 77),
    RGBColor(244, 165, 130),
    RGBColor(146, 100, 171),
    RGBColor(67, 147, 195),
    RGBColor(90, 174, 97),
    RGBColor(33, 102, 172),
    RGBColor(27, 120, 55),
    RGBColor(153, 112, 171),
];

fn color_of(name: &str, i: usize) -> RGBColor {
    match name {
        "raw" => COLORS[0],
        "concurrent-loop" => COLORS[1],
        "batch-dedupe" => COLORS[2],
        "kafka-streams" => COLORS[3],
        "camel" => COLORS[4],
        "refetch-default" => COLORS[6],
        "refetch-tuned" => COLORS[7],
        _ => COLORS[(i + 5) % COLORS.len()],
    }
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    (title, value): Panel,
    rows: &[Row],
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let n = rows.len();
    let values: Vec<Option<f64>> = rows.iter().map(value).collect();
    let max = values
        .iter()
        .flatten()
        .fold(0.0f64, |a, &b| a.max(b))
        .max(1e-9);
    let names: Vec<String> = rows.iter().map(|r| r.contender.clone()).collect();
    // Segment k from the bottom holds row n-1-k, so the first row is on top.
    let label_of = move |v: &SegmentValue<i32>| match v {
        SegmentValue::CenterOf(k) if (*k as usize) < n => names[n - 1 - *k as usize].clone(),
        _ => String::new(),
    };
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FAMILY, 19))
        .margin(10)
        .margin_right(30)
        .x_label_area_size(26)
        .y_label_area_size(160)
        // A discrete range is inclusive: 0..n-1 gives n segments.
        .build_cartesian_2d(0.0..max * 1.28, (0..n as i32 - 1).into_segmented())
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n)
        .y_label_formatter(&label_of)
        .x_labels(6)
        .x_label_formatter(&|x| human(*x))
        .label_style((FAMILY, 15))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    let value_style =
        TextStyle::from((FAMILY, 15).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    for (i, (v, r)) in values.iter().zip(rows).enumerate() {
        let k = (n - 1 - i) as i32;
        match v {
            Some(v) => {
                let mut bar = Rectangle::new(
                    [
                        (0.0, SegmentValue::Exact(k)),
                        (*v, SegmentValue::Exact(k + 1)),
                    ],
                    color_of(&r.contender, i).filled(),
                );
                bar.set_margin(5, 5, 0, 0);
                chart
                    .draw_series(std::iter::once(bar))
                    .map_err(|e| anyhow!("{e}"))?;
                let mut label = format!(" {}", human(*v));
                if r.capped {
                    label.push_str(" (capped)");
                }
                chart
                    .draw_series(std::iter::once(Text::new(
                        label,
                        (*v, SegmentValue::CenterOf(k)),
                        value_style.clone(),
                    )))
                    .map_err(|e| anyhow!("{e}"))?;
            }
            None => {
                chart
                    .draw_series(std::iter::once(Text::new(
                        " n/a".to_owned(),
                        (0.0, SegmentValue::CenterOf(k)),
                        value_style.clone().color(&RGBColor(130, 130, 130)),
                    )))
                    .map_err(|e| anyhow!("{e}"))?;
            }
        }
    }
    Ok(())
}

/// Draw the chart of `rows` into `path` (PNG). `healthy`: the freshness panel shows the healthy
/// keys' p99.
pub fn write_png(path: &Path, title: &str, rows: &[Row], healthy: bool) -> anyhow::Result<()> {
    load_font(None)?;
    let n = rows.len().max(1);
    let panel_h = 80 + n as u32 * 30;
    let height = 56 + 4 * panel_h;
    let root = BitMapBackend::new(path, (1100, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let (head, body) = root.split_vertically(56);
    head.draw_text(title, &TextStyle::from((FAMILY, 26).into_font()), (16, 14))
        .map_err(|e| anyhow!("{e}"))?;
    for (area, panel) in body.split_evenly((4, 1)).iter().zip(panels(healthy)) {
        draw_panel(area, panel, rows)?;
    }
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn human_labels() {
        assert_eq!(human(1_234_567.0), "1.23M");
        assert_eq!(human(35_400.0), "35k");
        assert_eq!(human(412.4), "412");
        assert_eq!(human(3.456), "3.46");
        assert_eq!(human(0.0), "0");
    }

    #[test]
    fn a_chart_is_a_png_of_the_expected_size() {
        // The font is a system package (fonts-dejavu-core); the error says so when it is missing.
        load_font(None).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.png");
        let rows = vec![
            Row {
                contender: "raw".into(),
                throughput: 1000.0,
                ..Row::default()
            },
            Row {
                contender: "refetch-default".into(),
                throughput: 500.0,
                entity_reads: 10,
                cpu_per_million: 3.0,
                capped: true,
                ..Row::default()
            },
        ];
        write_png(&path, "workload dup-heavy", &rows, false).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        // IHDR: width and height, big-endian, at bytes 16..24.
        let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
        let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
        assert_eq!((w, h), (1100, 56 + 4 * (80 + 2 * 30)));
    }
}
