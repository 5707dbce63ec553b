//! Minibatches: per-epoch shuffles of a shard, pixel normalisation to f32, and the
//! endless stream of a shard's batches that a worker's steps consume (each image
//! seen through its [`Window`]).

use std::sync::Arc;

use super::blocks::{Blocking, BlocksAhead};
use super::window::{Window, fill_normalized};
use super::{ImageSet, Images};
use crate::rng::SplitMix64;
use serde::{Deserialize, Serialize};

/// Pixel normalisation per channel: x = (p/255 − mean_c) / std_c, with each channel's
/// mean and std taken over the training set (as the PyTorch peer does).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Normalization {
    /// One entry per image channel, in channel order.
    pub channels: Vec<ChannelStats>,
}

/// Mean and standard deviation of one channel's training pixels scaled to [0, 1].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChannelStats {
    /// Mean.
    pub mean: f32,
    /// Standard deviation (never 0).
    pub std: f32,
}

impl Normalization {
    /// Mean and standard deviation of each channel of `set`, scaled to [0, 1].
    pub fn of(set: &ImageSet) -> Self {
        let mut hist = PixelHistogram::new(set.shape());
        hist.add(&set.pixels);
        hist.finish()
    }

    /// For each channel, the normalised value of every possible byte.
    pub fn tables(&self) -> Vec<[f32; 256]> {
        self.channels
            .iter()
            .map(|c| std::array::from_fn(|v| (v as f32 / 255.0 - c.mean) / c.std))
            .collect()
    }
}

/// Per-channel pixel counts, fed whole images a chunk at a time (a set on disk
/// is normalised without holding it).
#[derive(Clone, Debug)]
pub struct PixelHistogram {
    plane: usize,
    hist: Vec<[u64; 256]>,
}

impl PixelHistogram {
    /// Empty counts for images of `[channels, rows, cols]`.
    pub fn new([channels, rows, cols]: [usize; 3]) -> Self {
        Self {
            plane: rows * cols,
            hist: vec![[0u64; 256]; channels],
        }
    }

    /// Counts `pixels`: whole images, channel-major.
    pub fn add(&mut self, pixels: &[u8]) {
        let image = self.plane * self.hist.len();
        if image == 0 {
            return;
        }
        for image in pixels.chunks_exact(image) {
            for (c, plane) in image.chunks_exact(self.plane).enumerate() {
                for &p in plane {
                    self.hist[c][usize::from(p)] += 1;
                }
            }
        }
    }

    /// The statistics of what was counted.
    pub fn finish(&self) -> Normalization {
        Normalization {
            channels: self.hist.iter().map(ChannelStats::of_histogram).collect(),
        }
    }
}

impl ChannelStats {
    fn of_histogram(hist: &[u64; 256]) -> Self {
        let n = hist.iter().sum::<u64>().max(1) as f64;
        let mean = hist
            .iter()
            .enumerate()
            .map(|(v, &c)| v as f64 / 255.0 * c as f64)
            .sum::<f64>()
            / n;
        let var = hist
            .iter()
            .enumerate()
            .map(|(v, &c)| (v as f64 / 255.0 - mean).powi(2) * c as f64)
            .sum::<f64>()
            / n;
        let std = var.sqrt() as f32;
        Self {
            mean: mean as f32,
            // A constant channel carries no information: centre it, do not blow it up.
            std: if std < 1e-6 { 1.0 } else { std },
        }
    }
}

/// Batches over a fixed list of item indices (a worker's shard), reshuffled every
/// epoch from (seed, epoch) so runs are reproducible.
#[derive(Clone, Debug)]
pub struct Batcher {
    indices: Vec<usize>,
    batch: usize,
    seed: u64,
    tables: Vec<[f32; 256]>,
    /// The network's input rows and columns; `None`: the whole image.
    input: Option<(usize, usize)>,
    /// Random horizontal flips.
    flip: bool,
    /// Block-wise epochs, for a set read a block at a time.
    blocking: Option<Blocking>,
}

impl Batcher {
    /// A batcher over `indices` with `batch` items per batch (the last batch of an
    /// epoch may be smaller, as in PyTorch's default).
    ///
    /// # Panics
    /// If `batch == 0`: the CLI rejects that before it gets here.
    pub fn new(indices: Vec<usize>, batch: usize, seed: u64, norm: &Normalization) -> Self {
        assert!(batch > 0, "batch size must be positive");
        Self {
            indices,
            batch,
            seed,
            tables: norm.tables(),
            input: None,
            flip: false,
            blocking: None,
        }
    }

    /// Batches for a network whose input is `[channels, rows, cols]`: images larger
    /// than that are cropped to it at random, a new place each epoch (the EASGD
    /// paper's CIFAR network takes 28×28 of CIFAR's 32×32).
    pub fn with_input(mut self, [_, rows, cols]: [usize; 3]) -> Self {
        self.input = Some((rows, cols));
        self
    }

    /// Batches whose images are mirrored left to right at random (half of them,
    /// drawn with the window).
    pub fn with_flip(mut self, flip: bool) -> Self {
        self.flip = flip;
        self
    }

    /// Epochs that visit the items block by block (blocks of `per_block`
    /// consecutive items, in a shuffled order, each shuffled within): for a set
    /// read a block at a time ([`Images::block`]). `None` shuffles the whole shard.
    pub fn with_blocks(mut self, per_block: Option<usize>) -> Self {
        self.blocking = per_block.map(|per| Blocking::new(&self.indices, per));
        self
    }

    /// Batches per epoch.
    pub fn batches_per_epoch(&self) -> usize {
        self.indices.len().div_ceil(self.batch)
    }

    /// The item order of `epoch`: the shard shuffled by (seed, epoch), or its
    /// blocks and the items within each (see [`Batcher::with_blocks`]).
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let seed = self.epoch_seed(epoch);
        if let Some(blocking) = &self.blocking {
            return blocking.order(&self.indices, seed);
        }
        let mut order = self.indices.clone();
        SplitMix64::new(seed).shuffle(&mut order);
        order
    }

    fn epoch_seed(&self, epoch: u64) -> u64 {
        self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    /// The order split into batches, the last one possibly short.
    pub fn chunks_with_tail<'a>(&self, order: &'a [usize]) -> std::slice::Chunks<'a, usize> {
        order.chunks(self.batch)
    }

    /// The normalised pixels of `items` (N·C·H·W of the network's input, row-major)
    /// and their labels, cropped where the images are larger: each item's window is
    /// drawn from (seed, `epoch`, item), the same natively and in the browser.
    pub fn batch<S: Images + ?Sized>(&self, set: &S, items: &[usize], epoch: u64) -> Batch {
        let [_, set_rows, set_cols] = set.dims();
        let (rows, cols) = self.input.unwrap_or((set_rows, set_cols));
        let window = if (rows, cols) == (set_rows, set_cols) && !self.flip {
            Window::Centre { rows, cols }
        } else {
            Window::Random {
                rows,
                cols,
                seed: self.seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ 0xC409,
                flip: self.flip,
            }
        };
        let mut batch = Batch::default();
        fill_normalized(
            set,
            items,
            &self.tables,
            window,
            &mut batch.images,
            &mut batch.labels,
        );
        batch
    }
}

/// One minibatch, ready for a step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    /// N normalised images, N·C·H·W values, row-major.
    pub images: Vec<f32>,
    /// Their N classes.
    pub labels: Vec<i64>,
}

impl Batch {
    /// Images in the batch.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the batch holds no image.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// Where a worker's steps take their batches from: a [`BatchStream`] itself, or
/// (native workers) a thread that runs one ahead of the steps.
pub trait BatchSource {
    /// The next batch to train on.
    fn next_batch(&mut self) -> Batch;

    /// The blocks a set read a block at a time must hold for the next batch,
    /// and the one to read meanwhile; `None` for a set held whole.
    fn blocks_ahead(&self) -> Option<BlocksAhead> {
        None
    }
}

/// A shard's batches, epoch after epoch, each epoch in its own shuffle
/// ([`Batcher::epoch_order`]); an epoch's last batch may be short.
#[derive(Clone)]
pub struct BatchStream {
    batcher: Batcher,
    set: Arc<dyn Images>,
    order: Vec<usize>,
    cursor: usize,
    epoch: u64,
}

impl BatchStream {
    /// The batches of `batcher`'s items of `set`, starting with epoch `first_epoch`.
    pub fn new(batcher: Batcher, set: Arc<dyn Images>, first_epoch: u64) -> Self {
        Self {
            order: batcher.epoch_order(first_epoch),
            batcher,
            set,
            cursor: 0,
            epoch: first_epoch,
        }
    }
}

impl BatchSource for BatchStream {
    fn next_batch(&mut self) -> Batch {
        let end = (self.cursor + self.batcher.batch).min(self.order.len());
        let batch = self
            .batcher
            .batch(&*self.set, &self.order[self.cursor..end], self.epoch);
        self.cursor = end;
        // The next epoch's order now, so the next batch is always known.
        if self.cursor >= self.order.len() {
            self.epoch += 1;
            self.order = self.batcher.epoch_order(self.epoch);
            self.cursor = 0;
        }
        batch
    }

    fn blocks_ahead(&self) -> Option<BlocksAhead> {
        let blocking = self.batcher.blocking.as_ref()?;
        Some(blocking.ahead(
            &self.order,
            self.cursor,
            self.batcher.batch,
            self.batcher.epoch_seed(self.epoch + 1),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One channel left as p/255.
    fn identity() -> Normalization {
        Normalization {
            channels: vec![ChannelStats {
                mean: 0.0,
                std: 1.0,
            }],
        }
    }

    fn set() -> ImageSet {
        ImageSet {
            source: "t".into(),
            channels: 1,
            rows: 1,
            cols: 2,
            pixels: vec![0, 255, 0, 255, 51, 51],
            labels: vec![1, 2, 3],
        }
    }

    #[test]
    fn normalisation_centres_and_scales() {
        let s = set();
        let norm = Normalization::of(&s);
        let vals: Vec<f32> = s
            .pixels
            .iter()
            .map(|&p| norm.tables()[0][usize::from(p)])
            .collect();
        let mean = vals.iter().sum::<f32>() / vals.len() as f32;
        let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / vals.len() as f32;
        assert!(
            mean.abs() < 1e-5 && (var - 1.0).abs() < 1e-4,
            "{mean} {var}"
        );
    }

    #[test]
    fn each_channel_is_normalised_by_its_own_statistics() {
        // Two 1×2 images of 3 channels: red is 0 or 255, green always 51, blue 0..255.
        let s = ImageSet {
            source: "t".into(),
            channels: 3,
            rows: 1,
            cols: 2,
            pixels: vec![0, 255, 51, 51, 0, 0, 255, 0, 51, 51, 255, 255],
            labels: vec![0, 1],
        };
        let norm = Normalization::of(&s);
        let [r, g, b] = [0, 1, 2].map(|c| norm.channels[c]);
        assert!(
            (r.mean - 0.5).abs() < 1e-6 && (r.std - 0.5).abs() < 1e-6,
            "{r:?}"
        );
        assert!((g.mean - 0.2).abs() < 1e-6 && g.std == 1.0, "{g:?}");
        assert!((b.mean - 0.5).abs() < 1e-6, "{b:?}");
        let batch = Batcher::new(vec![0, 1], 2, 0, &norm).batch(&s, &[1], 0);
        assert_eq!(batch.images.len(), 6);
        // Image 1: red 255 then 0 → +1, −1; green centred to 0; blue 255, 255 → +1, +1.
        assert_eq!([batch.images[0], batch.images[1]], [1.0, -1.0]);
        assert!(batch.images[2..4].iter().all(|v| v.abs() < 1e-6));
        assert_eq!([batch.images[4], batch.images[5]], [1.0, 1.0]);
    }

    #[test]
    fn epochs_shuffle_differently_and_cover_the_shard() {
        let b = Batcher::new((0..100).collect(), 32, 5, &identity());
        assert_eq!(b.batches_per_epoch(), 4);
        let (e0, e1) = (b.epoch_order(0), b.epoch_order(1));
        assert_ne!(e0, e1);
        assert_eq!(e0, b.epoch_order(0));
        let sizes: Vec<usize> = b.chunks_with_tail(&e0).map(<[usize]>::len).collect();
        assert_eq!(sizes, [32, 32, 32, 4]);
        let mut sorted = e1.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn a_batch_holds_pixels_and_labels_in_item_order() {
        let s = set();
        let b = Batcher::new(vec![0, 1, 2], 2, 0, &identity());
        let batch = b.batch(&s, &[2, 0], 0);
        assert_eq!(batch.labels, [3, 1]);
        assert_eq!(batch.images, [0.2, 0.2, 0.0, 1.0]);
    }

    #[test]
    fn a_stream_walks_each_epoch_in_its_own_order_with_a_short_tail() {
        let s = Arc::new(set());
        let b = Batcher::new(vec![0, 1, 2], 2, 7, &identity());
        let mut stream = BatchStream::new(b.clone(), s.clone(), 1);
        for epoch in 1..4 {
            let order = b.epoch_order(epoch);
            for items in b.chunks_with_tail(&order) {
                assert_eq!(
                    stream.next_batch(),
                    b.batch(&*s, items, epoch),
                    "epoch {epoch}"
                );
            }
        }
    }

    /// Two 1-channel 4×4 images whose pixel is 10·row + col (plus 100 for the second).
    fn grid_set() -> ImageSet {
        let pixels = (0..2u8)
            .flat_map(|k| (0..16u8).map(move |p| 100 * k + 10 * (p / 4) + p % 4))
            .collect();
        ImageSet {
            source: "grid".into(),
            channels: 1,
            rows: 4,
            cols: 4,
            pixels,
            labels: vec![0, 1],
        }
    }

    /// Pixel values back from an identity-normalised batch.
    fn raw(images: &[f32]) -> Vec<u8> {
        images.iter().map(|v| (v * 255.0).round() as u8).collect()
    }

    #[test]
    fn evaluation_sees_the_centre_and_training_a_random_window_per_epoch() {
        let s = grid_set();
        let (mut images, mut labels) = (Vec::new(), Vec::new());
        let tables = identity().tables();
        fill_normalized(
            &s,
            &[1],
            &tables,
            Window::centre([1, 2, 2]),
            &mut images,
            &mut labels,
        );
        assert_eq!(raw(&images), [111, 112, 121, 122]);
        assert_eq!(labels, [1]);

        let b = Batcher::new(vec![0, 1], 2, 3, &identity()).with_input([1, 2, 2]);
        let mut places = std::collections::BTreeSet::new();
        for epoch in 0..40 {
            let batch = b.batch(&s, &[0, 1], epoch);
            assert_eq!(batch.images.len(), 2 * 4);
            assert_eq!(batch, b.batch(&s, &[0, 1], epoch), "seeded");
            let px = raw(&batch.images);
            for image in px.chunks(4) {
                // A 2×2 window of the grid: right, below and diagonal neighbours.
                let (r, c) = (image[0] % 100 / 10, image[0] % 10);
                assert!(r <= 2 && c <= 2, "{image:?}");
                assert_eq!(image[1..], [image[0] + 1, image[0] + 10, image[0] + 11]);
            }
            places.insert(px[0]);
        }
        assert_eq!(places.len(), 9, "every one of the 3×3 places: {places:?}");
        // A network as large as the images sees them whole, the same every epoch.
        let whole = Batcher::new(vec![0], 1, 3, &identity()).with_input([1, 4, 4]);
        assert_eq!(whole.batch(&s, &[0], 1), whole.batch(&s, &[0], 2));
        assert_eq!(
            raw(&whole.batch(&s, &[0], 1).images),
            raw(&whole.batch(&s, &[0], 5).images)
        );
    }

    #[test]
    fn flips_mirror_half_the_windows_and_evaluation_none() {
        let s = grid_set();
        let b = Batcher::new(vec![0, 1], 2, 3, &identity())
            .with_input([1, 4, 4])
            .with_flip(true);
        let (mut plain, mut mirrored) = (0, 0);
        for epoch in 0..40 {
            let batch = b.batch(&s, &[0, 1], epoch);
            assert_eq!(batch, b.batch(&s, &[0, 1], epoch), "seeded");
            for image in raw(&batch.images).chunks(16) {
                // Each row of the grid counts up left to right, or down when mirrored.
                if image[1] == image[0] + 1 {
                    plain += 1;
                } else {
                    assert_eq!(
                        image[..4],
                        [image[3] + 3, image[3] + 2, image[3] + 1, image[3]]
                    );
                    mirrored += 1;
                }
            }
        }
        assert!(
            plain > 20 && mirrored > 20,
            "{plain} plain, {mirrored} mirrored"
        );
        let (mut images, mut labels) = (Vec::new(), Vec::new());
        fill_normalized(
            &s,
            &[0],
            &identity().tables(),
            Window::centre([1, 4, 4]),
            &mut images,
            &mut labels,
        );
        assert_eq!(raw(&images)[1], raw(&images)[0] + 1, "scoring never flips");
    }
}
