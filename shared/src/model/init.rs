//! A network's initial flat parameters, drawn from a seed with tether's own
//! generator (so the same description and seed give the same vector natively and in
//! wasm, whatever else the process draws): PyTorch's default initialisation, each
//! weight and bias uniform in ±1/√fan_in; batch norm's scale 1 and shift 0.

use super::spec::{Layer, NetSpec, Shape, Tally, check};
use crate::rng::SplitMix64;

/// The flat initial parameters of `spec` from `seed`, in the network's order.
pub fn seeded_params(spec: &NetSpec, seed: u64) -> Vec<f32> {
    let mut out = Vec::with_capacity(spec.tally.params);
    let mut rng = SplitMix64::new(seed ^ 0x1A17_5EED_0000_0000);
    let [c, h, w] = spec.input_shape();
    draw(&spec.layers, Shape::Map(c, h, w), &mut rng, &mut out);
    out
}

fn draw(layers: &[Layer], mut shape: Shape, rng: &mut SplitMix64, out: &mut Vec<f32>) {
    let uniform = |n: usize, fan_in: usize, rng: &mut SplitMix64, out: &mut Vec<f32>| {
        let bound = 1.0 / (fan_in as f64).sqrt();
        out.extend((0..n).map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32));
    };
    for layer in layers {
        let features = match shape {
            Shape::Map(c, ..) | Shape::Flat(c) => c,
        };
        match *layer {
            Layer::Conv {
                out: cout,
                kernel,
                bias,
                ..
            } => {
                let fan_in = features * kernel * kernel;
                uniform(cout * fan_in, fan_in, rng, out);
                if bias {
                    uniform(cout, fan_in, rng, out);
                }
            }
            Layer::Linear { out: n, bias } => {
                uniform(features * n, features, rng, out);
                if bias {
                    uniform(n, features, rng, out);
                }
            }
            Layer::BatchNorm => {
                out.extend(std::iter::repeat_n(1.0, features));
                out.extend(std::iter::repeat_n(0.0, features));
            }
            Layer::Residual {
                ref body,
                ref shortcut,
            } => {
                draw(body, shape, rng, out);
                draw(shortcut, shape, rng, out);
            }
            _ => {}
        }
        shape = check::walk(
            std::slice::from_ref(layer),
            shape,
            "layers",
            &mut Tally::default(),
        )
        .expect("a checked description");
    }
}
