//! `tether demo` (what `cargo run --release` does): a server and N workers in one
//! process on the shipped data, an overall progress bar, and a summary table.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;
use tether_server::{EvalPoint, ServerConfig, Summary};
use tether_shared::protocol::StopReason;
use tether_worker::backend::BackendChoice;
use tether_worker::client::{self, WorkConfig, WorkReport};
use tokio::sync::{oneshot, watch};

use crate::net::{RunFlags, interrupted, runtime};
use crate::{BackendArg, write_report};
use tether_lab::throttle::{self, Shape};

#[derive(Args, Debug)]
pub struct DemoArgs {
    #[command(flatten)]
    pub run: RunFlags,
    /// Local workers to start.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub workers: u32,
    /// Passes over the training set, all workers together.
    #[arg(long, default_value_t = 2.0)]
    pub epochs: f64,
    /// Compute device of the workers.
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: BackendArg,
    /// Port for the dashboard (taken if free, else any free port).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Seconds between evaluations of the center.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub eval_every: u64,
    /// Background evaluations use the first N test images, so they cost the workers
    /// little; the final figure always uses the whole test set.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u32).range(1..))]
    pub eval_limit: u32,
    /// IDX data directory [default: the shipped Fashion-MNIST].
    #[arg(long)]
    pub data: Option<std::path::PathBuf>,
    /// Run directory for checkpoints [default: ./runs/<run-id>].
    #[arg(long)]
    pub run_dir: Option<std::path::PathBuf>,
    /// Write the results here as JSON (test_accuracy, bytes, per-worker figures).
    #[arg(long)]
    pub report: Option<std::path::PathBuf>,
    /// Token for the dashboard's operator controls [default: a fresh random one,
    /// printed at start].
    #[arg(long, env = "TETHER_ADMIN_TOKEN")]
    pub admin_token: Option<String>,
}

impl Default for DemoArgs {
    fn default() -> Self {
        Self {
            run: RunFlags::default(),
            workers: 4,
            epochs: 2.0,
            backend: BackendArg::Auto,
            port: 8080,
            eval_every: 10,
            eval_limit: 2000,
            data: None,
            run_dir: None,
            report: None,
            admin_token: None,
        }
    }
}

/// What `tether demo --report` writes.
#[derive(Serialize)]
struct DemoReport {
    command: &'static str,
    settings: tether_server::RunSettings,
    workers: usize,
    epochs: f64,
    test_accuracy: f64,
    test_loss: f64,
    history: Vec<EvalPoint>,
    bytes_in: u64,
    bytes_out: u64,
    wall_seconds: f64,
    server: Summary,
    worker_reports: Vec<WorkReport>,
}

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

/// Runs a server and `workers` workers until each has trained its share of `epochs`.
pub async fn run_local(local: Local) -> Result<Outcome> {
    let started = Instant::now();
    let settings = local.config.run.clone();
    let data_dir = local.config.data.clone();
    let server = tether_server::Server::new(local.config).context("preparing the run")?;
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
    let (_, data) = tether_dataset::load(data_dir.as_deref())?;
    let train = Arc::new(data.train);
    let per_worker = (local.epochs * train.len() as f64 / f64::from(local.workers)).ceil();
    let steps = (per_worker / f64::from(settings.batch)).ceil().max(1.0) as u64;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut workers = Vec::new();
    for _ in 0..local.workers {
        let mut w = WorkConfig::new(format!("ws://{worker_addr}/ws"));
        w.backend = local.backend;
        w.overlap = local.overlap;
        w.preloaded = Some(train.clone());
        w.max_steps = Some(steps);
        w.progress = false;
        w.give_up_after = Duration::from_secs(30);
        workers.push(tokio::spawn(client::run(w, stop_rx.clone())));
    }
    tokio::spawn(async move {
        interrupted().await;
        eprintln!("stopping: workers finish their steps, sync once more and leave");
        let _ = stop_tx.send(true);
    });

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
    for w in workers {
        reports.push(w.await.context("worker task")?.context("worker failed")?);
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
    let summary = serving.await.context("server task")??;
    Ok(Outcome {
        final_eval,
        summary,
        reports,
        history: state.evals.lock().map(|h| h.clone()).unwrap_or_default(),
        wall_seconds: started.elapsed().as_secs_f64(),
    })
}

/// 128 bits from the OS's CSPRNG in hex: the demo's operator token (anyone on this
/// machine can reach the loopback dashboard, so it must not be guessable).
fn random_token() -> String {
    tether_server::state::secret_bytes::<16>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn run_demo(args: DemoArgs) -> Result<()> {
    if !(args.epochs.is_finite() && args.epochs > 0.0) {
        anyhow::bail!("--epochs must be a positive number, got {}", args.epochs);
    }
    let mut flags = args.run.clone();
    flags.expected_workers = flags.expected_workers.or(Some(args.workers));
    let settings = flags.resolve(None, args.data.as_deref())?;
    let mut config = ServerConfig::new(settings.clone());
    config.data = args.data.clone();
    config.run_dir = args.run_dir.clone();
    config.eval_every = Some(Duration::from_secs(args.eval_every));
    config.eval_limit = Some(args.eval_limit as usize);
    config.admin_token = Some(args.admin_token.clone().unwrap_or_else(random_token));
    config.validate()?;
    let local = Local {
        config,
        workers: args.workers,
        epochs: args.epochs,
        backend: args.backend.into(),
        port: args.port,
        chatty: true,
        overlap: true,
        link: None,
    };
    let out = runtime()?.block_on(run_local(local))?;
    let (final_eval, summary, reports) = (out.final_eval, out.summary, out.reports);
    println!();
    println!(
        "{:>6}  {:>8}  {:>6}  {:>9}  {:>7}  {:>10}",
        "worker", "steps", "syncs", "samples/s", "wait %", "last loss"
    );
    for r in &reports {
        let ids: Vec<String> = r.worker_ids.iter().map(u32::to_string).collect();
        println!(
            "{:>6}  {:>8}  {:>6}  {:>9.0}  {:>6.2}%  {:>10.4}",
            ids.join(","),
            r.steps,
            r.syncs,
            r.samples_per_s,
            r.wait_fraction * 100.0,
            r.last_loss
        );
    }
    println!(
        "center: {:.2} % test accuracy (loss {:.4}) at version {}; {} syncs; {:.1} MB in, {:.1} MB out; {:.1} s wall",
        final_eval.accuracy * 100.0,
        final_eval.loss,
        summary.center_version,
        summary.syncs,
        summary.bytes_in as f64 / 1e6,
        summary.bytes_out as f64 / 1e6,
        out.wall_seconds
    );
    if let Some(p) = &summary.checkpoint {
        println!("checkpoint: {}", p.display());
    }
    let report = DemoReport {
        command: "demo",
        settings,
        workers: reports.len(),
        epochs: args.epochs,
        test_accuracy: final_eval.accuracy,
        test_loss: final_eval.loss,
        history: out.history,
        bytes_in: summary.bytes_in,
        bytes_out: summary.bytes_out,
        wall_seconds: out.wall_seconds,
        server: summary,
        worker_reports: reports,
    };
    write_report(args.report.as_deref(), &report)
}
