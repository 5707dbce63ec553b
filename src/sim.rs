//! `tether sim stability`: the paper's round-robin stability analysis
//! (`tether_shared::stability`), printed, reported as JSON, and drawn as two
//! stability maps by `tether_lab::stability`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use tether_lab::stability::{Admm, draw_maps};
use tether_shared::stability::{admm_run, check_easgd_bound};

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
    draw_maps(&args.png, a)?;
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
