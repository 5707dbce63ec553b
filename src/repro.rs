//! `tether repro tau|workers|leader|stability`: the paper's experiment grids, run
//! in virtual time by `tether_lab` (its simulator and grids); this file only reads
//! the flags.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use tether_lab::repro::{self, Baseline, Grid, PanelBy};
use tether_lab::simulate::Timing;
use tether_shared::algorithms::Algorithm;

use crate::ModelArg;
use crate::net::algorithm_parser;

#[derive(Subcommand, Debug)]
pub enum ReproCommand {
    /// τ ∈ {1, 4, 16, 64} for EASGD, EAMSGD, DOWNPOUR and MDOWNPOUR at p = 4: the
    /// elastic methods keep their test error at large τ where DOWNPOUR degrades.
    Tau(ReproArgs),
    /// p ∈ {1, 4, 8, 16} for EAMSGD and DOWNPOUR at τ = 16, and one MSGD worker
    /// alone: test error against parallel time as workers are added.
    Workers(ReproArgs),
    /// LSGD against EASGD and model averaging at p = 4, τ = 16.
    Leader(ReproArgs),
    /// The paper's stability analysis (the same as `tether sim stability`).
    Stability(crate::sim::StabilityArgs),
}

/// Settings shared by every grid; the grid's own axes can be overridden.
#[derive(Args, Debug)]
pub struct ReproArgs {
    /// A folder holding IDX files (Fashion-MNIST, MNIST) or CIFAR-10 binary
    /// batches [default: the shipped Fashion-MNIST].
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// The network: a shipped name or a description file [default: cifar for
    /// CIFAR-10 data, else small].
    #[arg(long, value_parser = crate::parse_model)]
    pub model: Option<ModelArg>,
    /// Training per experiment, in epochs of the training set over all workers;
    /// for `workers`, per worker, so every p gets the same parallel time
    /// [default: 0.5; workers: 0.125; raised where the largest τ would leave a
    /// worker fewer than 4 exchanges with the center (a small data set)].
    #[arg(long)]
    pub budget: Option<f64>,
    /// Seeds per experiment (0, 1, …): curves are the first seed's, tables the mean.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=16))]
    pub seeds: u64,
    /// Learning rates to try per method (comma-separated); the best is reported, as
    /// the paper tuned η per method [default: each algorithm's default η].
    #[arg(long, value_delimiter = ',')]
    pub lr: Vec<f64>,
    /// Override the grid's algorithms (comma-separated).
    #[arg(long, value_parser = algorithm_parser(), value_delimiter = ',')]
    pub algorithm: Vec<Algorithm>,
    /// Override the grid's τ values (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub tau: Vec<u32>,
    /// Override the grid's worker counts (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub workers: Vec<u32>,
    /// Images per local step.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub batch: u32,
    /// Parallel time of one local step, in ms [default: measured here once].
    #[arg(long)]
    pub step_ms: Option<f64>,
    /// Parallel time of one exchange, in ms [default: the f32 parameters both ways
    /// over 1 Gbit/s plus 1 ms].
    #[arg(long)]
    pub exchange_ms: Option<f64>,
    /// Worker speeds, repeated over the workers (comma-separated; 0.5 = a straggler
    /// at half speed) [default: all 1].
    #[arg(long, value_delimiter = ',')]
    pub speeds: Vec<f64>,
    /// Evaluations of the center per experiment.
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub evaluations: u32,
    /// Test images each evaluation uses (the first ones of the test set).
    #[arg(long, default_value_t = 2000)]
    pub eval_limit: usize,
    /// Report the parallel time to this test error (in %) [default: the
    /// baseline's final error; without one, the median of the methods' final errors].
    #[arg(long)]
    pub target: Option<f64>,
    /// Add the single worker alone, trained for this many epochs: the paper's
    /// sequential baseline, with the first algorithm's local optimizer (MSGD for
    /// EAMSGD). Times to target are then read against its final error and time;
    /// 0: none [default: workers: the per-worker budget; the others: none].
    #[arg(long)]
    pub baseline: Option<f64>,
    /// Refuse updates as `tether serve` does, beyond this many times the typical
    /// progress (its --max-update-ratio) [default: off, as in the paper].
    #[arg(long)]
    pub norm_guard: Option<f64>,
    /// Where the table, JSON and figures go.
    #[arg(long, default_value = "repro")]
    pub out: PathBuf,
    /// Experiments run side by side, one thread each; the numbers are the same for
    /// any count [default: the CPU's threads].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub jobs: Option<u32>,
}

pub fn run(command: ReproCommand) -> Result<()> {
    let (name, title, algorithms, taus, workers, panel_by, args) = match command {
        ReproCommand::Tau(a) => (
            "tau",
            "Test error against parallel time per τ (p = 4)",
            vec![
                Algorithm::Easgd,
                Algorithm::Eamsgd,
                Algorithm::Downpour,
                Algorithm::Mdownpour,
            ],
            vec![1, 4, 16, 64],
            vec![4],
            PanelBy::Tau,
            a,
        ),
        ReproCommand::Workers(a) => (
            "workers",
            "Test error against parallel time per p (τ = 16)",
            vec![Algorithm::Eamsgd, Algorithm::Downpour],
            vec![16],
            vec![1, 4, 8, 16],
            PanelBy::Algorithm,
            a,
        ),
        ReproCommand::Stability(a) => return crate::sim::run(&a),
        ReproCommand::Leader(a) => (
            "leader",
            "LSGD, EASGD and model averaging (p = 4, τ = 16)",
            vec![Algorithm::Lsgd, Algorithm::Easgd, Algorithm::Average],
            vec![16],
            vec![4],
            PanelBy::Tau,
            a,
        ),
    };
    let pick = |given: &Vec<u32>, default: Vec<u32>| {
        if given.is_empty() {
            default
        } else {
            given.clone()
        }
    };
    let per_worker = name == "workers";
    if let Some(b) = args.budget
        && !(b.is_finite() && b > 0.0)
    {
        bail!("--budget must be a positive number of epochs");
    }
    if args
        .lr
        .iter()
        .any(|l| !(l.is_finite() && *l > 0.0 && *l <= 10.0))
    {
        bail!("--lr: every learning rate must be in (0, 10]");
    }
    let model = crate::model_or_default(args.model, args.data.as_deref());
    let (_, data) = tether_dataset::load_for(args.data.as_deref(), Some(model.data_shape()))
        .context("loading the training data (--data)")?;
    data.train
        .expect_network(&model)
        .context("--data and --model disagree")?;
    let train = Arc::new(data.train);
    let test = data
        .test
        .subset(&(0..args.eval_limit.clamp(1, data.test.len())).collect::<Vec<_>>());
    let step_s = match args.step_ms {
        Some(ms) => ms / 1e3,
        None => {
            let s = repro::measure_step_s(&model, args.batch, &train);
            eprintln!(
                "one local step ({} model, batch {}) takes {:.1} ms here: the parallel-time unit (--step-ms to fix it)",
                model.name(),
                args.batch,
                s * 1e3
            );
            s
        }
    };
    let algorithms = if args.algorithm.is_empty() {
        algorithms
    } else {
        args.algorithm.clone()
    };
    let epochs = |e: f64| (e * train.len() as f64).round().max(1.0) as u64;
    let (taus, workers) = (pick(&args.tau, taus), pick(&args.workers, workers));
    let budget = match args.budget {
        Some(b) => b,
        None => default_budget(per_worker, args.batch, &taus, &workers, train.len()),
    };
    let baseline = args
        .baseline
        .unwrap_or(if per_worker { budget } else { 0.0 });
    if !(baseline.is_finite() && baseline >= 0.0) {
        bail!("--baseline must be a number of epochs, 0 for none");
    }
    let grid = Grid {
        name: name.into(),
        title: title.into(),
        baseline: (baseline > 0.0).then(|| Baseline {
            algorithm: algorithms[0],
            budget_samples: epochs(baseline),
        }),
        algorithms,
        taus,
        workers,
        lrs: args.lr.clone(),
        seeds: (0..args.seeds).collect(),
        model: model.clone(),
        batch: args.batch,
        budget_samples: epochs(budget),
        budget_per_worker: per_worker,
        evaluations: args.evaluations,
        timing: Timing {
            step_s,
            speeds: args.speeds.clone(),
            exchange_s: args
                .exchange_ms
                .map_or_else(|| repro::gigabit_exchange_s(&model), |ms| ms / 1e3),
        },
        norm_guard: args.norm_guard,
        panel_by,
        target_error: args.target.map(|t| t / 100.0),
    };
    if let Some(line) = tether_lab::exchanges::warning(&grid.thin_cells()) {
        eprintln!("warning: {line}");
    }
    let experiments = grid.experiments();
    let runs = experiments.len();
    let total = experiments.iter().map(|(e, _)| e.budget_samples).sum();
    let bar = tether_worker::progress::bar(total, name);
    let jobs = args.jobs.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        |j| j as usize,
    );
    bar.set_message(format!("{runs} runs, {} at a time", jobs.min(runs)));
    let report = repro::run(&grid, &train, &test, jobs, |done, _| {
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    print!("{}", report.markdown());
    for path in report.write(&args.out)? {
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// The default budget in epochs: half an epoch (an eighth per worker for the
/// `workers` grid), or more where that would leave a worker at the grid's largest τ
/// fewer than [`MIN_EXCHANGES`] exchanges (a small data set); said when raised.
///
/// [`MIN_EXCHANGES`]: tether_lab::exchanges::MIN_EXCHANGES
fn default_budget(
    per_worker: bool,
    batch: u32,
    taus: &[u32],
    workers: &[u32],
    images: usize,
) -> f64 {
    let usual = if per_worker { 0.125 } else { 0.5 };
    let enough = tether_lab::exchanges::budget_for_enough(per_worker, batch, taus, workers);
    let needed = enough as f64 / images.max(1) as f64;
    if needed <= usual {
        return usual;
    }
    eprintln!(
        "budget: {needed:.2} epochs of these {images} images{} (not {usual}), so that τ = {} \
         still gives each worker {} exchanges with the center (--budget to choose)",
        if per_worker { " per worker" } else { "" },
        taus.iter().max().copied().unwrap_or(1),
        tether_lab::exchanges::MIN_EXCHANGES,
    );
    needed
}
