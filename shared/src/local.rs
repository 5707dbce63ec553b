//! A worker's side of a run, the same for native and browser workers: the model
//! and optimizer a welcome asks for, the shard's batches, τ local steps at a time,
//! and applying the server's replies to xⁱ.
//!
//! Reading results back from the device is split from running the steps
//! ([`LocalWorker::train`] returns a [`Pending`]) because the browser's WebGPU
//! backend can only read asynchronously: natives call [`LocalWorker::finish`],
//! the browser awaits [`LocalWorker::finish_async`].

use std::sync::Arc;

use burn::tensor::{Device, Tensor};
use thiserror::Error;

use crate::algorithms::elastic::apply_difference;
use crate::algorithms::leader::leader_pull;
use crate::data::blocks::BlocksAhead;
use crate::data::{BatchSource, BatchStream, Batcher, Images, shape_text};
use crate::model::{Model, to_flat_async};
use crate::protocol::{Apply, RunSpec, Shard};
use crate::train::{LocalOptimizer, Trainer};

/// Why a session could not start or a reply could not be applied.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum LocalError {
    /// The worker's data is not the run's.
    #[error(
        "the run trains on {expected} images but this worker's data has {found}; use the run's data"
    )]
    DataMismatch {
        /// Images in the run's training set.
        expected: u64,
        /// Images this worker has.
        found: u64,
    },
    /// A shard outside `0..count`, or an empty one.
    #[error("invalid shard {index}/{count}")]
    BadShard {
        /// The shard's index.
        index: u32,
        /// The shard count.
        count: u32,
    },
    /// A center or reply whose length is not the model's.
    #[error("{what} has {found} values, the {model} model has {expected}")]
    WrongLength {
        /// What was wrong ("the center", "the reply").
        what: &'static str,
        /// The model's name.
        model: String,
        /// Its parameter count.
        expected: usize,
        /// Values received.
        found: usize,
    },
    /// The shard's images are not what the run's model takes.
    #[error("the {model} model takes {expected} images but this worker's data holds {found}")]
    WrongImages {
        /// The model's name.
        model: String,
        /// channels×rows×cols the model takes.
        expected: String,
        /// channels×rows×cols of the data.
        found: String,
    },
    /// A label the run's network has no class for.
    #[error(
        "this worker's data holds label {label}, but the {model} model scores {classes} classes"
    )]
    WrongLabel {
        /// The model's name.
        model: String,
        /// Classes the model scores.
        classes: usize,
        /// The label found.
        label: u16,
    },
    /// The run's normalisation has not one entry per channel of the model's input.
    #[error("the run normalises {found} channels but the {model} model takes {expected}")]
    WrongNormalization {
        /// The model's name.
        model: String,
        /// Input channels of the model.
        expected: usize,
        /// Channels in the normalisation.
        found: usize,
    },
    /// The run's batch of the run's network would hold more activations than a
    /// worker gives one step (a server may describe any network; a tab has limits).
    #[error(
        "the {model} model keeps {per_image} values per image; a batch of {batch} needs more than the {limit} a step may hold"
    )]
    StepTooLarge {
        /// The model's name.
        model: String,
        /// Activations of one image.
        per_image: usize,
        /// The run's batch.
        batch: u32,
        /// Most values one step may keep.
        limit: usize,
    },
    /// Training was asked for before a session started.
    #[error("no session started")]
    NotStarted,
}

/// Most activation values one training step may keep (1 GiB of f32), whatever
/// network and batch a server asks for.
pub const MAX_STEP_VALUES: usize = 1 << 28;

/// What τ local steps produced, once read back.
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
}

/// Steps run but not yet read back from the device.
#[derive(Default)]
pub struct Pending {
    loss_sum: Option<Tensor<1>>,
    steps: u32,
    samples: u64,
}

/// The shard a session trains on: the images and which of them are this worker's.
/// Natives with the data hold the whole set and their shard's indices; a browser,
/// or a native without the data, downloads only its shard and trains on all of it
/// (a native whose shard is large reads it from the file it downloaded it to).
#[derive(Clone)]
pub struct ShardData {
    /// The images.
    pub set: Arc<dyn Images>,
    /// Which items of `set` to train on.
    pub indices: Vec<usize>,
}

/// Turns a session's batch stream into the source its steps read: natives hand it
/// to a thread that prepares batches ahead of the steps (`shared` has no threads).
pub type Feeder = Box<dyn Fn(BatchStream) -> Box<dyn BatchSource>>;

/// One worker's model, optimizer and position in its shard.
pub struct LocalWorker {
    device: Device,
    trainer: Option<(Model, LocalOptimizer, Trainer)>,
    /// The session's batches; `None` before a session starts.
    batches: Option<Box<dyn BatchSource>>,
    feeder: Option<Feeder>,
    params: Vec<f32>,
    /// Steps ran since `params` was read back from the device.
    stale: bool,
}

impl LocalWorker {
    /// A worker that will train on `device` (a plain device; autodiff is added),
    /// preparing each batch just before its step.
    pub fn new(device: Device) -> Self {
        Self {
            device,
            trainer: None,
            batches: None,
            feeder: None,
            params: Vec::new(),
            stale: false,
        }
    }

    /// A worker whose sessions read their batches through `feeder`.
    pub fn with_feeder(device: Device, feeder: Feeder) -> Self {
        Self {
            feeder: Some(feeder),
            ..Self::new(device)
        }
    }

    /// Prepares a session from a welcome: the model and optimizer of `spec`, the
    /// batches of `data`, and `center` as xⁱ unless `keep` (an elastic rejoin that
    /// keeps the worker's own parameters). `total_items` is the size of the
    /// training set the shard was cut from.
    pub fn start(
        &mut self,
        spec: &RunSpec,
        shard: Shard,
        data: ShardData,
        total_items: u64,
        center: Vec<f32>,
        keep: bool,
    ) -> Result<(), LocalError> {
        if spec.train_items != total_items {
            return Err(LocalError::DataMismatch {
                expected: spec.train_items,
                found: total_items,
            });
        }
        if shard.count == 0 || shard.index >= shard.count || data.indices.is_empty() {
            return Err(LocalError::BadShard {
                index: shard.index,
                count: shard.count,
            });
        }
        let shape = spec.model.data_shape();
        if data.set.dims() != shape {
            return Err(LocalError::WrongImages {
                model: spec.model.name().to_owned(),
                expected: shape_text(shape),
                found: shape_text(data.set.dims()),
            });
        }
        if let Some(&i) = data.indices.iter().find(|&&i| i >= data.set.count()) {
            return Err(LocalError::WrongImages {
                model: spec.model.name().to_owned(),
                expected: format!("items below {}", data.set.count()),
                found: format!("item {i}"),
            });
        }
        let per_image = spec.model.spec().tally.activations;
        if per_image.saturating_mul(spec.batch as usize) > MAX_STEP_VALUES {
            return Err(LocalError::StepTooLarge {
                model: spec.model.name().to_owned(),
                per_image,
                batch: spec.batch,
                limit: MAX_STEP_VALUES,
            });
        }
        let classes = spec.model.classes();
        let labels = data.indices.iter().map(|&i| data.set.label(i));
        if let Some(label) = labels.into_iter().find(|&l| usize::from(l) >= classes) {
            return Err(LocalError::WrongLabel {
                model: spec.model.name().to_owned(),
                classes,
                label,
            });
        }
        if spec.normalization.channels.len() != shape[0] {
            return Err(LocalError::WrongNormalization {
                model: spec.model.name().to_owned(),
                expected: shape[0],
                found: spec.normalization.channels.len(),
            });
        }
        let expected = spec.model.param_count();
        if center.len() != expected {
            return Err(LocalError::WrongLength {
                what: "the center",
                model: spec.model.name().to_owned(),
                expected,
                found: center.len(),
            });
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
                spec.model.clone(),
                optimizer,
                Trainer::new(&spec.model, optimizer, &self.device),
            ));
        }
        let (_, _, trainer) = self.trainer.as_mut().expect("set above");
        if !(keep && reuse) {
            // Starting again from the center: the last session's momentum (that of
            // a refused, maybe diverging, point) must not carry into the new one.
            trainer.reset_optimizer();
            trainer
                .set_params(&center)
                .expect("length checked against the model above");
            self.params = center;
        } else if self.stale {
            self.params = trainer.params();
        }
        self.stale = false;
        // Seeded by shard, so two workers on different shards shuffle differently.
        let seed = shard.seed ^ u64::from(shard.index).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        trainer.seed_dropout(seed);
        let batcher = Batcher::new(data.indices, spec.batch as usize, seed, &spec.normalization)
            .with_input(spec.model.input_shape())
            .with_flip(spec.model.spec().flip)
            .with_blocks(data.set.block());
        // The old session's source (and a feeder's thread) ends before the new one starts.
        self.batches = None;
        let stream = BatchStream::new(batcher, data.set, 0);
        self.batches = Some(match &self.feeder {
            Some(feed) => feed(stream),
            None => Box::new(stream),
        });
        Ok(())
    }

    /// The blocks a set read a block at a time must hold before the next step
    /// (see [`BatchSource::blocks_ahead`]); `None` before a session or for a set
    /// held whole.
    pub fn blocks_ahead(&self) -> Option<BlocksAhead> {
        self.batches.as_ref()?.blocks_ahead()
    }

    /// Runs up to `steps` local steps at learning rate `lr`, checking `stop` before
    /// each. Nothing is read back from the device here.
    pub fn train(
        &mut self,
        steps: u32,
        lr: f64,
        stop: impl FnMut() -> bool,
    ) -> Result<Pending, LocalError> {
        let mut pending = Pending::default();
        self.train_into(&mut pending, steps, lr, stop)?;
        Ok(pending)
    }

    /// [`Self::train`], adding to steps already pending (the browser runs a few
    /// steps at a time so its Web Worker can answer messages in between).
    pub fn train_into(
        &mut self,
        pending: &mut Pending,
        steps: u32,
        lr: f64,
        mut stop: impl FnMut() -> bool,
    ) -> Result<(), LocalError> {
        let (Some((_, _, trainer)), Some(batches)) = (self.trainer.as_mut(), self.batches.as_mut())
        else {
            return Err(LocalError::NotStarted);
        };
        trainer.set_lr(lr);
        let mut done = 0;
        while done < steps && !stop() {
            let batch = batches.next_batch();
            let samples = batch.len() as u64;
            let loss = trainer.step(batch);
            pending.loss_sum = Some(match pending.loss_sum.take() {
                Some(sum) => sum + loss,
                None => loss,
            });
            done += 1;
            self.stale = true;
            pending.steps += 1;
            pending.samples += samples;
        }
        Ok(())
    }

    /// Reads the loss and xⁱ back (blocking: native backends).
    pub fn finish(&mut self, pending: Pending) -> Trained {
        let loss = pending
            .loss_sum
            .map_or(f32::NAN, |s| s.into_scalar::<f32>() / pending.steps as f32);
        if let Some((_, _, trainer)) = &self.trainer {
            self.params = trainer.params();
        }
        self.stale = false;
        self.trained(pending.steps, pending.samples, loss)
    }

    /// Reads the loss and xⁱ back without blocking (the browser's WebGPU backend).
    pub async fn finish_async(&mut self, pending: Pending) -> Trained {
        let loss = match pending.loss_sum {
            Some(s) => match s.into_scalar_async::<f32>().await {
                Ok(v) => v / pending.steps as f32,
                Err(_) => f32::NAN,
            },
            None => f32::NAN,
        };
        if let Some((_, _, trainer)) = &self.trainer {
            self.params = to_flat_async(trainer.net()).await;
        }
        self.stale = false;
        self.trained(pending.steps, pending.samples, loss)
    }

    fn trained(&self, steps: u32, samples: u64, loss: f32) -> Trained {
        Trained {
            params: self.params.clone(),
            steps,
            samples,
            loss,
        }
    }

    /// The parameters as last read back or set (current unless steps ran since).
    pub fn params(&self) -> &[f32] {
        &self.params
    }

    /// Applies a reply's payload to xⁱ (`lambda`: LSGD's leader pull).
    ///
    /// `sent` is the xⁱ the answered sync carried, when local steps may have run
    /// since (an overlapped sync): the reply then acts on the current parameters —
    /// read back from the device first (blocking: native backends only) — and a
    /// replacement keeps the steps taken meanwhile, xⁱ ← payload + (xⁱ − sent), so
    /// DOWNPOUR's next push still carries them.
    pub fn apply(
        &mut self,
        apply: Apply,
        payload: Vec<f32>,
        lambda: f32,
        sent: Option<&[f32]>,
    ) -> Result<(), LocalError> {
        let Some((kind, _, trainer)) = self.trainer.as_mut() else {
            return Err(LocalError::NotStarted);
        };
        if payload.len() != self.params.len() {
            return Err(LocalError::WrongLength {
                what: "the reply",
                model: kind.name().to_owned(),
                expected: self.params.len(),
                found: payload.len(),
            });
        }
        if self.stale {
            self.params = trainer.params();
            self.stale = false;
        }
        apply_reply(&mut self.params, apply, &payload, lambda, sent);
        trainer
            .set_params(&self.params)
            .expect("length checked against the model above");
        Ok(())
    }
}

/// Applies a reply's `payload` to the parameters `x` it answers, as `apply` says:
/// subtract the elastic difference, take the new center (keeping the change made
/// since `sent`, the parameters the sync carried, when given), or pull toward the
/// leader by `lambda`. Workers apply replies to xⁱ with it; a relay applies its
/// upstream's replies to its own center with it.
///
/// # Panics
/// If `payload` and `x` differ in length (checked where replies enter).
pub fn apply_reply(
    x: &mut [f32],
    apply: Apply,
    payload: &[f32],
    lambda: f32,
    sent: Option<&[f32]>,
) {
    assert_eq!(
        x.len(),
        payload.len(),
        "reply and parameters differ in length"
    );
    match (apply, sent) {
        (Apply::Subtract, _) => apply_difference(x, payload),
        (Apply::Replace, Some(sent)) if sent.len() == payload.len() => {
            for ((x, v), s) in x.iter_mut().zip(payload).zip(sent) {
                *x = v + (*x - s);
            }
        }
        (Apply::Replace, _) => x.copy_from_slice(payload),
        (Apply::PullToward, _) => leader_pull(x, payload, lambda),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algorithms::Algorithm;
    use crate::data::{ImageSet, Normalization};
    use crate::protocol::Hyper;

    fn spec(model: Model, batch: u32, set: &ImageSet) -> RunSpec {
        RunSpec {
            run_id: "t".into(),
            algorithm: Algorithm::Easgd,
            model,
            hyper: Hyper {
                tau: 1,
                alpha: 0.1,
                lr: 0.01,
            },
            momentum: 0.0,
            nesterov: false,
            weight_decay: 0.0,
            batch,
            leader_pull: 0.0,
            normalization: Normalization::of(set),
            train_items: set.len() as u64,
        }
    }

    fn start(spec: &RunSpec, set: ImageSet) -> Result<(), LocalError> {
        let n = set.len();
        let data = ShardData {
            set: Arc::new(set),
            indices: (0..n).collect(),
        };
        let shard = Shard {
            index: 0,
            count: 1,
            seed: 0,
        };
        let center = spec.model.seeded_params(0);
        LocalWorker::new(Device::flex()).start(spec, shard, data, n as u64, center, false)
    }

    fn images(labels: Vec<u16>) -> ImageSet {
        ImageSet {
            source: "t".into(),
            channels: 1,
            rows: 28,
            cols: 28,
            pixels: vec![7; labels.len() * 784],
            labels,
        }
    }

    #[test]
    fn a_session_refuses_what_a_described_network_cannot_take() {
        let small = Model::small();
        assert!(
            start(
                &spec(small.clone(), 4, &images(vec![1, 9])),
                images(vec![1, 9])
            )
            .is_ok()
        );
        // A label past the network's classes.
        let err = start(
            &spec(small.clone(), 4, &images(vec![1, 12])),
            images(vec![1, 12]),
        );
        assert!(
            matches!(
                err,
                Err(LocalError::WrongLabel {
                    label: 12,
                    classes: 10,
                    ..
                })
            ),
            "{err:?}"
        );
        // A batch whose activations pass what one step may hold.
        let per_image = small.spec().tally.activations;
        let batch = (MAX_STEP_VALUES / per_image + 1) as u32;
        let err = start(&spec(small, batch, &images(vec![1])), images(vec![1]));
        assert!(
            matches!(err, Err(LocalError::StepTooLarge { .. })),
            "{err:?}"
        );
    }

    /// A worker that starts again from the center (a refused update, a lost
    /// connection without its own point kept) steps exactly as a new worker does:
    /// the momentum of the session before does not carry over.
    #[test]
    fn starting_again_from_the_center_forgets_the_momentum() {
        let set = images((0..8).map(|i| i % 10).collect());
        let mut run = spec(Model::small(), 4, &set);
        run.momentum = 0.9;
        let shard = Shard {
            index: 0,
            count: 1,
            seed: 0,
        };
        let data = ShardData {
            indices: (0..set.len()).collect(),
            set: Arc::new(set),
        };
        let center = run.model.seeded_params(0);
        let first_steps = |worker: &mut LocalWorker| {
            worker
                .start(&run, shard, data.clone(), 8, center.clone(), false)
                .unwrap();
            let pending = worker.train(3, 0.01, || false).unwrap();
            worker.finish(pending).params
        };
        let mut used = LocalWorker::new(Device::flex());
        first_steps(&mut used);
        let mut fresh = LocalWorker::new(Device::flex());
        assert_eq!(first_steps(&mut used), first_steps(&mut fresh));
    }
}
