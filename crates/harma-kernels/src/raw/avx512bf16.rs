//! bf16 products on AVX512-BF16 (`VDPBF16PS`: AMD Zen 4 and later, Intel Cooper Lake and
//! later): each instruction adds to 16 f32 lanes the two products of a pair of bf16 values.
//!
//! The right-hand operand (a frozen weight) is packed once, at load, in panels of 64 columns:
//! for each pair of rows k, k+1, 64 lanes of `(b[k][j], b[k+1][j])` as two bf16 in a `u32`
//! (the pairs the instruction reads; the layout AMX's tiles read too). The left operand (the
//! activations) is rounded to bf16 row by row, its pairs `(a[i][k], a[i][k+1])` broadcast to
//! every lane. A 6 x 64 block of the output lives in 24 registers while k runs.
//!
//! Numbers: a product of two bf16 values is exact in f32, so every output is the f32 sum of
//! the same exact products the other kernels sum (over k in pairs, odd product first, with
//! denormals flushed to zero as the instruction does); only the order of the f32 additions
//! differs.

#[cfg(target_arch = "x86_64")]
pub use imp::*;

#[cfg(not(target_arch = "x86_64"))]
pub use stub::*;

/// Output columns per panel (four registers of 16 lanes).
const NR: usize = 64;
/// Output rows per register block.
const MR: usize = 6;

#[cfg(target_arch = "x86_64")]
mod imp {
    use std::arch::x86_64::*;

    use rayon::prelude::*;

    use super::{MR, NR};
    use crate::raw::bf16::bf16_bits;
    use crate::raw::ptr::DisjointWrites;

    /// Whether this CPU has AVX512-BF16 (and AVX-512 F, which it implies).
    pub fn available() -> bool {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
    }

    /// Two f32 values as the pair of bf16 (round to nearest even) in one `u32`, `lo` first.
    #[inline(always)]
    fn pair(lo: f32, hi: f32) -> u32 {
        bf16_bits(lo) as u32 | (bf16_bits(hi) as u32) << 16
    }

    /// A right-hand operand `b` [k, n], rounded to bf16 and packed in panels of [`NR`]
    /// columns: panel `t` holds `[kp][NR]` pairs (`kp` = k / 2 rounded up), zero-padded.
    #[derive(Debug)]
    pub struct Packed {
        k: usize,
        n: usize,
        kp: usize,
        data: Vec<u32>,
    }

    impl Packed {
        /// From `b` [k, n], row-major f32.
        pub fn from_rows(b: &[f32], k: usize, n: usize) -> Self {
            assert_eq!(b.len(), k * n, "avx512-bf16 packing: operand size");
            let kp = k.div_ceil(2);
            let panels = n.div_ceil(NR);
            let mut data = vec![0u32; panels * kp * NR];
            data.par_chunks_mut(kp * NR)
                .enumerate()
                .for_each(|(t, panel)| {
                    let cols = t * NR..(t * NR + NR).min(n);
                    let width = cols.len();
                    for (p, dst) in panel.chunks_exact_mut(NR).enumerate() {
                        let dst = &mut dst[..width];
                        let lo = &b[2 * p * n..][cols.clone()];
                        if 2 * p + 1 < k {
                            let hi = &b[(2 * p + 1) * n..][cols.clone()];
                            for ((d, &l), &h) in dst.iter_mut().zip(lo).zip(hi) {
                                *d = pair(l, h);
                            }
                        } else {
                            for (d, &l) in dst.iter_mut().zip(lo) {
                                *d = pair(l, 0.0);
                            }
                        }
                    }
                });
            Self { k, n, kp, data }
        }

        /// The bf16 bits of element (`kk`, `j`).
        #[inline(always)]
        fn bits(&self, kk: usize, j: usize) -> u16 {
            let v = self.data[(j / NR) * self.kp * NR + (kk / 2) * NR + j % NR];
            if kk.is_multiple_of(2) {
                v as u16
            } else {
                (v >> 16) as u16
            }
        }

        /// Back to row-major [k, n] f32 (the bf16-rounded values).
        pub fn unpack(&self) -> Vec<f32> {
            let mut out = vec![0f32; self.k * self.n];
            for kk in 0..self.k {
                for j in 0..self.n {
                    out[kk * self.n + j] = crate::raw::bf16::bf16_to_f32(self.bits(kk, j));
                }
            }
            out
        }

        /// The transpose, `b^T` [n, k], packed: what a frozen layer's input gradient
        /// multiplies by, made from the forward's packing when needed instead of kept beside
        /// it (half the weights' memory; it costs `k n` copies against the product's `m k n`
        /// multiply-adds). The values are the same bf16 values, bit for bit.
        pub fn transposed(&self) -> Packed {
            let (k, n) = (self.n, self.k);
            let kp = k.div_ceil(2);
            let mut data = vec![0u32; n.div_ceil(NR) * kp * NR];
            data.par_chunks_mut(kp * NR)
                .enumerate()
                .for_each(|(t, panel)| {
                    // columns t*NR.. of b^T are rows t*NR.. of b: pair rows t*NR/2.. of self
                    let pairs = (NR / 2).min(self.kp - t * NR / 2);
                    for p in 0..kp {
                        // rows 2p, 2p + 1 of b^T are columns j, j + 1 of b, side by side
                        // in one of self's panels (j even, NR even)
                        let j = 2 * p;
                        let src = &self.data[(j / NR) * self.kp * NR + j % NR..];
                        let dst = &mut panel[p * NR..(p + 1) * NR];
                        for r in 0..pairs {
                            // a = (b[2r][j], b[2r+1][j]), c = (b[2r][j+1], b[2r+1][j+1])
                            let a = src[(t * NR / 2 + r) * NR];
                            let c = src[(t * NR / 2 + r) * NR + 1];
                            dst[2 * r] = (a & 0xffff) | c << 16;
                            dst[2 * r + 1] = a >> 16 | (c & 0xffff_0000);
                        }
                    }
                });
            Packed { k, n, kp, data }
        }
    }

    /// The left operand `a` [m, k] as rows of bf16 pairs [m, kp], rows in parallel in groups
    /// (a task per row cost more than its rounding).
    fn pack_a(a: &[f32], m: usize, k: usize, kp: usize) -> Vec<u32> {
        let mut out = vec![0u32; m * kp];
        out.par_chunks_mut(kp.max(1))
            .zip(a.par_chunks(k.max(1)))
            .take(m)
            .with_min_len(16)
            // SAFETY: `matmul`, the only caller, checked that the CPU has AVX512-BF16 (which
            // implies AVX-512 F).
            .for_each(|(dst, row)| unsafe { pack_row(dst, row) });
        out
    }

    /// One row of [`pack_a`], compiled for AVX-512 so that the rounding vectorises.
    #[target_feature(enable = "avx512f")]
    fn pack_row(dst: &mut [u32], row: &[f32]) {
        let pairs = row.chunks_exact(2);
        let last = pairs.remainder().first().copied();
        for (d, p) in dst.iter_mut().zip(pairs) {
            *d = pair(p[0], p[1]);
        }
        if let Some(lo) = last {
            dst[row.len() / 2] = pair(lo, 0.0);
        }
    }

    /// `ROWS` rows (at most [`MR`]) of one panel: `c[r][0..width] = bias + sum_p a[r][p] . b[p]`.
    ///
    /// # Safety
    /// The CPU must have AVX512-BF16; `a` must hold `ROWS` rows of `kp` pairs, `lda` apart;
    /// `b` the panel's `kp * NR` pairs; `bias` [`NR`] floats; `c` `ROWS` rows of `width`
    /// (<= NR) writable floats, `ldc` apart, that no other thread touches.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn block<const ROWS: usize>(
        a: *const u32,
        lda: usize,
        b: *const u32,
        kp: usize,
        bias: *const f32,
        c: *mut f32,
        ldc: usize,
        width: usize,
    ) {
        // SAFETY: the pointers address what the function's contract says.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 4]; ROWS];
            for j in 0..4 {
                let bv = _mm512_loadu_ps(bias.add(16 * j));
                for row in acc.iter_mut() {
                    row[j] = bv;
                }
            }
            for p in 0..kp {
                let bp = b.add(p * NR) as *const __m512i;
                let bv: [__m512bh; 4] = [
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bp)),
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bp.add(1))),
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bp.add(2))),
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(bp.add(3))),
                ];
                for (r, row) in acc.iter_mut().enumerate() {
                    let av = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                        *a.add(r * lda + p) as i32,
                    ));
                    for j in 0..4 {
                        row[j] = _mm512_dpbf16_ps(row[j], av, bv[j]);
                    }
                }
            }
            for (r, row) in acc.iter().enumerate() {
                let dst = c.add(r * ldc);
                for (j, v) in row.iter().enumerate() {
                    let col = 16 * j;
                    if col + 16 <= width {
                        _mm512_storeu_ps(dst.add(col), *v);
                    } else if col < width {
                        let mask: __mmask16 = (1u32 << (width - col)) as u16 - 1;
                        _mm512_mask_storeu_ps(dst.add(col), mask, *v);
                    }
                }
            }
        }
    }

    /// [`block`] for `rows` (1..=[`MR`]) rows.
    ///
    /// # Safety
    /// As [`block`], with `rows` rows.
    #[allow(clippy::too_many_arguments)]
    unsafe fn block_rows(
        rows: usize,
        a: *const u32,
        lda: usize,
        b: *const u32,
        kp: usize,
        bias: *const f32,
        c: *mut f32,
        ldc: usize,
        width: usize,
    ) {
        // SAFETY: forwarded; `available` was checked by the caller.
        unsafe {
            match rows {
                6 => block::<6>(a, lda, b, kp, bias, c, ldc, width),
                5 => block::<5>(a, lda, b, kp, bias, c, ldc, width),
                4 => block::<4>(a, lda, b, kp, bias, c, ldc, width),
                3 => block::<3>(a, lda, b, kp, bias, c, ldc, width),
                2 => block::<2>(a, lda, b, kp, bias, c, ldc, width),
                1 => block::<1>(a, lda, b, kp, bias, c, ldc, width),
                _ => unreachable!("1 to {MR} rows"),
            }
        }
    }

    /// `a` [m, k] (f32, rounded to bf16 here) times `b` plus `bias` [n]: [m, n] f32. Panics
    /// unless [`available`].
    pub fn matmul(a: &[f32], m: usize, b: &Packed, bias: Option<&[f32]>) -> Vec<f32> {
        assert!(available(), "AVX512-BF16 matmul on a CPU without it");
        let (k, n, kp) = (b.k, b.n, b.kp);
        assert_eq!(a.len(), m * k, "avx512-bf16 matmul: left operand size");
        if let Some(bias) = bias {
            assert_eq!(bias.len(), n, "avx512-bf16 matmul: bias size");
        }
        if m == 0 || n == 0 {
            return vec![0f32; m * n];
        }
        // not zero-filled: the blocks below write every element
        let mut c: Vec<f32> = Vec::with_capacity(m * n);
        let ap = pack_a(a, m, k, kp);
        let panels = n.div_ceil(NR);
        let mut bias_p = vec![0f32; panels * NR];
        if let Some(bias) = bias {
            bias_p[..n].copy_from_slice(bias);
        }
        let out = DisjointWrites::new(&mut c.spare_capacity_mut()[..m * n]);
        // row chunks of up to 8 register blocks (48 rows), times parts of the panels when
        // there are too few chunks to keep the threads busy
        let chunk = 8 * MR;
        let chunks = m.div_ceil(chunk);
        let threads = rayon::current_num_threads().max(1);
        let parts = (2 * threads).div_ceil(chunks).clamp(1, panels);
        let per_part = panels.div_ceil(parts);
        (0..chunks * parts).into_par_iter().for_each(|w| {
            let (ch, part) = (w / parts, w % parts);
            let rows = ch * chunk..((ch + 1) * chunk).min(m);
            for t in part * per_part..((part + 1) * per_part).min(panels) {
                let width = NR.min(n - t * NR);
                for r0 in rows.clone().step_by(MR) {
                    let nr = MR.min(rows.end - r0);
                    // rows r0..r0+nr, columns t*NR..t*NR+width of c [m, n]
                    let dst = out.at(r0 * n + t * NR, (nr - 1) * n + width) as *mut f32;
                    // SAFETY: AVX512-BF16 is available (checked above); the packed operands
                    // hold rows r0..r0+nr of kp pairs and panel t of kp * NR pairs; bias_p
                    // holds NR floats from t * NR; the block of c is inside it (checked by
                    // `at`) and written by this task only (each (chunk, panel) pair is one
                    // task's, each row block one iteration's).
                    unsafe {
                        block_rows(
                            nr,
                            ap.as_ptr().add(r0 * kp),
                            kp,
                            b.data.as_ptr().add(t * kp * NR),
                            kp,
                            bias_p.as_ptr().add(t * NR),
                            dst,
                            n,
                            width,
                        )
                    };
                }
            }
        });
        // SAFETY: the tasks above wrote all m * n elements: the chunks cover rows 0..m, the
        // parts cover panels 0..panels, and each block writes its nr rows by `width` columns,
        // the panels' widths adding up to n.
        unsafe { c.set_len(m * n) };
        c
    }

    /// The instruction's throughput on this machine, in GFLOP/s per thread: `iters` rounds
    /// of 12 independent `VDPBF16PS` on registers (64 flops each), no memory traffic: the
    /// peak a GEMM on this kernel can approach. Panics unless [`available`].
    pub fn peak_gflops(iters: usize) -> f64 {
        assert!(available(), "AVX512-BF16 peak on a CPU without it");
        // Twelve independent accumulators, each its own variable: enough chains to cover the
        // instruction's latency, and all in registers (an array of them was kept in memory and
        // measured 0.4-0.65x of this).
        macro_rules! spin {
            ($($a:ident),*) => {
                #[target_feature(enable = "avx512f,avx512bf16")]
                fn spin(iters: usize) -> f32 {
                    let one = unsafe_cast(_mm512_set1_epi32(0x3F80_3F80));
                    $(let mut $a = _mm512_setzero_ps();)*
                    for _ in 0..iters {
                        $($a = _mm512_dpbf16_ps($a, one, one);)*
                    }
                    0.0 $(+ _mm512_reduce_add_ps($a))*
                }
            };
        }
        spin!(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11);
        const CHAINS: usize = 12;
        #[target_feature(enable = "avx512f,avx512bf16")]
        fn unsafe_cast(x: __m512i) -> __m512bh {
            // SAFETY: both are 64 bytes of plain bits.
            unsafe { std::mem::transmute::<__m512i, __m512bh>(x) }
        }
        let t = std::time::Instant::now();
        // SAFETY: AVX512-BF16 is available (checked above).
        let s = unsafe { spin(iters) };
        let secs = t.elapsed().as_secs_f64();
        std::hint::black_box(s);
        (iters * CHAINS * 64) as f64 / secs / 1e9
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// The transpose made from a packing holds the same bf16 values, bit for bit, at every
        /// shape (odd and even sizes, less and more than a panel).
        #[test]
        fn the_transposed_packing_is_the_transpose() {
            // Packed::transposed is only used with the AVX512-BF16 kernel
            if !crate::testing::runs(crate::Bf16Kernel::Avx512) {
                return;
            }
            for (k, n) in [(1, 1), (7, 3), (64, 64), (45, 130), (130, 45), (768, 97)] {
                let b = |i: usize, j: usize| ((i * 131 + j * 71) % 997) as f32 / 997.0 - 0.5;
                let bv: Vec<f32> = (0..k * n).map(|i| b(i / n, i % n)).collect();
                let p = Packed::from_rows(&bv, k, n);
                let t = p.transposed();
                assert_eq!((t.k, t.n), (n, k));
                let (pu, tu) = (p.unpack(), t.unpack());
                for i in 0..k {
                    for j in 0..n {
                        assert_eq!(
                            tu[j * k + i].to_bits(),
                            pu[i * n + j].to_bits(),
                            "{k}x{n} at {i},{j}"
                        );
                    }
                }
                // and the padding stays zero: packing b^T directly gives the same words
                let bt: Vec<f32> = (0..n * k).map(|i| b(i % k, i / k)).collect();
                let direct = Packed::from_rows(&bt, n, k);
                assert_eq!(t.data, direct.data, "{k}x{n}");
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod stub {
    //! No AVX512-BF16 off x86_64: [`available`] says so and nothing else is reached.
    #[derive(Debug)]
    pub struct Packed;

    impl Packed {
        pub fn from_rows(_b: &[f32], _k: usize, _n: usize) -> Self {
            unreachable!("AVX512-BF16 is x86_64 only")
        }
        pub fn unpack(&self) -> Vec<f32> {
            unreachable!()
        }
        pub fn transposed(&self) -> Packed {
            unreachable!()
        }
    }

    pub fn available() -> bool {
        false
    }

    pub fn matmul(_a: &[f32], _m: usize, _b: &Packed, _bias: Option<&[f32]>) -> Vec<f32> {
        unreachable!()
    }

    pub fn peak_gflops(_iters: usize) -> f64 {
        unreachable!()
    }
}
