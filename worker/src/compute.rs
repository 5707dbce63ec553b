//! The worker's compute thread: owns the [`LocalWorker`] (Burn trainer and shard), runs
//! τ local steps at a time and applies the server's replies to the parameters. The network
//! side talks to it through [`Compute`], so the socket stays responsive (heartbeats,
//! stop messages, replies to an overlapped sync) while a step runs.
//!
//! A reply that arrives while steps run is left in a mailbox that the thread checks
//! before every step: it is applied to the parameters of that moment (see
//! `LocalWorker::apply`). If the steps end first, the network side takes it back and
//! applies it with [`Compute::apply`]. Batches are prepared ahead on a thread of
//! their own ([`crate::prefetch`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Instant;

use burn::tensor::Device;
use tether_shared::local::{LocalWorker, Pending, ShardData, Trained};
use tether_shared::protocol::{Apply, RunSpec, Shard};
use tokio::sync::oneshot;

use crate::prefetch::Prefetch;

/// What τ local steps produced, and the seconds they took (read-back included).
pub type Timed = (Trained, f64);

/// A reply to apply: how, the values, LSGD's λ, and the parameters the answered sync
/// carried (for a reply that lands after more steps ran).
pub struct Reply {
    /// How to apply `values`.
    pub apply: Apply,
    /// The difference, new parameters or leader's parameters.
    pub values: Vec<f32>,
    /// LSGD's pull toward the leader.
    pub lambda: f32,
    /// xⁱ as sent in the sync this answers.
    pub sent: Vec<f32>,
}

/// Where a reply waits for the compute thread while steps run.
pub type Mailbox = Arc<Mutex<Option<Reply>>>;

enum Job {
    Start {
        spec: Box<RunSpec>,
        shard: Shard,
        data: ShardData,
        center: Vec<f32>,
        keep: bool,
        done: oneshot::Sender<Result<(), String>>,
    },
    Train {
        steps: u32,
        lr: f64,
        stop: Arc<AtomicBool>,
        mailbox: Mailbox,
        done: oneshot::Sender<Timed>,
    },
    Apply {
        reply: Reply,
        done: oneshot::Sender<Result<Vec<f32>, String>>,
    },
}

/// Handle to the compute thread; dropping it ends the thread.
pub struct Compute {
    jobs: mpsc::Sender<Job>,
}

impl Compute {
    /// Starts the thread on `device`.
    pub fn spawn(device: Device) -> Self {
        let (jobs, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("tether-compute".into())
            .spawn(move || {
                let mut worker = LocalWorker::with_feeder(device, Prefetch::feeder());
                while let Ok(job) = rx.recv() {
                    run(&mut worker, job);
                }
            })
            .expect("spawn the compute thread");
        Self { jobs }
    }

    /// Prepares a session: the model and optimizer of `spec`, the batches of `data`
    /// (this worker's shard), and the center as parameters unless `keep` (a rejoin
    /// that keeps xⁱ).
    pub async fn start(
        &self,
        spec: RunSpec,
        shard: Shard,
        data: ShardData,
        center: Vec<f32>,
        keep: bool,
    ) -> Result<(), String> {
        let (done, rx) = oneshot::channel();
        self.send(Job::Start {
            spec: Box::new(spec),
            shard,
            data,
            center,
            keep,
            done,
        });
        rx.await.map_err(|_| "compute thread ended".to_string())?
    }

    /// Runs `steps` local steps at learning rate `lr` (fewer if `stop` is raised),
    /// applying a reply put in `mailbox` meanwhile before the next step.
    pub async fn train(
        &self,
        steps: u32,
        lr: f64,
        stop: Arc<AtomicBool>,
        mailbox: Mailbox,
    ) -> Result<Timed, String> {
        let (done, rx) = oneshot::channel();
        self.send(Job::Train {
            steps,
            lr,
            stop,
            mailbox,
            done,
        });
        rx.await.map_err(|_| "compute thread ended".to_string())
    }

    /// Applies a reply to the parameters; returns them as they are now.
    pub async fn apply(&self, reply: Reply) -> Result<Vec<f32>, String> {
        let (done, rx) = oneshot::channel();
        self.send(Job::Apply { reply, done });
        rx.await.map_err(|_| "compute thread ended".to_string())?
    }

    fn send(&self, job: Job) {
        // If the thread died its receiver is gone; the caller sees the closed oneshot.
        let _ = self.jobs.send(job);
    }
}

fn run(worker: &mut LocalWorker, job: Job) {
    match job {
        Job::Start {
            spec,
            shard,
            data,
            center,
            keep,
            done,
        } => {
            let total = spec.train_items;
            let started = worker
                .start(&spec, shard, data, total, center, keep)
                .map_err(|e| e.to_string());
            let _ = done.send(started);
        }
        Job::Train {
            steps,
            lr,
            stop,
            mailbox,
            done,
        } => {
            let t0 = Instant::now();
            let mut pending = Pending::default();
            for _ in 0..steps {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let arrived = mailbox.lock().unwrap_or_else(|e| e.into_inner()).take();
                if let Some(reply) = arrived {
                    // A bad reply was checked for length by the link; log and go on.
                    if let Err(e) = apply(worker, reply) {
                        tracing::warn!("could not apply a reply: {e}");
                    }
                }
                worker
                    .train_into(&mut pending, 1, lr, || false)
                    .expect("started before training");
            }
            // One read per τ steps: it waits for the device once, not every step.
            let trained = worker.finish(pending);
            let _ = done.send((trained, t0.elapsed().as_secs_f64()));
        }
        Job::Apply { reply, done } => {
            let _ = done.send(apply(worker, reply).map(|()| worker.params().to_vec()));
        }
    }
}

fn apply(worker: &mut LocalWorker, reply: Reply) -> Result<(), String> {
    worker
        .apply(reply.apply, reply.values, reply.lambda, Some(&reply.sent))
        .map_err(|e| e.to_string())
}
