//! `tether pack`: a data set (IDX, CIFAR-10, an image folder) written as a packed set
//! (`train.tsi`, `test.tsi`, `classes.txt`), the format a server keeps on disk and
//! streams shards from when it is larger than `--data-memory`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use tether_dataset::packed::pack_dir;
use tether_shared::data::shape_text;

use crate::ModelArg;

#[derive(Args, Debug)]
pub struct PackArgs {
    /// The data set: a folder of IDX files, CIFAR-10 binary batches, or images in
    /// class folders.
    #[arg(long)]
    pub data: PathBuf,
    /// Where the packed set goes (created; its files are replaced).
    #[arg(long)]
    pub out: PathBuf,
    /// Pack the images for this network's input (a shipped name or a description
    /// file) [default: the data's own shape; 3×32×32 for an image folder].
    #[arg(long, value_parser = crate::parse_model)]
    pub model: Option<ModelArg>,
}

pub fn run(args: &PackArgs) -> Result<()> {
    let shape = match &args.model {
        Some(model) => model.data_shape(),
        None => tether_dataset::format(&args.data).input_shape(),
    };
    let bar = tether_worker::progress::working("packing");
    bar.set_message(format!("{} at {}", args.data.display(), shape_text(shape)));
    let packed = pack_dir(&args.data, shape, &args.out);
    bar.finish_and_clear();
    let packed = packed.with_context(|| format!("packing {}", args.data.display()))?;
    println!(
        "{}: {} training and {} test images of {}, {} class names; serve it with --data {}",
        args.out.display(),
        packed.images.0,
        packed.images.1,
        shape_text(shape),
        packed.classes,
        args.out.display()
    );
    Ok(())
}
