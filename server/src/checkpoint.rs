//! Crash-safe checkpoints of the center: a safetensors file (the center, and the
//! server momentum where the algorithm has one) plus a small JSON manifest with its
//! SHA-256, written temp-file → fsync → rename → fsync(dir), newest K kept.
//!
//! The manifest is written after the tensor file, so a manifest on disk always names
//! a complete file; resuming walks manifests newest first and takes the first whose
//! file verifies, reporting every one it skipped and why.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tether_shared::algorithms::Algorithm;
use tether_shared::model::ModelKind;
use thiserror::Error;

use crate::config::RunSettings;
use crate::workers::unix_now;

/// The manifest's format version.
const FORMAT: u32 = 1;
/// The run's settings, next to its checkpoints.
const SETTINGS_FILE: &str = "run.json";

/// What a checkpoint holds.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// The run it belongs to.
    pub run_id: String,
    /// The algorithm that produced it.
    pub algorithm: Algorithm,
    /// The network; fixes the length of `params`.
    pub model: ModelKind,
    /// The center's version.
    pub version: u64,
    /// Training images workers had reported.
    pub samples: u64,
    /// The center x̃.
    pub params: Vec<f32>,
    /// Server-side momentum (empty when the algorithm has none).
    pub velocity: Vec<f32>,
}

/// The JSON next to each tensor file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format.
    pub format: u32,
    /// The run.
    pub run_id: String,
    /// The algorithm.
    pub algorithm: Algorithm,
    /// The network.
    pub model: ModelKind,
    /// The center's version.
    pub version: u64,
    /// Training images reported.
    pub samples: u64,
    /// The tensor file's name, in the same directory.
    pub file: String,
    /// Its size.
    pub bytes: u64,
    /// Its SHA-256, hex.
    pub sha256: String,
    /// When it was written, Unix seconds.
    pub written_unix: f64,
}

/// A checkpoint could not be written or none could be loaded.
#[derive(Debug, Error)]
pub enum CheckpointError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The directory holds no checkpoint that verifies.
    #[error("no valid checkpoint in {dir}{}", skipped_list(.skipped))]
    NoneValid {
        /// The run directory.
        dir: PathBuf,
        /// Every checkpoint skipped, with the reason.
        skipped: Vec<(PathBuf, String)>,
    },
    /// The run's settings file is missing or unreadable.
    #[error("{path}: {message}")]
    Settings {
        /// The settings file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

fn skipped_list(skipped: &[(PathBuf, String)]) -> String {
    skipped
        .iter()
        .map(|(p, why)| format!("\n  skipped {}: {why}", p.display()))
        .collect()
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `dir/name` crash-safely: a temp file is written and fsynced,
/// renamed over the target, and the directory fsynced so the rename is durable.
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), CheckpointError> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(name);
    let mut file = File::create(&tmp).map_err(io(&tmp))?;
    file.write_all(bytes).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    drop(file);
    fs::rename(&tmp, &path).map_err(io(&path))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn stem(version: u64) -> String {
    format!("ckpt-{version:012}")
}

/// Writes `snap` into `dir` and keeps only the newest `keep` checkpoints.
/// Returns the manifest's path.
pub fn write(dir: &Path, snap: &Snapshot, keep: usize) -> Result<PathBuf, CheckpointError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let bytes = encode(snap).map_err(|e| CheckpointError::Io {
        path: dir.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let file = format!("{}.safetensors", stem(snap.version));
    write_atomic(dir, &file, &bytes)?;
    let manifest = Manifest {
        format: FORMAT,
        run_id: snap.run_id.clone(),
        algorithm: snap.algorithm,
        model: snap.model,
        version: snap.version,
        samples: snap.samples,
        file,
        bytes: bytes.len() as u64,
        sha256: hex(&Sha256::digest(&bytes)),
        written_unix: unix_now(),
    };
    let name = format!("{}.json", stem(snap.version));
    let json = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
    write_atomic(dir, &name, &json)?;
    prune(dir, keep)?;
    Ok(dir.join(name))
}

/// The safetensors bytes of a snapshot: tensor `center` (and `velocity` when the
/// algorithm keeps server momentum), with run id, version and model as metadata.
pub fn encode(snap: &Snapshot) -> Result<Vec<u8>, safetensors::SafeTensorError> {
    let center = f32_bytes(&snap.params);
    let velocity = f32_bytes(&snap.velocity);
    let mut tensors = vec![(
        "center",
        TensorView::new(Dtype::F32, vec![snap.params.len()], &center).expect("sized to match"),
    )];
    if !snap.velocity.is_empty() {
        tensors.push((
            "velocity",
            TensorView::new(Dtype::F32, vec![snap.velocity.len()], &velocity)
                .expect("sized to match"),
        ));
    }
    let metadata = [
        ("run_id".to_string(), snap.run_id.clone()),
        ("version".to_string(), snap.version.to_string()),
        ("model".to_string(), snap.model.name().to_string()),
    ]
    .into_iter()
    .collect();
    safetensors::serialize(tensors, Some(metadata))
}

/// Manifests in `dir`, newest version first.
fn manifests(dir: &Path) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if let Some(v) = name
            .strip_prefix("ckpt-")
            .and_then(|r| r.strip_suffix(".json"))
            .and_then(|v| v.parse::<u64>().ok())
        {
            found.push((v, path));
        }
    }
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    Ok(found)
}

fn prune(dir: &Path, keep: usize) -> Result<(), CheckpointError> {
    for (version, manifest) in manifests(dir)?.into_iter().skip(keep) {
        let tensors = dir.join(format!("{}.safetensors", stem(version)));
        // The manifest goes first: a half-pruned pair is then an orphan file, never
        // a manifest pointing at nothing.
        fs::remove_file(&manifest).map_err(io(&manifest))?;
        if tensors.exists() {
            fs::remove_file(&tensors).map_err(io(&tensors))?;
        }
    }
    Ok(())
}

/// Reads and verifies one checkpoint from its manifest.
pub fn verify(manifest_path: &Path) -> Result<Snapshot, String> {
    let text = fs::read(manifest_path).map_err(|e| format!("unreadable manifest: {e}"))?;
    let m: Manifest = serde_json::from_slice(&text).map_err(|e| format!("bad manifest: {e}"))?;
    if m.format != FORMAT {
        return Err(format!("manifest format {} (expected {FORMAT})", m.format));
    }
    let dir = manifest_path.parent().unwrap_or(Path::new("."));
    if m.file.contains('/') || m.file.contains('\\') {
        return Err(format!(
            "manifest names a file outside its directory: {}",
            m.file
        ));
    }
    let bytes = fs::read(dir.join(&m.file)).map_err(|e| format!("{}: {e}", m.file))?;
    if bytes.len() as u64 != m.bytes {
        return Err(format!(
            "{} is {} bytes, manifest says {}",
            m.file,
            bytes.len(),
            m.bytes
        ));
    }
    let sha = hex(&Sha256::digest(&bytes));
    if sha != m.sha256 {
        return Err(format!("{}: checksum mismatch (corrupt)", m.file));
    }
    let st = SafeTensors::deserialize(&bytes).map_err(|e| format!("{}: {e}", m.file))?;
    let read = |name: &str| -> Result<Vec<f32>, String> {
        let t = st
            .tensor(name)
            .map_err(|e| format!("{}: {name}: {e}", m.file))?;
        if t.dtype() != Dtype::F32 {
            return Err(format!("{}: {name} is {:?}, not F32", m.file, t.dtype()));
        }
        Ok(t.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    };
    let params = read("center")?;
    if params.len() != m.model.param_count() {
        return Err(format!(
            "center has {} values, the {} model has {}",
            params.len(),
            m.model.name(),
            m.model.param_count()
        ));
    }
    let velocity = if st.names().contains(&"velocity") {
        read("velocity")?
    } else {
        Vec::new()
    };
    Ok(Snapshot {
        run_id: m.run_id,
        algorithm: m.algorithm,
        model: m.model,
        version: m.version,
        samples: m.samples,
        params,
        velocity,
    })
}

/// The newest checkpoint in `dir` that verifies, and the newer ones skipped (with why).
pub fn load_newest(dir: &Path) -> Result<(Snapshot, Vec<(PathBuf, String)>), CheckpointError> {
    let mut skipped = Vec::new();
    for (_, path) in manifests(dir)? {
        match verify(&path) {
            Ok(snap) => return Ok((snap, skipped)),
            Err(why) => skipped.push((path, why)),
        }
    }
    Err(CheckpointError::NoneValid {
        dir: dir.to_path_buf(),
        skipped,
    })
}

/// Saves the run's settings as `run.json` in `dir` (crash-safely).
pub fn save_settings(dir: &Path, settings: &RunSettings) -> Result<(), CheckpointError> {
    fs::create_dir_all(dir).map_err(io(dir))?;
    let json = serde_json::to_vec_pretty(settings).expect("settings serialise");
    write_atomic(dir, SETTINGS_FILE, &json)
}

/// Reads the run's settings from `dir/run.json`.
pub fn load_settings(dir: &Path) -> Result<RunSettings, CheckpointError> {
    let path = dir.join(SETTINGS_FILE);
    let bytes = fs::read(&path).map_err(|e| CheckpointError::Settings {
        path: path.clone(),
        message: format!("cannot read the run's settings: {e}"),
    })?;
    serde_json::from_slice(&bytes).map_err(|e| CheckpointError::Settings {
        path,
        message: format!("bad run settings: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tether-ckpt-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn snap(version: u64) -> Snapshot {
        let n = ModelKind::Small.param_count();
        Snapshot {
            run_id: "r".into(),
            algorithm: Algorithm::Mdownpour,
            model: ModelKind::Small,
            version,
            samples: version * 10,
            params: (0..n).map(|i| i as f32 * 1e-3 + version as f32).collect(),
            velocity: vec![0.5; n],
        }
    }

    #[test]
    fn round_trip_keeps_the_newest_k() {
        let dir = scratch("keep");
        for v in 1..=4 {
            write(&dir, &snap(v), 2).unwrap();
        }
        let (loaded, skipped) = load_newest(&dir).unwrap();
        assert_eq!(loaded, snap(4));
        assert!(skipped.is_empty());
        let versions: Vec<u64> = manifests(&dir).unwrap().iter().map(|m| m.0).collect();
        assert_eq!(versions, [4, 3]);
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            4,
            "2 manifests + 2 tensor files"
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_corrupt_newest_checkpoint_is_skipped_with_a_reason() {
        let dir = scratch("corrupt");
        write(&dir, &snap(1), 5).unwrap();
        write(&dir, &snap(2), 5).unwrap();
        let file = dir.join(format!("{}.safetensors", stem(2)));
        let mut bytes = fs::read(&file).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&file, bytes).unwrap();
        let (loaded, skipped) = load_newest(&dir).unwrap();
        assert_eq!(loaded.version, 1);
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].1.contains("checksum"), "{skipped:?}");
        // Nothing valid at all: a typed error listing what was skipped.
        fs::remove_file(dir.join(format!("{}.safetensors", stem(1)))).unwrap();
        let err = load_newest(&dir).unwrap_err().to_string();
        assert!(
            err.contains("no valid checkpoint") && err.contains("checksum"),
            "{err}"
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn settings_round_trip() {
        let dir = scratch("settings");
        let s = RunSettings::defaults(Algorithm::Eamsgd);
        save_settings(&dir, &s).unwrap();
        assert_eq!(load_settings(&dir).unwrap(), s);
        assert!(load_settings(&dir.join("missing")).is_err());
        fs::remove_dir_all(dir).unwrap();
    }
}
