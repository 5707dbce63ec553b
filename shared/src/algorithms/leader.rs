//! Leader SGD (Teng et al., NeurIPS 2019): workers are pulled toward the parameters of
//! the worker with the lowest recent training loss, optionally also toward x̃.

use super::assert_same_len;

/// The paper's pull strength λ.
pub const LSGD_LAMBDA: f32 = 0.1;

/// x ← x − λ(x − x_leader).
pub fn leader_pull(x: &mut [f32], leader: &[f32], lambda: f32) {
    assert_same_len(x.len(), leader.len());
    for (xv, &l) in x.iter_mut().zip(leader) {
        *xv -= lambda * (*xv - l);
    }
}

/// Both forces at once, measured from the same x:
/// x ← x − λ(x − x_leader) − α(x − x̃).
pub fn leader_elastic_pull(x: &mut [f32], leader: &[f32], center: &[f32], lambda: f32, alpha: f32) {
    assert_same_len(x.len(), leader.len());
    assert_same_len(x.len(), center.len());
    for ((xv, &l), &c) in x.iter_mut().zip(leader).zip(center) {
        *xv -= lambda * (*xv - l) + alpha * (*xv - c);
    }
}

/// Who leads: the worker that reported the lowest loss. The current leader's own
/// reports always replace its loss (it may get worse); another worker takes over
/// only by reporting a strictly lower loss.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LeaderBoard {
    leader: Option<(u64, f32)>,
}

impl LeaderBoard {
    /// The leader's worker id and loss, if anyone has reported.
    pub fn leader(&self) -> Option<(u64, f32)> {
        self.leader
    }

    /// Records `worker`'s recent loss. Returns true when `worker` is now the leader,
    /// so the caller stores its parameters as x_leader. Non-finite losses never lead.
    pub fn offer(&mut self, worker: u64, loss: f32) -> bool {
        if !loss.is_finite() {
            return false;
        }
        match self.leader {
            Some((id, _)) if id == worker => {
                self.leader = Some((worker, loss));
                true
            }
            Some((_, best)) if loss >= best => false,
            _ => {
                self.leader = Some((worker, loss));
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pulls_match_hand_computation() {
        let mut x = vec![10.0f32, 0.0];
        leader_pull(&mut x, &[0.0, 10.0], LSGD_LAMBDA);
        assert_eq!(x, [9.0, 1.0]);
        let mut y = vec![10.0f32];
        leader_elastic_pull(&mut y, &[0.0], &[20.0], 0.1, 0.25);
        assert_eq!(y, [10.0 - 1.0 + 2.5]);
        let mut z = vec![3.0f32];
        leader_pull(&mut z, &[5.0], 0.0);
        assert_eq!(z, [3.0]);
    }

    #[test]
    fn the_lowest_loss_leads() {
        let mut board = LeaderBoard::default();
        assert!(board.offer(1, 2.0));
        assert!(!board.offer(2, 2.5));
        assert!(board.offer(2, 1.5));
        assert!(!board.offer(1, 1.7));
        assert!(
            board.offer(2, 3.0),
            "the leader's own report updates its loss"
        );
        assert!(!board.offer(3, f32::NAN));
        assert_eq!(board.leader(), Some((2, 3.0)));
    }
}
