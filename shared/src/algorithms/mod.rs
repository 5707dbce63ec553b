//! The update rules of every algorithm tether runs, as pure functions over flat `f32` slices.
//!
//! Notation follows SPEC.md: p workers, η learning rate, ρ elasticity, α = ηρ, β = pα,
//! τ communication period, δ momentum. Every function takes equal-length slices and
//! panics on a length mismatch: callers validate lengths at the protocol boundary, so a
//! mismatch here is a bug, not bad input.
//!
//! The loops are written over `chunks_exact` / zipped iterators without index checks so
//! that the compiler vectorises them; they run on every synchronisation.

pub mod downpour;
pub mod elastic;
pub mod leader;
pub mod momentum;
pub mod outer;

use serde::{Deserialize, Serialize};

/// Which distributed algorithm a run uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    /// Asynchronous EASGD (paper Algorithm 1).
    Easgd,
    /// Synchronous EASGD: all workers exchange with the center at once.
    EasgdSync,
    /// Asynchronous EASGD with local Nesterov momentum (paper Algorithm 2).
    Eamsgd,
    /// DOWNPOUR: push the accumulated change, pull the center.
    Downpour,
    /// DOWNPOUR with Nesterov momentum applied on the server.
    Mdownpour,
    /// Model averaging / local SGD: synchronous EASGD with β = 1.
    Average,
    /// DiLoCo-style outer Nesterov optimizer over the round's averaged deltas.
    Diloco,
    /// Leader SGD: pull toward the lowest-loss worker's parameters.
    Lsgd,
}

impl Algorithm {
    /// Every algorithm, in the order the documentation lists them.
    pub const ALL: [Self; 8] = [
        Self::Easgd,
        Self::EasgdSync,
        Self::Eamsgd,
        Self::Downpour,
        Self::Mdownpour,
        Self::Average,
        Self::Diloco,
        Self::Lsgd,
    ];

    /// The name used on the command line, in JSON and on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Self::Easgd => "easgd",
            Self::EasgdSync => "easgd-sync",
            Self::Eamsgd => "eamsgd",
            Self::Downpour => "downpour",
            Self::Mdownpour => "mdownpour",
            Self::Average => "average",
            Self::Diloco => "diloco",
            Self::Lsgd => "lsgd",
        }
    }

    /// Whether a worker may keep training while its sync is in flight and apply
    /// the reply to its current parameters (see ARCHITECTURE.md), at elastic force
    /// `alpha`. The asynchronous algorithms may: their replies are an elastic
    /// difference, a pull toward the leader, or (DOWNPOUR) a center the worker
    /// rebases its in-flight steps onto — but an elastic one only while α < ½. From
    /// ½ on an exchange overshoots (it multiplies the gap xⁱ − x̃ by 1 − 2α ≤ 0:
    /// worker and center swap sides), and a reply applied after further steps then
    /// moves the worker by most of a gap its steps were not taken across (one worker
    /// at α 0.9 lost up to 43 accuracy points so; at α 0.45, 0.3). Synchronous
    /// rounds may not: a round's result is meant to be every member's parameters
    /// before anyone steps again.
    pub fn overlaps(self, alpha: f32) -> bool {
        !matches!(self, Self::EasgdSync | Self::Average | Self::Diloco) && alpha < 0.5
    }
}

impl std::str::FromStr for Algorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|a| a.name()).collect();
                format!(
                    "unknown algorithm {s:?} (expected one of {})",
                    names.join(", ")
                )
            })
    }
}

fn assert_same_len(a: usize, b: usize) {
    assert_eq!(a, b, "flat parameter vectors must have equal lengths");
}

/// Euclidean distance ‖a − b‖, accumulated in f64 so that long vectors keep precision.
pub fn distance(a: &[f32], b: &[f32]) -> f64 {
    assert_same_len(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let d = f64::from(*x) - f64::from(*y);
            d * d
        })
        .sum::<f64>()
        .sqrt()
}

/// ‖x − c‖, ‖c‖ and whether every xⱼ is finite, in one pass: what the server checks
/// before it lets an update touch the center.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Norms {
    /// ‖x − c‖.
    pub distance: f64,
    /// ‖c‖.
    pub center: f64,
    /// No NaN or ±∞ in x.
    pub finite: bool,
}

/// Computes [`Norms`] of `x` against `c` (`c` empty: distance is ‖x‖, center 0).
/// Differences and squares are taken in f64 lanes: in f32 a value near 3e38 squares
/// (or differs) to ∞, and a norm of ∞ must never enter a bound or be accepted.
pub fn norms(x: &[f32], c: &[f32]) -> Norms {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above); the body is safe Rust.
        #[allow(unsafe_code)]
        return unsafe { norms_avx2(x, c) };
    }
    norms_any(x, c)
}

/// [`norms_any`] compiled with AVX2's wider vectors (the same operations in the
/// same order, so the same result; ‖x̃‖ and ‖xⁱ − x̃‖ are taken several times an
/// exchange on the server).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn norms_avx2(x: &[f32], c: &[f32]) -> Norms {
    norms_any(x, c)
}

#[inline(always)]
fn norms_any(x: &[f32], c: &[f32]) -> Norms {
    const LANES: usize = 8;
    type Lanes<T> = [T; LANES];
    /// One step of every lane, on whole arrays (what the compiler vectorises).
    #[inline(always)]
    fn step(
        (d, n, z): (&mut Lanes<f64>, &mut Lanes<f64>, &mut Lanes<f32>),
        x: &Lanes<f32>,
        c: &Lanes<f32>,
    ) {
        for l in 0..LANES {
            let (xv, cv) = (f64::from(x[l]), f64::from(c[l]));
            let e = xv - cv;
            d[l] += e * e;
            n[l] += cv * cv;
            z[l] += x[l] * 0.0; // NaN exactly when x[l] is NaN or ±∞
        }
    }
    let centered = !c.is_empty();
    if centered {
        assert_same_len(x.len(), c.len());
    }
    let (mut d, mut n, mut z) = ([0.0f64; LANES], [0.0f64; LANES], [0.0f32; LANES]);
    let zeros = [0.0f32; LANES];
    let (xs, tail) = x.as_chunks::<LANES>();
    let off = x.len() - tail.len();
    if centered {
        for (xl, cl) in xs.iter().zip(c.as_chunks::<LANES>().0) {
            step((&mut d, &mut n, &mut z), xl, cl);
        }
    } else {
        for xl in xs {
            step((&mut d, &mut n, &mut z), xl, &zeros);
        }
    }
    // The tail in lane 0.
    for (k, &xv) in tail.iter().enumerate() {
        let cv = if centered { f64::from(c[off + k]) } else { 0.0 };
        let e = f64::from(xv) - cv;
        d[0] += e * e;
        n[0] += cv * cv;
        z[0] += xv * 0.0;
    }
    let (dist, cent, bad) = (
        d.iter().sum::<f64>(),
        n.iter().sum::<f64>(),
        z.iter().sum::<f32>(),
    );
    Norms {
        distance: dist.sqrt(),
        center: cent.sqrt(),
        finite: bad == 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algorithm_names_round_trip() {
        for a in Algorithm::ALL {
            assert_eq!(a.name().parse::<Algorithm>(), Ok(a));
        }
        let err = "sgd".parse::<Algorithm>().unwrap_err();
        assert!(err.contains("easgd-sync"), "{err}");
    }

    #[test]
    fn norms_agree_with_the_plain_formulas() {
        let x: Vec<f32> = (0..3001).map(|i| (i as f32 * 0.37).sin()).collect();
        let c: Vec<f32> = (0..3001).map(|i| (i as f32 * 0.11).cos()).collect();
        let n = norms(&x, &c);
        assert!((n.distance - distance(&x, &c)).abs() < 1e-3, "{n:?}");
        assert!((n.center - distance(&c, &vec![0.0; c.len()])).abs() < 1e-3);
        assert!(n.finite);
        assert!((norms(&x, &[]).distance - distance(&x, &vec![0.0; x.len()])).abs() < 1e-3);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut y = x.clone();
            y[3000] = bad; // in the tail
            assert!(!norms(&y, &c).finite);
            y[3000] = 0.0;
            y[17] = bad;
            assert!(!norms(&y, &c).finite);
        }
        // Huge but finite values are finite, and their norm is finite too: a square
        // or a difference that overflows f32 must not turn a bound into ∞.
        let huge = norms(&[3e38, -3e38], &[-3e38, 3e38]);
        assert!(huge.finite);
        assert!(
            huge.distance.is_finite() && huge.center.is_finite(),
            "{huge:?}"
        );
        assert!((huge.distance / (6e38 * 2f64.sqrt()) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn distance_is_the_euclidean_norm_of_the_difference() {
        assert_eq!(distance(&[1.0, 2.0, 3.0], &[1.0, 5.0, 7.0]), 5.0);
        assert_eq!(distance(&[], &[]), 0.0);
    }

    #[test]
    fn only_asynchronous_runs_below_half_an_elastic_force_overlap() {
        assert!(Algorithm::Eamsgd.overlaps(0.225));
        assert!(Algorithm::Easgd.overlaps(0.45));
        assert!(!Algorithm::Easgd.overlaps(0.5));
        assert!(!Algorithm::Eamsgd.overlaps(0.9));
        assert!(Algorithm::Downpour.overlaps(0.0));
        assert!(Algorithm::Lsgd.overlaps(0.1));
        for sync in [Algorithm::EasgdSync, Algorithm::Average, Algorithm::Diloco] {
            assert!(!sync.overlaps(0.0), "{sync:?}");
        }
    }
}
