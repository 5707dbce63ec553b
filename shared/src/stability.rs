//! The EASGD paper's stability analysis on the 1-D quadratic f(x) = h x²/2, for the
//! round-robin schemes: each step one worker l (in turn) exchanges with the center;
//! the others wait. A round of p steps is a linear map; a scheme is stable when the
//! map's spectral radius is at most 1.
//!
//! - EASGD (state x¹..xᵖ, x̃), active worker l:
//!   xˡ ← xˡ − ηh xˡ − α(xˡ − x̃);  x̃ ← x̃ + α(xˡ − x̃) (both from the old values).
//!   Paper: stable iff 0 ≤ ηh ≤ 2 and 0 ≤ α ≤ (4 − 2ηh)/(4 − ηh).
//! - ADMM (state x¹..xᵖ, λ¹..λᵖ; the center is x̃ = (1/p) Σ (xᵏ − λᵏ)), active l:
//!   λˡ ← λˡ − (xˡ − x̃);  xˡ ← xˡ − ηh xˡ + ηρ(λˡ_new − xˡ + x̃).
//!   Paper: with p = 3, η = 0.001, ρ = 2.5 (h = 1) the radius exceeds 1 and the
//!   iteration from x = 1000, λ = 0 diverges.

use serde::Serialize;

/// A small dense square matrix, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    n: usize,
    a: Vec<f64>,
}

impl Matrix {
    /// The n×n identity.
    pub fn identity(n: usize) -> Self {
        let mut a = vec![0.0; n * n];
        for i in 0..n {
            a[i * n + i] = 1.0;
        }
        Self { n, a }
    }

    /// Entry (i, j).
    pub fn get(&self, i: usize, j: usize) -> f64 {
        self.a[i * self.n + j]
    }

    fn set_row(&mut self, i: usize, row: &[f64]) {
        self.a[i * self.n..(i + 1) * self.n].copy_from_slice(row);
    }

    /// The product self · other.
    pub fn mul(&self, other: &Matrix) -> Matrix {
        let n = self.n;
        let mut out = vec![0.0; n * n];
        for i in 0..n {
            for k in 0..n {
                let v = self.a[i * n + k];
                if v != 0.0 {
                    for j in 0..n {
                        out[i * n + j] += v * other.a[k * n + j];
                    }
                }
            }
        }
        Matrix { n, a: out }
    }

    /// The matrix applied to a vector.
    pub fn apply(&self, v: &[f64]) -> Vec<f64> {
        (0..self.n)
            .map(|i| (0..self.n).map(|j| self.a[i * self.n + j] * v[j]).sum())
            .collect()
    }

    fn max_abs(&self) -> f64 {
        self.a.iter().fold(0.0, |m, v| m.max(v.abs()))
    }
}

/// Spectral radius by Gelfand's formula ρ = lim ‖Mⁿ‖^{1/n}, with n = 2⁴⁸ reached by
/// repeated squaring and renormalisation. Robust for complex and repeated
/// eigenvalues; the error factor (C·n)^{1/n} is below 1e-12 for these sizes.
pub fn spectral_radius(m: &Matrix) -> f64 {
    const SQUARINGS: i32 = 48;
    let norm = m.max_abs();
    if norm == 0.0 || !norm.is_finite() {
        return if norm == 0.0 { 0.0 } else { f64::INFINITY };
    }
    let mut b = m.clone();
    b.a.iter_mut().for_each(|v| *v /= norm);
    let mut log_c = norm.ln(); // M^(2^k) = c_k · B_k
    for _ in 0..SQUARINGS {
        b = b.mul(&b);
        let s = b.max_abs();
        if s == 0.0 {
            return 0.0;
        }
        b.a.iter_mut().for_each(|v| *v /= s);
        log_c = 2.0 * log_c + s.ln();
    }
    (log_c / 2f64.powi(SQUARINGS)).exp()
}

/// The EASGD round-robin map of one step with worker `active` on state (x¹..xᵖ, x̃).
pub fn easgd_step_map(p: usize, eta_h: f64, alpha: f64, active: usize) -> Matrix {
    let mut m = Matrix::identity(p + 1);
    let mut row = vec![0.0; p + 1];
    row[active] = 1.0 - eta_h - alpha;
    row[p] = alpha;
    m.set_row(active, &row);
    let mut center = vec![0.0; p + 1];
    center[active] = alpha;
    center[p] = 1.0 - alpha;
    m.set_row(p, &center);
    m
}

/// A whole EASGD round (workers 1..p in turn).
pub fn easgd_round_map(p: usize, eta_h: f64, alpha: f64) -> Matrix {
    (0..p).fold(Matrix::identity(p + 1), |acc, l| {
        easgd_step_map(p, eta_h, alpha, l).mul(&acc)
    })
}

/// The paper's bound on α for EASGD round-robin: (4 − 2ηh)/(4 − ηh).
pub fn easgd_alpha_bound(eta_h: f64) -> f64 {
    (4.0 - 2.0 * eta_h) / (4.0 - eta_h)
}

/// The ADMM round-robin map of one step with worker `active` on state (x¹..xᵖ, λ¹..λᵖ).
pub fn admm_step_map(p: usize, eta: f64, rho: f64, h: f64, active: usize) -> Matrix {
    let n = 2 * p;
    let l = active;
    // x̃ = (1/p) Σ (xᵏ − λᵏ) as a row over the state.
    let center: Vec<f64> = (0..n)
        .map(|k| if k < p { 1.0 } else { -1.0 } / p as f64)
        .collect();
    // λˡ_new = λˡ − xˡ + x̃
    let mut lambda = center.clone();
    lambda[p + l] += 1.0;
    lambda[l] -= 1.0;
    // xˡ_new = (1 − ηh) xˡ + ηρ (λˡ_new − xˡ + x̃)
    let mut x: Vec<f64> = (0..n)
        .map(|k| eta * rho * (lambda[k] + center[k]))
        .collect();
    x[l] += 1.0 - eta * h - eta * rho;
    let mut m = Matrix::identity(n);
    m.set_row(l, &x);
    m.set_row(p + l, &lambda);
    m
}

/// A whole ADMM round (workers 1..p in turn).
pub fn admm_round_map(p: usize, eta: f64, rho: f64, h: f64) -> Matrix {
    (0..p).fold(Matrix::identity(2 * p), |acc, l| {
        admm_step_map(p, eta, rho, h, l).mul(&acc)
    })
}

/// How far the measured EASGD stability region is from the paper's bound.
#[derive(Clone, Debug, Serialize)]
pub struct EasgdBoundCheck {
    /// Number of workers in the round-robin.
    pub workers: usize,
    /// ηh values checked, evenly spaced in (0, 2).
    pub eta_h_points: usize,
    /// max over ηh of |α_max measured − (4 − 2ηh)/(4 − ηh)|, α_max found by bisection.
    pub max_alpha_disagreement: f64,
    /// The ηh where that maximum occurs.
    pub worst_eta_h: f64,
    /// Whether every α below the measured α_max was stable too (the region is an interval).
    pub region_is_interval: bool,
    /// Whether no α in [0, 1.5] was stable for the ηh checked in (2, 3].
    pub unstable_beyond_eta_h_2: bool,
}

/// Stable: the spectral radius is at most 1 (with room for rounding).
pub fn is_stable(radius: f64) -> bool {
    radius <= 1.0 + 1e-9
}

/// Scans ηh over (0, 2), finds the largest stable α for each by a coarse scan and
/// bisection, and compares it with the bound. Also checks that ηh > 2 is unstable.
pub fn check_easgd_bound(p: usize, eta_h_points: usize) -> EasgdBoundCheck {
    const ALPHA_MAX: f64 = 1.5;
    const COARSE: usize = 300;
    let stable = |eh: f64, a: f64| is_stable(spectral_radius(&easgd_round_map(p, eh, a)));
    let mut worst = (0.0f64, 0.0f64);
    let mut interval = true;
    for i in 1..=eta_h_points {
        let eh = 2.0 * i as f64 / (eta_h_points + 1) as f64;
        let alphas: Vec<f64> = (0..=COARSE)
            .map(|k| ALPHA_MAX * k as f64 / COARSE as f64)
            .collect();
        let flags: Vec<bool> = alphas.iter().map(|&a| stable(eh, a)).collect();
        let last = flags.iter().rposition(|&s| s).unwrap_or(0);
        interval &= flags[..=last].iter().all(|&s| s);
        let (mut lo, mut hi) = (alphas[last], alphas[(last + 1).min(COARSE)]);
        for _ in 0..50 {
            let mid = 0.5 * (lo + hi);
            if stable(eh, mid) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let gap = (lo - easgd_alpha_bound(eh)).abs();
        if gap > worst.0 {
            worst = (gap, eh);
        }
    }
    let beyond = (1..=20).all(|i| {
        let eh = 2.0 + i as f64 / 20.0;
        (0..=60).all(|k| !stable(eh, ALPHA_MAX * k as f64 / 60.0))
    });
    EasgdBoundCheck {
        workers: p,
        eta_h_points,
        max_alpha_disagreement: worst.0,
        worst_eta_h: worst.1,
        region_is_interval: interval,
        unstable_beyond_eta_h_2: beyond,
    }
}

/// ADMM round-robin run from x = x0, λ = 0.
#[derive(Clone, Debug, Serialize)]
pub struct AdmmRun {
    /// Number of workers.
    pub workers: usize,
    /// Learning rate η.
    pub eta: f64,
    /// Penalty ρ.
    pub rho: f64,
    /// Curvature h.
    pub h: f64,
    /// Spectral radius of one round's map.
    pub admm_spectral_radius: f64,
    /// (round, |x̃|) every `every` rounds.
    pub center_magnitude: Vec<(usize, f64)>,
}

/// Runs ADMM round-robin for `rounds` rounds from xˡ = x0, λˡ = 0, recording |x̃|.
pub fn admm_run(
    p: usize,
    eta: f64,
    rho: f64,
    h: f64,
    x0: f64,
    rounds: usize,
    every: usize,
) -> AdmmRun {
    let map = admm_round_map(p, eta, rho, h);
    let mut state: Vec<f64> = (0..2 * p).map(|k| if k < p { x0 } else { 0.0 }).collect();
    let center = |s: &[f64]| (0..p).map(|k| s[k] - s[p + k]).sum::<f64>() / p as f64;
    let mut out = vec![(0, center(&state).abs())];
    for r in 1..=rounds {
        state = map.apply(&state);
        if r % every.max(1) == 0 {
            out.push((r, center(&state).abs()));
        }
    }
    AdmmRun {
        workers: p,
        eta,
        rho,
        h,
        admm_spectral_radius: spectral_radius(&map),
        center_magnitude: out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spectral_radius_matches_closed_forms() {
        // Rotation by 90° scaled by 0.5: complex eigenvalues ±0.5i.
        let m = Matrix {
            n: 2,
            a: vec![0.0, -0.5, 0.5, 0.0],
        };
        assert!((spectral_radius(&m) - 0.5).abs() < 1e-12);
        // A Jordan block with eigenvalue 0.9.
        let j = Matrix {
            n: 2,
            a: vec![0.9, 1.0, 0.0, 0.9],
        };
        assert!((spectral_radius(&j) - 0.9).abs() < 1e-9);
        // The EASGD 2×2 map against the quadratic formula.
        let (eh, a) = (0.7f64, 0.3f64);
        let (t, d) = (2.0 - eh - 2.0 * a, (1.0 - eh - a) * (1.0 - a) - a * a);
        let disc = t * t - 4.0 * d;
        let expected = if disc >= 0.0 {
            ((t + disc.sqrt()) / 2.0)
                .abs()
                .max(((t - disc.sqrt()) / 2.0).abs())
        } else {
            d.sqrt()
        };
        assert!((spectral_radius(&easgd_round_map(1, eh, a)) - expected).abs() < 1e-9);
    }

    #[test]
    fn easgd_round_robin_is_stable_exactly_inside_the_bound() {
        for p in [1, 3] {
            let check = check_easgd_bound(p, 40);
            assert!(check.max_alpha_disagreement < 1e-6, "{check:?}");
            assert!(
                check.region_is_interval && check.unstable_beyond_eta_h_2,
                "{check:?}"
            );
        }
    }

    #[test]
    fn admm_round_robin_diverges_with_the_papers_settings() {
        let run = admm_run(3, 0.001, 2.5, 1.0, 1000.0, 20_000, 1000);
        assert!(run.admm_spectral_radius > 1.0, "{run:?}");
        let last = run.center_magnitude.last().unwrap().1;
        assert!(last > 1e6, "center should blow up from 1000, got {last}");
        // The same ρ with a larger step is stable: the map really depends on (η, ρ).
        assert!(spectral_radius(&admm_round_map(3, 0.005, 2.5, 1.0)) < 1.0);
    }
}
