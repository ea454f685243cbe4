//! The report's figures as SVG, drawn with `plotters` (its SVG backend without font
//! libraries: text is written as SVG `<text>` for the browser to set). A figure is a grid of
//! panels; a panel holds lines (a raw series drawn thin and pale, a smoothed one bold, or
//! validation points joined), reference lines (the zero-shot level) and marked points (the
//! best step).

use anyhow::{anyhow, Result};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

/// Tableau 10: distinct, colour-blind-friendly hues.
pub const PALETTE: [RGBColor; 10] = [
    RGBColor(78, 121, 167),
    RGBColor(242, 142, 43),
    RGBColor(225, 87, 89),
    RGBColor(89, 161, 79),
    RGBColor(176, 122, 161),
    RGBColor(118, 183, 178),
    RGBColor(237, 201, 72),
    RGBColor(255, 157, 167),
    RGBColor(156, 117, 95),
    RGBColor(186, 176, 172),
];

const FONT: &str = "sans-serif";
const INK: RGBColor = RGBColor(60, 60, 67);
const GRID: RGBColor = RGBColor(232, 232, 236);
const AXIS: RGBColor = RGBColor(170, 170, 178);

/// How a line is drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Style {
    /// every step, thin and pale (under its smoothed line)
    Raw,
    /// bold
    Bold,
    /// evaluation points: a line with dots
    Points,
}

#[derive(Debug, Clone)]
pub struct Line {
    pub label: Option<String>,
    pub points: Vec<(f64, f64)>,
    pub colour: RGBColor,
    pub style: Style,
}

/// A horizontal reference line (dashed), such as the zero-shot level.
#[derive(Debug, Clone)]
pub struct Level {
    pub label: String,
    pub y: f64,
    pub colour: RGBColor,
}

/// A point to call out (the best validation step).
#[derive(Debug, Clone)]
pub struct Mark {
    pub at: (f64, f64),
    pub label: String,
    pub colour: RGBColor,
    /// the label under the point (a maximum) rather than over it
    pub below: bool,
}

/// How a panel's y labels are written.
#[derive(Debug, Clone, Copy)]
pub enum YFormat {
    Fixed(usize),
    /// scientific (learning rates)
    Sci,
}

#[derive(Debug, Clone)]
pub struct Panel {
    pub title: String,
    pub x_desc: String,
    pub y_format: YFormat,
    pub lines: Vec<Line>,
    pub levels: Vec<Level>,
    pub marks: Vec<Mark>,
    /// the legend at the upper left (curves that rise) instead of the upper right
    pub legend_left: bool,
}

impl Panel {
    pub fn new(title: &str, y_format: YFormat) -> Self {
        Self {
            title: title.to_string(),
            x_desc: "step".to_string(),
            y_format,
            lines: Vec::new(),
            levels: Vec::new(),
            marks: Vec::new(),
            legend_left: false,
        }
    }

    pub fn line(
        mut self,
        label: Option<&str>,
        points: Vec<(f64, f64)>,
        colour: RGBColor,
        style: Style,
    ) -> Self {
        self.lines.push(Line {
            label: label.map(String::from),
            points,
            colour,
            style,
        });
        self
    }

    /// The x and y ranges that hold everything, padded; None when there is nothing to draw.
    fn ranges(&self) -> Option<((f64, f64), (f64, f64))> {
        let pts = self
            .lines
            .iter()
            .flat_map(|l| l.points.iter().copied())
            .chain(self.marks.iter().map(|m| m.at))
            .filter(|(x, y)| x.is_finite() && y.is_finite());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        let mut any = false;
        for (x, y) in pts {
            any = true;
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        if !any {
            return None;
        }
        for l in &self.levels {
            y0 = y0.min(l.y);
            y1 = y1.max(l.y);
        }
        if x1 <= x0 {
            x1 = x0 + 1.0;
        }
        let span = if y1 > y0 {
            y1 - y0
        } else {
            y0.abs() * 0.8 + 1e-8
        };
        // room above the data for the legend (drawn in the top corner: about 9% of the
        // plot's height per entry), so that no line or mark passes under it
        let entries = self.levels.len() + self.lines.iter().filter(|l| l.label.is_some()).count();
        let legend = if entries == 0 {
            0.0
        } else {
            (0.06 + 0.09 * entries as f64).min(0.6)
        };
        let pad = span * 0.06;
        let top = y1 + pad + (span + 2.0 * pad) * legend / (1.0 - legend);
        Some(((x0, x1), (y0 - pad, top)))
    }
}

/// A centred moving average over a window of `window` points (shorter at the ends).
pub fn smooth(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let half = window / 2;
    let n = points.len();
    // prefix sums keep it linear in the number of points
    let mut prefix = Vec::with_capacity(n + 1);
    prefix.push(0.0);
    for (_, y) in points {
        prefix.push(prefix.last().unwrap() + y);
    }
    (0..n)
        .map(|i| {
            let (a, b) = (i.saturating_sub(half), (i + half + 1).min(n));
            (points[i].0, (prefix[b] - prefix[a]) / (b - a) as f64)
        })
        .collect()
}

/// The smoothing window for a series of `n` steps: about 1/25 of it, odd, at least 1.
pub fn window(n: usize) -> usize {
    (n / 25).max(1) | 1
}

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing a figure: {e:?}")
}

fn y_label(format: YFormat, v: f64) -> String {
    match format {
        YFormat::Fixed(d) => format!("{v:.d$}"),
        YFormat::Sci if v == 0.0 => "0".to_string(),
        YFormat::Sci => format!("{v:.1e}"),
    }
}

fn x_label(v: f64) -> String {
    if v.abs() >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else {
        format!("{v:.0}")
    }
}

/// Draw `panels` in a grid of `cols` columns, each panel `panel_w` x `panel_h` pixels; returns
/// the SVG document.
pub fn figure(panels: &[Panel], cols: usize, panel_w: u32, panel_h: u32) -> Result<String> {
    let cols = cols.max(1);
    let rows = panels.len().div_ceil(cols).max(1);
    let size = (panel_w * cols as u32, panel_h * rows as u32);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let areas = root.split_evenly((rows, cols));
        for (area, panel) in areas.iter().zip(panels) {
            draw_panel(area, panel)?;
        }
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

fn draw_panel(area: &DrawingArea<SVGBackend, plotters::coord::Shift>, p: &Panel) -> Result<()> {
    // (the SVG backend writes sizes divided by 1.24)
    let title = (FONT, 19).into_font().color(&INK);
    let Some(((x0, x1), (y0, y1))) = p.ranges() else {
        return draw_no_data(area, &p.title);
    };
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, title)
        .margin(10)
        .margin_right(18)
        .x_label_area_size(34)
        .y_label_area_size(56)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(plot_err)?;
    let yf = p.y_format;
    let y_fmt = move |v: &f64| y_label(yf, *v);
    let x_fmt = |v: &f64| x_label(*v);
    chart
        .configure_mesh()
        .bold_line_style(GRID)
        .light_line_style(TRANSPARENT)
        .axis_style(AXIS)
        .x_labels(6)
        .y_labels(6)
        .label_style((FONT, 14).into_font().color(&INK))
        .axis_desc_style((FONT, 14).into_font().color(&INK))
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .x_desc(p.x_desc.as_str())
        .draw()
        .map_err(plot_err)?;
    for level in &p.levels {
        let c = level.colour;
        chart
            .draw_series(DashedLineSeries::new(
                [(x0, level.y), (x1, level.y)],
                6,
                4,
                c.stroke_width(1),
            ))
            .map_err(plot_err)?
            .label(level.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(1)));
    }
    let mut labelled = !p.levels.is_empty();
    for line in &p.lines {
        let c = line.colour;
        let style = match line.style {
            Style::Raw => c.mix(0.28).stroke_width(1),
            Style::Bold => c.stroke_width(2),
            Style::Points => c.stroke_width(2),
        };
        let series = chart
            .draw_series(LineSeries::new(line.points.iter().copied(), style))
            .map_err(plot_err)?;
        if let Some(label) = &line.label {
            labelled = true;
            series.label(label.clone()).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2))
            });
        }
        if line.style == Style::Points {
            chart
                .draw_series(line.points.iter().map(|&pt| Circle::new(pt, 3, c.filled())))
                .map_err(plot_err)?;
        }
    }
    for mark in &p.marks {
        draw_mark(&mut chart, mark, (x0 + x1) / 2.0)?;
    }
    if labelled {
        chart
            .configure_series_labels()
            .position(if p.legend_left {
                SeriesLabelPosition::UpperLeft
            } else {
                SeriesLabelPosition::UpperRight
            })
            .background_style(WHITE.mix(0.85))
            .border_style(GRID)
            .label_font((FONT, 14).into_font().color(&INK))
            .draw()
            .map_err(plot_err)?;
    }
    Ok(())
}

/// A panel's title over "no data yet".
fn draw_no_data(area: &DrawingArea<SVGBackend, plotters::coord::Shift>, title: &str) -> Result<()> {
    let area = area
        .titled(title, (FONT, 19).into_font().color(&INK))
        .map_err(plot_err)?;
    let (w, h) = area.dim_in_pixel();
    area.draw(&Text::new(
        "no data yet",
        (w as i32 / 2 - 36, h as i32 / 2),
        (FONT, 16).into_font().color(&AXIS),
    ))
    .map_err(plot_err)?;
    Ok(())
}

/// A marked point (a ring around a dot) and its label, under or over it and towards the
/// middle `x_mid` of the x range.
fn draw_mark(
    chart: &mut ChartContext<'_, SVGBackend<'_>, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
    mark: &Mark,
    x_mid: f64,
) -> Result<()> {
    use plotters::style::text_anchor::{HPos, Pos, VPos};
    let c = mark.colour;
    chart
        .draw_series([
            Circle::new(mark.at, 7, c.stroke_width(2)),
            Circle::new(mark.at, 3, c.filled()),
        ])
        .map_err(plot_err)?;
    // (pixel offsets from the mark)
    let (dx, h) = if mark.at.0 > x_mid {
        (-8, HPos::Right)
    } else {
        (8, HPos::Left)
    };
    let (dy, v) = if mark.below {
        (9, VPos::Top)
    } else {
        (-9, VPos::Bottom)
    };
    let style = (FONT, 15).into_font().color(&c).pos(Pos::new(h, v));
    let text = Text::new(mark.label.clone(), (dx, dy), style);
    chart
        .plotting_area()
        .draw(&(EmptyElement::at(mark.at) + text))
        .map_err(plot_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothing_averages_a_centred_window() {
        let pts: Vec<(f64, f64)> = (0..5).map(|i| (i as f64, (i * i) as f64)).collect();
        let s = smooth(&pts, 3);
        // 0,1,4,9,16 -> (0+1)/2, (0+1+4)/3, (1+4+9)/3, (4+9+16)/3, (9+16)/2
        let want = [0.5, 5.0 / 3.0, 14.0 / 3.0, 29.0 / 3.0, 12.5];
        for ((x, y), w) in s.iter().zip(want) {
            assert!((y - w).abs() < 1e-12, "{x}: {y} vs {w}");
        }
        assert_eq!(smooth(&pts, 1), pts);
        assert_eq!(window(10), 1);
        assert_eq!(window(300), 13);
    }

    #[test]
    fn a_figure_is_svg_with_its_titles_and_no_external_reference() {
        let pts: Vec<(f64, f64)> = (1..50).map(|i| (i as f64, 1.0 / i as f64)).collect();
        let mut p = Panel::new("loss", YFormat::Fixed(2))
            .line(None, pts.clone(), PALETTE[0], Style::Raw)
            .line(Some("smoothed"), smooth(&pts, 5), PALETTE[0], Style::Bold);
        p.marks.push(Mark {
            at: (10.0, 0.1),
            label: "best".into(),
            colour: PALETTE[2],
            below: true,
        });
        p.levels.push(Level {
            label: "zero-shot".into(),
            y: 0.5,
            colour: PALETTE[9],
        });
        let empty = Panel::new("val mR", YFormat::Fixed(1));
        let svg = figure(&[p, empty], 2, 360, 260).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80]);
        for text in [
            "loss",
            "smoothed",
            "best",
            "zero-shot",
            "val mR",
            "no data yet",
        ] {
            assert!(
                svg.contains(&format!(">\n{text}\n</text>")),
                "{text} missing"
            );
        }
        assert!(!svg.contains("href"));
    }
}
