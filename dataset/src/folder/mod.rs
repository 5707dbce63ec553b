//! Image folders: `train/<class>/*` and `test/<class>/*` (or class folders alone,
//! split by a seeded tenth), PNG and JPEG of any size, grey or colour, decoded once
//! and resized to what the network takes, then kept as packed pixels in the cache
//! (reused while the folder's files stay the same). Files that do not decode are
//! skipped and counted; what cannot make a data set is refused with its path.

use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use sha2::{Digest, Sha256};
use tether_shared::data::{Dataset, decode_images};

use crate::LoadError;

mod decode;

use decode::decode_all;

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

/// An image folder decoded into packed files (or found there, decoded before).
#[derive(Debug)]
pub struct PackedFolder {
    /// The training images (`TSI2`, see [`crate::packed`]).
    pub train: PathBuf,
    /// The test images.
    pub test: PathBuf,
    /// Class names, from the folders, in label order.
    pub classes: Vec<String>,
    /// Files that did not decode, and the first few of them (the count only,
    /// when the files were decoded before).
    pub skipped: (usize, Vec<String>),
    /// Whether the packed files came from the cache.
    pub cached: bool,
}

/// The files of a folder, listed and split, and the name of their packed form.
struct Plan {
    classes: Vec<String>,
    train: Vec<Item>,
    test: Vec<Item>,
    train_source: String,
    test_source: String,
    key: String,
}

/// Reads the image folder `dir`, every image resized to `shape` (channels 1 or 3,
/// rows, cols); `cache`: where packed sets are kept (`None`, or a cache that
/// cannot be written: decode every time).
pub fn load_folder(
    dir: &Path,
    shape: [usize; 3],
    cache: Option<&Path>,
) -> Result<Folder, LoadError> {
    let plan = plan(dir, shape)?;
    if let Some(cache) = cache {
        match pack_planned(dir, &plan, shape, cache) {
            Ok(packed) => return read_packed(dir, packed),
            Err(LoadError::Io { path, source }) => tracing::warn!(
                "could not cache the decoded folder in {}: {source}; decoding in memory",
                path.display()
            ),
            Err(e) => return Err(e),
        }
    }
    let mut skipped = (0, Vec::new());
    let train = decode_all(&plan.train, shape, &plan.train_source, &mut skipped);
    let test = decode_all(&plan.test, shape, &plan.test_source, &mut skipped);
    if train.is_empty() || test.is_empty() {
        return Err(nothing_decoded(dir, skipped.0));
    }
    Ok(Folder {
        data: Dataset {
            train,
            test,
            classes: plan.classes,
        },
        skipped,
        cached: false,
    })
}

/// Decodes the image folder `dir` into packed files in `cache` (a chunk of images
/// in memory at a time, so a folder larger than memory packs), or finds them there
/// while the folder's files stay the same.
pub fn pack_folder(dir: &Path, shape: [usize; 3], cache: &Path) -> Result<PackedFolder, LoadError> {
    pack_planned(dir, &plan(dir, shape)?, shape, cache)
}

fn plan(dir: &Path, shape: [usize; 3]) -> Result<Plan, LoadError> {
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
    Ok(Plan {
        key: cache_key(&train, &test, shape),
        classes,
        train,
        test,
        train_source: train_dir.display().to_string(),
        test_source: format!("{}/test", dir.display()),
    })
}

fn pack_planned(
    dir: &Path,
    plan: &Plan,
    shape: [usize; 3],
    cache: &Path,
) -> Result<PackedFolder, LoadError> {
    let key = &plan.key;
    let (train, test) = (
        cache.join(format!("{key}-train.tsim")),
        cache.join(format!("{key}-test.tsim")),
    );
    let counted = cache.join(format!("{key}.skipped"));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LoadError::Io { path, source }
    };
    let done = |skipped, cached| PackedFolder {
        train: train.clone(),
        test: test.clone(),
        classes: plan.classes.clone(),
        skipped,
        cached,
    };
    if let Some(n) = std::fs::read_to_string(&counted)
        .ok()
        .and_then(|t| t.trim().parse::<usize>().ok())
        .filter(|_| train.is_file() && test.is_file())
    {
        return Ok(done((n, Vec::new()), true));
    }
    std::fs::create_dir_all(cache).map_err(io(cache))?;
    let mut skipped = (0, Vec::new());
    let decoded = [
        decode::pack(&plan.train, shape, &plan.train_source, &mut skipped, &train)
            .map_err(io(&train))?,
        decode::pack(&plan.test, shape, &plan.test_source, &mut skipped, &test)
            .map_err(io(&test))?,
    ];
    if decoded.contains(&0) {
        let _ = (std::fs::remove_file(&train), std::fs::remove_file(&test));
        return Err(nothing_decoded(dir, skipped.0));
    }
    // Written last: the packed files count as cached only once it is there.
    std::fs::write(&counted, skipped.0.to_string()).map_err(io(&counted))?;
    Ok(done(skipped, false))
}

/// A packed folder read into memory.
fn read_packed(dir: &Path, packed: PackedFolder) -> Result<Folder, LoadError> {
    let read = |path: &Path| -> Result<_, LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut set = decode_images(&path.display().to_string(), &bytes)?;
        set.source = dir.display().to_string();
        Ok(set)
    };
    Ok(Folder {
        data: Dataset {
            train: read(&packed.train)?,
            test: read(&packed.test)?,
            classes: packed.classes,
        },
        skipped: packed.skipped,
        cached: packed.cached,
    })
}

fn nothing_decoded(dir: &Path, skipped: usize) -> LoadError {
    folder_error(dir, format!("no image decoded ({skipped} skipped)"))
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

#[cfg(test)]
mod tests;
