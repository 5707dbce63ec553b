//! The elastic exchange between workers xⁱ and the center x̃ (EASGD, EAMSGD, averaging).

use super::assert_same_len;

/// Elements per block of the synchronous round: small enough that the block's
/// accumulator stays in L1 while each worker streams through it.
const BLOCK: usize = 1024;

/// One synchronous EASGD round, all workers at once:
/// xⁱ ← xⁱ − α(xⁱ − x̃) and x̃ ← x̃ + α Σᵢ (xⁱ − x̃), where the center's sum uses the
/// xⁱ from *before* their elastic step. The sum x̃ + Σ xⁱ is conserved (the paper's
/// symmetric force).
pub fn sync_round(center: &mut [f32], workers: &mut [&mut [f32]], alpha: f32) {
    for w in workers.iter() {
        assert_same_len(center.len(), w.len());
    }
    let mut acc = [0.0f32; BLOCK];
    for start in (0..center.len()).step_by(BLOCK) {
        let end = (start + BLOCK).min(center.len());
        let c = &mut center[start..end];
        let acc = &mut acc[..end - start];
        acc.fill(0.0);
        for w in workers.iter_mut() {
            for ((x, &cv), a) in w[start..end].iter_mut().zip(c.iter()).zip(acc.iter_mut()) {
                let d = alpha * (*x - cv);
                *x -= d;
                *a += d;
            }
        }
        for (cv, a) in c.iter_mut().zip(acc.iter()) {
            *cv += *a;
        }
    }
}

/// Model averaging / local SGD: the synchronous round with β = pα = 1, which makes
/// the new center the mean of the workers.
pub fn average_round(center: &mut [f32], workers: &mut [&mut [f32]]) {
    let p = workers.len();
    if p > 0 {
        sync_round(center, workers, 1.0 / p as f32);
    }
}

/// The server's half of one asynchronous exchange (paper Algorithm 1), fused into one
/// pass: d = α(xⁱ − x̃), x̃ ← x̃ + d, and `diff` receives d so the worker can apply
/// xⁱ ← xⁱ − d. The server computes d from the xⁱ the worker sent rather than trusting
/// a difference computed by the client.
pub fn center_pull(center: &mut [f32], worker: &[f32], alpha: f32, diff: &mut [f32]) {
    assert_same_len(center.len(), worker.len());
    assert_same_len(center.len(), diff.len());
    for ((c, &x), d) in center.iter_mut().zip(worker).zip(diff.iter_mut()) {
        let e = alpha * (x - *c);
        *c += e;
        *d = e;
    }
}

/// [`center_pull`] without a separate output: `x` holds xⁱ on entry and d on return,
/// so the server answers from the buffer the update arrived in (no allocation).
pub fn center_pull_in_place(center: &mut [f32], x: &mut [f32], alpha: f32) {
    assert_same_len(center.len(), x.len());
    for (c, x) in center.iter_mut().zip(x.iter_mut()) {
        let e = alpha * (*x - *c);
        *c += e;
        *x = e;
    }
}

/// The worker's half of an asynchronous exchange: xⁱ ← xⁱ − d.
pub fn apply_difference(worker: &mut [f32], diff: &[f32]) {
    assert_same_len(worker.len(), diff.len());
    for (x, &d) in worker.iter_mut().zip(diff) {
        *x -= d;
    }
}

/// A whole asynchronous exchange in one place (tests, simulations): d = α(xⁱ − x̃),
/// xⁱ ← xⁱ − d, x̃ ← x̃ + d.
pub fn async_exchange(worker: &mut [f32], center: &mut [f32], alpha: f32) {
    assert_same_len(center.len(), worker.len());
    for (x, c) in worker.iter_mut().zip(center.iter_mut()) {
        let d = alpha * (*x - *c);
        *x -= d;
        *c += d;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum_all(center: &[f32], workers: &[Vec<f32>]) -> Vec<f64> {
        (0..center.len())
            .map(|j| f64::from(center[j]) + workers.iter().map(|w| f64::from(w[j])).sum::<f64>())
            .collect()
    }

    #[test]
    fn sync_round_matches_hand_computation() {
        // x̃ = [0, 10], x¹ = [2, 10], x² = [4, 6], α = 0.25.
        // d¹ = [0.5, 0], d² = [1, −1]; x¹ → [1.5, 10], x² → [3, 7]; x̃ → [1.5, 9].
        let mut center = vec![0.0, 10.0];
        let mut a = vec![2.0, 10.0];
        let mut b = vec![4.0, 6.0];
        sync_round(&mut center, &mut [&mut a, &mut b], 0.25);
        assert_eq!(a, [1.5, 10.0]);
        assert_eq!(b, [3.0, 7.0]);
        assert_eq!(center, [1.5, 9.0]);
    }

    #[test]
    fn sync_round_conserves_the_total() {
        let n = 3000; // spans several blocks and a ragged tail
        let mut center: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut ws: Vec<Vec<f32>> = (0..4)
            .map(|k| {
                (0..n)
                    .map(|i| ((i * (k + 2)) as f32 * 0.11).cos() * 3.0)
                    .collect()
            })
            .collect();
        let before = sum_all(&center, &ws);
        let mut refs: Vec<&mut [f32]> = ws.iter_mut().map(|w| w.as_mut_slice()).collect();
        sync_round(&mut center, &mut refs, 0.9 / 4.0);
        let after = sum_all(&center, &ws);
        for (b, a) in before.iter().zip(&after) {
            assert!((b - a).abs() < 1e-5, "total changed: {b} → {a}");
        }
    }

    #[test]
    fn alpha_zero_changes_nothing() {
        let mut center = vec![1.0, -2.0, 3.5];
        let mut w = vec![7.0, 8.0, -9.0];
        let (c0, w0) = (center.clone(), w.clone());
        sync_round(&mut center, &mut [&mut w], 0.0);
        assert_eq!((&center, &w), (&c0, &w0));
        async_exchange(&mut w, &mut center, 0.0);
        assert_eq!((&center, &w), (&c0, &w0));
        let mut diff = vec![f32::NAN; 3];
        center_pull(&mut center, &w, 0.0, &mut diff);
        assert_eq!(center, c0);
        assert_eq!(diff, [0.0; 3]);
    }

    #[test]
    fn beta_one_makes_the_center_the_mean() {
        let mut center = vec![100.0, -100.0];
        let mut a = vec![1.0, 2.0];
        let mut b = vec![3.0, 4.0];
        let mut c = vec![5.0, 9.0];
        average_round(&mut center, &mut [&mut a, &mut b, &mut c]);
        assert!(
            (center[0] - 3.0).abs() < 1e-5 && (center[1] - 5.0).abs() < 1e-5,
            "{center:?}"
        );
    }

    #[test]
    fn async_exchange_moves_both_by_exactly_the_elastic_difference() {
        let x0 = vec![2.0f32, -4.0, 0.5];
        let c0 = vec![1.0f32, 4.0, 0.5];
        let alpha = 0.125; // a power of two keeps the arithmetic exact
        let (mut x, mut c) = (x0.clone(), c0.clone());
        async_exchange(&mut x, &mut c, alpha);
        for j in 0..3 {
            let d = alpha * (x0[j] - c0[j]);
            assert_eq!(x[j], x0[j] - d);
            assert_eq!(c[j], c0[j] + d);
        }
        // The split server/worker path gives the same result bit for bit.
        let (mut x2, mut c2, mut diff) = (x0.clone(), c0.clone(), vec![0.0; 3]);
        center_pull(&mut c2, &x2, alpha, &mut diff);
        apply_difference(&mut x2, &diff);
        assert_eq!((&x2, &c2), (&x, &c));
        let (mut c3, mut d3) = (c0.clone(), x0.clone());
        center_pull_in_place(&mut c3, &mut d3, alpha);
        assert_eq!((c3, d3), (c2, diff));
    }

    #[test]
    #[should_panic(expected = "equal lengths")]
    fn length_mismatch_is_a_bug() {
        async_exchange(&mut [1.0], &mut [1.0, 2.0], 0.1);
    }
}
