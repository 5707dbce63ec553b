//! `tether demo` (what `cargo run --release` does): a server and N workers in one
//! process on the shipped data (`tether_lab::local`), an overall progress bar, and
//! a summary table.

use std::time::Duration;

use anyhow::Result;
use clap::Args;
use serde::Serialize;
use tether_lab::local::{Local, run_local};
use tether_server::{EvalPoint, ServerConfig, Summary};
use tether_worker::client::WorkReport;

use crate::net::{RunFlags, runtime, stop_on_signal};
use crate::{BackendArg, write_report};

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
    let out = runtime()?.block_on(async { run_local(local, stop_on_signal()).await })?;
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
