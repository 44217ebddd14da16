//! `gmem bench --plot FILE.svg`: the ratios as horizontal bars on a log
//! scale, 1x marked, each target a black tick; green where the target is
//! met, red where not, grey where there is none. Written by hand: a few
//! dozen lines of SVG need no plotting crate.

use std::fmt::Write;

/// One bar.
pub(crate) struct Bar<'a> {
    pub(crate) name: &'a str,
    pub(crate) ratio: f64,
    pub(crate) target: Option<f64>,
}

const LABEL: f64 = 250.0;
const PLOT: f64 = 560.0;
const ROW: f64 = 26.0;
const TOP: f64 = 40.0;
const LOW: f64 = 0.01;
const HIGH: f64 = 100.0;

fn x(ratio: f64) -> f64 {
    let clamped = ratio.clamp(LOW, HIGH);
    LABEL + (clamped / LOW).log10() / (HIGH / LOW).log10() * PLOT
}

/// The SVG document for `bars`, titled `title`.
pub(crate) fn svg(title: &str, bars: &[Bar<'_>]) -> String {
    let height = TOP + ROW * bars.len() as f64 + 40.0;
    let width = LABEL + PLOT + 90.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="13">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="10" y="22" font-size="15" font-weight="bold">{}</text>"#,
        escape(title)
    );
    let bottom = TOP + ROW * bars.len() as f64;
    for grid in [0.01, 0.1, 1.0, 10.0, 100.0] {
        let gx = x(grid);
        let (stroke, dash) =
            if grid == 1.0 { ("#333", "") } else { ("#ccc", r#" stroke-dasharray="3,3""#) };
        let _ = writeln!(
            out,
            r#"<line x1="{gx:.1}" y1="{TOP}" x2="{gx:.1}" y2="{bottom}" stroke="{stroke}"{dash}/><text x="{gx:.1}" y="{:.1}" text-anchor="middle">{grid}x</text>"#,
            bottom + 16.0
        );
    }
    for (i, bar) in bars.iter().enumerate() {
        let y = TOP + ROW * i as f64;
        let color = match bar.target {
            Some(t) if bar.ratio >= t => "#2e9e44",
            Some(_) => "#d1342f",
            None => "#8a8a8a",
        };
        let (x0, x1) = (x(LOW), x(bar.ratio));
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text><rect x="{x0:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{color}"/><text x="{:.1}" y="{:.1}">{:.2}x</text>"#,
            LABEL - 8.0,
            y + ROW * 0.65,
            escape(bar.name),
            y + 4.0,
            (x1 - x0).max(1.0),
            ROW - 8.0,
            x1 + 4.0,
            y + ROW * 0.65,
            bar.ratio
        );
        if let Some(target) = bar.target {
            let tx = x(target);
            let _ = writeln!(
                out,
                r#"<line x1="{tx:.1}" y1="{:.1}" x2="{tx:.1}" y2="{:.1}" stroke="black" stroke-width="3"/>"#,
                y + 1.0,
                y + ROW - 1.0
            );
        }
    }
    let _ = writeln!(
        out,
        r##"<text x="10" y="{:.1}" fill="#555">ratio = gmem over baseline, higher is better; black tick: target</text>"##,
        bottom + 34.0
    );
    out.push_str("</svg>\n");
    out
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bars_scale_with_the_ratio_and_colour_by_target() {
        let bars = [
            Bar { name: "met", ratio: 2.0, target: Some(1.0) },
            Bar { name: "missed", ratio: 0.5, target: Some(1.0) },
            Bar { name: "a<b", ratio: 1.0, target: None },
        ];
        let svg = svg("t", &bars);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("#2e9e44") && svg.contains("#d1342f") && svg.contains("#8a8a8a"));
        assert!(svg.contains("a&lt;b"), "labels are escaped");
        assert!(x(2.0) > x(1.0) && x(1.0) > x(0.5));
        assert_eq!(x(1.0), LABEL + PLOT / 2.0, "1x sits in the middle of the log scale");
        assert_eq!(x(1e9), x(HIGH), "out-of-range ratios are clamped");
    }
}
