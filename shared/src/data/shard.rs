//! Disjoint shards of a training set: a seeded permutation cut into p near-equal
//! parts, and the binary form a browser worker downloads its shard in.

use super::{DataError, ImageSet};
use crate::rng::SplitMix64;

/// First bytes of an encoded image set (version 2: two-byte labels; version 1,
/// `"TSIM"`, had one-byte labels and is refused by its magic).
pub const IMAGES_MAGIC: &[u8; 4] = b"TSI2";
const IMAGES_HEADER: usize = 4 + 4 * 4;
/// Bytes per label.
const LABEL_BYTES: usize = 2;

/// Encodes `set` for the wire: `"TSI2"`, then count, channels, rows, cols as u32
/// little-endian, then the labels (u16 little-endian), then the pixels.
pub fn encode_images(set: &ImageSet) -> Vec<u8> {
    let mut out = encode_head(set.shape(), &set.labels);
    out.reserve_exact(set.pixels.len());
    out.extend_from_slice(&set.pixels);
    out
}

/// What [`encode_images`] writes before the pixels, for sets written a piece at a
/// time: magic, count and shape, then `labels`.
pub fn encode_head(shape: [usize; 3], labels: &[u16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(IMAGES_HEADER + LABEL_BYTES * labels.len());
    out.extend_from_slice(IMAGES_MAGIC);
    for v in [labels.len(), shape[0], shape[1], shape[2]] {
        out.extend_from_slice(&(v as u32).to_le_bytes());
    }
    for label in labels {
        out.extend_from_slice(&label.to_le_bytes());
    }
    out
}

/// Decodes [`encode_images`]' output, checking every length; `file` names the
/// source in errors. Labels are checked against the network that trains on the
/// set, by [`ImageSet::expect_network`] and the worker's shard check.
pub fn decode_images(file: &str, bytes: &[u8]) -> Result<ImageSet, DataError> {
    let head = ImagesHead::decode(file, bytes, bytes.len() as u64)?;
    let [channels, rows, cols] = head.dims;
    Ok(ImageSet {
        source: file.into(),
        channels,
        rows,
        cols,
        pixels: bytes[head.pixels_at..].to_vec(),
        labels: head.labels,
    })
}

/// The head of an encoded image set (shape, labels, where the pixels start), for
/// a reader that loads the pixels a block at a time (a tab whose shard is larger
/// than its memory budget).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImagesHead {
    /// Channels, rows and cols of every image.
    pub dims: [usize; 3],
    /// Every image's label.
    pub labels: Vec<u16>,
    /// The byte offset of the first pixel.
    pub pixels_at: usize,
}

impl ImagesHead {
    /// Bytes of the fixed header that [`ImagesHead::size`] reads.
    pub const FIXED: usize = IMAGES_HEADER;

    /// Bytes the whole head takes (header and labels), read from the set's first
    /// [`ImagesHead::FIXED`] bytes.
    pub fn size(file: &str, prefix: &[u8]) -> Result<usize, DataError> {
        let (count, _, _) = header(file, prefix)?;
        count
            .checked_mul(LABEL_BYTES)
            .and_then(|v| v.checked_add(IMAGES_HEADER))
            .ok_or(DataError::Truncated {
                file: file.into(),
                expected: usize::MAX,
                actual: prefix.len(),
            })
    }

    /// Decodes the head of an encoded set of `total` bytes from `bytes`, its first
    /// bytes (the whole head at least), checking that `total` is the size the
    /// header implies.
    pub fn decode(file: &str, bytes: &[u8], total: u64) -> Result<Self, DataError> {
        let (count, dims, image) = header(file, bytes)?;
        // In u64: a tab's shard may be larger than its 32-bit address space.
        let size = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
        let expected = (count as u64)
            .checked_mul(image as u64 + LABEL_BYTES as u64)
            .and_then(|v| v.checked_add(IMAGES_HEADER as u64))
            .unwrap_or(u64::MAX);
        if total < expected {
            return Err(DataError::Truncated {
                file: file.into(),
                expected: size(expected),
                actual: size(total),
            });
        }
        if total > expected {
            return Err(DataError::TrailingBytes {
                file: file.into(),
                expected: size(expected),
                extra: size(total - expected),
            });
        }
        let pixels_at = Self::size(file, bytes)?;
        let labels = bytes
            .get(IMAGES_HEADER..pixels_at)
            .ok_or(DataError::Truncated {
                file: file.into(),
                expected: pixels_at,
                actual: bytes.len(),
            })?
            .chunks_exact(LABEL_BYTES)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        Ok(Self {
            dims,
            labels,
            pixels_at,
        })
    }

    /// Bytes per image.
    pub fn image_bytes(&self) -> usize {
        self.dims.iter().product()
    }
}

/// The fixed header's count, shape and bytes per image, checked.
fn header(file: &str, bytes: &[u8]) -> Result<(usize, [usize; 3], usize), DataError> {
    if bytes.len() < IMAGES_HEADER {
        return Err(DataError::Truncated {
            file: file.into(),
            expected: IMAGES_HEADER,
            actual: bytes.len(),
        });
    }
    if &bytes[..4] != IMAGES_MAGIC {
        return Err(DataError::BadMagic {
            file: file.into(),
            found: u32::from_be_bytes(bytes[..4].try_into().expect("4 bytes")),
            expected: "\"TSI2\" (a tether image set)",
        });
    }
    let field = |i: usize| {
        let at = 4 + 4 * i;
        u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize
    };
    let (count, dims) = (field(0), [field(1), field(2), field(3)]);
    if count == 0 {
        return Err(DataError::Empty { file: file.into() });
    }
    let image = dims[0]
        .checked_mul(dims[1])
        .and_then(|v| v.checked_mul(dims[2]))
        .filter(|&v| v > 0)
        .ok_or_else(|| DataError::WrongImageSize {
            file: file.into(),
            found: super::shape_text(dims),
            expected: "a non-empty image".into(),
        })?;
    Ok((count, dims, image))
}

/// The item indices of `worker`'s shard when `n` items are split among `workers`.
/// Shards are disjoint, cover all items, differ in size by at most one, and depend
/// only on (n, workers, worker, seed).
///
/// # Panics
/// If `workers == 0` or `worker >= workers`: callers validate these first.
pub fn shard_indices(n: usize, workers: usize, worker: usize, seed: u64) -> Vec<usize> {
    assert!(worker < workers, "worker {worker} out of 0..{workers}");
    let mut all: Vec<usize> = (0..n).collect();
    SplitMix64::new(seed).shuffle(&mut all);
    let start = worker * n / workers;
    let end = (worker + 1) * n / workers;
    let mut shard = all[start..end].to_vec();
    shard.sort_unstable(); // a stable order; batches shuffle it per epoch anyway
    shard
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ImageSet {
        ImageSet {
            source: "tiny".into(),
            channels: 1,
            rows: 2,
            cols: 3,
            pixels: (0..18).collect(),
            labels: vec![0, 9, 40_000],
        }
    }

    #[test]
    fn image_sets_round_trip() {
        let set = tiny();
        let bytes = encode_images(&set);
        let back = decode_images("tiny", &bytes).unwrap();
        assert_eq!(back, set);
    }

    #[test]
    fn damaged_image_sets_are_typed_errors() {
        let bytes = encode_images(&tiny());
        assert!(matches!(
            decode_images("x", &bytes[..10]),
            Err(DataError::Truncated { .. })
        ));
        assert!(matches!(
            decode_images("x", &bytes[..bytes.len() - 1]),
            Err(DataError::Truncated { .. })
        ));
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(
            decode_images("x", &long),
            Err(DataError::TrailingBytes { extra: 1, .. })
        ));
        let mut magic = bytes.clone();
        magic[0] = b'X';
        assert!(matches!(
            decode_images("x", &magic),
            Err(DataError::BadMagic { .. })
        ));
        let mut old = bytes.clone();
        old[..4].copy_from_slice(b"TSIM");
        let err = decode_images("x", &old).unwrap_err().to_string();
        assert!(err.contains("TSI2"), "version 1's one-byte labels: {err}");
        let mut huge = bytes;
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        huge[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_images("x", &huge).is_err());
    }

    #[test]
    fn shards_are_disjoint_cover_everything_and_are_balanced() {
        let (n, p) = (1003, 4);
        let shards: Vec<Vec<usize>> = (0..p).map(|w| shard_indices(n, p, w, 42)).collect();
        let mut all: Vec<usize> = shards.iter().flatten().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..n).collect::<Vec<_>>());
        let sizes: Vec<usize> = shards.iter().map(Vec::len).collect();
        assert!(
            sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1,
            "{sizes:?}"
        );
        assert_eq!(shard_indices(n, p, 2, 42), shards[2], "deterministic");
        assert_ne!(shard_indices(n, p, 2, 43), shards[2], "seed matters");
    }
}
