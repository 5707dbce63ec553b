//! Turning image files into the network's pixels: each file decoded within size
//! and allocation limits and resized, a list of files decoded on every core, and a
//! list of any length decoded straight into a packed file, a chunk at a time.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use image::imageops::FilterType;
use image::{ImageReader, Limits};
use tether_shared::data::{ImageSet, encode_head};

use super::{Item, MAX_DECODED, MAX_SIDE, SHOWN};

/// Decodes `items` on every core, in order; undecodable files are counted.
pub(super) fn decode_all(
    items: &[Item],
    shape: [usize; 3],
    source: &str,
    skipped: &mut (usize, Vec<String>),
) -> ImageSet {
    let [channels, rows, cols] = shape;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(8);
    let chunk = items.len().div_ceil(threads).max(1);
    let decoded: Vec<Vec<Result<Vec<u8>, String>>> = std::thread::scope(|s| {
        let handles: Vec<_> = items
            .chunks(chunk)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|i| decode(&i.path, shape))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let mut set = ImageSet {
        source: source.to_owned(),
        channels,
        rows,
        cols,
        pixels: Vec::new(),
        labels: Vec::new(),
    };
    for (item, result) in items.iter().zip(decoded.into_iter().flatten()) {
        match result {
            Ok(pixels) => {
                set.pixels.extend_from_slice(&pixels);
                set.labels.push(item.class);
            }
            Err(why) => {
                skipped.0 += 1;
                if skipped.1.len() < SHOWN {
                    skipped.1.push(format!("{}: {why}", item.path.display()));
                }
            }
        }
    }
    set
}

/// Files decoded at once when packing: the most pixels held in memory.
const PACK_CHUNK: usize = 2048;

/// Decodes `items` into a packed file at `path` (temp files, then rename), never
/// holding more than a chunk of images; returns how many decoded.
pub(super) fn pack(
    items: &[Item],
    shape: [usize; 3],
    source: &str,
    skipped: &mut (usize, Vec<String>),
    path: &Path,
) -> std::io::Result<usize> {
    let pixels_path = path.with_extension("pixels.tmp");
    let mut pixels = BufWriter::new(File::create(&pixels_path)?);
    let mut labels = Vec::with_capacity(items.len());
    for chunk in items.chunks(PACK_CHUNK) {
        let set = decode_all(chunk, shape, source, skipped);
        pixels.write_all(&set.pixels)?;
        labels.extend_from_slice(&set.labels);
    }
    pixels.flush()?;
    drop(pixels);
    let tmp = path.with_extension("tmp");
    let mut out = BufWriter::new(File::create(&tmp)?);
    out.write_all(&encode_head(shape, &labels))?;
    std::io::copy(&mut File::open(&pixels_path)?, &mut out)?;
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::remove_file(&pixels_path)?;
    std::fs::rename(&tmp, path)?;
    Ok(labels.len())
}

/// One file's pixels at `shape`, channel-major.
fn decode(path: &Path, [channels, rows, cols]: [usize; 3]) -> Result<Vec<u8>, String> {
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODED);
    let mut reader = ImageReader::open(path)
        .and_then(|r| r.with_guessed_format())
        .map_err(|e| e.to_string())?;
    reader.limits(limits);
    let image = reader.decode().map_err(|e| e.to_string())?;
    let (w, h) = (cols as u32, rows as u32);
    Ok(if channels == 1 {
        image::imageops::resize(&image.to_luma8(), w, h, FilterType::Triangle).into_raw()
    } else {
        let rgb = image::imageops::resize(&image.to_rgb8(), w, h, FilterType::Triangle).into_raw();
        // Interleaved RGB → one plane per channel.
        (0..3)
            .flat_map(|c| rgb.iter().skip(c).step_by(3).copied().collect::<Vec<_>>())
            .collect()
    })
}
