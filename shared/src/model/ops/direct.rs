//! The convolution computed directly from a zero-padded copy of each image, with no
//! im2col matrix and no GEMM packing: every output value is a sum over taps of
//! `weight · input[tap offset + pixel offset]`, and [`tile`] runs 16 output channels
//! × 6 pixels (or 16 channels × 6 taps for the weight gradient) in registers.
//!
//! - forward: `y[co][p] = b[co] + Σₜ W[co][t] · xp[tap(t) + pix(p)]`
//! - weight gradient: `dW[co][t] = Σₚ dy[co][p] · xp[tap(t) + pix(p)]`
//! - input gradient: the forward pass of `dy` padded by `k − 1 − pad`, with the
//!   kernel flipped and its channel axes swapped.
//!
//! `xp` is the image with `pad` zeros on every side (row length `W + 2·pad`), so no
//! offset needs a bounds test. Used where [`Kernel::detect`] finds AVX-512 or AVX2 and FMA;
//! elsewhere `conv.rs`'s im2col + GEMM path runs.

use rayon::prelude::*;

use super::conv::ConvShape;
use super::tile::{Acc, Kernel, LANES, Offsets, SLOTS, tile, tile2};

/// Where a convolution of shape `s` reads its padded input `xp` ([C, hp, wp]).
/// (A channels-last `xp` was tried: the six pixels of a tile then no longer share
/// cache lines, and the paper net ran ~8 % slower.)
struct Geometry {
    /// Input channels.
    cin: usize,
    /// Padded rows and columns.
    hp: usize,
    wp: usize,
    /// Per tap (ci, ky, kx), in the weight's order: `ci·hp·wp + ky·wp + kx`.
    taps: Offsets,
    /// Per output pixel (oy, ox), row-major: `oy·wp + ox`.
    pixels: Offsets,
}

impl Geometry {
    fn new(s: &ConvShape) -> Self {
        let (hp, wp) = (s.height + 2 * s.pad, s.width + 2 * s.pad);
        let (ho, wo) = s.out_hw();
        let k = s.kernel;
        let taps = Offsets::new(
            (0..s.cin)
                .flat_map(|ci| (0..k).flat_map(move |ky| (0..k).map(move |kx| (ci, ky, kx))))
                .map(|(ci, ky, kx)| ci * hp * wp + ky * wp + kx),
        );
        let pixels = Offsets::new((0..ho).flat_map(|oy| (0..wo).map(move |ox| oy * wp + ox)));
        Self {
            cin: s.cin,
            hp,
            wp,
            taps,
            pixels,
        }
    }

    /// Copies `x` ([cin, H, W]) into the interior of `xp`; the border of `xp` must
    /// be zero already and stays so.
    fn pad_into(&self, s: &ConvShape, x: &[f32], xp: &mut [f32]) {
        let (h, w, p) = (s.height, s.width, s.pad);
        for (plane, dst) in x
            .chunks_exact(h * w)
            .zip(xp.chunks_exact_mut(self.hp * self.wp))
        {
            for (row, out) in plane
                .chunks_exact(w)
                .zip(dst[p * self.wp..].chunks_exact_mut(self.wp))
            {
                out[p..p + w].copy_from_slice(row);
            }
        }
    }

    fn padded_len(&self) -> usize {
        self.cin * self.hp * self.wp
    }

    /// `w` ([rows, taps]) regrouped by 16 rows: `[block][tap][lane]`, with zero lanes
    /// past `rows`.
    fn pack(&self, w: &[f32], rows: usize) -> Vec<f32> {
        let t = self.taps.len();
        let mut packed = vec![0.0; rows.div_ceil(LANES) * t * LANES];
        for (co, row) in w.chunks_exact(t).enumerate().take(rows) {
            let (block, lane) = (co / LANES, co % LANES);
            for (ti, &v) in row.iter().enumerate() {
                packed[(block * t + ti) * LANES + lane] = v;
            }
        }
        packed
    }
}

/// The six slots of a tile starting at `first` of `n` items: past the end, slots
/// repeat the last item (computed, never stored).
fn slots(offsets: &Offsets, first: usize) -> [usize; SLOTS] {
    std::array::from_fn(|j| offsets.get((first + j).min(offsets.len() - 1)))
}

/// One image's forward pass: `out[co][p] = bias[co] + Σₜ W[co][t] · src[tap(t) + pix(p)]`
/// for `cout` channels, from weights packed by [`Geometry::pack`].
fn image_forward(
    kernel: Kernel,
    geo: &Geometry,
    packed: &[f32],
    bias: Option<&[f32]>,
    src: &[f32],
    cout: usize,
    out: &mut [f32],
) {
    let (t, hw) = (geo.taps.len(), geo.pixels.len());
    let blocks: Vec<&[f32]> = packed.chunks_exact(t * LANES).collect();
    // Each block's first values (its bias) and how many of its lanes are channels.
    let start = |block: usize| {
        let lanes = (cout - block * LANES).min(LANES);
        let mut start = [0.0; LANES];
        if let Some(b) = bias {
            start[..lanes].copy_from_slice(&b[block * LANES..][..lanes]);
        }
        (start, lanes)
    };
    // Blocks two at a time: `tile2` shares each pixel's reads between them.
    for first in (0..blocks.len()).step_by(2) {
        let second = (first + 1 < blocks.len()).then_some(first + 1);
        let (start0, lanes0) = start(first);
        let (start1, lanes1) = second.map_or(([0.0; LANES], 0), start);
        for p0 in (0..hw).step_by(SLOTS) {
            let inner = slots(&geo.pixels, p0);
            let (mut acc0, mut acc1): (Acc, Acc) = ([start0; SLOTS], [start1; SLOTS]);
            match second {
                Some(b1) => tile2(
                    kernel,
                    blocks[first],
                    blocks[b1],
                    src,
                    &geo.taps,
                    &inner,
                    &mut acc0,
                    &mut acc1,
                ),
                None => tile(kernel, blocks[first], src, &geo.taps, &inner, &mut acc0),
            }
            let mut store = |acc: &Acc, block: usize, lanes: usize| {
                for (j, row) in acc.iter().enumerate().take(hw - p0) {
                    for (l, &v) in row.iter().enumerate().take(lanes) {
                        out[(block * LANES + l) * hw + p0 + j] = v;
                    }
                }
            };
            store(&acc0, first, lanes0);
            if let Some(b1) = second {
                store(&acc1, b1, lanes1);
            }
        }
    }
}

/// `dWᵀ[t][co] += Σₚ xp[tap(t) + pix(p)] · dyᵀ[p][co]`, six taps at a time, for one
/// channel block (its rows of dyᵀ and of dWᵀ), or two sharing the reads of `xp`.
fn weight_tiles(
    kernel: Kernel,
    geo: &Geometry,
    xp: &[f32],
    first: (&[f32], &mut [f32]),
    mut second: Option<(&[f32], &mut [f32])>,
) {
    let t = geo.taps.len();
    for t0 in (0..t).step_by(SLOTS) {
        let rows = (t - t0).min(SLOTS);
        let load = |dwt: &[f32]| {
            let mut acc: Acc = [[0.0; LANES]; SLOTS];
            for (j, a) in acc.iter_mut().enumerate().take(rows) {
                a.copy_from_slice(&dwt[(t0 + j) * LANES..][..LANES]);
            }
            acc
        };
        let save = |acc: &Acc, dwt: &mut [f32]| {
            for (j, a) in acc.iter().enumerate().take(rows) {
                dwt[(t0 + j) * LANES..][..LANES].copy_from_slice(a);
            }
        };
        let inner = slots(&geo.taps, t0);
        let mut acc0 = load(first.1);
        match second.as_mut() {
            Some((vecs1, dwt1)) => {
                let mut acc1 = load(dwt1);
                let pixels = &geo.pixels;
                tile2(
                    kernel, first.0, vecs1, xp, pixels, &inner, &mut acc0, &mut acc1,
                );
                save(&acc1, dwt1);
            }
            None => tile(kernel, first.0, xp, &geo.pixels, &inner, &mut acc0),
        }
        save(&acc0, first.1);
    }
}

/// `y = conv(x, w) + b` for `x` [N, Cin, H, W], `w` [Cout, Cin, k, k], `b` [Cout].
pub(crate) fn forward(s: &ConvShape, kernel: Kernel, x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
    let geo = Geometry::new(s);
    let (image_in, image_out) = (s.image_in(), s.image_out());
    let packed = geo.pack(w, s.cout);
    let mut y = vec![0.0; s.batch * image_out];
    let group = s.group();
    y.par_chunks_mut(group * image_out)
        .zip(x.par_chunks(group * image_in))
        .for_each(|(ys, xs)| {
            let mut xp = vec![0.0; geo.padded_len()];
            for (yn, xn) in ys
                .chunks_exact_mut(image_out)
                .zip(xs.chunks_exact(image_in))
            {
                geo.pad_into(s, xn, &mut xp);
                image_forward(kernel, &geo, &packed, Some(b), &xp, s.cout, yn);
            }
        });
    y
}

/// The shape whose forward pass is this one's input gradient: `dy` padded by
/// `k − 1 − pad`, Cout and Cin swapped.
fn transposed(s: &ConvShape) -> ConvShape {
    let (ho, wo) = s.out_hw();
    ConvShape {
        batch: s.batch,
        cin: s.cout,
        cout: s.cin,
        height: ho,
        width: wo,
        kernel: s.kernel,
        pad: s.kernel - 1 - s.pad,
    }
}

/// `w'[ci][co][ky][kx] = w[co][ci][k−1−ky][k−1−kx]`: the kernel of [`transposed`].
fn flipped(s: &ConvShape, w: &[f32]) -> Vec<f32> {
    let k = s.kernel;
    let mut out = vec![0.0; w.len()];
    for co in 0..s.cout {
        for ci in 0..s.cin {
            for ky in 0..k {
                for kx in 0..k {
                    out[((ci * s.cout + co) * k + ky) * k + kx] =
                        w[((co * s.cin + ci) * k + (k - 1 - ky)) * k + (k - 1 - kx)];
                }
            }
        }
    }
    out
}

/// Gradients of [`forward`] given `dy` [N, Cout, Ho, Wo]: `(dx, dw, db)`, with `dx`
/// only when asked for.
pub(crate) fn backward(
    s: &ConvShape,
    kernel: Kernel,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    want_dx: bool,
) -> (Option<Vec<f32>>, Vec<f32>, Vec<f32>) {
    let geo = Geometry::new(s);
    let (image_in, image_out) = (s.image_in(), s.image_out());
    let (t, hw) = (geo.taps.len(), geo.pixels.len());
    let blocks = s.cout.div_ceil(LANES);
    let st = transposed(s);
    let tgeo = Geometry::new(&st);
    let tpacked = want_dx.then(|| tgeo.pack(&flipped(s, w), s.cin));
    let group = s.group();
    // One group of images: its share of dW (as [block][t][lane]) and db, and its
    // images' dx when wanted.
    let work = |g: usize, mut dx: Option<&mut [f32]>| {
        let mut xp = vec![0.0; geo.padded_len()];
        let mut dyt = vec![0.0; blocks * hw * LANES];
        let mut dyp = vec![0.0; tpacked.as_ref().map_or(0, |_| tgeo.padded_len())];
        let mut dwt = vec![0.0; blocks * t * LANES];
        let mut db = vec![0.0; s.cout];
        for (i, n) in (g * group..((g + 1) * group).min(s.batch)).enumerate() {
            let xn = &x[n * image_in..][..image_in];
            let dyn_ = &dy[n * image_out..][..image_out];
            geo.pad_into(s, xn, &mut xp);
            for (co, plane) in dyn_.chunks_exact(hw).enumerate() {
                db[co] += plane.iter().sum::<f32>();
                let (block, lane) = (co / LANES, co % LANES);
                for (p, &v) in plane.iter().enumerate() {
                    dyt[(block * hw + p) * LANES + lane] = v;
                }
            }
            // The weight gradient, channel blocks two at a time.
            let mut blocks = dyt
                .chunks_exact(hw * LANES)
                .zip(dwt.chunks_exact_mut(t * LANES));
            while let Some(first) = blocks.next() {
                weight_tiles(kernel, &geo, &xp, first, blocks.next());
            }
            if let (Some(dx), Some(tpacked)) = (dx.as_deref_mut(), tpacked.as_deref()) {
                tgeo.pad_into(&st, dyn_, &mut dyp);
                let dxn = &mut dx[i * image_in..][..image_in];
                image_forward(kernel, &tgeo, tpacked, None, &dyp, s.cin, dxn);
            }
        }
        (dwt, db)
    };
    let groups = s.batch.div_ceil(group);
    let mut dx = want_dx.then(|| vec![0.0; s.batch * image_in]);
    let parts: Vec<(Vec<f32>, Vec<f32>)> = match dx.as_mut() {
        Some(dx) => dx
            .par_chunks_mut(group * image_in)
            .enumerate()
            .map(|(g, dxg)| work(g, Some(dxg)))
            .collect(),
        None => (0..groups).into_par_iter().map(|g| work(g, None)).collect(),
    };
    let mut parts = parts.into_iter();
    let (mut dwt, mut db) = parts
        .next()
        .unwrap_or_else(|| (vec![0.0; blocks * t * LANES], vec![0.0; s.cout]));
    for (pw, pb) in parts {
        dwt.iter_mut().zip(&pw).for_each(|(a, b)| *a += b);
        db.iter_mut().zip(&pb).for_each(|(a, b)| *a += b);
    }
    let mut dw = vec![0.0; s.cout * t];
    for (co, row) in dw.chunks_exact_mut(t).enumerate() {
        let (block, lane) = (co / LANES, co % LANES);
        for (ti, v) in row.iter_mut().enumerate() {
            *v = dwt[(block * t + ti) * LANES + lane];
        }
    }
    (dx, dw, db)
}
