//! CPU kernels for the layers that dominate a training step, plugged into Burn
//! through its backend extension: a convolution that stays in NCHW (computed
//! directly from padded images with a SIMD register tile where the CPU has one,
//! else as one GEMM per image for the forward pass, weight gradient and input
//! gradient) and 2×2 max-pooling fused with ReLU. They run when a tensor lives on
//! the CPU backend (`flex`, native or wasm); on any other device the same functions
//! call Burn's own layers, so the models have one `forward` for every worker.
//!
//! Burn's modules keep the parameters, its autodiff the graph and its optimizer the
//! step; only these two operations' forward and backward are ours (see the
//! `Autodiff<Flex>` implementation below).

mod conv;
mod direct;
mod gemm;
mod pool;
mod tile;

use std::borrow::Cow;
use std::sync::Arc;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{
    Autodiff, Backend, Dispatch, DispatchDevice, Flex, TensorMetadata, backend_extension,
};
use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::nn::pool::MaxPool2d;
use burn::tensor::activation::relu;
use burn::tensor::{DType, Shape, Tensor, TensorData};

use conv::{ConvShape, Path};

/// The operations tether adds to the CPU backend.
#[backend_extension(Flex, Autodiff)]
pub trait CpuOps: Backend {
    /// `conv(x, weight) + bias`, stride 1, `pad` zeros on every side, square kernel.
    fn conv2d_nchw(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        pad: usize,
    ) -> FloatTensor<Self>;

    /// `relu(max_pool2d(x, 2, stride 2))`.
    fn pool2_relu(x: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// How this machine's CPU convolutions run, in words ("direct conv (AVX2+FMA)",
/// "im2col+GEMM conv", ...), and the worst disagreement of its kernel with im2col +
/// GEMM on the test convolutions it passed (or failed) before it was chosen.
pub fn cpu_conv() -> (&'static str, f32) {
    let (path, worst) = Path::chosen();
    (path.name(), worst)
}

pub use conv::choose as choose_cpu_conv;

/// Runs `rounds` rounds of independent fused multiply-adds on registers only, with
/// the vectors of the tile kernel this process's convolutions use (the widest the
/// CPU has): a core's peak f32 rate when the caller times it (this crate keeps no
/// clock). Returns the floating-point operations done and a value that depends on
/// all of them (so no compiler drops the loop).
pub fn fma_burst(rounds: u64) -> (f64, f32) {
    let kernel = match conv::Path::chosen().0 {
        conv::Path::Direct(kernel) => kernel,
        conv::Path::Gemm => tile::Kernel::detect(),
    };
    tile::fma_burst(kernel, rounds)
}

/// Whether `t` is an f32 tensor on the CPU backend (with or without autodiff).
fn on_cpu<const D: usize>(t: &Tensor<D>) -> bool {
    let device = t.device();
    let flex = match device.as_dispatch() {
        DispatchDevice::Flex(_) => true,
        DispatchDevice::Autodiff(inner) => matches!(**inner, DispatchDevice::Flex(_)),
        #[allow(unreachable_patterns)] // only Flex and Autodiff in a CPU-only build
        _ => false,
    };
    flex && t.dtype() == DType::F32
}

/// `conv.forward(x)`, through [`CpuOps::conv2d_nchw`] when it applies: a CPU tensor
/// and a convolution the direct kernels take (stride 1, no dilation or groups, a
/// square kernel, the same padding on every side, less than the kernel); Burn's
/// own layer for the rest.
pub fn conv2d(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    let [k, kw] = conv.kernel_size;
    let pad = match conv.padding {
        PaddingConfig2d::Explicit(t, l, b, r) if t == l && l == b && b == r => Some(t),
        PaddingConfig2d::Valid => Some(0),
        _ => None,
    };
    let plain = conv.stride == [1, 1] && conv.dilation == [1, 1] && conv.groups == 1 && k == kw;
    match pad {
        Some(pad) if plain && pad < k && on_cpu(&x) => {
            // A convolution without bias adds zeros: a constant, so no gradient for it.
            let bias = match &conv.bias {
                Some(bias) => bias.val(),
                None => Tensor::zeros([conv.weight.dims()[0]], &x.device()),
            };
            Tensor::from_dispatch(<Dispatch as CpuOps>::conv2d_nchw(
                x.into_dispatch(),
                conv.weight.val().into_dispatch(),
                bias.into_dispatch(),
                pad,
            ))
        }
        _ => conv.forward(x),
    }
}

/// `relu(pool.forward(x))`, fused through [`CpuOps::pool2_relu`] for a CPU tensor
/// and a plain 2×2, stride-2 pool.
pub fn pool2_relu(pool: &MaxPool2d, x: Tensor<4>) -> Tensor<4> {
    let plain = pool.kernel_size == [2, 2]
        && pool.stride == [2, 2]
        && pool.dilation == [1, 1]
        && !pool.ceil_mode
        && matches!(
            pool.padding,
            PaddingConfig2d::Valid | PaddingConfig2d::Explicit(0, 0, 0, 0)
        );
    if plain && on_cpu(&x) {
        Tensor::from_dispatch(<Dispatch as CpuOps>::pool2_relu(x.into_dispatch()))
    } else {
        relu(pool.forward(x))
    }
}

/// The values of an f32 CPU tensor in row-major order (copied only if strided).
fn values(t: &FlexTensor) -> Cow<'_, [f32]> {
    match t.as_slice::<f32>() {
        Some(s) => Cow::Borrowed(s),
        None => Cow::Owned(
            t.to_contiguous()
                .into_data()
                .try_to_vec::<f32>()
                .expect("f32 tensor"),
        ),
    }
}

fn tensor(values: Vec<f32>, shape: impl Into<Shape>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape.into()))
}

fn conv_shape(x: &FlexTensor, weight: &FlexTensor, pad: usize) -> ConvShape {
    let (xs, ws) = (x.shape(), weight.shape());
    assert_eq!(xs.num_dims(), 4, "conv2d input must be [N, C, H, W]");
    assert_eq!(ws.num_dims(), 4, "conv2d weight must be [Cout, Cin, k, k]");
    assert_eq!(ws[1], xs[1], "conv2d weight and input channels differ");
    assert_eq!(ws[2], ws[3], "conv2d kernel must be square");
    let s = ConvShape {
        batch: xs[0],
        cin: xs[1],
        cout: ws[0],
        height: xs[2],
        width: xs[3],
        kernel: ws[2],
        pad,
    };
    assert!(
        s.height + 2 * pad >= s.kernel && s.width + 2 * pad >= s.kernel,
        "conv2d kernel larger than the padded input"
    );
    s
}

fn conv_forward(x: &FlexTensor, weight: &FlexTensor, bias: &FlexTensor, pad: usize) -> FlexTensor {
    let s = conv_shape(x, weight, pad);
    let y = conv::forward(
        &s,
        Path::chosen().0,
        &values(x),
        &values(weight),
        &values(bias),
    );
    let (ho, wo) = s.out_hw();
    tensor(y, [s.batch, s.cout, ho, wo])
}

/// `(planes, h, w)` of an NCHW shape.
fn planes(shape: &Shape) -> (usize, usize, usize) {
    assert_eq!(shape.num_dims(), 4, "pooling input must be [N, C, H, W]");
    (shape[0] * shape[1], shape[2], shape[3])
}

fn pool_forward(x: &FlexTensor) -> (FlexTensor, Vec<u8>, Shape) {
    let shape = x.shape();
    let (p, h, w) = planes(&shape);
    let (y, arg) = pool::forward(&values(x), p, h, w);
    let out = tensor(y, [shape[0], shape[1], h / 2, w / 2]);
    (out, arg, shape)
}

impl CpuOps for Flex {
    fn conv2d_nchw(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        pad: usize,
    ) -> FloatTensor<Self> {
        conv_forward(&x, &weight, &bias, pad)
    }

    fn pool2_relu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        pool_forward(&x).0
    }
}

/// The convolution's backward step: what it keeps is the input and the weight.
#[derive(Debug)]
struct ConvBackward;

impl Backward<Flex, 3> for ConvBackward {
    type State = (FlexTensor, FlexTensor, usize);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w, node_b] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        let (x, weight, pad) = ops.state;
        let s = conv_shape(&x, &weight, pad);
        let (dx, dw, db) = conv::backward(
            &s,
            Path::chosen().0,
            &values(&x),
            &values(&weight),
            &values(&dy),
            node_x.is_some(),
        );
        if let (Some(node), Some(dx)) = (node_x, dx) {
            grads.register::<Flex>(node.id, tensor(dx, x.shape()));
        }
        if let Some(node) = node_w {
            grads.register::<Flex>(node.id, tensor(dw, weight.shape()));
        }
        if let Some(node) = node_b {
            grads.register::<Flex>(node.id, tensor(db, [s.cout]));
        }
    }
}

/// The fused pool's backward step: what it keeps is one winner byte per output.
#[derive(Debug)]
struct PoolBackward;

impl Backward<Flex, 1> for PoolBackward {
    type State = (Arc<[u8]>, Shape);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let dy = grads.consume::<Flex>(&ops.node);
        let (arg, shape) = ops.state;
        if let Some(node) = node_x {
            let (p, h, w) = planes(&shape);
            let dx = pool::backward(&values(&dy), &arg, p, h, w);
            grads.register::<Flex>(node.id, tensor(dx, shape));
        }
    }
}

impl<C: CheckpointStrategy> CpuOps for Autodiff<Flex, C> {
    fn conv2d_nchw(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        pad: usize,
    ) -> FloatTensor<Self> {
        match ConvBackward
            .prepare::<C>([x.node(), weight.node(), bias.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (x, weight, bias) = (
                    x.into_primitive(),
                    weight.into_primitive(),
                    bias.into_primitive(),
                );
                let y = conv_forward(&x, &weight, &bias, pad);
                prep.finish((x, weight, pad), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(conv_forward(
                x.primitive(),
                weight.primitive(),
                bias.primitive(),
                pad,
            )),
        }
    }

    fn pool2_relu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        match PoolBackward
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (y, arg, shape) = pool_forward(x.primitive());
                prep.finish((Arc::from(arg), shape), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(pool_forward(x.primitive()).0),
        }
    }
}

#[cfg(test)]
mod tests;
