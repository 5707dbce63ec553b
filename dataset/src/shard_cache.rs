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
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
