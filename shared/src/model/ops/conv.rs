//! 2-D convolution (stride 1, square kernel, zero padding) that stays in NCHW: each
//! image's forward pass, weight gradient and input gradient is one GEMM against its
//! im2col matrix. Images are split over the rayon pool; each thread keeps its own
//! scratch and weight-gradient accumulator, so there is no locking.

use rayon::prelude::*;

use super::gemm::{Mat, sgemm};

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
    fn image_in(&self) -> usize {
        self.cin * self.height * self.width
    }
    fn image_out(&self) -> usize {
        let (ho, wo) = self.out_hw();
        self.cout * ho * wo
    }
    /// Rows of the im2col matrix (the GEMM's inner dimension).
    fn taps(&self) -> usize {
        self.cin * self.kernel * self.kernel
    }
    /// Images per rayon task: a few tasks per thread, so a thread that the machine
    /// slows down (a busy core, a noisy neighbour) does not hold the others up.
    fn group(&self) -> usize {
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

/// `y = conv(x, w) + b` for `x` [N, Cin, H, W], `w` [Cout, Cin, k, k], `b` [Cout].
pub(crate) fn forward(s: &ConvShape, x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
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

/// Gradients of [`forward`] given `dy` [N, Cout, Ho, Wo]: `(dx, dw, db)`, with `dx`
/// only when asked for (the first layer's input needs none).
pub(crate) fn backward(
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
