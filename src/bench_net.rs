//! `tether bench server | sync | stats | link`: the distributed benchmarks, each against a
//! baseline measured in the same run — a raw WebSocket echo of the same bytes, the
//! worker's own compute time, the single-worker trainer at equal samples, and f32
//! syncs without overlap on the same emulated link.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::Serialize;
use tether_lab::local::{Local, run_local};
use tether_lab::server_bench;
use tether_server::{RunSettings, ServerConfig};
use tether_shared::algorithms::Algorithm;
use tether_shared::codec::Encoding;
use tether_worker::backend::BackendChoice;

use crate::net::{algorithm_parser, runtime, stop_on_signal};
use crate::{ModelArg, write_report};

#[derive(Args, Debug)]
pub struct BenchServerArgs {
    /// Concurrent workers to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [1u32, 4, 16])]
    pub workers: Vec<u32>,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Model whose size the updates have.
    #[arg(long, value_parser = crate::parse_model, default_value = "paper")]
    pub model: ModelArg,
    /// The server's loss-screen batch (`serve --screen-batch`; 0: off). The bench's
    /// updates are all held, so each costs one forward pass over the batch.
    #[arg(long, default_value_t = 64)]
    pub screen_batch: usize,
    /// Another `tether` binary (e.g. main's build) whose server is measured in the
    /// same run, alternating with this one's: a before/after on one machine state.
    #[arg(long)]
    pub against: Option<PathBuf>,
    /// Write the results here as JSON.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

#[derive(Serialize)]
struct ServerRow {
    workers: u32,
    updates_per_s: f64,
    /// The `--against` binary's server, measured just after.
    against_per_s: Option<f64>,
    echo_per_s: f64,
    ratio_to_echo: f64,
    server_mb_per_s: f64,
    server_rss_mb: Option<f64>,
}

pub fn run_bench_server(args: BenchServerArgs) -> Result<()> {
    let model = args.model;
    let dir = std::env::temp_dir().join(format!("tether-bench-server-{}", std::process::id()));
    let exe = std::env::current_exe()?;
    // The screen's own rate first, before any server starts: the served rate's ceiling.
    let screen_alone = if args.screen_batch > 0 {
        let (_, data) = tether_dataset::load_for(None, Some(model.data_shape()))?;
        let rate = server_bench::screen_rate(&model, data.train, args.screen_batch, args.seconds);
        println!(
            "loss screen alone (no network, before any server starts): {rate:.0} judgements/s, {:.2} ms each",
            1e3 / rate
        );
        Some(rate)
    } else {
        None
    };
    let (mut child, addr) = server_bench::spawn_server(&exe, &model, args.screen_batch, &dir)?;
    let mut other = match &args.against {
        Some(path) => {
            match server_bench::spawn_server(path, &model, args.screen_batch, &dir.join("against"))
            {
                Ok(other) => Some(other),
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(e).with_context(|| format!("--against {}", path.display()));
                }
            }
        }
        None => None,
    };
    let result = runtime()?.block_on(async {
        let echo = server_bench::echo_server().await?;
        // Both servers through their start-up (the norm guard's first measure, the
        // screen's nets and buffers) with a second of syncs each before either is
        // timed: without it the first row's first server measured ~15 % slow.
        for a in std::iter::once(addr).chain(other.as_ref().map(|(_, a)| *a)) {
            server_bench::sync_rate(a, 1, 1.0).await?;
        }
        let frame_len = server_bench::sync_frame_len(&model);
        println!(
            "update: {} f32 ({:.2} MB per frame each way); server pid {}",
            model.param_count(),
            frame_len as f64 / 1e6,
            child.id()
        );
        println!(
            "{:>8} {:>12} {:>12} {:>12} {:>8} {:>12} {:>12}",
            "workers", "updates/s", "against/s", "echo/s", "ratio", "server MB/s", "server RSS"
        );
        let mut rows = Vec::new();
        for &c in &args.workers {
            let rss_probe = {
                let pid = child.id();
                let secs = args.seconds;
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs_f64(secs * 0.8)).await;
                    server_bench::rss_mb(pid)
                })
            };
            let updates = server_bench::sync_rate(addr, c, args.seconds).await?;
            let rss = rss_probe.await?;
            let against = match &other {
                Some((_, other_addr)) => {
                    Some(server_bench::sync_rate(*other_addr, c, args.seconds).await?)
                }
                None => None,
            };
            let echo_rate = server_bench::echo_rate(echo, frame_len, c, args.seconds).await?;
            let row = ServerRow {
                workers: c,
                updates_per_s: updates,
                against_per_s: against,
                echo_per_s: echo_rate,
                ratio_to_echo: updates / echo_rate,
                server_mb_per_s: updates * 2.0 * frame_len as f64 / 1e6,
                server_rss_mb: rss,
            };
            println!(
                "{:>8} {:>12.0} {:>12} {:>12.0} {:>7.0}% {:>12.0} {:>9.1} MB",
                c,
                row.updates_per_s,
                against.map_or("-".into(), |a| format!("{a:.0}")),
                row.echo_per_s,
                row.ratio_to_echo * 100.0,
                row.server_mb_per_s,
                row.server_rss_mb.unwrap_or(f64::NAN)
            );
            rows.push(row);
        }
        let report = serde_json::json!({
            "command": "bench server", "model": model.name(), "params": model.param_count(),
            "screen_batch": args.screen_batch, "screen_alone_per_s": screen_alone,
            "frame_bytes": frame_len, "seconds": args.seconds, "results": rows,
        });
        write_report(args.report.as_deref(), &report)
    });
    for c in std::iter::once(&mut child).chain(other.as_mut().map(|(c, _)| c)) {
        let _ = c.kill();
        let _ = c.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
    result
}

#[derive(Args, Debug)]
pub struct BenchSyncArgs {
    /// Communication periods to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [1u32, 16, 64])]
    pub tau: Vec<u32>,
    /// Local steps per measurement (at least 3τ are run).
    #[arg(long, default_value_t = 64)]
    pub steps: u64,
    /// Write the results here as JSON.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

fn quiet_config(settings: RunSettings) -> ServerConfig {
    let mut config = ServerConfig::new(settings);
    config.eval_every = None;
    config.checkpoint_every = None;
    config.run_dir =
        Some(std::env::temp_dir().join(format!("tether-bench-{}", tether_server::new_run_id())));
    config
}

pub fn run_bench_sync(args: BenchSyncArgs) -> Result<()> {
    println!(
        "{:>5} {:>7} {:>7} {:>10} {:>10} {:>9}",
        "τ", "steps", "syncs", "train s", "wait s", "wait %"
    );
    let mut rows = Vec::new();
    let rt = runtime()?;
    for &tau in &args.tau {
        let steps = args.steps.max(3 * u64::from(tau));
        let mut settings = RunSettings::defaults(Algorithm::Eamsgd);
        settings.tau = tau;
        settings.expected_workers = 1;
        settings.alpha = 0.9;
        let batch = f64::from(settings.batch);
        let local = Local {
            config: quiet_config(settings),
            workers: 1,
            epochs: steps as f64 * batch / 60_000.0,
            backend: BackendChoice::Cpu,
            port: 0,
            chatty: false,
            overlap: true,
            link: None,
        };
        let out = rt.block_on(async { run_local(local, stop_on_signal()).await })?;
        let r = &out.reports[0];
        println!(
            "{:>5} {:>7} {:>7} {:>10.2} {:>10.3} {:>8.2}%",
            tau,
            r.steps,
            r.syncs,
            r.train_s,
            r.wait_s,
            r.wait_fraction * 100.0
        );
        rows.push(serde_json::json!({
            "tau": tau, "steps": r.steps, "syncs": r.syncs, "train_s": r.train_s, "wait_s": r.wait_s,
            "wall_s": r.wall_s, "wait_fraction": r.wait_fraction, "wait_per_sync_ms": r.wait_s / r.syncs.max(1) as f64 * 1e3,
        }));
    }
    write_report(
        args.report.as_deref(),
        &serde_json::json!({ "command": "bench sync", "results": rows }),
    )
}

#[derive(Args, Debug)]
pub struct BenchStatsArgs {
    /// Algorithms to compare (comma-separated).
    #[arg(long, value_parser = algorithm_parser(), value_delimiter = ',', default_values = ["eamsgd", "easgd", "downpour"])]
    pub algorithm: Vec<Algorithm>,
    /// Communication periods (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [1u32, 64])]
    pub tau: Vec<u32>,
    /// Workers per distributed run.
    #[arg(long, default_value_t = 4)]
    pub workers: u32,
    /// Passes over the training set per run (all workers together; the baseline the same).
    #[arg(long, default_value_t = 1)]
    pub epochs: u32,
    /// Write the results here as JSON.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

pub fn run_bench_stats(args: BenchStatsArgs) -> Result<()> {
    let baseline = tether_worker::train::run(&tether_worker::train::TrainConfig {
        epochs: args.epochs as usize,
        backend: BackendChoice::Cpu,
        ..Default::default()
    })?;
    println!(
        "baseline: one worker, Nesterov SGD, {} epoch(s): {:.2} % ({:.0} s)",
        args.epochs,
        baseline.test_accuracy * 100.0,
        baseline.wall_seconds
    );
    println!(
        "{:>10} {:>5} {:>9} {:>10} {:>8} {:>8}",
        "algorithm", "τ", "accuracy", "vs single", "syncs", "wall s"
    );
    let mut rows = Vec::new();
    let rt = runtime()?;
    for &a in &args.algorithm {
        for &tau in &args.tau {
            let mut settings = RunSettings::defaults(a);
            settings.tau = tau;
            settings.expected_workers = args.workers;
            if tether_server::config::has_elastic_force(settings.algorithm) {
                settings.alpha = tether_server::config::DEFAULT_BETA / args.workers as f32;
            }
            let local = Local {
                config: quiet_config(settings.clone()),
                workers: args.workers,
                epochs: f64::from(args.epochs),
                backend: BackendChoice::Cpu,
                port: 0,
                chatty: false,
                overlap: true,
                link: None,
            };
            let out = rt.block_on(async { run_local(local, stop_on_signal()).await })?;
            let acc = out.final_eval.accuracy;
            println!(
                "{:>10} {:>5} {:>8.2}% {:>+9.2}  {:>8} {:>8.0}",
                settings.algorithm.name(),
                tau,
                acc * 100.0,
                (acc - baseline.test_accuracy) * 100.0,
                out.summary.syncs,
                out.wall_seconds
            );
            rows.push(serde_json::json!({
                "algorithm": settings.algorithm, "tau": tau, "workers": args.workers, "epochs": args.epochs,
                "test_accuracy": acc, "test_loss": out.final_eval.loss, "syncs": out.summary.syncs,
                "wall_s": out.wall_seconds, "lr": settings.lr, "alpha": settings.alpha, "momentum": settings.momentum,
            }));
        }
    }
    write_report(
        args.report.as_deref(),
        &serde_json::json!({
            "command": "bench stats", "baseline_accuracy": baseline.test_accuracy, "baseline_epochs": args.epochs,
            "results": rows,
        }),
    )
}

#[derive(Args, Debug)]
pub struct BenchLinkArgs {
    /// Communication periods to measure (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [16u32, 64])]
    pub tau: Vec<u32>,
    /// Payload encodings to measure (comma-separated; f32 is always measured, as the baseline).
    #[arg(long, value_delimiter = ',', default_value = "f32,f16,bf16,q8")]
    pub encoding: Vec<Encoding>,
    /// The link's capacity each way, megabits per second.
    #[arg(long, default_value_t = 20.0)]
    pub mbit: f64,
    /// The link's one-way delay, milliseconds.
    #[arg(long, default_value_t = 50.0)]
    pub delay_ms: f64,
    /// Passes over the training set per run (every run sees the same samples).
    #[arg(long, default_value_t = 0.5)]
    pub epochs: f64,
    /// Model trained.
    #[arg(long, value_parser = crate::parse_model, default_value = "small")]
    pub model: ModelArg,
    /// Elastic force α: by default that of one worker of four (β 0.9 / 4). From 0.5
    /// on syncs never overlap (`Algorithm::overlaps`).
    #[arg(long, default_value_t = 0.225)]
    pub alpha: f32,
    /// Fail (exit status 1) when the server refused any of the honest worker's
    /// frames, or when a row's accuracy is more than this many points below f32
    /// without overlap on the same link (CI's regression check).
    #[arg(long, value_name = "POINTS")]
    pub check: Option<f64>,
    /// Write the results here as JSON.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

#[derive(Serialize)]
struct LinkRow {
    tau: u32,
    link: String,
    encoding: Encoding,
    overlap: bool,
    syncs: u64,
    refused: u64,
    held: u64,
    bytes_per_sync: f64,
    fewer_bytes_than_f32: f64,
    wall_s: f64,
    steady_utilisation: f64,
    compute_utilisation: f64,
    test_accuracy: f64,
    accuracy_vs_f32: f64,
}

/// One EAMSGD worker training the same samples through a slow link, per τ, encoding
/// and overlap, against f32 without overlap on the same link (and on loopback, the
/// compute-bound ceiling) in the same run.
pub fn run_bench_link(args: BenchLinkArgs) -> Result<()> {
    if !(args.mbit > 0.0 && args.delay_ms >= 0.0 && args.epochs > 0.0) {
        bail!("--mbit and --epochs must be positive and --delay-ms not negative");
    }
    if args.check.is_some_and(|p| p.is_nan() || p < 0.0) {
        bail!("--check takes the points of accuracy a row may lose, 0 or more");
    }
    let mut encodings = vec![Encoding::F32];
    encodings.extend(args.encoding.iter().filter(|e| **e != Encoding::F32));
    let shape = tether_lab::throttle::Shape::new(args.mbit, args.delay_ms);
    let link_name = format!("{} Mbit/s, {} ms", args.mbit, args.delay_ms);
    let model = args.model;
    println!(
        "one EAMSGD worker (α {}), {} model, {} epoch(s) per run; link {link_name} one way, each direction",
        args.alpha,
        model.name(),
        args.epochs
    );
    println!(
        "{:>4} {:>10} {:>5} {:>7} {:>5} {:>7} {:>4} {:>9} {:>7} {:>7} {:>7} {:>7} {:>8} {:>7}",
        "τ",
        "link",
        "enc",
        "overlap",
        "syncs",
        "refused",
        "held",
        "KB/sync",
        "fewer",
        "wall s",
        "steady",
        "whole",
        "accuracy",
        "Δ pts"
    );
    let rt = runtime()?;
    let mut rows: Vec<LinkRow> = Vec::new();
    for &tau in &args.tau {
        let mut runs = vec![(None, Encoding::F32, false)];
        for &e in &encodings {
            for overlap in [false, true] {
                runs.push((Some(shape), e, overlap));
            }
        }
        let mut f32_baseline: Option<(f64, f64)> = None;
        for (link, encoding, overlap) in runs {
            let mut settings = RunSettings::defaults(Algorithm::Eamsgd);
            settings.tau = tau;
            settings.model = model.clone();
            settings.expected_workers = 1;
            settings.alpha = args.alpha;
            let mut config = quiet_config(settings);
            config.encoding = Some(encoding);
            let local = Local {
                config,
                workers: 1,
                epochs: args.epochs,
                backend: BackendChoice::Cpu,
                port: 0,
                chatty: false,
                overlap,
                link,
            };
            let out = rt.block_on(async { run_local(local, stop_on_signal()).await })?;
            let r = &out.reports[0];
            let per_sync = r.sync_bytes as f64 / r.syncs.max(1) as f64;
            let acc = out.final_eval.accuracy;
            // The same-τ f32 run on the link without overlap is the baseline.
            if link.is_some() && encoding == Encoding::F32 && !overlap {
                f32_baseline = Some((per_sync, acc));
            }
            let (base_bytes, base_acc) = f32_baseline.unwrap_or((per_sync, acc));
            let row = LinkRow {
                tau,
                link: if link.is_some() {
                    link_name.clone()
                } else {
                    "loopback".into()
                },
                encoding,
                overlap: r.overlap,
                syncs: r.syncs,
                refused: r.rejections,
                held: out.summary.held,
                bytes_per_sync: per_sync,
                fewer_bytes_than_f32: base_bytes / per_sync.max(1.0),
                wall_s: r.wall_s,
                steady_utilisation: r.steady_utilisation,
                compute_utilisation: r.compute_utilisation,
                test_accuracy: acc,
                accuracy_vs_f32: (acc - base_acc) * 100.0,
            };
            println!(
                "{:>4} {:>10} {:>5} {:>7} {:>5} {:>7} {:>4} {:>9.0} {:>6.2}× {:>7.1} {:>6.1}% {:>6.1}% {:>7.2}% {:>+7.2}",
                tau,
                if link.is_some() {
                    "emulated"
                } else {
                    "loopback"
                },
                encoding.name(),
                if row.overlap { "yes" } else { "no" },
                row.syncs,
                row.refused,
                row.held,
                per_sync / 1e3,
                row.fewer_bytes_than_f32,
                row.wall_s,
                row.steady_utilisation * 100.0,
                row.compute_utilisation * 100.0,
                acc * 100.0,
                row.accuracy_vs_f32
            );
            rows.push(row);
        }
    }
    write_report(
        args.report.as_deref(),
        &serde_json::json!({
            "command": "bench link", "model": model.name(), "epochs": args.epochs,
            "mbit_per_s": args.mbit, "delay_ms": args.delay_ms, "alpha": args.alpha, "results": rows,
        }),
    )?;
    match args.check {
        Some(points) => check_link_rows(&rows, points),
        None => Ok(()),
    }
}

/// `--check`: an honest worker is never refused, and no row loses more than `points`
/// of accuracy against f32 without overlap on the same link.
fn check_link_rows(rows: &[LinkRow], points: f64) -> Result<()> {
    let mut failed = Vec::new();
    for r in rows {
        let name = format!(
            "τ {} {} {} overlap {}",
            r.tau,
            r.link,
            r.encoding.name(),
            if r.overlap { "on" } else { "off" }
        );
        if r.refused > 0 {
            failed.push(format!(
                "{name}: the server refused {} frames of an honest worker",
                r.refused
            ));
        }
        if r.accuracy_vs_f32 < -points {
            failed.push(format!(
                "{name}: {:+.2} points against f32 without overlap (allowed −{points})",
                r.accuracy_vs_f32
            ));
        }
    }
    if failed.is_empty() {
        println!("check passed: no refusals, every row within {points} points of f32");
        Ok(())
    } else {
        bail!("bench link check failed:\n  {}", failed.join("\n  "))
    }
}
