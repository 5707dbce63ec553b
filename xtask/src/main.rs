//! `cargo xtask web [--check]`: builds the browser worker (`client-wasm`) for
//! wasm32 and runs wasm-bindgen on it, pinned to the exact wasm-bindgen version
//! the crate links, writing `web/pkg/` — which is committed, so a fresh clone's
//! `cargo run --release` serves a working page without a wasm toolchain.
//! `--check` rebuilds and fails if `web/pkg/` differs (CI runs it).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

/// The wasm-bindgen this tool links; the wasm must be built against the same.
const BINDGEN_VERSION: &str = "0.2.130";
const CRATE: &str = "tether-client-wasm";
const STEM: &str = "tether_client_wasm";
const TARGET: &str = "wasm32-unknown-unknown";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["web"] => web(false),
        ["web", "--check"] => web(true),
        _ => bail!("usage: cargo xtask web [--check]"),
    }
}

/// The workspace this command was run in: the nearest directory above the current
/// one that holds `xtask/Cargo.toml`. Found at run time, not from the compile-time
/// `CARGO_MANIFEST_DIR`: clones that share a target directory share this binary,
/// and it must work on the clone it is run in.
fn root() -> Result<PathBuf> {
    let cwd = std::env::current_dir().context("reading the current directory")?;
    cwd.ancestors()
        .find(|dir| dir.join("xtask").join("Cargo.toml").is_file())
        .map(Path::to_path_buf)
        .with_context(|| format!("{} is not inside a tether checkout", cwd.display()))
}

/// The two builds of the browser worker: plain SIMD128 for every browser with wasm
/// SIMD, and one with relaxed SIMD too (`f32x4.relaxed_madd`: the CPU's FMA), which
/// the page loads where `WebAssembly.validate` accepts a relaxed-SIMD module.
/// (File suffix, cargo features.) Only tether's own tile kernel is built with relaxed
/// SIMD (`target_feature` on that function): enabling it for the whole crate graph
/// breaks Burn's `macerator`, and the two builds then share every dependency.
const FLAVOURS: [(&str, &str); 2] = [("", ""), ("_relaxed", "relaxed-simd")];

fn web(check: bool) -> Result<()> {
    let root = root()?;
    check_bindgen_pin(&root)?;
    let mut files = Vec::new();
    for (suffix, features) in FLAVOURS {
        let (js, wasm) = bindgen(&root, features)?;
        // The wasm is committed and embedded gzipped: a seventh of the bytes in the
        // binary and on the wire (browsers take it as is; the server inflates it for
        // the rare client that does not accept gzip). Each build has its own glue:
        // wasm-bindgen names the functions it calls by their index in the module.
        let gz = gzip(&wasm)?;
        println!(
            "{STEM}{suffix}_bg.wasm: {} bytes, {} gzipped",
            wasm.len(),
            gz.len()
        );
        files.push((format!("{STEM}{suffix}.js"), js));
        files.push((format!("{STEM}{suffix}_bg.wasm.gz"), gz));
    }
    let out = root.join("web").join("pkg");
    let mut stale = Vec::new();
    for (name, fresh) in &files {
        let target = out.join(name);
        if std::fs::read(&target).ok().as_ref() != Some(fresh) {
            stale.push(name.clone());
            if !check {
                std::fs::create_dir_all(&out)?;
                std::fs::write(&target, fresh)
                    .with_context(|| format!("writing {}", target.display()))?;
            }
        }
    }
    match (check, stale.is_empty()) {
        (true, false) => bail!(
            "web/pkg is out of date ({}): run `cargo xtask web` and commit web/pkg \
             (any edit to shared/ or client-wasm/ changes the wasm, even one that only \
             moves lines: panic messages carry line numbers)",
            stale.join(", ")
        ),
        (true, true) => println!("web/pkg is up to date"),
        (false, _) => println!("web/pkg written ({} changed)", stale.len()),
    }
    Ok(())
}

/// Builds the worker with cargo `features` and runs wasm-bindgen on it: the glue and the
/// wasm, in memory.
fn bindgen(root: &Path, features: &str) -> Result<(Vec<u8>, Vec<u8>)> {
    let wasm = build_wasm(root, features)?;
    let staging = root.join("target").join("xtask-web");
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging)?;
    wasm_bindgen_cli_support::Bindgen::new()
        .input_path(&wasm)
        .web(true)?
        .typescript(false)
        .debug(false)
        .keep_debug(false)
        .remove_name_section(true)
        .remove_producers_section(true)
        .generate(&staging)
        .context("running wasm-bindgen")?;
    let js = std::fs::read(staging.join(format!("{STEM}.js"))).context("reading the glue")?;
    let wasm =
        std::fs::read(staging.join(format!("{STEM}_bg.wasm"))).context("reading the wasm")?;
    Ok((js, wasm))
}

/// The lock file must pin the same wasm-bindgen as this tool, or the generated
/// JavaScript would not match the wasm.
fn check_bindgen_pin(root: &Path) -> Result<()> {
    let lock = std::fs::read_to_string(root.join("Cargo.lock")).context("reading Cargo.lock")?;
    let pinned = lock
        .split("[[package]]")
        .find(|p| p.contains("name = \"wasm-bindgen\"\n"))
        .and_then(|p| p.lines().find_map(|l| l.strip_prefix("version = \"")))
        .map(|v| v.trim_end_matches('"').to_string());
    ensure!(
        pinned.as_deref() == Some(BINDGEN_VERSION),
        "Cargo.lock has wasm-bindgen {pinned:?}, xtask links {BINDGEN_VERSION}: keep them equal"
    );
    Ok(())
}

/// `cargo build` of the browser worker for wasm32 with cargo `features`,
/// reproducibly: SIMD on, no debug info, the cargo home remapped (workspace paths
/// are already relative), so two clones build the same bytes. It builds in
/// `<target dir>/web`, apart from native builds, so neither waits for the other's
/// lock or flags.
fn build_wasm(root: &Path, features: &str) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let cargo_home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo")
        });
    let rustflags = format!(
        "-C target-feature=+simd128 --remap-path-prefix={}=/cargo",
        cargo_home.display()
    );
    let target_dir = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"))
        .join("web");
    let status = Command::new(cargo)
        .current_dir(root)
        .args([
            "build",
            "--locked",
            "--release",
            "-p",
            CRATE,
            "--target",
            TARGET,
            "--features",
            features,
        ])
        .env("CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUSTFLAGS", rustflags)
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_TARGET_DIR", &target_dir)
        .status()
        .context("running cargo build for wasm32")?;
    ensure!(status.success(), "building {CRATE} for {TARGET} failed");
    Ok(target_dir
        .join(TARGET)
        .join("release")
        .join(format!("{STEM}.wasm")))
}

/// Gzip at the best level. Deterministic: the header has no name and mtime 0,
/// and flate2 is pinned by xtask's own lock file.
fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(bytes)?;
    Ok(gz.finish()?)
}
