//! 2-D convolution (stride 1, square kernel, zero padding) that stays in NCHW. Two
//! ways to compute it: directly from padded images where the CPU has AVX2 and FMA
//! (`direct.rs`), else each image's forward pass, weight gradient and input gradient
//! as one GEMM against its im2col matrix (here). Images are split over the rayon
//! pool; each task keeps its own scratch and weight-gradient accumulator, so there
//! is no locking.

use std::sync::OnceLock;

use rayon::prelude::*;

use super::direct;
use super::gemm::{Mat, sgemm};
use super::tile::Kernel;
use crate::rng::SplitMix64;

/// Rayon tasks per thread for one convolution's images.
const TASKS_PER_THREAD: usize = 4;

/// The shape of one convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ConvShape {
    pub batch: usize,
    pub cin: usize,
    pub cout: usize,
    pub height: usize,
    pub width: usize,
    pub kernel: usize,
    pub pad: usize,
}

impl ConvShape {
    /// Output rows and columns.
    pub fn out_hw(&self) -> (usize, usize) {
        (
            self.height + 2 * self.pad + 1 - self.kernel,
            self.width + 2 * self.pad + 1 - self.kernel,
        )
    }
    pub(super) fn image_in(&self) -> usize {
        self.cin * self.height * self.width
    }
    pub(super) fn image_out(&self) -> usize {
        let (ho, wo) = self.out_hw();
        self.cout * ho * wo
    }
    /// Rows of the im2col matrix (the GEMM's inner dimension).
    fn taps(&self) -> usize {
        self.cin * self.kernel * self.kernel
    }
    /// Images per rayon task: a few tasks per thread, so a thread that the machine
    /// slows down (a busy core, a noisy neighbour) does not hold the others up.
    pub(super) fn group(&self) -> usize {
        self.batch
            .div_ceil(TASKS_PER_THREAD * rayon::current_num_threads().max(1))
            .max(1)
    }
}

/// For one output row `oy` and one kernel tap (ky, kx): the input row, and the
/// output columns `[lo, hi)` whose input column `ox + kx - pad` lies inside the image.
fn tap_span(s: &ConvShape, oy: usize, ky: usize, kx: usize) -> Option<(usize, usize, usize)> {
    let (_, wo) = s.out_hw();
    let iy = (oy + ky).checked_sub(s.pad).filter(|&iy| iy < s.height)?;
    let lo = s.pad.saturating_sub(kx);
    let hi = (s.width + s.pad).saturating_sub(kx).min(wo);
    (lo < hi).then_some((iy, lo, hi))
}

/// im2col of one image: `col[(ci·k + ky)·k + kx][oy·wo + ox] = x[ci][oy+ky−p][ox+kx−p]`.
fn im2col(s: &ConvShape, x: &[f32], col: &mut [f32]) {
    let (ho, wo) = s.out_hw();
    let k = s.kernel;
    for (row, dst) in col.chunks_exact_mut(ho * wo).enumerate() {
        let (ci, ky, kx) = (row / (k * k), row / k % k, row % k);
        let plane = &x[ci * s.height * s.width..][..s.height * s.width];
        for oy in 0..ho {
            let out = &mut dst[oy * wo..][..wo];
            match tap_span(s, oy, ky, kx) {
                Some((iy, lo, hi)) => {
                    out[..lo].fill(0.0);
                    let src = iy * s.width + lo + kx - s.pad;
                    out[lo..hi].copy_from_slice(&plane[src..src + hi - lo]);
                    out[hi..].fill(0.0);
                }
                None => out.fill(0.0),
            }
        }
    }
}

/// The adjoint of [`im2col`]: adds each column entry back onto the pixel it came from.
fn col2im_add(s: &ConvShape, col: &[f32], dx: &mut [f32]) {
    let (ho, wo) = s.out_hw();
    let k = s.kernel;
    for (row, src) in col.chunks_exact(ho * wo).enumerate() {
        let (ci, ky, kx) = (row / (k * k), row / k % k, row % k);
        let plane = &mut dx[ci * s.height * s.width..][..s.height * s.width];
        for oy in 0..ho {
            if let Some((iy, lo, hi)) = tap_span(s, oy, ky, kx) {
                let dst = iy * s.width + lo + kx - s.pad;
                for (d, v) in plane[dst..dst + hi - lo]
                    .iter_mut()
                    .zip(&src[oy * wo + lo..oy * wo + hi])
                {
                    *d += v;
                }
            }
        }
    }
}

/// The path [`Path::chosen`] settled on, once.
static CHOSEN: OnceLock<(Path, f32)> = OnceLock::new();
/// The path a benchmark asked for instead of the detected one ([`choose`]).
static PREFERRED: OnceLock<Path> = OnceLock::new();

/// Makes every CPU convolution of this process take `name`'s path: a tile kernel
/// ("avx512", "avx2", "portable") or im2col + GEMM ("gemm"), instead of the fastest
/// this CPU has; for benchmarks that compare kernels on one machine. Returns its
/// name in words. It still has to pass the agreement check, and must come before
/// the first convolution.
pub fn choose(name: &str) -> Result<&'static str, String> {
    let kernels = Kernel::available();
    let path = match name {
        "gemm" => Path::Gemm,
        _ => {
            let kernel = kernels
                .iter()
                .copied()
                .find(|&k| Path::Direct(k).short_name() == name)
                .ok_or_else(|| {
                    let have: Vec<_> = kernels
                        .iter()
                        .map(|&k| Path::Direct(k).short_name())
                        .collect();
                    format!(
                        "no {name:?} convolution on this CPU (it runs: {}, gemm)",
                        have.join(", ")
                    )
                })?;
            Path::Direct(kernel)
        }
    };
    if PREFERRED.set(path).is_err() || CHOSEN.get().is_some_and(|(p, _)| *p != path) {
        return Err("the convolution path is chosen once, before the first convolution".into());
    }
    Ok(path.name())
}

/// How convolutions run on this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Path {
    /// `direct.rs` with this tile kernel.
    Direct(Kernel),
    /// im2col + GEMM.
    Gemm,
}

impl Path {
    /// Direct where the CPU has a SIMD tile kernel; else GEMM, whose kernels cover
    /// more targets (wasm's SIMD128 among them).
    pub fn detect() -> Self {
        match Kernel::detect() {
            Kernel::Portable => Self::Gemm,
            kernel => Self::Direct(kernel),
        }
    }

    /// The path every convolution here takes, chosen once per process: the
    /// [`detect`](Self::detect)ed one if it agrees with im2col + GEMM on test
    /// convolutions run on this very machine (a kernel that computes wrongly here,
    /// say under a browser engine's bug, must not train), else GEMM. The second
    /// value is the worst disagreement seen.
    pub fn chosen() -> (Self, f32) {
        *CHOSEN.get_or_init(|| {
            let path = PREFERRED.get().copied().unwrap_or_else(Self::detect);
            let worst = disagreement(path, &CHECKS, 0x7e57);
            (if worst <= 1e-4 { path } else { Self::Gemm }, worst)
        })
    }

    /// The name [`choose`] takes.
    fn short_name(self) -> &'static str {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Direct(Kernel::Avx512) => "avx512",
            #[cfg(target_arch = "x86_64")]
            Self::Direct(Kernel::Avx2Fma) => "avx2",
            #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
            Self::Direct(Kernel::Simd128) => "simd128",
            Self::Direct(Kernel::Portable) => "portable",
            Self::Gemm => "gemm",
        }
    }

    /// In words, for device descriptions.
    pub fn name(self) -> &'static str {
        match self {
            #[cfg(target_arch = "x86_64")]
            Self::Direct(Kernel::Avx512) => "direct conv (AVX-512)",
            #[cfg(target_arch = "x86_64")]
            Self::Direct(Kernel::Avx2Fma) => "direct conv (AVX2+FMA)",
            #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
            Self::Direct(Kernel::Simd128) => super::tile::simd128::NAME,
            Self::Direct(Kernel::Portable) => "direct conv (portable)",
            Self::Gemm => "im2col+GEMM conv",
        }
    }
}

/// A convolution to check: (batch, cin, cout, height, width, kernel, pad).
type Case = (usize, usize, usize, usize, usize, usize, usize);

/// What [`Path::chosen`] checks on: channel blocks with tails, pixel tiles with
/// tails, padding.
const CHECKS: [Case; 2] = [(2, 3, 17, 5, 7, 3, 2), (1, 5, 20, 6, 6, 5, 2)];

/// The worst relative difference between `path` and im2col + GEMM over the outputs
/// and gradients (the weight gradient also without the input's) of `cases`, on
/// pseudo-random values from `seed`. A NaN counts as the worst possible.
fn disagreement(path: Path, cases: &[Case], seed: u64) -> f32 {
    let mut rng = SplitMix64::new(seed);
    let mut values = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0)
            .collect()
    };
    let worst = |got: &[f32], want: &[f32]| -> f32 {
        if got.len() != want.len() {
            return f32::INFINITY;
        }
        got.iter()
            .zip(want)
            .map(|(a, b)| {
                let d = (a - b).abs() / b.abs().max(1.0);
                if d.is_nan() { f32::INFINITY } else { d }
            })
            .fold(0.0, f32::max)
    };
    let mut max = 0.0f32;
    for &(batch, cin, cout, height, width, kernel, pad) in cases {
        let s = ConvShape {
            batch,
            cin,
            cout,
            height,
            width,
            kernel,
            pad,
        };
        let x = values(batch * s.image_in());
        let w = values(cout * s.taps());
        let b = values(cout);
        let dy = values(batch * s.image_out());
        let y = forward(&s, path, &x, &w, &b);
        let (dx, dw, db) = backward(&s, path, &x, &w, &dy, true);
        let (no_dx, dw_alone, _) = backward(&s, path, &x, &w, &dy, false);
        let (gdx, gdw, gdb) = backward_gemm(&s, &x, &w, &dy, true);
        max = max
            .max(worst(&y, &forward_gemm(&s, &x, &w, &b)))
            .max(worst(&dx.unwrap_or_default(), &gdx.unwrap_or_default()))
            .max(worst(&dw, &gdw))
            .max(worst(&dw_alone, &gdw))
            .max(worst(&db, &gdb))
            .max(if no_dx.is_some() { f32::INFINITY } else { 0.0 });
    }
    max
}

/// Below this many taps (`cin · k²`) a forward pass goes through im2col + GEMM on
/// every path: the direct tile then does at most 15 multiply-adds a channel per
/// pixel and spends its time transposing the tile into the output (a first layer
/// on grey images, 1 × 3 × 3; the loss screen's judgement: BENCHMARKS.md, #26).
const FEW_TAPS: usize = 16;

/// `y = conv(x, w) + b` for `x` [N, Cin, H, W], `w` [Cout, Cin, k, k], `b` [Cout].
pub(crate) fn forward(s: &ConvShape, path: Path, x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
    match path {
        Path::Direct(kernel) if s.taps() >= FEW_TAPS => direct::forward(s, kernel, x, w, b),
        _ => forward_gemm(s, x, w, b),
    }
}

/// Gradients of [`forward`] given `dy` [N, Cout, Ho, Wo]: `(dx, dw, db)`, with `dx`
/// only when asked for (the first layer's input needs none).
pub(crate) fn backward(
    s: &ConvShape,
    path: Path,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    want_dx: bool,
) -> (Option<Vec<f32>>, Vec<f32>, Vec<f32>) {
    match path {
        Path::Direct(kernel) => direct::backward(s, kernel, x, w, dy, want_dx),
        Path::Gemm => backward_gemm(s, x, w, dy, want_dx),
    }
}

fn forward_gemm(s: &ConvShape, x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
    let (ho, wo) = s.out_hw();
    let (hw, taps, group) = (ho * wo, s.taps(), s.group());
    assert_eq!(x.len(), s.batch * s.image_in(), "input has the wrong size");
    assert_eq!(w.len(), s.cout * taps, "weight has the wrong size");
    assert_eq!(b.len(), s.cout, "bias has the wrong size");
    let mut y = vec![0.0; s.batch * s.image_out()];
    let weight = Mat::rows(w, s.cout, taps);
    y.par_chunks_mut(group * s.image_out())
        .zip(x.par_chunks(group * s.image_in()))
        .for_each(|(ys, xs)| {
            let mut col = vec![0.0; taps * hw];
            for (yn, xn) in ys
                .chunks_exact_mut(s.image_out())
                .zip(xs.chunks_exact(s.image_in()))
            {
                im2col(s, xn, &mut col);
                for (plane, &bias) in yn.chunks_exact_mut(hw).zip(b) {
                    plane.fill(bias);
                }
                sgemm(weight, Mat::rows(&col, taps, hw), yn, true);
            }
        });
    y
}

fn backward_gemm(
    s: &ConvShape,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    want_dx: bool,
) -> (Option<Vec<f32>>, Vec<f32>, Vec<f32>) {
    let (ho, wo) = s.out_hw();
    let (hw, taps, group) = (ho * wo, s.taps(), s.group());
    assert_eq!(x.len(), s.batch * s.image_in(), "input has the wrong size");
    assert_eq!(
        dy.len(),
        s.batch * s.image_out(),
        "output gradient has the wrong size"
    );
    let weight = Mat::rows(w, s.cout, taps);
    // One group of images: its share of dw and db, and its images' dx when wanted.
    let work = |g: usize, mut dx: Option<&mut [f32]>| {
        let images = (g * group..((g + 1) * group).min(s.batch)).enumerate();
        let mut col = vec![0.0; taps * hw];
        let mut dcol = if dx.is_some() {
            vec![0.0; taps * hw]
        } else {
            Vec::new()
        };
        let mut dw = vec![0.0; s.cout * taps];
        let mut db = vec![0.0; s.cout];
        for (i, n) in images {
            let xn = &x[n * s.image_in()..][..s.image_in()];
            let dyn_ = &dy[n * s.image_out()..][..s.image_out()];
            im2col(s, xn, &mut col);
            // dw += dyₙ · colₙᵀ
            sgemm(
                Mat::rows(dyn_, s.cout, hw),
                Mat::rows(&col, taps, hw).t(),
                &mut dw,
                true,
            );
            for (d, plane) in db.iter_mut().zip(dyn_.chunks_exact(hw)) {
                *d += plane.iter().sum::<f32>();
            }
            if let Some(dx) = dx.as_deref_mut() {
                // dcolₙ = wᵀ · dyₙ, folded back onto the image.
                sgemm(weight.t(), Mat::rows(dyn_, s.cout, hw), &mut dcol, false);
                col2im_add(s, &dcol, &mut dx[i * s.image_in()..][..s.image_in()]);
            }
        }
        (dw, db)
    };
    let groups = s.batch.div_ceil(group);
    let mut dx = want_dx.then(|| vec![0.0; s.batch * s.image_in()]);
    let parts: Vec<(Vec<f32>, Vec<f32>)> = match dx.as_mut() {
        Some(dx) => dx
            .par_chunks_mut(group * s.image_in())
            .enumerate()
            .map(|(g, dxg)| work(g, Some(dxg)))
            .collect(),
        None => (0..groups).into_par_iter().map(|g| work(g, None)).collect(),
    };
    let mut parts = parts.into_iter();
    let (mut dw, mut db) = parts
        .next()
        .unwrap_or_else(|| (vec![0.0; s.cout * taps], vec![0.0; s.cout]));
    for (pw, pb) in parts {
        dw.iter_mut().zip(&pw).for_each(|(a, b)| *a += b);
        db.iter_mut().zip(&pb).for_each(|(a, b)| *a += b);
    }
    (dx, dw, db)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_detected_path_passes_its_own_check() {
        let (chosen, worst) = Path::chosen();
        assert_eq!(chosen, Path::detect(), "off by {worst}");
        assert!(worst <= 1e-4);
    }

    /// A benchmark naming a kernel this CPU lacks gets the kernels it has, and
    /// nothing is chosen (the process-wide choice is left to the other tests).
    #[test]
    fn choosing_a_kernel_this_cpu_lacks_is_refused_with_what_it_runs() {
        let err = choose("avx3").unwrap_err();
        assert!(err.contains("avx3") && err.contains("gemm"), "{err}");
        assert!(PREFERRED.get().is_none());
    }

    /// Every path against the GEMM one, which the Burn tests (`tests.rs`) hold to
    /// Burn's layers on machines where the direct path is not the one chosen; where
    /// it is, they hold the direct path to Burn and this holds GEMM to direct.
    #[test]
    fn every_path_agrees_with_im2col_and_gemm() {
        // Every kernel this CPU runs: an AVX-512 machine checks the AVX2 one too.
        let paths = Kernel::available().into_iter().map(Path::Direct);
        // Channel counts around the 16-lane blocks, 6-pixel tiles with tails, pads
        // 0 to k − 1, batch 1 and more images than tasks.
        let cases = [
            (1, 1, 1, 1, 1, 1, 0),
            (2, 3, 17, 5, 7, 3, 2),
            (3, 16, 5, 6, 9, 5, 4),
            (1, 33, 31, 7, 4, 3, 1),
            (9, 2, 16, 4, 4, 3, 0),
            (2, 64, 128, 14, 14, 5, 2),
        ];
        for path in paths {
            let worst = disagreement(path, &cases, 3);
            assert!(worst <= 1e-4, "{path:?}: off by {worst}");
        }
    }
}
