//! The norm guard: refuses an update whose progress — how far the worker moved since
//! its last accepted exchange — is far outside the run's typical progress. The center
//! ([`crate::center::Center`]) asks it before anything is written and tells it what
//! it accepted; ARCHITECTURE.md (invariants) says why progress is judged and not the
//! distance to x̃, and how the bound starts.

use std::collections::{HashMap, VecDeque};

/// Accepted progress norms kept per worker: its figure is the largest of them.
pub(crate) const HISTORY: usize = 16;
/// A worker with fewer accepted exchanges than this is still settling: it started
/// from x̃ and is judged by the server's measure of honest progress from x̃ too.
pub(crate) const SETTLING: usize = HISTORY / 2;
/// Before any worker of a cohort has an accepted update, progress is bounded by this
/// fraction of ‖x̃‖ (× the ratio), or by the server's own measure of honest progress
/// when that is larger (`calibrate.rs`): the bootstrap of a run.
const BOOTSTRAP_FRACTION: f64 = 0.05;
/// Each out-of-line refusal during the bootstrap doubles it, up to this fraction of
/// ‖x̃‖ (× the ratio): a guess must not shut out a run whose honest first steps are
/// longer than it (a relay's first exchange, EAMSGD at τ = 64).
const BOOTSTRAP_CAP_FRACTION: f64 = 10.0;
/// The typical figure never falls below this fraction of ‖x̃‖, so workers that
/// stop moving (or lie that they do) cannot shrink the bound to nothing.
const FLOOR_FRACTION: f64 = 1e-4;

/// Whose progress an update's progress is compared with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cohort {
    /// Workers and browsers: progress over τ local steps.
    Workers,
    /// Relays admitted with the run's relay token. A relay's progress is its
    /// subtree's over τ_up of its own versions, many worker exchanges long, so a
    /// bound set by workers would refuse it for ever. A relay without a token is
    /// judged as a worker: anyone could claim to be one and so pick its own peers.
    Relays,
}

/// Refuses updates whose progress is far outside the run's typical progress.
///
/// The typical figure is a median of recent maxima: each worker's figure is the
/// largest of its last [`HISTORY`] accepted progress norms, and the typical is the
/// lower median of the figures of the workers in its [`Cohort`]. The largest, not
/// the median: honest progress is heavy-tailed once a run nears convergence (most
/// exchanges barely move, an epoch's hard batch moves 10–20× as far), and a bound
/// on the median shut honest workers out one after another. No single worker sets
/// it: with two workers the smaller figure counts, with more the middle one; a
/// worker raising its own figure step by step raises nothing. Rejected rather than clipped: a clipped
/// update would still move the center toward a point no honest worker reached
/// (ARCHITECTURE.md).
#[derive(Clone, Debug)]
pub(crate) struct NormGuard {
    ratio: f64,
    recent: HashMap<u64, (Cohort, VecDeque<f64>)>,
    /// Out-of-line refusals per cohort while it had no figure (the bootstrap).
    bootstrap_refusals: [u32; 2],
    /// Honest progress per exchange as the server last measured it from the center
    /// (`calibrate.rs`; at the current τ and η unless `stale`); judges workers while
    /// they have no figure.
    honest: Option<f64>,
    /// Each cohort's bound just before the last change of τ or η: exchanges run at
    /// the old values are judged against it.
    before_change: [f64; 2],
    /// τ or η changed and the figures are still the old values': the next measure
    /// replaces them.
    stale: bool,
    /// τ or η changed during the run: from then on the bootstrap is the measure
    /// alone. The guess (‖x̃‖/20) is for a run's start, where a worker that rejoins
    /// a resumed run with its own parameters may stand that far from x̃; late in a
    /// run it is far looser than honest progress.
    changed: bool,
}

impl NormGuard {
    pub(crate) fn new(ratio: f64) -> Self {
        Self {
            ratio,
            recent: HashMap::new(),
            bootstrap_refusals: [0; 2],
            honest: None,
            before_change: [0.0; 2],
            stale: false,
            changed: false,
        }
    }

    /// τ or η changed: workers' progress figures taken before are no guide to their
    /// progress now. They judge until the server's measure at the new values arrives
    /// ([`Self::set_honest`]), which then starts the workers' bound again from it.
    pub(crate) fn restart(&mut self, center_norm: f64) {
        for cohort in [Cohort::Workers, Cohort::Relays] {
            self.before_change[cohort as usize] = self.bound(center_norm, cohort);
        }
        self.stale = true;
        self.changed = true;
    }

    pub(crate) fn typical(&self, cohort: Cohort) -> Option<f64> {
        let figures = self
            .recent
            .values()
            .filter(|(c, _)| *c == cohort)
            .filter_map(|(_, h)| h.iter().copied().max_by(f64::total_cmp));
        lower_median(figures)
    }

    pub(crate) fn bound(&self, center_norm: f64, cohort: Cohort) -> f64 {
        let floor = (FLOOR_FRACTION * center_norm).max(1e-6);
        let typical = self.typical(cohort).unwrap_or_else(|| {
            let doublings = self.bootstrap_refusals[cohort as usize].min(64);
            let guess = (BOOTSTRAP_FRACTION * center_norm * 2f64.powi(doublings as i32))
                .min(BOOTSTRAP_CAP_FRACTION * center_norm);
            // A relay's exchange spans many worker exchanges: the measure is not its.
            match (cohort, self.honest) {
                (Cohort::Workers, Some(honest)) if self.changed => honest,
                (Cohort::Workers, Some(honest)) => guess.max(honest),
                _ => guess,
            }
        });
        self.ratio * typical.max(floor)
    }

    pub(crate) fn accept(&mut self, session: u64, cohort: Cohort, progress: f64) {
        let (c, h) = self
            .recent
            .entry(session)
            .or_insert((cohort, VecDeque::new()));
        *c = cohort;
        if h.len() == HISTORY {
            h.pop_front();
        }
        h.push_back(progress);
        self.bootstrap_refusals[cohort as usize] = 0;
    }

    /// An update of `cohort` was out of line: during the bootstrap the bound grows.
    pub(crate) fn refused(&mut self, cohort: Cohort) {
        if self.typical(cohort).is_none() {
            let n = &mut self.bootstrap_refusals[cohort as usize];
            *n = n.saturating_add(1);
        }
    }

    /// The bound `session`'s update is judged against: [`Self::bound`]; while the
    /// worker is settling (fewer than [`SETTLING`] accepted exchanges) at least the
    /// ratio times the latest measure of honest progress from the center — a
    /// worker new to the run starts from x̃, and its first exchanges from x̃ move far
    /// more than a settled worker's once training nears a sharp minimum (10–300×
    /// on a small batch-norm network); for an update run at the values before the
    /// last change of τ or η (not `settled`), at least the bound before the change.
    pub(crate) fn judged_bound(
        &self,
        center_norm: f64,
        session: u64,
        cohort: Cohort,
        settled: bool,
    ) -> f64 {
        let mut bound = self.bound(center_norm, cohort);
        if let (Cohort::Workers, Some(honest)) = (cohort, self.honest)
            && self.settling(session)
            && !self.stale
        {
            bound = bound.max(self.ratio * honest);
        }
        if settled {
            bound
        } else {
            bound.max(self.before_change[cohort as usize])
        }
    }

    /// The server's measure of honest progress at the current τ and η; after a
    /// change of τ or η it replaces the figures taken before.
    pub(crate) fn set_honest(&mut self, progress: f64) {
        self.honest = Some(progress);
        // Workers' figures only: a relay's exchange spans many of its workers', which
        // this measure does not describe.
        if std::mem::take(&mut self.stale) {
            self.recent.retain(|_, (c, _)| *c != Cohort::Workers);
            self.bootstrap_refusals[Cohort::Workers as usize] = 0;
        }
    }

    /// Whether `session` has fewer than [`SETTLING`] accepted exchanges.
    pub(crate) fn settling(&self, session: u64) -> bool {
        self.recent
            .get(&session)
            .is_none_or(|(_, h)| h.len() < SETTLING)
    }

    pub(crate) fn forget(&mut self, session: u64) {
        self.recent.remove(&session);
    }
}

/// The lower median (of two, the smaller): `None` when there is nothing.
fn lower_median(values: impl Iterator<Item = f64>) -> Option<f64> {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    v.get(v.len().saturating_sub(1) / 2).copied()
}
