//! 2×2, stride-2 max-pooling fused with the ReLU after it, in one pass over NCHW,
//! keeping one byte per output for the backward pass: which of the four inputs won,
//! or [`NO_GRAD`] where ReLU cut the output to zero (no gradient flows back there).
//! Odd rows and columns are dropped, as `MaxPool2d` does.

use rayon::prelude::*;

/// The index stored where the pooled value was ≤ 0.
pub(crate) const NO_GRAD: u8 = 4;

/// Planes (one channel of one image) per rayon task.
const PLANES_PER_TASK: usize = 16;

/// `(relu(maxpool2x2(x)), winners)` for `planes` planes of `h × w`.
pub(crate) fn forward(x: &[f32], planes: usize, h: usize, w: usize) -> (Vec<f32>, Vec<u8>) {
    assert_eq!(x.len(), planes * h * w, "input has the wrong size");
    let (ho, wo) = (h / 2, w / 2);
    let mut y = vec![0.0; planes * ho * wo];
    let mut arg = vec![NO_GRAD; planes * ho * wo];
    if ho * wo == 0 {
        return (y, arg);
    }
    let chunk = PLANES_PER_TASK * ho * wo;
    y.par_chunks_mut(chunk)
        .zip(arg.par_chunks_mut(chunk))
        .zip(x.par_chunks(PLANES_PER_TASK * h * w))
        .for_each(|((ys, args), xs)| {
            for ((yp, ap), xp) in ys
                .chunks_exact_mut(ho * wo)
                .zip(args.chunks_exact_mut(ho * wo))
                .zip(xs.chunks_exact(h * w))
            {
                for oy in 0..ho {
                    let top = &xp[2 * oy * w..][..2 * wo];
                    let bottom = &xp[(2 * oy + 1) * w..][..2 * wo];
                    pool_row(
                        top,
                        bottom,
                        &mut yp[oy * wo..][..wo],
                        &mut ap[oy * wo..][..wo],
                    );
                }
            }
        });
    (y, arg)
}

/// One output row from its two input rows (each `2 · out.len()` long): eight
/// windows at a time with AVX2 where the CPU has it (the last eight may overlap the
/// ones before: recomputing a window gives the same values), else one at a time.
/// (Written per window, the compiler left it scalar: a sixth of the loss screen's
/// time went here.)
fn pool_row(top: &[f32], bottom: &[f32], out: &mut [f32], won: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    {
        let n = out.len();
        if n >= avx2::STEP && std::arch::is_x86_feature_detected!("avx2") {
            assert!(top.len() >= 2 * n && bottom.len() >= 2 * n && won.len() >= n);
            for first in (0..n).step_by(avx2::STEP) {
                let first = first.min(n - avx2::STEP);
                // SAFETY: the CPU has AVX2 (checked above); the step reads
                // `top[2·first .. 2·first + 16]` and `bottom[..]` alike and writes
                // `out[first .. first + 8]` and `won[..]` alike: in bounds, since
                // first + 8 ≤ n and the lengths are asserted above.
                #[allow(unsafe_code)]
                unsafe {
                    avx2::step(
                        top.as_ptr().add(2 * first),
                        bottom.as_ptr().add(2 * first),
                        out.as_mut_ptr().add(first),
                        won.as_mut_ptr().add(first),
                    );
                }
            }
            return;
        }
    }
    for (i, (o, g)) in out.iter_mut().zip(won).enumerate() {
        (*o, *g) = window(top[2 * i], top[2 * i + 1], bottom[2 * i], bottom[2 * i + 1]);
    }
}

/// `relu(max(a, b, c, d))` of one window (`a b` over `c d`) and which input won.
fn window(a: f32, b: f32, c: f32, d: f32) -> (f32, u8) {
    // Strict comparisons make the first maximum in row-major order win, as in
    // PyTorch and Burn.
    let (v1, i1) = if b > a { (b, 1) } else { (a, 0) };
    let (v2, i2) = if d > c { (d, 3) } else { (c, 2) };
    let (v, i) = if v2 > v1 { (v2, i2) } else { (v1, i1) };
    // A NaN is passed on (a diverged run must show), with no gradient.
    let nan = a.is_nan() | b.is_nan() | c.is_nan() | d.is_nan();
    let live = !nan & (v > 0.0);
    let value = if nan {
        f32::NAN
    } else if live {
        v
    } else {
        0.0
    };
    (value, if live { i } else { NO_GRAD })
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use std::arch::x86_64::*;

    use super::NO_GRAD;

    /// Windows a step.
    pub(super) const STEP: usize = 8;

    /// [`super::window`] for eight windows: `top[0..16]` over `bottom[0..16]` into
    /// `out[0..8]` and `won[0..8]`.
    ///
    /// # Safety
    /// The CPU has AVX2; the pointers are valid for those ranges.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn step(top: *const f32, bottom: *const f32, out: *mut f32, won: *mut u8) {
        // SAFETY (whole body): the reads and writes are the ranges the caller vouches for.
        unsafe {
            let (a, b) = split(top);
            let (c, d) = split(bottom);
            let gt1 = _mm256_cmp_ps::<_CMP_GT_OQ>(b, a);
            let gt2 = _mm256_cmp_ps::<_CMP_GT_OQ>(d, c);
            let (v1, v2) = (_mm256_blendv_ps(a, b, gt1), _mm256_blendv_ps(c, d, gt2));
            let gt = _mm256_cmp_ps::<_CMP_GT_OQ>(v2, v1);
            let v = _mm256_blendv_ps(v1, v2, gt);
            let one = _mm256_set1_epi32(1);
            let i1 = _mm256_and_si256(_mm256_castps_si256(gt1), one);
            let i2 = _mm256_add_epi32(
                _mm256_set1_epi32(2),
                _mm256_and_si256(_mm256_castps_si256(gt2), one),
            );
            let i = _mm256_blendv_epi8(i1, i2, _mm256_castps_si256(gt));
            let nan = _mm256_or_ps(
                _mm256_cmp_ps::<_CMP_UNORD_Q>(a, b),
                _mm256_cmp_ps::<_CMP_UNORD_Q>(c, d),
            );
            let live = _mm256_andnot_ps(nan, _mm256_cmp_ps::<_CMP_GT_OQ>(v, _mm256_setzero_ps()));
            let value = _mm256_blendv_ps(_mm256_and_ps(v, live), _mm256_set1_ps(f32::NAN), nan);
            let index = _mm256_blendv_epi8(
                _mm256_set1_epi32(i32::from(NO_GRAD)),
                i,
                _mm256_castps_si256(live),
            );
            _mm256_storeu_ps(out, value);
            let words = _mm_packus_epi32(
                _mm256_castsi256_si128(index),
                _mm256_extracti128_si256::<1>(index),
            );
            _mm_storel_epi64(won.cast(), _mm_packus_epi16(words, words));
        }
    }

    /// The even and the odd ones of the 16 floats at `p`, each in order.
    #[target_feature(enable = "avx2")]
    unsafe fn split(p: *const f32) -> (__m256, __m256) {
        // SAFETY: the caller vouches for `p[0..16]`.
        let (lo, hi) = unsafe { (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))) };
        // Within each 128-bit half: (lo 0 2, hi 0 2) and (lo 1 3, hi 1 3); then the
        // 64-bit quarters in order 0 2 1 3.
        let even = _mm256_shuffle_ps::<0x88>(lo, hi);
        let odd = _mm256_shuffle_ps::<0xDD>(lo, hi);
        let order =
            |v: __m256| _mm256_castpd_ps(_mm256_permute4x64_pd::<0xD8>(_mm256_castps_pd(v)));
        (order(even), order(odd))
    }
}

/// The input gradient of [`forward`]: each output's gradient goes to the input that
/// won its window, unless ReLU cut it.
pub(crate) fn backward(dy: &[f32], arg: &[u8], planes: usize, h: usize, w: usize) -> Vec<f32> {
    let (ho, wo) = (h / 2, w / 2);
    assert_eq!(
        dy.len(),
        planes * ho * wo,
        "output gradient has the wrong size"
    );
    assert_eq!(arg.len(), dy.len(), "winners have the wrong size");
    let mut dx = vec![0.0; planes * h * w];
    if ho * wo == 0 {
        return dx;
    }
    dx.par_chunks_mut(PLANES_PER_TASK * h * w)
        .zip(dy.par_chunks(PLANES_PER_TASK * ho * wo))
        .zip(arg.par_chunks(PLANES_PER_TASK * ho * wo))
        .for_each(|((dxs, dys), args)| {
            for ((dxp, dyp), ap) in dxs
                .chunks_exact_mut(h * w)
                .zip(dys.chunks_exact(ho * wo))
                .zip(args.chunks_exact(ho * wo))
            {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let won = ap[oy * wo + ox];
                        if won < NO_GRAD {
                            let (r, c) = (usize::from(won / 2), usize::from(won % 2));
                            dxp[(2 * oy + r) * w + 2 * ox + c] = dyp[oy * wo + ox];
                        }
                    }
                }
            }
        });
    dx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// Every row width from 1 to 40, values with many ties, zeros and NaNs: the
    /// vector path gives exactly the window-by-window values and winners.
    #[test]
    fn rows_agree_with_the_window_rule_on_ties_and_nans() {
        let mut rng = SplitMix64::new(3);
        for w in 1..=40 {
            let (planes, h) = (3, 4);
            let x: Vec<f32> = (0..planes * h * w)
                .map(|_| match rng.below(9) {
                    0 => f32::NAN,
                    k => k as f32 - 4.0,
                })
                .collect();
            let (y, arg) = forward(&x, planes, h, w);
            let (ho, wo) = (h / 2, w / 2);
            for p in 0..planes {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let at = |r: usize, c: usize| x[(p * h + 2 * oy + r) * w + 2 * ox + c];
                        let (v, i) = window(at(0, 0), at(0, 1), at(1, 0), at(1, 1));
                        let k = (p * ho + oy) * wo + ox;
                        assert_eq!(
                            y[k].to_bits(),
                            v.to_bits(),
                            "value, width {w}, {p} {oy} {ox}"
                        );
                        assert_eq!(arg[k], i, "winner, width {w}, {p} {oy} {ox}");
                    }
                }
            }
        }
    }
}
