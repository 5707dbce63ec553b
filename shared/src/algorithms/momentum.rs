//! EAMSGD's local Nesterov momentum (paper Algorithm 2), and how it maps onto the
//! PyTorch-style Nesterov step that Burn's optimizer runs during training.
//!
//! The paper's form: v ← δv − η∇f(x + δv); x ← x + v. With y = x + δv and
//! b = −v/η this is exactly PyTorch's b ← δb + ∇f(y); y ← y − η(∇f(y) + δb), which is
//! what Burn's `Sgd` with Nesterov momentum (dampening 0) computes. Workers therefore
//! train with Burn's optimizer and hold y, the lookahead point; the elastic force acts
//! on y, which differs from Algorithm 2's x by δv (tested below as an exact equivalence
//! of the two local iterations).

use super::assert_same_len;

/// The lookahead point x + δv where EAMSGD evaluates its gradient.
pub fn lookahead(x: &[f32], velocity: &[f32], delta: f32, out: &mut [f32]) {
    assert_same_len(x.len(), velocity.len());
    assert_same_len(x.len(), out.len());
    for ((o, &xv), &v) in out.iter_mut().zip(x).zip(velocity) {
        *o = xv + delta * v;
    }
}

/// One local EAMSGD step given the gradient at the lookahead point:
/// v ← δv − η g; x ← x + v.
pub fn nesterov_step(x: &mut [f32], velocity: &mut [f32], grad: &[f32], lr: f32, delta: f32) {
    assert_same_len(x.len(), velocity.len());
    assert_same_len(x.len(), grad.len());
    for ((xv, v), &g) in x.iter_mut().zip(velocity.iter_mut()).zip(grad) {
        *v = delta * *v - lr * g;
        *xv += *v;
    }
}

/// The PyTorch form of the same step on the lookahead point y with buffer b:
/// b ← δb + g; y ← y − η(g + δb). Used to check the equivalence, and by the
/// server-side momentum of MDOWNPOUR / DiLoCo (see `outer`).
pub fn nesterov_step_pytorch(y: &mut [f32], buf: &mut [f32], grad: &[f32], lr: f32, delta: f32) {
    assert_same_len(y.len(), buf.len());
    assert_same_len(y.len(), grad.len());
    for ((yv, b), &g) in y.iter_mut().zip(buf.iter_mut()).zip(grad) {
        *b = delta * *b + g;
        *yv -= lr * (g + delta * *b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesterov_step_matches_hand_computation() {
        // x = 1, v = 0.5, g = 2, η = 0.1, δ = 0.5: v = 0.25 − 0.2 = 0.05, x = 1.05.
        let (mut x, mut v) = (vec![1.0f32], vec![0.5f32]);
        nesterov_step(&mut x, &mut v, &[2.0], 0.1, 0.5);
        assert!((v[0] - 0.05).abs() < 1e-7 && (x[0] - 1.05).abs() < 1e-7);
        let mut out = vec![0.0];
        lookahead(&[1.0], &[0.5], 0.5, &mut out);
        assert_eq!(out, [1.25]);
    }

    #[test]
    fn paper_form_and_pytorch_form_follow_the_same_lookahead_trajectory() {
        // f(x) = h x²/2 per coordinate, gradient h x.
        let h = [0.5f32, 2.0, 5.0];
        let (lr, delta) = (0.05f32, 0.9f32);
        let mut x = vec![3.0f32, -1.0, 0.7];
        let mut v = vec![0.0f32; 3];
        let mut y = x.clone();
        let mut b = vec![0.0f32; 3];
        let mut look = vec![0.0f32; 3];
        for _ in 0..50 {
            lookahead(&x, &v, delta, &mut look);
            let g: Vec<f32> = look.iter().zip(&h).map(|(l, h)| h * l).collect();
            nesterov_step(&mut x, &mut v, &g, lr, delta);
            let gy: Vec<f32> = y.iter().zip(&h).map(|(l, h)| h * l).collect();
            nesterov_step_pytorch(&mut y, &mut b, &gy, lr, delta);
            lookahead(&x, &v, delta, &mut look);
            for j in 0..3 {
                assert!((look[j] - y[j]).abs() < 1e-4, "{} vs {}", look[j], y[j]);
                assert!((v[j] + lr * b[j]).abs() < 1e-4);
            }
        }
    }
}
