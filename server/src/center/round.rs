//! Synchronous rounds (EASGD-sync, averaging, DiLoCo): members' updates wait in
//! the round until every member has sent or the barrier times out, then x̃ moves
//! once for them all and each gets its reply.

use tether_shared::algorithms::Algorithm;
use tether_shared::algorithms::elastic::sync_round;
use tether_shared::algorithms::outer::{
    DILOCO_OUTER_LR, DILOCO_OUTER_MOMENTUM, mean_delta, outer_nesterov_step,
};
use tether_shared::protocol::Apply;
use tokio::sync::oneshot;

use super::{Center, Pending, Ready, Reply};

impl Center {
    /// Closes the round when every member has sent its update.
    pub fn close_round_if_complete(&mut self, members: usize) {
        if !self.round.is_empty() && self.round.len() >= members {
            self.close_round();
        }
    }

    /// The round's timeout: closes round `id` with whoever arrived (laggards are
    /// dropped from it; their next update joins the next round).
    pub fn round_timed_out(&mut self, id: u64) -> usize {
        if self.round_id == id && !self.round.is_empty() {
            let n = self.round.len();
            self.close_round();
            n
        } else {
            0
        }
    }

    /// A worker left: removes it from the waiting round and its figures from the
    /// norm guard.
    pub fn leave_round(&mut self, session: u64, members: usize) {
        self.guard.forget(session);
        self.round.retain(|p| p.session != session);
        self.close_round_if_complete(members);
    }

    fn close_round(&mut self) {
        let mut round = std::mem::take(&mut self.round);
        self.round_id += 1;
        // Deterministic order: the center's sum does not depend on arrival order.
        round.sort_by_key(|p| p.worker_id);
        // Held members are answered like the others but add nothing to x̃.
        let counted = round.iter().filter(|p| !p.held).count();
        let mut next = self.draft();
        let mut replies: Vec<(oneshot::Sender<Reply>, f64, Vec<f32>)> = Vec::new();
        let mut velocity = None;
        match self.algorithm {
            Algorithm::EasgdSync | Algorithm::Average => {
                // Plain averaging is the elastic round with α = 1/p.
                let alpha = match self.algorithm {
                    Algorithm::Average => 1.0 / counted.max(1) as f32,
                    _ => self.hyper.alpha,
                };
                let (mut kept, mut held): (Vec<Pending>, Vec<Pending>) =
                    round.into_iter().partition(|p| !p.held);
                let mut refs: Vec<&mut [f32]> =
                    kept.iter_mut().map(|p| p.values.as_mut_slice()).collect();
                sync_round(&mut next, &mut refs, alpha);
                if !held.is_empty() {
                    // The same pull toward the old center, on a copy that is dropped.
                    let mut old = self.params.clone();
                    let mut refs: Vec<&mut [f32]> =
                        held.iter_mut().map(|p| p.values.as_mut_slice()).collect();
                    sync_round(&mut old, &mut refs, alpha);
                }
                for p in kept.into_iter().chain(held) {
                    replies.push((p.reply, p.norm, p.values));
                }
            }
            Algorithm::Diloco => {
                if counted > 0 {
                    let deltas: Vec<Vec<f32>> = round
                        .iter()
                        .filter(|p| !p.held)
                        .map(|p| {
                            p.values
                                .iter()
                                .zip(&self.params)
                                .map(|(x, c)| x - c)
                                .collect()
                        })
                        .collect();
                    let refs: Vec<&[f32]> = deltas.iter().map(Vec::as_slice).collect();
                    let mut mean = vec![0.0; self.params.len()];
                    mean_delta(&refs, &mut mean);
                    let mut v = self.velocity.clone();
                    outer_nesterov_step(
                        &mut next,
                        &mut v,
                        &mean,
                        &mut self.scratch,
                        DILOCO_OUTER_LR,
                        DILOCO_OUTER_MOMENTUM,
                    );
                    velocity = Some(v);
                }
                for p in round {
                    replies.push((p.reply, p.norm, next.clone()));
                }
            }
            other => unreachable!("{other:?} has no rounds"),
        }
        let committed = if counted > 0 {
            self.commit(next, velocity)
        } else {
            self.spare = next;
            Ok(())
        };
        for (tx, norm, payload) in replies {
            // A worker that left meanwhile simply does not get its reply.
            let _ = tx.send(committed.clone().map(|()| Ready {
                apply: Apply::Replace,
                payload,
                version: self.version,
                norm,
            }));
        }
    }
}
