//! The cache a native worker keeps downloaded shards in, so a reconnect or a
//! restart does not download again: files named by data set and cut, checked
//! against the length and SHA-256 the server announces before they are used,
//! written temp → fsync → rename.

use std::io::Write;
use std::path::PathBuf;

use sha2::{Digest, Sha256};

use crate::LoadError;

/// Which shard of which data set, as a file name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ShardKey {
    /// The server's id of its training data.
    pub data: String,
    /// Shards the set is cut into.
    pub count: u32,
    /// This shard.
    pub index: u32,
    /// The permutation's seed.
    pub seed: u64,
}

impl ShardKey {
    fn file_name(&self) -> String {
        // The id comes from the server: keep only what is safe in a file name.
        let data: String = self
            .data
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .take(64)
            .collect();
        format!(
            "{data}-{}of{}-{:016x}.tsim",
            self.index, self.count, self.seed
        )
    }
}

/// What the cache had for a shard.
#[derive(Debug, PartialEq, Eq)]
pub enum Cached {
    /// The file is there and matches the announced length and SHA-256.
    Hit(Vec<u8>),
    /// The same, checked a chunk at a time and left on disk ([`ShardCache::load_file`]).
    OnDisk(PathBuf),
    /// No file.
    Miss,
    /// A file that did not match (damaged, or another download's): removed.
    Corrupt,
}

/// Downloaded shards on disk, checked against the length and SHA-256 the server
/// announces before they are used.
#[derive(Clone, Debug)]
pub struct ShardCache {
    dir: PathBuf,
}

impl ShardCache {
    /// A cache in `dir/shards` (created when the first shard is stored).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into().join("shards"),
        }
    }

    /// The file a shard is kept in.
    pub fn path(&self, key: &ShardKey) -> PathBuf {
        self.dir.join(key.file_name())
    }

    /// The cached shard if it is there and is `len` bytes with digest `sha256`; a
    /// file that is not is removed.
    pub fn load(&self, key: &ShardKey, len: u64, sha256: &[u8; 32]) -> Cached {
        let path = self.path(key);
        let Ok(bytes) = std::fs::read(&path) else {
            return Cached::Miss;
        };
        if verify(&bytes, len, sha256) {
            Cached::Hit(bytes)
        } else {
            let _ = std::fs::remove_file(&path);
            Cached::Corrupt
        }
    }

    /// [`ShardCache::load`] for a shard kept on disk: the file is read a chunk at a
    /// time to check it, and named rather than returned.
    pub fn load_file(&self, key: &ShardKey, len: u64, sha256: &[u8; 32]) -> Cached {
        let path = self.path(key);
        let Ok(mut file) = std::fs::File::open(&path) else {
            return Cached::Miss;
        };
        let mut hasher = Sha256::new();
        match std::io::copy(&mut file, &mut hasher) {
            Ok(n) if n == len && hasher.finalize().as_slice() == sha256 => Cached::OnDisk(path),
            _ => {
                let _ = std::fs::remove_file(&path);
                Cached::Corrupt
            }
        }
    }

    /// A writer that streams a download into the cache: checked against `len` and
    /// `sha256` on [`ShardWriter::finish`], then renamed into place.
    pub fn writer(&self, key: &ShardKey) -> Result<ShardWriter, LoadError> {
        let path = self.path(key);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let io = |source| LoadError::Io {
            path: tmp.clone(),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(io)?;
        let file = std::fs::File::create(&tmp).map_err(io)?;
        Ok(ShardWriter {
            file: std::io::BufWriter::new(file),
            hasher: Sha256::new(),
            len: 0,
            tmp,
            path,
        })
    }

    /// Stores a verified shard: written to a temporary file, synced, then renamed,
    /// so a crash never leaves a half-written shard under the real name.
    pub fn store(&self, key: &ShardKey, bytes: &[u8]) -> Result<PathBuf, LoadError> {
        let path = self.path(key);
        let io = |source| LoadError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(io)?;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let written = std::fs::File::create(&tmp)
            .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(e));
        }
        Ok(path)
    }
}

/// Whether `bytes` are `len` long with SHA-256 `sha256`.
pub fn verify(bytes: &[u8], len: u64, sha256: &[u8; 32]) -> bool {
    bytes.len() as u64 == len && Sha256::digest(bytes).as_slice() == sha256
}

/// A shard being downloaded into the cache ([`ShardCache::writer`]).
pub struct ShardWriter {
    file: std::io::BufWriter<std::fs::File>,
    hasher: Sha256,
    len: u64,
    tmp: PathBuf,
    path: PathBuf,
}

impl ShardWriter {
    /// Appends the next bytes of the download.
    pub fn write(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        self.hasher.update(chunk);
        self.len += chunk.len() as u64;
        self.file.write_all(chunk)
    }

    /// Checks the whole against `len` and `sha256`, syncs and renames it into
    /// place; a download that does not match is removed and refused.
    pub fn finish(self, len: u64, sha256: &[u8; 32]) -> Result<PathBuf, String> {
        let Self {
            file,
            hasher,
            len: got,
            tmp,
            path,
        } = self;
        let matches = got == len && hasher.finalize().as_slice() == sha256;
        let written = file
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_all())
            .and_then(|()| {
                if matches {
                    std::fs::rename(&tmp, &path)
                } else {
                    Ok(())
                }
            });
        if !matches || written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        match (matches, written) {
            (false, _) => Err(format!(
                "the downloaded shard ({got} bytes) does not match its announced length ({len}) and SHA-256"
            )),
            (true, Err(e)) => Err(format!("{}: {e}", path.display())),
            (true, Ok(())) => Ok(path),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shard_cache_keeps_verified_files_and_drops_damaged_ones() {
        let dir = std::env::temp_dir().join(format!("tether-cache-{}", std::process::id()));
        let cache = ShardCache::new(&dir);
        let key = ShardKey {
            data: "abc/../../x".into(),
            count: 4,
            index: 1,
            seed: 7,
        };
        assert!(
            cache.path(&key).starts_with(dir.join("shards")),
            "no path escapes"
        );
        let bytes = b"TSIM shard bytes".to_vec();
        let sha: [u8; 32] = Sha256::digest(&bytes).into();
        assert_eq!(cache.load(&key, bytes.len() as u64, &sha), Cached::Miss);
        cache.store(&key, &bytes).unwrap();
        assert_eq!(
            cache.load(&key, bytes.len() as u64, &sha),
            Cached::Hit(bytes.clone())
        );
        // One flipped byte: detected, removed, then a miss.
        let mut damaged = bytes.clone();
        damaged[3] ^= 1;
        std::fs::write(cache.path(&key), &damaged).unwrap();
        assert_eq!(cache.load(&key, bytes.len() as u64, &sha), Cached::Corrupt);
        assert_eq!(cache.load(&key, bytes.len() as u64, &sha), Cached::Miss);
        // Streamed in: checked, kept on disk, found by name; a wrong one refused.
        let mut w = cache.writer(&key).unwrap();
        w.write(&bytes[..5]).unwrap();
        w.write(&bytes[5..]).unwrap();
        let path = w.finish(bytes.len() as u64, &sha).unwrap();
        assert_eq!(
            cache.load_file(&key, bytes.len() as u64, &sha),
            Cached::OnDisk(path)
        );
        let mut w = cache.writer(&key).unwrap();
        w.write(&damaged).unwrap();
        assert!(w.finish(bytes.len() as u64, &sha).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
