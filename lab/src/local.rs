//! A whole run in one process: a real server on a loopback port and p real workers
//! over real sockets, each training its share of the epochs (`tether demo`, and the
//! benchmarks that measure a run end to end).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tether_server::{EvalPoint, ServerConfig, ServerError, Summary};
use tether_shared::protocol::StopReason;
use tether_worker::backend::BackendChoice;
use tether_worker::client::{self, WorkConfig, WorkError, WorkReport};
use thiserror::Error;
use tokio::sync::{oneshot, watch};

use crate::throttle::{self, Shape};

/// A run with a server and local workers in this process.
pub struct Local {
    /// The server's configuration (its run settings say what to train).
    pub config: ServerConfig,
    /// Workers to start.
    pub workers: u32,
    /// Passes over the training set, all workers together.
    pub epochs: f64,
    /// The workers' device.
    pub backend: BackendChoice,
    /// Port to try first (0: any).
    pub port: u16,
    /// Print the URL and draw the overall progress bar.
    pub chatty: bool,
    /// Workers keep training while a sync is in flight (where the algorithm allows).
    pub overlap: bool,
    /// Workers reach the server through an emulated link of this shape.
    pub link: Option<Shape>,
}

/// What a local run produced.
pub struct Outcome {
    /// The center on the full test set after the workers finished.
    pub final_eval: EvalPoint,
    /// The server's summary.
    pub summary: Summary,
    /// One report per worker.
    pub reports: Vec<WorkReport>,
    /// The background evaluations.
    pub history: Vec<EvalPoint>,
    /// Seconds from start to the final evaluation.
    pub wall_seconds: f64,
}

/// Why a local run failed.
#[derive(Debug, Error)]
pub enum LocalError {
    /// The server could not prepare or serve the run.
    #[error("the server: {0}")]
    Server(#[from] ServerError),
    /// No loopback port, or the emulated link could not start.
    #[error("the loopback network: {0}")]
    Io(#[from] std::io::Error),
    /// The data set could not be read.
    #[error(transparent)]
    Data(#[from] tether_dataset::LoadError),
    /// A worker ended with an error.
    #[error("worker {index}: {source}")]
    Worker {
        /// Which worker (0-based).
        index: usize,
        /// What it said.
        source: WorkError,
    },
    /// A task of the run panicked.
    #[error("a task of the run failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Runs a server and `local.workers` workers until each has trained its share of
/// `local.epochs`, or until `stop` turns true (workers then finish their steps,
/// sync once more and leave); then scores the center on the whole test set.
pub async fn run_local(local: Local, stop: watch::Receiver<bool>) -> Result<Outcome, LocalError> {
    let started = Instant::now();
    let settings = local.config.run.clone();
    let data_dir = local.config.data.clone();
    let server = tether_server::Server::new(local.config)?;
    let listener = match tokio::net::TcpListener::bind(("127.0.0.1", local.port)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("port {} is taken ({e}); using a free one", local.port);
            tokio::net::TcpListener::bind("127.0.0.1:0").await?
        }
    };
    let addr = listener.local_addr()?;
    let state = server.state().clone();
    if local.chatty {
        println!(
            "tether demo: {}, {} workers, τ {}, α {}, η {}, {} model, {} epochs",
            settings.algorithm.name(),
            local.workers,
            settings.tau,
            settings.alpha,
            settings.lr,
            settings.model.name(),
            local.epochs
        );
        println!("  dashboard: http://{addr}/   (press Join there to lend the tab)");
        if let Some(token) = &state.config.admin_token {
            println!("  operator token for the dashboard's controls: {token}");
        }
        println!("  join from elsewhere: tether work --server ws://{addr}");
    }
    let (finish_tx, finish_rx) = oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(listener, async move {
        let _ = finish_rx.await;
        StopReason::Finished
    }));

    let worker_addr = match local.link {
        Some(shape) => throttle::proxy(addr, shape).await?.0,
        None => addr,
    };
    let shape = Some(settings.model.data_shape());
    let (_, data) = tether_dataset::load_for(data_dir.as_deref(), shape)?;
    let train = Arc::new(data.train);
    let per_worker = (local.epochs * train.len() as f64 / f64::from(local.workers)).ceil();
    let steps = (per_worker / f64::from(settings.batch)).ceil().max(1.0) as u64;
    let mut workers = Vec::new();
    for _ in 0..local.workers {
        let mut w = WorkConfig::new(format!("ws://{worker_addr}/ws"));
        w.backend = local.backend;
        w.overlap = local.overlap;
        w.preloaded = Some(train.clone());
        w.max_steps = Some(steps);
        w.progress = false;
        w.give_up_after = Duration::from_secs(30);
        workers.push(tokio::spawn(client::run(w, stop.clone())));
    }

    let bar = if local.chatty {
        tether_worker::progress::bar(per_worker as u64 * u64::from(local.workers), "demo")
    } else {
        indicatif::ProgressBar::hidden()
    };
    let watcher = {
        let state = state.clone();
        let bar = bar.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                bar.set_position(state.metrics.samples.load(Ordering::Relaxed));
                let acc = state
                    .latest_eval()
                    .map_or("-".into(), |e| format!("{:.2} %", e.accuracy * 100.0));
                let n = state.workers().len();
                bar.set_message(format!(
                    "center {acc} · v{} · {n} workers",
                    state.center().version()
                ));
            }
        })
    };
    let mut reports = Vec::new();
    for (index, w) in workers.into_iter().enumerate() {
        reports.push(
            w.await?
                .map_err(|source| LocalError::Worker { index, source })?,
        );
    }
    watcher.abort();
    bar.finish_and_clear();
    if local.chatty {
        eprintln!("workers done; evaluating the center on the full test set");
    }
    // The final figure is on the whole test set whatever --eval-limit says.
    let test = data.test;
    let eval_state = state.clone();
    let final_eval = tokio::task::spawn_blocking(move || eval_state.evaluate_on(&test)).await?;
    let _ = finish_tx.send(());
    let summary = serving.await??;
    Ok(Outcome {
        final_eval,
        summary,
        reports,
        history: state.evals.lock().map(|h| h.clone()).unwrap_or_default(),
        wall_seconds: started.elapsed().as_secs_f64(),
    })
}
