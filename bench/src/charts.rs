//! The book's charts, as SVG files drawn with plotters. Its SVG backend writes text as SVG
//! `<text>` elements and leaves the fonts to the browser: no font library is needed here.

use std::path::Path;

use anyhow::{Context, Result};
use plotters::coord::Shift;
use plotters::coord::combinators::{BindKeyPoints, IntoLogRange};
use plotters::prelude::*;

const SIZE: (u32, u32) = (1100, 500);
/// Room right of the plot for the legend.
const LEGEND_WIDTH: u32 = 190;

/// Values of one series, one per category (`None`: not measured).
pub type Series = (String, Vec<Option<f64>>);

/// A bar chart on a logarithmic axis: one group of bars per category (a server), one bar per
/// series (a load) in each group.
pub struct Bars<'a> {
    pub title: &'a str,
    pub y_desc: &'a str,
    pub categories: Vec<String>,
    pub series: Vec<Series>,
    /// How a value on the y axis is labelled.
    pub unit: fn(f64) -> String,
}

/// Draws `bars` to `path`.
pub fn bars(path: &Path, bars: &Bars) -> Result<()> {
    let values = bars
        .series
        .iter()
        .flat_map(|(_, values)| values.iter().flatten());
    let (lo, hi) = decades(values.copied());
    // The x axis counts hundredths of a category: integers, whose labels plotters lets us
    // place at the centres (its floating-point axes pick their own label positions).
    let n = i32::try_from(bars.categories.len()).context("too many categories")?;
    let centers = (0..n).map(|i| i * 100 + 50).collect();
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(bars.title, ("sans-serif", 22))
        .margin(12)
        .margin_right(LEGEND_WIDTH)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d((0..n * 100).with_key_points(centers), (lo..hi).log_scale())?;
    let category = |x: &i32| {
        let i = usize::try_from(x / 100).unwrap_or(usize::MAX);
        bars.categories.get(i).cloned().unwrap_or_default()
    };
    let unit = |y: &f64| (bars.unit)(*y);
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_label_formatter(&category)
        .y_label_formatter(&unit)
        .y_desc(bars.y_desc)
        .label_style(("sans-serif", 14))
        .draw()?;
    let count = i32::try_from(bars.series.len()).context("too many series")?;
    let mut entries = Vec::new();
    let width = 80 / count.max(1);
    for (s, (name, values)) in (0..).zip(&bars.series) {
        let color = color(usize::try_from(s).unwrap_or(0));
        let left = |i: i32| i * 100 + 10 + s * width;
        let rects = (0..).zip(values).filter_map(|(i, value)| {
            let value = (*value)?;
            Some(Rectangle::new(
                [(left(i), lo), (left(i) + width, value)],
                color.filled(),
            ))
        });
        chart.draw_series(rects)?;
        entries.push((name.as_str(), color, Mark::Bar));
    }
    legend(&root, &entries)?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))
}

/// A line for each series over the same x values, both axes logarithmic; series whose name
/// ends with `(2006)` are dashed.
pub fn log_lines(
    path: &Path,
    title: &str,
    x: &[f64],
    series: &[Series],
    y_desc: &str,
) -> Result<()> {
    let values = series
        .iter()
        .flat_map(|(_, values)| values.iter().flatten());
    let (lo, hi) = decades(values.copied());
    let (x_lo, x_hi) = decades(x.iter().copied());
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .margin_right(LEGEND_WIDTH)
        .x_label_area_size(50)
        .y_label_area_size(80)
        .build_cartesian_2d((x_lo..x_hi).log_scale(), (lo..hi).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("descriptors watched (N)")
        .y_desc(y_desc)
        .x_label_formatter(&|x| format!("{x}"))
        .y_label_formatter(&|y| format!("{y}"))
        .label_style(("sans-serif", 14))
        .draw()?;
    let mut entries = Vec::new();
    for (s, (name, values)) in series.iter().enumerate() {
        // Measured and published lines of one mechanism share a colour.
        let color = color(s % 3);
        let points: Vec<(f64, f64)> = x
            .iter()
            .zip(values)
            .filter_map(|(&x, value)| Some((x, (*value)?)))
            .collect();
        let style = color.stroke_width(2);
        if name.ends_with("(2006)") {
            chart.draw_series(DashedLineSeries::new(points.clone(), 8, 6, style))?;
            entries.push((name.as_str(), color, Mark::Dashed));
        } else {
            chart.draw_series(LineSeries::new(points.clone(), style))?;
            entries.push((name.as_str(), color, Mark::Line));
        }
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
    }
    legend(&root, &entries)?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))
}

/// How a legend entry shows its series.
#[derive(Clone, Copy)]
enum Mark {
    Bar,
    Line,
    Dashed,
}

/// The legend, right of the plot, in the margin kept for it: there it hides no bar and no line.
fn legend(root: &DrawingArea<SVGBackend, Shift>, entries: &[(&str, RGBColor, Mark)]) -> Result<()> {
    let x = i32::try_from(SIZE.0 - LEGEND_WIDTH).unwrap_or(0) + 10;
    for (row, &(name, color, mark)) in (0..).zip(entries) {
        let y = 60 + row * 24;
        let line = |from: i32, to: i32| {
            PathElement::new([(x + from, y), (x + to, y)], color.stroke_width(3))
        };
        match mark {
            Mark::Bar => root.draw(&Rectangle::new(
                [(x, y - 7), (x + 22, y + 7)],
                color.filled(),
            ))?,
            Mark::Line => root.draw(&line(0, 22))?,
            Mark::Dashed => {
                root.draw(&line(0, 8))?;
                root.draw(&line(14, 22))?;
            }
        }
        root.draw(&Text::new(
            name.to_string(),
            (x + 30, y - 8),
            ("sans-serif", 15),
        ))?;
    }
    Ok(())
}

/// Colours told apart also by colour-blind readers (Okabe and Ito's palette).
fn color(index: usize) -> RGBColor {
    const PALETTE: [RGBColor; 7] = [
        RGBColor(0, 114, 178),
        RGBColor(213, 94, 0),
        RGBColor(0, 158, 115),
        RGBColor(230, 159, 0),
        RGBColor(204, 121, 167),
        RGBColor(86, 180, 233),
        RGBColor(0, 0, 0),
    ];
    PALETTE[index % PALETTE.len()]
}

/// The powers of ten just below the smallest and just above the largest of `values` (which
/// are positive; 1 to 10 when there are none).
fn decades(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| *v > 0.0)
        .fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi {
        return (1.0, 10.0);
    }
    let lo = 10f64.powf(lo.log10().floor());
    let hi = 10f64.powf(hi.log10().ceil()).max(lo * 10.0);
    (lo, hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_span_whole_decades() {
        assert_eq!(decades([3.0, 250.0].into_iter()), (1.0, 1000.0));
        assert_eq!(decades([100.0].into_iter()), (100.0, 1000.0));
        assert_eq!(decades(std::iter::empty()), (1.0, 10.0));
    }

    #[test]
    fn charts_are_svg_files_with_their_labels() {
        let dir = std::env::temp_dir().join(format!("bench-charts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a folder");
        let series = vec![
            ("keep-alive".to_string(), vec![Some(1000.0), None]),
            ("poll (2006)".to_string(), vec![Some(20.0), Some(3000.0)]),
        ];
        let path = dir.join("bars.svg");
        let chart = Bars {
            title: "requests",
            y_desc: "req/s",
            categories: vec!["1 iterative".into(), "7 epoll".into()],
            series: series.clone(),
            unit: |y| format!("{y}"),
        };
        bars(&path, &chart).expect("a bar chart");
        let svg = std::fs::read_to_string(&path).expect("the file");
        assert!(svg.starts_with("<svg") && svg.contains("7 epoll") && svg.contains("keep-alive"));
        let path = dir.join("lines.svg");
        log_lines(&path, "tlpi", &[10.0, 10000.0], &series, "seconds").expect("a line chart");
        let svg = std::fs::read_to_string(&path).expect("the file");
        assert!(svg.contains("poll (2006)"));
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
