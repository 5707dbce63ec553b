//! One layer of a network description, written as a short line: a kind, an optional
//! main number, and `key=value` settings (`conv 32 kernel=3 pad=1`, `maxpool 2`,
//! `leakyrelu 0.1`, `linear 10 bias=false`). Parsing checks the words; shapes are
//! checked later, with the whole network in view (`check.rs`).

use std::fmt;

use serde::{Deserialize, Serialize};

/// One layer (a residual block holds lists of them).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Layer {
    /// A 2-D convolution (square kernel, the same stride and zero padding on every side).
    Conv {
        /// Output channels.
        out: usize,
        /// Kernel side.
        kernel: usize,
        /// Stride.
        stride: usize,
        /// Zeros added on every side.
        pad: usize,
        /// Whether the layer adds a learnt bias.
        bias: bool,
    },
    /// Max pooling over `size`×`size` windows every `stride`.
    MaxPool {
        /// Window side.
        size: usize,
        /// Step between windows.
        stride: usize,
    },
    /// Average pooling over `size`×`size` windows every `stride`.
    AvgPool {
        /// Window side.
        size: usize,
        /// Step between windows.
        stride: usize,
    },
    /// The mean of each channel: `[C, H, W]` → `[C]`.
    GlobalAvgPool,
    /// max(x, 0).
    Relu,
    /// x for x > 0, `slope`·x otherwise.
    LeakyRelu {
        /// The negative side's slope.
        slope: f32,
    },
    /// The Gaussian error linear unit.
    Gelu,
    /// Batch normalisation over each channel (or each feature of a flat input).
    BatchNorm,
    /// Zeroes each value with probability `p` in training (scaling the rest by 1/(1-p)).
    Dropout {
        /// The probability of dropping a value.
        p: f32,
    },
    /// `[C, H, W]` → `[C·H·W]`.
    Flatten,
    /// A fully connected layer.
    Linear {
        /// Output features.
        out: usize,
        /// Whether the layer adds a learnt bias.
        bias: bool,
    },
    /// `body(x) + shortcut(x)`; an empty shortcut is the identity.
    Residual {
        /// The block's main path.
        body: Vec<Layer>,
        /// The path around it (for example a 1×1 convolution with a stride).
        shortcut: Vec<Layer>,
    },
}

/// A layer line that does not parse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LineError(pub String);

/// The `key=value` settings of one line, each taken at most once.
struct Settings<'a> {
    kind: &'a str,
    main: Option<&'a str>,
    pairs: Vec<(&'a str, &'a str)>,
}

impl<'a> Settings<'a> {
    fn split(line: &'a str) -> Result<Self, LineError> {
        let mut words = line.split_whitespace();
        let kind = words
            .next()
            .ok_or_else(|| LineError("an empty layer".into()))?;
        let (mut main, mut pairs) = (None, Vec::new());
        for (i, word) in words.enumerate() {
            match word.split_once('=') {
                Some((key, value)) => {
                    if pairs.iter().any(|(k, _)| *k == key) {
                        return Err(LineError(format!("`{key}` is given twice")));
                    }
                    pairs.push((key, value));
                }
                None if i == 0 => main = Some(word),
                None => {
                    return Err(LineError(format!(
                        "unexpected word `{word}` (settings are written key=value)"
                    )));
                }
            }
        }
        Ok(Self { kind, main, pairs })
    }

    /// Takes setting `key` (or the main number when `main` says it may be written bare).
    fn take(&mut self, key: &str, main: bool) -> Option<&'a str> {
        if let Some(i) = self.pairs.iter().position(|(k, _)| *k == key) {
            return Some(self.pairs.remove(i).1);
        }
        if main { self.main.take() } else { None }
    }

    fn count(&mut self, key: &str, main: bool) -> Result<Option<usize>, LineError> {
        self.take(key, main)
            .map(|v| {
                v.parse::<usize>()
                    .map_err(|_| LineError(format!("`{key}` must be a whole number, not `{v}`")))
            })
            .transpose()
    }

    fn required(&mut self, key: &str) -> Result<usize, LineError> {
        self.count(key, true)?.ok_or_else(|| {
            LineError(format!(
                "`{}` needs `{key}` (for example `{} 32`)",
                self.kind, self.kind
            ))
        })
    }

    fn fraction(&mut self, key: &str, default: f32) -> Result<f32, LineError> {
        match self.take(key, true) {
            None => Ok(default),
            Some(v) => v
                .parse::<f32>()
                .ok()
                .filter(|f| f.is_finite())
                .ok_or_else(|| LineError(format!("`{key}` must be a number, not `{v}`"))),
        }
    }

    fn flag(&mut self, key: &str, default: bool) -> Result<bool, LineError> {
        match self.take(key, false) {
            None => Ok(default),
            Some("true") => Ok(true),
            Some("false") => Ok(false),
            Some(v) => Err(LineError(format!(
                "`{key}` must be true or false, not `{v}`"
            ))),
        }
    }

    /// Fails on anything not taken.
    fn done(self, expected: &str) -> Result<(), LineError> {
        if let Some(main) = self.main {
            return Err(LineError(format!(
                "`{}` takes no bare value (found `{main}`)",
                self.kind
            )));
        }
        match self.pairs.first() {
            None => Ok(()),
            Some((key, _)) => Err(LineError(format!(
                "unknown setting `{key}` for `{}` (it takes {expected})",
                self.kind
            ))),
        }
    }
}

impl Layer {
    /// Parses one layer line (not a residual block: those are tables).
    pub fn parse(line: &str) -> Result<Self, LineError> {
        let mut s = Settings::split(line)?;
        let (layer, takes) = match s.kind {
            "conv" => {
                let out = s.required("out")?;
                let kernel = s.count("kernel", false)?.unwrap_or(3);
                let layer = Self::Conv {
                    out,
                    kernel,
                    stride: s.count("stride", false)?.unwrap_or(1),
                    pad: s.count("pad", false)?.unwrap_or(0),
                    bias: s.flag("bias", true)?,
                };
                (layer, "out, kernel, stride, pad, bias")
            }
            kind @ ("maxpool" | "avgpool") => {
                let size = s.count("size", true)?.unwrap_or(2);
                let stride = s.count("stride", false)?.unwrap_or(size);
                let layer = if kind == "maxpool" {
                    Self::MaxPool { size, stride }
                } else {
                    Self::AvgPool { size, stride }
                };
                (layer, "size, stride")
            }
            "globalavgpool" => (Self::GlobalAvgPool, "nothing"),
            "relu" => (Self::Relu, "nothing"),
            "leakyrelu" => (
                Self::LeakyRelu {
                    slope: s.fraction("slope", 0.01)?,
                },
                "slope",
            ),
            "gelu" => (Self::Gelu, "nothing"),
            "batchnorm" => (Self::BatchNorm, "nothing"),
            "dropout" => (
                Self::Dropout {
                    p: s.fraction("p", 0.5)?,
                },
                "p",
            ),
            "flatten" => (Self::Flatten, "nothing"),
            "linear" => {
                let out = s.required("out")?;
                let bias = s.flag("bias", true)?;
                (Self::Linear { out, bias }, "out, bias")
            }
            other => {
                return Err(LineError(format!(
                    "unknown layer `{other}` (known: conv, maxpool, avgpool, globalavgpool, \
                     relu, leakyrelu, gelu, batchnorm, dropout, flatten, linear; residual \
                     blocks are tables)"
                )));
            }
        };
        s.done(takes)?;
        Ok(layer)
    }
}

/// The line a person would write, every setting spelt out (the canonical form: the
/// same network always prints the same text, so its hash names it).
impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Conv {
                out,
                kernel,
                stride,
                pad,
                bias,
            } => {
                write!(f, "conv {out} kernel={kernel} stride={stride} pad={pad}")?;
                if !bias {
                    write!(f, " bias=false")?;
                }
                Ok(())
            }
            Self::MaxPool { size, stride } => write!(f, "maxpool {size} stride={stride}"),
            Self::AvgPool { size, stride } => write!(f, "avgpool {size} stride={stride}"),
            Self::GlobalAvgPool => write!(f, "globalavgpool"),
            Self::Relu => write!(f, "relu"),
            Self::LeakyRelu { slope } => write!(f, "leakyrelu {slope}"),
            Self::Gelu => write!(f, "gelu"),
            Self::BatchNorm => write!(f, "batchnorm"),
            Self::Dropout { p } => write!(f, "dropout {p}"),
            Self::Flatten => write!(f, "flatten"),
            Self::Linear { out, bias } => {
                write!(f, "linear {out}")?;
                if !bias {
                    write!(f, " bias=false")?;
                }
                Ok(())
            }
            Self::Residual { body, shortcut } => {
                write!(f, "residual ({} layers", body.len())?;
                if !shortcut.is_empty() {
                    write!(f, ", shortcut of {}", shortcut.len())?;
                }
                write!(f, ")")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_with_defaults_and_print_back() {
        let conv = Layer::parse("conv 32 kernel=5 pad=2").unwrap();
        assert_eq!(
            conv,
            Layer::Conv {
                out: 32,
                kernel: 5,
                stride: 1,
                pad: 2,
                bias: true
            }
        );
        assert_eq!(Layer::parse(&conv.to_string()).unwrap(), conv);
        assert_eq!(
            Layer::parse("maxpool").unwrap(),
            Layer::MaxPool { size: 2, stride: 2 }
        );
        assert_eq!(
            Layer::parse("linear out=10 bias=false").unwrap(),
            Layer::Linear {
                out: 10,
                bias: false
            }
        );
        assert_eq!(
            Layer::parse("leakyrelu 0.2").unwrap(),
            Layer::LeakyRelu { slope: 0.2 }
        );
        for line in [
            "relu",
            "gelu",
            "batchnorm",
            "flatten",
            "globalavgpool",
            "dropout 0.25",
        ] {
            let layer = Layer::parse(line).unwrap();
            assert_eq!(Layer::parse(&layer.to_string()).unwrap(), layer, "{line}");
        }
    }

    #[test]
    fn bad_lines_say_what_is_wrong() {
        let err = |line| Layer::parse(line).unwrap_err().0;
        assert!(err("convolution 3").contains("unknown layer `convolution`"));
        assert!(err("conv kernel=3").contains("needs `out`"));
        assert!(err("conv 32 kernal=3").contains("unknown setting `kernal`"));
        assert!(err("conv 32 kernel=x").contains("whole number"));
        assert!(err("conv 32 7").contains("unexpected word `7`"));
        assert!(err("relu 3").contains("no bare value"));
        assert!(err("conv 8 pad=1 pad=2").contains("twice"));
        assert!(err("linear 10 bias=maybe").contains("true or false"));
        assert!(err("dropout nan").contains("must be a number"));
        assert!(err("  ").contains("empty"));
    }
}
