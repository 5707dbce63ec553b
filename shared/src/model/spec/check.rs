//! Shape inference over a description: each layer's output shape from its input,
//! the parameter count, the forward FLOPs and the activations one image keeps, with
//! an error naming the layer and the shapes wherever a layer does not fit, and the
//! bounds that keep a description (possibly a hostile server's) from asking a
//! worker for unbounded memory.

use super::SpecError;
use super::layer::Layer;

/// Most layers a network may have, counting those inside residual blocks.
pub const MAX_LAYERS: usize = 512;
/// Most trainable parameters (the flat vector every exchange sends): 128 MiB of f32.
pub const MAX_PARAMS: usize = 32 << 20;
/// Most values all layers' outputs hold for one image (what a training step keeps).
pub const MAX_ACTIVATIONS: usize = 16 << 20;
/// Most channels or features any layer may produce.
pub const MAX_WIDTH: usize = 16_384;
/// Largest kernel or pooling window side.
pub const MAX_KERNEL: usize = 15;
/// Largest image side a network may take.
pub const MAX_SIDE: usize = 1024;
/// Most input channels (grey, RGB, RGBA and a little more).
pub const MAX_CHANNELS: usize = 16;
/// Most classes a network may score.
pub const MAX_CLASSES: usize = 100_000;

/// What flows between layers for one image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Channels × height × width.
    Map(usize, usize, usize),
    /// A vector of features.
    Flat(usize),
}

impl Shape {
    fn len(self) -> usize {
        match self {
            Self::Map(c, h, w) => c * h * w,
            Self::Flat(n) => n,
        }
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Map(c, h, w) => write!(f, "{c}×{h}×{w}"),
            Self::Flat(n) => write!(f, "{n} features"),
        }
    }
}

/// What a network costs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Trainable parameters.
    pub params: usize,
    /// Multiply-adds ×2 of one forward pass on one image (convolutions and linear layers).
    pub flops: u64,
    /// Values all layers' outputs hold for one image.
    pub activations: usize,
    /// Layers, counting those inside residual blocks.
    pub layers: usize,
}

/// Walks `layers` from `input`; `path` names the list (`layers`, `layers[3].residual`).
pub fn walk(
    layers: &[Layer],
    input: Shape,
    path: &str,
    tally: &mut Tally,
) -> Result<Shape, SpecError> {
    let mut shape = input;
    for (i, layer) in layers.iter().enumerate() {
        let at = format!("{path}[{i}]");
        tally.layers += 1;
        if tally.layers > MAX_LAYERS {
            return Err(SpecError::TooLarge {
                what: "the number of layers".into(),
                value: tally.layers as u128,
                limit: MAX_LAYERS as u128,
            });
        }
        let fail = |problem: String| SpecError::Layer {
            at: at.clone(),
            layer: layer.to_string(),
            problem,
        };
        shape = step(layer, shape, &at, tally).map_err(|e| match e {
            Problem::Here(p) => fail(p),
            Problem::Inner(e) => e,
        })?;
        tally.activations = tally.activations.saturating_add(shape.len());
        if tally.activations > MAX_ACTIVATIONS {
            return Err(fail(format!(
                "the activations of one image pass {MAX_ACTIVATIONS} values here"
            )));
        }
        if tally.params > MAX_PARAMS {
            return Err(fail(format!(
                "the network passes {MAX_PARAMS} parameters here ({})",
                tally.params
            )));
        }
    }
    Ok(shape)
}

enum Problem {
    Here(String),
    Inner(SpecError),
}

impl From<String> for Problem {
    fn from(s: String) -> Self {
        Self::Here(s)
    }
}

fn bounded(what: &str, value: usize, limit: usize) -> Result<(), Problem> {
    if value > limit {
        return Err(Problem::Here(format!(
            "{what} {value} is more than {limit}"
        )));
    }
    Ok(())
}

/// Output side of a window of `k` every `s` over `n` padded by `p`, if it fits.
fn out_side(n: usize, k: usize, s: usize, p: usize) -> Option<usize> {
    (n + 2 * p >= k).then(|| (n + 2 * p - k) / s + 1)
}

fn map(shape: Shape, kind: &str) -> Result<(usize, usize, usize), Problem> {
    match shape {
        Shape::Map(c, h, w) => Ok((c, h, w)),
        Shape::Flat(n) => Err(Problem::Here(format!(
            "{kind} needs a channels×height×width input, but gets {n} features"
        ))),
    }
}

fn step(layer: &Layer, shape: Shape, at: &str, tally: &mut Tally) -> Result<Shape, Problem> {
    Ok(match *layer {
        Layer::Conv {
            out,
            kernel,
            stride,
            pad,
            bias,
        } => {
            let (c, h, w) = map(shape, "a convolution")?;
            bounded("output channels", out, MAX_WIDTH)?;
            bounded("kernel side", kernel, MAX_KERNEL)?;
            bounded("stride", stride, MAX_KERNEL)?;
            if out == 0 || kernel == 0 || stride == 0 {
                return Err("out, kernel and stride must be at least 1"
                    .to_string()
                    .into());
            }
            if pad >= kernel {
                return Err(
                    format!("padding {pad} must be less than the kernel side {kernel}").into(),
                );
            }
            let (Some(ho), Some(wo)) = (
                out_side(h, kernel, stride, pad),
                out_side(w, kernel, stride, pad),
            ) else {
                return Err(format!(
                    "a {kernel}×{kernel} kernel does not fit a {h}×{w} map (padding {pad}; input {c}×{h}×{w})"
                )
                .into());
            };
            tally.params += out * c * kernel * kernel + if bias { out } else { 0 };
            tally.flops += 2 * (c * out * kernel * kernel * ho * wo) as u64;
            Shape::Map(out, ho, wo)
        }
        Layer::MaxPool { size, stride } | Layer::AvgPool { size, stride } => {
            let (c, h, w) = map(shape, "pooling")?;
            bounded("window side", size, MAX_KERNEL)?;
            bounded("stride", stride, MAX_KERNEL)?;
            if size == 0 || stride == 0 {
                return Err("size and stride must be at least 1".to_string().into());
            }
            let (Some(ho), Some(wo)) = (out_side(h, size, stride, 0), out_side(w, size, stride, 0))
            else {
                return Err(
                    format!("a {size}×{size} window does not fit a {c}×{h}×{w} map").into(),
                );
            };
            Shape::Map(c, ho, wo)
        }
        Layer::GlobalAvgPool => Shape::Flat(map(shape, "global average pooling")?.0),
        Layer::Relu | Layer::Gelu => shape,
        Layer::LeakyRelu { slope } => {
            if !(0.0..1.0).contains(&slope) {
                return Err(format!("the slope {slope} must lie in [0, 1)").into());
            }
            shape
        }
        Layer::Dropout { p } => {
            if !(0.0..1.0).contains(&p) {
                return Err(format!("the probability {p} must lie in [0, 1)").into());
            }
            shape
        }
        Layer::BatchNorm => {
            let features = match shape {
                Shape::Map(c, ..) | Shape::Flat(c) => c,
            };
            tally.params += 2 * features;
            shape
        }
        Layer::Flatten => Shape::Flat(shape.len()),
        Layer::Linear { out, bias } => {
            let Shape::Flat(inputs) = shape else {
                return Err(format!(
                    "a linear layer needs flat input, but gets {shape}: put `flatten` or \
                     `globalavgpool` before it"
                )
                .into());
            };
            bounded("output features", out, MAX_CLASSES.max(MAX_WIDTH))?;
            if out == 0 {
                return Err("out must be at least 1".to_string().into());
            }
            let weights = inputs
                .checked_mul(out)
                .filter(|&n| n <= MAX_PARAMS)
                .ok_or_else(|| {
                    format!("{inputs} inputs × {out} outputs is more than {MAX_PARAMS} parameters")
                })?;
            tally.params += weights + if bias { out } else { 0 };
            tally.flops += 2 * weights as u64;
            Shape::Flat(out)
        }
        Layer::Residual {
            ref body,
            ref shortcut,
        } => {
            if body.is_empty() {
                return Err("a residual block needs a body".to_string().into());
            }
            let main =
                walk(body, shape, &format!("{at}.residual"), tally).map_err(Problem::Inner)?;
            let side =
                walk(shortcut, shape, &format!("{at}.shortcut"), tally).map_err(Problem::Inner)?;
            if main != side {
                let what = if shortcut.is_empty() {
                    "the identity shortcut"
                } else {
                    "its shortcut"
                };
                return Err(format!(
                    "the body gives {main} but {what} gives {side}: add a shortcut such as \
                     [\"conv {} kernel=1 stride=2 bias=false\", \"batchnorm\"]",
                    match main {
                        Shape::Map(c, ..) | Shape::Flat(c) => c,
                    }
                )
                .into());
            }
            main
        }
    })
}
