//! The Burn network built at run time from a [`NetSpec`]: one block per layer, in the
//! description's order (which fixes the flat vector's order), with tether's CPU
//! kernels where a layer's shape allows (stride-1 convolutions; 2×2 max pooling next
//! to a ReLU, fused) and Burn's own layers for the rest.
//!
//! Batch norm keeps no running statistics inside the module: the flat vector holds
//! only what is trained, and whoever scores a network first re-estimates each norm
//! layer's statistics from training images ([`Net::estimate_norms`]); until then
//! evaluation uses mean 0, variance 1.

use std::sync::Arc;

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{AvgPool2d, AvgPool2dConfig, MaxPool2d, MaxPool2dConfig};
use burn::nn::{Initializer, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::{gelu, leaky_relu, relu};
use burn::tensor::module::{batch_norm, batch_norm_train};
use burn::tensor::{Device, Tensor, TensorData};

use super::Model;
use super::ops::{conv2d, pool2_relu};
use super::spec::{Layer, Shape, Tally, check};
use crate::rng::SplitMix64;

const NORM_EPSILON: f64 = 1e-5;

/// A network of any description.
#[derive(Module, Debug)]
pub struct Net {
    blocks: Vec<Block>,
    /// The description it was built from.
    #[module(skip)]
    model: Model,
    /// Each norm layer's mean and variance for evaluation, in block order.
    #[module(skip)]
    norms: NormStats,
}

/// One layer of a built network.
#[derive(Module, Debug)]
pub enum Block {
    /// A convolution.
    Conv(Conv2d),
    /// A fully connected layer.
    Linear(Linear),
    /// Batch norm's scale and shift.
    Norm(Norm),
    /// Max pooling.
    MaxPool(MaxPool2d),
    /// 2×2 max pooling and a ReLU next to it, fused.
    Pool2Relu(MaxPool2d),
    /// Average pooling.
    AvgPool(AvgPool2d),
    /// `body(x) + shortcut(x)`.
    Residual(Residual),
    /// A layer without parameters.
    Fixed(Fixed),
}

/// Batch norm's learnt scale γ and shift β.
#[derive(Module, Debug)]
pub struct Norm {
    gamma: Param<Tensor<1>>,
    beta: Param<Tensor<1>>,
}

/// A residual block.
#[derive(Module, Debug)]
pub struct Residual {
    body: Vec<Block>,
    shortcut: Vec<Block>,
}

/// A layer without parameters.
#[derive(Module, Debug)]
pub struct Fixed {
    #[module(skip)]
    op: Op,
}

#[derive(Clone, Debug)]
enum Op {
    GlobalAvgPool,
    Relu,
    LeakyRelu(f64),
    Gelu,
    Dropout(f64),
    Flatten,
}

/// Per-channel means and variances of each norm layer, in block order.
#[derive(Clone, Debug, Default)]
pub struct NormStats(Arc<Vec<(Vec<f32>, Vec<f32>)>>);

/// What flows between blocks.
enum Act {
    Map(Tensor<4>),
    Flat(Tensor<2>),
}

/// How a forward pass runs.
enum Mode<'a> {
    /// Norms use the estimated statistics; no dropout.
    Eval,
    /// Norms use the batch's statistics; dropout masks drawn from the generator.
    Train(&'a mut SplitMix64),
    /// Norms use the batch's statistics (and record them when given a list); no dropout.
    Batch(Option<&'a mut Vec<(Tensor<1>, Tensor<1>)>>),
}

struct Pass<'a> {
    mode: Mode<'a>,
    norms: &'a NormStats,
    next_norm: usize,
}

/// Whether layers `a`, `b` are a 2×2 max pool and a ReLU (either order), which
/// commute (ReLU is monotone) and run fused: one pass, the ReLU on ¼ of the values.
fn fusable(a: &Layer, b: Option<&Layer>) -> bool {
    matches!(
        (a, b),
        (Layer::MaxPool { size: 2, stride: 2 }, Some(Layer::Relu))
            | (Layer::Relu, Some(Layer::MaxPool { size: 2, stride: 2 }))
    )
}

/// The blocks of `layers` on inputs of `shape` (a checked description), and the
/// shape they give.
fn build(layers: &[Layer], mut shape: Shape, device: &Device) -> (Vec<Block>, Shape) {
    let mut blocks = Vec::with_capacity(layers.len());
    let mut i = 0;
    while i < layers.len() {
        let take = if fusable(&layers[i], layers.get(i + 1)) {
            2
        } else {
            1
        };
        let group = &layers[i..i + take];
        blocks.push(if take == 2 {
            Block::Pool2Relu(MaxPool2dConfig::new([2, 2]).init())
        } else {
            block(&layers[i], shape, device)
        });
        shape = check::walk(group, shape, "layers", &mut Tally::default())
            .expect("a checked description");
        i += take;
    }
    (blocks, shape)
}

fn block(layer: &Layer, shape: Shape, device: &Device) -> Block {
    let fixed = |op| Block::Fixed(Fixed { op });
    let features = match shape {
        Shape::Map(c, ..) | Shape::Flat(c) => c,
    };
    match *layer {
        Layer::Conv {
            out,
            kernel,
            stride,
            pad,
            bias,
        } => Block::Conv(
            Conv2dConfig::new([features, out], [kernel, kernel])
                .with_stride([stride, stride])
                .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
                .with_bias(bias)
                .with_initializer(Initializer::Zeros)
                .init(device),
        ),
        Layer::Linear { out, bias } => Block::Linear(
            LinearConfig::new(features, out)
                .with_bias(bias)
                .with_initializer(Initializer::Zeros)
                .init(device),
        ),
        Layer::BatchNorm => Block::Norm(Norm {
            gamma: Initializer::Ones.init([features], device),
            beta: Initializer::Zeros.init([features], device),
        }),
        Layer::MaxPool { size, stride } => Block::MaxPool(
            MaxPool2dConfig::new([size, size])
                .with_strides([stride, stride])
                .init(),
        ),
        Layer::AvgPool { size, stride } => Block::AvgPool(
            AvgPool2dConfig::new([size, size])
                .with_strides([stride, stride])
                .init(),
        ),
        Layer::GlobalAvgPool => fixed(Op::GlobalAvgPool),
        Layer::Relu => fixed(Op::Relu),
        Layer::LeakyRelu { slope } => fixed(Op::LeakyRelu(f64::from(slope))),
        Layer::Gelu => fixed(Op::Gelu),
        Layer::Dropout { p } => fixed(Op::Dropout(f64::from(p))),
        Layer::Flatten => fixed(Op::Flatten),
        Layer::Residual {
            ref body,
            ref shortcut,
        } => Block::Residual(Residual {
            body: build(body, shape, device).0,
            shortcut: build(shortcut, shape, device).0,
        }),
    }
}

impl Net {
    /// The network `model` describes, every parameter zero (load a flat vector
    /// into it: [`Model::init`] draws one).
    pub fn zeroed(model: &Model, device: &Device) -> Self {
        let [c, h, w] = model.input_shape();
        let (blocks, _) = build(&model.spec().layers, Shape::Map(c, h, w), device);
        Self {
            blocks,
            model: model.clone(),
            norms: NormStats::default(),
        }
    }

    /// The description this network was built from.
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Whether any layer is a batch norm (whose statistics evaluation needs).
    pub fn has_norms(&self) -> bool {
        fn any(blocks: &[Block]) -> bool {
            blocks.iter().any(|b| match b {
                Block::Norm(_) => true,
                Block::Residual(r) => any(&r.body) || any(&r.shortcut),
                _ => false,
            })
        }
        any(&self.blocks)
    }

    /// Logits `[N, classes]` for images `[N, C, H, W]` of the input shape, as
    /// evaluation sees them (no dropout; norms use the estimated statistics).
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        self.run(images, Mode::Eval)
    }

    /// [`Self::forward`] as training runs it: dropout masks drawn from `masks`, norms
    /// on the batch's own statistics.
    pub fn forward_train(&self, images: Tensor<4>, masks: &mut SplitMix64) -> Tensor<2> {
        self.run(images, Mode::Train(masks))
    }

    /// Logits with norms on the batch's own statistics and no dropout: a fair score
    /// of parameters whose norm statistics were never estimated (the loss screen).
    pub fn forward_batch_stats(&self, images: Tensor<4>) -> Tensor<2> {
        self.run(images, Mode::Batch(None))
    }

    /// The network with each norm layer's statistics set to the mean, over
    /// `batches`, of the batches' own means and variances (what scoring uses).
    pub fn estimate_norms(mut self, batches: impl IntoIterator<Item = Tensor<4>>) -> Self {
        let mut sums: Vec<(Tensor<1>, Tensor<1>)> = Vec::new();
        let mut count = 0usize;
        for images in batches {
            let mut seen = Vec::new();
            drop(self.run(images, Mode::Batch(Some(&mut seen))));
            sums = if sums.is_empty() {
                seen
            } else {
                sums.into_iter()
                    .zip(seen)
                    .map(|((m, v), (bm, bv))| (m + bm, v + bv))
                    .collect()
            };
            count += 1;
        }
        let host = |t: Tensor<1>| -> Vec<f32> {
            t.div_scalar(count.max(1) as f64)
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .expect("f32 statistics")
        };
        self.norms = NormStats(Arc::new(
            sums.into_iter().map(|(m, v)| (host(m), host(v))).collect(),
        ));
        self
    }

    fn run(&self, images: Tensor<4>, mode: Mode<'_>) -> Tensor<2> {
        let mut pass = Pass {
            mode,
            norms: &self.norms,
            next_norm: 0,
        };
        match run_blocks(&self.blocks, Act::Map(images), &mut pass) {
            Act::Flat(logits) => logits,
            Act::Map(_) => unreachable!("a checked description ends in class scores"),
        }
    }
}

fn run_blocks(blocks: &[Block], mut x: Act, pass: &mut Pass<'_>) -> Act {
    for block in blocks {
        x = run_block(block, x, pass);
    }
    x
}

fn map(x: Act) -> Tensor<4> {
    match x {
        Act::Map(t) => t,
        Act::Flat(_) => unreachable!("a checked description gives maps here"),
    }
}

fn run_block(block: &Block, x: Act, pass: &mut Pass<'_>) -> Act {
    match block {
        Block::Conv(conv) => Act::Map(conv2d(conv, map(x))),
        Block::Linear(linear) => match x {
            Act::Flat(t) => Act::Flat(linear.forward(t)),
            Act::Map(_) => unreachable!("a checked description flattens before linear"),
        },
        Block::Norm(norm) => match x {
            Act::Map(t) => Act::Map(norm.run(t, pass)),
            Act::Flat(t) => Act::Flat(norm.run(t, pass)),
        },
        Block::MaxPool(pool) => Act::Map(pool.forward(map(x))),
        Block::Pool2Relu(pool) => Act::Map(pool2_relu(pool, map(x))),
        Block::AvgPool(pool) => Act::Map(pool.forward(map(x))),
        Block::Residual(r) => {
            let side = match &x {
                Act::Map(t) => Act::Map(t.clone()),
                Act::Flat(t) => Act::Flat(t.clone()),
            };
            let main = run_blocks(&r.body, x, pass);
            let side = run_blocks(&r.shortcut, side, pass);
            match (main, side) {
                (Act::Map(a), Act::Map(b)) => Act::Map(a + b),
                (Act::Flat(a), Act::Flat(b)) => Act::Flat(a + b),
                _ => unreachable!("a checked description's paths agree"),
            }
        }
        Block::Fixed(fixed) => fixed.run(x, pass),
    }
}

impl Norm {
    fn run<const D: usize>(&self, x: Tensor<D>, pass: &mut Pass<'_>) -> Tensor<D> {
        let index = pass.next_norm;
        pass.next_norm += 1;
        match &mut pass.mode {
            Mode::Eval => {
                let device = x.device();
                let n = self.gamma.dims()[0];
                let (mean, var) = match pass.norms.0.get(index) {
                    Some((m, v)) => (
                        Tensor::from_data(TensorData::new(m.clone(), [n]), &device),
                        Tensor::from_data(TensorData::new(v.clone(), [n]), &device),
                    ),
                    None => (Tensor::zeros([n], &device), Tensor::ones([n], &device)),
                };
                batch_norm(
                    x,
                    self.gamma.val(),
                    self.beta.val(),
                    mean,
                    var,
                    NORM_EPSILON,
                )
            }
            Mode::Train(_) | Mode::Batch(_) => {
                let out = batch_norm_train(x, self.gamma.val(), self.beta.val(), NORM_EPSILON);
                if let Mode::Batch(Some(seen)) = &mut pass.mode {
                    seen.push((out.mean.detach(), out.variance.detach()));
                }
                out.output
            }
        }
    }
}

impl Fixed {
    fn run(&self, x: Act, pass: &mut Pass<'_>) -> Act {
        match (&self.op, x) {
            (Op::GlobalAvgPool, x) => {
                let t = map(x);
                let [n, c, _, _] = t.dims();
                Act::Flat(t.mean_dim(3).mean_dim(2).reshape([n, c]))
            }
            (Op::Flatten, Act::Map(t)) => Act::Flat(t.flatten::<2>(1, 3)),
            (Op::Flatten, flat) => flat,
            (Op::Relu, x) => apply(x, relu, relu),
            (Op::LeakyRelu(s), x) => apply(x, |t| leaky_relu(t, *s), |t| leaky_relu(t, *s)),
            (Op::Gelu, x) => apply(x, gelu, gelu),
            (Op::Dropout(p), x) => match &mut pass.mode {
                Mode::Train(masks) if *p > 0.0 => match x {
                    Act::Map(t) => Act::Map(dropout(t, *p, masks)),
                    Act::Flat(t) => Act::Flat(dropout(t, *p, masks)),
                },
                _ => x,
            },
        }
    }
}

fn apply(
    x: Act,
    on_map: impl Fn(Tensor<4>) -> Tensor<4>,
    on_flat: impl Fn(Tensor<2>) -> Tensor<2>,
) -> Act {
    match x {
        Act::Map(t) => Act::Map(on_map(t)),
        Act::Flat(t) => Act::Flat(on_flat(t)),
    }
}

/// Zeroes each value with probability `p` and scales the rest by 1/(1-p), as PyTorch
/// does, the mask drawn from the trainer's own generator (not Burn's process-wide
/// one, which two trainings side by side would share).
fn dropout<const D: usize>(x: Tensor<D>, p: f64, masks: &mut SplitMix64) -> Tensor<D> {
    let keep = 1.0 - p;
    let shape = x.shape();
    let scale = (1.0 / keep) as f32;
    let mask: Vec<f32> = (0..shape.num_elements())
        .map(|_| if masks.next_f64() < keep { scale } else { 0.0 })
        .collect();
    let mask = Tensor::<D>::from_data(TensorData::new(mask, shape), &x.device());
    x * mask
}
