//! The networks tether trains: any CNN a description ([`spec`]) sets out, built at
//! run time identically by the server and by native and browser workers, and the
//! flat parameter view that every exchange with the server uses.
//!
//! A [`Model`] is a checked description with its canonical JSON and that text's
//! SHA-256; the welcome carries both. Seven descriptions ship in `models/`
//! ([`Model::shipped`]): `small`, `paper`, `cifar` (the networks tether began
//! with), `lenet5`, `vgg`, `resnet8` and `resnet20`.

pub mod flat;
mod init;
pub mod net;
pub mod ops;
pub mod reference;
mod shipped;
pub mod spec;

use std::sync::Arc;

use burn::tensor::Device;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

pub use flat::{FlatError, load_flat, to_flat, to_flat_async};
pub use net::Net;
pub use shipped::SHIPPED;
pub use spec::{NetSpec, SpecError};

/// A network description, checked, with its canonical text and hash. Cheap to clone.
#[derive(Clone)]
pub struct Model(Arc<Inner>);

struct Inner {
    spec: NetSpec,
    json: String,
    sha256: String,
}

impl Model {
    /// The model of a checked description.
    pub fn new(spec: NetSpec) -> Self {
        let json = spec.to_json();
        let sha256 = hex(&Sha256::digest(json.as_bytes()));
        Self(Arc::new(Inner { spec, json, sha256 }))
    }

    /// A description's text: JSON if it starts with `{`, TOML otherwise.
    /// `fallback_name` names a network that does not name itself.
    pub fn parse(text: &str, fallback_name: &str) -> Result<Self, SpecError> {
        let spec = if text.trim_start().starts_with('{') {
            NetSpec::from_json(text, fallback_name)?
        } else {
            NetSpec::from_toml(text, fallback_name)?
        };
        Ok(Self::new(spec))
    }

    /// The shipped description called `name`, if there is one.
    pub fn shipped(name: &str) -> Option<Self> {
        let (_, text) = SHIPPED.iter().find(|(n, _)| *n == name)?;
        Some(Self::parse(text, name).expect("shipped descriptions are valid"))
    }

    /// The `small` network, the default for 28×28 grey images.
    pub fn small() -> Self {
        Self::shipped("small").expect("small ships")
    }

    /// The shipped network a run trains when none is named: `cifar` for CIFAR-10's
    /// 3×32×32 images, `small` otherwise.
    pub fn default_for(images: [usize; 3]) -> Self {
        match Self::shipped("cifar") {
            Some(cifar) if cifar.data_shape() == images => cifar,
            _ => Self::small(),
        }
    }

    /// The description.
    pub fn spec(&self) -> &NetSpec {
        &self.0.spec
    }

    /// The name used on the command line and in reports.
    pub fn name(&self) -> &str {
        &self.0.spec.name
    }

    /// The canonical JSON description (what the welcome carries).
    pub fn description(&self) -> &str {
        &self.0.json
    }

    /// SHA-256 of [`Self::description`], in hex.
    pub fn sha256(&self) -> &str {
        &self.0.sha256
    }

    /// What the network's first layer takes: channels, rows, cols.
    pub fn input_shape(&self) -> [usize; 3] {
        self.0.spec.input_shape()
    }

    /// The images this network trains on: channels, rows, cols. Larger than
    /// [`input_shape`](Self::input_shape) where the network sees crops of them.
    pub fn data_shape(&self) -> [usize; 3] {
        self.0.spec.input
    }

    /// Classes the network scores.
    pub fn classes(&self) -> usize {
        self.0.spec.classes
    }

    /// Number of trainable parameters, i.e. the flat vector's length.
    pub fn param_count(&self) -> usize {
        self.0.spec.tally.params
    }

    /// Multiply-adds ×2 of one forward pass on one sample (convolutions and linear
    /// layers). A training step costs about 3× this.
    pub fn forward_flops_per_sample(&self) -> u64 {
        self.0.spec.tally.flops
    }

    /// The network with the parameters of seed 0 on `device`.
    pub fn init(&self, device: &Device) -> Net {
        load_flat(Net::zeroed(self, device), &self.seeded_params(0))
            .expect("seeded parameters fit their network")
    }

    /// The flat initial parameters of seed `seed`: the same description and seed
    /// give the same vector on every machine and in every process.
    pub fn seeded_params(&self, seed: u64) -> Vec<f32> {
        init::seeded_params(&self.0.spec, seed)
    }
}

impl PartialEq for Model {
    fn eq(&self, other: &Self) -> bool {
        self.0.sha256 == other.0.sha256
    }
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Model({} {})", self.name(), &self.sha256()[..12])
    }
}

/// A shipped network's name (files are read by the binaries, which know the disk).
impl std::str::FromStr for Model {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::shipped(s).ok_or_else(|| {
            let names: Vec<&str> = SHIPPED.iter().map(|(n, _)| *n).collect();
            format!(
                "unknown model {s:?} (shipped: {}; or a .toml/.json description file)",
                names.join(", ")
            )
        })
    }
}

/// On the wire and in files: the name (for people reading a report), the canonical
/// description and its hash, checked on arrival.
#[derive(Serialize, Deserialize)]
struct Wire {
    name: String,
    description: String,
    sha256: String,
}

impl Serialize for Model {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        Wire {
            name: self.name().to_owned(),
            description: self.description().to_owned(),
            sha256: self.sha256().to_owned(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for Model {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        /// Files written before networks were descriptions name a shipped one.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Name(String),
            Wire(Wire),
        }
        // Postcard (the wire) cannot tell the forms apart; only files may be old.
        let wire = if d.is_human_readable() {
            match Written::deserialize(d)? {
                Written::Wire(wire) => wire,
                Written::Name(name) => {
                    return Self::shipped(&name).ok_or_else(|| {
                        D::Error::custom(format!("no shipped network is called {name:?}"))
                    });
                }
            }
        } else {
            Wire::deserialize(d)?
        };
        let model = Self::new(
            NetSpec::from_json(&wire.description, "unnamed")
                .map_err(|e| D::Error::custom(format!("network description: {e}")))?,
        );
        if model.sha256() != wire.sha256 {
            return Err(D::Error::custom(format!(
                "network description hashes to {}, not the {} sent with it",
                model.sha256(),
                wire.sha256
            )));
        }
        Ok(model)
    }
}

/// Why the network at the start of `bytes` (postcard, as a welcome carries it) does
/// not build, if it does not.
pub(crate) fn wire_error(bytes: &[u8]) -> Option<SpecError> {
    let (wire, _) = postcard::take_from_bytes::<Wire>(bytes).ok()?;
    match NetSpec::from_json(&wire.description, &wire.name) {
        Err(e) => Some(e),
        Ok(spec) => {
            let model = Model::new(spec);
            (model.sha256() != wire.sha256).then(|| {
                SpecError::Network(format!(
                    "the description hashes to {}, not the {} sent with it",
                    model.sha256(),
                    wire.sha256
                ))
            })
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests;
