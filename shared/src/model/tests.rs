//! Networks built from descriptions: the shipped ones are the hand-written networks
//! (counts, outputs, gradients), each layer kind computes what Burn's own layer does,
//! and a seed fixes the parameters.

use burn::module::{Module, Param};
use burn::nn::BatchNormConfig;
use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2dConfig;
use burn::nn::loss::CrossEntropyLoss;
use burn::nn::pool::AvgPool2dConfig;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Int, Tensor, TensorData};

use super::reference::{PaperCnnConfig, SmallCnnConfig};
use super::*;
use crate::rng::SplitMix64;

fn random<const D: usize>(seed: u64, dims: [usize; D], device: &Device) -> Tensor<D> {
    let mut rng = SplitMix64::new(seed);
    let n = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.next_f64() as f32 * 2.0 - 1.0).collect();
    Tensor::from_data(TensorData::new(v, dims), device)
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs() / b.abs().max(1.0))
        .fold(0.0f32, f32::max);
    assert!(worst <= 1e-4, "{what}: off by {worst}");
}

fn shipped(name: &str) -> Model {
    Model::shipped(name).unwrap()
}

/// Every gradient of `net`'s parameters after `loss`, in the flat order.
fn flat_grads<M: Module>(net: &M, grads: &GradientsParams) -> Vec<f32> {
    struct Collect<'a>(&'a GradientsParams, Vec<f32>);
    impl burn::module::ModuleVisitor for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let g: Tensor<D> = self
                .0
                .get(param.id)
                .expect("every parameter has a gradient");
            self.1.extend(values(g));
        }
    }
    let mut c = Collect(grads, Vec::new());
    net.visit(&mut c);
    c.1
}

#[test]
fn shipped_networks_have_the_hand_written_counts() {
    let device = Device::flex();
    assert_eq!(shipped("small").param_count(), 421_642);
    assert_eq!(shipped("paper").param_count(), 430_666);
    assert_eq!(shipped("cifar").param_count(), 433_866);
    assert_eq!(SmallCnnConfig::new().init(&device).num_params(), 421_642);
    assert_eq!(PaperCnnConfig::new().init(&device).num_params(), 430_666);
    for (name, _) in SHIPPED {
        let model = shipped(name);
        assert_eq!(
            model.init(&device).num_params(),
            model.param_count(),
            "{name}"
        );
        let [c, h, w] = model.input_shape();
        let out = model
            .init(&device)
            .forward(Tensor::zeros([2, c, h, w], &device));
        assert_eq!(out.dims(), [2, model.classes()], "{name}");
    }
    // The flop counts tether reported before descriptions.
    assert_eq!(
        shipped("small").forward_flops_per_sample(),
        2 * (225_792 + 3_612_672 + 401_408 + 1_280)
    );
    assert_eq!(
        shipped("cifar").forward_flops_per_sample(),
        2 * (3 * 64 * 25 * 784 + 64 * 128 * 25 * 196 + 128 * 64 * 9 * 49 + 576 * 256 + 2560)
    );
    assert_eq!(Model::default_for([3, 32, 32]), shipped("cifar"));
    assert_eq!(Model::default_for([1, 28, 28]), Model::small());
}

#[test]
fn shipped_networks_compute_what_the_hand_written_ones_do() {
    let device = Device::flex().autodiff();
    let loss = CrossEntropyLoss::new(None, &device);
    for name in ["small", "paper", "cifar"] {
        let model = shipped(name);
        let flat = model.seeded_params(3);
        let ours = load_flat(model.init(&device), &flat).unwrap();
        let [c, h, w] = model.input_shape();
        let x = random(4, [3, c, h, w], &device);
        let y = Tensor::<1, Int>::from_data(TensorData::new(vec![1i64, 7, 3], [3]), &device);
        let (mut m1, mut m2) = (SplitMix64::new(9), SplitMix64::new(9));
        let (out, want, grads, want_grads) = if name == "small" {
            let theirs = SmallCnnConfig::new().init(&device);
            let theirs = super::flat::load_module(theirs, &flat).unwrap();
            let (a, b) = (ours.forward_train(x.clone(), &mut m1), theirs.forward(x));
            let ga =
                GradientsParams::from_grads(loss.forward(a.clone(), y.clone()).backward(), &ours);
            let gb = GradientsParams::from_grads(loss.forward(b.clone(), y).backward(), &theirs);
            (a, b, flat_grads(&ours, &ga), flat_grads(&theirs, &gb))
        } else {
            let theirs = PaperCnnConfig::new()
                .with_channels(c)
                .with_side(h)
                .init(&device);
            let theirs = super::flat::load_module(theirs, &flat).unwrap();
            let a = ours.forward_train(x.clone(), &mut m1);
            let b = theirs.forward_train(x, &mut m2);
            let ga =
                GradientsParams::from_grads(loss.forward(a.clone(), y.clone()).backward(), &ours);
            let gb = GradientsParams::from_grads(loss.forward(b.clone(), y).backward(), &theirs);
            (a, b, flat_grads(&ours, &ga), flat_grads(&theirs, &gb))
        };
        assert_close(&format!("{name}: logits"), &values(out), &values(want));
        assert_close(&format!("{name}: gradients"), &grads, &want_grads);
    }
}

/// A one-layer-kind network `input → layers → flatten → linear 3`, its logits and
/// gradients against the same computation written with Burn's own layers.
fn check_against(
    name: &str,
    input: [usize; 3],
    layers: &str,
    reference: impl Fn(Tensor<4>, &[f32]) -> Tensor<4>,
) {
    let device = Device::flex().autodiff();
    let text =
        format!("input = {input:?}\nclasses = 3\nlayers = [{layers}, \"flatten\", \"linear 3\"]");
    let model = Model::parse(&text, &name.replace([' ', '×'], "-")).unwrap();
    let flat = model.seeded_params(5);
    let net = load_flat(model.init(&device), &flat).unwrap();
    let [c, h, w] = input;
    let x = random(6, [4, c, h, w], &device).require_grad();
    let ours = net.forward_train(x.clone(), &mut SplitMix64::new(0));
    // The reference: the body's parameters are the flat vector's head, the final
    // linear layer its tail.
    let features = reference(x.clone(), &flat);
    let n = features.dims()[1] * features.dims()[2] * features.dims()[3];
    let tail = &flat[flat.len() - (n * 3 + 3)..];
    let wl = Tensor::<2>::from_data(TensorData::new(tail[..n * 3].to_vec(), [n, 3]), &device);
    let bl = Tensor::<1>::from_data(TensorData::new(tail[n * 3..].to_vec(), [3]), &device);
    let theirs = features.flatten::<2>(1, 3).matmul(wl) + bl.unsqueeze();
    assert_close(
        &format!("{name}: logits"),
        &values(ours.clone()),
        &values(theirs.clone()),
    );
    let r = random(7, [4, 3], &device);
    let (ga, gb) = (
        (ours * r.clone()).sum().backward(),
        (theirs * r).sum().backward(),
    );
    assert_close(
        &format!("{name}: input gradient"),
        &values(x.grad(&ga).unwrap()),
        &values(x.grad(&gb).unwrap()),
    );
}

#[test]
fn each_layer_kind_matches_burns_own_layers() {
    let device = Device::flex().autodiff();
    let conv =
        |cin: usize, cout: usize, k: usize, stride: usize, pad: usize, bias: bool, flat: &[f32]| {
            let c = Conv2dConfig::new([cin, cout], [k, k])
                .with_stride([stride, stride])
                .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
                .with_bias(bias)
                .init(&device);
            super::flat::load_module(c, flat).unwrap()
        };
    check_against(
        "strided conv",
        [2, 9, 9],
        "\"conv 4 kernel=3 stride=2 pad=1\"",
        |x, f| conv(2, 4, 3, 2, 1, true, f).forward(x),
    );
    check_against(
        "conv without bias",
        [3, 6, 6],
        "\"conv 4 kernel=3 pad=1 bias=false\"",
        |x, f| conv(3, 4, 3, 1, 1, false, f).forward(x),
    );
    check_against("1×1 conv", [3, 5, 5], "\"conv 2 kernel=1\"", |x, f| {
        conv(3, 2, 1, 1, 0, true, f).forward(x)
    });
    check_against("avgpool", [2, 6, 6], "\"avgpool 2\"", |x, _| {
        AvgPool2dConfig::new([2, 2]).init().forward(x)
    });
    check_against(
        "maxpool 3 stride 2",
        [2, 7, 7],
        "\"maxpool 3 stride=2\"",
        |x, _| {
            burn::nn::pool::MaxPool2dConfig::new([3, 3])
                .with_strides([2, 2])
                .init()
                .forward(x)
        },
    );
    check_against(
        "relu then 2×2 max pool",
        [2, 6, 6],
        "\"relu\", \"maxpool 2\"",
        |x, _| {
            burn::nn::pool::MaxPool2dConfig::new([2, 2])
                .init()
                .forward(burn::tensor::activation::relu(x))
        },
    );
    check_against("gelu", [1, 4, 4], "\"gelu\"", |x, _| {
        burn::tensor::activation::gelu(x)
    });
    check_against("leaky relu", [1, 4, 4], "\"leakyrelu 0.2\"", |x, _| {
        burn::tensor::activation::leaky_relu(x, 0.2)
    });
    check_against("batch norm", [3, 4, 4], "\"batchnorm\"", |x, f| {
        let bn = BatchNormConfig::new(3).init(&device);
        super::flat::load_module(bn, f).unwrap().forward(x)
    });
    check_against(
        "residual with a projection",
        [2, 6, 6],
        "{ residual = [\"conv 3 kernel=3 pad=1\"], shortcut = [\"conv 3 kernel=1 bias=false\"] }",
        |x, f| {
            let body = conv(2, 3, 3, 1, 1, true, f);
            let side = conv(2, 3, 1, 1, 0, false, &f[3 * 2 * 9 + 3..]);
            body.forward(x.clone()) + side.forward(x)
        },
    );
}

#[test]
fn estimated_norms_score_a_batch_as_its_own_statistics_do() {
    let device = Device::flex();
    let model = shipped("resnet8");
    let net = load_flat(model.init(&device), &model.seeded_params(2)).unwrap();
    let [c, h, w] = model.input_shape();
    let x = random(3, [16, c, h, w], &device);
    // Before any estimate, evaluation normalises with mean 0, variance 1: not the
    // batch's statistics.
    let batch = values(net.forward_batch_stats(x.clone()));
    assert!(values(net.forward(x.clone())) != batch);
    // Estimated from this one batch, evaluation is the batch-statistics pass.
    let net = net.estimate_norms([x.clone()]);
    assert_close("estimated", &values(net.forward(x.clone())), &batch);
    // A copy for evaluation keeps the statistics.
    assert_close("valid copy", &values(net.valid().forward(x)), &batch);
}

#[test]
fn a_seed_fixes_the_parameters_in_the_networks_order() {
    let device = Device::flex();
    for (name, _) in SHIPPED {
        let model = shipped(name);
        let a = model.seeded_params(1);
        assert_eq!(a, model.seeded_params(1), "{name}");
        assert_ne!(a, model.seeded_params(2), "{name}");
        assert_eq!(a.len(), model.param_count(), "{name}");
        // A zeroed network holds 1 exactly where batch norms keep their scales: the
        // seeded vector has 1 there too, and 0 at the shifts that follow.
        let zero = to_flat(&Net::zeroed(&model, &device));
        for (i, (&z, &v)) in zero.iter().zip(&a).enumerate() {
            if z == 1.0 {
                assert_eq!(v, 1.0, "{name}: value {i}");
            }
        }
        assert!(a.iter().all(|v| v.abs() <= 1.0), "{name}");
    }
    // The vector does not depend on the process: a fixed digest of small's seed 0.
    let digest = Sha256::digest(bytemuck_bytes(&Model::small().seeded_params(0)));
    assert_eq!(hex(&digest)[..16], *SMALL_SEED0_DIGEST, "small, seed 0");
}

/// The first 16 hex digits of SHA-256 over small's seed-0 parameters (little-endian
/// f32): the same in every build, native or wasm.
const SMALL_SEED0_DIGEST: &str = "e17d343c5f4838b3";

fn bytemuck_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn the_wire_form_round_trips_and_refuses_a_wrong_hash() {
    let model = shipped("resnet20");
    let bytes = postcard::to_allocvec(&model).unwrap();
    let back: Model = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(back, model);
    assert_eq!(back.spec(), model.spec());
    #[derive(serde::Serialize)]
    struct Wire<'a> {
        name: &'a str,
        description: &'a str,
        sha256: &'a str,
    }
    let forged = postcard::to_allocvec(&Wire {
        name: "resnet20",
        description: model.description(),
        sha256: Model::small().sha256(),
    })
    .unwrap();
    assert!(postcard::from_bytes::<Model>(&forged).is_err());
    let bad = postcard::to_allocvec(&Wire {
        name: "x",
        description: "{\"input\":[1,2,2],\"classes\":10,\"layers\":[\"conv 8 kernel=5\"]}",
        sha256: "00",
    })
    .unwrap();
    let err = postcard::from_bytes::<Model>(&bad).unwrap_err().to_string();
    assert!(!err.is_empty());
}

#[test]
fn settings_written_before_descriptions_still_name_a_network() {
    let old: Model = serde_json::from_str("\"paper\"").unwrap();
    assert_eq!(old, shipped("paper"));
    assert!(serde_json::from_str::<Model>("\"nonet\"").is_err());
    let json = serde_json::to_string(&shipped("vgg")).unwrap();
    assert_eq!(
        serde_json::from_str::<Model>(&json).unwrap(),
        shipped("vgg")
    );
}
