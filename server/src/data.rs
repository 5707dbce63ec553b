//! The run's data as its server holds it: the training set workers download
//! shards of (in memory, or a packed file on disk read by offset when it is larger
//! than `--data-memory`), the test set the center is scored on, the classes' names,
//! and what is computed once over all training images (normalisation, the data id).

use std::path::PathBuf;
use std::sync::Arc;

use tether_dataset::{self as dataset, Format, LoadError, PackedSet, packed};
use tether_shared::data::{Dataset, ImageSet, Normalization, PixelHistogram, decode_images};
use tether_shared::rng::SplitMix64;

use crate::config::ServerConfig;

/// Most training images a set on disk keeps in memory for the server's own steps
/// (the loss screen's batches, the norm guard's calibration, batch-norm
/// estimates): 8 192, and at most half the memory budget (but 256 at least).
const SAMPLE_IMAGES: usize = 8192;

/// The training set as the server holds it.
pub enum TrainSet {
    /// All of it in memory.
    Memory(Arc<ImageSet>),
    /// A packed file read by offset (shards are streamed from it), with a seeded
    /// sample of its images in memory.
    Disk {
        /// The file.
        packed: Arc<PackedSet>,
        /// Some of its images (see `SAMPLE_IMAGES`), spread by a fixed seed.
        sample: Arc<ImageSet>,
    },
}

impl TrainSet {
    /// Images in the set.
    pub fn len(&self) -> usize {
        match self {
            Self::Memory(set) => set.len(),
            Self::Disk { packed, .. } => packed.len(),
        }
    }

    /// True when the set holds no image.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The images the server trains and scores on itself: all of them in memory,
    /// or the sample of a set on disk.
    pub fn in_memory(&self) -> Arc<ImageSet> {
        match self {
            Self::Memory(set) => set.clone(),
            Self::Disk { sample, .. } => sample.clone(),
        }
    }

    /// The packed file, for a set on disk.
    pub fn packed(&self) -> Option<Arc<PackedSet>> {
        match self {
            Self::Memory(_) => None,
            Self::Disk { packed, .. } => Some(packed.clone()),
        }
    }

    /// The whole set, when it is in memory.
    pub fn whole(&self) -> Option<Arc<ImageSet>> {
        match self {
            Self::Memory(set) => Some(set.clone()),
            Self::Disk { .. } => None,
        }
    }
}

/// A run's data as its server holds it.
pub struct RunData {
    /// The training set (workers download their shards of it).
    pub train: TrainSet,
    /// The test set the center is scored on.
    pub test: ImageSet,
    /// Class names as the data gives them (folders, a names file; may be empty).
    pub classes: Vec<String>,
    /// Each channel's statistics over every training image.
    pub normalization: Normalization,
    /// A fingerprint of the training set, naming it in shard URLs so browsers
    /// cache per data set.
    pub data_id: String,
}

impl RunData {
    /// `data`, all in memory, with its test set cut to the first `eval_limit` images.
    pub fn new(data: Dataset, eval_limit: Option<usize>) -> Self {
        let mut id = DataId::new();
        id.add(data.train.labels.iter().flat_map(|l| l.to_le_bytes()));
        id.add(data.train.pixels.iter().copied());
        Self {
            normalization: Normalization::of(&data.train),
            data_id: id.finish(data.train.len()),
            train: TrainSet::Memory(Arc::new(data.train)),
            test: cut(data.test, eval_limit),
            classes: data.classes,
        }
    }

    /// A packed data set whose training file stays on disk: one pass over it for
    /// the normalisation and the data id, a sample read into memory (within half
    /// of `memory` bytes).
    pub fn on_disk(
        packed: PackedSet,
        test: ImageSet,
        classes: Vec<String>,
        eval_limit: Option<usize>,
        memory: u64,
    ) -> Result<Self, LoadError> {
        let mut id = DataId::new();
        id.add(packed.labels().iter().flat_map(|l| l.to_le_bytes()));
        let mut hist = PixelHistogram::new(packed.shape());
        packed.each_chunk(|pixels| {
            hist.add(pixels);
            id.add(pixels.iter().copied());
        })?;
        let image = packed.shape().iter().product::<usize>() as u64;
        let within = usize::try_from(memory / 2 / image.max(1)).unwrap_or(usize::MAX);
        let want = within.clamp(256, SAMPLE_IMAGES);
        // Drawn, not shuffled: no vector as long as the set (a repeat is dropped).
        let mut rng = SplitMix64::new(0x5eed);
        let mut picks: Vec<usize> = match packed.len() {
            n if n <= want => (0..n).collect(),
            n => (0..want).map(|_| rng.below(n)).collect(),
        };
        picks.sort_unstable(); // read in file order
        picks.dedup();
        let sample = Arc::new(packed.read(&picks)?);
        Ok(Self {
            normalization: hist.finish(),
            data_id: id.finish(packed.len()),
            train: TrainSet::Disk {
                packed: Arc::new(packed),
                sample,
            },
            test: cut(test, eval_limit),
            classes,
        })
    }
}

fn cut(test: ImageSet, eval_limit: Option<usize>) -> ImageSet {
    match eval_limit {
        Some(n) => test.subset(&(0..n.min(test.len())).collect::<Vec<_>>()),
        None => test,
    }
}

/// FNV-1a over a training set's labels (little-endian) and pixels, then its length.
struct DataId(u64);

impl DataId {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    fn add(&mut self, bytes: impl Iterator<Item = u8>) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn finish(&self, len: usize) -> String {
        format!("{:016x}", self.0 ^ len as u64)
    }
}

/// The run's data (`--data` or the shipped set), decoded for the run's network and
/// checked against its input shape and classes; the test set cut to `--eval-limit`.
/// A packed set, or an image folder once packed, whose training file is larger than
/// `--data-memory` stays on disk.
pub fn load_data(config: &ServerConfig) -> Result<(PathBuf, RunData), LoadError> {
    if let Some(dir) = &config.data
        && let Some((train, test, classes)) = large_packed(config, dir)?
    {
        if dataset::format(dir) == Format::Folder {
            folder_classes(config, dir, classes.len())?;
        }
        let train = PackedSet::open(&train)?;
        let bytes = std::fs::read(&test).map_err(|source| LoadError::Io {
            path: test.clone(),
            source,
        })?;
        let test = decode_images(&test.display().to_string(), &bytes)?;
        check(config, [&train.read(&[0])?, &test])?;
        expect_labels(config, train.labels(), train.path())?;
        tracing::info!(
            "{}: {} MiB of training images, more than --data-memory: served from disk",
            train.path().display(),
            train.file_len() >> 20
        );
        let data = RunData::on_disk(train, test, classes, config.eval_limit, config.data_memory)?;
        return Ok((dir.clone(), data));
    }
    let shape = Some(config.run.model.data_shape());
    let (data_dir, data) = dataset::load_for(config.data.as_deref(), shape)?;
    if dataset::format(&data_dir) == Format::Folder {
        folder_classes(config, &data_dir, data.classes.len())?;
    }
    check(config, [&data.train, &data.test])?;
    Ok((data_dir, RunData::new(data, config.eval_limit)))
}

/// The training and test files and the class names of `dir` when it is packed (a
/// packed set, or an image folder packed for the network here) and its training
/// file is larger than `--data-memory`.
fn large_packed(
    config: &ServerConfig,
    dir: &std::path::Path,
) -> Result<Option<(PathBuf, PathBuf, Vec<String>)>, LoadError> {
    let files = match dataset::format(dir) {
        Format::Packed(_) => Some((
            dir.join(packed::TRAIN_FILE),
            dir.join(packed::TEST_FILE),
            dataset::load_class_names(dir),
        )),
        Format::Folder => match dataset::cache_dir() {
            Some(cache) => {
                let shape = config.run.model.data_shape();
                let folder = dataset::pack_folder(dir, shape, &cache.join("folders"))?;
                let large =
                    std::fs::metadata(&folder.train).map_or(0, |m| m.len()) > config.data_memory;
                // A small folder is read by `load_for`, which says the same.
                if large && folder.skipped.0 > 0 {
                    tracing::warn!(
                        "{}: skipped {} file(s) that did not decode as images",
                        dir.display(),
                        folder.skipped.0
                    );
                }
                Some((folder.train, folder.test, folder.classes))
            }
            None => None,
        },
        _ => None,
    };
    Ok(files
        .filter(|(train, ..)| std::fs::metadata(train).is_ok_and(|m| m.len() > config.data_memory)))
}

/// An image folder's class folders against the network's classes: more folders
/// than outputs cannot train; fewer leave outputs no image teaches (said, allowed).
fn folder_classes(
    config: &ServerConfig,
    dir: &std::path::Path,
    found: usize,
) -> Result<(), LoadError> {
    let model = &config.run.model;
    if found > model.classes() {
        return Err(LoadError::Folder {
            dir: dir.to_path_buf(),
            why: format!(
                "{found} class folders, but the {} network scores {} classes: set `classes = {found}` (and its last linear layer to {found})",
                model.name(),
                model.classes()
            ),
        });
    }
    if found < model.classes() {
        tracing::warn!(
            "{}: {found} class folders; the {} network scores {} classes (the others get no image)",
            dir.display(),
            model.name(),
            model.classes()
        );
    }
    Ok(())
}

fn check(config: &ServerConfig, sets: [&ImageSet; 2]) -> Result<(), LoadError> {
    for set in sets {
        set.expect_network(&config.run.model)?;
    }
    Ok(())
}

/// Every label of a set on disk is one of the network's classes.
fn expect_labels(
    config: &ServerConfig,
    labels: &[u16],
    path: &std::path::Path,
) -> Result<(), LoadError> {
    let classes = config.run.model.classes();
    match labels.iter().position(|&l| usize::from(l) >= classes) {
        None => Ok(()),
        Some(index) => Err(tether_shared::data::DataError::BadLabel {
            file: path.display().to_string(),
            index,
            label: labels[index],
            classes,
        }
        .into()),
    }
}
