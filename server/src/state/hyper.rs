//! The operator's runtime changes of τ, α, η: applied to the center, kept for the
//! dashboard's charts, and followed by a new measure of honest progress for the
//! norm guard when τ or η changed.

use serde::{Deserialize, Serialize};
use tether_shared::protocol::Hyper;

use super::{AppState, lock};
use crate::calibrate::Running;

/// An operator's runtime change of τ, α, η.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct HyperChange {
    /// Run time (seconds served, counted across resumes).
    pub time_s: f64,
    /// The values before.
    pub before: Hyper,
    /// The values after.
    pub after: Hyper,
}

impl AppState {
    /// Changes τ, α, η (validated by the caller); logged and kept for the charts.
    /// A new τ or η restarts the norm guard and measures honest progress anew; the
    /// measurement counts as under way before the change, so no exchange is judged
    /// between the two.
    pub fn set_hyper(&self, after: Hyper) -> HyperChange {
        let (before, running) = {
            let mut center = self.center();
            let before = center.hyper();
            let remeasure = (after.tau, after.lr) != (before.tau, before.lr);
            let running = remeasure.then(|| self.calibration.begin());
            center.set_hyper(after);
            (before, running)
        };
        if let Some(running) = running {
            self.measure_honest_progress(running);
        }
        let change = HyperChange {
            time_s: self.now_s(),
            before,
            after,
        };
        tracing::info!(?before, ?after, "hyper-parameters changed by the operator");
        lock(&self.changes).push(change);
        change
    }

    /// Measures honest progress from the center for the norm guard, in the
    /// background (`calibrate.rs`); `running` is the measurement's count.
    pub fn measure_honest_progress(&self, running: Running) {
        let state = self.clone();
        tokio::spawn(async move { state.calibration.run(&state.center, running).await });
    }
}
