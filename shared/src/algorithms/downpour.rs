//! DOWNPOUR's push/pull accounting: every τ steps a worker pushes the change it
//! accumulated since its last pull, the server adds it to x̃, and the worker replaces
//! its parameters by the center.

use super::assert_same_len;

/// The worker's push: the change x − x_at_last_pull, written to `out`.
pub fn accumulated_change(x: &[f32], at_last_pull: &[f32], out: &mut [f32]) {
    assert_same_len(x.len(), at_last_pull.len());
    assert_same_len(x.len(), out.len());
    for ((o, &xv), &s) in out.iter_mut().zip(x).zip(at_last_pull) {
        *o = xv - s;
    }
}

/// The server's side: x̃ ← x̃ + push.
pub fn apply_push(center: &mut [f32], push: &[f32]) {
    assert_same_len(center.len(), push.len());
    for (c, &p) in center.iter_mut().zip(push) {
        *c += p;
    }
}

/// The worker's pull: x ← x̃ and remember x̃ as the point the next push is measured from.
pub fn pull(x: &mut [f32], at_last_pull: &mut [f32], center: &[f32]) {
    assert_same_len(x.len(), center.len());
    x.copy_from_slice(center);
    at_last_pull.copy_from_slice(center);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_push_moves_the_center_by_the_workers_change_and_the_pull_resets() {
        let mut center = vec![1.0f32, 1.0];
        let mut snap = center.clone();
        let mut x = center.clone();
        x[0] -= 0.5; // local training
        x[1] += 2.0;
        let mut push = vec![0.0; 2];
        accumulated_change(&x, &snap, &mut push);
        assert_eq!(push, [-0.5, 2.0]);
        apply_push(&mut center, &push);
        assert_eq!(center, [0.5, 3.0]);
        pull(&mut x, &mut snap, &center);
        assert_eq!(
            (x.as_slice(), snap.as_slice()),
            (center.as_slice(), center.as_slice())
        );
        accumulated_change(&x, &snap, &mut push);
        assert_eq!(push, [0.0, 0.0]);
    }
}
