//! Image folders: `train/<class>/*` and `test/<class>/*` (or class folders alone,
//! split by a seeded tenth), PNG and JPEG of any size, grey or colour, decoded once
//! and resized to what the network takes, then kept as packed pixels in the cache
//! (reused while the folder's files stay the same). Files that do not decode are
//! skipped and counted; what cannot make a data set is refused with its path.

use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use sha2::{Digest, Sha256};
use tether_shared::data::{Dataset, decode_images, encode_images};

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

#[cfg(test)]
mod tests;
