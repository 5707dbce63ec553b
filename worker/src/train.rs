//! `tether train`: the single-node trainer, the baseline every distributed run is
//! compared with. An explicit loop over epochs and batches with a progress bar,
//! test accuracy after every epoch, and a JSON-serialisable report. Batches are
//! prepared ahead on their own thread, so a GPU never waits for the next one.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use burn::tensor::Tensor;
use serde::Serialize;
use tether_shared::data::{BatchSource, BatchStream, Batcher, Normalization};
use tether_shared::model::Model;
use tether_shared::train::{LocalOptimizer, Trainer};
use thiserror::Error;

use crate::backend::{self, BackendChoice, BackendError};
use crate::prefetch::Prefetch;
use crate::progress;
use tether_dataset::{self as dataset, LoadError};

/// Settings of a single-node training run.
#[derive(Clone, Debug, Serialize)]
pub struct TrainConfig {
    /// Which network.
    pub model: Model,
    /// Passes over the training set.
    pub epochs: usize,
    /// Images per step.
    pub batch: usize,
    /// Learning rate, momentum, Nesterov, weight decay.
    pub optimizer: LocalOptimizer,
    /// Seeds initialisation and shuffling.
    pub seed: u64,
    /// IDX data directory; `None` for the shipped Fashion-MNIST.
    pub data: Option<PathBuf>,
    /// Compute device.
    pub backend: BackendChoice,
    /// CPU threads (`None`: one per core).
    pub threads: Option<usize>,
    /// Train on only the first N training images (quick checks).
    pub train_limit: Option<usize>,
    /// Evaluate on only the first N test images.
    pub test_limit: Option<usize>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            model: Model::small(),
            epochs: 3,
            batch: 128,
            optimizer: LocalOptimizer::default(),
            seed: 0,
            data: None,
            backend: BackendChoice::Auto,
            threads: None,
            train_limit: None,
            test_limit: None,
        }
    }
}

/// Why a training run could not start.
#[derive(Debug, Error)]
pub enum TrainError {
    /// A setting is out of range.
    #[error("invalid setting: {0}")]
    Config(String),
    /// No usable device.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The data could not be loaded.
    #[error(transparent)]
    Data(#[from] LoadError),
}

impl TrainConfig {
    /// Checks every setting, so a bad flag fails before any work starts.
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |m: String| Err(TrainError::Config(m));
        let o = &self.optimizer;
        if self.epochs == 0 {
            return bad("--epochs must be at least 1".into());
        }
        if self.batch == 0 {
            return bad("--batch must be at least 1".into());
        }
        if !(o.lr.is_finite() && o.lr > 0.0) {
            return bad(format!("--lr must be a positive number, got {}", o.lr));
        }
        if !(0.0..1.0).contains(&o.momentum) {
            return bad(format!("--momentum must be in [0, 1), got {}", o.momentum));
        }
        if !(o.weight_decay.is_finite() && o.weight_decay >= 0.0) {
            return bad(format!(
                "--weight-decay must be ≥ 0, got {}",
                o.weight_decay
            ));
        }
        if o.nesterov && o.momentum == 0.0 {
            return bad("--nesterov needs --momentum > 0".into());
        }
        if self.threads == Some(0) {
            return bad("--threads must be at least 1".into());
        }
        if self.train_limit == Some(0) || self.test_limit == Some(0) {
            return bad("--train-limit / --test-limit must be at least 1".into());
        }
        Ok(())
    }
}

/// Figures of one epoch.
#[derive(Clone, Debug, Serialize)]
pub struct EpochReport {
    /// 1-based epoch number.
    pub epoch: usize,
    /// Mean training loss over the epoch.
    pub train_loss: f64,
    /// Test accuracy after the epoch, 0..1.
    pub test_accuracy: f64,
    /// Test loss after the epoch.
    pub test_loss: f64,
    /// Seconds spent training (excludes evaluation).
    pub train_seconds: f64,
    /// Seconds spent evaluating.
    pub eval_seconds: f64,
    /// Training samples per second.
    pub samples_per_s: f64,
}

/// What `tether train --report` writes.
#[derive(Clone, Debug, Serialize)]
pub struct TrainReport {
    /// Always "train".
    pub command: &'static str,
    /// The settings used.
    pub settings: TrainConfig,
    /// The data directory used.
    pub data_dir: PathBuf,
    /// "cpu" or "wgpu".
    pub backend: &'static str,
    /// The device, in words.
    pub device: String,
    /// Trainable parameters.
    pub params: usize,
    /// Training images used.
    pub train_samples: usize,
    /// Test images used.
    pub test_samples: usize,
    /// One entry per epoch.
    pub epochs: Vec<EpochReport>,
    /// Final test accuracy, 0..1.
    pub test_accuracy: f64,
    /// Whole run, seconds.
    pub wall_seconds: f64,
    /// Training samples per second over all epochs (evaluation excluded).
    pub samples_per_s: f64,
}

/// Trains on one machine as configured and reports per-epoch figures.
pub fn run(config: &TrainConfig) -> Result<TrainReport, TrainError> {
    config.validate()?;
    let started = Instant::now();
    let selected = backend::select(config.backend, config.threads)?;
    let shape = Some(config.model.data_shape());
    let (data_dir, mut data) = dataset::load_for(config.data.as_deref(), shape)?;
    for set in [&data.train, &data.test] {
        set.expect_network(&config.model).map_err(LoadError::from)?;
    }
    if let Some(n) = config.test_limit {
        data.test = data
            .test
            .subset(&(0..n.min(data.test.len())).collect::<Vec<_>>());
    }
    let norm = Normalization::of(&data.train);
    let train_n = config
        .train_limit
        .map_or(data.train.len(), |n| n.min(data.train.len()));
    tracing::info!(device = %selected.description, data = %data_dir.display(), train_n, "training");

    let mut trainer = Trainer::new(&config.model, config.optimizer, &selected.device);
    trainer
        .set_params(&config.model.seeded_params(config.seed))
        .expect("seeded parameters fit their network");
    trainer.seed_dropout(config.seed);
    let batcher = Batcher::new((0..train_n).collect(), config.batch, config.seed, &norm)
        .with_input(config.model.input_shape())
        .with_flip(config.model.spec().flip);
    let steps = batcher.batches_per_epoch();
    // Epoch e trains on the shuffle of epoch e; a thread prepares batches ahead.
    let train = Arc::new(data.train);
    let mut batches = Prefetch::spawn(BatchStream::new(batcher, train.clone(), 1));
    let mut epochs = Vec::with_capacity(config.epochs);
    let mut train_seconds_total = 0.0;
    for epoch in 1..=config.epochs {
        let bar = progress::bar(steps as u64, &format!("epoch {epoch}/{}", config.epochs));
        let t0 = Instant::now();
        // Losses are summed on the device and read back only every READ_EVERY steps:
        // a read waits for the device, which on a GPU would stall every step.
        const READ_EVERY: usize = 10;
        let mut loss_sum = 0.0f64;
        let mut pending: Option<Tensor<1>> = None;
        for step in 0..steps {
            let batch = batches.next_batch();
            let images = batch.len() as f64;
            let weighted = trainer.step(batch).mul_scalar(images);
            pending = Some(match pending {
                Some(p) => p + weighted,
                None => weighted,
            });
            bar.inc(1);
            if step % READ_EVERY == READ_EVERY - 1 || step + 1 == steps {
                let read: f32 = pending.take().map_or(0.0, |p| p.into_scalar());
                loss_sum += f64::from(read);
                let seen = ((step + 1) * config.batch).min(train_n);
                bar.set_message(format!(
                    "loss {:.4}  {:.0} samples/s",
                    loss_sum / seen as f64,
                    seen as f64 / t0.elapsed().as_secs_f64()
                ));
            }
        }
        let train_seconds = t0.elapsed().as_secs_f64();
        train_seconds_total += train_seconds;
        bar.finish_and_clear();
        let t1 = Instant::now();
        let eval = trainer.evaluate(&data.test, &train, &norm);
        let report = EpochReport {
            epoch,
            train_loss: loss_sum / train_n as f64,
            test_accuracy: eval.accuracy,
            test_loss: eval.loss,
            train_seconds,
            eval_seconds: t1.elapsed().as_secs_f64(),
            samples_per_s: train_n as f64 / train_seconds,
        };
        tracing::info!(
            epoch,
            train_loss = format!("{:.4}", report.train_loss),
            test_accuracy = format!("{:.2}%", report.test_accuracy * 100.0),
            train_s = format!("{:.1}", report.train_seconds),
            samples_per_s = format!("{:.0}", report.samples_per_s),
            "epoch done"
        );
        epochs.push(report);
    }
    let test_accuracy = epochs.last().map_or(0.0, |e| e.test_accuracy);
    Ok(TrainReport {
        command: "train",
        settings: config.clone(),
        data_dir,
        backend: selected.backend,
        device: selected.description,
        params: config.model.param_count(),
        train_samples: train_n,
        test_samples: data.test.len(),
        epochs,
        test_accuracy,
        wall_seconds: started.elapsed().as_secs_f64(),
        samples_per_s: (train_n * config.epochs) as f64 / train_seconds_total,
    })
}
