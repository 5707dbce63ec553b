//! The `tether` command line: parses a documented configuration, sets up logging and
//! calls the libraries. Every subcommand that produces results takes `--report PATH`
//! and writes them there as JSON.

mod bench_data;
mod bench_net;
mod bench_tree;
mod demo;
mod models;
mod net;
mod pack;
mod relay;
mod repro;
mod sim;
mod work;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};
use tether_shared::model::Model;
use tether_shared::train::LocalOptimizer;
use tether_worker::backend::BackendChoice;
use tether_worker::{bench, train};

/// Elastic Averaging SGD across machines that come and go.
///
/// tether trains CNNs with the EASGD family of algorithms: a parameter server keeps
/// the center variable; native GPU workers and browser tabs train locally and pull
/// toward it every τ steps. Logs go to stderr (RUST_LOG=debug for more); progress
/// bars appear when stderr is a terminal.
#[derive(Parser, Debug)]
#[command(name = "tether", version, about, long_about)]
struct Cli {
    /// What to do (default: `demo` with its defaults).
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// A server and local workers in one process: the quickest way to see a run.
    ///
    /// With no flags: 4 EAMSGD workers, τ 16, on the shipped Fashion-MNIST for 2
    /// epochs; prints the dashboard URL, a progress bar, and a summary table.
    Demo(demo::DemoArgs),
    /// Run a parameter server: keeps the center, serves workers at /ws, status at
    /// /api/status, Prometheus metrics at /metrics, and checkpoints the center.
    ///
    /// With no flags: EAMSGD on the small model and the shipped data, port 8080,
    /// checkpoints every 60 s under ./runs/<run-id>/.
    Serve(Box<net::ServeArgs>),
    /// Join a run as a native worker: trains its shard and syncs every τ steps;
    /// reconnects if the server goes away; Ctrl-C syncs once more and leaves.
    Work(work::WorkArgs),
    /// Relay a run: a server for its own workers (same protocol, dashboard and
    /// guards) that exchanges its center with an upstream server as one worker
    /// would, every --tau-up updates. Relays nest; a relay keeps serving while its
    /// upstream is away and rejoins with its own center.
    Relay(Box<relay::RelayArgs>),
    /// Train on one machine: the single-node baseline every distributed run is compared with.
    ///
    /// With no flags: the small CNN on the Fashion-MNIST that ships with tether,
    /// Nesterov SGD (lr 0.05, momentum 0.9, weight decay 1e-4), batch 128, 3 epochs.
    Train(TrainArgs),
    /// Simulations that need no training.
    #[command(subcommand)]
    Sim(SimCommand),
    /// Benchmarks; each prints a ratio against a baseline measured in the same run.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// The networks: the shipped ones, or check description files (their layers'
    /// shapes, parameters and FLOPs) before a run uses them.
    Models(models::ModelsArgs),
    /// Writes a data set (IDX, CIFAR-10, an image folder) as a packed set, which a
    /// server larger than --data-memory keeps on disk.
    Pack(pack::PackArgs),
    /// The paper's experiments in parallel time: p workers simulated in virtual
    /// time (real training, virtual clocks); writes a table, JSON and figures.
    #[command(subcommand)]
    Repro(repro::ReproCommand),
}

pub(crate) use models::{ModelArg, parse_model};

/// `--model` if given, else the network for the images in `--data`: `cifar` for
/// CIFAR-10 batches, `small` for IDX sets (the shipped one, when there is no
/// `--data`, included).
fn model_or_default(model: Option<ModelArg>, data: Option<&Path>) -> Model {
    let format = data.map_or(tether_dataset::Format::Idx, tether_dataset::format);
    model.unwrap_or_else(|| Model::default_for(format.input_shape()))
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum BackendArg {
    /// wgpu on a real GPU, else the CPU.
    Auto,
    /// The CPU (Burn's flex backend).
    Cpu,
    /// wgpu on any adapter, software ones included.
    Wgpu,
}

impl From<BackendArg> for BackendChoice {
    fn from(b: BackendArg) -> Self {
        match b {
            BackendArg::Auto => BackendChoice::Auto,
            BackendArg::Cpu => BackendChoice::Cpu,
            BackendArg::Wgpu => BackendChoice::Wgpu,
        }
    }
}

#[derive(Args, Debug)]
struct TrainArgs {
    /// Network to train: a shipped name or a description file (.toml or .json)
    /// [default: cifar for CIFAR-10 data, else small].
    #[arg(long, value_parser = crate::parse_model)]
    model: Option<ModelArg>,
    /// Passes over the training set.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    epochs: u32,
    /// Images per step.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    batch: u32,
    /// Learning rate η.
    #[arg(long, default_value_t = 0.05, allow_negative_numbers = true)]
    lr: f64,
    /// Momentum δ (0 for plain SGD).
    #[arg(long, default_value_t = 0.9, allow_negative_numbers = true)]
    momentum: f64,
    /// Nesterov momentum (true) or heavy ball (false).
    #[arg(long, default_value_t = true, action = ArgAction::Set)]
    nesterov: bool,
    /// L2 weight decay.
    #[arg(long, default_value_t = 1e-4, allow_negative_numbers = true)]
    weight_decay: f64,
    /// Seed for initialisation and shuffling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// IDX data directory (train-/t10k- images and labels, .gz or not).
    /// Default: the Fashion-MNIST shipped in data/fashion-mnist.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Compute device.
    #[arg(long, value_enum, default_value = "auto")]
    backend: BackendArg,
    /// CPU threads (default: one per core).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    threads: Option<u32>,
    /// Train on only the first N training images (quick checks).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    train_limit: Option<u32>,
    /// Evaluate on only the first N test images.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    test_limit: Option<u32>,
    /// Write the settings and results here as JSON.
    #[arg(long)]
    report: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum SimCommand {
    /// The EASGD paper's 1-D stability analysis: EASGD vs ADMM round-robin.
    ///
    /// Checks that EASGD is stable exactly for 0 ≤ ηh ≤ 2, 0 ≤ α ≤ (4−2ηh)/(4−ηh),
    /// that ADMM with p = 3, η = 0.001, ρ = 2.5 diverges, and draws both stability maps.
    Stability(sim::StabilityArgs),
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Training samples/s per model, against the machine's sgemm ceiling and the PyTorch peer.
    Train(BenchTrainArgs),
    /// The elastic-update kernels' bandwidth against memcpy of the same vectors.
    Elastic(BenchElasticArgs),
    /// Server elastic updates/s at 1, 4, 16 workers against a raw WebSocket echo.
    Server(bench_net::BenchServerArgs),
    /// Fraction of a worker's wall time spent waiting on syncs, per τ.
    Sync(bench_net::BenchSyncArgs),
    /// Center accuracy per algorithm and τ against the single worker at equal samples.
    Stats(bench_net::BenchStatsArgs),
    /// A worker on an emulated slow link: bytes per sync, compute utilisation and
    /// accuracy per τ, encoding and overlap, against f32 without overlap.
    Link(bench_net::BenchLinkArgs),
    /// The same workers straight to a root and behind relays (real processes): the
    /// root's updates/s, bytes and CPU per worker sync, and accuracy at equal samples.
    Tree(bench_tree::BenchTreeArgs),
    /// A packed data set several times the server's --data-memory, served from disk
    /// (every shard downloaded and checked): peak RSS against the set in memory.
    Data(bench_data::BenchDataArgs),
}

#[derive(Args, Debug)]
struct BenchTrainArgs {
    /// Models to measure (repeat the flag for several).
    #[arg(long, value_parser = crate::parse_model, default_values = ["small", "paper"])]
    model: Vec<ModelArg>,
    /// Images per step.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..))]
    batch: u32,
    /// Untimed steps before timing.
    #[arg(long, default_value_t = 5)]
    warmup: u32,
    /// Timed steps per repeat.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    steps: u32,
    /// Repeats; the median is reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    repeats: u32,
    /// Compute device.
    #[arg(long, value_enum, default_value = "cpu")]
    backend: BackendArg,
    /// CPU threads (default: one per core); the peer runs with the same number.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    threads: Option<u32>,
    /// IDX data directory (default: the shipped Fashion-MNIST).
    #[arg(long)]
    data: Option<PathBuf>,
    /// The PyTorch peer's bench.py (default: ../shared/peer/bench.py beside the repository).
    #[arg(long)]
    peer_script: Option<PathBuf>,
    /// Python interpreter with torch installed (default: $TETHER_PYTHON or python3).
    #[arg(long)]
    python: Option<String>,
    /// Skip the PyTorch peer.
    #[arg(long)]
    no_peer: bool,
    /// Also time the hand-written network of the same name (small, paper, cifar),
    /// alternating with the description-built one: the cost of building networks
    /// from descriptions.
    #[arg(long)]
    reference: bool,
    /// Write the results here as JSON.
    #[arg(long)]
    report: Option<PathBuf>,
    /// The CPU convolution to time: avx512, avx2, portable or gemm (default: the
    /// fastest this CPU has), to compare kernels on one machine.
    #[arg(long)]
    conv: Option<String>,
}

#[derive(Args, Debug)]
struct BenchElasticArgs {
    /// Vector lengths in f32 values (default: the paper model's size, and 16 Mi to leave the caches).
    #[arg(long, value_delimiter = ',', default_values_t = [430_666usize, 16 << 20])]
    len: Vec<usize>,
    /// Repeats; the median is reported.
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u32).range(1..))]
    repeats: u32,
    /// Write the results here as JSON.
    #[arg(long)]
    report: Option<PathBuf>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // Benchmarks print tables; the runs inside them log only what went wrong.
    let default_filter = match cli.command {
        Some(Command::Bench(_)) => "warn",
        _ => "info,wgpu=warn,cubecl=warn,naga=warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli
        .command
        .unwrap_or_else(|| Command::Demo(demo::DemoArgs::default()))
    {
        Command::Demo(args) => demo::run_demo(args),
        Command::Serve(args) => net::run_serve(*args),
        Command::Work(args) => work::run_work(args),
        Command::Relay(args) => relay::run_relay(*args),
        Command::Train(args) => run_train(args),
        Command::Sim(SimCommand::Stability(args)) => sim::run(&args),
        Command::Bench(BenchCommand::Train(args)) => run_bench_train(args),
        Command::Bench(BenchCommand::Elastic(args)) => run_bench_elastic(args),
        Command::Bench(BenchCommand::Server(args)) => bench_net::run_bench_server(args),
        Command::Bench(BenchCommand::Sync(args)) => bench_net::run_bench_sync(args),
        Command::Bench(BenchCommand::Stats(args)) => bench_net::run_bench_stats(args),
        Command::Bench(BenchCommand::Link(args)) => bench_net::run_bench_link(args),
        Command::Bench(BenchCommand::Tree(args)) => bench_tree::run_bench_tree(args),
        Command::Bench(BenchCommand::Data(args)) => bench_data::run_bench_data(args),
        Command::Repro(command) => repro::run(command),
        Command::Models(args) => models::run(&args),
        Command::Pack(args) => pack::run(&args),
    }
}

/// Writes `value` as pretty JSON to `path`, if one was given.
pub(crate) fn write_report(path: Option<&Path>, value: &impl serde::Serialize) -> Result<()> {
    if let Some(path) = path {
        let text = serde_json::to_string_pretty(value)?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("writing report {}", path.display()))?;
        eprintln!("report written to {}", path.display());
    }
    Ok(())
}

fn run_train(args: TrainArgs) -> Result<()> {
    let config = train::TrainConfig {
        model: model_or_default(args.model, args.data.as_deref()),
        epochs: args.epochs as usize,
        batch: args.batch as usize,
        optimizer: LocalOptimizer {
            lr: args.lr,
            momentum: args.momentum,
            nesterov: args.nesterov && args.momentum > 0.0,
            weight_decay: args.weight_decay,
        },
        seed: args.seed,
        data: args.data,
        backend: args.backend.into(),
        threads: args.threads.map(|t| t as usize),
        train_limit: args.train_limit.map(|n| n as usize),
        test_limit: args.test_limit.map(|n| n as usize),
    };
    let report = train::run(&config).context("training failed")?;
    println!(
        "{:>5}  {:>10}  {:>9}  {:>8}  {:>9}",
        "epoch", "train loss", "test acc", "train s", "samples/s"
    );
    for e in &report.epochs {
        println!(
            "{:>5}  {:>10.4}  {:>8.2}%  {:>8.1}  {:>9.0}",
            e.epoch,
            e.train_loss,
            e.test_accuracy * 100.0,
            e.train_seconds,
            e.samples_per_s
        );
    }
    println!(
        "{} model: {:.2}% test accuracy on {} images after {} epochs, {:.1} s wall, on {}",
        report.settings.model.name(),
        report.test_accuracy * 100.0,
        report.test_samples,
        report.epochs.len(),
        report.wall_seconds,
        report.device
    );
    write_report(args.report.as_deref(), &report)
}

fn default_peer_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/peer/bench.py")
}

fn run_bench_train(args: BenchTrainArgs) -> Result<()> {
    if let Some(conv) = &args.conv {
        tether_shared::model::ops::choose_cpu_conv(conv)
            .map_err(anyhow::Error::msg)
            .context("--conv")?;
    }
    let selected =
        tether_worker::backend::select(args.backend.into(), args.threads.map(|t| t as usize))?;
    let threads = rayon_threads();
    // An image folder is decoded for the first network named.
    let shape = args.model.first().map(|m| m.data_shape());
    let (_, data) = tether_dataset::load_for(args.data.as_deref(), shape)?;
    let train = std::sync::Arc::new(data.train);
    println!("device: {}", selected.description);
    let sgemm = bench::sgemm_gflops(&selected.device, 1024, 5);
    println!("sgemm 1024×1024 on this backend: {sgemm:.1} GFLOP/s");
    let peak = bench::peak_fma_gflops(threads, 3);
    println!("peak FMA rate, {threads} threads, register-only: {peak:.1} GFLOP/s (the ceiling)");
    let python = args
        .python
        .clone()
        .or_else(|| std::env::var("TETHER_PYTHON").ok())
        .unwrap_or("python3".into());
    let script = args.peer_script.clone().unwrap_or_else(default_peer_script);
    println!(
        "{:>6} {:>6} {:>12} {:>9} {:>8} {:>8} {:>7} {:>13} {:>8}",
        "model",
        "batch",
        "samples/s",
        "ms/step",
        "GFLOP/s",
        "%sgemm",
        "%peak",
        "PyTorch s/s",
        "ratio"
    );
    let mut rows = Vec::new();
    for m in &args.model {
        let kind = m;
        train
            .expect_network(kind)
            .with_context(|| format!("--model {} on this --data", kind.name()))?;
        let (r, reference) = bench::train_throughput(
            kind,
            &selected.device,
            std::sync::Arc::clone(&train),
            args.batch as usize,
            args.warmup as usize,
            args.steps as usize,
            args.repeats as usize,
            args.reference,
        );
        let peer = if args.no_peer {
            Err("skipped (--no-peer)".to_string())
        } else {
            bench::peer_throughput(&python, &script, kind, threads, args.batch as usize)
        };
        let (peer_s, ratio) = match &peer {
            Ok(p) => (format!("{p:.0}"), format!("{:.2}×", r.samples_per_s / p)),
            Err(_) => ("-".into(), "-".into()),
        };
        println!(
            "{:>6} {:>6} {:>12.0} {:>9.1} {:>8.1} {:>7.1}% {:>6.1}% {:>13} {:>8}",
            kind.name(),
            r.batch,
            r.samples_per_s,
            r.batch as f64 / r.samples_per_s * 1000.0,
            r.gflops,
            r.gflops / sgemm * 100.0,
            r.gflops / peak * 100.0,
            peer_s,
            ratio
        );
        if let Err(why) = &peer {
            println!("       PyTorch peer not measured: {why}");
        }
        if let Some(hand) = &reference {
            println!(
                "       hand-written {}: {:.0} samples/s; from its description: {:.2}× that",
                kind.name(),
                hand.samples_per_s,
                r.samples_per_s / hand.samples_per_s
            );
        }
        rows.push(serde_json::json!({
            "model": kind.name(), "batch": r.batch, "samples_per_s": r.samples_per_s, "runs": r.runs,
            "gflops": r.gflops, "fraction_of_sgemm": r.gflops / sgemm, "fraction_of_peak": r.gflops / peak,
            "pytorch_samples_per_s": peer.as_ref().ok(), "ratio_to_pytorch": peer.as_ref().ok().map(|p| r.samples_per_s / p),
            "pytorch_error": peer.as_ref().err(),
            "hand_written_samples_per_s": reference.as_ref().map(|h| h.samples_per_s),
            "hand_written_runs": reference.as_ref().map(|h| h.runs.clone()),
        }));
    }
    let report = serde_json::json!({
        "command": "bench train", "device": selected.description, "backend": selected.backend,
        "settings": { "batch": args.batch, "warmup": args.warmup, "steps": args.steps, "repeats": args.repeats },
        "threads": threads, "sgemm_gflops": sgemm, "peak_fma_gflops": peak, "results": rows,
    });
    write_report(args.report.as_deref(), &report)
}

fn rayon_threads() -> usize {
    tether_worker::backend::cpu_threads(None).unwrap_or(1)
}

fn run_bench_elastic(args: BenchElasticArgs) -> Result<()> {
    println!(
        "{:>10} {:>16} {:>14} {:>12} {:>12} {:>12}",
        "f32 values",
        "center_pull GB/s",
        "apply GB/s",
        "memcpy GB/s",
        "pull/memcpy",
        "apply/memcpy"
    );
    let mut rows = Vec::new();
    for &len in &args.len {
        // Enough calls per timing to run ~50 ms whatever the size.
        let iters = (12_000_000 / len.max(1)).clamp(3, 10_000);
        let r = bench::elastic_bandwidth(len, iters, args.repeats as usize);
        println!(
            "{:>10} {:>16.1} {:>14.1} {:>12.1} {:>11.0}% {:>11.0}%",
            r.len,
            r.center_pull_gbps,
            r.apply_difference_gbps,
            r.memcpy_gbps,
            r.center_pull_ratio * 100.0,
            r.apply_difference_ratio * 100.0
        );
        rows.push(r);
    }
    let report = serde_json::json!({
        "command": "bench elastic", "settings": { "len": args.len, "repeats": args.repeats }, "results": rows,
    });
    write_report(args.report.as_deref(), &report)
}
