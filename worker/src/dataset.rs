//! Reading data sets from disk, and finding the Fashion-MNIST that ships with tether.

use std::path::{Path, PathBuf};

use tether_shared::data::{DataError, Dataset, ImageSet, idx};
use thiserror::Error;

/// A data set that could not be read.
#[derive(Debug, Error)]
pub enum LoadError {
    /// A file is missing (neither gzipped nor plain).
    #[error(
        "{dir}: no {file}(.gz) here; expected an IDX data set (train-/t10k- images and labels)"
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

/// Reads the IDX data set in `dir`, or the shipped Fashion-MNIST when `dir` is `None`;
/// returns the directory used with the data.
pub fn load(dir: Option<&Path>) -> Result<(PathBuf, Dataset), LoadError> {
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => default_data_dir()?,
    };
    let data = load_idx_dir(&dir)?;
    Ok((dir, data))
}

/// Reads an IDX data set (MNIST / Fashion-MNIST layout, gzipped or not) from `dir`.
pub fn load_idx_dir(dir: &Path) -> Result<Dataset, LoadError> {
    Ok(Dataset {
        train: read_pair(dir, "train-images-idx3-ubyte", "train-labels-idx1-ubyte")?,
        test: read_pair(dir, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")?,
    })
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
