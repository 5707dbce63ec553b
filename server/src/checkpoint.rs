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
use std::sync::atomic::{AtomicU64, Ordering};

use safetensors::tensor::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tether_shared::algorithms::Algorithm;
use tether_shared::model::Model;
use thiserror::Error;

use crate::config::RunSettings;
use crate::state::{EvalPoint, HyperChange};
use crate::workers::unix_now;

/// The manifest's format version.
const FORMAT: u32 = 1;
/// The run's settings, next to its checkpoints.
const SETTINGS_FILE: &str = "run.json";
/// How every temp file of [`write_atomic`] ends.
const TMP_SUFFIX: &str = ".tmp";

/// What a checkpoint holds.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    /// The run it belongs to.
    pub run_id: String,
    /// The algorithm that produced it.
    pub algorithm: Algorithm,
    /// The network; fixes the length of `params`.
    pub model: Model,
    /// The center's version.
    pub version: u64,
    /// Training images workers had reported.
    pub samples: u64,
    /// The center x̃.
    pub params: Vec<f32>,
    /// Server-side momentum (empty when the algorithm has none).
    pub velocity: Vec<f32>,
    /// What the dashboard shows of the run so far.
    pub history: History,
}

/// The dashboard's record of a run, kept with each checkpoint so a resumed run
/// shows its whole past: the evaluation timeline and the event markers. Times are
/// run time: seconds served, counted across resumes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    /// Run time when the checkpoint was taken.
    pub run_time_s: f64,
    /// Every evaluation of the center, oldest first.
    pub evals: Vec<EvalPoint>,
    /// The operator's runtime changes of τ, α, η.
    pub changes: Vec<HyperChange>,
    /// Where the run was resumed.
    pub resumes: Vec<Resumed>,
}

/// A resume, for the dashboard's markers.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Resumed {
    /// Run time at the resume (the checkpoint's).
    pub time_s: f64,
    /// The center version resumed from.
    pub version: u64,
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
    pub model: Model,
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
    /// The dashboard's history up to this checkpoint (absent in older manifests).
    #[serde(default)]
    pub history: History,
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
/// The temp name is unique to this process and call, so two writers can never
/// interleave their bytes in one file (see [`clean`] for what a crash leaves).
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), CheckpointError> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.{}-{n}{TMP_SUFFIX}", std::process::id()));
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
    let bytes = encode(snap);
    let file = format!("{}.safetensors", stem(snap.version));
    write_atomic(dir, &file, &bytes)?;
    let manifest = Manifest {
        format: FORMAT,
        run_id: snap.run_id.clone(),
        algorithm: snap.algorithm,
        model: snap.model.clone(),
        version: snap.version,
        samples: snap.samples,
        file,
        bytes: bytes.len() as u64,
        sha256: hex(&Sha256::digest(&bytes)),
        written_unix: unix_now(),
        history: snap.history.clone(),
    };
    let name = format!("{}.json", stem(snap.version));
    let json = serde_json::to_vec_pretty(&manifest).expect("manifest serialises");
    write_atomic(dir, &name, &json)?;
    prune(dir, keep)?;
    Ok(dir.join(name))
}

/// The safetensors bytes of a snapshot: tensor `center` (and `velocity` when the
/// algorithm keeps server momentum), with run id, version and model as metadata.
///
/// Written here rather than by `safetensors::serialize`, whose metadata is a
/// `HashMap` serialised in its random iteration order: the same snapshot must give
/// the same bytes (and so the same SHA-256) every time.
pub fn encode(snap: &Snapshot) -> Vec<u8> {
    let mut tensors = vec![("center", &snap.params)];
    if !snap.velocity.is_empty() {
        tensors.push(("velocity", &snap.velocity));
    }
    // serde_json's Map is ordered by key: the header is a function of the snapshot.
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        serde_json::json!({
            "run_id": snap.run_id,
            "version": snap.version.to_string(),
            "model": snap.model.name(),
        }),
    );
    let mut offset = 0usize;
    for (name, values) in &tensors {
        let end = offset + values.len() * 4;
        header.insert(
            (*name).into(),
            serde_json::json!({"dtype": "F32", "shape": [values.len()], "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut json = serde_json::to_vec(&header).expect("a JSON map serialises");
    // The format pads the header with spaces so the data starts 8-byte aligned.
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let mut bytes = Vec::with_capacity(8 + json.len() + offset);
    bytes.extend_from_slice(&(json.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&json);
    for (_, values) in &tensors {
        bytes.extend_from_slice(&f32_bytes(values));
    }
    bytes
}

/// Removes what an interrupted writer leaves in `dir`: temp files, and tensor files
/// no manifest names (a crash between the tensor file and its manifest, or during a
/// prune). Run once when a server takes the directory, before any writer starts.
/// Returns the files removed.
pub fn clean(dir: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let mut removed = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(removed); // nothing there yet
    };
    let named: Vec<String> = manifests(dir)?
        .iter()
        .map(|(v, _)| format!("{}.safetensors", stem(*v)))
        .collect();
    for entry in entries {
        let path = entry.map_err(io(dir))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let temp = name.starts_with('.') && name.ends_with(TMP_SUFFIX);
        let orphan = name.starts_with("ckpt-")
            && name.ends_with(".safetensors")
            && !named.iter().any(|n| n == name);
        if temp || orphan {
            fs::remove_file(&path).map_err(io(&path))?;
            removed.push(path);
        }
    }
    Ok(removed)
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
pub fn verify(manifest_path: &Path) -> Result<(Snapshot, Manifest), String> {
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
    let snapshot = Snapshot {
        run_id: m.run_id.clone(),
        algorithm: m.algorithm,
        model: m.model.clone(),
        version: m.version,
        samples: m.samples,
        params,
        velocity,
        history: m.history.clone(),
    };
    Ok((snapshot, m))
}

/// What [`load_newest`] found.
#[derive(Debug)]
pub struct Newest {
    /// The newest checkpoint that verifies.
    pub snapshot: Snapshot,
    /// Its manifest.
    pub manifest: PathBuf,
    /// When it was written, Unix seconds.
    pub written_unix: f64,
    /// The newer checkpoints skipped, each with why.
    pub skipped: Vec<(PathBuf, String)>,
}

/// The newest checkpoint in `dir` that verifies, and the newer ones skipped (with why).
pub fn load_newest(dir: &Path) -> Result<Newest, CheckpointError> {
    let mut skipped = Vec::new();
    for (_, path) in manifests(dir)? {
        match verify(&path) {
            Ok((snapshot, m)) => {
                return Ok(Newest {
                    snapshot,
                    manifest: path,
                    written_unix: m.written_unix,
                    skipped,
                });
            }
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
        let n = Model::small().param_count();
        Snapshot {
            run_id: "r".into(),
            algorithm: Algorithm::Mdownpour,
            model: Model::small(),
            version,
            samples: version * 10,
            params: (0..n).map(|i| i as f32 * 1e-3 + version as f32).collect(),
            velocity: vec![0.5; n],
            history: History {
                run_time_s: version as f64,
                resumes: vec![Resumed {
                    time_s: 0.5,
                    version: 1,
                }],
                ..History::default()
            },
        }
    }

    #[test]
    fn round_trip_keeps_the_newest_k() {
        let dir = scratch("keep");
        for v in 1..=4 {
            write(&dir, &snap(v), 2).unwrap();
        }
        let newest = load_newest(&dir).unwrap();
        assert_eq!(newest.snapshot, snap(4));
        assert!(newest.skipped.is_empty());
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
        let Newest {
            snapshot: loaded,
            skipped,
            ..
        } = load_newest(&dir).unwrap();
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
    fn the_same_snapshot_always_gives_the_same_bytes() {
        let s = snap(3);
        let first = encode(&s);
        for _ in 0..20 {
            assert_eq!(encode(&s), first, "metadata order must not vary");
        }
        // And it is a safetensors file the library reads back, metadata included.
        let (_, meta) = SafeTensors::read_metadata(&first).unwrap();
        let m = meta.metadata().as_ref().unwrap();
        assert_eq!(m.get("version").map(String::as_str), Some("3"));
        assert_eq!(m.get("model").map(String::as_str), Some("small"));
        let st = SafeTensors::deserialize(&first).unwrap();
        assert_eq!(st.tensor("velocity").unwrap().shape(), [s.velocity.len()]);
    }

    #[test]
    fn clean_removes_temp_files_and_orphans_but_no_checkpoint() {
        let dir = scratch("clean");
        write(&dir, &snap(1), 5).unwrap();
        write(&dir, &snap(2), 5).unwrap();
        // What a writer killed mid-way leaves: a temp file, a tensor file whose
        // manifest was never written.
        fs::write(dir.join(".ckpt-000000000003.safetensors.77-0.tmp"), b"half").unwrap();
        fs::write(dir.join(format!("{}.safetensors", stem(3))), b"no manifest").unwrap();
        let removed = clean(&dir).unwrap();
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            4,
            "two checkpoints stay"
        );
        assert_eq!(load_newest(&dir).unwrap().snapshot, snap(2));
        assert!(clean(&dir.join("missing")).unwrap().is_empty());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn concurrent_writers_never_share_a_temp_file() {
        let dir = scratch("concurrent");
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| write(&dir, &snap(7), 5).unwrap());
            }
        });
        let newest = load_newest(&dir).unwrap();
        assert!(newest.skipped.is_empty(), "{:?}", newest.skipped);
        assert_eq!(newest.snapshot, snap(7));
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
