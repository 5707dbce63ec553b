//! The center variable x̃ and the only code that writes it. Every change — an
//! asynchronous elastic exchange, a DOWNPOUR push, a synchronous round, a new LSGD
//! leader, a relay's exchange with its upstream — goes through [`Center`], which the
//! server keeps behind one lock, so each update is applied atomically and none ever
//! sees a half-written center.
//!
//! Validation that needs the center (staleness, the norm guard) happens here too,
//! before anything is written: a rejected update leaves the center bit-identical.

use std::cell::Cell;

use tether_shared::algorithms::downpour::apply_push;
use tether_shared::algorithms::elastic::center_pull_in_place;
use tether_shared::algorithms::leader::LeaderBoard;
use tether_shared::algorithms::outer::outer_nesterov_step;
use tether_shared::algorithms::{Algorithm, Norms, norms};
use tether_shared::local::apply_reply;
use tether_shared::protocol::{Apply, Hyper, Rejection, first_non_finite};

use tokio::sync::oneshot;

pub use crate::guard::Cohort;
use crate::guard::NormGuard;

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
        reply: oneshot::Receiver<Reply>,
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
    /// How far the worker moved since its last exchange, ‖xⁱ − (what it held after
    /// its last reply)‖, as the server computed it (for DOWNPOUR: ‖push‖). The norm
    /// guard judges this, not ‖xⁱ − x̃‖: a worker's distance to the center grows when
    /// someone else drags the center away, its own progress does not.
    pub progress: f64,
    /// Whose progress it is compared with.
    pub cohort: Cohort,
    /// The worker ran its steps at the center's current τ and η: it was told them in
    /// its last two replies (or its welcome). Otherwise its progress is judged
    /// against the bound before the change too, and teaches the guard nothing.
    pub settled: bool,
    /// The loss screen held this update ([`crate::screen`]): the worker gets its
    /// reply as usual, but x̃ does not move toward it.
    pub held: bool,
}

/// What the loss screen judges: the center an update would produce on its own,
/// against the center it would be applied to.
#[derive(Debug)]
pub struct Proposal {
    /// The center's version now.
    pub base_version: u64,
    /// x̃ now.
    pub base: Vec<f32>,
    /// x̃ after this update alone.
    pub candidate: Vec<f32>,
}

/// What a round's member gets when the round closes.
pub type Reply = Result<Ready, Rejection>;

struct Pending {
    worker_id: u32,
    session: u64,
    norm: f64,
    held: bool,
    values: Vec<f32>,
    reply: oneshot::Sender<Reply>,
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
    /// The previous center's buffer, reused by [`Center::draft`].
    spare: Vec<f32>,
    round_id: u64,
    round: Vec<Pending>,
    /// ‖x̃‖ and the version it was taken at (x̃ changes only with its version): the
    /// guard asks for it several times an exchange, under the center's lock.
    norm: Cell<Option<(u64, f64)>>,
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
            guard: NormGuard::new(max_update_ratio),
            leader: LeaderBoard::default(),
            scratch: Vec::new(),
            spare: Vec::new(),
            round_id: 0,
            round: Vec::new(),
            norm: Cell::new(None),
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
    /// A new τ or η restarts the norm guard from the server's next measure: progress
    /// figures taken at the old values would refuse honest workers at a longer τ.
    pub fn set_hyper(&mut self, hyper: Hyper) {
        if (hyper.tau, hyper.lr) != (self.hyper.tau, self.hyper.lr) {
            self.guard.restart(self.norm());
        }
        self.hyper = hyper;
    }

    /// The server's measure of honest progress per exchange at `measured_at`'s τ and
    /// η (`calibrate.rs`); ignored when τ or η have changed since.
    pub fn set_honest_progress(&mut self, measured_at: Hyper, progress: f64) {
        let current = (self.hyper.tau, self.hyper.lr) == (measured_at.tau, measured_at.lr);
        if current && progress.is_finite() && progress > 0.0 {
            self.guard.set_honest(progress);
        }
    }

    /// The LSGD leader's worker session and loss, if any.
    pub fn leader(&self) -> Option<(u64, f32)> {
        self.leader.leader()
    }

    /// The largest progress the norm guard accepts now. Never sent to a client
    /// (rejections say why, not where the line is); for status and tests.
    pub fn progress_bound(&self, cohort: Cohort) -> f64 {
        self.guard.bound(self.norm(), cohort)
    }

    /// The largest progress the norm guard accepts now from `session`'s next
    /// exchange (run at the current τ and η).
    pub fn session_bound(&self, session: u64, cohort: Cohort) -> f64 {
        let center = self.norm();
        self.guard.judged_bound(center, session, cohort, true)
    }

    /// Whether `session` is new to the run, still settling (its exchanges are
    /// judged by the measure of honest progress from x̃ too).
    pub fn is_new(&self, session: u64) -> bool {
        self.guard.settling(session)
    }

    /// Workers waiting in the current synchronous round.
    pub fn round_waiting(&self) -> usize {
        self.round.len()
    }

    /// Checks staleness, finiteness and the norm guard; returns (‖update‖, ‖x̃‖).
    /// Changes nothing but the guard's count of bootstrap refusals.
    fn check(&mut self, update: &Update) -> Result<(f64, f64), Rejection> {
        assert_eq!(
            update.values.len(),
            self.params.len(),
            "length checked by caller"
        );
        self.check_staleness(update.seen_version)?;
        // One pass: finiteness, ‖xⁱ − x̃‖ and ‖x̃‖ (DOWNPOUR: ‖push‖, then ‖x̃‖).
        let (norm, center_norm) = if pushes(self.algorithm) {
            let n = norms(&update.values, &[]);
            check_finite(&n, &update.values)?;
            (n.distance, self.norm())
        } else {
            let n = norms(&update.values, &self.params);
            check_finite(&n, &update.values)?;
            (n.distance, n.center)
        };
        // A non-finite progress is out of line too.
        if !update.progress.is_finite() {
            return Err(Rejection::OutOfLine);
        }
        let bound =
            self.guard
                .judged_bound(center_norm, update.session, update.cohort, update.settled);
        if update.progress > bound {
            tracing::debug!(
                worker = update.worker_id,
                progress = update.progress,
                bound,
                center_norm,
                "out of line"
            );
            self.guard.refused(update.cohort);
            return Err(Rejection::OutOfLine);
        }
        Ok((norm, center_norm))
    }

    /// What the loss screen should judge before `update` is offered: `None` when the
    /// update would not move x̃ (an LSGD worker that does not lead). Runs every check
    /// [`Center::offer`] runs, so a proposal is only made for an acceptable update.
    pub fn propose(
        &mut self,
        update: &Update,
        members: usize,
    ) -> Result<Option<Proposal>, Rejection> {
        self.check(update)?;
        let weight = match self.algorithm {
            Algorithm::Easgd | Algorithm::Eamsgd | Algorithm::EasgdSync => self.hyper.alpha,
            // A member's share of the round's mean.
            Algorithm::Average | Algorithm::Diloco => 1.0 / members.max(1) as f32,
            Algorithm::Downpour | Algorithm::Mdownpour => 1.0,
            Algorithm::Lsgd => {
                if !self.would_lead(update.session, update.loss) {
                    return Ok(None);
                }
                return Ok(Some(Proposal {
                    base_version: self.version,
                    base: self.params.clone(),
                    candidate: update.values.clone(),
                }));
            }
        };
        let pushes = pushes(self.algorithm);
        let candidate = self
            .params
            .iter()
            .zip(&update.values)
            .map(|(&c, &x)| if pushes { c + x } else { c + weight * (x - c) })
            .collect();
        Ok(Some(Proposal {
            base_version: self.version,
            base: self.params.clone(),
            candidate,
        }))
    }

    /// Whether LSGD would make this worker (with this loss) the leader: the board's
    /// own rule, tried on a copy.
    fn would_lead(&self, session: u64, loss: f32) -> bool {
        let mut board = self.leader;
        board.offer(session, loss)
    }

    /// Offers an update. Checks staleness and the norm guard, then applies it (or
    /// queues it for the round); on a rejection nothing changes. A held update
    /// ([`Update::held`]) gets its reply, but x̃ stays where it is.
    pub fn offer(&mut self, mut update: Update, members: usize) -> Result<Outcome, Rejection> {
        let (norm, _) = self.check(&update)?;
        let alpha = self.hyper.alpha;
        let (session, cohort, progress) = (update.session, update.cohort, update.progress);
        let settled = update.settled;
        let ready = |apply, payload, version| {
            Outcome::Ready(Ready {
                apply,
                payload,
                version,
                norm,
            })
        };
        let held = update.held;
        let outcome = match self.algorithm {
            Algorithm::Easgd | Algorithm::Eamsgd => {
                // The update's buffer becomes the reply's: xⁱ in, d out. A held
                // update's d is computed the same way, on a copy that is dropped.
                let mut next = self.draft();
                center_pull_in_place(&mut next, &mut update.values, alpha);
                if held {
                    self.spare = next;
                } else {
                    self.commit(next, None)?;
                }
                ready(Apply::Subtract, update.values, self.version)
            }
            Algorithm::Downpour | Algorithm::Mdownpour if held => {
                ready(Apply::Replace, self.params.clone(), self.version)
            }
            Algorithm::Downpour => {
                let mut next = self.draft();
                apply_push(&mut next, &update.values);
                self.commit(next, None)?;
                ready(Apply::Replace, self.params.clone(), self.version)
            }
            Algorithm::Mdownpour => {
                let (mut next, mut velocity) = (self.draft(), self.velocity.clone());
                outer_nesterov_step(
                    &mut next,
                    &mut velocity,
                    &update.values,
                    &mut self.scratch,
                    1.0,
                    self.momentum,
                );
                self.commit(next, Some(velocity))?;
                ready(Apply::Replace, self.params.clone(), self.version)
            }
            Algorithm::Lsgd => {
                if !held && self.leader.offer(update.session, update.loss) {
                    // The leader's own parameters (checked finite above) are the
                    // center LSGD evaluates.
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
                    held,
                    values: update.values,
                    reply: tx,
                });
                let arm_timer = (self.round.len() == 1).then_some(self.round_id);
                self.close_round_if_complete(members);
                Outcome::Queued {
                    reply: rx,
                    arm_timer,
                }
            }
        };
        // A held update's progress is no evidence of what honest progress looks like,
        // nor is one run at other settings than the center's.
        if !held && settled {
            self.guard.accept(session, cohort, progress);
        }
        Ok(outcome)
    }

    /// Applies a reply from this server's own upstream (a relay's exchange with its
    /// parent) to x̃, as a worker applies a reply to xⁱ ([`apply_reply`]): `sent`
    /// is the x̃ the relay's sync carried. A new version, committed only if finite.
    pub fn apply_upstream(
        &mut self,
        apply: Apply,
        payload: &[f32],
        lambda: f32,
        sent: Option<&[f32]>,
    ) -> Result<(), Rejection> {
        if payload.len() != self.params.len() {
            return Err(Rejection::WrongLength {
                expected: self.params.len() as u64,
                got: payload.len() as u64,
            });
        }
        let mut next = self.draft();
        apply_reply(&mut next, apply, payload, lambda, sent);
        self.commit(next, None)
    }

    /// A copy of x̃ to write the next center into (reusing the last one's buffer).
    fn draft(&mut self) -> Vec<f32> {
        let mut next = std::mem::take(&mut self.spare);
        next.clear();
        next.extend_from_slice(&self.params);
        next
    }

    /// Makes `next` (and `velocity`) the center if every value is finite; otherwise
    /// nothing changes. The only way a new center is stored, so a non-finite one is
    /// never served, evaluated or checkpointed.
    fn commit(&mut self, next: Vec<f32>, velocity: Option<Vec<f32>>) -> Result<(), Rejection> {
        if !all_finite(&next) || velocity.as_deref().is_some_and(|v| !all_finite(v)) {
            self.spare = next;
            return Err(Rejection::CenterNonFinite);
        }
        self.spare = std::mem::replace(&mut self.params, next);
        if let Some(v) = velocity {
            self.velocity = v;
        }
        self.version += 1;
        Ok(())
    }

    /// ‖x̃‖, computed once per version.
    fn norm(&self) -> f64 {
        match self.norm.get() {
            Some((version, norm)) if version == self.version => norm,
            _ => {
                let norm = norms(&self.params, &[]).distance;
                self.norm.set(Some((self.version, norm)));
                norm
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
}

/// DOWNPOUR and MDOWNPOUR send pushes (xⁱ − the center last pulled), not xⁱ.
fn pushes(algorithm: Algorithm) -> bool {
    matches!(algorithm, Algorithm::Downpour | Algorithm::Mdownpour)
}

/// No NaN or ±∞ in `v` (eight lanes, so it vectorises; x · 0 is NaN exactly then).
fn all_finite(v: &[f32]) -> bool {
    let mut z = [0.0f32; 8];
    let chunks = v.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            z[l] += c[l] * 0.0;
        }
    }
    for &x in tail {
        z[0] += x * 0.0;
    }
    z.iter().sum::<f32>() == 0.0
}

fn check_finite(n: &Norms, values: &[f32]) -> Result<(), Rejection> {
    if n.finite {
        return Ok(());
    }
    let index = first_non_finite(values).unwrap_or(0) as u64;
    Err(Rejection::NonFinite { index })
}

mod round;
#[cfg(test)]
mod tests;
