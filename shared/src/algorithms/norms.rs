//! ‖xⁱ − x̃‖, ‖x̃‖ and finiteness in one pass: what the server checks before an
//! update may touch the center, several times an exchange.

use super::assert_same_len;

/// ‖x − c‖, ‖c‖ and whether every xⱼ is finite, in one pass: what the server checks
/// before it lets an update touch the center.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Norms {
    /// ‖x − c‖.
    pub distance: f64,
    /// ‖c‖.
    pub center: f64,
    /// No NaN or ±∞ in x.
    pub finite: bool,
}

/// Computes [`Norms`] of `x` against `c` (`c` empty: distance is ‖x‖, center 0).
/// Differences and squares are taken in f64 lanes: in f32 a value near 3e38 squares
/// (or differs) to ∞, and a norm of ∞ must never enter a bound or be accepted.
pub fn norms(x: &[f32], c: &[f32]) -> Norms {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        #[allow(unsafe_code)]
        return unsafe { norms_avx2(x, c) };
    }
    norms_any(x, c)
}

/// [`norms_any`] in AVX2 intrinsics: the same operations on the same eight lanes in
/// the same order (no FMA), so the same bits. The portable form's f32→f64 lanes did
/// not vectorise: 625 µs for the small model's 421 642 values, taken three times an
/// exchange on the server.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(unsafe_code)]
fn norms_avx2(x: &[f32], c: &[f32]) -> Norms {
    use std::arch::x86_64::*;
    let centered = !c.is_empty();
    if centered {
        assert_same_len(x.len(), c.len());
    }
    let whole = x.len() / 8 * 8;
    let (mut d, mut n) = ([_mm256_setzero_pd(); 2], [_mm256_setzero_pd(); 2]);
    let (mut z, zero) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for i in (0..whole).step_by(8) {
        // SAFETY: i + 8 ≤ whole ≤ x.len() (= c.len() when centered): in bounds.
        let (xv, cv) = unsafe {
            let xv = _mm256_loadu_ps(x.as_ptr().add(i));
            (
                xv,
                if centered {
                    _mm256_loadu_ps(c.as_ptr().add(i))
                } else {
                    zero
                },
            )
        };
        let halves = |v: __m256| {
            [
                _mm256_cvtps_pd(_mm256_castps256_ps128(v)),
                _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v)),
            ]
        };
        let (xs, cs) = (halves(xv), halves(cv));
        for h in 0..2 {
            let e = _mm256_sub_pd(xs[h], cs[h]);
            d[h] = _mm256_add_pd(d[h], _mm256_mul_pd(e, e));
            n[h] = _mm256_add_pd(n[h], _mm256_mul_pd(cs[h], cs[h]));
        }
        z = _mm256_add_ps(z, _mm256_mul_ps(xv, zero));
    }
    let (mut dl, mut nl, mut zl) = ([0.0f64; 8], [0.0f64; 8], [0.0f32; 8]);
    // SAFETY: each store writes four f64 (eight f32) into an array that long.
    unsafe {
        _mm256_storeu_pd(dl.as_mut_ptr(), d[0]);
        _mm256_storeu_pd(dl.as_mut_ptr().add(4), d[1]);
        _mm256_storeu_pd(nl.as_mut_ptr(), n[0]);
        _mm256_storeu_pd(nl.as_mut_ptr().add(4), n[1]);
        _mm256_storeu_ps(zl.as_mut_ptr(), z);
    }
    finish(
        dl,
        nl,
        zl,
        &x[whole..],
        if centered { &c[whole..] } else { &[] },
    )
}

#[inline(always)]
fn norms_any(x: &[f32], c: &[f32]) -> Norms {
    const LANES: usize = 8;
    type Lanes<T> = [T; LANES];
    /// One step of every lane, on whole arrays (the order the AVX2 form keeps).
    #[inline(always)]
    fn step(
        (d, n, z): (&mut Lanes<f64>, &mut Lanes<f64>, &mut Lanes<f32>),
        x: &Lanes<f32>,
        c: &Lanes<f32>,
    ) {
        for l in 0..LANES {
            let (xv, cv) = (f64::from(x[l]), f64::from(c[l]));
            let e = xv - cv;
            d[l] += e * e;
            n[l] += cv * cv;
            z[l] += x[l] * 0.0; // NaN exactly when x[l] is NaN or ±∞
        }
    }
    let centered = !c.is_empty();
    if centered {
        assert_same_len(x.len(), c.len());
    }
    let (mut d, mut n, mut z) = ([0.0f64; LANES], [0.0f64; LANES], [0.0f32; LANES]);
    let zeros = [0.0f32; LANES];
    let (xs, tail) = x.as_chunks::<LANES>();
    if centered {
        for (xl, cl) in xs.iter().zip(c.as_chunks::<LANES>().0) {
            step((&mut d, &mut n, &mut z), xl, cl);
        }
    } else {
        for xl in xs {
            step((&mut d, &mut n, &mut z), xl, &zeros);
        }
    }
    let off = x.len() - tail.len();
    finish(d, n, z, tail, if centered { &c[off..] } else { &[] })
}

/// Adds the tail (`c` empty: not centered) in lane 0, then sums the lanes.
#[inline(always)]
fn finish(mut d: [f64; 8], mut n: [f64; 8], mut z: [f32; 8], tail: &[f32], c: &[f32]) -> Norms {
    for (k, &xv) in tail.iter().enumerate() {
        let cv = c.get(k).map_or(0.0, |&v| f64::from(v));
        let e = f64::from(xv) - cv;
        d[0] += e * e;
        n[0] += cv * cv;
        z[0] += xv * 0.0;
    }
    let (dist, cent, bad) = (
        d.iter().sum::<f64>(),
        n.iter().sum::<f64>(),
        z.iter().sum::<f32>(),
    );
    Norms {
        distance: dist.sqrt(),
        center: cent.sqrt(),
        finite: bad == 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algorithms::distance;

    #[test]
    fn norms_agree_with_the_plain_formulas() {
        let x: Vec<f32> = (0..3001).map(|i| (i as f32 * 0.37).sin()).collect();
        let c: Vec<f32> = (0..3001).map(|i| (i as f32 * 0.11).cos()).collect();
        let n = norms(&x, &c);
        assert!((n.distance - distance(&x, &c)).abs() < 1e-3, "{n:?}");
        assert!((n.center - distance(&c, &vec![0.0; c.len()])).abs() < 1e-3);
        assert!(n.finite);
        assert!((norms(&x, &[]).distance - distance(&x, &vec![0.0; x.len()])).abs() < 1e-3);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut y = x.clone();
            y[3000] = bad; // in the tail
            assert!(!norms(&y, &c).finite);
            y[3000] = 0.0;
            y[17] = bad;
            assert!(!norms(&y, &c).finite);
        }
        // Huge but finite values are finite, and their norm is finite too: a square
        // or a difference that overflows f32 must not turn a bound into ∞.
        let huge = norms(&[3e38, -3e38], &[-3e38, 3e38]);
        assert!(huge.finite);
        assert!(
            huge.distance.is_finite() && huge.center.is_finite(),
            "{huge:?}"
        );
        assert!((huge.distance / (6e38 * 2f64.sqrt()) - 1.0).abs() < 1e-6);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx2_form_gives_the_portable_bits() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        let mut rng = crate::rng::SplitMix64::new(7);
        for len in [0, 1, 7, 8, 9, 15, 16, 17, 64, 1001, 4099] {
            let mut x: Vec<f32> = (0..len)
                .map(|_| (rng.next_f64() as f32 - 0.5) * 6.0)
                .collect();
            let c: Vec<f32> = (0..len).map(|_| rng.next_f64() as f32 - 0.5).collect();
            if len > 9 {
                x[len / 2] = 3e38;
                x[3] = -1e-40; // subnormal
            }
            for centre in [&c[..], &[]] {
                // SAFETY: AVX2 checked above.
                #[allow(unsafe_code)]
                let fast = unsafe { norms_avx2(&x, centre) };
                let slow = norms_any(&x, centre);
                assert_eq!(fast.distance.to_bits(), slow.distance.to_bits(), "{len}");
                assert_eq!(fast.center.to_bits(), slow.center.to_bits(), "{len}");
                assert_eq!(fast.finite, slow.finite);
            }
            for bad in [f32::NAN, f32::INFINITY] {
                if let Some(v) = x.get_mut(len.saturating_sub(1)) {
                    *v = bad;
                    #[allow(unsafe_code)]
                    let fast = unsafe { norms_avx2(&x, &c) };
                    assert!(!fast.finite && !norms_any(&x, &c).finite);
                }
            }
        }
    }
}
