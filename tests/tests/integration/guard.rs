//! The norm guard never refuses an honest worker: not the first exchange of a fresh
//! run at a long τ (its bound starts from the server's own measure of honest
//! progress, and an exchange that arrives before the measure waits for it), and not
//! after the operator lengthens τ mid-run.

use std::time::Duration;

use anyhow::{Result, ensure};
use tether_server::calibrate::honest_progress;
use tether_server::{RunSettings, ServerConfig};
use tether_shared::algorithms::Algorithm;
use tether_shared::data::Normalization;
use tether_shared::protocol::{Frame, Hyper, Message};
use tether_tests::net::{RawClient, TestServer, hello, sync};
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

/// Waits for the next protocol frame, however long the server takes (`recv` gives
/// up after 10 s; the socket stays usable).
async fn next_frame(client: &mut RawClient) -> Result<Frame> {
    for _ in 0..12 {
        match client.recv().await {
            Err(e) if e.to_string().contains("no frame within") => continue,
            other => return other,
        }
    }
    anyhow::bail!("no frame within two minutes")
}

/// A first exchange that arrives while the server still measures honest progress,
/// and that the guess alone would refuse, waits for the measure and is judged by it:
/// a GPU worker's first τ steps can outrun the server's CPU measuring them. A jump
/// far beyond the measure is refused all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchange_arriving_before_the_measure_waits_for_it() -> Result<()> {
    let (tau, batch) = (256, 32);
    // The server's own figure, computed first as it will: the same function, center
    // (the run's seeded one) and settings.
    let mut run = RunSettings::defaults(Algorithm::Eamsgd);
    (run.tau, run.batch) = (tau, batch);
    let train = crate::training::train_set();
    let spec = run.spec("t".into(), Normalization::of(&train), train.len() as u64);
    let center = run.model.seeded_params(run.seed);
    let x0 = center.clone();
    let measure = tokio::task::spawn_blocking(move || honest_progress(&spec, train, x0)).await??;
    let norm = center
        .iter()
        .map(|v| f64::from(*v).powi(2))
        .sum::<f64>()
        .sqrt();
    // Precondition: the guess alone (10 × ‖x̃‖/20) would refuse a move of the measure.
    ensure!(measure > 0.5 * norm, "measure {measure} vs ‖x̃‖ {norm}");
    let moved = |by: f64| -> Vec<f32> {
        let step = (by / (center.len() as f64).sqrt()) as f32;
        center.iter().map(|c| c + step).collect()
    };

    let server = server("guard-wait", tau, batch).await?;
    let url = server.ws_url();
    let (mut honest, welcome, served) = RawClient::join(&url, hello()).await?;
    ensure!(served == center, "the run's center is its seeded one");
    ensure!(
        server.state.calibration.running(),
        "the measure already ended"
    );
    honest
        .send(&sync(welcome.session, 1, 0), &moved(measure))
        .await?;
    let reply = next_frame(&mut honest).await?;
    ensure!(
        matches!(reply.message, Message::Reply(_)),
        "a move of one honest measure was refused: {:?}",
        reply.message
    );
    let (mut far, welcome, _) = RawClient::join(&url, hello()).await?;
    far.send(&sync(welcome.session, 1, 0), &moved(20.0 * measure))
        .await?;
    match next_frame(&mut far).await?.message {
        Message::Reject { reason, .. } => ensure!(reason.code() == "out_of_line", "{reason}"),
        other => anyhow::bail!("a move of 20 measures was not refused: {other:?}"),
    }
    server.stop().await?;
    Ok(())
}
