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
                    let top = &xp[2 * oy * w..][..w];
                    let bottom = &xp[(2 * oy + 1) * w..][..w];
                    let outs = yp[oy * wo..][..wo].iter_mut().zip(&mut ap[oy * wo..][..wo]);
                    for ((out, won), (t, u)) in
                        outs.zip(top.chunks_exact(2).zip(bottom.chunks_exact(2)))
                    {
                        let (a, b, c, d) = (t[0], t[1], u[0], u[1]);
                        // Branch-free, so it vectorises. Strict comparisons make the
                        // first maximum in row-major order win, as in PyTorch and Burn.
                        let (v1, i1) = if b > a { (b, 1) } else { (a, 0) };
                        let (v2, i2) = if d > c { (d, 3) } else { (c, 2) };
                        let (v, i) = if v2 > v1 { (v2, i2) } else { (v1, i1) };
                        // A NaN is passed on (a diverged run must show), with no gradient.
                        let nan = a.is_nan() | b.is_nan() | c.is_nan() | d.is_nan();
                        let live = !nan & (v > 0.0);
                        *out = if nan {
                            f32::NAN
                        } else if live {
                            v
                        } else {
                            0.0
                        };
                        *won = if live { i } else { NO_GRAD };
                    }
                }
            }
        });
    (y, arg)
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
