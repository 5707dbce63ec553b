//! `--model` (a shipped name or a description file) and `tether models`, which lists
//! the shipped networks or checks description files before a run uses them.

use std::path::Path;

use anyhow::Result;
use clap::Args;
use tether_shared::model::{Model, SHIPPED, spec::MAX_TEXT_BYTES};

/// `--model`: a shipped network's name or a description file (`.toml`, or `.json`).
pub(crate) type ModelArg = Model;

/// Parses `--model`: a shipped name (`small`, `resnet20`, …), else a file path.
pub(crate) fn parse_model(arg: &str) -> Result<Model, String> {
    if let Some(model) = Model::shipped(arg) {
        return Ok(model);
    }
    let path = Path::new(arg);
    if !path.is_file() {
        return Err(format!(
            "{arg:?} is neither a shipped network ({}) nor a description file",
            SHIPPED.map(|(n, _)| n).join(", ")
        ));
    }
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut text = String::new();
    // One byte past the bound, so a longer file is refused by the parser, not read whole.
    std::io::Read::read_to_string(
        &mut std::io::Read::take(file, MAX_TEXT_BYTES as u64 + 1),
        &mut text,
    )
    .map_err(|e| format!("{}: {e}", path.display()))?;
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    Model::parse(&text, stem).map_err(|e| format!("{}: {e}", path.display()))
}

/// `tether models`.
#[derive(Args, Debug)]
pub struct ModelsArgs {
    /// Description files or shipped names to check and describe [default: every
    /// shipped network].
    #[arg(value_parser = parse_model)]
    pub models: Vec<ModelArg>,
}

/// Prints one line per network: name, input, classes, parameters, FLOPs, layers.
pub fn run(args: &ModelsArgs) -> Result<()> {
    let models = if args.models.is_empty() {
        SHIPPED
            .iter()
            .filter_map(|(name, _)| Model::shipped(name))
            .collect()
    } else {
        args.models.clone()
    };
    println!(
        "{:<12} {:>11} {:>8} {:>12} {:>12} {:>7}  sha256",
        "network", "input", "classes", "parameters", "MFLOP/image", "layers"
    );
    for m in &models {
        let [c, h, w] = m.data_shape();
        let crop = m
            .spec()
            .crop
            .map_or(String::new(), |s| format!(" (crop {s})"));
        println!(
            "{:<12} {:>11} {:>8} {:>12} {:>12.2} {:>7}  {}{crop}",
            m.name(),
            format!("{c}×{h}×{w}"),
            m.classes(),
            m.param_count(),
            m.forward_flops_per_sample() as f64 / 1e6,
            m.spec().tally.layers,
            &m.sha256()[..12],
        );
    }
    Ok(())
}
