//! The window of each image a network sees: its centre when scoring, a random
//! place (and mirror) per epoch when training, as the EASGD paper trained its CIFAR
//! network; and the normalised pixels of those windows for a batch.

use super::Images;
use crate::rng::SplitMix64;

/// Which `rows`×`cols` window of each image goes into a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Window {
    /// The centre (evaluation; the whole image when it is that size). An odd
    /// margin leaves its extra row or column at the bottom or right.
    Centre {
        /// Rows of the window.
        rows: usize,
        /// Columns of the window.
        cols: usize,
    },
    /// A place drawn from `seed` and the item's index (training).
    Random {
        /// Rows of the window.
        rows: usize,
        /// Columns of the window.
        cols: usize,
        /// With the item's index, where the window lies.
        seed: u64,
        /// Whether half the windows are mirrored left to right.
        flip: bool,
    },
}

impl Window {
    /// The centre window of a network's input `[channels, rows, cols]`.
    pub fn centre([_, rows, cols]: [usize; 3]) -> Self {
        Self::Centre { rows, cols }
    }

    fn size(self) -> (usize, usize) {
        match self {
            Self::Centre { rows, cols } | Self::Random { rows, cols, .. } => (rows, cols),
        }
    }

    /// The top row and left column of item `item`'s window in `set`, and whether
    /// it is mirrored.
    fn place(self, [_, set_rows, set_cols]: [usize; 3], item: usize) -> (usize, usize, bool) {
        let (rows, cols) = self.size();
        let (spare_rows, spare_cols) = (set_rows - rows, set_cols - cols);
        match self {
            Self::Centre { .. } => (spare_rows / 2, spare_cols / 2, false),
            Self::Random { seed, flip, .. } => {
                let mut rng =
                    SplitMix64::new(seed ^ (item as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
                let (top, left) = (rng.below(spare_rows + 1), rng.below(spare_cols + 1));
                (top, left, flip && rng.next_u64() & 1 == 1)
            }
        }
    }
}

/// Writes the normalised pixels of `window` of each of `items`, each channel through
/// its own table of [`Normalization::tables`], and the items' labels.
///
/// # Panics
/// If `tables` has not one table per channel of `set`, or the window is larger than
/// the images (sessions check the data and normalisation against the model before
/// they make batches).
pub fn fill_normalized<S: Images + ?Sized>(
    set: &S,
    items: &[usize],
    tables: &[[f32; 256]],
    window: Window,
    images: &mut Vec<f32>,
    labels: &mut Vec<i64>,
) {
    let dims = set.dims();
    let [channels, set_rows, set_cols] = dims;
    assert_eq!(tables.len(), channels, "one normalisation per channel");
    let (rows, cols) = window.size();
    assert!(
        rows <= set_rows && cols <= set_cols,
        "a {rows}×{cols} window of {set_rows}×{set_cols} images"
    );
    images.clear();
    labels.clear();
    images.reserve(items.len() * channels * rows * cols);
    let plane = set_rows * set_cols;
    let mut scratch = Vec::new();
    for &i in items {
        let (top, left, mirrored) = window.place(dims, i);
        for (pixels, table) in set.pixels(i, &mut scratch).chunks_exact(plane).zip(tables) {
            for row in pixels.chunks_exact(set_cols).skip(top).take(rows) {
                let row = row[left..left + cols]
                    .iter()
                    .map(|&p| table[usize::from(p)]);
                if mirrored {
                    images.extend(row.rev());
                } else {
                    images.extend(row);
                }
            }
        }
        labels.push(i64::from(set.label(i)));
    }
}
