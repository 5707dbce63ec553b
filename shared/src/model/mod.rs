//! The networks tether trains, identical for native and browser workers, and the flat
//! parameter view that every exchange with the server uses.
//!
//! Both networks take 1×28×28 images and give 10 logits. Max-pooling is applied
//! *before* ReLU: the two commute (ReLU is monotone), so the result is the same as
//! the usual conv → ReLU → pool, with ReLU and its backward on a 4× smaller tensor.

pub mod flat;
pub mod ops;
pub mod paper;
pub mod small;

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use serde::{Deserialize, Serialize};

pub use flat::{FlatError, load_flat, to_flat, to_flat_async};
pub use paper::{PaperCnn, PaperCnnConfig};
pub use small::{SmallCnn, SmallCnnConfig};

/// The input every model takes: channels, rows, cols.
pub const INPUT_SHAPE: [usize; 3] = [1, 28, 28];

/// Which network to train.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// A small fast CNN for CPUs and browsers (421 642 parameters).
    Small,
    /// The EASGD paper's CIFAR network adapted to 1×28×28 (430 666 parameters).
    Paper,
}

impl ModelKind {
    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Small => "small",
            Self::Paper => "paper",
        }
    }

    /// Number of trainable parameters, i.e. the flat vector's length.
    pub fn param_count(self) -> usize {
        match self {
            Self::Small => small::PARAMS,
            Self::Paper => paper::PARAMS,
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
            Self::Paper => {
                conv(1, 64, 5, 28)
                    + conv(64, 128, 5, 14)
                    + conv(128, 64, 3, 7)
                    + fc(576, 256)
                    + fc(256, 10)
            }
        }
    }

    /// A freshly initialised network of this kind on `device`.
    pub fn init(self, device: &Device) -> Net {
        match self {
            Self::Small => Net::Small(SmallCnnConfig::new().init(device)),
            Self::Paper => Net::Paper(PaperCnnConfig::new().init(device)),
        }
    }
}

impl std::str::FromStr for ModelKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "small" => Ok(Self::Small),
            "paper" => Ok(Self::Paper),
            other => Err(format!("unknown model {other:?} (expected small or paper)")),
        }
    }
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
}

impl Net {
    /// Logits `[N, 10]` for images `[N, 1, 28, 28]`.
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        match self {
            Self::Small(m) => m.forward(images),
            Self::Paper(m) => m.forward(images),
        }
    }

    /// Which network this is.
    pub fn kind(&self) -> ModelKind {
        match self {
            Self::Small(_) => ModelKind::Small,
            Self::Paper(_) => ModelKind::Paper,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_counts_match_the_declared_ones() {
        let device = Device::flex();
        for kind in [ModelKind::Small, ModelKind::Paper] {
            assert_eq!(
                kind.init(&device).num_params(),
                kind.param_count(),
                "{kind:?}"
            );
        }
        assert_eq!(ModelKind::Small.param_count(), 421_642);
        assert_eq!(ModelKind::Paper.param_count(), 430_666);
    }

    #[test]
    fn forward_gives_ten_logits_per_image() {
        let device = Device::flex();
        for kind in [ModelKind::Small, ModelKind::Paper] {
            let out = kind
                .init(&device)
                .forward(Tensor::zeros([3, 1, 28, 28], &device));
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
    }
}
