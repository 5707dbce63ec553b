//! The center variable x̃ and the only code that writes it. Every change — an
//! asynchronous elastic exchange, a DOWNPOUR push, a synchronous round, a new LSGD
//! leader — goes through [`Center`], which the server keeps behind one lock, so each
//! update is applied atomically and none ever sees a half-written center.
//!
//! Validation that needs the center (staleness, the norm guard) happens here too,
//! before anything is written: a rejected update leaves the center bit-identical.

use tether_shared::algorithms::downpour::apply_push;
use tether_shared::algorithms::elastic::{average_round, center_pull_in_place, sync_round};
use tether_shared::algorithms::leader::LeaderBoard;
use tether_shared::algorithms::outer::{
    DILOCO_OUTER_LR, DILOCO_OUTER_MOMENTUM, mean_delta, outer_nesterov_step,
};
use tether_shared::algorithms::{Algorithm, Norms, norms};
use tether_shared::protocol::{Apply, Hyper, Rejection, first_non_finite};
use tokio::sync::oneshot;

/// What a worker gets back from an exchange.
#[derive(Clone, Debug, PartialEq)]
pub struct Ready {
    /// How to apply `payload`.
    pub apply: Apply,
    /// The difference, center, new parameters or leader parameters.
    pub payload: Vec<f32>,
    /// The center's version after the exchange.
    pub version: u64,
    /// ‖update‖ as the norm guard measured it (‖xⁱ − x̃‖, or ‖push‖ for DOWNPOUR).
    pub norm: f64,
}

/// The result of offering an update: ready now (asynchronous algorithms), or a
/// place in the current synchronous round.
#[derive(Debug)]
pub enum Outcome {
    /// The exchange is done.
    Ready(Ready),
    /// Wait for the round to close. `arm_timer` is the round's id when this update
    /// opened the round, so the caller starts its timeout.
    Queued {
        /// Resolves when the round closes (dropped if the worker is removed).
        reply: oneshot::Receiver<Ready>,
        /// Set when this update opened the round.
        arm_timer: Option<u64>,
    },
}

/// One worker's update, validated for length by the caller.
#[derive(Debug)]
pub struct Update {
    /// The worker's session.
    pub session: u64,
    /// Its short id (orders a round's members, so rounds are deterministic).
    pub worker_id: u32,
    /// The center version the worker last saw.
    pub seen_version: u64,
    /// Its recent training loss (LSGD's leader election).
    pub loss: f32,
    /// xⁱ, or for DOWNPOUR / MDOWNPOUR the push xⁱ − (the center it last pulled).
    pub values: Vec<f32>,
}

struct Pending {
    worker_id: u32,
    session: u64,
    norm: f64,
    values: Vec<f32>,
    reply: oneshot::Sender<Ready>,
}

/// Keeps the run's typical update norm and refuses updates far outside it.
/// Rejected rather than clipped: a clipped update would still move the center
/// toward a point no honest worker reached (see ARCHITECTURE.md).
#[derive(Clone, Copy, Debug)]
struct NormGuard {
    typical: Option<f64>,
    ratio: f64,
}

impl NormGuard {
    /// The bound: `ratio` × max(typical norm, ‖x̃‖ / 2). The floor lets the first
    /// updates of a run through and keeps a run of tiny updates from shrinking the
    /// bound to nothing; with the default ratio 10 nothing within 5‖x̃‖ of the
    /// center is ever refused.
    fn bound(&self, center_norm: f64) -> f64 {
        self.ratio * self.typical.unwrap_or(0.0).max(0.5 * center_norm).max(1e-3)
    }

    fn accept(&mut self, norm: f64) {
        self.typical = Some(match self.typical {
            None => norm,
            Some(t) => 0.9 * t + 0.1 * norm,
        });
    }
}

/// The center x̃, its version, and the algorithm state that goes with it.
pub struct Center {
    algorithm: Algorithm,
    params: Vec<f32>,
    /// Server-side momentum (MDOWNPOUR, DiLoCo); empty otherwise.
    velocity: Vec<f32>,
    momentum: f32,
    version: u64,
    hyper: Hyper,
    max_staleness: u64,
    guard: NormGuard,
    leader: LeaderBoard,
    scratch: Vec<f32>,
    round_id: u64,
    round: Vec<Pending>,
}

impl Center {
    /// A center at `params` (version `version`), for `algorithm`.
    /// `velocity` restores server momentum from a checkpoint (ignored when empty).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        algorithm: Algorithm,
        params: Vec<f32>,
        velocity: Vec<f32>,
        version: u64,
        hyper: Hyper,
        momentum: f32,
        max_staleness: u64,
        max_update_ratio: f64,
    ) -> Self {
        let needs_velocity = matches!(algorithm, Algorithm::Mdownpour | Algorithm::Diloco);
        let velocity = match (needs_velocity, velocity.len() == params.len()) {
            (false, _) => Vec::new(),
            (true, true) => velocity,
            (true, false) => vec![0.0; params.len()],
        };
        Self {
            algorithm,
            params,
            velocity,
            momentum,
            version,
            hyper,
            max_staleness,
            guard: NormGuard {
                typical: None,
                ratio: max_update_ratio,
            },
            leader: LeaderBoard::default(),
            scratch: Vec::new(),
            round_id: 0,
            round: Vec::new(),
        }
    }

    /// The center's parameters.
    pub fn params(&self) -> &[f32] {
        &self.params
    }

    /// Server-side momentum (empty unless MDOWNPOUR or DiLoCo).
    pub fn velocity(&self) -> &[f32] {
        &self.velocity
    }

    /// Incremented by every change.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// τ, α, η now.
    pub fn hyper(&self) -> Hyper {
        self.hyper
    }

    /// Changes τ, α, η from the next exchange on (the operator's runtime change;
    /// validated by the caller). Workers get the new values with their next reply.
    pub fn set_hyper(&mut self, hyper: Hyper) {
        self.hyper = hyper;
    }

    /// The LSGD leader's worker session and loss, if any.
    pub fn leader(&self) -> Option<(u64, f32)> {
        self.leader.leader()
    }

    /// Workers waiting in the current synchronous round.
    pub fn round_waiting(&self) -> usize {
        self.round.len()
    }

    /// Offers an update. Checks staleness and the norm guard, then applies it (or
    /// queues it for the round); on a rejection nothing changes.
    pub fn offer(&mut self, mut update: Update, members: usize) -> Result<Outcome, Rejection> {
        assert_eq!(
            update.values.len(),
            self.params.len(),
            "length checked by caller"
        );
        self.check_staleness(update.seen_version)?;
        // One pass: finiteness, ‖xⁱ − x̃‖ and ‖x̃‖ (DOWNPOUR: ‖push‖, then ‖x̃‖).
        let pushes = matches!(self.algorithm, Algorithm::Downpour | Algorithm::Mdownpour);
        let (norm, center_norm) = if pushes {
            let n = norms(&update.values, &[]);
            check_finite(&n, &update.values)?;
            (n.distance, norms(&self.params, &[]).distance)
        } else {
            let n = norms(&update.values, &self.params);
            check_finite(&n, &update.values)?;
            (n.distance, n.center)
        };
        let bound = self.guard.bound(center_norm);
        if norm > bound {
            return Err(Rejection::OutOfLine { norm, bound });
        }
        self.guard.accept(norm);
        let alpha = self.hyper.alpha;
        let ready = |apply, payload, version| {
            Ok(Outcome::Ready(Ready {
                apply,
                payload,
                version,
                norm,
            }))
        };
        match self.algorithm {
            Algorithm::Easgd | Algorithm::Eamsgd => {
                // The update's buffer becomes the reply's: xⁱ in, d out.
                center_pull_in_place(&mut self.params, &mut update.values, alpha);
                self.version += 1;
                ready(Apply::Subtract, update.values, self.version)
            }
            Algorithm::Downpour => {
                apply_push(&mut self.params, &update.values);
                self.version += 1;
                ready(Apply::Replace, self.params.clone(), self.version)
            }
            Algorithm::Mdownpour => {
                outer_nesterov_step(
                    &mut self.params,
                    &mut self.velocity,
                    &update.values,
                    &mut self.scratch,
                    1.0,
                    self.momentum,
                );
                self.version += 1;
                ready(Apply::Replace, self.params.clone(), self.version)
            }
            Algorithm::Lsgd => {
                if self.leader.offer(update.session, update.loss) {
                    // The leader's own parameters are the center LSGD evaluates.
                    self.params.copy_from_slice(&update.values);
                    self.version += 1;
                }
                ready(Apply::PullToward, self.params.clone(), self.version)
            }
            Algorithm::EasgdSync | Algorithm::Average | Algorithm::Diloco => {
                let (tx, rx) = oneshot::channel();
                self.round.retain(|p| p.session != update.session);
                self.round.push(Pending {
                    worker_id: update.worker_id,
                    session: update.session,
                    norm,
                    values: update.values,
                    reply: tx,
                });
                let arm_timer = (self.round.len() == 1).then_some(self.round_id);
                self.close_round_if_complete(members);
                Ok(Outcome::Queued {
                    reply: rx,
                    arm_timer,
                })
            }
        }
    }

    fn check_staleness(&self, seen: u64) -> Result<(), Rejection> {
        if seen > self.version {
            return Err(Rejection::Unexpected(format!(
                "center version {seen} is newer than the server's {}",
                self.version
            )));
        }
        let staleness = self.version - seen;
        if staleness > self.max_staleness {
            return Err(Rejection::TooStale {
                seen,
                current: self.version,
                staleness,
                bound: self.max_staleness,
            });
        }
        Ok(())
    }

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

    /// Removes a departed worker from the waiting round.
    pub fn leave_round(&mut self, session: u64, members: usize) {
        self.round.retain(|p| p.session != session);
        self.close_round_if_complete(members);
    }

    fn close_round(&mut self) {
        let mut round = std::mem::take(&mut self.round);
        self.round_id += 1;
        // Deterministic order: the center's sum does not depend on arrival order.
        round.sort_by_key(|p| p.worker_id);
        let mut replies: Vec<(oneshot::Sender<Ready>, f64, Vec<f32>)> = Vec::new();
        match self.algorithm {
            Algorithm::EasgdSync | Algorithm::Average => {
                let mut xs: Vec<Vec<f32>> = Vec::with_capacity(round.len());
                let mut meta = Vec::with_capacity(round.len());
                for p in round {
                    xs.push(p.values);
                    meta.push((p.reply, p.norm));
                }
                let mut refs: Vec<&mut [f32]> = xs.iter_mut().map(|x| x.as_mut_slice()).collect();
                if self.algorithm == Algorithm::Average {
                    average_round(&mut self.params, &mut refs);
                } else {
                    sync_round(&mut self.params, &mut refs, self.hyper.alpha);
                }
                for ((tx, norm), x) in meta.into_iter().zip(xs) {
                    replies.push((tx, norm, x));
                }
            }
            Algorithm::Diloco => {
                let deltas: Vec<Vec<f32>> = round
                    .iter()
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
                outer_nesterov_step(
                    &mut self.params,
                    &mut self.velocity,
                    &mean,
                    &mut self.scratch,
                    DILOCO_OUTER_LR,
                    DILOCO_OUTER_MOMENTUM,
                );
                for p in round {
                    replies.push((p.reply, p.norm, self.params.clone()));
                }
            }
            other => unreachable!("{other:?} has no rounds"),
        }
        self.version += 1;
        for (tx, norm, payload) in replies {
            // A worker that left meanwhile simply does not get its reply.
            let _ = tx.send(Ready {
                apply: Apply::Replace,
                payload,
                version: self.version,
                norm,
            });
        }
    }
}

fn check_finite(n: &Norms, values: &[f32]) -> Result<(), Rejection> {
    if n.finite {
        return Ok(());
    }
    let index = first_non_finite(values).unwrap_or(0) as u64;
    Err(Rejection::NonFinite { index })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hyper(alpha: f32) -> Hyper {
        Hyper {
            tau: 1,
            alpha,
            lr: 0.1,
        }
    }

    /// A center whose norm guard lets everything through (the guard has its own test).
    fn center(algorithm: Algorithm, params: Vec<f32>) -> Center {
        Center::new(algorithm, params, Vec::new(), 0, hyper(0.25), 0.9, 8, 1e9)
    }

    fn update(session: u64, values: Vec<f32>) -> Update {
        Update {
            session,
            worker_id: session as u32,
            seen_version: 0,
            loss: 1.0,
            values,
        }
    }

    fn ready(o: Outcome) -> Ready {
        match o {
            Outcome::Ready(r) => r,
            Outcome::Queued { .. } => panic!("expected an immediate reply"),
        }
    }

    #[test]
    fn async_easgd_moves_the_center_by_the_difference_it_returns() {
        let mut c = center(Algorithm::Easgd, vec![1.0, 1.0]);
        let r = ready(c.offer(update(1, vec![2.0, 0.0]), 1).unwrap());
        assert_eq!(r.apply, Apply::Subtract);
        assert_eq!(r.payload, [0.25, -0.25]);
        assert_eq!(c.params(), [1.25, 0.75]);
        assert_eq!((r.version, c.version()), (1, 1));
    }

    #[test]
    fn rejections_leave_the_center_bit_identical() {
        let mut c = Center::new(
            Algorithm::Easgd,
            vec![1.0; 4],
            Vec::new(),
            0,
            hyper(0.25),
            0.9,
            8,
            10.0,
        );
        let before = c.params().to_vec();
        // Far out of line with ‖x̃‖ = 2.
        let err = c.offer(update(1, vec![1e6; 4]), 1).unwrap_err();
        assert!(matches!(err, Rejection::OutOfLine { .. }), "{err:?}");
        // Not finite.
        let mut nan = vec![1.0; 4];
        nan[2] = f32::NAN;
        let err = c.offer(update(1, nan), 1).unwrap_err();
        assert_eq!(err, Rejection::NonFinite { index: 2 });
        // Claims a version from the future.
        let mut u = update(1, vec![1.0; 4]);
        u.seen_version = 5;
        assert!(matches!(c.offer(u, 1), Err(Rejection::Unexpected(_))));
        assert_eq!(c.params(), before);
        assert_eq!(c.version(), 0);
        // Too stale: advance the center past the bound of 8.
        for _ in 0..9 {
            c.offer(update(2, vec![1.1; 4]), 1).unwrap();
        }
        let snapshot = c.params().to_vec();
        let err = c.offer(update(1, vec![1.0; 4]), 1).unwrap_err();
        assert!(
            matches!(err, Rejection::TooStale { staleness: 9, .. }),
            "{err:?}"
        );
        assert_eq!(c.params(), snapshot);
    }

    #[test]
    fn downpour_adds_the_push_and_replies_with_the_center() {
        let mut c = center(Algorithm::Downpour, vec![1.0, 2.0]);
        let r = ready(c.offer(update(1, vec![0.5, -0.5]), 1).unwrap());
        assert_eq!(
            (r.apply, r.payload.as_slice()),
            (Apply::Replace, &[1.5, 1.5][..])
        );
    }

    #[test]
    fn lsgd_keeps_the_lowest_loss_parameters() {
        let mut c = center(Algorithm::Lsgd, vec![0.0, 0.0]);
        let mut a = update(1, vec![1.0, 1.0]);
        a.loss = 2.0;
        let r = ready(c.offer(a, 2).unwrap());
        assert_eq!(
            (r.apply, r.payload.as_slice()),
            (Apply::PullToward, &[1.0, 1.0][..])
        );
        let mut b = update(2, vec![-1.0, 0.5]);
        b.loss = 3.0; // worse: not the leader
        let r = ready(c.offer(b, 2).unwrap());
        assert_eq!(r.payload, [1.0, 1.0]);
        assert_eq!(c.leader(), Some((1, 2.0)));
    }

    #[test]
    fn a_sync_round_waits_for_every_member_then_matches_sync_round() {
        let mut c = center(Algorithm::EasgdSync, vec![0.0, 10.0]);
        let Outcome::Queued {
            reply: mut r2,
            arm_timer,
        } = c.offer(update(2, vec![4.0, 6.0]), 2).unwrap()
        else {
            panic!()
        };
        assert_eq!(arm_timer, Some(0));
        assert!(r2.try_recv().is_err(), "round still open");
        let Outcome::Queued {
            reply: r1,
            arm_timer,
        } = c.offer(update(1, vec![2.0, 10.0]), 2).unwrap()
        else {
            panic!()
        };
        assert_eq!(arm_timer, None);
        // Same numbers as shared's hand-computed sync_round test.
        assert_eq!(c.params(), [1.5, 9.0]);
        assert_eq!(r1.blocking_recv().unwrap().payload, [1.5, 10.0]);
        assert_eq!(r2.blocking_recv().unwrap().payload, [3.0, 7.0]);
        assert_eq!(c.version(), 1);
    }

    #[test]
    fn a_timed_out_round_goes_on_without_the_laggard() {
        let mut c = center(Algorithm::Average, vec![0.0]);
        let Outcome::Queued { reply, arm_timer } = c.offer(update(1, vec![1.0]), 3).unwrap() else {
            panic!()
        };
        assert_eq!(
            c.round_timed_out(arm_timer.unwrap() + 1),
            0,
            "another round's timer"
        );
        assert_eq!(c.round_timed_out(arm_timer.unwrap()), 1);
        // One member: α = 1/1, the center becomes the worker's parameters.
        assert_eq!(c.params(), [1.0]);
        assert_eq!(reply.blocking_recv().unwrap().version, 1);
    }

    #[test]
    fn diloco_applies_the_outer_step_to_the_mean_delta() {
        let mut c = Center::new(
            Algorithm::Diloco,
            vec![0.0],
            Vec::new(),
            0,
            hyper(0.0),
            0.9,
            8,
            1e9,
        );
        let _a = c.offer(update(1, vec![0.5]), 2).unwrap();
        let _b = c.offer(update(2, vec![1.5]), 2).unwrap();
        // Mean delta 1 → the hand-computed first DiLoCo step, 1.33.
        assert!((c.params()[0] - 1.33).abs() < 1e-6, "{:?}", c.params());
    }
}
