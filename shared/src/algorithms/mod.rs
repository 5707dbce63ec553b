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
    fn distance_is_the_euclidean_norm_of_the_difference() {
        assert_eq!(distance(&[1.0, 2.0, 3.0], &[1.0, 5.0, 7.0]), 5.0);
        assert_eq!(distance(&[], &[]), 0.0);
    }
}
