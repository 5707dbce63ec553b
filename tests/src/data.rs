//! Generated data sets for the tests: a CIFAR-10-format set and an image folder,
//! each easy enough to learn in a few hundred steps (the real sets are the user's).

use std::path::Path;

use anyhow::Result;

/// Writes a small CIFAR-10-format data set into `dir` (the real one is the user's
/// download): `train` images split over `data_batch_1.bin` and `data_batch_2.bin`,
/// `test` in `test_batch.bin`. Class k is a colour of its own, each pixel jittered,
/// so a network that reads all three channels tells them apart in a few hundred
/// steps and one that reads a single channel cannot (classes share channel values).
pub fn write_cifar_like(dir: &Path, train: usize, test: usize) -> Result<()> {
    use tether_shared::data::{ImageSet, cifar};
    use tether_shared::rng::SplitMix64;
    // Each channel takes one of three levels; no two classes share all three.
    const PALETTE: [[u8; 3]; 10] = [
        [40, 40, 215],
        [40, 215, 40],
        [215, 40, 40],
        [215, 215, 40],
        [40, 215, 215],
        [215, 40, 215],
        [128, 128, 128],
        [215, 128, 40],
        [40, 128, 215],
        [128, 215, 40],
    ];
    let mut rng = SplitMix64::new(2015);
    let mut set = |n: usize| {
        let labels: Vec<u16> = (0..n).map(|i| (i % 10) as u16).collect();
        let mut pixels = Vec::with_capacity(n * 3 * 1024);
        for &label in &labels {
            for level in PALETTE[usize::from(label)] {
                pixels.extend((0..1024).map(|_| {
                    let jitter = rng.below(61) as i32 - 30;
                    (i32::from(level) + jitter).clamp(0, 255) as u8
                }));
            }
        }
        ImageSet {
            source: String::new(),
            channels: 3,
            rows: 32,
            cols: 32,
            pixels,
            labels,
        }
    };
    std::fs::create_dir_all(dir)?;
    let all = set(train);
    let half = train / 2;
    let first = all.subset(&(0..half).collect::<Vec<_>>());
    let second = all.subset(&(half..train).collect::<Vec<_>>());
    std::fs::write(dir.join("data_batch_1.bin"), cifar::encode(&first))?;
    std::fs::write(dir.join("data_batch_2.bin"), cifar::encode(&second))?;
    std::fs::write(dir.join("test_batch.bin"), cifar::encode(&set(test)))?;
    Ok(())
}

/// The classes [`write_photo_folder`] writes, in the order their folders sort.
pub const PHOTO_CLASSES: [&str; 3] = ["green-cols", "grey-dots", "red-rows"];

/// Writes an image folder into `root`: `train/<class>/` with `per_class` images
/// each and `test/<class>/` with a quarter as many, PNG and JPEG by turns, of mixed
/// sizes, colour and grey, plus one file named `.png` that is not an image. The
/// three classes are told apart by colour and by a stripe's direction.
pub fn write_photo_folder(root: &Path, per_class: usize) -> Result<()> {
    for (split, n) in [("train", per_class), ("test", per_class / 4)] {
        for name in PHOTO_CLASSES {
            let dir = root.join(split).join(name);
            std::fs::create_dir_all(&dir)?;
            for i in 0..n {
                let (w, h) = (24 + (i % 5) as u32 * 9, 20 + (i % 3) as u32 * 11);
                let jitter = (i * 37 % 40) as u8;
                let path = dir.join(format!("{i:04}.{}", if i % 2 == 0 { "png" } else { "jpg" }));
                match name {
                    "red-rows" => image::RgbImage::from_fn(w, h, |_, y| {
                        let on = (y / 3) % 2 == 0;
                        image::Rgb([if on { 230 } else { 120 }, jitter, 30])
                    })
                    .save(path)?,
                    "green-cols" => image::RgbImage::from_fn(w, h, |x, _| {
                        let on = (x / 3) % 2 == 0;
                        image::Rgb([30, if on { 230 } else { 110 }, jitter])
                    })
                    .save(path)?,
                    _ => image::GrayImage::from_fn(w, h, |x, y| {
                        image::Luma([if (x + y) % 4 == 0 { 240 } else { 60 + jitter }])
                    })
                    .save(path)?,
                }
            }
        }
    }
    std::fs::write(root.join("train/red-rows/readme.png"), "not an image")?;
    Ok(())
}
