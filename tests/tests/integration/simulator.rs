//! The simulator against the ground truth: a real networked run (in-process server,
//! real workers over real sockets) and `tether_lab::simulate` on the same schedule
//! end with the same center. Same schedule means what the simulator models: f32
//! frames, no overlap, the loss screen and norm guard off, and an order of exchanges
//! fixed by the algorithm (one asynchronous worker, or synchronous rounds, which
//! the server sums in worker-id order).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tether_lab::simulate::{self, Experiment, Timing};
use tether_server::config::ServerConfig;
use tether_shared::algorithms::{Algorithm, distance};
use tether_shared::codec::Encoding;
use tether_shared::data::ImageSet;
use tether_tests::net::{TestServer, eventually, quick_config};
use tether_worker::backend::BackendChoice;
use tether_worker::client::{self, WorkConfig};
use tokio::sync::watch;

/// Exchanges each worker makes.
const EXCHANGES: u64 = 25;

/// Runs `cfg` for real with `p` workers of [`EXCHANGES`] exchanges each; the center
/// it ends with.
async fn real_run(cfg: ServerConfig, p: u32, train: &Arc<ImageSet>) -> Result<Vec<f32>> {
    let steps = EXCHANGES * u64::from(cfg.run.tau);
    let server = TestServer::start(cfg).await?;
    // Held until every worker has joined, so the first round has all of them.
    server.state.set_paused(true);
    let (_stop, stop) = watch::channel(false);
    let mut workers = Vec::new();
    for _ in 0..p {
        let mut w = WorkConfig::new(server.ws_url());
        w.backend = BackendChoice::Cpu;
        w.preloaded = Some(Arc::clone(train));
        w.encodings = vec![Encoding::F32];
        w.overlap = false;
        w.max_steps = Some(steps);
        w.progress = false;
        workers.push(tokio::spawn(client::run(w, stop.clone())));
    }
    let state = server.state.clone();
    let joined = eventually(Duration::from_secs(60), || {
        state.workers().len() == p as usize
    })
    .await;
    ensure!(joined, "the workers did not all join");
    server.state.set_paused(false);
    for w in workers {
        let report = w.await??;
        ensure!(
            report.syncs == EXCHANGES && report.rejections == 0,
            "{report:?}"
        );
    }
    let center = server.state.center().params().to_vec();
    server.stop().await?;
    Ok(center)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulator_and_a_real_run_on_the_same_schedule_end_with_the_same_center() -> Result<()>
{
    let (_, data) = tether_dataset::load(None).context("the shipped data")?;
    let train = Arc::new(data.train);
    let test = data.test.subset(&(0..500).collect::<Vec<_>>());
    for (algorithm, p) in [(Algorithm::Eamsgd, 1), (Algorithm::EasgdSync, 2)] {
        let mut cfg = quick_config("sim-vs-real", algorithm)?;
        cfg.run.expected_workers = p;
        cfg.encoding = Some(Encoding::F32);
        cfg.screen_batch = 0;
        cfg.max_update_ratio = 1e30;
        let settings = cfg.run.clone();
        let real = real_run(cfg, p, &train).await?;

        let experiment = Experiment {
            budget_samples: u64::from(p)
                * EXCHANGES
                * u64::from(settings.tau)
                * u64::from(settings.batch),
            settings,
            evaluations: 1,
            timing: Timing {
                step_s: 0.01,
                speeds: Vec::new(),
                exchange_s: 0.0,
            },
            norm_guard: None,
            sequential: false,
        };
        let sim = simulate::run(&experiment, &train, &test, |_| {})?;
        ensure!(sim.exchanges == u64::from(p) * EXCHANGES, "{sim:?}");
        let start = Experiment {
            budget_samples: 0,
            ..experiment.clone()
        };
        let start = simulate::run(&start, &train, &test, |_| {})?.center;
        let moved = distance(&sim.center, &start);
        let apart = distance(&sim.center, &real);
        eprintln!("{algorithm:?} p={p}: real − simulated {apart:e}, moved {moved:e}");
        // The same arithmetic in the same order: equal up to the rounding of the
        // kernels' thread splits, far below what training moved.
        ensure!(
            apart <= 1e-4 * moved,
            "{algorithm:?}: the real center is {apart:e} from the simulated one, \
             which moved {moved:e} from the start"
        );
    }
    Ok(())
}
