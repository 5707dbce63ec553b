//! Image folders: `train/<class>/*` and `test/<class>/*` (or class folders alone,
//! split by a seeded tenth), PNG and JPEG of any size, grey or colour, decoded once
//! and resized to what the network takes, then kept as packed pixels in the cache
//! (reused while the folder's files stay the same). Files that do not decode are
//! skipped and counted; what cannot make a data set is refused with its path.

use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use image::imageops::FilterType;
use image::{ImageReader, Limits};
use sha2::{Digest, Sha256};
use tether_shared::data::{Dataset, ImageSet, decode_images, encode_images};

use crate::LoadError;

/// Most classes a folder may have (labels are two bytes).
pub const MAX_CLASSES: usize = tether_shared::data::MAX_LABELS;
/// Largest image side decoded; larger images are skipped.
const MAX_SIDE: u32 = 16_384;
/// Most bytes one decoded image may take.
const MAX_DECODED: u64 = 512 << 20;
/// Files shown by name when some are skipped.
const SHOWN: usize = 5;

/// Whether `dir` is an image folder: a `train/` folder, or class folders with no
/// IDX or CIFAR files beside them.
pub fn is_image_folder(dir: &Path) -> bool {
    if dir.join("train").is_dir() {
        return true;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    let (mut dirs, mut files) = (0, 0);
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        match std::fs::metadata(e.path()) {
            Ok(m) if m.is_dir() && !name.starts_with('.') => dirs += 1,
            Ok(m) if m.is_file() && (name.contains("idx") || name.ends_with(".bin")) => files += 1,
            _ => {}
        }
    }
    dirs >= 2 && files == 0
}

/// One image file and its class.
struct Item {
    path: PathBuf,
    class: u16,
    size: u64,
    modified: u128,
}

/// What a folder held, once decoded.
#[derive(Debug)]
pub struct Folder {
    /// The images.
    pub data: Dataset,
    /// Files that did not decode, and the first few of them.
    pub skipped: (usize, Vec<String>),
    /// Whether the packed pixels came from the cache.
    pub cached: bool,
}

/// Reads the image folder `dir`, every image resized to `shape` (channels 1 or 3,
/// rows, cols); `cache`: where packed sets are kept (`None`: decode every time).
pub fn load_folder(
    dir: &Path,
    shape: [usize; 3],
    cache: Option<&Path>,
) -> Result<Folder, LoadError> {
    let channels = shape[0];
    if !matches!(channels, 1 | 3) {
        return Err(folder_error(
            dir,
            format!("the network takes {channels} channels; folders give 1 (grey) or 3 (colour)"),
        ));
    }
    let (train_dir, test_dir) = match dir.join("train") {
        t if t.is_dir() => (t, Some(dir.join("test"))),
        _ => (dir.to_path_buf(), None),
    };
    let classes = class_names(&train_dir)?;
    let mut train = list(&train_dir, &classes)?;
    let test = match test_dir.filter(|t| t.is_dir()) {
        Some(t) => list(&t, &classes)?,
        None => {
            // A seeded tenth of each class, by file name, so the split never moves.
            let (test, kept): (Vec<Item>, Vec<Item>) = train.into_iter().partition(|item| {
                let h =
                    Sha256::digest(item.path.file_name().unwrap_or_default().as_encoded_bytes());
                h[0] % 10 == 0
            });
            train = kept;
            test
        }
    };
    if train.is_empty() || test.is_empty() {
        return Err(folder_error(dir, "no training or no test images".into()));
    }
    let key = cache_key(&train, &test, shape);
    if let Some(folder) = cache.and_then(|c| from_cache(c, &key, dir)) {
        let data = Dataset {
            classes,
            ..folder.data
        };
        return Ok(Folder { data, ..folder });
    }
    let mut skipped = (0, Vec::new());
    let train_set = decode_all(
        &train,
        shape,
        &train_dir.display().to_string(),
        &mut skipped,
    );
    let test_set = decode_all(
        &test,
        shape,
        &format!("{}/test", dir.display()),
        &mut skipped,
    );
    if train_set.is_empty() || test_set.is_empty() {
        return Err(folder_error(
            dir,
            format!("no image decoded ({} skipped)", skipped.0),
        ));
    }
    let data = Dataset {
        train: train_set,
        test: test_set,
        classes,
    };
    if let Some(c) = cache {
        store(c, &key, &data, &skipped);
    }
    Ok(Folder {
        data,
        skipped,
        cached: false,
    })
}

fn folder_error(dir: &Path, why: String) -> LoadError {
    LoadError::Folder {
        dir: dir.to_path_buf(),
        why,
    }
}

/// The class folders of `dir`, sorted by name; refused when empty or too many.
fn class_names(dir: &Path) -> Result<Vec<String>, LoadError> {
    let entries = std::fs::read_dir(dir).map_err(|source| LoadError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut names: Vec<String> = entries
        .flatten()
        .filter(|e| std::fs::metadata(e.path()).is_ok_and(|m| m.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    if names.len() < 2 {
        return Err(folder_error(
            dir,
            format!(
                "{} class folder(s); a classifier needs at least 2",
                names.len()
            ),
        ));
    }
    if names.len() > MAX_CLASSES {
        return Err(folder_error(
            dir,
            format!("{} class folders; at most {MAX_CLASSES}", names.len()),
        ));
    }
    Ok(names)
}

/// The files of each class folder of `dir` (not below it: no link is followed
/// into another folder), sorted; a class folder with no file is refused.
fn list(dir: &Path, classes: &[String]) -> Result<Vec<Item>, LoadError> {
    let mut items = Vec::new();
    for (label, class) in classes.iter().enumerate() {
        let folder = dir.join(class);
        let Ok(entries) = std::fs::read_dir(&folder) else {
            continue; // a class the test set lacks
        };
        let mut files: Vec<Item> = entries
            .flatten()
            .filter_map(|e| {
                let m = std::fs::metadata(e.path()).ok().filter(|m| m.is_file())?;
                Some(Item {
                    path: e.path(),
                    class: label as u16, // below MAX_CLASSES
                    size: m.len(),
                    modified: m
                        .modified()
                        .ok()
                        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_nanos()),
                })
            })
            .collect();
        if files.is_empty() {
            return Err(folder_error(&folder, "an empty class folder".into()));
        }
        files.sort_by(|a, b| a.path.cmp(&b.path));
        items.extend(files);
    }
    Ok(items)
}

fn cache_key(train: &[Item], test: &[Item], shape: [usize; 3]) -> String {
    let mut h = Sha256::new();
    h.update(format!("{shape:?}"));
    for (part, items) in [("train", train), ("test", test)] {
        h.update(part);
        for i in items {
            h.update(i.path.as_os_str().as_encoded_bytes());
            h.update(i.class.to_le_bytes());
            h.update(i.size.to_le_bytes());
            h.update(i.modified.to_le_bytes());
        }
    }
    h.finalize()
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn from_cache(cache: &Path, key: &str, dir: &Path) -> Option<Folder> {
    let read = |part: &str| {
        let path = cache.join(format!("{key}-{part}.tsim"));
        decode_images(&path.display().to_string(), &std::fs::read(&path).ok()?).ok()
    };
    let (mut train, mut test) = (read("train")?, read("test")?);
    let source = dir.display().to_string();
    train.source.clone_from(&source);
    test.source = source;
    let skipped: usize = std::fs::read_to_string(cache.join(format!("{key}.skipped")))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Folder {
        data: Dataset {
            train,
            test,
            classes: Vec::new(),
        },
        skipped: (skipped, Vec::new()),
        cached: true,
    })
}

/// Writes the packed sets (temp file, then rename); a cache that cannot be written
/// only costs the next start a decode.
fn store(cache: &Path, key: &str, data: &Dataset, skipped: &(usize, Vec<String>)) {
    let write = |name: String, bytes: &[u8]| -> std::io::Result<()> {
        std::fs::create_dir_all(cache)?;
        let tmp = cache.join(format!("{name}.tmp"));
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, cache.join(name))
    };
    let done = write(format!("{key}-train.tsim"), &encode_images(&data.train))
        .and_then(|()| write(format!("{key}-test.tsim"), &encode_images(&data.test)))
        .and_then(|()| write(format!("{key}.skipped"), skipped.0.to_string().as_bytes()));
    if let Err(e) = done {
        tracing::warn!(
            "could not cache the decoded folder in {}: {e}",
            cache.display()
        );
    }
}

/// Decodes `items` on every core, in order; undecodable files are counted.
fn decode_all(
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder of three colour classes, PNG and JPEG, grey and colour, of mixed
    /// sizes; with the odd files the issue names.
    fn write_folder(root: &Path) {
        let colours = [[220u8, 30, 30], [30, 220, 30], [30, 30, 220]];
        for (split, n) in [("train", 12), ("test", 4)] {
            for (c, name) in ["apple", "leaf", "sky"].iter().enumerate() {
                let dir = root.join(split).join(name);
                std::fs::create_dir_all(&dir).unwrap();
                for i in 0..n {
                    let (w, h) = (20 + 7 * i as u32, 16 + 3 * i as u32);
                    let img = image::RgbImage::from_fn(w, h, |x, y| {
                        let [r, g, b] = colours[c];
                        image::Rgb([r ^ (x as u8 & 7), g ^ (y as u8 & 7), b])
                    });
                    let ext = if i % 2 == 0 { "png" } else { "jpg" };
                    img.save(dir.join(format!("{i}.{ext}"))).unwrap();
                }
            }
        }
        let apple = root.join("train/apple");
        image::GrayImage::from_pixel(1, 1, image::Luma([200]))
            .save(apple.join("tiny.png"))
            .unwrap();
        std::fs::write(apple.join("notes.png"), "not an image").unwrap();
        let jpeg = std::fs::read(apple.join("1.jpg")).unwrap();
        std::fs::write(apple.join("cut.jpg"), &jpeg[..jpeg.len() / 3]).unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(root.join("train"), apple.join("loop")).unwrap();
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tether-folder-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_folder_decodes_to_the_networks_images_skipping_what_is_not_one() {
        let root = scratch("decode");
        write_folder(&root);
        assert!(is_image_folder(&root));
        let cache = root.join("cache");
        let f = load_folder(&root, [3, 8, 8], Some(&cache)).unwrap();
        assert_eq!(f.data.classes, ["apple", "leaf", "sky"]);
        // 36 + the 1×1 image; the text file and the cut JPEG skipped, the link not followed.
        assert_eq!(f.data.train.len(), 37);
        assert_eq!(f.data.test.len(), 12);
        assert_eq!(f.skipped.0, 2, "{:?}", f.skipped.1);
        assert!(f.skipped.1.iter().any(|s| s.contains("notes.png")));
        assert_eq!(f.data.train.shape(), [3, 8, 8]);
        // Each class's colour survives: the red plane is bright for apples only.
        let red = |i: usize| {
            f.data.train.image(i)[..64]
                .iter()
                .map(|&p| u32::from(p))
                .sum::<u32>()
                / 64
        };
        let first_leaf = f.data.train.labels.iter().position(|&l| l == 1).unwrap();
        assert!(
            red(0) > 150 && red(first_leaf) < 80,
            "{} {}",
            red(0),
            red(first_leaf)
        );
        // The second read comes from the cache, the same pixels.
        let again = load_folder(&root, [3, 8, 8], Some(&cache)).unwrap();
        assert!(again.cached && !f.cached);
        assert_eq!(again.data.train.pixels, f.data.train.pixels);
        assert_eq!(again.data.classes, f.data.classes);
        // Grey, another size: decoded anew.
        let grey = load_folder(&root, [1, 5, 7], Some(&cache)).unwrap();
        assert!(!grey.cached);
        assert_eq!(grey.data.train.shape(), [1, 5, 7]);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn what_cannot_make_a_data_set_is_refused_with_its_path() {
        let root = scratch("refuse");
        write_folder(&root);
        std::fs::create_dir_all(root.join("train/empty")).unwrap();
        let err = load_folder(&root, [3, 8, 8], None).unwrap_err().to_string();
        assert!(
            err.contains("empty") && err.contains("train/empty"),
            "{err}"
        );
        let err = load_folder(&root, [4, 8, 8], None).unwrap_err().to_string();
        assert!(err.contains("4 channels"), "{err}");
        let one = scratch("one-class");
        std::fs::create_dir_all(one.join("train/only")).unwrap();
        let err = load_folder(&one, [3, 8, 8], None).unwrap_err().to_string();
        assert!(err.contains("at least 2"), "{err}");
        let many = scratch("many");
        for i in 0..=MAX_CLASSES {
            std::fs::create_dir_all(many.join(format!("train/c{i}"))).unwrap();
        }
        let err = load_folder(&many, [3, 8, 8], None).unwrap_err().to_string();
        assert!(err.contains("at most 65536"), "{err}");
        for d in [root, one, many] {
            let _ = std::fs::remove_dir_all(d);
        }
    }

    /// A PNG that says it is `side`×`side` grey pixels: a valid header, no pixels.
    fn png_header(side: u32) -> Vec<u8> {
        fn crc32(bytes: &[u8]) -> u32 {
            let mut crc = !0u32;
            for &b in bytes {
                crc ^= u32::from(b);
                for _ in 0..8 {
                    crc = if crc & 1 == 1 {
                        (crc >> 1) ^ 0xEDB8_8320
                    } else {
                        crc >> 1
                    };
                }
            }
            !crc
        }
        let mut ihdr = b"IHDR".to_vec();
        ihdr.extend_from_slice(&side.to_be_bytes());
        ihdr.extend_from_slice(&side.to_be_bytes());
        ihdr.extend_from_slice(&[8, 0, 0, 0, 0]); // 8-bit grey, no interlace
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        png.extend_from_slice(&13u32.to_be_bytes());
        png.extend_from_slice(&ihdr);
        png.extend_from_slice(&crc32(&ihdr).to_be_bytes());
        png.extend_from_slice(&0u32.to_be_bytes());
        png.extend_from_slice(b"IEND");
        png.extend_from_slice(&crc32(b"IEND").to_be_bytes());
        png
    }

    #[test]
    fn a_huge_image_is_skipped_before_its_pixels_are_allocated() {
        let root = scratch("huge");
        write_folder(&root);
        let huge = root.join("train/sky/huge.png");
        std::fs::write(&huge, png_header(20_000)).unwrap();
        let f = load_folder(&root, [3, 8, 8], None).unwrap();
        assert_eq!(
            f.data.train.len(),
            37,
            "the 20 000 × 20 000 image is not one of them"
        );
        assert!(
            f.skipped.1.iter().any(|s| s.contains("huge.png")),
            "{:?}",
            f.skipped.1
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn ten_thousand_classes_get_their_own_labels() {
        let root = scratch("ten-thousand");
        let dot = {
            let mut bytes = std::io::Cursor::new(Vec::new());
            image::GrayImage::from_pixel(2, 2, image::Luma([9]))
                .write_to(&mut bytes, image::ImageFormat::Png)
                .unwrap();
            bytes.into_inner()
        };
        for split in ["train", "test"] {
            for c in 0..10_000 {
                let dir = root.join(format!("{split}/c{c:05}"));
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(dir.join("a.png"), &dot).unwrap();
            }
        }
        let f = load_folder(&root, [1, 2, 2], None).unwrap();
        assert_eq!(f.data.classes.len(), 10_000);
        assert_eq!(f.data.classes[9_999], "c09999");
        assert_eq!(f.data.train.labels[9_999], 9_999);
        assert_eq!(f.data.test.labels[300], 300);
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn class_folders_alone_are_split_by_a_seeded_tenth() {
        let root = scratch("split");
        write_folder(&root);
        let flat = root.join("flat");
        std::fs::rename(root.join("train"), &flat).unwrap();
        let f = load_folder(&flat, [3, 4, 4], None).unwrap();
        let total = f.data.train.len() + f.data.test.len();
        assert_eq!(total, 37);
        assert!(
            !f.data.test.is_empty() && f.data.test.len() < 12,
            "{}",
            f.data.test.len()
        );
        let again = load_folder(&flat, [3, 4, 4], None).unwrap();
        assert_eq!(again.data.test.labels, f.data.test.labels);
        let _ = std::fs::remove_dir_all(&root);
    }
}
