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
    /// Its lines (the same label gets the same colour in every panel).
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
    (560 * columns as u32, 60 + 420 * rows as u32)
}

/// The label's colour: one per distinct label, in order of first appearance.
fn colour(labels: &[String], label: &str) -> RGBColor {
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
    let i = labels.iter().position(|l| l == label).unwrap_or(0);
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
    let mut labels: Vec<String> = Vec::new();
    for s in figure.panels.iter().flat_map(|p| &p.series) {
        if !labels.contains(&s.label) {
            labels.push(s.label.clone());
        }
    }
    let largest = |coordinate: fn(&(f64, f64)) -> f64| {
        figure
            .panels
            .iter()
            .flat_map(|p| &p.series)
            .flat_map(|s| &s.points)
            .map(coordinate)
            .fold(0.0, f64::max)
            .max(1e-9)
    };
    let (x_max, y_max) = (largest(|p| p.0), largest(|p| p.1));
    for (panel, area) in figure.panels.iter().zip(root.split_evenly((rows, columns))) {
        let mut chart = ChartBuilder::on(&area)
            .caption(&panel.title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(58)
            .build_cartesian_2d(0.0..x_max * 1.02, 0.0..y_max * 1.05)
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
            let c = colour(&labels, &s.label);
            chart
                .draw_series(LineSeries::new(s.points.iter().copied(), c.stroke_width(2)))
                .map_err(e)?
                .label(&s.label)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], c.stroke_width(3)));
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
