//! Training data: parsers for IDX (MNIST / Fashion-MNIST) and CIFAR-10 binaries,
//! disjoint sharding across workers, batching with per-epoch shuffles, normalisation.
//!
//! Parsers take bytes, never paths (this crate does no I/O); the caller passes the
//! file's name along so every error says which file is wrong and how.

pub mod batch;
pub mod blocks;
pub mod cifar;
pub mod idx;
pub mod shard;
pub mod window;

use thiserror::Error;

pub use batch::{
    Batch, BatchSource, BatchStream, Batcher, ChannelStats, Normalization, PixelHistogram,
};
pub use shard::{
    IMAGES_MAGIC, ImagesHead, decode_images, encode_head, encode_images, shard_indices,
};

/// A malformed or unsuitable data file. Every variant names the file.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DataError {
    /// The gzip stream could not be decompressed.
    #[error("{file}: not a valid gzip stream: {message}")]
    Gzip {
        /// The file's name.
        file: String,
        /// What the decompressor said.
        message: String,
    },
    /// The header's magic number is not the one expected.
    #[error("{file}: bad magic number {found:#010x} (expected {expected})")]
    BadMagic {
        /// The file's name.
        file: String,
        /// The magic number found.
        found: u32,
        /// What was expected, in words.
        expected: &'static str,
    },
    /// The file is shorter than its header (or record size) says.
    #[error("{file}: truncated: expected {expected} bytes, found {actual}")]
    Truncated {
        /// The file's name.
        file: String,
        /// Bytes the header implies.
        expected: usize,
        /// Bytes present.
        actual: usize,
    },
    /// The file is longer than its header says.
    #[error("{file}: {extra} trailing bytes after the {expected} the header describes")]
    TrailingBytes {
        /// The file's name.
        file: String,
        /// Bytes the header implies.
        expected: usize,
        /// Bytes beyond that.
        extra: usize,
    },
    /// Images and labels disagree on how many items there are.
    #[error("{images} holds {image_count} images but {labels} holds {label_count} labels")]
    CountMismatch {
        /// The images file.
        images: String,
        /// Its item count.
        image_count: usize,
        /// The labels file.
        labels: String,
        /// Its item count.
        label_count: usize,
    },
    /// The images are not the size the model takes.
    #[error("{file}: images are {found}, but the model takes {expected}")]
    WrongImageSize {
        /// The file's name.
        file: String,
        /// channels×rows×cols found.
        found: String,
        /// channels×rows×cols expected.
        expected: String,
    },
    /// A label outside 0..classes.
    #[error("{file}: label {label} at item {index} is not a class in 0..{classes}")]
    BadLabel {
        /// The file's name.
        file: String,
        /// Which item.
        index: usize,
        /// The label found.
        label: u16,
        /// Number of classes.
        classes: usize,
    },
    /// The file holds no items at all.
    #[error("{file}: holds no items")]
    Empty {
        /// The file's name.
        file: String,
    },
}

/// Number of classes in CIFAR-10 (its format's labels must be below).
pub const CLASSES: usize = 10;

/// Most classes a data set may have: labels are two bytes.
pub const MAX_LABELS: usize = 1 << 16;

/// A labelled image set in memory: `count` images of `channels × rows × cols` bytes,
/// stored contiguously (channel-major within an image), and one label per image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageSet {
    /// Where the images came from, for error messages.
    pub source: String,
    /// Channels per image (1 for IDX, 3 for CIFAR-10).
    pub channels: usize,
    /// Image height.
    pub rows: usize,
    /// Image width.
    pub cols: usize,
    /// Pixel bytes, `len() == count · channels · rows · cols`.
    pub pixels: Vec<u8>,
    /// One label per image (a network takes the set when every label is below its
    /// classes: [`ImageSet::expect_network`]).
    pub labels: Vec<u16>,
}

impl ImageSet {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when the set holds no image.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Bytes per image.
    pub fn image_len(&self) -> usize {
        self.channels * self.rows * self.cols
    }

    /// One image's pixels.
    pub fn image(&self, index: usize) -> &[u8] {
        let n = self.image_len();
        &self.pixels[index * n..(index + 1) * n]
    }

    /// The images' `[channels, rows, cols]`.
    pub fn shape(&self) -> [usize; 3] {
        [self.channels, self.rows, self.cols]
    }

    /// Checks that the images are `[channels, rows, cols]`, the model's input.
    pub fn expect_shape(&self, shape: [usize; 3]) -> Result<(), DataError> {
        if self.shape() == shape {
            return Ok(());
        }
        Err(DataError::WrongImageSize {
            file: self.source.clone(),
            found: shape_text(self.shape()),
            expected: shape_text(shape),
        })
    }

    /// [`expect_shape`](Self::expect_shape) of the images `model` trains on, and
    /// every label one of its classes.
    pub fn expect_network(&self, model: &crate::model::Model) -> Result<(), DataError> {
        self.expect_shape(model.data_shape())?;
        let classes = model.classes();
        match self.labels.iter().position(|&l| usize::from(l) >= classes) {
            None => Ok(()),
            Some(index) => Err(DataError::BadLabel {
                file: self.source.clone(),
                label: self.labels[index],
                index,
                classes,
            }),
        }
    }

    /// A new set holding the given items, in that order (e.g. one worker's shard).
    pub fn subset(&self, indices: &[usize]) -> ImageSet {
        let n = self.image_len();
        let mut pixels = Vec::with_capacity(indices.len() * n);
        for &i in indices {
            pixels.extend_from_slice(self.image(i));
        }
        ImageSet {
            source: self.source.clone(),
            channels: self.channels,
            rows: self.rows,
            cols: self.cols,
            pixels,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
        }
    }
}

/// An image shape for people: `3×32×32`.
pub fn shape_text([channels, rows, cols]: [usize; 3]) -> String {
    format!("{channels}×{rows}×{cols}")
}

/// Labelled images a batch is read from: a set in memory ([`ImageSet`]), or one a
/// native worker reads from its shard's file on disk.
pub trait Images: Send + Sync {
    /// Number of images.
    fn count(&self) -> usize;
    /// Channels, rows and cols of every image.
    fn dims(&self) -> [usize; 3];
    /// Image `index`'s label.
    fn label(&self, index: usize) -> u16;
    /// Images per block when the set is read a block at a time
    /// ([`blocks::BlockedShard`]): its batches then come block by block.
    fn block(&self) -> Option<usize> {
        None
    }
    /// Image `index`'s pixels, channel-major: borrowed from memory, or read into
    /// `scratch` (which then holds them).
    ///
    /// # Panics
    /// A set on disk that can no longer be read (the worker cannot train without
    /// its shard, and says which file).
    fn pixels<'a>(&'a self, index: usize, scratch: &'a mut Vec<u8>) -> &'a [u8];
}

impl Images for ImageSet {
    fn count(&self) -> usize {
        self.len()
    }

    fn dims(&self) -> [usize; 3] {
        self.shape()
    }

    fn label(&self, index: usize) -> u16 {
        self.labels[index]
    }

    fn pixels<'a>(&'a self, index: usize, _scratch: &'a mut Vec<u8>) -> &'a [u8] {
        self.image(index)
    }
}

/// A training and a test set.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// Training images.
    pub train: ImageSet,
    /// Held-out test images.
    pub test: ImageSet,
    /// Class names in label order, as the data names them (folders, a
    /// `classes.txt`); may be shorter than the network's classes, see [`class_names`].
    pub classes: Vec<String>,
}

/// Longest class name kept, in characters (longer ones are cut with `…`).
pub const MAX_CLASS_NAME: usize = 64;

/// `names` cleaned for display and padded to `count`: control characters become
/// spaces, blanks are trimmed, long names are cut to [`MAX_CLASS_NAME`], names past
/// `count` dropped, and missing or empty ones are the label's number.
pub fn class_names(names: &[String], count: usize) -> Vec<String> {
    (0..count)
        .map(|label| {
            let raw = names.get(label).map_or("", String::as_str);
            let clean: String = raw
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            let clean = clean.trim();
            match clean.chars().count() {
                0 => label.to_string(),
                n if n > MAX_CLASS_NAME => {
                    let cut: String = clean.chars().take(MAX_CLASS_NAME - 1).collect();
                    format!("{cut}…")
                }
                _ => clean.to_string(),
            }
        })
        .collect()
}

/// Decompresses `bytes` if they start with the gzip magic; otherwise returns them as they are.
pub fn maybe_gunzip<'a>(
    file: &str,
    bytes: &'a [u8],
) -> Result<std::borrow::Cow<'a, [u8]>, DataError> {
    use std::io::Read;
    if bytes.len() >= 2 && bytes[0] == 0x1f && bytes[1] == 0x8b {
        let mut out = Vec::with_capacity(bytes.len() * 4);
        flate2::read::GzDecoder::new(bytes)
            .read_to_end(&mut out)
            .map_err(|e| DataError::Gzip {
                file: file.to_string(),
                message: e.to_string(),
            })?;
        Ok(std::borrow::Cow::Owned(out))
    } else {
        Ok(std::borrow::Cow::Borrowed(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_names_are_cleaned_bounded_and_padded() {
        let long = "x".repeat(200);
        let names: Vec<String> = ["cat", " dog\n", "", &long, "bell\u{7}", "extra"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let clean = class_names(&names, 6);
        assert_eq!(clean[..3], ["cat", "dog", "2"]);
        assert_eq!(clean[3].chars().count(), MAX_CLASS_NAME);
        assert!(clean[3].ends_with('…'));
        assert_eq!(clean[4], "bell");
        assert_eq!(class_names(&names, 2), ["cat", "dog"]);
        assert_eq!(class_names(&[], 3), ["0", "1", "2"]);
    }
}
