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

mod norms;
pub use norms::{Norms, norms};

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
