//! The norm guard never refuses an honest worker: not the first exchange of a fresh
//! run at a long τ (its bound starts from the server's own measure of honest
//! progress), and not after the operator lengthens τ mid-run.

use std::time::Duration;

use anyhow::{Result, ensure};
use tether_server::{RunSettings, ServerConfig};
use tether_shared::algorithms::Algorithm;
use tether_shared::protocol::Hyper;
use tether_tests::net::TestServer;
use tether_tests::scratch;
use tether_worker::client;
use tokio::sync::watch;

use crate::training::worker;

/// An EAMSGD run on the defaults (loss screen on, guard at 10×) but `tau` and `batch`.
async fn server(name: &str, tau: u32, batch: u32) -> Result<TestServer> {
    let mut run = RunSettings::defaults(Algorithm::Eamsgd);
    run.tau = tau;
    run.batch = batch;
    let mut cfg = ServerConfig::new(run);
    cfg.eval_every = None;
    cfg.checkpoint_every = None;
    cfg.run_dir = Some(scratch(name)?);
    TestServer::start(cfg).await
}

/// What the server refused, by reason (empty when nothing was).
fn refused(server: &TestServer) -> Vec<(&'static str, u64)> {
    server.state.metrics.rejects().into_iter().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_run_at_tau_64_and_256_accepts_an_honest_first_exchange() -> Result<()> {
    // τ 64 at the default batch, as `tether serve --tau 64` runs; τ 256 at batch 32
    // to keep the test short (the same number of images per exchange as τ 64).
    for (tau, batch) in [(64, 128), (256, 32)] {
        let server = server(&format!("guard-tau-{tau}"), tau, batch).await?;
        let (_stop_tx, stop) = watch::channel(false);
        let steps = 2 * u64::from(tau);
        let report = client::run(worker(&server, steps), stop).await?;
        ensure!(
            report.rejections == 0 && refused(&server).is_empty(),
            "τ {tau}: an honest worker was refused: {:?}, {report:?}",
            refused(&server)
        );
        ensure!(report.syncs == 2, "τ {tau}: {report:?}");
        ensure!(
            report.worker_ids.len() == 1,
            "τ {tau}: it restarted: {report:?}"
        );
        server.stop().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_lengthening_tau_mid_run_shuts_no_honest_worker_out() -> Result<()> {
    let server = server("guard-tau-change", 1, 32).await?;
    let (_stop_tx, stop) = watch::channel(false);
    let task = tokio::spawn(client::run(worker(&server, 12 + 256 * 3), stop));
    // Let the guard learn the worker's progress at τ 1 (8 figures)…
    let state = server.state.clone();
    tokio::time::timeout(Duration::from_secs(120), async {
        while !state.workers().status().iter().any(|w| w.syncs >= 10) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await?;
    // …then make every exchange 256 times as long.
    let before = state.center().hyper();
    state.set_hyper(Hyper { tau: 256, ..before });
    let report = task.await??;
    ensure!(
        report.rejections == 0 && refused(&server).is_empty(),
        "an honest worker was refused after τ 1 → 256: {:?}, {report:?}",
        refused(&server)
    );
    ensure!(report.worker_ids.len() == 1, "it restarted: {report:?}");
    server.stop().await?;
    Ok(())
}
