//! A bounds-checked front to the `gemm` crate's f32 kernel (the one Burn's CPU
//! backend uses for its matmul), so the convolutions call it without `unsafe`.

/// A read-only matrix view: element (i, j) is `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    /// Row stride.
    pub rs: usize,
    /// Column stride.
    pub cs: usize,
}

impl<'a> Mat<'a> {
    /// A row-major `rows × cols` matrix.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose, without moving anything.
    pub fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    fn check(&self) {
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows - 1) * self.rs + (self.cols - 1) * self.cs;
            assert!(last < self.data.len(), "matrix view out of bounds");
        }
    }
}

/// `c = a · b` (or `c += a · b` when `accumulate`), `c` row-major `a.rows × b.cols`,
/// on the calling thread: the callers parallelise over images.
// The workspace denies `unsafe`; this is its one use, gemm's raw-pointer entry point,
// with every bound it relies on checked first.
#[allow(unsafe_code)]
pub(crate) fn sgemm(a: Mat<'_>, b: Mat<'_>, c: &mut [f32], accumulate: bool) {
    assert_eq!(a.cols, b.rows, "inner dimensions differ");
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(c.len(), m * n, "output has the wrong size");
    a.check();
    b.check();
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return;
    }
    // SAFETY: every index the kernel touches lies inside the three slices: the views
    // were checked above (their last element is in bounds and strides are positive),
    // and `c` holds exactly m × n values laid out with row stride n.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: Mat<'_>, b: Mat<'_>) -> Vec<f32> {
        let mut c = vec![0.0; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                for p in 0..a.cols {
                    c[i * b.cols + j] += a.data[i * a.rs + p * a.cs] * b.data[p * b.rs + j * b.cs];
                }
            }
        }
        c
    }

    #[test]
    fn matches_the_naive_product_with_transposes_and_accumulation() {
        let a: Vec<f32> = (0..35).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..77).map(|i| (i as f32 * 0.11).cos()).collect();
        // a: 5×7, b: 7×11 and their transposed storages.
        let (am, bm) = (Mat::rows(&a, 5, 7), Mat::rows(&b, 7, 11));
        let want = naive(am, bm);
        let mut c = vec![0.0; 55];
        sgemm(am, bm, &mut c, false);
        assert!(c.iter().zip(&want).all(|(x, y)| (x - y).abs() < 1e-5));
        // aᵀ stored as 7×5 and read transposed gives the same a.
        let at: Vec<f32> = (0..35).map(|i| a[(i % 5) * 7 + i / 5]).collect();
        let mut d = vec![1.0; 55];
        sgemm(Mat::rows(&at, 7, 5).t(), bm, &mut d, true);
        assert!(d.iter().zip(&want).all(|(x, y)| (x - 1.0 - y).abs() < 1e-5));
    }

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn a_view_past_its_slice_is_refused() {
        let a = [0.0; 5];
        let mut c = [0.0; 4];
        sgemm(Mat::rows(&a, 2, 3), Mat::rows(&a, 3, 2), &mut c, false);
    }
}
