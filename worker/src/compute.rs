//! The worker's compute thread: owns the Burn trainer and the shard, runs τ local
//! steps at a time and applies the server's replies to the parameters. The network
//! side talks to it through [`Compute`], so the socket stays responsive (heartbeats,
//! stop messages) while a step runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use burn::tensor::{Device, Tensor};
use tether_shared::algorithms::elastic::apply_difference;
use tether_shared::algorithms::leader::leader_pull;
use tether_shared::data::{Batcher, ImageSet, shard_indices};
use tether_shared::model::ModelKind;
use tether_shared::protocol::{Apply, RunSpec, Shard};
use tether_shared::train::{LocalOptimizer, Trainer};
use tokio::sync::oneshot;

/// What τ local steps produced.
#[derive(Clone, Debug)]
pub struct Trained {
    /// The parameters after the steps (xⁱ).
    pub params: Vec<f32>,
    /// Steps actually run (fewer when stopped early).
    pub steps: u32,
    /// Images processed.
    pub samples: u64,
    /// Mean training loss over the steps (NaN when no step ran).
    pub loss: f32,
    /// Seconds the steps took.
    pub seconds: f64,
}

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
        done: oneshot::Sender<Trained>,
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
    device: Device,
    train: Arc<ImageSet>,
    trainer: Option<(ModelKind, LocalOptimizer, Trainer)>,
    batcher: Option<Batcher>,
    order: Vec<usize>,
    cursor: usize,
    epoch: u64,
    batch: usize,
    params: Vec<f32>,
    images: Vec<f32>,
    labels: Vec<i64>,
}

impl Compute {
    /// Starts the thread with a device and the training set.
    pub fn spawn(device: Device, train: Arc<ImageSet>) -> Self {
        let (jobs, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("tether-compute".into())
            .spawn(move || {
                let mut local = Local {
                    device,
                    train,
                    trainer: None,
                    batcher: None,
                    order: Vec::new(),
                    cursor: 0,
                    epoch: 0,
                    batch: 1,
                    params: Vec::new(),
                    images: Vec::new(),
                    labels: Vec::new(),
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
    pub async fn train(
        &self,
        steps: u32,
        lr: f64,
        stop: Arc<AtomicBool>,
    ) -> Result<Trained, String> {
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
        if spec.train_items != n as u64 {
            return Err(format!(
                "the run trains on {} images but this worker's data has {n}; pass the run's data with --data",
                spec.train_items
            ));
        }
        if shard.count == 0 || shard.index >= shard.count {
            return Err(format!("invalid shard {}/{}", shard.index, shard.count));
        }
        if center.len() != spec.model.param_count() {
            return Err(format!(
                "the center has {} values, the {} model has {}",
                center.len(),
                spec.model.name(),
                spec.model.param_count()
            ));
        }
        let optimizer = LocalOptimizer {
            lr: spec.hyper.lr,
            momentum: spec.momentum,
            nesterov: spec.nesterov,
            weight_decay: spec.weight_decay,
        };
        let reuse = matches!(&self.trainer, Some((m, o, _)) if *m == spec.model && *o == optimizer);
        if !reuse {
            self.trainer = Some((
                spec.model,
                optimizer,
                Trainer::new(spec.model, optimizer, &self.device),
            ));
        }
        let (_, _, trainer) = self.trainer.as_mut().expect("set above");
        if !(keep && reuse) {
            trainer.set_params(&center).map_err(|e| e.to_string())?;
            self.params = center;
        }
        let indices = shard_indices(n, shard.count as usize, shard.index as usize, shard.seed);
        let seed = shard.seed ^ u64::from(shard.index).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let batcher = Batcher::new(indices, spec.batch as usize, seed, spec.normalization);
        self.batch = spec.batch as usize;
        self.order = batcher.epoch_order(0);
        self.cursor = 0;
        self.epoch = 0;
        self.batcher = Some(batcher);
        Ok(())
    }

    fn train(&mut self, steps: u32, lr: f64, stop: &AtomicBool) -> Trained {
        let t0 = Instant::now();
        let (_, _, trainer) = self.trainer.as_mut().expect("started before training");
        let batcher = self.batcher.as_ref().expect("started before training");
        trainer.set_lr(lr);
        let mut loss_sum: Option<Tensor<1>> = None;
        let (mut done, mut samples) = (0u32, 0u64);
        while done < steps && !stop.load(Ordering::Relaxed) {
            if self.cursor >= self.order.len() {
                self.epoch += 1;
                self.order = batcher.epoch_order(self.epoch);
                self.cursor = 0;
            }
            let end = (self.cursor + self.batch).min(self.order.len());
            let items = &self.order[self.cursor..end];
            self.cursor = end;
            batcher.fill(&self.train, items, &mut self.images, &mut self.labels);
            let loss = trainer.step(&self.images, &self.labels);
            loss_sum = Some(match loss_sum {
                Some(s) => s + loss,
                None => loss,
            });
            done += 1;
            samples += items.len() as u64;
        }
        // One read per τ steps: it waits for the device once, not every step.
        let loss = loss_sum.map_or(f32::NAN, |s| s.into_scalar::<f32>() / done as f32);
        self.params = trainer.params();
        Trained {
            params: self.params.clone(),
            steps: done,
            samples,
            loss,
            seconds: t0.elapsed().as_secs_f64(),
        }
    }

    fn apply(&mut self, apply: Apply, payload: Vec<f32>, lambda: f32) -> Result<(), String> {
        if payload.len() != self.params.len() {
            return Err(format!(
                "reply has {} values, the model has {}",
                payload.len(),
                self.params.len()
            ));
        }
        match apply {
            Apply::Subtract => apply_difference(&mut self.params, &payload),
            Apply::Replace => self.params = payload,
            Apply::PullToward => leader_pull(&mut self.params, &payload, lambda),
        }
        let (_, _, trainer) = self.trainer.as_mut().expect("started before applying");
        trainer.set_params(&self.params).map_err(|e| e.to_string())
    }
}
