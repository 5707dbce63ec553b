//! Packed image sets on disk: the `TSI2` bytes a shard travels in (header, u16
//! labels, pixels), read by offset so a training set larger than memory can be
//! served. Only the labels are held (2 bytes an image); pixels are read when asked
//! for, a bounded chunk at a time.
//!
//! A folder holding `train.tsi` and `test.tsi` is a data set of its own (see
//! [`crate::Format::Packed`]); the server opens a large training set this way.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use tether_shared::data::{DataError, ImageSet, Normalization, encode_head, encode_images};
use tether_shared::data::{IMAGES_MAGIC, Images, PixelHistogram};

use crate::LoadError;

/// The training file of a packed data set.
pub const TRAIN_FILE: &str = "train.tsi";
/// Its test file.
pub const TEST_FILE: &str = "test.tsi";
/// Header bytes: magic, then count, channels, rows, cols as u32.
const HEADER: u64 = 4 + 4 * 4;
/// Pixels read at once when streaming (a bounded buffer, whatever the set's size).
const CHUNK_BYTES: usize = 1 << 20;

/// A packed image set opened for reading by offset.
#[derive(Debug)]
pub struct PackedSet {
    path: PathBuf,
    file: File,
    shape: [usize; 3],
    labels: Vec<u16>,
}

impl PackedSet {
    /// Opens `path`, reading its header and labels and checking its length.
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        let io = |source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let name = path.display().to_string();
        let mut header = [0u8; HEADER as usize];
        file.read_exact(&mut header)
            .map_err(|_| DataError::Truncated {
                file: name.clone(),
                expected: HEADER as usize,
                actual: len as usize,
            })?;
        if &header[..4] != IMAGES_MAGIC {
            return Err(DataError::BadMagic {
                file: name,
                found: u32::from_be_bytes(header[..4].try_into().expect("4 bytes")),
                expected: "\"TSI2\" (a tether image set)",
            }
            .into());
        }
        let field = |i: usize| {
            u64::from(u32::from_le_bytes(
                header[4 + 4 * i..8 + 4 * i].try_into().expect("4 bytes"),
            ))
        };
        let (count, shape) = (field(0), [field(1), field(2), field(3)]);
        let image = shape[0] * shape[1] * shape[2];
        let expected = HEADER + count * 2 + count * image;
        if count == 0 || image == 0 || len != expected {
            return Err(DataError::Truncated {
                file: name,
                expected: expected as usize,
                actual: len as usize,
            }
            .into());
        }
        let mut raw = vec![0u8; count as usize * 2];
        file.read_exact(&mut raw).map_err(io)?;
        let labels = raw
            .chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            file,
            shape: shape.map(|v| v as usize),
            labels,
        })
    }

    /// Images in the set.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when it holds none (never, once opened).
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Channels, rows, cols.
    pub fn shape(&self) -> [usize; 3] {
        self.shape
    }

    /// Every image's label.
    pub fn labels(&self) -> &[u16] {
        &self.labels
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes of the file.
    pub fn file_len(&self) -> u64 {
        HEADER + self.len() as u64 * (2 + self.image_len() as u64)
    }

    fn image_len(&self) -> usize {
        self.shape.iter().product()
    }

    fn pixels_at(&self, index: usize) -> u64 {
        HEADER + self.len() as u64 * 2 + index as u64 * self.image_len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), LoadError> {
        read_exact_at(&self.file, buf, offset).map_err(|source| LoadError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// The images at `indices` (in that order), in memory.
    pub fn read(&self, indices: &[usize]) -> Result<ImageSet, LoadError> {
        let image = self.image_len();
        let mut pixels = vec![0u8; indices.len() * image];
        for (out, &i) in pixels.chunks_exact_mut(image).zip(indices) {
            self.read_at(out, self.pixels_at(i))?;
        }
        let [channels, rows, cols] = self.shape;
        Ok(ImageSet {
            source: self.path.display().to_string(),
            channels,
            rows,
            cols,
            pixels,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
        })
    }

    /// Writes the images at `indices` as one `TSI2` set to `out` (a shard as
    /// [`encode_images`] would encode it), reading at most a few MiB at a time.
    pub fn write_subset(&self, indices: &[usize], out: &mut impl Write) -> Result<u64, LoadError> {
        let io = |source| LoadError::Io {
            path: self.path.clone(),
            source,
        };
        let labels: Vec<u16> = indices.iter().map(|&i| self.labels[i]).collect();
        let head = encode_head(self.shape, &labels);
        out.write_all(&head).map_err(io)?;
        let mut written = head.len() as u64;
        let image = self.image_len();
        let per_chunk = (CHUNK_BYTES / image).max(1);
        let mut buf = Vec::with_capacity(per_chunk * image);
        for chunk in indices.chunks(per_chunk) {
            buf.resize(chunk.len() * image, 0);
            for (slot, &i) in buf.chunks_exact_mut(image).zip(chunk) {
                self.read_at(slot, self.pixels_at(i))?;
            }
            out.write_all(&buf).map_err(io)?;
            written += buf.len() as u64;
        }
        Ok(written)
    }

    /// Bytes [`PackedSet::write_subset`] writes for `count` images.
    pub fn subset_len(&self, count: usize) -> u64 {
        HEADER + count as u64 * (2 + self.image_len() as u64)
    }

    /// Each channel's statistics over every image, read a chunk at a time.
    pub fn normalization(&self) -> Result<Normalization, LoadError> {
        let mut hist = PixelHistogram::new(self.shape);
        self.each_chunk(|pixels| hist.add(pixels))?;
        Ok(hist.finish())
    }

    /// Calls `f` with the pixels in file order, a few MiB at a time.
    pub fn each_chunk(&self, mut f: impl FnMut(&[u8])) -> Result<(), LoadError> {
        let total = self.len() as u64 * self.image_len() as u64;
        let step = (CHUNK_BYTES / self.image_len()).max(1) * self.image_len();
        let mut buf = vec![0u8; step];
        let mut done = 0u64;
        while done < total {
            let n = step.min((total - done) as usize);
            self.read_at(&mut buf[..n], self.pixels_at(0) + done)?;
            f(&buf[..n]);
            done += n as u64;
        }
        Ok(())
    }
}

impl Images for PackedSet {
    fn count(&self) -> usize {
        self.len()
    }

    fn dims(&self) -> [usize; 3] {
        self.shape
    }

    fn label(&self, index: usize) -> u16 {
        self.labels[index]
    }

    fn pixels<'a>(&'a self, index: usize, scratch: &'a mut Vec<u8>) -> &'a [u8] {
        scratch.resize(self.image_len(), 0);
        if let Err(e) = self.read_at(scratch, self.pixels_at(index)) {
            // A worker cannot train on a shard it can no longer read.
            panic!("reading image {index}: {e}");
        }
        scratch
    }
}

/// The image shape in `path`'s header, without reading further.
pub fn shape_of(path: &Path) -> Option<[usize; 3]> {
    let mut header = [0u8; HEADER as usize];
    File::open(path).ok()?.read_exact(&mut header).ok()?;
    let field = |i: usize| {
        u32::from_le_bytes(header[4 + 4 * i..8 + 4 * i].try_into().expect("4 bytes")) as usize
    };
    (&header[..4] == IMAGES_MAGIC).then(|| [field(1), field(2), field(3)])
}

/// What [`pack_dir`] wrote.
#[derive(Debug)]
pub struct Packed {
    /// Training and test images written.
    pub images: (usize, usize),
    /// Class names written to `classes.txt` (none: no file).
    pub classes: usize,
}

/// Writes the data set in `dir` (IDX, CIFAR-10, an image folder resized to `shape`)
/// as a packed set in `out`: `train.tsi`, `test.tsi`, and `classes.txt` when the data
/// names its classes. An image folder is decoded a chunk at a time (it may be larger
/// than memory); the other formats are read whole first.
pub fn pack_dir(dir: &Path, shape: [usize; 3], out: &Path) -> Result<Packed, LoadError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LoadError::Io { path, source }
    };
    let (train, test) = (out.join(TRAIN_FILE), out.join(TEST_FILE));
    // Nothing is created in `out` before the data has read (or decoded) well.
    let classes = if crate::format(dir) == crate::Format::Folder {
        let decoding = out.join(".decoding");
        let folder = crate::pack_folder(dir, shape, &decoding).inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&decoding);
        })?;
        for (from, to) in [(&folder.train, &train), (&folder.test, &test)] {
            std::fs::rename(from, to).map_err(io(to))?;
        }
        let _ = std::fs::remove_dir_all(&decoding);
        folder.classes
    } else {
        let (_, data) = crate::load_for(Some(dir), Some(shape))?;
        std::fs::create_dir_all(out).map_err(io(out))?;
        write_packed(&train, &data.train)?;
        write_packed(&test, &data.test)?;
        data.classes
    };
    if !classes.is_empty() {
        let names = out.join("classes.txt");
        std::fs::write(&names, classes.join("\n") + "\n").map_err(io(&names))?;
    }
    let count = |path: &Path| PackedSet::open(path).map(|p| p.len());
    Ok(Packed {
        images: (count(&train)?, count(&test)?),
        classes: classes.len(),
    })
}

/// Writes `set` as a packed file at `path` (temp file, then rename).
pub fn write_packed(path: &Path, set: &ImageSet) -> Result<(), LoadError> {
    let tmp = path.with_extension("tmp");
    let io = |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    std::fs::write(&tmp, encode_images(set)).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(unix)]
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
fn read_exact_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_read(buf, offset)? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(n: usize) -> ImageSet {
        ImageSet {
            source: "t".into(),
            channels: 3,
            rows: 4,
            cols: 5,
            pixels: (0..n * 60).map(|i| (i * 7 % 251) as u8).collect(),
            labels: (0..n).map(|i| (i * 13 % 1000) as u16).collect(),
        }
    }

    #[test]
    fn a_packed_set_reads_back_by_offset_and_streams_shards_as_encoded() {
        let dir = std::env::temp_dir().join(format!("tether-packed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(TRAIN_FILE);
        let whole = set(150_001); // 9 MB: three streaming chunks
        write_packed(&path, &whole).unwrap();
        let packed = PackedSet::open(&path).unwrap();
        assert_eq!((packed.len(), packed.shape()), (whole.len(), [3, 4, 5]));
        assert_eq!(packed.labels(), &whole.labels[..]);
        let picks = [5, 0, 4_000, 17];
        assert_eq!(
            packed.read(&picks).unwrap().pixels,
            whole.subset(&picks).pixels
        );
        let shard: Vec<usize> = (0..whole.len()).step_by(3).collect();
        let mut out = Vec::new();
        let n = packed.write_subset(&shard, &mut out).unwrap();
        assert_eq!(out, encode_images(&whole.subset(&shard)));
        assert_eq!(n, packed.subset_len(shard.len()));
        assert_eq!(packed.normalization().unwrap(), Normalization::of(&whole));
        // Batches read from the file are the batches of the set in memory.
        let norm = Normalization::of(&whole);
        let batcher = tether_shared::data::Batcher::new(shard.clone(), 16, 3, &norm)
            .with_input([3, 3, 4])
            .with_flip(true);
        for epoch in 0..2 {
            let items = &batcher.epoch_order(epoch)[..16];
            assert_eq!(
                batcher.batch(&packed, items, epoch),
                batcher.batch(&whole, items, epoch)
            );
        }
        // A cut file is refused with its name, not read short.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        let err = PackedSet::open(&path).unwrap_err().to_string();
        assert!(
            err.contains("train.tsi") && err.contains("truncated"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
