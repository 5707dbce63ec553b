//! The EASGD paper's CIFAR network (Zhang, Choromanska & LeCun 2015, §5 and the
//! appendix): conv5×5-64, pool, conv5×5-128, pool, conv3×3-64, pool, fc256 with
//! dropout 0.5, fc10, every pool 2×2 and every convolution padded to keep its size.
//! On 1×28×28 input (`paper`, as the peer's `paper_net`: 28 → 14 → 7 → 3, 430 666
//! parameters) and, as the paper trained it, on 3×28×28 windows of CIFAR-10's
//! 3×32×32 (`cifar`: 28 → 14 → 7 → 3, 433 866 parameters; the windows are cut
//! by [`crate::data::Batcher`], at random in training and centred in evaluation).

use burn::config::Config;
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor, TensorData};

use crate::model::ops::{conv2d, pool2_relu};
use crate::rng::SplitMix64;

/// Parameter count on 1×28×28: 1 664 + 204 928 + 73 792 + 147 712 + 2 570.
pub const PARAMS: usize = 430_666;

/// Parameter count on 3×28×28: 4 864 + 204 928 + 73 792 + 147 712 + 2 570.
pub const CIFAR_PARAMS: usize = 433_866;

/// Configuration of [`PaperCnn`].
#[derive(Config, Debug)]
pub struct PaperCnnConfig {
    /// Input channels (1 for Fashion-MNIST, 3 for CIFAR-10).
    #[config(default = 1)]
    pub channels: usize,
    /// Input height and width; a multiple of 8 or not, three 2×2 pools floor it.
    #[config(default = 28)]
    pub side: usize,
    /// Dropout probability before the last layer.
    #[config(default = 0.5)]
    pub dropout: f64,
}

/// conv5×5 → pool → ReLU → conv5×5 → pool → ReLU → conv3×3 → pool → ReLU → fc → ReLU → dropout → fc.
#[derive(Module, Debug)]
pub struct PaperCnn {
    conv1: Conv2d,
    conv2: Conv2d,
    conv3: Conv2d,
    pool: MaxPool2d,
    fc1: Linear,
    /// Dropout probability before `fc2`. Not Burn's `Dropout`: that draws its masks
    /// from the process's one generator, which every network in the process shares,
    /// so two trainings side by side (a `repro` grid's jobs) changed each other.
    dropout: f64,
    fc2: Linear,
}

impl PaperCnnConfig {
    /// A freshly initialised network (PyTorch's default initialisation).
    pub fn init(&self, device: &Device) -> PaperCnn {
        let conv = |cin, cout, k: usize| {
            let p = k / 2;
            Conv2dConfig::new([cin, cout], [k, k])
                .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
                .init(device)
        };
        PaperCnn {
            conv1: conv(self.channels, 64, 5),
            conv2: conv(64, 128, 5),
            conv3: conv(128, 64, 3),
            pool: MaxPool2dConfig::new([2, 2]).init(),
            fc1: LinearConfig::new(64 * (self.side / 8).pow(2), 256).init(device),
            dropout: self.dropout,
            fc2: LinearConfig::new(256, 10).init(device),
        }
    }
}

impl PaperCnn {
    /// Logits `[N, 10]` for images `[N, channels, side, side]`, without dropout (evaluation).
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        self.fc2.forward(self.features(x))
    }

    /// [`Self::forward`] with dropout before the last layer, its mask drawn from
    /// `masks` (training): the same generator state gives the same step anywhere.
    pub fn forward_train(&self, x: Tensor<4>, masks: &mut SplitMix64) -> Tensor<2> {
        let x = self.features(x);
        if self.dropout <= 0.0 {
            return self.fc2.forward(x);
        }
        let keep = 1.0 - self.dropout;
        let [n, width] = x.dims();
        let scale = (1.0 / keep) as f32;
        // A unit survives with probability `keep` and is scaled by 1/keep, as in
        // PyTorch, so the expected activation is the one `forward` sees.
        let mask: Vec<f32> = (0..n * width)
            .map(|_| if masks.next_f64() < keep { scale } else { 0.0 })
            .collect();
        let mask = Tensor::<2>::from_data(TensorData::new(mask, [n, width]), &x.device());
        self.fc2.forward(x * mask)
    }

    /// Everything before dropout: the convolutions and `fc1` with its ReLU.
    fn features(&self, x: Tensor<4>) -> Tensor<2> {
        let x = pool2_relu(&self.pool, conv2d(&self.conv1, x));
        let x = pool2_relu(&self.pool, conv2d(&self.conv2, x));
        let x = pool2_relu(&self.pool, conv2d(&self.conv3, x));
        relu(self.fc1.forward(x.flatten::<2>(1, 3)))
    }
}
