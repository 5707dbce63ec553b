//! The small fast CNN for CPUs and browsers: conv3×3-32, pool, conv3×3-64, pool,
//! fc128, fc10 (421 642 parameters), as in the PyTorch peer's `small_net`.

use burn::config::Config;
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};

use crate::model::ops::{conv2d, pool2_relu};

/// Parameter count: 320 + 18 496 + 401 536 + 1 290.
pub const PARAMS: usize = 421_642;

/// Configuration of [`SmallCnn`].
#[derive(Config, Debug)]
pub struct SmallCnnConfig {
    /// Channels of the first convolution.
    #[config(default = 32)]
    pub conv1: usize,
    /// Channels of the second convolution.
    #[config(default = 64)]
    pub conv2: usize,
    /// Width of the hidden fully connected layer.
    #[config(default = 128)]
    pub hidden: usize,
}

/// conv3×3 → pool → ReLU → conv3×3 → pool → ReLU → fc → ReLU → fc.
#[derive(Module, Debug)]
pub struct SmallCnn {
    conv1: Conv2d,
    conv2: Conv2d,
    pool: MaxPool2d,
    fc1: Linear,
    fc2: Linear,
}

impl SmallCnnConfig {
    /// A freshly initialised network (PyTorch's default initialisation: uniform in ±1/√fan_in).
    pub fn init(&self, device: &Device) -> SmallCnn {
        let conv = |cin, cout| {
            Conv2dConfig::new([cin, cout], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(device)
        };
        SmallCnn {
            conv1: conv(1, self.conv1),
            conv2: conv(self.conv1, self.conv2),
            pool: MaxPool2dConfig::new([2, 2]).init(),
            fc1: LinearConfig::new(self.conv2 * 7 * 7, self.hidden).init(device),
            fc2: LinearConfig::new(self.hidden, 10).init(device),
        }
    }
}

impl SmallCnn {
    /// Logits `[N, 10]` for images `[N, 1, 28, 28]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let x = pool2_relu(&self.pool, conv2d(&self.conv1, x));
        let x = pool2_relu(&self.pool, conv2d(&self.conv2, x));
        let x = relu(self.fc1.forward(x.flatten::<2>(1, 3)));
        self.fc2.forward(x)
    }
}
