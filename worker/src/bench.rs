//! Benchmarks behind `tether bench`: training throughput against the machine's sgemm
//! ceiling and the PyTorch peer, and the elastic kernel against memcpy. Each figure
//! is printed next to a baseline measured in the same run.

use std::hint::black_box;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use burn::module::Module;
use burn::nn::loss::CrossEntropyLoss;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Distribution, Int, Tensor, TensorData};
use serde::Serialize;
use tether_shared::algorithms::elastic;
use tether_shared::data::{Batch, BatchSource, BatchStream, Batcher, ImageSet, Normalization};
use tether_shared::model::Model;
use tether_shared::model::flat::load_module;
use tether_shared::model::reference::{PaperCnnConfig, SmallCnnConfig};
use tether_shared::rng::SplitMix64;
use tether_shared::train::{LocalOptimizer, Trainer};

use crate::prefetch::Prefetch;

/// Training throughput of one model.
#[derive(Clone, Debug, Serialize)]
pub struct TrainBench {
    /// Which network.
    pub model: Model,
    /// Images per step.
    pub batch: usize,
    /// Median samples/s over the repeats.
    pub samples_per_s: f64,
    /// Every repeat's samples/s.
    pub runs: Vec<f64>,
    /// Achieved training FLOP/s (3 × forward FLOPs per sample), in GFLOP/s.
    pub gflops: f64,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// One training step on a batch, returning its loss (detached).
type Step = Box<dyn FnMut(Batch) -> Tensor<1>>;

/// Times `steps` training steps (after `warmup` untimed ones) on real batches,
/// `repeats` times from a fresh network, as the peer's bench.py does. Batches come
/// the way a worker's do: shuffled, prepared ahead on their own thread. With
/// `reference`, the hand-written network of the same name (small, paper, cifar) is
/// timed too, alternating with the description-built one repeat by repeat, so both
/// see the same machine.
#[allow(clippy::too_many_arguments)] // each is one documented bench setting
pub fn train_throughput(
    kind: &Model,
    device: &Device,
    train: Arc<ImageSet>,
    batch: usize,
    warmup: usize,
    steps: usize,
    repeats: usize,
    reference: bool,
) -> (TrainBench, Option<TrainBench>) {
    let norm = Normalization::of(&train);
    let batcher = Batcher::new((0..train.len()).collect(), batch, 0, &norm)
        .with_input(kind.input_shape())
        .with_flip(kind.spec().flip);
    let time = |mut step: Step| {
        let mut batches = Prefetch::spawn(BatchStream::new(batcher.clone(), train.clone(), 0));
        for _ in 0..warmup {
            let _: f32 = step(batches.next_batch()).into_scalar();
        }
        let t0 = Instant::now();
        let mut last = None;
        for _ in 0..steps {
            last = Some(step(batches.next_batch()));
        }
        // Reading the last loss waits for all queued work (matters on GPUs).
        if let Some(loss) = last {
            let _: f32 = loss.into_scalar();
        }
        (steps * batch) as f64 / t0.elapsed().as_secs_f64()
    };
    let with_reference = reference && reference_step(kind, device).is_some();
    let (mut runs, mut reference_runs) = (Vec::new(), Vec::new());
    for _ in 0..repeats.max(1) {
        let mut trainer = Trainer::new(kind, LocalOptimizer::default(), device);
        runs.push(time(Box::new(move |b| trainer.step(b))));
        if let Some(step) = reference_step(kind, device).filter(|_| with_reference) {
            reference_runs.push(time(step));
        }
    }
    let bench = |runs: Vec<f64>| summary(kind, batch, runs);
    (bench(runs), with_reference.then(|| bench(reference_runs)))
}

/// A training step of the hand-written network called `kind`'s name, if there is one.
fn reference_step(kind: &Model, device: &Device) -> Option<Step> {
    if Model::shipped(kind.name()).as_ref() != Some(kind) {
        return None; // a network of the user's own that shares a shipped name
    }
    let device = device.clone().autodiff();
    let input = kind.input_shape();
    let [c, h, _] = input;
    let flat = kind.seeded_params(0);
    match kind.name() {
        "small" => {
            let net = SmallCnnConfig::new().init(&device);
            let net = load_module(net, &flat).expect("same network");
            Some(reference_loop(net, device, input, |m, x, _| m.forward(x)))
        }
        "paper" | "cifar" => {
            let net = PaperCnnConfig::new()
                .with_channels(c)
                .with_side(h)
                .init(&device);
            let net = load_module(net, &flat).expect("same network");
            Some(reference_loop(net, device, input, |m, x, masks| {
                m.forward_train(x, masks)
            }))
        }
        _ => None,
    }
}

/// The explicit Burn step `Trainer::step` runs, over a hand-written module.
fn reference_loop<M>(
    net: M,
    device: Device,
    input: [usize; 3],
    forward: impl Fn(&M, Tensor<4>, &mut SplitMix64) -> Tensor<2> + 'static,
) -> Step
where
    M: Module + 'static,
{
    let settings = LocalOptimizer::default();
    let mut optim = settings.optimizer();
    let loss = CrossEntropyLoss::new(None, &device);
    let mut masks = SplitMix64::new(0);
    let mut net = Some(net);
    Box::new(move |batch: Batch| {
        let n = batch.len();
        let [c, h, w] = input;
        let x = Tensor::<4>::from_data(TensorData::new(batch.images, [n, c, h, w]), &device);
        let y = Tensor::<1, Int>::from_data(TensorData::new(batch.labels, [n]), &device);
        let m = net.take().expect("a network between steps");
        let l = loss.forward(forward(&m, x, &mut masks), y);
        let grads = GradientsParams::from_grads(l.backward(), &m);
        net = Some(optim.step(settings.lr, m, grads));
        l.detach()
    })
}

fn summary(kind: &Model, batch: usize, runs: Vec<f64>) -> TrainBench {
    let samples_per_s = median(&mut runs.clone());
    let gflops = samples_per_s * 3.0 * kind.forward_flops_per_sample() as f64 / 1e9;
    TrainBench {
        model: kind.clone(),
        batch,
        samples_per_s,
        runs,
        gflops,
    }
}

/// The backend's own sgemm speed on n×n matrices, in GFLOP/s (median of `repeats`):
/// the ceiling a convolution lowered to matrix products can approach.
pub fn sgemm_gflops(device: &Device, n: usize, repeats: usize) -> f64 {
    let a = Tensor::<2>::random([n, n], Distribution::Default, device);
    let b = Tensor::<2>::random([n, n], Distribution::Default, device);
    let _: f32 = a.clone().matmul(b.clone()).sum().into_scalar(); // warm-up
    let mut runs: Vec<f64> = (0..repeats.max(1))
        .map(|_| {
            let t0 = Instant::now();
            let _: f32 = a.clone().matmul(b.clone()).sum().into_scalar();
            2.0 * (n as f64).powi(3) / t0.elapsed().as_secs_f64() / 1e9
        })
        .collect();
    median(&mut runs)
}

/// This machine's peak f32 FMA rate in GFLOP/s on `threads` cores at once, with
/// the widest vectors its convolution kernel uses (a register-only loop per core;
/// the best of `repeats`): the honest ceiling for a model's GFLOP/s.
pub fn peak_fma_gflops(threads: usize, repeats: usize) -> f64 {
    const ROUNDS: u64 = 20_000_000;
    let _ = tether_shared::model::ops::fma_burst(1_000); // warm-up (and the kernel choice)
    (0..repeats.max(1))
        .map(|_| {
            let t0 = Instant::now();
            let flops: f64 = std::thread::scope(|scope| {
                let runs: Vec<_> = (0..threads.max(1))
                    .map(|_| scope.spawn(|| tether_shared::model::ops::fma_burst(ROUNDS)))
                    .collect();
                runs.into_iter()
                    .map(|run| {
                        let (flops, sum) = run.join().expect("the FMA loop does not panic");
                        std::hint::black_box(sum);
                        flops
                    })
                    .sum()
            });
            flops / t0.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
}

/// The PyTorch peer's samples/s for `model` (its bench.py, median of 3), or why not.
pub fn peer_throughput(
    python: &str,
    script: &Path,
    model: &Model,
    threads: usize,
    batch: usize,
) -> Result<f64, String> {
    // Absolute, since the script runs from its own folder (for its imports).
    let script = match script.canonicalize() {
        Ok(path) if path.is_file() => path,
        _ => return Err(format!("peer script {} not found", script.display())),
    };
    let script = script.as_path();
    let report = std::env::temp_dir().join(format!(
        "tether-peer-{}-{}.json",
        model.name(),
        std::process::id()
    ));
    let out = Command::new(python)
        .arg(script)
        .args([
            "--model",
            model.name(),
            "--threads",
            &threads.to_string(),
            "--batch",
            &batch.to_string(),
        ])
        .arg("--report")
        .arg(&report)
        .current_dir(script.parent().unwrap_or(Path::new(".")))
        .output()
        .map_err(|e| format!("cannot run {python}: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "{python} {} failed: {}",
            script.display(),
            err.lines().last().unwrap_or("")
        ));
    }
    let text = std::fs::read_to_string(&report).map_err(|e| format!("peer report: {e}"))?;
    let _ = std::fs::remove_file(&report);
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("peer report: {e}"))?;
    json["results"][0]["samples_per_s_median"]
        .as_f64()
        .ok_or_else(|| "peer report lacks samples_per_s_median".into())
}

/// Elastic kernel bandwidth against memcpy of the same vectors.
#[derive(Clone, Debug, Serialize)]
pub struct ElasticBench {
    /// Vector length (f32 values).
    pub len: usize,
    /// `elastic::center_pull` (the server's half of an async exchange: reads x̃ and
    /// xⁱ, writes x̃ and d), in GB/s of bytes read + written.
    pub center_pull_gbps: f64,
    /// `elastic::apply_difference` (the worker's half: reads xⁱ and d, writes xⁱ).
    pub apply_difference_gbps: f64,
    /// `copy_from_slice` of one vector (reads n, writes n), GB/s of bytes read + written.
    pub memcpy_gbps: f64,
    /// center_pull / memcpy.
    pub center_pull_ratio: f64,
    /// apply_difference / memcpy.
    pub apply_difference_ratio: f64,
}

/// Measures the elastic kernels and memcpy on vectors of `len` f32, interleaved
/// (kernel, copy, kernel, copy, ...) so that machine noise hits both alike; medians
/// of `repeats` timings of `iters` calls each.
pub fn elastic_bandwidth(len: usize, iters: usize, repeats: usize) -> ElasticBench {
    let mut center: Vec<f32> = (0..len).map(|i| (i % 97) as f32 * 0.01).collect();
    let worker: Vec<f32> = (0..len).map(|i| (i % 89) as f32 * 0.01).collect();
    let mut diff = vec![0.0f32; len];
    let mut local = worker.clone();
    let mut dst = vec![0.0f32; len];
    let bytes = (len * 4) as f64;
    let time = |f: &mut dyn FnMut()| {
        f(); // warm the caches and page in
        let t0 = Instant::now();
        for _ in 0..iters {
            f();
        }
        t0.elapsed().as_secs_f64() / iters as f64
    };
    let (mut pull, mut apply, mut copy) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..repeats.max(1) {
        // A tiny α keeps the values bounded however many times the kernel runs.
        let t = time(&mut || {
            elastic::center_pull(black_box(&mut center), black_box(&worker), 1e-7, &mut diff)
        });
        pull.push(4.0 * bytes / t / 1e9);
        let t = time(&mut || dst.copy_from_slice(black_box(&worker)));
        copy.push(2.0 * bytes / t / 1e9);
        let t = time(&mut || elastic::apply_difference(black_box(&mut local), black_box(&diff)));
        apply.push(3.0 * bytes / t / 1e9);
    }
    black_box((&center, &dst, &local));
    let (p, a, c) = (median(&mut pull), median(&mut apply), median(&mut copy));
    ElasticBench {
        len,
        center_pull_gbps: p,
        apply_difference_gbps: a,
        memcpy_gbps: c,
        center_pull_ratio: p / c,
        apply_difference_ratio: a / c,
    }
}
