//! Experiment grids (algorithms × τ × p × η × seeds) run through the simulator,
//! with what the paper reports: test error against parallel time, the best η per
//! method, error at fixed time budgets and time to a target error, as JSON,
//! Markdown and figures.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use burn::tensor::Device;
use serde::Serialize;
use tether_server::RunSettings;
use tether_server::config::has_elastic_force;
use tether_shared::algorithms::Algorithm;
use tether_shared::data::{ImageSet, Normalization, shard_indices};
use tether_shared::local::{LocalWorker, ShardData};
use tether_shared::model::{Model, to_flat};
use tether_shared::protocol::Shard;
use thiserror::Error;

use crate::plot::{self, Figure, Panel, Series};
use crate::simulate::{self, Experiment, Point, SimError, Simulated, Timing};

/// Which setting each panel of the figure holds fixed (the lines are the rest).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PanelBy {
    /// One panel per τ, a line per algorithm (and p).
    Tau,
    /// One panel per algorithm, a line per p (and τ).
    Algorithm,
}

/// A grid of experiments.
#[derive(Clone, Debug, Serialize)]
pub struct Grid {
    /// Short name: the output's file names.
    pub name: String,
    /// The figure's title.
    pub title: String,
    /// Algorithms.
    pub algorithms: Vec<Algorithm>,
    /// Local steps between exchanges.
    pub taus: Vec<u32>,
    /// Worker counts p.
    pub workers: Vec<u32>,
    /// Learning rates tried per method; empty: each algorithm's default.
    pub lrs: Vec<f64>,
    /// Seeds (initial center, shards, batch order).
    pub seeds: Vec<u64>,
    /// The network.
    pub model: Model,
    /// Images per local step.
    pub batch: u32,
    /// Training images per experiment, over all its workers (per worker when
    /// `budget_per_worker`).
    pub budget_samples: u64,
    /// The budget is per worker: every p gets the same parallel time (the `workers`
    /// grid), rather than the same images in all.
    pub budget_per_worker: bool,
    /// Evaluations per experiment.
    pub evaluations: u32,
    /// The clocks.
    pub timing: Timing,
    /// The server's norm guard ratio; `None`: off.
    pub norm_guard: Option<f64>,
    /// How the figure is cut into panels.
    pub panel_by: PanelBy,
    /// Time to this test error is reported; `None`: the baseline's final error, or
    /// without one the median of the methods' best final errors.
    pub target_error: Option<f64>,
    /// The single worker the parallel runs are measured against.
    pub baseline: Option<Baseline>,
}

/// One worker alone, no center: the paper's sequential baseline, with the local
/// optimizer of an algorithm (EAMSGD's: MSGD, Nesterov momentum), the grid's η, seeds
/// and clocks.
#[derive(Clone, Debug, Serialize)]
pub struct Baseline {
    /// Whose local optimizer it runs.
    pub algorithm: Algorithm,
    /// Its training images.
    pub budget_samples: u64,
}

/// One experiment's result.
#[derive(Clone, Debug, Serialize)]
pub struct Cell {
    /// The algorithm.
    pub algorithm: Algorithm,
    /// The sequential baseline: one worker alone with the algorithm's local optimizer.
    pub sequential: bool,
    /// τ.
    pub tau: u32,
    /// p.
    pub workers: u32,
    /// η.
    pub lr: f64,
    /// The seed.
    pub seed: u64,
    /// What the simulator measured.
    pub result: Simulated,
}

/// A method (algorithm, τ, p) at its best η: figures averaged over seeds.
#[derive(Clone, Debug, Serialize)]
pub struct Best {
    /// The algorithm.
    pub algorithm: Algorithm,
    /// The sequential baseline.
    pub sequential: bool,
    /// τ.
    pub tau: u32,
    /// p.
    pub workers: u32,
    /// The η with the lowest mean final error.
    pub lr: f64,
    /// Mean final test error.
    pub final_error: f64,
    /// Mean test error at each of [`Report::budgets_s`].
    pub error_at: Vec<f64>,
    /// Mean parallel time to [`Report::target_error`] (`None`: a seed never reached it).
    pub time_to_target_s: Option<f64>,
    /// Mean final parallel time.
    pub time_s: f64,
    /// The time to target as a fraction of the baseline's final time, when the
    /// target is the baseline's final error (the paper's "reaches the single
    /// worker's accuracy in x of its time").
    pub of_baseline_time: Option<f64>,
    /// Updates the center refused, over all seeds.
    pub refused: u64,
}

/// Everything a grid produced.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The grid.
    pub grid: Grid,
    /// Every experiment.
    pub cells: Vec<Cell>,
    /// The best η per method.
    pub best: Vec<Best>,
    /// Parallel-time budgets the errors are read at: ¼, ½ and all of the time the
    /// longest method took (a method done sooner keeps its final center).
    pub budgets_s: Vec<f64>,
    /// The target error of `time_to_target_s`.
    pub target_error: f64,
    /// Real seconds the grid took on this machine.
    pub wall_s: f64,
}

/// Why a grid could not run or be written.
#[derive(Debug, Error)]
pub enum ReproError {
    /// An experiment failed.
    #[error("{algorithm} τ={tau} p={workers} η={lr}: {source}")]
    Experiment {
        /// Its algorithm.
        algorithm: &'static str,
        /// Its τ.
        tau: u32,
        /// Its p.
        workers: u32,
        /// Its η.
        lr: f64,
        /// What failed.
        source: SimError,
    },
    /// The grid is empty or a setting is out of range.
    #[error("{0}")]
    Grid(String),
    /// Writing the output.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// Drawing the figure.
    #[error(transparent)]
    Plot(#[from] plot::PlotError),
}

impl Grid {
    /// The experiments, in the order they run (the baseline's last), each with its η.
    pub fn experiments(&self) -> Vec<(Experiment, f64)> {
        let mut out = Vec::new();
        for &algorithm in &self.algorithms {
            for &workers in &self.workers {
                for &tau in &self.taus {
                    let budget = if self.budget_per_worker {
                        self.budget_samples * u64::from(workers)
                    } else {
                        self.budget_samples
                    };
                    self.add(&mut out, algorithm, workers, tau, budget, false);
                }
            }
        }
        if let Some(b) = &self.baseline {
            // τ only sets how often it is scored: the first τ's chunks.
            let tau = self.taus.first().copied().unwrap_or(1);
            self.add(&mut out, b.algorithm, 1, tau, b.budget_samples, true);
        }
        out
    }

    /// One experiment per η and seed.
    fn add(
        &self,
        out: &mut Vec<(Experiment, f64)>,
        algorithm: Algorithm,
        workers: u32,
        tau: u32,
        budget_samples: u64,
        sequential: bool,
    ) {
        let lrs = if self.lrs.is_empty() {
            vec![RunSettings::defaults(algorithm).lr]
        } else {
            self.lrs.clone()
        };
        for &lr in &lrs {
            for &seed in &self.seeds {
                let mut settings = RunSettings::defaults(algorithm);
                settings.model = self.model.clone();
                settings.tau = tau;
                settings.expected_workers = workers;
                settings.batch = self.batch;
                settings.seed = seed;
                settings.lr = lr;
                if has_elastic_force(algorithm) {
                    settings.alpha = tether_server::config::DEFAULT_BETA / workers as f32;
                }
                let experiment = Experiment {
                    settings,
                    budget_samples,
                    evaluations: self.evaluations,
                    timing: self.timing.clone(),
                    norm_guard: self.norm_guard,
                    sequential,
                };
                out.push((experiment, lr));
            }
        }
    }
}

/// Runs every experiment of `grid`, `jobs` at a time, each on a thread of its own;
/// `progress` hears (samples done, samples in all). The report is the same for any
/// `jobs`: an experiment depends on its settings alone (see [`simulate`]).
pub fn run(
    grid: &Grid,
    train: &Arc<ImageSet>,
    test: &ImageSet,
    jobs: usize,
    progress: impl FnMut(u64, u64) + Send,
) -> Result<Report, ReproError> {
    let experiments = grid.experiments();
    if experiments.is_empty() {
        return Err(ReproError::Grid(
            "the grid is empty: give at least one of each".into(),
        ));
    }
    for (e, lr) in &experiments {
        e.validate().map_err(|source| failed(e, *lr, source))?;
    }
    let started = Instant::now();
    let total = experiments.iter().map(|(e, _)| e.budget_samples).sum();
    // The samples each experiment has done, and who hears their sum.
    let counted = Mutex::new((progress, vec![0u64; experiments.len()]));
    let results: Vec<OnceLock<Result<Simulated, ReproError>>> =
        experiments.iter().map(|_| OnceLock::new()).collect();
    let next = AtomicUsize::new(0);
    let failing = AtomicBool::new(false);
    std::thread::scope(|scope| {
        for _ in 0..jobs.clamp(1, experiments.len()) {
            scope.spawn(|| {
                while !failing.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((e, lr)) = experiments.get(i) else {
                        break;
                    };
                    let result = simulate::run(e, train, test, |n| {
                        let mut c = counted.lock().unwrap_or_else(|e| e.into_inner());
                        c.1[i] = n;
                        let done = c.1.iter().sum();
                        (c.0)(done, total);
                    })
                    .map_err(|source| failed(e, *lr, source));
                    // The first failure stops the grid: the others start nothing new.
                    failing.fetch_or(result.is_err(), Ordering::Relaxed);
                    let _ = results[i].set(result);
                }
            });
        }
    });
    let mut cells = Vec::with_capacity(experiments.len());
    for ((e, lr), result) in experiments.iter().zip(results) {
        let Some(result) = result.into_inner() else {
            continue; // not started: an earlier failure is returned below
        };
        let s = &e.settings;
        cells.push(Cell {
            algorithm: s.algorithm,
            sequential: e.sequential,
            tau: s.tau,
            workers: s.expected_workers,
            lr: *lr,
            seed: s.seed,
            result: result?,
        });
    }
    Ok(summarise(
        grid.clone(),
        cells,
        started.elapsed().as_secs_f64(),
    ))
}

fn failed(e: &Experiment, lr: f64, source: SimError) -> ReproError {
    let s = &e.settings;
    ReproError::Experiment {
        algorithm: s.algorithm.name(),
        tau: s.tau,
        workers: s.expected_workers,
        lr,
        source,
    }
}

/// The test error at parallel time `t`: that of the newest center at or before `t`.
/// Times within a relative 1e-9 of `t` count as at it: a budget that is the mean of
/// several seeds' equal final times can round just below them, and the table then
/// showed the evaluation before the last one.
pub fn error_at(points: &[Point], t: f64) -> f64 {
    let t = t + 1e-9 * t.abs();
    points
        .iter()
        .take_while(|p| p.time_s <= t)
        .last()
        .map_or(f64::NAN, |p| p.error)
}

/// When a run first reached `target` (`None`: never).
pub fn time_to(points: &[Point], target: f64) -> Option<f64> {
    points.iter().find(|p| p.error <= target).map(|p| p.time_s)
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    sum / n.max(1) as f64
}

fn final_point(cell: &Cell) -> Point {
    *cell
        .result
        .points
        .last()
        .expect("a run has its first point")
}

/// What a method is: runs that differ only in η and seed are one method.
fn method_of(c: &Cell) -> (Algorithm, bool, u32, u32) {
    (c.algorithm, c.sequential, c.tau, c.workers)
}

fn summarise(grid: Grid, cells: Vec<Cell>, wall_s: f64) -> Report {
    // The best η per method, by mean final error over seeds.
    let mut best: Vec<(f64, Vec<&Cell>)> = Vec::new();
    for c in &cells {
        let runs_at_lr: Vec<&Cell> = cells
            .iter()
            .filter(|o| method_of(o) == method_of(c) && o.lr == c.lr)
            .collect();
        let error = mean(runs_at_lr.iter().map(|o| final_point(o).error));
        match best.iter_mut().find(|b| method_of(b.1[0]) == method_of(c)) {
            Some(b) if error < mean(b.1.iter().map(|o| final_point(o).error)) => {
                *b = (c.lr, runs_at_lr);
            }
            Some(_) => {}
            None => best.push((c.lr, runs_at_lr)),
        }
    }
    let final_error = |runs: &[&Cell]| mean(runs.iter().map(|c| final_point(c).error));
    let final_time = |runs: &[&Cell]| mean(runs.iter().map(|c| final_point(c).time_s));
    let longest = best
        .iter()
        .map(|(_, runs)| final_time(runs))
        .fold(0.0, f64::max);
    let budgets_s = vec![longest / 4.0, longest / 2.0, longest];
    let baseline = best.iter().find(|(_, runs)| runs[0].sequential);
    let target_error = match (grid.target_error, baseline) {
        (Some(t), _) => t,
        (None, Some((_, runs))) => final_error(runs),
        (None, None) => {
            let mut finals: Vec<f64> = best.iter().map(|(_, runs)| final_error(runs)).collect();
            finals.sort_by(f64::total_cmp);
            finals[(finals.len() - 1) / 2]
        }
    };
    let baseline_time = baseline
        .filter(|_| grid.target_error.is_none())
        .map(|(_, runs)| final_time(runs));
    let best = best
        .iter()
        .map(|(lr, runs)| {
            let times: Vec<Option<f64>> = runs
                .iter()
                .map(|c| time_to(&c.result.points, target_error))
                .collect();
            let time_to_target_s = times
                .iter()
                .all(Option::is_some)
                .then(|| mean(times.iter().flatten().copied()));
            let first = runs[0];
            Best {
                algorithm: first.algorithm,
                sequential: first.sequential,
                tau: first.tau,
                workers: first.workers,
                lr: *lr,
                final_error: final_error(runs),
                error_at: budgets_s
                    .iter()
                    .map(|&t| mean(runs.iter().map(|c| error_at(&c.result.points, t))))
                    .collect(),
                time_to_target_s,
                time_s: final_time(runs),
                of_baseline_time: baseline_time
                    .zip(time_to_target_s)
                    .map(|(whole, t)| t / whole),
                refused: runs.iter().map(|c| c.result.rejected).sum(),
            }
        })
        .collect();
    Report {
        grid,
        cells,
        best,
        budgets_s,
        target_error,
        wall_s,
    }
}

impl Best {
    /// What the tables and legends call it: the algorithm, or for the baseline its
    /// local optimizer alone (MSGD, SGD).
    pub fn method(&self) -> &'static str {
        if !self.sequential {
            self.algorithm.name()
        } else if RunSettings::defaults(self.algorithm).local_momentum() > 0.0 {
            "msgd"
        } else {
            "sgd"
        }
    }
}

impl Report {
    /// The summary table as Markdown.
    pub fn markdown(&self) -> String {
        let g = &self.grid;
        let mut md = format!(
            "### {}\n\n{} model, batch {}, {} training images per {}, seeds {:?}; one local \
             step = {:.1} ms of parallel time, one exchange = {:.1} ms; η {} per method \
             (lowest mean final error). Errors are the center's, on {} test images; time is \
             parallel time. Grid wall time on this machine: {:.0} s.\n\n",
            g.title,
            g.model.name(),
            g.batch,
            g.budget_samples,
            if g.budget_per_worker { "worker" } else { "run" },
            g.seeds,
            g.timing.step_s * 1e3,
            g.timing.exchange_s * 1e3,
            if g.lrs.is_empty() {
                "at each algorithm's default".to_string()
            } else {
                format!("best of {:?}", g.lrs)
            },
            self.test_images(),
            self.wall_s,
        );
        if let Some(line) = crate::exchanges::warning(&g.thin_cells()) {
            md.push_str(&format!("**Note.** {line}\n\n"));
        }
        let baseline = self.best.iter().find(|b| b.sequential);
        if let Some(b) = baseline {
            md.push_str(&format!(
                "The baseline ({}) is one worker alone on {} training images; {}\n\n",
                b.method().to_uppercase(),
                g.baseline.as_ref().map_or(0, |b| b.budget_samples),
                if g.target_error.is_none() {
                    "the target is its final error, and \"÷ baseline\" is the time to it \
                     as a fraction of the baseline's final time."
                } else {
                    "the target was given."
                },
            ));
        }
        let relative = baseline.is_some() && g.target_error.is_none();
        md.push_str(&format!(
            "| method | τ | p | η | error at {:.1} s | at {:.1} s | at {:.1} s | final error | time to {:.1} % |{} final time | refused |\n",
            self.budgets_s[0],
            self.budgets_s[1],
            self.budgets_s[2],
            self.target_error * 100.0,
            if relative { " ÷ baseline |" } else { "" },
        ));
        md.push_str(if relative {
            "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
        } else {
            "|---|---|---|---|---|---|---|---|---|---|---|\n"
        });
        for b in &self.best {
            let of_baseline = match (relative, b.of_baseline_time) {
                (false, _) => String::new(),
                (true, Some(f)) => format!(" {:.0} % |", f * 100.0),
                (true, None) => " – |".into(),
            };
            md.push_str(&format!(
                "| {} | {} | {} | {} | {:.2} % | {:.2} % | {:.2} % | {:.2} % | {} |{of_baseline} {:.1} s | {} |\n",
                b.method(),
                if b.sequential { "–".to_string() } else { b.tau.to_string() },
                b.workers,
                b.lr,
                b.error_at[0] * 100.0,
                b.error_at[1] * 100.0,
                b.error_at[2] * 100.0,
                b.final_error * 100.0,
                b.time_to_target_s
                    .map_or("not reached".to_string(), |t| format!("{t:.1} s")),
                b.time_s,
                b.refused
            ));
        }
        md
    }

    fn test_images(&self) -> String {
        self.cells
            .first()
            .map_or("?".into(), |c| c.result.test_images.to_string())
    }

    /// The figure: test error against parallel time, the best η per method, the
    /// first seed's curve.
    pub fn figure(&self) -> Figure {
        let g = &self.grid;
        let curve = |b: &Best| -> Vec<(f64, f64)> {
            self.cells
                .iter()
                .find(|c| {
                    method_of(c) == (b.algorithm, b.sequential, b.tau, b.workers) && c.lr == b.lr
                })
                .map(|c| {
                    c.result
                        .points
                        .iter()
                        .map(|p| (p.time_s, p.error * 100.0))
                        .collect()
                })
                .unwrap_or_default()
        };
        let label = |b: &Best, with_p: bool, with_tau: bool| {
            let mut l = b.method().to_uppercase();
            if b.sequential {
                l.push_str(" alone");
            } else if with_p {
                l.push_str(&format!(" p={}", b.workers));
            }
            if with_tau && !b.sequential {
                l.push_str(&format!(" τ={}", b.tau));
            }
            l.push_str(&format!(" (η {})", b.lr));
            l
        };
        // The single worker is the reference line in every panel.
        let baseline = self.best.iter().find(|b| b.sequential).map(|b| Series {
            label: label(b, false, false),
            points: curve(b),
        });
        let panels = match g.panel_by {
            PanelBy::Tau => g
                .taus
                .iter()
                .map(|&tau| Panel {
                    title: format!("τ = {tau}"),
                    series: self
                        .best
                        .iter()
                        .filter(|b| b.tau == tau && !b.sequential)
                        .map(|b| Series {
                            label: label(b, g.workers.len() > 1, false),
                            points: curve(b),
                        })
                        .chain(baseline.clone())
                        .collect(),
                })
                .collect(),
            PanelBy::Algorithm => g
                .algorithms
                .iter()
                .map(|&a| Panel {
                    title: a.name().to_uppercase(),
                    series: self
                        .best
                        .iter()
                        .filter(|b| b.algorithm == a && !b.sequential)
                        .map(|b| Series {
                            label: label(b, true, g.taus.len() > 1),
                            points: curve(b),
                        })
                        .chain(baseline.clone())
                        .collect(),
                })
                .collect(),
        };
        Figure {
            title: format!(
                "{} — {} model, {}",
                g.title,
                g.model.name(),
                if g.lrs.is_empty() {
                    "each algorithm's default η".to_string()
                } else {
                    format!("best η of {:?} per method", g.lrs)
                }
            ),
            x_label: "parallel time (s)".into(),
            y_label: "test error (%)".into(),
            columns: 2,
            panels,
        }
    }

    /// Writes `name`.json, `name`.md and the figure (`name`.png, `name`.svg) to `dir`;
    /// returns the paths.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>, ReproError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ReproError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let stem = dir.join(&self.grid.name);
        let json = stem.with_extension("json");
        let md = stem.with_extension("md");
        let body = serde_json::to_vec_pretty(self).expect("a report serialises");
        std::fs::write(&json, body).map_err(io(&json))?;
        std::fs::write(&md, self.markdown()).map_err(io(&md))?;
        plot::draw(&self.figure(), &stem)?;
        Ok(vec![
            json,
            md,
            stem.with_extension("png"),
            stem.with_extension("svg"),
        ])
    }
}

/// Seconds one local step of `model` at `batch` takes here: the mean of 8 steps
/// after 2 to warm up, by one worker on its shard of `train`.
pub fn measure_step_s(model: &Model, batch: u32, train: &Arc<ImageSet>) -> f64 {
    let mut settings = RunSettings::defaults(Algorithm::Easgd);
    settings.model = model.clone();
    settings.batch = batch;
    let device = Device::flex();
    let spec = settings.spec(
        "calibration".into(),
        Normalization::of(train),
        train.len() as u64,
    );
    let mut local = LocalWorker::new(device.clone());
    let shard = Shard {
        index: 0,
        count: 1,
        seed: 0,
    };
    let data = ShardData {
        set: train.clone(),
        indices: shard_indices(train.len(), 1, 0, 0),
    };
    let start = to_flat(&model.init(&device));
    if local
        .start(&spec, shard, data, train.len() as u64, start, false)
        .is_err()
    {
        return f64::NAN;
    }
    let mut steps = |n| {
        let pending = local.train(n, settings.lr, || false).ok();
        pending.map(|p| local.finish(p))
    };
    steps(2);
    let t0 = Instant::now();
    steps(8);
    t0.elapsed().as_secs_f64() / 8.0
}

/// Seconds an exchange of `model`'s f32 parameters takes both ways over a 1 Gbit/s
/// link with 1 ms of latency: the default exchange time.
pub fn gigabit_exchange_s(model: &Model) -> f64 {
    2.0 * (model.param_count() * 4 * 8) as f64 / 1e9 + 1e-3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_at_a_mean_of_equal_final_times_is_the_final_error() {
        let point = |time_s, error| Point {
            samples: 0,
            time_s,
            exchanges: 0,
            error,
            loss: 0.0,
        };
        // Three seeds' final time; their mean rounds below it (seen in a grid).
        let end = 59.135_999_999_999_78;
        let budget = mean([end, end, end].into_iter());
        assert!(budget < end, "the rounding this guards against");
        let points = [point(0.0, 0.9), point(56.6, 0.104), point(end, 0.1005)];
        assert_eq!(error_at(&points, budget), 0.1005);
        assert_eq!(error_at(&points, 56.0), 0.9);
        assert!(error_at(&points, -1.0).is_nan());
    }
}
