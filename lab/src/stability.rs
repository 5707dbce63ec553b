//! The stability maps of `tether repro stability`: the spectral radius of the
//! round-robin maps of `tether_shared::stability` drawn over the (ηh, α) plane for
//! EASGD and the (η, ρ) plane for ADMM, with the boundaries overlaid.

use std::path::Path;

use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use tether_shared::stability::{
    admm_round_map, easgd_alpha_bound, easgd_round_map, is_stable, spectral_radius,
};

use crate::plot::{PlotError, register_bundled_font};

/// The ADMM setting analysed (the paper's: p = 3, η = 0.001, ρ = 2.5, h = 1).
#[derive(Clone, Copy, Debug)]
pub struct Admm {
    /// Workers.
    pub p: usize,
    /// Learning rate η.
    pub eta: f64,
    /// Penalty ρ.
    pub rho: f64,
    /// Curvature h of f(x) = h x²/2.
    pub h: f64,
}

/// Colour of a spectral radius: blues inside the stable region (darker converges
/// faster), reds outside.
fn colour(radius: f64) -> RGBColor {
    if is_stable(radius) {
        let t = radius.clamp(0.0, 1.0);
        let mix = |a: f64, b: f64| (a + (b - a) * t) as u8;
        RGBColor(mix(20.0, 200.0), mix(60.0, 225.0), mix(160.0, 250.0))
    } else {
        let t = ((radius - 1.0) * 4.0).clamp(0.0, 1.0);
        let mix = |a: f64, b: f64| (a + (b - a) * t) as u8;
        RGBColor(mix(250.0, 150.0), mix(200.0, 10.0), mix(190.0, 20.0))
    }
}

type Chart<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// What a drawing step failed with.
type Drawn<T> = Result<T, String>;

fn failed<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> String {
    e.to_string()
}

/// One axis of a stability map: its label, upper end (the lower is 0) and cell count.
struct Axis(&'static str, f64, usize);

/// Draws the spectral radius of `radius(x, y)` as coloured cells on `area`, and
/// returns the chart (for overlays) and the radius of every cell, `[x][y]`.
fn radius_map<'a, 'b>(
    area: &'a DrawingArea<BitMapBackend<'b>, plotters::coord::Shift>,
    caption: &str,
    x: Axis,
    y: Axis,
    radius: impl Fn(f64, f64) -> f64,
) -> Drawn<(Chart<'a, 'b>, Vec<Vec<f64>>)> {
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..x.1, 0.0..y.1)
        .map_err(failed)?;
    chart
        .configure_mesh()
        .x_desc(x.0)
        .y_desc(y.0)
        .x_labels(6)
        .disable_mesh()
        .draw()
        .map_err(failed)?;
    let (dx, dy) = (x.1 / x.2 as f64, y.1 / y.2 as f64);
    let grid: Vec<Vec<f64>> = (0..x.2)
        .map(|i| {
            (0..y.2)
                .map(|j| radius((i as f64 + 0.5) * dx, (j as f64 + 0.5) * dy))
                .collect()
        })
        .collect();
    chart
        .draw_series(grid.iter().enumerate().flat_map(|(i, col)| {
            col.iter().enumerate().map(move |(j, &r)| {
                let (x0, y0) = (i as f64 * dx, j as f64 * dy);
                Rectangle::new([(x0, y0), (x0 + dx, y0 + dy)], colour(r).filled())
            })
        }))
        .map_err(failed)?;
    Ok((chart, grid))
}

/// The cell edges (in chart coordinates) where stability flips between neighbours.
fn boundary(grid: &[Vec<f64>], dx: f64, dy: f64) -> Vec<[(f64, f64); 2]> {
    let unstable = |i: usize, j: usize| !is_stable(grid[i][j]);
    let (nx, ny) = (grid.len(), grid.first().map_or(0, Vec::len));
    let mut edges = Vec::new();
    for i in 0..nx {
        for j in 0..ny {
            if i + 1 < nx && unstable(i, j) != unstable(i + 1, j) {
                let x = (i + 1) as f64 * dx;
                edges.push([(x, j as f64 * dy), (x, (j + 1) as f64 * dy)]);
            }
            if j + 1 < ny && unstable(i, j) != unstable(i, j + 1) {
                let y = (j + 1) as f64 * dy;
                edges.push([(i as f64 * dx, y), ((i + 1) as f64 * dx, y)]);
            }
        }
    }
    edges
}

/// Draws the two stability maps to `path` (PNG): EASGD with p = 1 over (ηh, α)
/// with the paper's bound, and ADMM of `a` over (η, ρ) with the measured boundary
/// and `a`'s own point.
pub fn draw_maps(path: &Path, a: Admm) -> Result<(), PlotError> {
    let err = |message: String| PlotError {
        path: path.display().to_string(),
        message,
    };
    register_bundled_font().map_err(err)?;
    draw(path, a).map_err(err)
}

fn draw(path: &Path, a: Admm) -> Drawn<()> {
    let root = BitMapBackend::new(path, (1500, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(failed)?;
    let (left, right) = root.split_horizontally(750);

    // EASGD with p = 1, where the paper's bound is exact (see the check above).
    let (mut chart, _) = radius_map(
        &left,
        "EASGD round-robin: spectral radius over (ηh, α)",
        Axis("ηh", 2.5, 250),
        Axis("α", 1.5, 150),
        |eh, a| spectral_radius(&easgd_round_map(1, eh, a)),
    )?;
    let bound = (0..=200)
        .map(|k| 2.0 * k as f64 / 200.0)
        .map(|eh| (eh, easgd_alpha_bound(eh)));
    chart
        .draw_series(LineSeries::new(bound, BLACK.stroke_width(3)))
        .map_err(failed)?
        .label("paper's bound α = (4 − 2ηh)/(4 − ηh), ηh ≤ 2")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.stroke_width(3)));
    chart
        .draw_series(LineSeries::new(
            [(2.0, 0.0), (2.0, 1.5)],
            BLACK.stroke_width(2),
        ))
        .map_err(failed)?;
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(failed)?;

    // ADMM over (η, ρ): no closed form, so the measured boundary.
    let (x, y) = (
        Axis("η", (2.0 * a.eta).max(0.01), 200),
        Axis("ρ", (2.0 * a.rho).max(10.0), 150),
    );
    let (dx, dy) = (x.1 / x.2 as f64, y.1 / y.2 as f64);
    let radius = |eta: f64, rho: f64| spectral_radius(&admm_round_map(a.p, eta, rho, a.h));
    let caption = format!(
        "ADMM round-robin (p = {}, h = {}): spectral radius over (η, ρ)",
        a.p, a.h
    );
    let (mut chart, grid) = radius_map(&right, &caption, x, y, radius)?;
    chart
        .draw_series(
            boundary(&grid, dx, dy)
                .into_iter()
                .map(|e| PathElement::new(e, BLACK.stroke_width(2))),
        )
        .map_err(failed)?
        .label("measured boundary (radius = 1)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.stroke_width(2)));
    chart
        .draw_series([Circle::new((a.eta, a.rho), 7, BLACK.filled())])
        .map_err(failed)?
        .label(format!(
            "η = {}, ρ = {}: radius {:.4}",
            a.eta,
            a.rho,
            radius(a.eta, a.rho)
        ))
        .legend(|(x, y)| Circle::new((x + 10, y), 5, BLACK.filled()));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(failed)?;
    root.present().map_err(failed)
}
