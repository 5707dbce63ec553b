//! The direct convolution's register tile: 6 × 16 accumulators updated as
//! `acc[j] += vecs[i] · src[outer[i] + inner[j]]` for every i, with AVX-512 or else
//! AVX2 + FMA where the CPU has them (checked at run time), wasm's SIMD128 in the
//! browser (the build enables it; relaxed SIMD's FMA in the build that has it), and
//! plain Rust elsewhere.
//!
//! One kernel serves the forward pass, the input gradient and the weight gradient:
//! the 16 lanes are output channels (forward, input gradient) or output channels of
//! the weight gradient, and the six broadcast operands are six output pixels read
//! through per-pixel offsets, or six taps read through per-tap offsets (`direct.rs`).

/// Lanes of a tile: 16 f32, two AVX registers.
pub(crate) const LANES: usize = 16;
/// Broadcast operands of a tile.
pub(crate) const SLOTS: usize = 6;

/// A tile of accumulators: `SLOTS` rows of `LANES` values.
pub(crate) type Acc = [[f32; LANES]; SLOTS];

/// Offsets into a source, with their maximum computed once (the kernel's bound).
pub(crate) struct Offsets {
    list: Vec<u32>,
    max: usize,
}

impl Offsets {
    /// # Panics
    /// If an offset does not fit in `u32` (no layer of ours comes near).
    pub fn new(list: impl IntoIterator<Item = usize>) -> Self {
        let list: Vec<u32> = list
            .into_iter()
            .map(|o| u32::try_from(o).expect("offset fits in u32"))
            .collect();
        let max = list.iter().copied().max().unwrap_or(0) as usize;
        Self { list, max }
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// The `i`-th offset.
    pub fn get(&self, i: usize) -> usize {
        self.list[i] as usize
    }
}

/// Which implementation [`tile`] runs, decided once per operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// AVX-512 intrinsics: a tile row is one 16-lane register.
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// AVX2 and FMA intrinsics.
    #[cfg(target_arch = "x86_64")]
    Avx2Fma,
    /// wasm SIMD128; fused multiply-adds where the module is built with relaxed
    /// SIMD too (`cargo xtask web` builds both; the page loads what the browser takes).
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    Simd128,
    /// Portable Rust (what LLVM vectorises for the target).
    Portable,
}

impl Kernel {
    /// The fastest this CPU runs.
    pub fn detect() -> Self {
        Self::available()[0]
    }

    /// Every kernel this CPU runs, fastest first (tests check each).
    pub fn available() -> Vec<Self> {
        let mut kernels = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                kernels.push(Self::Avx512);
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                kernels.push(Self::Avx2Fma);
            }
        }
        #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
        kernels.push(Self::Simd128);
        kernels.push(Self::Portable);
        kernels
    }
}

/// `acc[j][l] += vecs[i·16 + l] · src[outer[i] + inner[j]]` for every i of `outer`.
///
/// # Panics
/// If `vecs` holds fewer than `outer.len()` rows of 16, or an offset sum falls
/// outside `src`: every index is checked here, before the kernel runs.
pub(crate) fn tile(
    kernel: Kernel,
    vecs: &[f32],
    src: &[f32],
    outer: &Offsets,
    inner: &[usize; SLOTS],
    acc: &mut Acc,
) {
    assert!(vecs.len() >= outer.len() * LANES, "too few vectors");
    let inner_max = inner.iter().copied().max().unwrap_or(0);
    assert!(
        outer.len() == 0 || outer.max + inner_max < src.len(),
        "tile reads past its source"
    );
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => {
            assert!(
                std::arch::is_x86_feature_detected!("avx512f"),
                "AVX-512 kernel chosen on a CPU without it"
            );
            // SAFETY: the CPU has AVX-512F (checked just above); the reads are the
            // ones bounded above, as for AVX2.
            #[allow(unsafe_code)]
            unsafe {
                avx512::tile(vecs.as_ptr(), src.as_ptr(), &outer.list, inner, acc)
            }
        }
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2Fma => {
            assert!(
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma"),
                "AVX2/FMA kernel chosen on a CPU without them"
            );
            // SAFETY: the CPU has AVX2 and FMA (checked just above); every read is
            // `vecs[i·16 .. i·16 + 16]` for i < outer.len() (checked against
            // vecs.len()) or `src[outer[i] + inner[j]]`, at most `outer.max +
            // inner_max`, checked against src.len(); `acc` is a whole array.
            #[allow(unsafe_code)]
            unsafe {
                avx2::tile(vecs.as_ptr(), src.as_ptr(), &outer.list, inner, acc)
            }
        }
        #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
        Kernel::Simd128 => {
            // SAFETY: the module is built with SIMD128 (a browser without it refuses
            // the whole module); the reads are the ones bounded just above.
            #[allow(unsafe_code)]
            unsafe {
                simd128::tile(vecs.as_ptr(), src.as_ptr(), &outer.list, inner, acc)
            }
        }
        Kernel::Portable => portable(vecs, src, &outer.list, inner, acc),
    }
}

/// Two tiles over the same reads of `src`: `acc0` from `vecs0` and `acc1` from
/// `vecs1` (two 16-channel blocks of the same pixels or taps). The AVX-512 kernel
/// shares each broadcast between them — six broadcasts feed twelve FMAs, so the
/// loads no longer bound it; the others run [`tile`] twice.
///
/// # Panics
/// As [`tile`], for either block.
#[allow(clippy::too_many_arguments)]
pub(crate) fn tile2(
    kernel: Kernel,
    vecs0: &[f32],
    vecs1: &[f32],
    src: &[f32],
    outer: &Offsets,
    inner: &[usize; SLOTS],
    acc0: &mut Acc,
    acc1: &mut Acc,
) {
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::Avx512 {
        assert!(
            vecs0.len().min(vecs1.len()) >= outer.len() * LANES,
            "too few vectors"
        );
        let inner_max = inner.iter().copied().max().unwrap_or(0);
        assert!(
            outer.len() == 0 || outer.max + inner_max < src.len(),
            "tile reads past its source"
        );
        assert!(
            std::arch::is_x86_feature_detected!("avx512f"),
            "AVX-512 kernel chosen on a CPU without it"
        );
        // SAFETY: the CPU has AVX-512F; both vector blocks hold `outer.len()` rows
        // and every source read is bounded, as checked just above.
        #[allow(unsafe_code)]
        unsafe {
            avx512::tile2(
                [vecs0.as_ptr(), vecs1.as_ptr()],
                src.as_ptr(),
                &outer.list,
                inner,
                [acc0, acc1],
            );
        }
        return;
    }
    tile(kernel, vecs0, src, outer, inner, acc0);
    tile(kernel, vecs1, src, outer, inner, acc1);
}

/// Chains of the FMA burst: enough independent FMAs to cover the latency of two
/// FMA units (4 cycles × 2).
const BURST_CHAINS: usize = 12;

/// `rounds` rounds of [`BURST_CHAINS`] independent fused multiply-adds on registers
/// only, with `kernel`'s vectors: a core's peak when timed (by the caller). Returns
/// the floating-point operations done and a value that depends on every one.
pub(crate) fn fma_burst(kernel: Kernel, rounds: u64) -> (f64, f32) {
    let chains = BURST_CHAINS as f64 * 2.0 * rounds as f64;
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 if std::arch::is_x86_feature_detected!("avx512f") => {
            // SAFETY: the CPU has AVX-512F (checked in the pattern); no memory is read.
            #[allow(unsafe_code)]
            let sum = unsafe { avx512::burst(rounds) };
            (chains * 16.0, sum)
        }
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2Fma
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma") =>
        {
            // SAFETY: the CPU has AVX2 and FMA (checked in the pattern); no memory is read.
            #[allow(unsafe_code)]
            let sum = unsafe { avx2::burst(rounds) };
            (chains * 8.0, sum)
        }
        _ => {
            let mut acc = [1.0f32; BURST_CHAINS];
            for _ in 0..rounds {
                for a in &mut acc {
                    *a = std::hint::black_box(*a).mul_add(0.999_999, 1e-7);
                }
            }
            (chains, acc.iter().sum())
        }
    }
}

fn portable(vecs: &[f32], src: &[f32], outer: &[u32], inner: &[usize; SLOTS], acc: &mut Acc) {
    for (v, &o) in vecs.chunks_exact(LANES).zip(outer) {
        for (row, &off) in acc.iter_mut().zip(inner) {
            let b = src[o as usize + off];
            for (a, x) in row.iter_mut().zip(v) {
                *a += x * b;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use std::arch::x86_64::{
        __m256, _mm256_add_ps, _mm256_broadcast_ss, _mm256_fmadd_ps, _mm256_loadu_ps,
        _mm256_set1_ps, _mm256_storeu_ps,
    };

    use super::{Acc, BURST_CHAINS, SLOTS};

    /// [`super::fma_burst`] on 8-lane registers.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn burst(rounds: u64) -> f32 {
        let (m, c) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
        let mut acc = [_mm256_set1_ps(1.0); BURST_CHAINS];
        for _ in 0..rounds {
            for a in &mut acc {
                *a = _mm256_fmadd_ps(*a, m, c);
            }
        }
        let sum = acc
            .iter()
            .fold(_mm256_set1_ps(0.0), |s, &a| _mm256_add_ps(s, a));
        let mut out = [0.0f32; 8];
        // SAFETY: `out` holds 8 floats.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), sum) };
        out.iter().sum()
    }

    /// The loop of [`super::tile`] in twelve registers.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `vecs` points at `outer.len()` rows of 16 floats;
    /// `src + outer[i] + inner[j]` is readable for every i, j.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile(
        vecs: *const f32,
        src: *const f32,
        outer: &[u32],
        inner: &[usize; SLOTS],
        acc: &mut Acc,
    ) {
        // SAFETY (whole body): reads within the bounds the caller guarantees; `acc`'s
        // rows are 16 floats each, read and written as two halves.
        unsafe {
            let mut lo: [__m256; SLOTS] = [_mm256_loadu_ps(acc[0].as_ptr()); SLOTS];
            let mut hi: [__m256; SLOTS] = [_mm256_loadu_ps(acc[0].as_ptr().add(8)); SLOTS];
            for j in 0..SLOTS {
                lo[j] = _mm256_loadu_ps(acc[j].as_ptr());
                hi[j] = _mm256_loadu_ps(acc[j].as_ptr().add(8));
            }
            let s = inner.map(|off| src.add(off));
            let mut v = vecs;
            for &o in outer {
                let o = o as usize;
                let (v0, v1) = (_mm256_loadu_ps(v), _mm256_loadu_ps(v.add(8)));
                for j in 0..SLOTS {
                    let b = _mm256_broadcast_ss(&*s[j].add(o));
                    lo[j] = _mm256_fmadd_ps(v0, b, lo[j]);
                    hi[j] = _mm256_fmadd_ps(v1, b, hi[j]);
                }
                v = v.add(16);
            }
            for j in 0..SLOTS {
                _mm256_storeu_ps(acc[j].as_mut_ptr(), lo[j]);
                _mm256_storeu_ps(acc[j].as_mut_ptr().add(8), hi[j]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx512 {
    use std::arch::x86_64::{
        __m512, _mm512_add_ps, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_reduce_add_ps,
        _mm512_set1_ps, _mm512_storeu_ps,
    };

    use super::{Acc, BURST_CHAINS, SLOTS};

    /// [`super::fma_burst`] on 16-lane registers.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn burst(rounds: u64) -> f32 {
        let (m, c) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
        let mut acc = [_mm512_set1_ps(1.0); BURST_CHAINS];
        for _ in 0..rounds {
            for a in &mut acc {
                *a = _mm512_fmadd_ps(*a, m, c);
            }
        }
        acc.iter().map(|&a| _mm512_reduce_add_ps(a)).sum()
    }

    /// The loop of [`super::tile`] with a tile row in one register, two rows of
    /// `vecs` a pass into two sets of accumulators (twelve chains: enough to
    /// cover the FMA latency on two units), added together at the end.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `vecs` points at `outer.len()` rows of 16 floats;
    /// `src + outer[i] + inner[j]` is readable for every i, j.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile(
        vecs: *const f32,
        src: *const f32,
        outer: &[u32],
        inner: &[usize; SLOTS],
        acc: &mut Acc,
    ) {
        // SAFETY (whole body): reads within the bounds the caller guarantees; `acc`'s
        // rows are 16 floats each, one register.
        unsafe {
            let mut a: [__m512; SLOTS] = [_mm512_set1_ps(0.0); SLOTS];
            let mut b: [__m512; SLOTS] = [_mm512_set1_ps(0.0); SLOTS];
            for j in 0..SLOTS {
                a[j] = _mm512_loadu_ps(acc[j].as_ptr());
            }
            let s = inner.map(|off| src.add(off));
            let mut v = vecs;
            let mut pairs = outer.chunks_exact(2);
            for pair in &mut pairs {
                let (o0, o1) = (pair[0] as usize, pair[1] as usize);
                let (v0, v1) = (_mm512_loadu_ps(v), _mm512_loadu_ps(v.add(16)));
                for j in 0..SLOTS {
                    a[j] = _mm512_fmadd_ps(v0, _mm512_set1_ps(*s[j].add(o0)), a[j]);
                    b[j] = _mm512_fmadd_ps(v1, _mm512_set1_ps(*s[j].add(o1)), b[j]);
                }
                v = v.add(32);
            }
            if let [o] = pairs.remainder() {
                let v0 = _mm512_loadu_ps(v);
                for j in 0..SLOTS {
                    a[j] = _mm512_fmadd_ps(v0, _mm512_set1_ps(*s[j].add(*o as usize)), a[j]);
                }
            }
            for j in 0..SLOTS {
                _mm512_storeu_ps(acc[j].as_mut_ptr(), _mm512_add_ps(a[j], b[j]));
            }
        }
    }

    /// [`super::tile2`]: two tiles, each broadcast shared by both (twelve chains).
    ///
    /// # Safety
    /// The CPU has AVX-512F; each of `vecs` points at `outer.len()` rows of 16
    /// floats; `src + outer[i] + inner[j]` is readable for every i, j.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile2(
        vecs: [*const f32; 2],
        src: *const f32,
        outer: &[u32],
        inner: &[usize; SLOTS],
        acc: [&mut Acc; 2],
    ) {
        // SAFETY (whole body): reads within the bounds the caller guarantees; each
        // accumulator row is 16 floats, one register.
        unsafe {
            let mut a: [__m512; SLOTS] = [_mm512_set1_ps(0.0); SLOTS];
            let mut b: [__m512; SLOTS] = [_mm512_set1_ps(0.0); SLOTS];
            for j in 0..SLOTS {
                a[j] = _mm512_loadu_ps(acc[0][j].as_ptr());
                b[j] = _mm512_loadu_ps(acc[1][j].as_ptr());
            }
            let s = inner.map(|off| src.add(off));
            let (mut v0, mut v1) = (vecs[0], vecs[1]);
            for &o in outer {
                let o = o as usize;
                let (w0, w1) = (_mm512_loadu_ps(v0), _mm512_loadu_ps(v1));
                for j in 0..SLOTS {
                    let x = _mm512_set1_ps(*s[j].add(o));
                    a[j] = _mm512_fmadd_ps(w0, x, a[j]);
                    b[j] = _mm512_fmadd_ps(w1, x, b[j]);
                }
                v0 = v0.add(16);
                v1 = v1.add(16);
            }
            let [acc0, acc1] = acc;
            for j in 0..SLOTS {
                _mm512_storeu_ps(acc0[j].as_mut_ptr(), a[j]);
                _mm512_storeu_ps(acc1[j].as_mut_ptr(), b[j]);
            }
        }
    }
}

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
#[allow(unsafe_code)]
pub(crate) mod simd128 {
    use std::arch::wasm32::{f32x4_splat, v128, v128_load, v128_store};

    use super::{Acc, SLOTS};

    /// `a + w·b`: one fused multiply-add in the build with relaxed SIMD (the
    /// engine lowers `f32x4.relaxed_madd` to the CPU's FMA, or to a multiply and an
    /// add where it has none: either way within the agreement check's bound), else a
    /// multiply and an add. Only that build holds relaxed instructions: a browser
    /// without them refuses a module that has any, so the page picks the build.
    #[cfg(feature = "relaxed-simd")]
    #[target_feature(enable = "relaxed-simd")]
    #[inline]
    fn madd(a: v128, w: v128, b: v128) -> v128 {
        std::arch::wasm32::f32x4_relaxed_madd(w, b, a)
    }

    #[cfg(not(feature = "relaxed-simd"))]
    #[inline(always)]
    fn madd(a: v128, w: v128, b: v128) -> v128 {
        std::arch::wasm32::f32x4_add(a, std::arch::wasm32::f32x4_mul(w, b))
    }

    /// The kernel's name in device lines: which of the two builds the page loaded.
    pub(crate) const NAME: &str = if cfg!(feature = "relaxed-simd") {
        "direct conv (relaxed SIMD FMA)"
    } else {
        "direct conv (SIMD128)"
    };

    /// Slots per pass: 8 accumulators and 4 vectors fit the 16 registers a wasm
    /// engine has on x86-64. (Six slots over eight lanes per pass, 12 accumulators,
    /// ran ~20 % slower in Chromium.)
    const PASS: usize = 2;
    const _: () = assert!(SLOTS % PASS == 0);

    /// The loop of [`super::tile`], two slots at a time.
    ///
    /// # Safety
    /// `vecs` points at `outer.len()` rows of 16 floats; `src + outer[i] + inner[j]`
    /// is readable for every i, j.
    #[cfg_attr(feature = "relaxed-simd", target_feature(enable = "relaxed-simd"))]
    pub(super) unsafe fn tile(
        vecs: *const f32,
        src: *const f32,
        outer: &[u32],
        inner: &[usize; SLOTS],
        acc: &mut Acc,
    ) {
        // SAFETY (whole body): reads within the bounds the caller guarantees; `acc`'s
        // rows are 16 floats, read and written as four quarters.
        unsafe {
            for first in (0..SLOTS).step_by(PASS) {
                let mut a = [[f32x4_splat(0.0); 4]; PASS];
                for (j, row) in a.iter_mut().enumerate() {
                    for (q, v) in row.iter_mut().enumerate() {
                        *v = v128_load(acc[first + j].as_ptr().add(4 * q).cast::<v128>());
                    }
                }
                let s: [*const f32; PASS] = std::array::from_fn(|j| src.add(inner[first + j]));
                let mut v = vecs;
                for &o in outer {
                    let o = o as usize;
                    let w = [
                        v128_load(v.cast::<v128>()),
                        v128_load(v.add(4).cast::<v128>()),
                        v128_load(v.add(8).cast::<v128>()),
                        v128_load(v.add(12).cast::<v128>()),
                    ];
                    for j in 0..PASS {
                        let b = f32x4_splat(*s[j].add(o));
                        for q in 0..4 {
                            a[j][q] = madd(a[j][q], w[q], b);
                        }
                    }
                    v = v.add(16);
                }
                for (j, row) in a.iter().enumerate() {
                    for (q, &x) in row.iter().enumerate() {
                        v128_store(acc[first + j].as_mut_ptr().add(4 * q).cast::<v128>(), x);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(vecs: &[f32], src: &[f32], outer: &[usize], inner: &[usize; SLOTS], acc: &mut Acc) {
        for (i, &o) in outer.iter().enumerate() {
            for j in 0..SLOTS {
                for l in 0..LANES {
                    acc[j][l] += vecs[i * LANES + l] * src[o + inner[j]];
                }
            }
        }
    }

    #[test]
    fn every_kernel_matches_the_naive_loop() {
        let src: Vec<f32> = (0..500).map(|i| (i as f32 * 0.37).sin()).collect();
        let outer: Vec<usize> = (0..37).map(|i| (i * 7) % 300).collect();
        let vecs: Vec<f32> = (0..37 * LANES).map(|i| (i as f32 * 0.11).cos()).collect();
        let inner = [0, 3, 5, 199, 150, 3];
        let start: Acc = std::array::from_fn(|j| std::array::from_fn(|l| (j * 16 + l) as f32));
        let mut want = start;
        naive(&vecs, &src, &outer, &inner, &mut want);
        let offsets = Offsets::new(outer.iter().copied());
        let mut kernels = vec![Kernel::Portable, Kernel::detect()];
        kernels.dedup();
        for kernel in kernels {
            let mut got = start;
            tile(kernel, &vecs, &src, &offsets, &inner, &mut got);
            for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
                assert!((g - w).abs() < 1e-4, "{kernel:?}: {g} vs {w}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "past its source")]
    fn an_offset_past_the_source_is_refused() {
        let src = [0.0; 10];
        let vecs = [0.0; LANES];
        let mut acc = [[0.0; LANES]; SLOTS];
        tile(
            Kernel::detect(),
            &vecs,
            &src,
            &Offsets::new([5]),
            &[0, 0, 0, 0, 0, 5],
            &mut acc,
        );
    }

    #[test]
    #[should_panic(expected = "too few vectors")]
    fn too_few_vectors_are_refused() {
        let mut acc = [[0.0; LANES]; SLOTS];
        tile(
            Kernel::detect(),
            &[0.0; LANES],
            &[0.0; 10],
            &Offsets::new([0, 1]),
            &[0; SLOTS],
            &mut acc,
        );
    }
}
