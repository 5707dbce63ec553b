//! Server-side optimizers applied to the center: the DiLoCo outer Nesterov step and
//! MDOWNPOUR's server momentum.

use super::{assert_same_len, momentum::nesterov_step_pytorch};

/// DiLoCo's outer learning rate (SPEC.md).
pub const DILOCO_OUTER_LR: f32 = 0.7;
/// DiLoCo's outer Nesterov momentum (SPEC.md).
pub const DILOCO_OUTER_MOMENTUM: f32 = 0.9;

/// Mean of the round's deltas xⁱ − x̃ into `out`.
pub fn mean_delta(deltas: &[&[f32]], out: &mut [f32]) {
    out.fill(0.0);
    if deltas.is_empty() {
        return;
    }
    for d in deltas {
        assert_same_len(out.len(), d.len());
        for (o, &v) in out.iter_mut().zip(d.iter()) {
            *o += v;
        }
    }
    let inv = 1.0 / deltas.len() as f32;
    for o in out.iter_mut() {
        *o *= inv;
    }
}

/// One outer Nesterov step on the center, with the pseudo-gradient g = −delta (the
/// direction the workers moved, reversed): b ← μb + g; x̃ ← x̃ − lr(g + μb).
/// DiLoCo calls it with the round's mean delta, lr 0.7, μ 0.9; MDOWNPOUR with each
/// pushed change, lr 1, μ = δ. With μ = 0 and lr = 1 it adds delta to the center.
pub fn outer_nesterov_step(
    center: &mut [f32],
    velocity: &mut [f32],
    delta: &[f32],
    scratch: &mut Vec<f32>,
    lr: f32,
    momentum: f32,
) {
    assert_same_len(center.len(), delta.len());
    scratch.clear();
    scratch.extend(delta.iter().map(|d| -d));
    nesterov_step_pytorch(center, velocity, scratch, lr, momentum);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_momentum_unit_lr_adds_the_mean_delta() {
        let mut center = vec![1.0f32, 2.0];
        let (d1, d2) = (vec![1.0f32, -1.0], vec![3.0f32, 1.0]);
        let mut mean = vec![0.0; 2];
        mean_delta(&[&d1, &d2], &mut mean);
        assert_eq!(mean, [2.0, 0.0]);
        let mut v = vec![0.0; 2];
        outer_nesterov_step(&mut center, &mut v, &mean, &mut Vec::new(), 1.0, 0.0);
        assert_eq!(center, [3.0, 2.0]);
    }

    #[test]
    fn diloco_step_matches_hand_computation() {
        // delta 1, fresh velocity: g = −1, b = −1, x̃ ← 0 − 0.7(−1 + 0.9·(−1)) = 1.33.
        let mut center = vec![0.0f32];
        let mut v = vec![0.0f32];
        let mut s = Vec::new();
        outer_nesterov_step(
            &mut center,
            &mut v,
            &[1.0],
            &mut s,
            DILOCO_OUTER_LR,
            DILOCO_OUTER_MOMENTUM,
        );
        assert!((center[0] - 1.33).abs() < 1e-6, "{center:?}");
        assert_eq!(v, [-1.0]);
        // Second identical delta: b = 0.9·(−1) − 1 = −1.9; x̃ += 0.7(1 + 0.9·1.9) = 1.897.
        outer_nesterov_step(
            &mut center,
            &mut v,
            &[1.0],
            &mut s,
            DILOCO_OUTER_LR,
            DILOCO_OUTER_MOMENTUM,
        );
        assert!((center[0] - (1.33 + 1.897)).abs() < 1e-5, "{center:?}");
    }
}
