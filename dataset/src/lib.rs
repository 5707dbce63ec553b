//! Data sets on disk, for every native part of tether: reading IDX folders and
//! CIFAR-10 binary batches, finding the Fashion-MNIST that ships with tether, and the cache a native worker keeps the
//! shards it downloads in (so a reconnect or a restart does not download again).

use std::path::{Path, PathBuf};

mod folder;
pub mod packed;
mod shard_cache;

pub use folder::{Folder, PackedFolder, is_image_folder, load_folder, pack_folder};
pub use packed::PackedSet;
pub use shard_cache::{Cached, ShardCache, ShardKey, verify};

use tether_shared::data::{DataError, Dataset, ImageSet, cifar, idx};
use thiserror::Error;

/// A data set that could not be read.
#[derive(Debug, Error)]
pub enum LoadError {
    /// A file is missing (neither gzipped nor plain).
    #[error(
        "{dir}: no {file}(.gz) here; expected an IDX data set (train-/t10k- images and labels) or CIFAR-10 binary batches (data_batch_1.bin … test_batch.bin)"
    )]
    Missing {
        /// The directory searched.
        dir: PathBuf,
        /// The file's base name.
        file: &'static str,
    },
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file is malformed.
    #[error(transparent)]
    Data(#[from] DataError),
    /// An image folder that cannot make a data set.
    #[error("{dir}: {why}")]
    Folder {
        /// The folder.
        dir: PathBuf,
        /// Why not.
        why: String,
    },
    /// No `--data` was given and the shipped data set was not found.
    #[error(
        "the built-in Fashion-MNIST was not found (looked in {looked}); pass --data DIR or set TETHER_DATA"
    )]
    NoDefault {
        /// The places searched.
        looked: String,
    },
}

const SHIPPED: &str = "data/fashion-mnist";

/// Where the shipped Fashion-MNIST lies: `$TETHER_DATA`, then `data/fashion-mnist`
/// beside the executable or any of its parent folders (a `target/release/tether`
/// finds the repository's copy), then the source tree this binary was built from,
/// then the working directory.
pub fn default_data_dir() -> Result<PathBuf, LoadError> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(dir) = std::env::var_os("TETHER_DATA") {
        candidates.push(dir.into());
    }
    if let Ok(exe) = std::env::current_exe() {
        candidates.extend(exe.ancestors().skip(1).map(|a| a.join(SHIPPED)));
    }
    candidates.push(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(SHIPPED),
    );
    candidates.push(PathBuf::from(SHIPPED));
    for dir in &candidates {
        if dir.join("train-labels-idx1-ubyte.gz").is_file()
            || dir.join("train-labels-idx1-ubyte").is_file()
        {
            return Ok(dir.clone());
        }
    }
    let looked = candidates
        .iter()
        .map(|c| c.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    Err(LoadError::NoDefault { looked })
}

fn read_either(dir: &Path, file: &'static str) -> Result<(String, Vec<u8>), LoadError> {
    for name in [format!("{file}.gz"), file.to_string()] {
        let path = dir.join(&name);
        match std::fs::read(&path) {
            Ok(bytes) => return Ok((path.display().to_string(), bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(LoadError::Io { path, source }),
        }
    }
    Err(LoadError::Missing {
        dir: dir.to_path_buf(),
        file,
    })
}

fn read_pair(
    dir: &Path,
    images: &'static str,
    labels: &'static str,
) -> Result<ImageSet, LoadError> {
    let (images_name, images_bytes) = read_either(dir, images)?;
    let (labels_name, labels_bytes) = read_either(dir, labels)?;
    Ok(idx::parse_image_set(
        &images_name,
        &images_bytes,
        &labels_name,
        &labels_bytes,
    )?)
}

/// Reads the data set in `dir` (IDX, CIFAR-10 or an image folder, see [`format`]),
/// or the shipped Fashion-MNIST when `dir` is `None`; returns the directory used
/// with the data. A folder's images are resized to the format's default, 3×32×32.
pub fn load(dir: Option<&Path>) -> Result<(PathBuf, Dataset), LoadError> {
    load_for(dir, None)
}

/// [`load`], a folder's images resized to `shape` (the network's images) when given.
pub fn load_for(
    dir: Option<&Path>,
    shape: Option<[usize; 3]>,
) -> Result<(PathBuf, Dataset), LoadError> {
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => default_data_dir()?,
    };
    let format = format(&dir);
    let data = match &format {
        Format::Idx => load_idx_dir(&dir)?,
        Format::Cifar10(batches) => load_cifar_dir(batches)?,
        Format::Packed(_) => load_packed_dir(&dir)?,
        Format::Folder => {
            let cache = cache_dir().map(|c| c.join("folders"));
            let folder = load_folder(
                &dir,
                shape.unwrap_or(format.input_shape()),
                cache.as_deref(),
            )?;
            if folder.skipped.0 > 0 {
                tracing::warn!(
                    "{}: skipped {} file(s) that did not decode as images{}",
                    dir.display(),
                    folder.skipped.0,
                    folder
                        .skipped
                        .1
                        .iter()
                        .map(|s| format!("\n  {s}"))
                        .collect::<String>()
                );
            }
            folder.data
        }
    };
    Ok((dir, data))
}

/// What a data folder holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Format {
    /// MNIST-style IDX files (1×28×28), or nothing recognisable (reading names what
    /// is missing).
    Idx,
    /// CIFAR-10 binary batches (3×32×32) in this folder: the one given, or the
    /// `cifar-10-batches-bin` the official archive unpacks to.
    Cifar10(PathBuf),
    /// An image folder (`train/<class>/*`, or class folders alone), decoded to the
    /// network's images.
    Folder,
    /// Packed sets, `train.tsi` and `test.tsi` (a decoded folder, or a generated
    /// set), of the shape their header gives.
    Packed([usize; 3]),
}

impl Format {
    /// The images' channels, rows and cols.
    pub fn input_shape(&self) -> [usize; 3] {
        match self {
            Self::Idx => [1, 28, 28],
            Self::Cifar10(_) => cifar::SHAPE,
            Self::Folder => [3, 32, 32],
            Self::Packed(shape) => *shape,
        }
    }
}

/// The format of the data set in `dir`, from its file names alone.
pub fn format(dir: &Path) -> Format {
    for candidate in [dir.to_path_buf(), dir.join("cifar-10-batches-bin")] {
        if candidate.join("data_batch_1.bin").is_file() {
            return Format::Cifar10(candidate);
        }
    }
    let packed = dir.join(packed::TRAIN_FILE);
    if packed.is_file() {
        // An unreadable header is reported when the set is read.
        let shape = packed::shape_of(&packed).unwrap_or([3, 32, 32]);
        return Format::Packed(shape);
    }
    if is_image_folder(dir) {
        return Format::Folder;
    }
    Format::Idx
}

/// Reads a packed data set (`train.tsi`, `test.tsi`) into memory.
pub fn load_packed_dir(dir: &Path) -> Result<Dataset, LoadError> {
    let read = |file: &str| -> Result<ImageSet, LoadError> {
        let path = dir.join(file);
        let bytes = std::fs::read(&path).map_err(|source| LoadError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(tether_shared::data::decode_images(
            &path.display().to_string(),
            &bytes,
        )?)
    };
    Ok(Dataset {
        train: read(packed::TRAIN_FILE)?,
        test: read(packed::TEST_FILE)?,
        classes: class_file(dir, &["classes.txt"]),
    })
}

/// Reads CIFAR-10 binary batches from `dir`: training from `data_batch_1.bin`
/// and each of `data_batch_2.bin` … `data_batch_5.bin` present, test from
/// `test_batch.bin`.
pub fn load_cifar_dir(dir: &Path) -> Result<Dataset, LoadError> {
    let read = |file: &'static str| {
        let path = dir.join(file);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(cifar::parse(&path.display().to_string(), &bytes)?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(LoadError::Io { path, source }),
        }
    };
    let missing = |file| LoadError::Missing {
        dir: dir.to_path_buf(),
        file,
    };
    let mut train = read("data_batch_1.bin")?.ok_or_else(|| missing("data_batch_1.bin"))?;
    for file in [
        "data_batch_2.bin",
        "data_batch_3.bin",
        "data_batch_4.bin",
        "data_batch_5.bin",
    ] {
        if let Some(more) = read(file)? {
            train.pixels.extend_from_slice(&more.pixels);
            train.labels.extend_from_slice(&more.labels);
        }
    }
    train.source = dir.join("data_batch_*.bin").display().to_string();
    let test = read("test_batch.bin")?.ok_or_else(|| missing("test_batch.bin"))?;
    Ok(Dataset {
        train,
        test,
        classes: class_file(dir, &["classes.txt", "batches.meta.txt"]),
    })
}

/// Reads an IDX data set (MNIST / Fashion-MNIST layout, gzipped or not) from `dir`.
pub fn load_idx_dir(dir: &Path) -> Result<Dataset, LoadError> {
    Ok(Dataset {
        train: read_pair(dir, "train-images-idx3-ubyte", "train-labels-idx1-ubyte")?,
        test: read_pair(dir, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")?,
        classes: class_file(dir, &["classes.txt"]),
    })
}

/// Class names from a `classes.txt` in `dir` (one per line); none without one.
pub fn load_class_names(dir: &Path) -> Vec<String> {
    class_file(dir, &["classes.txt"])
}

/// Largest class-name file read, in bytes.
const MAX_CLASS_FILE: u64 = 1 << 20;

/// Class names, one per line, from the first of `files` in `dir` (CIFAR-10 ships
/// `batches.meta.txt`); none when there is no such file or it is not text of at
/// most 1 MiB (then labels are shown as numbers).
fn class_file(dir: &Path, files: &[&str]) -> Vec<String> {
    for file in files {
        let path = dir.join(file);
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if meta.len() > MAX_CLASS_FILE {
            tracing::warn!(
                "{}: over 1 MiB; classes are shown as numbers",
                path.display()
            );
            return Vec::new();
        }
        return match std::fs::read_to_string(&path) {
            Ok(text) => {
                let mut names: Vec<String> = text.lines().map(str::to_string).collect();
                while names.last().is_some_and(|n| n.trim().is_empty()) {
                    names.pop();
                }
                names
            }
            Err(e) => {
                tracing::warn!("{}: {e}; classes are shown as numbers", path.display());
                Vec::new()
            }
        };
    }
    Vec::new()
}

/// The folder downloaded shards are cached in: `$TETHER_CACHE`, else
/// `$XDG_CACHE_HOME/tether`, else `~/.cache/tether` (`%LOCALAPPDATA%\tether` on
/// Windows). `None` when none of these is known.
pub fn cache_dir() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("TETHER_CACHE")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("tether")))
        .or_else(|| var("HOME").map(|d| d.join(".cache").join("tether")))
        .or_else(|| var("LOCALAPPDATA").map(|d| d.join("tether")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_data_is_found_and_complete() {
        let dir = default_data_dir().unwrap();
        let data = load_idx_dir(&dir).unwrap();
        assert_eq!((data.train.len(), data.test.len()), (60_000, 10_000));
        assert!(data.train.expect_shape([1, 28, 28]).is_ok());
    }

    #[test]
    fn cifar_batches_are_found_read_and_concatenated() {
        let dir = std::env::temp_dir().join(format!("tether-cifar-{}", std::process::id()));
        let inner = dir.join("cifar-10-batches-bin");
        std::fs::create_dir_all(&inner).unwrap();
        let set = |labels: &[u16], shade: u8| ImageSet {
            source: String::new(),
            channels: 3,
            rows: 32,
            cols: 32,
            pixels: vec![shade; labels.len() * 3 * 1024],
            labels: labels.to_vec(),
        };
        assert_eq!(format(&dir), Format::Idx);
        std::fs::write(
            inner.join("data_batch_1.bin"),
            cifar::encode(&set(&[1, 2], 10)),
        )
        .unwrap();
        assert_eq!(format(&dir), Format::Cifar10(inner.clone()));
        assert_eq!(format(&dir).input_shape(), [3, 32, 32]);
        let err = load(Some(&dir)).unwrap_err();
        assert!(
            matches!(
                err,
                LoadError::Missing {
                    file: "test_batch.bin",
                    ..
                }
            ),
            "{err}"
        );
        std::fs::write(
            inner.join("data_batch_3.bin"),
            cifar::encode(&set(&[9], 30)),
        )
        .unwrap();
        std::fs::write(inner.join("test_batch.bin"), cifar::encode(&set(&[4], 40))).unwrap();
        let (_, data) = load(Some(&dir)).unwrap();
        assert_eq!(data.train.labels, [1, 2, 9]);
        assert_eq!(data.train.image(2)[0], 30);
        assert_eq!((data.test.len(), data.test.channels), (1, 3));
        assert!(data.classes.is_empty(), "no names without a names file");
        std::fs::write(inner.join("batches.meta.txt"), "airplane\nautomobile\n\n").unwrap();
        let (_, data) = load(Some(&dir)).unwrap();
        assert_eq!(data.classes, ["airplane", "automobile"]);
        // A damaged batch is an error naming the file, not a shorter set.
        std::fs::write(inner.join("data_batch_2.bin"), [1u8; 100]).unwrap();
        let err = load(Some(&dir)).unwrap_err().to_string();
        assert!(
            err.contains("data_batch_2.bin") && err.contains("truncated"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_shipped_data_names_its_classes() {
        let (_, data) = load(None).unwrap();
        assert_eq!(data.classes.len(), 10);
        assert_eq!(
            (&*data.classes[0], &*data.classes[9]),
            ("T-shirt/top", "Ankle boot")
        );
    }

    #[test]
    fn a_missing_directory_names_what_is_missing() {
        let err = load_idx_dir(Path::new("/nonexistent/tether")).unwrap_err();
        assert!(
            matches!(
                err,
                LoadError::Missing {
                    file: "train-images-idx3-ubyte",
                    ..
                }
            ),
            "{err}"
        );
    }
}
