//! `tether sim stability`: the paper's round-robin stability analysis, printed,
//! reported as JSON, and drawn as two stability maps (EASGD over (ηh, α), ADMM over
//! (η, ρ)) with the boundaries overlaid.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};
use tether_shared::stability::{
    admm_round_map, admm_run, check_easgd_bound, easgd_alpha_bound, easgd_round_map, is_stable,
    spectral_radius,
};

/// Settings of `tether sim stability`.
#[derive(Args, Debug)]
pub struct StabilityArgs {
    /// Worker counts p for which to check the EASGD bound.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 3, 8])]
    workers: Vec<usize>,
    /// Points of ηh in (0, 2) at which the largest stable α is found.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(2..))]
    points: u32,
    /// ADMM rounds to iterate from x = 1000, λ = 0.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// ADMM: number of workers p.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    admm_workers: u32,
    /// ADMM: learning rate η.
    #[arg(long, default_value_t = 0.001, allow_negative_numbers = true)]
    admm_eta: f64,
    /// ADMM: penalty ρ.
    #[arg(long, default_value_t = 2.5, allow_negative_numbers = true)]
    admm_rho: f64,
    /// ADMM: curvature h of f(x) = h x²/2.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    admm_h: f64,
    /// Where to draw the stability maps.
    #[arg(long, default_value = "stability.png")]
    png: PathBuf,
    /// Write the results here as JSON.
    #[arg(long)]
    report: Option<PathBuf>,
}

/// The ADMM setting analysed (the paper's: p = 3, η = 0.001, ρ = 2.5, h = 1).
#[derive(Clone, Copy)]
struct Admm {
    p: usize,
    eta: f64,
    rho: f64,
    h: f64,
}

/// Runs the analysis, prints it, draws the maps and writes the report.
pub fn run(args: &StabilityArgs) -> Result<()> {
    if args.workers.contains(&0) {
        anyhow::bail!("--workers: every worker count must be at least 1");
    }
    let a = Admm {
        p: args.admm_workers as usize,
        eta: args.admm_eta,
        rho: args.admm_rho,
        h: args.admm_h,
    };
    if !(a.eta.is_finite()
        && a.eta > 0.0
        && a.rho.is_finite()
        && a.rho >= 0.0
        && a.h.is_finite()
        && a.h > 0.0)
    {
        anyhow::bail!("--admm-eta and --admm-h must be positive and --admm-rho ≥ 0, all finite");
    }
    println!(
        "(a) EASGD round-robin on f(x) = h x²/2: stable iff 0 ≤ ηh ≤ 2 and 0 ≤ α ≤ (4 − 2ηh)/(4 − ηh)"
    );
    let mut checks = Vec::new();
    for &p in &args.workers {
        let c = check_easgd_bound(p, args.points as usize);
        println!(
            "    p = {p}: largest |α_max − bound| over {} values of ηh: {:.2e} (at ηh = {:.3}); \
             region an interval: {}; unstable for every α when ηh > 2: {}",
            c.eta_h_points,
            c.max_alpha_disagreement,
            c.worst_eta_h,
            c.region_is_interval,
            c.unstable_beyond_eta_h_2
        );
        checks.push(c);
    }
    let every = (args.rounds as usize / 10).max(1);
    let admm = admm_run(a.p, a.eta, a.rho, a.h, 1000.0, args.rounds as usize, every);
    println!(
        "(b) ADMM round-robin, p = {}, η = {}, ρ = {}, h = {}: spectral radius per round {:.6} ({})",
        a.p,
        a.eta,
        a.rho,
        a.h,
        admm.admm_spectral_radius,
        if admm.admm_spectral_radius > 1.0 {
            "> 1, unstable"
        } else {
            "≤ 1, stable"
        }
    );
    println!("    |x̃| from x = 1000, λ = 0:");
    for (round, mag) in &admm.center_magnitude {
        println!("    round {round:>7}: {mag:.4e}");
    }
    draw(&args.png, a).with_context(|| format!("drawing {}", args.png.display()))?;
    println!("(c) stability maps drawn to {}", args.png.display());
    let report = serde_json::json!({
        "command": "sim stability",
        "settings": {
            "workers": args.workers, "points": args.points, "rounds": args.rounds,
            "admm": { "workers": a.p, "eta": a.eta, "rho": a.rho, "h": a.h },
        },
        "easgd": checks,
        "admm": admm,
        "admm_spectral_radius": admm.admm_spectral_radius,
        "png": args.png,
    });
    crate::write_report(args.report.as_deref(), &report)
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

type Panel<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

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
) -> Result<(Panel<'a, 'b>, Vec<Vec<f64>>)> {
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..x.1, 0.0..y.1)?;
    chart
        .configure_mesh()
        .x_desc(x.0)
        .y_desc(y.0)
        .x_labels(6)
        .disable_mesh()
        .draw()?;
    let (dx, dy) = (x.1 / x.2 as f64, y.1 / y.2 as f64);
    let grid: Vec<Vec<f64>> = (0..x.2)
        .map(|i| {
            (0..y.2)
                .map(|j| radius((i as f64 + 0.5) * dx, (j as f64 + 0.5) * dy))
                .collect()
        })
        .collect();
    chart.draw_series(grid.iter().enumerate().flat_map(|(i, col)| {
        col.iter().enumerate().map(move |(j, &r)| {
            let (x0, y0) = (i as f64 * dx, j as f64 * dy);
            Rectangle::new([(x0, y0), (x0 + dx, y0 + dy)], colour(r).filled())
        })
    }))?;
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

fn draw(path: &std::path::Path, a: Admm) -> Result<()> {
    register_font(
        "sans-serif",
        FontStyle::Normal,
        include_bytes!("../assets/fonts/DejaVuSans.ttf"),
    )
    .map_err(|_| anyhow::anyhow!("the bundled font is not a valid TrueType font"))?;
    let root = BitMapBackend::new(path, (1500, 640)).into_drawing_area();
    root.fill(&WHITE)?;
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
        .draw_series(LineSeries::new(bound, BLACK.stroke_width(3)))?
        .label("paper's bound α = (4 − 2ηh)/(4 − ηh), ηh ≤ 2")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.stroke_width(3)));
    chart.draw_series(LineSeries::new(
        [(2.0, 0.0), (2.0, 1.5)],
        BLACK.stroke_width(2),
    ))?;
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;

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
        )?
        .label("measured boundary (radius = 1)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.stroke_width(2)));
    chart
        .draw_series([Circle::new((a.eta, a.rho), 7, BLACK.filled())])?
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
        .draw()?;
    root.present()?;
    Ok(())
}
