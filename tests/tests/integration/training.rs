//! Real training through a real server: the center learns under async EASGD, EAMSGD
//! and DOWNPOUR, and a worker that dies mid-run leaves the others training.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Result;
use tether_server::{RunSettings, ServerConfig};
use tether_shared::algorithms::Algorithm;
use tether_shared::data::ImageSet;
use tether_tests::net::TestServer;
use tether_tests::scratch;
use tether_worker::backend::BackendChoice;
use tether_worker::client::{self, WorkConfig};
use tokio::sync::watch;

pub(crate) fn train_set() -> Arc<ImageSet> {
    static SET: OnceLock<Arc<ImageSet>> = OnceLock::new();
    SET.get_or_init(|| Arc::new(tether_dataset::load(None).expect("shipped data").1.train))
        .clone()
}

/// A CPU worker of `server` that stops after `steps` steps, on the shipped data.
pub(crate) fn worker(server: &TestServer, steps: u64) -> WorkConfig {
    let mut w = WorkConfig::new(server.ws_url());
    w.backend = BackendChoice::Cpu;
    w.preloaded = Some(train_set());
    w.max_steps = Some(steps);
    w.progress = false;
    w.give_up_after = Duration::from_secs(10);
    w
}

/// Trains `workers` workers for `steps` steps each and returns the center's accuracy
/// on the first 2000 test images.
async fn center_accuracy(
    name: &str,
    algorithm: Algorithm,
    workers: u32,
    steps: u64,
) -> Result<f64> {
    let mut run = RunSettings::defaults(algorithm);
    run.expected_workers = workers;
    run.tau = 4;
    if algorithm == Algorithm::Easgd || algorithm == Algorithm::Eamsgd {
        run.alpha = 0.9 / workers as f32;
    }
    let mut cfg = ServerConfig::new(run);
    cfg.eval_every = None;
    cfg.eval_limit = Some(2000);
    cfg.checkpoint_every = None;
    cfg.run_dir = Some(scratch(name)?);
    let server = TestServer::start(cfg).await?;
    let (_stop_tx, stop) = watch::channel(false);
    let tasks: Vec<_> = (0..workers)
        .map(|_| tokio::spawn(client::run(worker(&server, steps), stop.clone())))
        .collect();
    for t in tasks {
        let report = t.await??;
        assert_eq!(report.steps, steps, "{report:?}");
        assert_eq!(report.syncs, steps.div_ceil(4), "{report:?}");
        assert_eq!(report.rejections, 0, "{report:?}");
    }
    let state = server.state.clone();
    let eval = tokio::task::spawn_blocking(move || state.evaluate_now()).await?;
    // Every sync moved the center once, unless the loss screen held it.
    let held = server
        .state
        .metrics
        .held
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(eval.version + held, u64::from(workers) * steps.div_ceil(4));
    server.stop().await?;
    eprintln!(
        "{algorithm:?}: {workers} workers × {steps} steps, τ 4 → center accuracy {:.4}",
        eval.accuracy
    );
    Ok(eval.accuracy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_easgd_center_learns() -> Result<()> {
    let acc = center_accuracy("conv-easgd", Algorithm::Easgd, 2, 40).await?;
    assert!(acc > 0.5, "EASGD center accuracy {acc} (chance: 0.1)");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eamsgd_center_learns() -> Result<()> {
    let acc = center_accuracy("conv-eamsgd", Algorithm::Eamsgd, 2, 40).await?;
    assert!(acc > 0.5, "EAMSGD center accuracy {acc} (chance: 0.1)");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downpour_center_learns() -> Result<()> {
    let acc = center_accuracy("conv-downpour", Algorithm::Downpour, 2, 40).await?;
    assert!(acc > 0.5, "DOWNPOUR center accuracy {acc} (chance: 0.1)");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_run_leaves_the_others_training() -> Result<()> {
    let mut run = RunSettings::defaults(Algorithm::Eamsgd);
    run.expected_workers = 3;
    run.tau = 2;
    let mut cfg = ServerConfig::new(run);
    cfg.eval_every = None;
    cfg.checkpoint_every = None;
    cfg.run_dir = Some(scratch("killed")?);
    let server = TestServer::start(cfg).await?;
    let (_stop_tx, stop) = watch::channel(false);
    let state = server.state.clone();
    let wait_until = |what: &'static str, done: Box<dyn Fn() -> bool + Send>| async move {
        tokio::time::timeout(Duration::from_secs(120), async {
            while !done() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .map_err(|_| anyhow::anyhow!("timed out waiting until {what}"))
    };
    let victim = tokio::spawn(client::run(worker(&server, 1000), stop.clone()));
    let s = state.clone();
    wait_until(
        "the victim synced",
        Box::new(move || s.workers().status().iter().any(|w| w.syncs >= 1)),
    )
    .await?;
    let survivors: Vec<_> = (0..2)
        .map(|_| tokio::spawn(client::run(worker(&server, 16), stop.clone())))
        .collect();
    let s = state.clone();
    wait_until("all three joined", Box::new(move || s.workers().len() == 3)).await?;
    victim.abort();
    let version_at_kill = state.center().version();
    for t in survivors {
        let report = t.await??;
        assert_eq!((report.steps, report.syncs), (16, 8), "{report:?}");
    }
    {
        let center = state.center();
        assert!(center.version() > version_at_kill, "training went on");
        assert!(center.params().iter().all(|v| v.is_finite()));
    }
    // The dead worker's connection is gone from the registry.
    let s = state.clone();
    wait_until(
        "the registry emptied",
        Box::new(move || s.workers().is_empty()),
    )
    .await?;
    server.stop().await?;
    Ok(())
}

/// A run stopped after its last checkpoint, with evaluations since but no new
/// update, keeps those evaluations: the shutdown checkpoint rewrites the current
/// version's manifest. Before, it found the version written and skipped, so a
/// resumed run lost them and its clock went back (the lifecycle test saw it as a
/// resume time earlier than the last status).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_checkpoint_keeps_the_evaluations_since_the_last_one() -> Result<()> {
    let config = tether_tests::net::quick_config("checkpoint-history", Algorithm::Easgd)?;
    let dir = config.run_dir.clone().expect("a run directory");
    let server = TestServer::start(config).await?;
    tether_server::write_checkpoint(&server.state, true).await?;
    let state = server.state.clone();
    let eval = tokio::task::spawn_blocking(move || state.evaluate_now()).await?;
    server.stop().await?;
    let newest = tether_server::checkpoint::load_newest(&dir)?;
    assert_eq!(newest.snapshot.version, 0);
    assert_eq!(
        newest.snapshot.history.evals.len(),
        1,
        "the evaluation was lost"
    );
    assert_eq!(newest.snapshot.history.evals[0].accuracy, eval.accuracy);
    assert!(newest.snapshot.history.run_time_s >= eval.time_s);
    Ok(())
}
