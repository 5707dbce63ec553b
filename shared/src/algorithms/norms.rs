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
        // SAFETY: the CPU has AVX2 (checked just above); the body is safe Rust.
        #[allow(unsafe_code)]
        return unsafe { norms_avx2(x, c) };
    }
    norms_any(x, c)
}

/// [`norms_any`] compiled with AVX2's wider vectors (the same operations in the
/// same order, so the same result; ‖x̃‖ and ‖xⁱ − x̃‖ are taken several times an
/// exchange on the server).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn norms_avx2(x: &[f32], c: &[f32]) -> Norms {
    norms_any(x, c)
}

#[inline(always)]
fn norms_any(x: &[f32], c: &[f32]) -> Norms {
    const LANES: usize = 8;
    type Lanes<T> = [T; LANES];
    /// One step of every lane, on whole arrays (what the compiler vectorises).
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
    let off = x.len() - tail.len();
    if centered {
        for (xl, cl) in xs.iter().zip(c.as_chunks::<LANES>().0) {
            step((&mut d, &mut n, &mut z), xl, cl);
        }
    } else {
        for xl in xs {
            step((&mut d, &mut n, &mut z), xl, &zeros);
        }
    }
    // The tail in lane 0.
    for (k, &xv) in tail.iter().enumerate() {
        let cv = if centered { f64::from(c[off + k]) } else { 0.0 };
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
}
