//! What honest progress looks like, measured by the server itself: τ local steps
//! from the center on the server's own training images, with the workers' own code
//! and optimizer, give the distance an honest worker's first exchange moves. The
//! norm guard starts its bound from this figure while no worker has one of its own
//! (`center.rs`), so an honest first exchange is never out of line, at any τ.
//!
//! Measured once when a server starts (a fresh run or a resumed one) and again after
//! each runtime change of τ or η, on a blocking thread; an exchange that arrives
//! while a measurement is under way, and that the guard would refuse without it,
//! waits for it ([`Calibration::settled`], bounded).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burn::tensor::Device;
use tether_shared::algorithms::norms;
use tether_shared::data::ImageSet;
use tether_shared::local::{LocalError, LocalWorker, ShardData};
use tether_shared::protocol::{RunSpec, Shard};
use tokio::sync::watch;

use crate::center::Center;

/// At most this many local steps are run; a longer τ's figure is extrapolated
/// linearly from them (an overestimate: progress over n windows is at most the sum
/// of the windows' progress, and momentum has built up well within this many steps).
pub const MAX_STEPS: u32 = 256;
/// How long an exchange waits for a measurement under way before the guard judges
/// it without one.
pub const WAIT: Duration = Duration::from_secs(120);
/// At most one measurement asked for by a new worker's first exchange this often
/// (workers joining and refused cannot keep the server's core busy measuring).
pub const REMEASURE_EVERY: Duration = Duration::from_secs(30);
/// Seeds the measurement's batches and dropout: the figure is the same every time
/// for the same center and settings.
const SEED: u64 = 0x7e7e_ca11_b4a7_e000;

/// The distance `steps` honest local steps move from `center`: the run's model,
/// optimizer, batch size and normalisation from `spec` (its `hyper` says τ and η),
/// on the whole training set `train`. Runs min(τ, [`MAX_STEPS`]) steps on the CPU.
pub fn honest_progress(
    spec: &RunSpec,
    train: Arc<ImageSet>,
    center: Vec<f32>,
) -> Result<f64, LocalError> {
    let tau = spec.hyper.tau.max(1);
    let steps = tau.min(MAX_STEPS);
    let items = train.len() as u64;
    let data = ShardData {
        indices: (0..train.len()).collect(),
        set: train,
    };
    let shard = Shard {
        index: 0,
        count: 1,
        seed: SEED,
    };
    let mut worker = LocalWorker::new(Device::flex());
    worker.start(spec, shard, data, items, center.clone(), false)?;
    let pending = worker.train(steps, spec.hyper.lr, || false)?;
    let trained = worker.finish(pending);
    let progress = norms(&trained.params, &center).distance;
    Ok(progress * f64::from(tau) / f64::from(steps))
}

/// Runs `f` on a rayon pool of its own with one thread: Burn's CPU kernels would
/// otherwise queue the measurement's work behind everything else on the process's
/// pool (the loss screen, the evaluator, in-process workers), so its time would
/// depend on their load; on its own thread it takes a core's share, predictably.
fn on_one_thread<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    match rayon::ThreadPoolBuilder::new().num_threads(1).build() {
        Ok(pool) => pool.install(f),
        Err(_) => f(),
    }
}

/// Measurements under way, and the exchanges that wait for them.
pub struct Calibration {
    spec: RunSpec,
    train: Arc<ImageSet>,
    /// Measurements started and not yet finished.
    running: watch::Sender<u32>,
    /// When the last measurement began.
    last: Mutex<Option<Instant>>,
}

impl Calibration {
    /// Measures for the run `spec` on `train` (its `hyper` is replaced by the
    /// center's at each measurement).
    pub fn new(spec: RunSpec, train: Arc<ImageSet>) -> Self {
        Self {
            spec,
            train,
            running: watch::Sender::new(0),
            last: Mutex::new(None),
        }
    }

    /// Counts a measurement as under way from now until the returned guard drops:
    /// call it before the change that needs one, so no exchange slips in between.
    pub fn begin(&self) -> Running {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        self.running.send_modify(|n| *n += 1);
        Running(self.running.clone())
    }

    /// [`Self::begin`], unless a measurement began less than `every` ago.
    pub fn begin_if_due(&self, every: Duration) -> Option<Running> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|at| at.elapsed() < every) {
            return None;
        }
        *last = Some(Instant::now());
        self.running.send_modify(|n| *n += 1);
        Some(Running(self.running.clone()))
    }

    /// Whether a measurement is under way.
    pub fn running(&self) -> bool {
        *self.running.borrow() > 0
    }

    /// Waits (at most `wait`) until no measurement is under way.
    pub async fn settled(&self, wait: Duration) {
        let mut rx = self.running.subscribe();
        let _ = tokio::time::timeout(wait, rx.wait_for(|n| *n == 0)).await;
    }

    /// Measures honest progress from the center as it is now, at its τ and η, and
    /// gives the figure to its norm guard (unless τ or η changed meanwhile: the
    /// measurement that change started gives its own). `running` is [`Self::begin`]'s.
    pub async fn run(&self, center: &Mutex<Center>, running: Running) {
        let (params, hyper) = {
            let c = center.lock().unwrap_or_else(|e| e.into_inner());
            (c.params().to_vec(), c.hyper())
        };
        let mut spec = self.spec.clone();
        spec.hyper = hyper;
        let train = self.train.clone();
        let started = Instant::now();
        // Bounded like the exchanges that wait for it: a measurement that cannot
        // finish (a machine starved of CPU) must not hold them, nor count as running.
        let measured = tokio::time::timeout(
            WAIT,
            tokio::task::spawn_blocking(move || {
                on_one_thread(|| honest_progress(&spec, train, params))
            }),
        )
        .await;
        match measured {
            Ok(Ok(Ok(progress))) => {
                tracing::info!(
                    tau = hyper.tau,
                    lr = hyper.lr,
                    progress,
                    took_s = started.elapsed().as_secs_f64(),
                    "measured honest progress per exchange for the norm guard"
                );
                let mut c = center.lock().unwrap_or_else(|e| e.into_inner());
                c.set_honest_progress(hyper, progress);
            }
            Ok(Ok(Err(e))) => tracing::warn!("could not measure honest progress: {e}"),
            Ok(Err(e)) => tracing::warn!("measuring honest progress failed: {e}"),
            Err(_) => tracing::warn!(
                "measuring honest progress took over {WAIT:?}; the norm guard judges by its guess"
            ),
        }
        drop(running);
    }
}

/// A measurement under way (see [`Calibration::begin`]).
pub struct Running(watch::Sender<u32>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RunSettings;
    use tether_shared::algorithms::Algorithm;
    use tether_shared::data::Normalization;

    #[test]
    fn honest_progress_is_the_distance_tau_steps_move_and_grows_with_tau() {
        let train = Arc::new(tether_dataset::load(None).expect("shipped data").1.train);
        let mut run = RunSettings::defaults(Algorithm::Eamsgd);
        run.batch = 16;
        let center = run.model.seeded_params(0);
        let mut measure = |tau: u32| {
            run.tau = tau;
            let spec = run.spec("t".into(), Normalization::of(&train), train.len() as u64);
            honest_progress(&spec, train.clone(), center.clone()).unwrap()
        };
        let (short, long) = (measure(2), measure(8));
        assert!(short > 0.0 && short.is_finite(), "{short}");
        // Four times the steps move at least twice as far (momentum builds up).
        assert!(long > 2.0 * short, "τ 2: {short}, τ 8: {long}");
        // The same center and settings give the same figure.
        assert_eq!(measure(2), short);
    }
}
