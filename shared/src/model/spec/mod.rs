//! A network described in a file: the input, the augmentation and the layers, in
//! TOML (for people) or JSON (the same fields; what the welcome carries).
//!
//! ```toml
//! name = "small"
//! input = [1, 28, 28]       # channels, height, width of the images
//! classes = 10
//! layers = [
//!   "conv 32 kernel=3 pad=1", "relu", "maxpool 2",
//!   { residual = ["conv 32 kernel=3 pad=1", "batchnorm", "relu"] },
//!   "flatten", "linear 10",
//! ]
//! [augment]                 # optional: training sees random crops, scoring the centre
//! crop = 24
//! flip = true
//! ```
//!
//! A block is a table: `{ residual = [...], shortcut = [...] }` (no shortcut: the
//! identity) or `{ repeat = 3, layers = [...] }` (each copy its own parameters).
//! Parsing checks every word and every shape ([`check`]); a [`NetSpec`] is a network
//! that fits, within the bounds a worker accepts.

pub mod check;
mod layer;

use serde::de::{self, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use thiserror::Error;

pub use check::{Shape, Tally};
pub use layer::Layer;

/// The longest description accepted, as written.
pub const MAX_TEXT_BYTES: usize = 64 * 1024;
/// The longest canonical description: what the welcome carries, within a frame header.
pub const MAX_CANONICAL_BYTES: usize = 12 * 1024;
/// How deep residual blocks and repeats may nest.
const MAX_DEPTH: usize = 8;
/// Most copies one `repeat` may make.
const MAX_REPEAT: usize = 64;

/// A description that cannot be built, with where and why.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SpecError {
    /// The text is not TOML/JSON of the description's form (unknown keys included).
    #[error("{0}")]
    Syntax(String),
    /// One layer does not fit its input or its words do not parse.
    #[error("{at} `{layer}`: {problem}")]
    Layer {
        /// Where: `layers[4]`, `layers[2].residual[1]`.
        at: String,
        /// The layer as a line.
        layer: String,
        /// What is wrong, with the shapes.
        problem: String,
    },
    /// The description as a whole is wrong.
    #[error("{0}")]
    Network(String),
    /// The network asks for more than a worker gives.
    #[error("{what} is {value}, more than the {limit} a description may ask for")]
    TooLarge {
        /// What is counted.
        what: String,
        /// How many the description asks for.
        value: u128,
        /// The bound.
        limit: u128,
    },
}

/// A checked network description.
#[derive(Clone, Debug, PartialEq)]
pub struct NetSpec {
    /// The network's name (the file's, unless the description names it).
    pub name: String,
    /// The images it trains on: channels, height, width.
    pub input: [usize; 3],
    /// Classes it scores.
    pub classes: usize,
    /// Side of the square window the first layer sees (random in training, the
    /// centre when scoring); `None`: the whole image.
    pub crop: Option<usize>,
    /// Random horizontal flips in training.
    pub flip: bool,
    /// The layers, repeats expanded.
    pub layers: Vec<Layer>,
    /// Parameters, FLOPs, activations and layers.
    pub tally: Tally,
}

/// One entry of a `layers` list as written.
enum Item {
    Line(String),
    Residual {
        body: Vec<Item>,
        shortcut: Vec<Item>,
    },
    Repeat {
        times: usize,
        layers: Vec<Item>,
    },
}

impl<'de> Deserialize<'de> for Item {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ItemVisitor)
    }
}

struct ItemVisitor;

impl<'de> Visitor<'de> for ItemVisitor {
    type Value = Item;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a layer line such as \"conv 32 kernel=3\", or a { residual = [...] } or { repeat = N, layers = [...] } block")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Item, E> {
        Ok(Item::Line(v.to_owned()))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Item, A::Error> {
        let (mut body, mut shortcut, mut times, mut layers) = (None, None, None, None);
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "residual" => body = Some(map.next_value::<Vec<Item>>()?),
                "shortcut" => shortcut = Some(map.next_value::<Vec<Item>>()?),
                "repeat" => times = Some(map.next_value::<usize>()?),
                "layers" => layers = Some(map.next_value::<Vec<Item>>()?),
                other => {
                    return Err(de::Error::unknown_field(
                        other,
                        &["residual", "shortcut", "repeat", "layers"],
                    ));
                }
            }
        }
        match (body, shortcut, times, layers) {
            (Some(body), shortcut, None, None) => Ok(Item::Residual {
                body,
                shortcut: shortcut.unwrap_or_default(),
            }),
            (None, None, Some(times), Some(layers)) => Ok(Item::Repeat { times, layers }),
            _ => Err(de::Error::custom(
                "a block is either { residual = [...], shortcut = [...] } or { repeat = N, layers = [...] }",
            )),
        }
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<Item, A::Error> {
        Err(de::Error::custom(
            "a layer is a line or a table, not a list",
        ))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Description {
    name: Option<String>,
    input: [usize; 3],
    classes: usize,
    #[serde(default)]
    augment: Augment,
    layers: Vec<Item>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Augment {
    crop: Option<usize>,
    #[serde(default)]
    flip: bool,
}

/// Expands repeats and parses lines, `path` naming the list for errors.
fn expand(items: &[Item], path: &str, depth: usize, out: &mut Vec<Layer>) -> Result<(), SpecError> {
    if depth > MAX_DEPTH {
        return Err(SpecError::Network(format!(
            "{path}: blocks nest deeper than {MAX_DEPTH}"
        )));
    }
    for (i, item) in items.iter().enumerate() {
        let at = format!("{path}[{i}]");
        match item {
            Item::Line(line) => out.push(Layer::parse(line).map_err(|e| SpecError::Layer {
                at,
                layer: line.clone(),
                problem: e.0,
            })?),
            Item::Residual { body, shortcut } => {
                let (mut b, mut s) = (Vec::new(), Vec::new());
                expand(body, &format!("{at}.residual"), depth + 1, &mut b)?;
                expand(shortcut, &format!("{at}.shortcut"), depth + 1, &mut s)?;
                out.push(Layer::Residual {
                    body: b,
                    shortcut: s,
                });
            }
            Item::Repeat { times, layers } => {
                if !(1..=MAX_REPEAT).contains(times) {
                    return Err(SpecError::Network(format!(
                        "{at}: repeat {times} must lie in 1..={MAX_REPEAT}"
                    )));
                }
                for _ in 0..*times {
                    expand(layers, &format!("{at}.layers"), depth + 1, out)?;
                    if out.len() > check::MAX_LAYERS {
                        return Err(SpecError::TooLarge {
                            what: "the number of layers".into(),
                            value: out.len() as u128,
                            limit: check::MAX_LAYERS as u128,
                        });
                    }
                }
            }
        }
    }
    Ok(())
}

impl NetSpec {
    /// Parses a TOML description; `fallback_name` names a network that does not
    /// name itself (the file's stem).
    pub fn from_toml(text: &str, fallback_name: &str) -> Result<Self, SpecError> {
        bound_text(text)?;
        let d: Description = toml::from_str(text).map_err(|e| SpecError::Syntax(e.to_string()))?;
        Self::from_description(d, fallback_name)
    }

    /// Parses a JSON description (the canonical form the welcome carries, or a file).
    pub fn from_json(text: &str, fallback_name: &str) -> Result<Self, SpecError> {
        bound_text(text)?;
        let d: Description =
            serde_json::from_str(text).map_err(|e| SpecError::Syntax(e.to_string()))?;
        Self::from_description(d, fallback_name)
    }

    fn from_description(d: Description, fallback_name: &str) -> Result<Self, SpecError> {
        let name = clean_name(d.name.as_deref().unwrap_or(fallback_name))?;
        let [c, h, w] = d.input;
        if c == 0 || c > check::MAX_CHANNELS || h == 0 || w == 0 || h.max(w) > check::MAX_SIDE {
            return Err(SpecError::Network(format!(
                "input {c}×{h}×{w}: channels must lie in 1..={}, sides in 1..={}",
                check::MAX_CHANNELS,
                check::MAX_SIDE
            )));
        }
        if !(2..=check::MAX_CLASSES).contains(&d.classes) {
            return Err(SpecError::Network(format!(
                "classes = {}: a classifier scores 2..={} classes",
                d.classes,
                check::MAX_CLASSES
            )));
        }
        if let Some(crop) = d.augment.crop
            && (crop == 0 || crop > h.min(w))
        {
            return Err(SpecError::Network(format!(
                "augment.crop = {crop} does not fit {h}×{w} images"
            )));
        }
        let mut layers = Vec::new();
        expand(&d.layers, "layers", 0, &mut layers)?;
        let side = d.augment.crop;
        let first = Shape::Map(c, side.unwrap_or(h), side.unwrap_or(w));
        let mut tally = Tally::default();
        let out = check::walk(&layers, first, "layers", &mut tally)?;
        if out != Shape::Flat(d.classes) {
            return Err(SpecError::Network(format!(
                "the network ends in {out}, but scores {} classes: end with `linear {}`",
                d.classes, d.classes
            )));
        }
        let spec = Self {
            name,
            input: d.input,
            classes: d.classes,
            crop: d.augment.crop,
            flip: d.augment.flip,
            layers,
            tally,
        };
        let canonical = spec.to_json().len();
        if canonical > MAX_CANONICAL_BYTES {
            return Err(SpecError::TooLarge {
                what: "the canonical description's length in bytes".into(),
                value: canonical as u128,
                limit: MAX_CANONICAL_BYTES as u128,
            });
        }
        Ok(spec)
    }

    /// What the first layer takes: channels, rows, cols (the crop, if any).
    pub fn input_shape(&self) -> [usize; 3] {
        let [c, h, w] = self.input;
        match self.crop {
            Some(side) => [c, side, side],
            None => [c, h, w],
        }
    }

    /// The canonical JSON: every setting spelt out, repeats expanded, so the same
    /// network always gives the same text (and hash).
    pub fn to_json(&self) -> String {
        fn lines(layers: &[Layer]) -> Vec<serde_json::Value> {
            layers
                .iter()
                .map(|layer| match layer {
                    Layer::Residual { body, shortcut } => {
                        let mut block = serde_json::Map::new();
                        block.insert("residual".into(), lines(body).into());
                        if !shortcut.is_empty() {
                            block.insert("shortcut".into(), lines(shortcut).into());
                        }
                        block.into()
                    }
                    other => other.to_string().into(),
                })
                .collect()
        }
        let mut augment = serde_json::Map::new();
        if let Some(crop) = self.crop {
            augment.insert("crop".into(), crop.into());
        }
        augment.insert("flip".into(), self.flip.into());
        serde_json::json!({
            "name": self.name,
            "input": self.input,
            "classes": self.classes,
            "augment": augment,
            "layers": lines(&self.layers),
        })
        .to_string()
    }
}

fn bound_text(text: &str) -> Result<(), SpecError> {
    if text.len() > MAX_TEXT_BYTES {
        return Err(SpecError::TooLarge {
            what: "the description's length in bytes".into(),
            value: text.len() as u128,
            limit: MAX_TEXT_BYTES as u128,
        });
    }
    Ok(())
}

/// A name of 1–64 letters, digits, `-`, `_` or `.`.
fn clean_name(name: &str) -> Result<String, SpecError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(name.to_owned())
    } else {
        Err(SpecError::Network(format!(
            "name {name:?}: use 1–64 letters, digits, '-', '_' or '.'"
        )))
    }
}

#[cfg(test)]
mod tests;
