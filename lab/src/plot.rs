//! Line charts in panels (one panel per τ, per p, …), drawn as PNG and as SVG with
//! the same code: the figures of `tether repro`.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

/// One line: a label for the legend and its (x, y) points.
#[derive(Clone, Debug)]
pub struct Series {
    /// The legend's entry.
    pub label: String,
    /// The points, in x order.
    pub points: Vec<(f64, f64)>,
}

/// One panel: a title and its lines.
#[derive(Clone, Debug)]
pub struct Panel {
    /// Above the panel.
    pub title: String,
    /// Its lines (the same label, up to a note in parentheses, gets the same colour
    /// in every panel).
    pub series: Vec<Series>,
}

/// A figure: panels side by side (wrapping after `columns`), shared axis labels.
#[derive(Clone, Debug)]
pub struct Figure {
    /// Over the whole figure.
    pub title: String,
    /// Under each panel's x axis, with its unit.
    pub x_label: String,
    /// Beside each panel's y axis, with its unit.
    pub y_label: String,
    /// Panels per row.
    pub columns: usize,
    /// The panels.
    pub panels: Vec<Panel>,
}

/// Drawing failed (the file, or the backend).
#[derive(Debug, thiserror::Error)]
#[error("drawing {path}: {message}")]
pub struct PlotError {
    /// The file.
    pub path: String,
    /// What went wrong.
    pub message: String,
}

/// Writes `figure` to `stem`.png and `stem`.svg.
pub fn draw(figure: &Figure, stem: &Path) -> Result<(), PlotError> {
    register_bundled_font().map_err(|message| PlotError {
        path: stem.display().to_string(),
        message,
    })?;
    let size = figure_size(figure);
    let png = stem.with_extension("png");
    let svg = stem.with_extension("svg");
    let err = |path: &Path| {
        let path = path.display().to_string();
        move |e: String| PlotError {
            path: path.clone(),
            message: e,
        }
    };
    draw_on(BitMapBackend::new(&png, size).into_drawing_area(), figure).map_err(err(&png))?;
    draw_on(SVGBackend::new(&svg, size).into_drawing_area(), figure).map_err(err(&svg))
}

/// The PNG backend rasterises text with a font of its own: the bundled one.
pub(crate) fn register_bundled_font() -> Result<(), String> {
    register_font(
        "sans-serif",
        FontStyle::Normal,
        include_bytes!("../../assets/fonts/DejaVuSans.ttf"),
    )
    .map_err(|_| "the bundled font is not a valid TrueType font".to_string())
}

fn figure_size(figure: &Figure) -> (u32, u32) {
    let columns = figure.columns.clamp(1, figure.panels.len().max(1));
    let rows = figure.panels.len().div_ceil(columns).max(1);
    // Wide enough for the title (about 13 px a character at its size).
    let title = 40 + 13 * figure.title.chars().count() as u32;
    ((560 * columns as u32).max(title), 60 + 420 * rows as u32)
}

/// The top of a panel's y axis: a little above the highest point of any line once
/// the first tenth of that line has passed, so a start far above the curves (a test
/// error of 90 % before training) does not squash them against the axis.
fn panel_top(panel: &Panel) -> f64 {
    let top = panel
        .series
        .iter()
        .flat_map(|s| {
            let end = s.points.last().map_or(0.0, |p| p.0);
            s.points.iter().filter(move |p| p.0 >= 0.1 * end)
        })
        .map(|p| p.1)
        .fold(0.0, f64::max);
    top.max(1e-9) * 1.08
}

/// `points` cut where they leave the chart through its top: the pieces that stay
/// below `top`, each ending (or starting) where its line crosses it.
fn below(points: &[(f64, f64)], top: f64) -> Vec<Vec<(f64, f64)>> {
    let mut pieces: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut piece = Vec::new();
    for (i, &(x, y)) in points.iter().enumerate() {
        let crossing = |(x0, y0): (f64, f64)| (x0 + (x - x0) * (top - y0) / (y - y0), top);
        let previous = i.checked_sub(1).map(|j| points[j]);
        if y <= top {
            if let Some(p) = previous.filter(|p| p.1 > top) {
                piece.push(crossing(p));
            }
            piece.push((x, y));
        } else if let Some(p) = previous.filter(|p| p.1 <= top) {
            piece.push(crossing(p));
            pieces.push(std::mem::take(&mut piece));
        }
    }
    if !piece.is_empty() {
        pieces.push(piece);
    }
    pieces
}

/// What a line's colour follows: its label without a trailing note in parentheses,
/// so a method keeps its colour across panels where its tuned η differs.
fn colour_key(label: &str) -> &str {
    label.split(" (").next().unwrap_or(label)
}

/// The label's colour: one per distinct [`colour_key`], in order of first appearance.
fn colour(keys: &[&str], label: &str) -> RGBColor {
    const PALETTE: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(214, 39, 40),
        RGBColor(44, 160, 44),
        RGBColor(255, 127, 14),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(23, 190, 207),
    ];
    let i = keys
        .iter()
        .position(|k| *k == colour_key(label))
        .unwrap_or(0);
    PALETTE[i % PALETTE.len()]
}

fn draw_on<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, figure: &Figure) -> Result<(), String>
where
    DB::ErrorType: 'static,
{
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let root = root.titled(&figure.title, ("sans-serif", 26)).map_err(e)?;
    let columns = figure.columns.clamp(1, figure.panels.len().max(1));
    let rows = figure.panels.len().div_ceil(columns).max(1);
    let mut keys: Vec<&str> = Vec::new();
    for s in figure.panels.iter().flat_map(|p| &p.series) {
        if !keys.contains(&colour_key(&s.label)) {
            keys.push(colour_key(&s.label));
        }
    }
    // One time axis for every panel, so panels compare at a glance.
    let x_max = figure
        .panels
        .iter()
        .flat_map(|p| &p.series)
        .flat_map(|s| &s.points)
        .map(|p| p.0)
        .fold(0.0, f64::max)
        .max(1e-9);
    for (panel, area) in figure.panels.iter().zip(root.split_evenly((rows, columns))) {
        let y_max = panel_top(panel);
        let mut chart = ChartBuilder::on(&area)
            .caption(&panel.title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(58)
            .build_cartesian_2d(0.0..x_max * 1.02, 0.0..y_max)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc(&figure.x_label)
            .y_desc(&figure.y_label)
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 15))
            .draw()
            .map_err(e)?;
        for s in &panel.series {
            let c = colour(&keys, &s.label);
            for (i, piece) in below(&s.points, y_max).into_iter().enumerate() {
                let drawn = chart
                    .draw_series(LineSeries::new(piece, c.stroke_width(2)))
                    .map_err(e)?;
                if i == 0 {
                    drawn.label(&s.label).legend(move |(x, y)| {
                        PathElement::new([(x, y), (x + 18, y)], c.stroke_width(3))
                    });
                }
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(e)?;
    }
    root.present().map_err(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_cut_where_it_crosses_the_top() {
        // Starts above the top, dips under, leaves and comes back.
        let points = [
            (0.0, 90.0),
            (1.0, 10.0),
            (2.0, 20.0),
            (3.0, 60.0),
            (4.0, 20.0),
        ];
        let pieces = below(&points, 50.0);
        assert_eq!(
            pieces,
            vec![
                vec![(0.5, 50.0), (1.0, 10.0), (2.0, 20.0), (2.75, 50.0)],
                vec![(3.25, 50.0), (4.0, 20.0)],
            ]
        );
        assert_eq!(below(&points[1..3], 50.0), vec![points[1..3].to_vec()]);
    }

    #[test]
    fn a_method_keeps_its_colour_whatever_its_eta() {
        let keys = ["EASGD", "EAMSGD"];
        assert_eq!(
            colour(&keys, "EAMSGD (η 0.1)"),
            colour(&keys, "EAMSGD (η 0.05)")
        );
        assert_ne!(
            colour(&keys, "EAMSGD (η 0.1)"),
            colour(&keys, "EASGD (η 0.1)")
        );
    }

    #[test]
    fn the_axis_top_ignores_only_each_line_s_first_tenth() {
        let line = |points: Vec<(f64, f64)>| Series {
            label: String::new(),
            points,
        };
        let panel = Panel {
            title: String::new(),
            series: vec![
                line(vec![(0.0, 94.0), (5.0, 20.0), (10.0, 10.0)]),
                // A short line that diverged: all of it counts but its first tenth.
                line(vec![(0.0, 94.0), (0.5, 90.0), (1.0, 91.0)]),
            ],
        };
        assert!((panel_top(&panel) - 91.0 * 1.08).abs() < 1e-9);
        let panel = Panel {
            series: panel.series[..1].to_vec(),
            ..panel
        };
        assert!((panel_top(&panel) - 20.0 * 1.08).abs() < 1e-9);
    }
}
