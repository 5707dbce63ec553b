//! The virtual-time simulator: p workers in one process, each with its own clock,
//! exchanging with the server's own [`Center`] in virtual-time order. It answers
//! "how long would this run take if every worker had its own device" on a machine
//! with one, without pretending: the training is real (each worker's
//! [`LocalWorker`] runs its τ steps on its shard), only the clocks are virtual.
//!
//! A worker's clock advances by τ local steps at its speed, then by one exchange
//! (the worker waits for its reply: no overlap). Asynchronous algorithms apply each
//! update when its clock says it arrives, earliest first (ties by worker id), so
//! the center sees exactly the order a real run with those speeds would give it. A
//! synchronous round closes when its slowest member arrives, and every member then
//! resumes from that moment. Everything is sequential and seeded: the same
//! experiment gives the same points on the same kind of CPU (the kernels' rounding
//! differs between, say, AVX2 and AVX-512 code). It runs on one thread of its own:
//! Burn's CPU kernels sum in rayon splits that follow the load on more threads.
//!
//! As in `tether serve`, DOWNPOUR's push and every update's progress are measured
//! from what the worker held after its last reply; the staleness bound is the
//! server's default, the norm guard is on only when asked for. What the simulator
//! leaves out: the loss screen (off, as on a trusted cluster), payload encodings
//! (f32), and overlapped syncs.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::sync::Arc;

use burn::tensor::Device;
use serde::Serialize;
use tether_server::calibrate::honest_progress;
use tether_server::center::{Center, Cohort, Outcome, Reply, Update};
use tether_server::config::has_elastic_force;
use tether_server::{RunSettings, ServerConfig};
use tether_shared::algorithms::{Algorithm, distance};
use tether_shared::data::{ImageSet, Normalization, shard_indices};
use tether_shared::local::{LocalError, LocalWorker, ShardData};
use tether_shared::model::{FlatError, load_flat};
use tether_shared::protocol::{Apply, Rejection, Shard};
use tether_shared::train::{evaluate, ready_to_score};
use thiserror::Error;
use tokio::sync::oneshot;

/// How long things take in virtual time.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Timing {
    /// Seconds one local step takes on a worker of speed 1.
    pub step_s: f64,
    /// Worker i's speed is `speeds[i % len]` (steps per `step_s`: 0.5 is a
    /// straggler at half speed); empty means every worker runs at 1.
    pub speeds: Vec<f64>,
    /// Seconds from a worker's send to its having applied the reply.
    pub exchange_s: f64,
}

impl Timing {
    /// Worker `i`'s speed.
    pub fn speed(&self, i: usize) -> f64 {
        if self.speeds.is_empty() {
            1.0
        } else {
            self.speeds[i % self.speeds.len()]
        }
    }
}

/// One simulated run: `settings.expected_workers` workers (p) until the center has
/// counted `budget_samples` training images.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Experiment {
    /// The run, as `tether serve` would take it (p = `expected_workers`).
    pub settings: RunSettings,
    /// Training images in all, over every worker.
    pub budget_samples: u64,
    /// Evaluations of the center, evenly spaced in samples (plus one at the start).
    pub evaluations: u32,
    /// The clocks.
    pub timing: Timing,
    /// The server's norm guard: refuse an update whose progress exceeds this many
    /// times the typical one (`tether serve --max-update-ratio`); `None`: off, as
    /// in the paper.
    pub norm_guard: Option<f64>,
    /// One worker alone, no center: the paper's single-worker baseline (MSGD with
    /// EAMSGD's local optimizer). Its own parameters are scored, and its time is
    /// its steps alone. Needs p = 1.
    pub sequential: bool,
}

impl Experiment {
    /// Checks the run's settings and the clocks, so a bad one fails before training.
    pub fn validate(&self) -> Result<(), SimError> {
        self.settings
            .validate()
            .map_err(|e| SimError::Settings(e.to_string()))?;
        let t = &self.timing;
        let positive = |v: f64| v.is_finite() && v > 0.0;
        let valid = positive(t.step_s)
            && t.exchange_s.is_finite()
            && t.exchange_s >= 0.0
            && t.speeds.iter().all(|&s| positive(s));
        if !valid {
            return Err(SimError::Settings(
                "the step time and speeds must be positive and the exchange time ≥ 0, all finite"
                    .into(),
            ));
        }
        if self.sequential && self.settings.expected_workers != 1 {
            return Err(SimError::Settings(
                "a sequential baseline is one worker: p must be 1".into(),
            ));
        }
        if self.norm_guard.is_some_and(|r| !(r.is_finite() && r > 1.0)) {
            return Err(SimError::Settings(
                "the norm guard's ratio must be finite and above 1".into(),
            ));
        }
        Ok(())
    }
}

/// The center's score at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Point {
    /// Training images the center had counted.
    pub samples: u64,
    /// Parallel time: the virtual clock of the exchange that made this center.
    pub time_s: f64,
    /// Exchanges applied so far.
    pub exchanges: u64,
    /// Test error, 0..1.
    pub error: f64,
    /// Mean test cross-entropy.
    pub loss: f64,
}

/// What a simulated run produced.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Simulated {
    /// The center's scores, in order.
    pub points: Vec<Point>,
    /// Exchanges the center accepted.
    pub exchanges: u64,
    /// Updates it refused (the worker then rejoins, as a real one would).
    pub rejected: u64,
    /// Exchanges per worker (a straggler's share shows here).
    pub per_worker: Vec<u64>,
    /// Test images each point was scored on.
    pub test_images: usize,
    /// The center x̃ at the end, or a sequential run's worker (not in reports: a
    /// model's worth of numbers).
    #[serde(skip)]
    pub center: Vec<f32>,
}

/// Why a simulation could not run.
#[derive(Debug, Error)]
pub enum SimError {
    /// The settings are not a valid run.
    #[error("{0}")]
    Settings(String),
    /// A worker could not start or train.
    #[error("worker {worker}: {source}")]
    Worker {
        /// Which worker.
        worker: usize,
        /// What failed.
        source: LocalError,
    },
    /// A synchronous round's member was refused: the round cannot close.
    #[error("worker {worker}'s update was refused in a synchronous round: {why}")]
    RoundRefused {
        /// Which worker.
        worker: usize,
        /// Why.
        why: Rejection,
    },
    /// The center's parameters did not fit the model (cannot happen with one model).
    #[error("the center does not fit the model: {0}")]
    Flat(#[from] FlatError),
}

/// A worker's next exchange, ordered earliest first (a max-heap of reversed keys).
#[derive(Clone, Copy, Debug)]
struct Due {
    at: f64,
    worker: usize,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .at
            .total_cmp(&self.at)
            .then(other.worker.cmp(&self.worker))
    }
}

struct SimWorker {
    local: LocalWorker,
    /// What it held after its last reply (the welcome's center at first): its next
    /// update's progress, and DOWNPOUR's push, are measured from here.
    anchor: Vec<f32>,
    /// The center version it last saw.
    seen: u64,
    /// When it is free to train again.
    clock: f64,
}

/// A synchronous round's member waiting for the round to close.
struct Waiting {
    worker: usize,
    at: f64,
    reply: oneshot::Receiver<Reply>,
}

/// Runs `experiment` on `train` (cut into p shards as the server cuts it), scoring
/// the center on `test`; `progress` hears the samples counted after each exchange.
pub fn run(
    experiment: &Experiment,
    train: &Arc<ImageSet>,
    test: &ImageSet,
    progress: impl FnMut(u64) + Send,
) -> Result<Simulated, SimError> {
    // Burn's CPU kernels sum with rayon, whose splits follow work stealing: on more
    // than one thread the order of a float sum, and so its rounding, depends on the
    // machine's load. On one thread a run depends on its settings alone.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .map_err(|e| SimError::Settings(format!("cannot start the simulator's thread: {e}")))?;
    pool.install(|| simulate(experiment, train, test, progress))
}

fn simulate(
    experiment: &Experiment,
    train: &Arc<ImageSet>,
    test: &ImageSet,
    mut progress: impl FnMut(u64),
) -> Result<Simulated, SimError> {
    experiment.validate()?;
    let run = &experiment.settings;
    let timing = &experiment.timing;
    let p = run.expected_workers as usize;
    let defaults = ServerConfig::new(run.clone());
    let normalization = Normalization::of(train);
    let hyper = run.hyper();
    let spec = run.spec(
        "simulated".into(),
        normalization.clone(),
        train.len() as u64,
    );
    let device = Device::flex();
    let start = run.model.seeded_params(run.seed);
    let mut center = Center::new(
        run.algorithm,
        start.clone(),
        Vec::new(),
        0,
        hyper,
        run.momentum as f32,
        defaults.max_staleness,
        // Off: a ratio no finite progress reaches.
        experiment.norm_guard.unwrap_or(1e30),
    );
    if experiment.norm_guard.is_some() {
        // As `tether serve` does before its first exchange: the guard's bound
        // starts from the server's own measure of honest progress.
        let honest = honest_progress(&spec, Arc::clone(train), start.clone())
            .map_err(|e| SimError::Settings(format!("measuring honest progress: {e}")))?;
        center.set_honest_progress(hyper, honest);
    }
    let mut workers = Vec::with_capacity(p);
    for i in 0..p {
        let shard = Shard {
            index: i as u32,
            count: p as u32,
            seed: run.seed,
        };
        let data = ShardData {
            set: train.clone(),
            indices: shard_indices(train.len(), p, i, run.seed),
        };
        let mut local = LocalWorker::new(device.clone());
        local
            .start(&spec, shard, data, train.len() as u64, start.clone(), false)
            .map_err(|source| SimError::Worker { worker: i, source })?;
        workers.push(SimWorker {
            local,
            anchor: start.clone(),
            seen: 0,
            clock: 0.0,
        });
    }

    let score = |params: &[f32]| -> Result<(f64, f64), SimError> {
        let net = load_flat(run.model.init(&device), params)?;
        let net = ready_to_score(net, train, &normalization, &device);
        let e = evaluate(&net, test, &normalization, &device);
        Ok((1.0 - e.accuracy, e.loss))
    };
    let (error, loss) = score(center.params())?;
    let mut points = vec![Point {
        samples: 0,
        time_s: 0.0,
        exchanges: 0,
        error,
        loss,
    }];
    let every = experiment
        .budget_samples
        .div_ceil(u64::from(experiment.evaluations.max(1)))
        .max(1);
    let mut next_eval = every;
    let (mut samples, mut exchanges, mut rejected) = (0u64, 0u64, 0u64);
    let mut per_worker = vec![0u64; p];
    let mut last_applied = 0.0;
    let step_s = |i: usize| timing.step_s / timing.speed(i);
    let mut due: BinaryHeap<Due> = (0..p)
        .map(|i| Due {
            at: f64::from(run.tau) * step_s(i),
            worker: i,
        })
        .collect();
    let mut round: Vec<Waiting> = Vec::new();
    let synchronous = matches!(
        run.algorithm,
        Algorithm::EasgdSync | Algorithm::Average | Algorithm::Diloco
    );

    while samples < experiment.budget_samples {
        let Some(Due { at, worker: i }) = due.pop() else {
            break; // every worker waits on a round that cannot close (not reached)
        };
        let w = &mut workers[i];
        let pending = w
            .local
            .train(run.tau, run.lr, || false)
            .map_err(|source| SimError::Worker { worker: i, source })?;
        let trained = w.local.finish(pending);
        samples += trained.samples;
        let mut applied_at = None;
        if experiment.sequential {
            // Nothing to exchange: the worker trains on, and it is what is scored.
            applied_at = Some(at);
            due.push(Due {
                at: at + f64::from(run.tau) * step_s(i),
                worker: i,
            });
        } else {
            let progress_norm = distance(&trained.params, &w.anchor);
            let values = match run.algorithm {
                Algorithm::Downpour | Algorithm::Mdownpour => trained
                    .params
                    .iter()
                    .zip(&w.anchor)
                    .map(|(x, a)| x - a)
                    .collect(),
                _ => trained.params,
            };
            let update = Update {
                session: i as u64 + 1,
                worker_id: i as u32,
                seen_version: w.seen,
                loss: trained.loss,
                values,
                progress: progress_norm,
                cohort: Cohort::Workers,
                settled: true,
                held: false,
            };
            match center.offer(update, p) {
                Ok(Outcome::Ready(ready)) => {
                    w.local
                        .apply(ready.apply, ready.payload, run.leader_pull(), None)
                        .map_err(|source| SimError::Worker { worker: i, source })?;
                    w.anchor = w.local.params().to_vec();
                    w.seen = ready.version;
                    w.clock = at + timing.exchange_s;
                    exchanges += 1;
                    per_worker[i] += 1;
                    applied_at = Some(at);
                    due.push(Due {
                        at: w.clock + f64::from(run.tau) * step_s(i),
                        worker: i,
                    });
                }
                Ok(Outcome::Queued { reply, .. }) => {
                    round.push(Waiting {
                        worker: i,
                        at,
                        reply,
                    });
                    if round.len() == p {
                        // The round closed with its last member: everyone resumes from
                        // the slowest member's arrival.
                        let closed = round.iter().map(|m| m.at).fold(0.0, f64::max);
                        for mut member in round.drain(..) {
                            let ready = match member.reply.try_recv() {
                                Ok(Ok(ready)) => ready,
                                Ok(Err(why)) => {
                                    return Err(SimError::RoundRefused {
                                        worker: member.worker,
                                        why,
                                    });
                                }
                                Err(_) => {
                                    return Err(SimError::Settings(
                                        "a full round did not close".into(),
                                    ));
                                }
                            };
                            let m = &mut workers[member.worker];
                            m.local
                                .apply(ready.apply, ready.payload, run.leader_pull(), None)
                                .map_err(|source| SimError::Worker {
                                    worker: member.worker,
                                    source,
                                })?;
                            m.anchor = m.local.params().to_vec();
                            m.seen = ready.version;
                            m.clock = closed + timing.exchange_s;
                            exchanges += 1;
                            per_worker[member.worker] += 1;
                            due.push(Due {
                                at: m.clock + f64::from(run.tau) * step_s(member.worker),
                                worker: member.worker,
                            });
                        }
                        applied_at = Some(closed);
                    }
                }
                Err(why) if synchronous => {
                    return Err(SimError::RoundRefused { worker: i, why });
                }
                Err(_) => {
                    // As a real worker does after a refusal: rejoin. Elastic workers keep
                    // their parameters; the others take the center. Either way the
                    // welcome's center becomes the anchor.
                    rejected += 1;
                    let now = center.params().to_vec();
                    if !has_elastic_force(run.algorithm) {
                        w.local
                            .apply(Apply::Replace, now.clone(), 0.0, None)
                            .map_err(|source| SimError::Worker { worker: i, source })?;
                    }
                    w.anchor = now;
                    w.seen = center.version();
                    w.clock = at + timing.exchange_s;
                    due.push(Due {
                        at: w.clock + f64::from(run.tau) * step_s(i),
                        worker: i,
                    });
                }
            }
        }
        progress(samples);
        if let Some(at) = applied_at {
            last_applied = at;
        }
        if let Some(at) = applied_at
            && (samples >= next_eval || samples >= experiment.budget_samples)
        {
            let scored = if experiment.sequential {
                workers[i].local.params()
            } else {
                center.params()
            };
            let (error, loss) = score(scored)?;
            points.push(Point {
                samples,
                time_s: at,
                exchanges,
                error,
                loss,
            });
            next_eval = (samples / every + 1) * every;
        }
    }
    let ended = if experiment.sequential {
        workers[0].local.params().to_vec()
    } else {
        center.params().to_vec()
    };
    // The budget can run out on refused updates: score the center as it ended.
    if points
        .last()
        .is_some_and(|p| p.exchanges < exchanges || p.samples < samples)
    {
        let (error, loss) = score(&ended)?;
        points.push(Point {
            samples,
            time_s: last_applied,
            exchanges,
            error,
            loss,
        });
    }
    Ok(Simulated {
        points,
        exchanges,
        rejected,
        per_worker,
        test_images: test.len(),
        center: ended,
    })
}

#[cfg(test)]
mod tests;
