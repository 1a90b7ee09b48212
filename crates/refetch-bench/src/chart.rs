//! A PNG bar chart per workload: throughput, fetches, p99 latency and peak RSS per contender.
//!
//! Drawn into an RGB buffer with a built-in 5x7 pixel font (lower case, digits and a little
//! punctuation), then encoded with the `png` crate: no font files, no system libraries, so it
//! renders the same on any machine. Bars are scaled to the largest value in their panel; the value
//! is printed after each bar.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use anyhow::Context;

use crate::driver::Row;

const WIDTH: usize = 1000;
const LABEL_W: usize = 230;
const BAR_MAX: usize = 560;
const ROW_H: usize = 26;
const SCALE: usize = 2;

/// 5x7 glyphs, one byte per row, bit 4 = leftmost pixel.
const FONT: &[(char, [u8; 7])] = &[
    ('0', [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E]),
    ('1', [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E]),
    ('2', [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F]),
    ('3', [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E]),
    ('4', [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02]),
    ('5', [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E]),
    ('6', [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E]),
    ('7', [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08]),
    ('8', [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E]),
    ('9', [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C]),
    ('a', [0x00, 0x00, 0x0E, 0x01, 0x0F, 0x11, 0x0F]),
    ('b', [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1E]),
    ('c', [0x00, 0x00, 0x0E, 0x10, 0x10, 0x11, 0x0E]),
    ('d', [0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F]),
    ('e', [0x00, 0x00, 0x0E, 0x11, 0x1F, 0x10, 0x0E]),
    ('f', [0x06, 0x09, 0x08, 0x1C, 0x08, 0x08, 0x08]),
    ('g', [0x00, 0x0F, 0x11, 0x11, 0x0F, 0x01, 0x0E]),
    ('h', [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11]),
    ('i', [0x04, 0x00, 0x0C, 0x04, 0x04, 0x04, 0x0E]),
    ('j', [0x02, 0x00, 0x06, 0x02, 0x02, 0x12, 0x0C]),
    ('k', [0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12]),
    ('l', [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E]),
    ('m', [0x00, 0x00, 0x1A, 0x15, 0x15, 0x11, 0x11]),
    ('n', [0x00, 0x00, 0x16, 0x19, 0x11, 0x11, 0x11]),
    ('o', [0x00, 0x00, 0x0E, 0x11, 0x11, 0x11, 0x0E]),
    ('p', [0x00, 0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10]),
    ('q', [0x00, 0x0F, 0x11, 0x11, 0x0F, 0x01, 0x01]),
    ('r', [0x00, 0x00, 0x16, 0x19, 0x10, 0x10, 0x10]),
    ('s', [0x00, 0x00, 0x0E, 0x10, 0x0E, 0x01, 0x1E]),
    ('t', [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06]),
    ('u', [0x00, 0x00, 0x11, 0x11, 0x11, 0x13, 0x0D]),
    ('v', [0x00, 0x00, 0x11, 0x11, 0x11, 0x0A, 0x04]),
    ('w', [0x00, 0x00, 0x11, 0x11, 0x15, 0x15, 0x0A]),
    ('x', [0x00, 0x00, 0x11, 0x0A, 0x04, 0x0A, 0x11]),
    ('y', [0x00, 0x11, 0x11, 0x11, 0x0F, 0x01, 0x0E]),
    ('z', [0x00, 0x00, 0x1F, 0x02, 0x04, 0x08, 0x1F]),
    ('-', [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00]),
    ('.', [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C]),
    ('(', [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02]),
    (')', [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08]),
    ('/', [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00]),
    (':', [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00]),
    ('_', [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F]),
    (',', [0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08]),
    ('%', [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03]),
    ('=', [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00]),
    ('*', [0x00, 0x04, 0x15, 0x0E, 0x15, 0x04, 0x00]),
];

const PALETTE: [[u8; 3]; 8] = [
    [120, 120, 120],
    [214, 96, 77],
    [33, 102, 172],
    [67, 147, 195],
    [146, 197, 222],
    [244, 165, 130],
    [90, 174, 97],
    [153, 112, 171],
];

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Self {
        Canvas {
            w,
            h,
            px: vec![255; w * h * 3],
        }
    }

    fn rect(&mut self, x: usize, y: usize, w: usize, h: usize, c: [u8; 3]) {
        for yy in y..(y + h).min(self.h) {
            for xx in x..(x + w).min(self.w) {
                let i = (yy * self.w + xx) * 3;
                self.px[i..i + 3].copy_from_slice(&c);
            }
        }
    }

    /// Draw `text` (lower-cased) with its top-left corner at `(x, y)`; returns the end x.
    fn text(&mut self, x: usize, y: usize, text: &str, c: [u8; 3]) -> usize {
        let mut cx = x;
        for ch in text.chars().flat_map(char::to_lowercase) {
            if let Some((_, rows)) = FONT.iter().find(|(g, _)| *g == ch) {
                for (ry, bits) in rows.iter().enumerate() {
                    for rx in 0..5 {
                        if bits & (0x10 >> rx) != 0 {
                            self.rect(cx + rx * SCALE, y + ry * SCALE, SCALE, SCALE, c);
                        }
                    }
                }
            }
            cx += 6 * SCALE;
        }
        cx
    }
}

fn human(v: f64) -> String {
    if v >= 1_000_000.0 {
        format!("{:.2}m", v / 1_000_000.0)
    } else if v >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// The panels of a chart: title and the value per row (`None`: not measured).
type Panel = (&'static str, fn(&Row) -> Option<f64>);

const PANELS: [Panel; 4] = [
    ("throughput (notifications/s, higher is better)", |r| {
        (r.throughput > 0.0).then_some(r.throughput)
    }),
    ("entity reads at the source (lower is better)", |r| {
        (r.contender != "raw").then_some(r.entity_reads as f64)
    }),
    ("p99 notification-to-durable latency (ms)", |r| r.p99_ms),
    ("peak rss (mib)", |r| {
        (r.peak_rss_mib > 0.0).then_some(r.peak_rss_mib)
    }),
];

/// Render the chart of `rows` into PNG bytes' pixel buffer: `(width, height, rgb)`.
pub fn render(title: &str, rows: &[Row]) -> (usize, usize, Vec<u8>) {
    let panel_h = 40 + rows.len() * ROW_H + 16;
    let h = 50 + PANELS.len() * panel_h;
    let mut c = Canvas::new(WIDTH, h);
    c.text(16, 14, &format!("workload {title}"), [0, 0, 0]);
    for (pi, (ptitle, value)) in PANELS.iter().enumerate() {
        let top = 50 + pi * panel_h;
        c.text(16, top + 8, ptitle, [40, 40, 40]);
        let max = rows
            .iter()
            .filter_map(value)
            .fold(0.0f64, f64::max)
            .max(f64::MIN_POSITIVE);
        for (ri, r) in rows.iter().enumerate() {
            let y = top + 36 + ri * ROW_H;
            c.text(16, y + 4, &r.contender, [0, 0, 0]);
            match value(r) {
                Some(v) => {
                    let w = ((v / max) * BAR_MAX as f64).round() as usize;
                    c.rect(LABEL_W, y, w.max(1), ROW_H - 6, PALETTE[ri % PALETTE.len()]);
                    let mut label = human(v);
                    if r.capped {
                        label.push_str(" (capped)");
                    }
                    c.text(LABEL_W + w + 8, y + 4, &label, [0, 0, 0]);
                }
                None => {
                    c.text(LABEL_W, y + 4, "n/a", [150, 150, 150]);
                }
            }
        }
    }
    (WIDTH, h, c.px)
}

/// Write the chart of `rows` to `path`.
pub fn write_png(path: &Path, title: &str, rows: &[Row]) -> anyhow::Result<()> {
    let (w, h, px) = render(title, rows);
    let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut enc = png::Encoder::new(BufWriter::new(file), w as u32, h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header()?;
    writer.write_image_data(&px)?;
    writer.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn bars_scale_to_the_largest_value_and_the_png_decodes() {
        let rows = vec![
            Row {
                contender: "raw".into(),
                throughput: 1000.0,
                peak_rss_mib: 10.0,
                ..Row::default()
            },
            Row {
                contender: "refetch-default".into(),
                throughput: 500.0,
                entity_reads: 10,
                peak_rss_mib: 20.0,
                ..Row::default()
            },
        ];
        let (w, h, px) = render("t", &rows);
        // In the throughput panel the raw bar reaches BAR_MAX, refetch's half of it.
        let top = 50 + 36;
        let at = |x: usize, y: usize| &px[(y * w + x) * 3..(y * w + x) * 3 + 3];
        assert_eq!(at(LABEL_W + BAR_MAX - 2, top + 5), PALETTE[0]);
        assert_eq!(at(LABEL_W + BAR_MAX / 2 - 2, top + ROW_H + 5), PALETTE[1]);
        assert_eq!(
            at(LABEL_W + BAR_MAX / 2 + 2, top + ROW_H + 5),
            [255, 255, 255]
        );

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.png");
        write_png(&path, "t", &rows).unwrap();
        let decoder = png::Decoder::new(std::io::BufReader::new(File::open(&path).unwrap()));
        let reader = decoder.read_info().unwrap();
        assert_eq!(
            (reader.info().width as usize, reader.info().height as usize),
            (w, h)
        );
    }

    #[test]
    fn every_label_character_has_a_glyph() {
        for label in [
            "raw",
            "hand-rolled",
            "refetch-tuned",
            "parallel-consumer",
            "kafka-streams",
        ] {
            for ch in label.chars() {
                assert!(FONT.iter().any(|(g, _)| *g == ch), "{ch}");
            }
        }
    }
}
