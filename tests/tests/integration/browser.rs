//! The dashboard in a real browser (Debian's Chromium, driven by playwright-core
//! from `tests/browser/`): press Join, and the tab trains as a browser worker —
//! once on WebGPU (Chromium's SwiftShader adapter, `--enable-unsafe-webgpu`) and
//! once on the CPU fallback (no adapter without the flag) — while a native worker
//! trains beside it and picks up a τ changed from the operator controls.
//!
//! Skipped when Node, playwright-core or Chromium are missing, unless
//! `TETHER_REQUIRE_BROWSER` is set (the README's test command installs them and
//! sets it, so in CI a missing browser is a failure).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tether_server::{RunSettings, ServerConfig};
use tether_shared::algorithms::Algorithm;
use tether_tests::net::TestServer;
use tether_tests::{read_json, scratch};
use tether_worker::backend::BackendChoice;
use tether_worker::client::{self, WorkConfig};
use tokio::sync::watch;

const ADMIN: &str = "browser-test-admin";
const BATCH: u32 = 16;

fn browser_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("browser")
}

/// Why the browser test cannot run here, if it cannot.
fn missing() -> Option<String> {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !std::path::Path::new(&chromium).exists() {
        return Some(format!("no Chromium at {chromium}"));
    }
    if !browser_dir().join("node_modules/playwright-core").exists() {
        return Some("playwright-core not installed (npm ci in tests/browser)".into());
    }
    if Command::new("node").arg("--version").output().is_err() {
        return Some("no node".into());
    }
    None
}

/// One browser at a time: two Chromiums training on two cores would starve each other.
static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn dashboard_run(backend: &str) -> Result<()> {
    let _one = ONE_BROWSER.lock().await;
    if let Some(why) = missing() {
        if std::env::var_os("TETHER_REQUIRE_BROWSER").is_some() {
            bail!("browser test required but cannot run: {why}");
        }
        eprintln!(
            "skipping the {backend} browser test: {why} (set TETHER_REQUIRE_BROWSER=1 to fail)"
        );
        return Ok(());
    }
    let mut run = RunSettings::defaults(Algorithm::Eamsgd);
    run.tau = 2;
    run.batch = BATCH;
    run.alpha = 0.3;
    let mut config = ServerConfig::new(run);
    config.eval_every = Some(Duration::from_secs(2));
    config.eval_limit = Some(500);
    config.checkpoint_every = None;
    config.admin_token = Some(ADMIN.into());
    config.run_dir = Some(scratch(&format!("browser-{backend}"))?);
    let server = TestServer::start(config).await?;

    // A native worker beside the browser: it must pick up the τ the page sets.
    let mut native = WorkConfig::new(server.ws_url());
    native.backend = BackendChoice::Cpu;
    native.progress = false;
    let (stop_tx, stop) = watch::channel(false);
    let native = tokio::spawn(client::run(native, stop));

    let out = scratch(&format!("browser-{backend}-out"))?;
    let base = format!("http://{}", server.addr);
    let script = browser_dir().join("dashboard.mjs");
    let args: Vec<String> = [
        "--base",
        &base,
        "--backend",
        backend,
        "--out",
        &out.display().to_string(),
        "--min-syncs",
        "5",
        "--timeout",
        "300",
        "--admin-token",
        ADMIN,
        "--tau",
        "3",
        "--batch",
        &BATCH.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let node =
        tokio::task::spawn_blocking(move || Command::new("node").arg(script).args(args).output())
            .await?
            .context("running node")?;
    let _ = stop_tx.send(true);
    let native = native.await?.context("the native worker")?;
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&node.stdout),
        String::from_utf8_lossy(&node.stderr)
    );
    eprintln!("{log}");
    let report = read_json(&out.join(format!("report-{backend}.json")))
        .with_context(|| format!("no report from the browser run:\n{log}"))?;
    if !node.status.success() || report["ok"] != true {
        bail!("browser run failed: {}\n{log}", report["failure"]);
    }
    assert!(out.join(format!("dashboard-{backend}.png")).exists());
    assert!(
        native.syncs >= 1,
        "the native worker never synced: {native:?}"
    );
    server.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_worker_trains_on_webgpu_from_the_dashboard() -> Result<()> {
    dashboard_run("webgpu").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_worker_trains_on_the_cpu_fallback_from_the_dashboard() -> Result<()> {
    dashboard_run("cpu").await
}
