//! The networks tether trains, identical for native and browser workers, and the flat
//! parameter view that every exchange with the server uses.
//!
//! `small` and `paper` take 1×28×28 images, `cifar` 3×28×28 windows of CIFAR's
//! 3×32×32 (random in training, the centre in evaluation, as in the paper); all
//! give 10 logits. Max-pooling is applied
//! *before* ReLU: the two commute (ReLU is monotone), so the result is the same as
//! the usual conv → ReLU → pool, with ReLU and its backward on a 4× smaller tensor.

pub mod flat;
pub mod ops;
pub mod paper;
pub mod small;

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::rng::SplitMix64;

pub use flat::{FlatError, load_flat, to_flat, to_flat_async};
pub use paper::{PaperCnn, PaperCnnConfig};
pub use small::{SmallCnn, SmallCnnConfig};

/// Which network to train.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// A small fast CNN for CPUs and browsers (421 642 parameters).
    Small,
    /// The EASGD paper's CIFAR network adapted to 1×28×28 (430 666 parameters).
    Paper,
    /// The EASGD paper's CIFAR network on 3×28×28 crops of CIFAR-10's 3×32×32
    /// (433 866 parameters).
    Cifar,
}

impl ModelKind {
    /// Every network, in the order the CLI lists them.
    pub const ALL: [Self; 3] = [Self::Small, Self::Paper, Self::Cifar];

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Small => "small",
            Self::Paper => "paper",
            Self::Cifar => "cifar",
        }
    }

    /// What the network's first layer takes: channels, rows, cols.
    pub fn input_shape(self) -> [usize; 3] {
        match self {
            Self::Small | Self::Paper => [1, 28, 28],
            // The paper's CIFAR input: 28×28 windows of the 32×32 images.
            Self::Cifar => [3, 28, 28],
        }
    }

    /// The images this network trains on: channels, rows, cols. Larger than
    /// [`input_shape`](Self::input_shape) where the network sees crops of them.
    pub fn data_shape(self) -> [usize; 3] {
        match self {
            Self::Small | Self::Paper => self.input_shape(),
            Self::Cifar => crate::data::cifar::SHAPE,
        }
    }

    /// The network a run trains when none is named: `cifar` for CIFAR-10's 3×32×32
    /// images, `small` otherwise.
    pub fn default_for(images: [usize; 3]) -> Self {
        if images == Self::Cifar.data_shape() {
            Self::Cifar
        } else {
            Self::Small
        }
    }

    /// Number of trainable parameters, i.e. the flat vector's length.
    pub fn param_count(self) -> usize {
        match self {
            Self::Small => small::PARAMS,
            Self::Paper => paper::PARAMS,
            Self::Cifar => paper::CIFAR_PARAMS,
        }
    }

    /// Multiply-adds ×2 of one forward pass on one sample, counted from the layer
    /// shapes (convolutions and fully connected layers; pooling, ReLU and the loss
    /// are negligible). A training step costs about 3× this (forward, then the
    /// input and weight gradients).
    pub fn forward_flops_per_sample(self) -> u64 {
        let conv = |cin: u64, cout: u64, k: u64, hw: u64| 2 * cin * cout * k * k * hw * hw;
        let fc = |i: u64, o: u64| 2 * i * o;
        match self {
            Self::Small => conv(1, 32, 3, 28) + conv(32, 64, 3, 14) + fc(3136, 128) + fc(128, 10),
            Self::Paper | Self::Cifar => {
                let [c, side, _] = self.input_shape().map(|v| v as u64);
                conv(c, 64, 5, side)
                    + conv(64, 128, 5, side / 2)
                    + conv(128, 64, 3, side / 4)
                    + fc(64 * (side / 8).pow(2), 256)
                    + fc(256, 10)
            }
        }
    }

    /// A freshly initialised network of this kind on `device`.
    pub fn init(self, device: &Device) -> Net {
        let _drawing = lock_init();
        self.init_unlocked(device)
    }

    /// The network with every parameter drawn now. Burn draws a parameter lazily,
    /// on its first use; a network used after the lock is released would draw
    /// then, between another thread's seeding and its draws (a `repro` grid's seed
    /// then started from other weights when run side by side).
    fn init_unlocked(self, device: &Device) -> Net {
        struct Draw;
        impl ModuleVisitor for Draw {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                drop(param.val());
            }
        }
        let net = self.build(device);
        net.visit(&mut Draw);
        net
    }

    /// The flat initial parameters of seed `seed` (Burn's CPU device): the same
    /// seed gives the same parameters whatever else the process does. Burn keeps one
    /// random generator per device kind and process, so seeding it and drawing the
    /// weights hold one lock that every [`init`](Self::init) takes too; before, an
    /// initialisation elsewhere in the process (another test's run) could draw
    /// between the two, and one simulated run in five differed from its twin.
    pub fn seeded_params(self, seed: u64) -> Vec<f32> {
        let _drawing = lock_init();
        let device = Device::flex();
        device.seed(seed);
        to_flat(&self.init_unlocked(&device))
    }

    fn build(self, device: &Device) -> Net {
        match self {
            Self::Small => Net::Small(SmallCnnConfig::new().init(device)),
            Self::Paper => Net::Paper(PaperCnnConfig::new().init(device)),
            Self::Cifar => {
                let [channels, side, _] = self.input_shape();
                Net::Cifar(
                    PaperCnnConfig::new()
                        .with_channels(channels)
                        .with_side(side)
                        .init(device),
                )
            }
        }
    }
}

impl std::str::FromStr for ModelKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "small" => Ok(Self::Small),
            "paper" => Ok(Self::Paper),
            "cifar" => Ok(Self::Cifar),
            other => Err(format!(
                "unknown model {other:?} (expected small, paper or cifar)"
            )),
        }
    }
}

/// The lock every initialisation holds while it draws from Burn's random generator.
fn lock_init() -> std::sync::MutexGuard<'static, ()> {
    static DRAWING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    DRAWING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Either network, so that trainers and exchanges need not be generic.
// A trainer holds one `Net`; boxing the variants would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Net {
    /// See [`SmallCnn`].
    Small(SmallCnn),
    /// See [`PaperCnn`].
    Paper(PaperCnn),
    /// [`PaperCnn`] on 3×28×28.
    Cifar(PaperCnn),
}

impl Net {
    /// Logits `[N, 10]` for images `[N, C, H, W]` of the kind's input shape, as
    /// evaluation sees them (no dropout).
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        match self {
            Self::Small(m) => m.forward(images),
            Self::Paper(m) | Self::Cifar(m) => m.forward(images),
        }
    }

    /// [`Self::forward`] as training runs it: with dropout (the paper's networks),
    /// its masks drawn from `masks`.
    pub fn forward_train(&self, images: Tensor<4>, masks: &mut SplitMix64) -> Tensor<2> {
        match self {
            Self::Small(m) => m.forward(images),
            Self::Paper(m) | Self::Cifar(m) => m.forward_train(images, masks),
        }
    }

    /// Which network this is.
    pub fn kind(&self) -> ModelKind {
        match self {
            Self::Small(_) => ModelKind::Small,
            Self::Paper(_) => ModelKind::Paper,
            Self::Cifar(_) => ModelKind::Cifar,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_counts_match_the_declared_ones() {
        let device = Device::flex();
        for kind in ModelKind::ALL {
            assert_eq!(
                kind.init(&device).num_params(),
                kind.param_count(),
                "{kind:?}"
            );
        }
        assert_eq!(ModelKind::Small.param_count(), 421_642);
        assert_eq!(ModelKind::Paper.param_count(), 430_666);
        assert_eq!(ModelKind::Cifar.param_count(), 433_866);
    }

    #[test]
    fn forward_gives_ten_logits_per_image() {
        let device = Device::flex();
        for kind in ModelKind::ALL {
            let [c, h, w] = kind.input_shape();
            let out = kind
                .init(&device)
                .forward(Tensor::zeros([3, c, h, w], &device));
            assert_eq!(out.dims(), [3, 10], "{kind:?}");
        }
    }

    #[test]
    fn flop_counts_are_the_layer_sums() {
        // small: 0.45 M + 7.23 M + 0.80 M + 2.6 k multiply-adds, ×2.
        assert_eq!(
            ModelKind::Small.forward_flops_per_sample(),
            2 * (225_792 + 3_612_672 + 401_408 + 1_280)
        );
        assert!(
            ModelKind::Paper.forward_flops_per_sample()
                > ModelKind::Small.forward_flops_per_sample()
        );
        // The CIFAR network: conv1 sees 3 channels on 28×28, fc1 576 inputs.
        assert_eq!(
            ModelKind::Cifar.forward_flops_per_sample(),
            2 * (3 * 64 * 25 * 784 + 64 * 128 * 25 * 196 + 128 * 64 * 9 * 49 + 576 * 256 + 2560)
        );
    }

    #[test]
    fn cifar_images_select_the_cifar_network() {
        assert_eq!(ModelKind::default_for([3, 32, 32]), ModelKind::Cifar);
        assert_eq!(ModelKind::Cifar.data_shape(), [3, 32, 32]);
        assert_eq!(ModelKind::Cifar.input_shape(), [3, 28, 28]);
        assert_eq!(ModelKind::default_for([1, 28, 28]), ModelKind::Small);
        assert_eq!("cifar".parse::<ModelKind>(), Ok(ModelKind::Cifar));
    }

    #[test]
    fn seeded_parameters_ignore_networks_built_on_other_threads() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let want = ModelKind::Paper.seeded_params(1);
        let stop = AtomicBool::new(false);
        let got: Vec<Vec<f32>> = std::thread::scope(|s| {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    // A worker's network: built here, its weights used (and so, with
                    // Burn's lazy parameters, drawn) afterwards.
                    drop(to_flat(&ModelKind::Small.init(&Device::flex())));
                }
            });
            let got = (0..200)
                .map(|_| ModelKind::Paper.seeded_params(1))
                .collect();
            stop.store(true, Ordering::Relaxed);
            got
        });
        assert!(got.iter().all(|g| *g == want), "a seed gave other weights");
    }
}
