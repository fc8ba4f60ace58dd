//! The report's SVG charts, drawn with plotters' SVG backend (no system
//! fonts needed: text is SVG text, sized by an estimate).

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::model::is_ours;

/// One bar: whose it is (which sets its colour), its length in the
/// chart's unit, and the text written after it.
pub struct Bar {
    pub name: String,
    pub value: f64,
    pub text: String,
}

/// One group of bars under a heading: a case and each implementation's
/// figure.
pub struct BarGroup {
    pub label: String,
    pub bars: Vec<Bar>,
}

/// One panel of a stacked bar chart: a group on an axis of its own.
pub struct BarPanel {
    pub unit: String,
    pub group: BarGroup,
}

/// One line of a line chart.
pub struct Line {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// One panel of a line chart, its lines sharing axes.
pub struct Panel {
    pub x_label: String,
    pub y_label: String,
    pub lines: Vec<Line>,
}

/// This crate's rows in warm colours, the alternatives in cool ones and
/// grey, so a reader finds "ours" in every chart at a glance.
fn colour(name: &str, ours_seen: &mut Vec<String>, theirs_seen: &mut Vec<String>) -> RGBColor {
    const OURS: [RGBColor; 3] = [
        RGBColor(214, 39, 40),
        RGBColor(255, 127, 14),
        RGBColor(188, 80, 144),
    ];
    const THEIRS: [RGBColor; 5] = [
        RGBColor(31, 119, 180),
        RGBColor(44, 160, 44),
        RGBColor(127, 127, 127),
        RGBColor(23, 190, 207),
        RGBColor(140, 86, 75),
    ];
    let (seen, palette): (&mut Vec<String>, &[RGBColor]) = if is_ours(name) {
        (ours_seen, &OURS)
    } else {
        (theirs_seen, &THEIRS)
    };
    let index = match seen.iter().position(|n| n == name) {
        Some(i) => i,
        None => {
            seen.push(name.to_string());
            seen.len() - 1
        }
    };
    palette[index % palette.len()]
}

type Result<T> = std::result::Result<T, String>;

/// An axis label: whole numbers without decimals, small ones with one.
fn tick(value: f64) -> String {
    if value.fract() == 0.0 || value.abs() >= 100.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

/// A log axis label, only at 1, 2 and 5 times a power of ten, so labels
/// do not crowd where decades narrow.
fn log_tick(value: f64) -> String {
    let mantissa = value / 10f64.powf(value.log10().floor());
    if [1.0, 2.0, 5.0].iter().any(|m| (mantissa - m).abs() < 1e-6) {
        tick(value)
    } else {
        String::new()
    }
}

fn drawing_error(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Names the chart in an error.
fn naming(path: &Path) -> impl FnOnce(String) -> String + '_ {
    move |e| format!("drawing {}: {e}", path.display())
}

/// Horizontal bars, one group per case, on one axis; each bar labelled
/// with its text.
pub fn bars(path: &Path, title: &str, unit: &str, groups: &[BarGroup]) -> Result<()> {
    draw_bars(path, title, unit, groups).map_err(naming(path))
}

fn draw_bars(path: &Path, title: &str, unit: &str, groups: &[BarGroup]) -> Result<()> {
    let root = SVGBackend::new(path, (760, bars_height(groups))).into_drawing_area();
    root.fill(&WHITE).map_err(drawing_error)?;
    bar_chart(&root, Some(title), unit, groups, 1.45)?;
    root.present().map_err(drawing_error)
}

/// Bar charts stacked vertically under one title, each panel's group on
/// an axis of its own: figures of different units side by side.
pub fn bar_panels(path: &Path, title: &str, panels: &[BarPanel]) -> Result<()> {
    draw_bar_panels(path, title, panels).map_err(naming(path))
}

fn draw_bar_panels(path: &Path, title: &str, panels: &[BarPanel]) -> Result<()> {
    const TITLE: u32 = 30;
    let heights: Vec<u32> = panels
        .iter()
        .map(|panel| bars_height(std::slice::from_ref(&panel.group)))
        .collect();
    let height = TITLE + heights.iter().sum::<u32>();
    let root = SVGBackend::new(path, (760, height)).into_drawing_area();
    root.fill(&WHITE).map_err(drawing_error)?;
    let mut area = root
        .titled(title, ("sans-serif", 17))
        .map_err(drawing_error)?;
    for (panel, height) in panels.iter().zip(heights) {
        let (top, rest) = area.split_vertically(height);
        let group = std::slice::from_ref(&panel.group);
        bar_chart(&top, None, &panel.unit, group, headroom(group))?;
        area = rest;
    }
    root.present().map_err(drawing_error)
}

/// The height that fits `groups`' bars and headings.
fn bars_height(groups: &[BarGroup]) -> u32 {
    const ROW: u32 = 17;
    let rows: usize = groups.iter().map(|g| g.bars.len() + 1).sum();
    70 + ROW * rows as u32 + 8 * groups.len() as u32
}

/// How far past the longest bar an axis must reach for every bar's text
/// to fit after it, as a multiple of that bar (at least 1.2): texts are
/// 12-pixel sans-serif, about 6.6 pixels a character, on a 740-pixel plot.
fn headroom(groups: &[BarGroup]) -> f64 {
    const WIDTH: f64 = 740.0;
    let bars = || groups.iter().flat_map(|g| &g.bars);
    let max = bars().map(|b| b.value).fold(0.0f64, f64::max);
    if max <= 0.0 {
        return 1.45;
    }
    bars()
        .map(|bar| {
            let text = (bar.text.chars().count() as f64 * 6.6 + 8.0).min(WIDTH * 0.7);
            bar.value / max * WIDTH / (WIDTH - text)
        })
        .fold(1.2, f64::max)
}

/// `groups` on `area`, on one axis from 0 to `headroom` times the longest
/// bar, which leaves room on its right for the bars' texts.
fn bar_chart(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    caption: Option<&str>,
    unit: &str,
    groups: &[BarGroup],
    headroom: f64,
) -> Result<()> {
    let rows: usize = groups.iter().map(|g| g.bars.len() + 1).sum();
    let max = groups
        .iter()
        .flat_map(|g| g.bars.iter().map(|b| b.value))
        .fold(0.0f64, f64::max)
        .max(f64::MIN_POSITIVE);
    let total = rows as f64 + 0.5 * groups.len() as f64;
    let mut builder = ChartBuilder::on(area);
    if let Some(caption) = caption {
        builder.caption(caption, ("sans-serif", 17));
    }
    let mut chart = builder
        .margin(10)
        .x_label_area_size(32)
        .build_cartesian_2d(0.0..max * headroom, 0.0..total)
        .map_err(drawing_error)?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .disable_y_axis()
        .x_desc(unit)
        .x_labels(8)
        .x_label_formatter(&|v| tick(*v))
        .light_line_style(TRANSPARENT)
        .draw()
        .map_err(drawing_error)?;
    let left =
        TextStyle::from(("sans-serif", 12).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    let heading = TextStyle::from(("sans-serif", 13).into_font().style(FontStyle::Bold))
        .pos(Pos::new(HPos::Left, VPos::Center));
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let mut top = total;
    for group in groups {
        chart
            .draw_series([Text::new(
                group.label.clone(),
                (0.0, top - 0.5),
                heading.clone(),
            )])
            .map_err(drawing_error)?;
        top -= 1.0;
        for bar in &group.bars {
            let fill = colour(&bar.name, &mut ours, &mut theirs);
            chart
                .draw_series([Rectangle::new(
                    [(0.0, top - 0.85), (bar.value, top - 0.15)],
                    fill.filled(),
                )])
                .map_err(drawing_error)?;
            chart
                .draw_series([Text::new(
                    bar.text.clone(),
                    (bar.value + max * 0.01, top - 0.5),
                    left.clone(),
                )])
                .map_err(drawing_error)?;
            top -= 1.0;
        }
        top -= 0.5;
    }
    Ok(())
}

/// Line charts stacked vertically, one per panel, sharing a title.
pub fn lines(path: &Path, title: &str, panels: &[Panel], log_x: bool) -> Result<()> {
    draw_lines(path, title, panels, log_x).map_err(naming(path))
}

fn draw_lines(path: &Path, title: &str, panels: &[Panel], log_x: bool) -> Result<()> {
    let height = 40 + 300 * panels.len() as u32;
    let root = SVGBackend::new(path, (760, height)).into_drawing_area();
    root.fill(&WHITE).map_err(drawing_error)?;
    let root = root
        .titled(title, ("sans-serif", 17))
        .map_err(drawing_error)?;
    for (area, panel) in root.split_evenly((panels.len(), 1)).iter().zip(panels) {
        panel_chart(area, panel, log_x)?;
    }
    root.present().map_err(drawing_error)
}

fn panel_chart(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    panel: &Panel,
    log_x: bool,
) -> Result<()> {
    let points = || panel.lines.iter().flat_map(|l| l.points.iter().copied());
    let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0.0f64);
    for (x, y) in points() {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1) = (1.0, 2.0);
    }
    if x0 >= x1 {
        x1 = x0 + 1.0;
    }
    let y1 = if y1 > 0.0 { y1 * 1.1 } else { 1.0 };
    // Counts (threads) get whole-number ticks only.
    let whole_x = points().all(|(x, _)| x.fract() == 0.0);
    let mut builder = ChartBuilder::on(area);
    // Room on the right for the last x label.
    builder
        .margin(10)
        .margin_right(40)
        .x_label_area_size(36)
        .y_label_area_size(64);
    // The legend goes in whichever corner the lines cross least.
    let legend_at = quietest_corner(panel, (x0, x1), y1, log_x);
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart.map_err(drawing_error)?;
            chart
                .configure_mesh()
                .x_desc(panel.x_label.as_str())
                .y_desc(panel.y_label.as_str())
                .x_label_formatter(&|v| {
                    if log_x {
                        log_tick(*v)
                    } else if whole_x && v.fract() != 0.0 {
                        String::new()
                    } else {
                        tick(*v)
                    }
                })
                .y_label_formatter(&|v| tick(*v))
                .light_line_style(TRANSPARENT)
                .draw()
                .map_err(drawing_error)?;
            for line in &panel.lines {
                let c = colour(&line.name, &mut ours, &mut theirs);
                let style = ShapeStyle::from(c).stroke_width(2);
                chart
                    .draw_series(LineSeries::new(line.points.iter().copied(), style))
                    .map_err(drawing_error)?
                    .label(line.name.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], style));
                if line.points.len() <= 20 {
                    chart
                        .draw_series(line.points.iter().map(|&p| Circle::new(p, 3, c.filled())))
                        .map_err(drawing_error)?;
                }
            }
            chart
                .configure_series_labels()
                .position(legend_at)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK.mix(0.4))
                .draw()
                .map_err(drawing_error)?;
        }};
    }
    if log_x {
        // Whole decades, so the axis starts and ends on labelled ticks.
        let x0 = 10f64.powf(x0.max(1e-3).log10().floor());
        let x1 = 10f64.powf(x1.log10().ceil());
        draw!(builder.build_cartesian_2d((x0..x1).log_scale(), 0.0..y1));
    } else {
        draw!(builder.build_cartesian_2d(x0..x1, 0.0..y1));
    }
    Ok(())
}

/// The corner of a panel (x from `x0` to `x1`, y from 0 to `y1`) that its
/// lines pass through least: each line is followed, interpolated, at a few
/// points across each corner's third of the width, counting those that
/// fall in the corner's band of the height.
fn quietest_corner(
    panel: &Panel,
    (x0, x1): (f64, f64),
    y1: f64,
    log_x: bool,
) -> SeriesLabelPosition {
    // Where x falls across the width, 0 to 1, as drawn.
    let share = |x: f64| {
        if log_x {
            (x / x0).ln() / (x1 / x0).ln()
        } else {
            (x - x0) / (x1 - x0)
        }
    };
    let at = |line: &Line, s: f64| {
        line.points.windows(2).find_map(|w| {
            let (a, b) = (share(w[0].0), share(w[1].0));
            (a <= s && s <= b).then(|| {
                let t = if b > a { (s - a) / (b - a) } else { 0.0 };
                w[0].1 + t * (w[1].1 - w[0].1)
            })
        })
    };
    let corners = [
        (SeriesLabelPosition::UpperLeft, 0.0, true),
        (SeriesLabelPosition::UpperRight, 0.67, true),
        (SeriesLabelPosition::LowerRight, 0.67, false),
        (SeriesLabelPosition::LowerLeft, 0.0, false),
    ];
    let crossings = |&(_, from, upper): &(SeriesLabelPosition, f64, bool)| {
        (0..12)
            .flat_map(|i| {
                panel
                    .lines
                    .iter()
                    .map(move |line| (line, from + 0.33 * i as f64 / 11.0))
            })
            .filter(|&(line, s)| {
                at(line, s).is_some_and(|y| {
                    if upper {
                        y >= y1 * 0.65
                    } else {
                        y <= y1 * 0.35
                    }
                })
            })
            .count()
    };
    corners
        .iter()
        .min_by_key(|corner| crossings(corner))
        .map_or(SeriesLabelPosition::UpperLeft, |corner| corner.0.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("weakrefs-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }

    #[test]
    fn bar_chart_names_every_bar() {
        let path = scratch("bars.svg");
        let bar = |name: &str, value: f64| Bar {
            name: name.into(),
            value,
            text: format!("{name}  {value:.1} M/s"),
        };
        let groups = [BarGroup {
            label: "read hit, 1 thread".into(),
            bars: vec![bar("weakrefs", 12.5), bar("dashmap", 10.0)],
        }];
        bars(&path, "reads", "M/s", &groups).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("weakrefs  12.5 M/s"), "{svg}");
        assert!(svg.contains(">\n10\n<"), "axis in M/s: {svg}");
        assert!(svg.contains("dashmap  10.0 M/s"));
        assert!(svg.contains("read hit, 1 thread"));
    }

    #[test]
    fn bar_panels_each_have_an_axis() {
        let path = scratch("panels.svg");
        let panel = |unit: &str, values: [f64; 2]| BarPanel {
            unit: unit.into(),
            group: BarGroup {
                label: format!("in {unit}"),
                bars: ["strong HashMap", "WeakValueMap"]
                    .iter()
                    .zip(values)
                    .map(|(name, value)| Bar {
                        name: name.to_string(),
                        value,
                        text: format!("{name}  {value}"),
                    })
                    .collect(),
            },
        };
        bar_panels(
            &path,
            "three caches",
            &[panel("x", [1.0, 0.5]), panel("MiB", [400.0, 100.0])],
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.contains("three caches"), "{svg}");
        assert!(svg.contains("WeakValueMap  0.5") && svg.contains("WeakValueMap  100"));
        assert!(
            svg.contains(">\nin MiB\n<") && svg.contains(">\nMiB\n<"),
            "{svg}"
        );
        // Each panel's axis reaches its own longest bar: 400 MiB here.
        assert!(svg.contains(">\n400\n<"), "{svg}");
    }

    #[test]
    fn ticks() {
        assert_eq!(tick(2.0), "2");
        assert_eq!(tick(0.5), "0.5");
        assert_eq!(tick(1234.5), "1234");
        assert_eq!(log_tick(20.0), "20");
        assert_eq!(log_tick(0.5), "0.5");
        assert_eq!(log_tick(30.0), "");
    }

    #[test]
    fn line_chart_has_a_legend_entry_per_line() {
        let path = scratch("lines.svg");
        let panel = |y: &str| Panel {
            x_label: "operations".into(),
            y_label: y.into(),
            lines: vec![
                Line {
                    name: "WeakValueMap".into(),
                    points: vec![(1.0, 1.0), (2.0, 3.0)],
                },
                Line {
                    name: "DashMap + retain".into(),
                    points: vec![(1.0, 2.0), (2.0, 9.0)],
                },
            ],
        };
        lines(&path, "churn", &[panel("entries"), panel("KiB")], false).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert_eq!(svg.matches("DashMap + retain").count(), 2);
        lines(&path, "latency", &[panel("share")], true).unwrap();
    }
}
