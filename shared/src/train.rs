//! One local training step and evaluation, the same for every kind of worker.
//!
//! The explicit Burn loop: forward, cross-entropy, `backward`, `GradientsParams`,
//! `optim.step`. Parameters stay on the device between steps; the flat view is only
//! taken when a worker synchronises (see [`crate::model::flat`]).

use burn::module::Module;
use burn::nn::loss::CrossEntropyLoss;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, ModuleOptimizer, SgdConfig};
use burn::tensor::{Device, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::data::window::{Window, fill_normalized};
use crate::data::{Batch, ImageSet, Normalization};
use crate::model::{FlatError, Model, Net, load_flat, to_flat};
use crate::rng::SplitMix64;

/// The local optimizer's settings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct LocalOptimizer {
    /// Learning rate η.
    pub lr: f64,
    /// Momentum δ (0 for plain SGD).
    pub momentum: f64,
    /// Nesterov momentum (EAMSGD's local rule) rather than heavy ball.
    pub nesterov: bool,
    /// L2 weight decay added to the gradient.
    pub weight_decay: f64,
}

impl Default for LocalOptimizer {
    /// The defaults that match the PyTorch peer: Nesterov, lr 0.05, momentum 0.9, weight decay 1e-4.
    fn default() -> Self {
        Self {
            lr: 0.05,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 1e-4,
        }
    }
}

impl LocalOptimizer {
    /// Burn's optimizer with these settings (any module; `Trainer` holds one).
    pub fn optimizer(&self) -> ModuleOptimizer {
        let mut config = SgdConfig::new();
        if self.momentum > 0.0 {
            // Burn's default dampening is 0.1; PyTorch's (and the paper's) is 0.
            config = config.with_momentum(Some(MomentumConfig {
                momentum: self.momentum,
                dampening: 0.0,
                nesterov: self.nesterov,
            }));
        }
        if self.weight_decay > 0.0 {
            config = config.with_weight_decay(Some(WeightDecayConfig {
                penalty: self.weight_decay as f32,
            }));
        }
        config.init()
    }
}

/// A network being trained on one device, with its optimizer state.
pub struct Trainer {
    /// Always `Some` between calls; `Option` only so `optim.step` can take it by value.
    net: Option<Net>,
    optim: ModuleOptimizer,
    settings: LocalOptimizer,
    device: Device,
    train_device: Device,
    loss: CrossEntropyLoss,
    /// Dropout's masks: the trainer's own generator, so a seed fixes a training run
    /// whatever else the process trains.
    masks: SplitMix64,
}

impl Trainer {
    /// A fresh network of `model` on `device` (a plain device; autodiff is added here).
    pub fn new(model: &Model, settings: LocalOptimizer, device: &Device) -> Self {
        let train_device = device.clone().autodiff();
        Self {
            net: Some(model.init(&train_device)),
            optim: settings.optimizer(),
            settings,
            device: device.clone(),
            train_device: train_device.clone(),
            loss: CrossEntropyLoss::new(None, &train_device),
            masks: SplitMix64::new(0),
        }
    }

    /// Restarts the dropout masks from `seed` (a worker's shard seed, `tether
    /// train`'s `--seed`). The seed is mixed with a constant of its own: batch
    /// shuffles start from the same seed, and masks drawn from the very numbers
    /// that ordered the epoch would not be independent of it.
    pub fn seed_dropout(&mut self, seed: u64) {
        self.masks = SplitMix64::new(seed ^ 0xD20F_0A55_C0FF_EE00);
    }

    pub(crate) fn net(&self) -> &Net {
        self.net.as_ref().expect("trainer holds a network")
    }

    /// One SGD step on a batch of N normalised images of the model's input shape (taken by value: its
    /// vectors become the input tensors without a copy). Returns the batch's mean
    /// loss as a detached one-element tensor, so the caller decides when to pay for
    /// reading it.
    ///
    /// # Panics
    /// If the batch has other than C·H·W values per label (batches come from
    /// [`crate::data::Batcher`] over a set checked against the model).
    pub fn step(&mut self, batch: Batch) -> Tensor<1> {
        let n = batch.len();
        let [c, h, w] = self.net().model().input_shape();
        assert_eq!(
            batch.images.len(),
            n * c * h * w,
            "batch images and labels disagree"
        );
        let x = Tensor::<4>::from_data(
            TensorData::new(batch.images, [n, c, h, w]),
            &self.train_device,
        );
        let y = Tensor::<1, Int>::from_data(TensorData::new(batch.labels, [n]), &self.train_device);
        let net = self.net.take().expect("trainer holds a network");
        let loss = self.loss.forward(net.forward_train(x, &mut self.masks), y);
        let grads = GradientsParams::from_grads(loss.backward(), &net);
        self.net = Some(self.optim.step(self.settings.lr, net, grads));
        loss.detach()
    }

    /// Changes the learning rate from the next step on (runtime changes of η).
    pub fn set_lr(&mut self, lr: f64) {
        self.settings.lr = lr;
    }

    /// The parameters as one flat vector (see [`crate::model::flat`]).
    pub fn params(&self) -> Vec<f32> {
        to_flat(self.net())
    }

    /// Forgets the optimizer's state (its momentum): for a worker that starts
    /// again from the center rather than going on from its own point.
    pub fn reset_optimizer(&mut self) {
        self.optim = self.settings.optimizer();
    }

    /// Replaces the parameters, keeping the optimizer's momentum. Unchanged on error.
    pub fn set_params(&mut self, flat: &[f32]) -> Result<(), FlatError> {
        let net = self.net.take().expect("trainer holds a network");
        match load_flat(net.clone(), flat) {
            Ok(loaded) => {
                self.net = Some(loaded);
                Ok(())
            }
            Err(e) => {
                self.net = Some(net);
                Err(e)
            }
        }
    }

    /// Test accuracy (fraction 0..1) and mean loss of the current parameters on
    /// `set`, batch norms' statistics estimated from `train` first.
    pub fn evaluate(&self, set: &ImageSet, train: &ImageSet, norm: &Normalization) -> Evaluation {
        let net = ready_to_score(self.net().valid(), train, norm, &self.device);
        evaluate(&net, set, norm, &self.device)
    }
}

/// Accuracy and loss on a data set.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Fraction of images classified correctly, 0..1.
    pub accuracy: f64,
    /// Mean cross-entropy.
    pub loss: f64,
}

/// Images [`ready_to_score`] estimates batch-norm statistics from.
const NORM_IMAGES: usize = 2048;

/// `net` with its batch norms' statistics estimated from up to 2 048 of `train`'s
/// images (centre windows, as scoring sees them; evenly spread, so the same set
/// gives the same statistics), 128 at a time. Unchanged without batch norms.
pub fn ready_to_score(net: Net, train: &ImageSet, norm: &Normalization, device: &Device) -> Net {
    if !net.has_norms() || train.is_empty() {
        return net;
    }
    let tables = norm.tables();
    let [c, h, w] = net.model().input_shape();
    let window = Window::centre([c, h, w]);
    let step = train.len().div_ceil(NORM_IMAGES).max(1);
    let items: Vec<usize> = (0..train.len()).step_by(step).collect();
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    let batches: Vec<Tensor<4>> = items
        .chunks(128)
        .map(|chunk| {
            fill_normalized(train, chunk, &tables, window, &mut images, &mut labels);
            let n = chunk.len();
            Tensor::from_data(TensorData::new(images.clone(), [n, c, h, w]), device)
        })
        .collect();
    net.estimate_norms(batches)
}

/// Evaluates `net` (a validation copy on `device`, ready to score) on all of `set`, 1000 images at a time.
pub fn evaluate(net: &Net, set: &ImageSet, norm: &Normalization, device: &Device) -> Evaluation {
    evaluate_by_class(net, set, norm, device).0
}

/// Test images and correct answers per class (label order, the network's classes).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassScores {
    /// Images of each class classified correctly.
    pub correct: Vec<u32>,
    /// Images of each class in the set scored.
    pub total: Vec<u32>,
}

impl ClassScores {
    /// Accuracy per class, 0..1; `None` for a class with no test image.
    pub fn accuracy(&self) -> Vec<Option<f64>> {
        self.correct
            .iter()
            .zip(&self.total)
            .map(|(&c, &t)| (t > 0).then(|| f64::from(c) / f64::from(t)))
            .collect()
    }
}

/// [`evaluate`], with the hits per class.
pub fn evaluate_by_class(
    net: &Net,
    set: &ImageSet,
    norm: &Normalization,
    device: &Device,
) -> (Evaluation, ClassScores) {
    const CHUNK: usize = 1000;
    let tables = norm.tables();
    let loss_fn = CrossEntropyLoss::new(None, device);
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    let classes = net.model().classes();
    let mut scores = ClassScores {
        correct: vec![0; classes],
        total: vec![0; classes],
    };
    let mut loss_sum = 0.0f64;
    let all: Vec<usize> = (0..set.len()).collect();
    let [c, h, w] = net.model().input_shape();
    // The centre of images larger than the network's input (the paper's CIFAR test).
    let window = Window::centre([c, h, w]);
    for items in all.chunks(CHUNK) {
        fill_normalized(set, items, &tables, window, &mut images, &mut labels);
        let n = items.len();
        let x = Tensor::<4>::from_data(TensorData::new(images.clone(), [n, c, h, w]), device);
        let y = Tensor::<1, Int>::from_data(TensorData::new(labels.clone(), [n]), device);
        let logits = net.forward(x);
        let loss: f32 = loss_fn.forward(logits.clone(), y).into_scalar();
        let guesses = logits.argmax(1).flatten::<1>(0, 1).into_data();
        let guesses = guesses.iter::<i64>();
        for (&label, guess) in labels.iter().zip(guesses) {
            // Labels were checked against the network's classes on loading.
            let class = usize::try_from(label).unwrap_or(0).min(classes - 1);
            scores.total[class] += 1;
            scores.correct[class] += u32::from(guess == label);
        }
        loss_sum += f64::from(loss) * n as f64;
    }
    let n = set.len().max(1) as f64;
    let correct: u32 = scores.correct.iter().sum();
    let evaluation = Evaluation {
        accuracy: f64::from(correct) / n,
        loss: loss_sum / n,
    };
    (evaluation, scores)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Batcher;

    /// A tiny separable problem: class k images are bright in row band k.
    fn toy_set(n: usize) -> ImageSet {
        let mut pixels = vec![0u8; n * 784];
        let labels: Vec<u16> = (0..n).map(|i| (i % 10) as u16).collect();
        for (i, &l) in labels.iter().enumerate() {
            let row0 = usize::from(l) * 2 + 4;
            for r in row0..row0 + 2 {
                for c in 4..24 {
                    pixels[i * 784 + r * 28 + c] = 200 + (i % 50) as u8;
                }
            }
        }
        ImageSet {
            source: "toy".into(),
            channels: 1,
            rows: 28,
            cols: 28,
            pixels,
            labels,
        }
    }

    /// Trains a fresh `kind` at η `lr` for `epochs` epochs of batch 20 over all of
    /// `set`, every loss finite; the evaluations on `set` before and after.
    fn train_on(kind: &Model, lr: f64, set: &ImageSet, epochs: u64) -> (Evaluation, Evaluation) {
        let device = Device::flex();
        let norm = Normalization::of(set);
        let optimizer = LocalOptimizer {
            lr,
            ..LocalOptimizer::default()
        };
        let mut trainer = Trainer::new(kind, optimizer, &device);
        let before = trainer.evaluate(set, set, &norm);
        let batcher =
            Batcher::new((0..set.len()).collect(), 20, 1, &norm).with_input(kind.input_shape());
        for epoch in 0..epochs {
            for items in batcher.epoch_order(epoch).chunks(20) {
                let loss: f32 = trainer.step(batcher.batch(set, items, epoch)).into_scalar();
                assert!(loss.is_finite());
            }
        }
        (before, trainer.evaluate(set, set, &norm))
    }

    #[test]
    fn training_steps_reduce_the_loss_and_learn_the_toy_problem() {
        let (before, after) = train_on(&Model::small(), 0.05, &toy_set(200), 3);
        assert!(after.loss < before.loss, "{before:?} → {after:?}");
        assert!(after.accuracy > 0.9, "{after:?}");
    }

    #[test]
    fn scores_per_class_add_up_to_the_accuracy() {
        let set = toy_set(95);
        let device = Device::flex();
        let norm = Normalization::of(&set);
        let net = Model::small().init(&device);
        let (whole, classes) = evaluate_by_class(&net, &set, &norm, &device);
        assert_eq!(classes.total, [10, 10, 10, 10, 10, 9, 9, 9, 9, 9]);
        let correct: u32 = classes.correct.iter().sum();
        assert!((f64::from(correct) / 95.0 - whole.accuracy).abs() < 1e-12);
        assert_eq!(evaluate(&net, &set, &norm, &device), whole);
        let per_class = ClassScores {
            correct: vec![1, 0],
            total: vec![2, 0],
        }
        .accuracy();
        assert_eq!(per_class, [Some(0.5), None]);
    }

    /// Class k: a 3×32×32 image whose colour is k's own mix of red, green and blue.
    fn toy_colour_set(n: usize) -> ImageSet {
        let labels: Vec<u16> = (0..n).map(|i| (i % 10) as u16).collect();
        let mut pixels = Vec::with_capacity(n * 3 * 1024);
        for (i, &l) in labels.iter().enumerate() {
            let level = |bit: u16| {
                if l & bit != 0 {
                    200
                } else {
                    20 + (i % 30) as u8
                }
            };
            for c in 0..3u8 {
                // Classes 8 and 9 share the colour of 0 and 1 but are brighter on top.
                let top = if l >= 8 { 255 } else { level(1 << c) };
                pixels.extend((0..1024).map(|p| if p < 256 { top } else { level(1 << c) }));
            }
        }
        ImageSet {
            source: "toy-colour".into(),
            channels: 3,
            rows: 32,
            cols: 32,
            pixels,
            labels,
        }
    }

    #[test]
    fn the_cifar_network_learns_three_channel_images() {
        let set = toy_colour_set(60);
        assert_eq!(Normalization::of(&set).channels.len(), 3);
        // η 0.01: on flat colours the default 0.05 with momentum overshoots, and
        // whether it recovers in 4 epochs depended on the CPU kernels' rounding.
        let (before, after) = train_on(&Model::shipped("cifar").unwrap(), 0.01, &set, 4);
        assert!(after.loss < before.loss, "{before:?} → {after:?}");
        assert!(after.accuracy > before.accuracy, "{before:?} → {after:?}");
    }

    #[test]
    fn set_params_round_trips_and_rejects_wrong_lengths() {
        let device = Device::flex();
        let mut a = Trainer::new(&Model::small(), LocalOptimizer::default(), &device);
        let b = Trainer::new(&Model::small(), LocalOptimizer::default(), &device);
        let before = a.params();
        assert!(a.set_params(&before[..10]).is_err());
        assert_eq!(a.params(), before);
        a.set_params(&b.params()).unwrap();
        assert_eq!(a.params(), b.params());
        // Still trainable after a load: a step moves the parameters.
        let set = toy_set(10);
        let norm = Normalization::of(&set);
        let batcher = Batcher::new((0..10).collect(), 10, 0, &norm);
        a.step(batcher.batch(&set, &(0..10).collect::<Vec<_>>(), 0));
        assert_ne!(a.params(), b.params());
    }

    #[test]
    fn dropout_masks_follow_the_trainers_seed_whatever_else_draws() {
        // One thread: Burn's kernels sum in load-dependent splits on more.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let set = toy_set(16);
        let norm = Normalization::of(&set);
        let batch = Batcher::new((0..16).collect(), 16, 0, &norm).batch(
            &set,
            &(0..16).collect::<Vec<_>>(),
            0,
        );
        let start = Model::shipped("paper").unwrap().seeded_params(5);
        let run = |seed: u64, draw_between: bool| {
            pool.install(|| {
                let device = Device::flex();
                let mut trainer = Trainer::new(
                    &Model::shipped("paper").unwrap(),
                    LocalOptimizer::default(),
                    &device,
                );
                trainer.set_params(&start).unwrap();
                trainer.seed_dropout(seed);
                for _ in 0..3 {
                    if draw_between {
                        // What another training in the process does to Burn's one generator.
                        let _: Tensor<2> =
                            Tensor::random([64, 64], burn::tensor::Distribution::Default, &device);
                    }
                    trainer.step(batch.clone());
                }
                trainer.params()
            })
        };
        let alone = run(7, false);
        assert_eq!(alone, run(7, true), "another draw changed the masks");
        assert_ne!(alone, run(8, false), "dropout is on, so its seed matters");
    }
}
