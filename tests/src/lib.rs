//! Helpers for tether's end-to-end tests: build and run the real `tether` binary.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};

/// The `tether` binary of this workspace, built (once per test run) in the same
/// profile and target directory as the running tests, so it is never stale.
pub fn tether_bin() -> Result<PathBuf> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn build() -> Result<PathBuf> {
    // The test executable lives in <target>/<profile>/deps/.
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(|d| d.parent())
        .context("test executable has no profile dir")?;
    let target_dir = profile_dir.parent().context("no target dir")?;
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .context("profile name")?;
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args([
        "build",
        "--quiet",
        "-p",
        "tether",
        "--bin",
        "tether",
        "--target-dir",
    ])
    .arg(target_dir)
    .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    match profile {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let status = cmd.status().context("running cargo build")?;
    if !status.success() {
        bail!("cargo build of the tether binary failed");
    }
    Ok(profile_dir.join(format!("tether{}", std::env::consts::EXE_SUFFIX)))
}

/// Runs `tether ARGS` and returns its output (whatever the exit status).
pub fn tether(args: &[&str]) -> Result<Output> {
    let bin = tether_bin()?;
    Command::new(&bin)
        .args(args)
        .output()
        .with_context(|| format!("running {}", bin.display()))
}

/// A fresh empty directory under the system temp dir for one test's files.
pub fn scratch(name: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("tether-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Runs `tether ARGS --report <scratch>/report.json`, fails with tether's stderr if
/// it exits non-zero, and returns the report.
pub fn tether_report(name: &str, args: &[&str]) -> Result<serde_json::Value> {
    let report = scratch(name)?.join("report.json");
    let mut all = args.to_vec();
    all.extend([
        "--report",
        report.to_str().context("temp path is not UTF-8")?,
    ]);
    let out = tether(&all)?;
    if !out.status.success() {
        bail!(
            "tether {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    read_json(&report)
}

/// Reads a JSON report.
pub fn read_json(path: &std::path::Path) -> Result<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}
