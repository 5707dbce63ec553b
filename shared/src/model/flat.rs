//! The flat parameter view: every float parameter of a network copied into one
//! contiguous `Vec<f32>` and back. This vector is what every exchange sends.
//!
//! Order: Burn's module traversal order, which is the order the fields are declared
//! in — for each layer its weight then its bias — so for the small CNN:
//! conv1.weight [32,1,3,3], conv1.bias [32], conv2.weight [64,32,3,3], conv2.bias,
//! fc1.weight [3136,128], fc1.bias, fc2.weight [128,10], fc2.bias. Each tensor is
//! laid out row-major. The order is fixed by the model's source, so native and
//! browser workers agree on it.

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Tensor, TensorData};
use thiserror::Error;

use super::Net;

/// A flat vector that does not fit the network.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FlatError {
    /// The vector's length is not the network's parameter count.
    #[error("flat parameter vector has {found} values, the {model} model has {expected}")]
    WrongLength {
        /// The model's name.
        model: String,
        /// Its parameter count.
        expected: usize,
        /// The vector's length.
        found: usize,
    },
}

struct Collect<'a>(&'a mut Vec<f32>);

impl ModuleVisitor for Collect<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let data = param.val().into_data().convert::<f32>();
        // The models are f32 throughout; a dtype error here is a programming error.
        self.0
            .extend_from_slice(data.as_slice::<f32>().expect("f32 parameters"));
    }
}

/// Copies all parameters of `net` into one vector, in the documented order.
pub fn to_flat(net: &Net) -> Vec<f32> {
    let mut out = Vec::with_capacity(net.model().param_count());
    net.visit(&mut Collect(&mut out));
    out
}

struct Gather(Vec<Tensor<1>>);

impl ModuleVisitor for Gather {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let n = param.lazy_shape().num_elements();
        self.0.push(param.val().reshape([n]));
    }
}

/// [`to_flat`] without blocking: the parameters are concatenated on the device and
/// read back once, asynchronously (the browser's WebGPU backend cannot read
/// synchronously).
pub async fn to_flat_async(net: &Net) -> Vec<f32> {
    let mut gather = Gather(Vec::new());
    net.visit(&mut gather);
    let data = Tensor::cat(gather.0, 0)
        .into_data_async()
        .await
        .expect("reading parameters back from the device");
    // The models are f32 throughout; a dtype error here is a programming error.
    data.convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 parameters")
}

struct Load<'a> {
    flat: &'a [f32],
    offset: usize,
}

impl ModuleMapper for Load<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let shape = param.lazy_shape();
        let n = shape.num_elements();
        let values = self.flat[self.offset..self.offset + n].to_vec();
        self.offset += n;
        let device = param.lazy_device();
        // `Param::map` keeps the parameter's id (the optimizer's state is keyed on
        // it); a tensor made from data is a fresh leaf, so tracking is re-enabled.
        param.map(|old| {
            let fresh = Tensor::from_data(TensorData::new(values, shape), &device);
            if old.is_require_grad() {
                fresh.require_grad()
            } else {
                fresh
            }
        })
    }
}

/// Replaces all parameters of `net` by the values of `flat` (same order as
/// [`to_flat`]). The network is unchanged if the length is wrong.
pub fn load_flat(net: Net, flat: &[f32]) -> Result<Net, FlatError> {
    let expected = net.model().param_count();
    if flat.len() != expected {
        return Err(FlatError::WrongLength {
            model: net.model().name().to_owned(),
            expected,
            found: flat.len(),
        });
    }
    Ok(net.map(&mut Load { flat, offset: 0 }))
}

/// Loads any module's parameters from the first values of `flat` in its traversal
/// order (the hand-written reference networks; a layer checked against Burn's own).
pub fn load_module<M: Module>(module: M, flat: &[f32]) -> Result<M, FlatError> {
    let expected = module.num_params();
    if flat.len() < expected {
        return Err(FlatError::WrongLength {
            model: "module".into(),
            expected,
            found: flat.len(),
        });
    }
    Ok(module.map(&mut Load { flat, offset: 0 }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;
    use burn::module::Module;
    use burn::tensor::Device;

    #[test]
    fn round_trip_is_bit_exact() {
        let device = Device::flex();
        for kind in ["small", "paper", "resnet8"].map(|n| Model::shipped(n).unwrap()) {
            let a = kind.init(&device);
            let b = load_flat(kind.init(&device), &kind.seeded_params(1)).unwrap();
            let flat_a = to_flat(&a);
            assert_eq!(flat_a.len(), kind.param_count());
            assert_ne!(flat_a, to_flat(&b));
            let b = load_flat(b, &flat_a).unwrap();
            let back = to_flat(&b);
            assert!(
                flat_a
                    .iter()
                    .zip(&back)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{kind:?}"
            );
            // And the loaded network computes what the original does.
            let [c, h, w] = kind.input_shape();
            let x = Tensor::<4>::ones([2, c, h, w], &device);
            let (ya, yb) = (a.valid().forward(x.clone()), b.valid().forward(x));
            assert_eq!(ya.into_data(), yb.into_data());
        }
    }

    #[test]
    fn order_starts_with_the_first_layers_weight_then_bias() {
        let device = Device::flex();
        let small = Model::small();
        let net = small.init(&device);
        let flat: Vec<f32> = (0..small.param_count()).map(|i| i as f32).collect();
        let net = load_flat(net, &flat).unwrap();
        let back = to_flat(&net);
        assert_eq!(&back[..3], &[0.0, 1.0, 2.0]);
        assert_eq!(back, flat);
    }

    #[test]
    fn wrong_length_is_an_error_and_changes_nothing() {
        let device = Device::flex();
        let net = Model::small().init(&device);
        let before = to_flat(&net);
        let err = load_flat(net.clone(), &before[1..]).unwrap_err();
        assert_eq!(
            err,
            FlatError::WrongLength {
                model: "small".into(),
                expected: 421_642,
                found: 421_641
            }
        );
        assert_eq!(to_flat(&net), before);
    }
}
