//! The worker's compute thread: owns the [`LocalWorker`] (Burn trainer and shard), runs
//! τ local steps at a time and applies the server's replies to the parameters. The network
//! side talks to it through [`Compute`], so the socket stays responsive (heartbeats,
//! stop messages) while a step runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use burn::tensor::Device;
use tether_shared::data::{ImageSet, shard_indices};
use tether_shared::local::{LocalWorker, ShardData, Trained};
use tether_shared::protocol::{Apply, RunSpec, Shard};
use tokio::sync::oneshot;

/// What τ local steps produced, and the seconds they took (read-back included).
pub type Timed = (Trained, f64);

enum Job {
    Start {
        spec: Box<RunSpec>,
        shard: Shard,
        center: Vec<f32>,
        keep: bool,
        done: oneshot::Sender<Result<(), String>>,
    },
    Train {
        steps: u32,
        lr: f64,
        stop: Arc<AtomicBool>,
        done: oneshot::Sender<Timed>,
    },
    Apply {
        apply: Apply,
        payload: Vec<f32>,
        lambda: f32,
        done: oneshot::Sender<Result<(), String>>,
    },
}

/// Handle to the compute thread; dropping it ends the thread.
pub struct Compute {
    jobs: mpsc::Sender<Job>,
}

/// The compute thread's state.
struct Local {
    train: Arc<ImageSet>,
    worker: LocalWorker,
}

impl Compute {
    /// Starts the thread with a device and the training set.
    pub fn spawn(device: Device, train: Arc<ImageSet>) -> Self {
        let (jobs, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("tether-compute".into())
            .spawn(move || {
                let mut local = Local {
                    train,
                    worker: LocalWorker::new(device),
                };
                while let Ok(job) = rx.recv() {
                    local.run(job);
                }
            })
            .expect("spawn the compute thread");
        Self { jobs }
    }

    /// Prepares a session: the model and optimizer of `spec`, the batches of `shard`,
    /// and the center as parameters unless `keep` (a rejoin that keeps xⁱ).
    pub async fn start(
        &self,
        spec: RunSpec,
        shard: Shard,
        center: Vec<f32>,
        keep: bool,
    ) -> Result<(), String> {
        let (done, rx) = oneshot::channel();
        self.send(Job::Start {
            spec: Box::new(spec),
            shard,
            center,
            keep,
            done,
        });
        rx.await.map_err(|_| "compute thread ended".to_string())?
    }

    /// Runs `steps` local steps at learning rate `lr` (fewer if `stop` is raised).
    pub async fn train(&self, steps: u32, lr: f64, stop: Arc<AtomicBool>) -> Result<Timed, String> {
        let (done, rx) = oneshot::channel();
        self.send(Job::Train {
            steps,
            lr,
            stop,
            done,
        });
        rx.await.map_err(|_| "compute thread ended".to_string())
    }

    /// Applies a reply's payload to the parameters.
    pub async fn apply(&self, apply: Apply, payload: Vec<f32>, lambda: f32) -> Result<(), String> {
        let (done, rx) = oneshot::channel();
        self.send(Job::Apply {
            apply,
            payload,
            lambda,
            done,
        });
        rx.await.map_err(|_| "compute thread ended".to_string())?
    }

    fn send(&self, job: Job) {
        // If the thread died its receiver is gone; the caller sees the closed oneshot.
        let _ = self.jobs.send(job);
    }
}

impl Local {
    fn run(&mut self, job: Job) {
        match job {
            Job::Start {
                spec,
                shard,
                center,
                keep,
                done,
            } => {
                let _ = done.send(self.start(&spec, shard, center, keep));
            }
            Job::Train {
                steps,
                lr,
                stop,
                done,
            } => {
                let _ = done.send(self.train(steps, lr, &stop));
            }
            Job::Apply {
                apply,
                payload,
                lambda,
                done,
            } => {
                let _ = done.send(self.apply(apply, payload, lambda));
            }
        }
    }

    fn start(
        &mut self,
        spec: &RunSpec,
        shard: Shard,
        center: Vec<f32>,
        keep: bool,
    ) -> Result<(), String> {
        let n = self.train.len();
        if shard.count == 0 || shard.index >= shard.count {
            return Err(format!("invalid shard {}/{}", shard.index, shard.count));
        }
        let data = ShardData {
            set: self.train.clone(),
            indices: shard_indices(n, shard.count as usize, shard.index as usize, shard.seed),
        };
        self.worker
            .start(spec, shard, data, n as u64, center, keep)
            .map_err(|e| e.to_string())
    }

    fn train(&mut self, steps: u32, lr: f64, stop: &AtomicBool) -> Timed {
        let t0 = Instant::now();
        let pending = self
            .worker
            .train(steps, lr, || stop.load(Ordering::Relaxed))
            .expect("started before training");
        // One read per τ steps: it waits for the device once, not every step.
        let trained = self.worker.finish(pending);
        (trained, t0.elapsed().as_secs_f64())
    }

    fn apply(&mut self, apply: Apply, payload: Vec<f32>, lambda: f32) -> Result<(), String> {
        self.worker
            .apply(apply, payload, lambda)
            .map_err(|e| e.to_string())
    }
}
