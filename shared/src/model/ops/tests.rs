//! The custom CPU operations against Burn's own layers: outputs and every gradient
//! within 1e-4, on random shapes including odd sizes and batch 1.

use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2dConfig;
use burn::nn::pool::MaxPool2dConfig;
use burn::tensor::activation::relu;
use burn::tensor::{Device, Gradients, Tensor, TensorData};

use super::*;
use crate::rng::SplitMix64;

fn random(rng: &mut SplitMix64, dims: [usize; 4], device: &Device) -> Tensor<4> {
    let n = dims.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0)
        .collect();
    Tensor::from_data(TensorData::new(values, dims), device)
}

fn assert_close(what: &str, got: Tensor<4>, want: Tensor<4>) {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes differ");
    let (got, want) = (
        got.into_data().try_to_vec::<f32>().unwrap(),
        want.into_data().try_to_vec::<f32>().unwrap(),
    );
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
        .fold(0.0f32, f32::max);
    assert!(worst <= 1e-4, "{what}: off by {worst}");
}

/// Asserts that both outputs agree, then backpropagates the same random linear
/// read-out through each (so every output's gradient differs) and returns the
/// gradients, ours first.
fn outputs_agree_then_backward(
    what: &str,
    ours: Tensor<4>,
    theirs: Tensor<4>,
    rng: &mut SplitMix64,
    device: &Device,
) -> (Gradients, Gradients) {
    assert_close(&format!("{what}: output"), ours.clone(), theirs.clone());
    let r = random(rng, ours.dims(), device);
    (
        (ours * r.clone()).sum().backward(),
        (theirs * r).sum().backward(),
    )
}

fn close1(what: &str, got: Tensor<1>, want: Tensor<1>) {
    let n = want.dims()[0];
    assert_close(what, got.reshape([1, 1, 1, n]), want.reshape([1, 1, 1, n]));
}

#[test]
fn conv_matches_burn_forward_and_backward() {
    let device = Device::flex().autodiff();
    let mut rng = SplitMix64::new(7);
    // (batch, cin, cout, h, w, kernel, pad): odd sizes, batch 1, 1×1 kernels, no
    // padding, and the models' own layers.
    let cases = [
        (1, 1, 2, 5, 7, 3, 1),
        (3, 2, 5, 7, 5, 3, 0),
        (2, 3, 4, 6, 9, 5, 2),
        (1, 4, 3, 3, 3, 1, 0),
        (5, 3, 2, 9, 4, 3, 2),
        (4, 1, 32, 28, 28, 3, 1),
        (2, 32, 64, 14, 14, 3, 1),
        (2, 64, 128, 14, 14, 5, 2),
    ];
    for (batch, cin, cout, h, w, k, pad) in cases {
        let what = format!("conv n{batch} {cin}→{cout} {h}×{w} k{k} p{pad}");
        let conv = Conv2dConfig::new([cin, cout], [k, k])
            .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
            .init(&device);
        let x = random(&mut rng, [batch, cin, h, w], &device).require_grad();
        let (ours, theirs) = (conv2d(&conv, x.clone()), conv.forward(x.clone()));
        let (g_ours, g_theirs) =
            outputs_agree_then_backward(&what, ours, theirs, &mut rng, &device);
        assert_close(
            &format!("{what}: input gradient"),
            x.grad(&g_ours).unwrap(),
            x.grad(&g_theirs).unwrap(),
        );
        assert_close(
            &format!("{what}: weight gradient"),
            conv.weight.grad(&g_ours).unwrap(),
            conv.weight.grad(&g_theirs).unwrap(),
        );
        let bias = conv.bias.as_ref().unwrap();
        close1(
            &format!("{what}: bias gradient"),
            bias.grad(&g_ours).unwrap(),
            bias.grad(&g_theirs).unwrap(),
        );
    }
}

#[test]
fn conv_without_a_tracked_input_still_gives_the_weight_gradients() {
    // The first layer's input (the images) needs no gradient; the kernel skips it.
    let device = Device::flex().autodiff();
    let mut rng = SplitMix64::new(8);
    let conv = Conv2dConfig::new([1, 3], [3, 3])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init(&device);
    let x = random(&mut rng, [2, 1, 6, 5], &device);
    let (ours, theirs) = (conv2d(&conv, x.clone()), conv.forward(x));
    let (g_ours, g_theirs) = (ours.sum().backward(), theirs.sum().backward());
    assert_close(
        "weight gradient",
        conv.weight.grad(&g_ours).unwrap(),
        conv.weight.grad(&g_theirs).unwrap(),
    );
}

#[test]
fn pool_relu_matches_burn_forward_and_backward() {
    let device = Device::flex().autodiff();
    let mut rng = SplitMix64::new(9);
    let pool = MaxPool2dConfig::new([2, 2]).init();
    for dims in [
        [1, 1, 2, 2],
        [1, 3, 5, 7],
        [3, 2, 6, 6],
        [2, 5, 9, 4],
        [4, 32, 28, 28],
        [1, 1, 1, 3],
        [2, 3, 6, 22],
        [1, 2, 5, 19],
    ] {
        let x = random(&mut rng, dims, &device).require_grad();
        let (ours, theirs) = (pool2_relu(&pool, x.clone()), relu(pool.forward(x.clone())));
        let what = format!("pool {dims:?}");
        let (g_ours, g_theirs) =
            outputs_agree_then_backward(&what, ours, theirs, &mut rng, &device);
        assert_close(
            &format!("pool {dims:?}: input gradient"),
            x.grad(&g_ours).unwrap(),
            x.grad(&g_theirs).unwrap(),
        );
    }
}

#[test]
fn the_inference_path_matches_too() {
    // Evaluation runs on the plain CPU device: the non-autodiff implementations.
    let device = Device::flex();
    let mut rng = SplitMix64::new(10);
    let conv = Conv2dConfig::new([2, 4], [3, 3])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init(&device);
    let pool = MaxPool2dConfig::new([2, 2]).init();
    let x = random(&mut rng, [3, 2, 7, 8], &device);
    let ours = pool2_relu(&pool, conv2d(&conv, x.clone()));
    let theirs = relu(pool.forward(conv.forward(x)));
    assert_close("conv → pool → relu", ours, theirs);
}

#[test]
fn a_nan_is_passed_on() {
    let device = Device::flex();
    let pool = MaxPool2dConfig::new([2, 2]).init();
    let x = Tensor::<4>::from_data(
        TensorData::new(vec![1.0, f32::NAN, 2.0, 3.0], [1, 1, 2, 2]),
        &device,
    );
    let y = pool2_relu(&pool, x)
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    assert!(y[0].is_nan(), "{y:?}");
}

#[test]
fn conv_without_bias_runs_the_direct_kernel_and_matches_burn() {
    let device = Device::flex().autodiff();
    let mut rng = SplitMix64::new(11);
    let conv = Conv2dConfig::new([3, 5], [3, 3])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .with_bias(false)
        .init(&device);
    let x = random(&mut rng, [2, 3, 6, 7], &device).require_grad();
    let (ours, theirs) = (conv2d(&conv, x.clone()), conv.forward(x.clone()));
    let (g_ours, g_theirs) =
        outputs_agree_then_backward("no bias", ours, theirs, &mut rng, &device);
    assert_close(
        "input gradient",
        x.grad(&g_ours).unwrap(),
        x.grad(&g_theirs).unwrap(),
    );
    assert_close(
        "weight gradient",
        conv.weight.grad(&g_ours).unwrap(),
        conv.weight.grad(&g_theirs).unwrap(),
    );
}

/// The FMA burst behind `bench train`'s peak: twelve chains of 1, 8 or 16 lanes,
/// two operations each, every round; its value depends on them all.
#[test]
fn the_fma_burst_counts_its_operations() {
    let (flops, sum) = super::fma_burst(1_000);
    assert!(sum.is_finite() && sum > 0.0, "{sum}");
    let per_round = flops / 1_000.0;
    assert!(
        [24.0, 192.0, 384.0].contains(&per_round),
        "{per_round} per round"
    );
}
