//! Frozen linear layers in bf16 on the CPU (`--precision bf16`).
//!
//! Both operands of every product are rounded to bf16 (round to nearest even) and the products
//! are summed in f32. On a CPU with Intel AMX (Xeon Sapphire Rapids and later) the products run
//! on the tile unit, several times faster than the f32 GEMM; elsewhere the same numbers come
//! from the f32 GEMM over bf16-rounded operands, at f32 speed. `HARMA_AMX=0` turns AMX off.
//!
//! AMX layout (Intel SDM vol. 1 ch. 18, `TDPBF16PS`): a tile holds 16 rows of 64 bytes. The
//! left operand is packed as 16 x 32 bf16 tiles, the right one in the pair-interleaved layout
//! the instruction reads (16 rows of k-pairs x 16 columns), each tile 1 KiB and contiguous.
//! A 32 x 32 block of the output lives in four accumulator tiles while k runs.

use candle_core::Tensor;
use std::sync::OnceLock;

/// f32 -> bf16 bits, rounding to nearest even (as `half::bf16::from_f32`, branch-free so
/// that the packing loops vectorise); NaN stays NaN.
#[inline(always)]
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
    if x.is_nan() {
        ((b >> 16) as u16) | 0x40
    } else {
        rounded
    }
}

/// Rounds to the nearest bf16 (ties to even) and back to f32.
#[inline(always)]
pub fn round_bf16(x: f32) -> f32 {
    f32::from_bits((bf16_bits(x) as u32) << 16)
}

/// An f32 CPU tensor rounded to bf16 (ties to even), for keeping an activation in half the
/// memory; in parallel, as Candle's conversion runs on one thread.
pub fn store_bf16(t: &Tensor) -> candle_core::Result<Tensor> {
    map_cpu(t, |x: f32| half::bf16::from_bits(bf16_bits(x)))
}

/// Back from [`store_bf16`] to f32 (exact), in parallel; an f32 tensor is returned as it is.
pub fn load_f32(t: &Tensor) -> candle_core::Result<Tensor> {
    if t.dtype() == candle_core::DType::F32 {
        return Ok(t.clone());
    }
    map_cpu(t, |x: half::bf16| {
        f32::from_bits((x.to_bits() as u32) << 16)
    })
}

/// `f` on every element of a CPU tensor, in parallel, into a new contiguous tensor.
fn map_cpu<A, B>(t: &Tensor, f: impl Fn(A) -> B + Sync) -> candle_core::Result<Tensor>
where
    A: candle_core::WithDType,
    B: candle_core::WithDType + Default,
{
    use rayon::prelude::*;
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("bf16 storage: CPU tensors only");
    };
    let (a, b) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("bf16 storage: not contiguous".into()))?;
    let src = &A::cpu_storage_as_slice(cpu)?[a..b];
    let mut out = vec![B::default(); src.len()];
    out.par_chunks_mut(1 << 14)
        .zip(src.par_chunks(1 << 14))
        .for_each(|(o, i)| o.iter_mut().zip(i).for_each(|(o, &x)| *o = f(x)));
    drop(storage);
    Tensor::from_vec(out, t.shape(), t.device())
}

/// Whether the AMX path runs here: the CPU has AMX-BF16, the OS lets this process use the
/// tile registers, and `HARMA_AMX` is not `0`.
pub fn amx_available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| std::env::var("HARMA_AMX").map_or(true, |v| v != "0") && amx::enable())
}

/// A frozen linear layer `y = x w^T + b` with bf16 operands and f32 sums. The weight is kept
/// in the two layouts its forward (`x w^T`) and input gradient (`g w`) read.
#[derive(Debug)]
pub struct Bf16Linear {
    pub in_dim: usize,
    pub out_dim: usize,
    bias: Option<Vec<f32>>,
    kernel: Kernel,
}

#[derive(Debug)]
enum Kernel {
    /// AMX tiles: `w^T` [in, out] and `w` [out, in], packed.
    Amx { fwd: amx::Packed, bwd: amx::Packed },
    /// The f32 GEMM on bf16-rounded values: `w^T` [in, out], row-major.
    F32(Vec<f32>),
}

impl Bf16Linear {
    /// From `w_t` [in, out] (row-major, f32) and an optional bias [out] (kept in f32); on AMX
    /// when `amx` is set (callers pass [`amx_available`]).
    pub fn new(
        w_t: &[f32],
        in_dim: usize,
        out_dim: usize,
        bias: Option<Vec<f32>>,
        amx: bool,
    ) -> Self {
        assert_eq!(w_t.len(), in_dim * out_dim, "bf16 linear: weight size");
        if let Some(b) = &bias {
            assert_eq!(b.len(), out_dim, "bf16 linear: bias size");
        }
        let kernel = if amx {
            Kernel::Amx {
                fwd: amx::Packed::new(in_dim, out_dim, |k, n| w_t[k * out_dim + n]),
                bwd: amx::Packed::new(out_dim, in_dim, |k, n| w_t[n * out_dim + k]),
            }
        } else {
            Kernel::F32(w_t.iter().map(|&v| round_bf16(v)).collect())
        };
        Self {
            in_dim,
            out_dim,
            bias,
            kernel,
        }
    }

    /// Whether this layer runs on AMX.
    pub fn on_amx(&self) -> bool {
        matches!(self.kernel, Kernel::Amx { .. })
    }

    /// The weight as the products see it: `w^T` [in, out], bf16-rounded, in f32.
    pub fn weight_t(&self) -> Vec<f32> {
        match &self.kernel {
            Kernel::Amx { fwd, .. } => fwd.unpack(),
            Kernel::F32(w) => w.clone(),
        }
    }

    /// `x` [rows, in] -> `x w^T + b` [rows, out].
    pub fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        assert_eq!(x.len(), rows * self.in_dim, "bf16 linear: input size");
        match &self.kernel {
            Kernel::Amx { fwd, .. } => amx::matmul(x, rows, fwd, self.bias.as_deref()),
            Kernel::F32(w_t) => {
                let x: Vec<f32> = x.iter().map(|&v| round_bf16(v)).collect();
                let dims = (rows, self.in_dim, self.out_dim);
                crate::kernels::linear_f32(&x, w_t, self.bias.as_deref(), dims)
            }
        }
    }

    /// The input gradient: `g` [rows, out] -> `g w` [rows, in].
    pub fn backward(&self, g: &[f32], rows: usize) -> Vec<f32> {
        assert_eq!(g.len(), rows * self.out_dim, "bf16 linear: gradient size");
        match &self.kernel {
            Kernel::Amx { bwd, .. } => amx::matmul(g, rows, bwd, None),
            Kernel::F32(w) => {
                let mut y = vec![0.0; rows * self.in_dim];
                let g: Vec<f32> = g.iter().map(|&v| round_bf16(v)).collect();
                let (k, n) = (self.out_dim, self.in_dim);
                // w [k = out, n = in] is w_t read transposed
                crate::kernels::gemm_acc(&mut y, &g, rows, k, n, (w, 1, k as isize));
                y
            }
        }
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod amx {
    use std::arch::asm;

    use rayon::prelude::*;

    use super::bf16_bits as bits;

    /// Asks Linux for the tile registers (`arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)`), once
    /// the CPU reports AMX-TILE and AMX-BF16 (CPUID leaf 7, EDX bits 24 and 22).
    pub fn enable() -> bool {
        let max_leaf = std::arch::x86_64::__cpuid(0).eax;
        if max_leaf < 7 {
            return false;
        }
        let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
        if edx & (1 << 24) == 0 || edx & (1 << 22) == 0 {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain system call with integer arguments.
        unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            ) == 0
        }
    }

    fn up(x: usize, to: usize) -> usize {
        x.div_ceil(to) * to
    }

    /// A right-hand operand `b` [k, n], padded with zeros to multiples of 32, as tiles of 16
    /// columns: tile-column `t` holds `[kp / 2][16][2]` (k-pairs interleaved).
    #[derive(Debug)]
    pub struct Packed {
        k: usize,
        n: usize,
        kp: usize,
        np: usize,
        data: Vec<u16>,
    }

    impl Packed {
        pub fn new(k: usize, n: usize, b: impl Fn(usize, usize) -> f32 + Sync) -> Self {
            let (kp, np) = (up(k, 32), up(n, 32));
            let mut data = vec![0u16; kp * np];
            data.par_chunks_mut(kp * 16)
                .enumerate()
                .for_each(|(t, tile_col)| {
                    for kk in 0..k {
                        for c in 0..16 {
                            let j = t * 16 + c;
                            if j < n {
                                tile_col[((kk / 2) * 16 + c) * 2 + kk % 2] = bits(b(kk, j));
                            }
                        }
                    }
                });
            Self { k, n, kp, np, data }
        }

        /// Back to row-major [k, n] f32.
        pub fn unpack(&self) -> Vec<f32> {
            let mut out = vec![0f32; self.k * self.n];
            for kk in 0..self.k {
                for j in 0..self.n {
                    let v =
                        self.data[(j / 16) * self.kp * 16 + ((kk / 2) * 16 + j % 16) * 2 + kk % 2];
                    out[kk * self.n + j] = half::bf16::from_bits(v).to_f32();
                }
            }
            out
        }
    }

    /// The left operand `a` [m, k] in bf16, padded to [mp, kp], as 16-row strips of
    /// `[kp / 32][16][32]` tiles.
    fn pack_a(a: &[f32], m: usize, k: usize, mp: usize, kp: usize) -> Vec<u16> {
        let mut out = vec![0u16; mp * kp];
        out.par_chunks_mut(kp * 16)
            .enumerate()
            .for_each(|(s, strip)| {
                for r in 0..16 {
                    let i = s * 16 + r;
                    if i >= m {
                        break;
                    }
                    // 32 consecutive values of the row go to one tile row: contiguous, so
                    // the conversion vectorises
                    for (t, src) in a[i * k..(i + 1) * k].chunks(32).enumerate() {
                        let dst = &mut strip[(t * 16 + r) * 32..][..src.len()];
                        for (d, &v) in dst.iter_mut().zip(src) {
                            *d = bits(v);
                        }
                    }
                }
            });
        out
    }

    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    /// Sets all eight tiles to 16 rows of 64 bytes, on this thread.
    fn configure() {
        let mut c = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        for t in 0..8 {
            c.colsb[t] = 64;
            c.rows[t] = 16;
        }
        // SAFETY: only called once `enable` succeeded; the config is a valid palette-1 layout.
        unsafe { asm!("ldtilecfg [{}]", in(reg) &c as *const TileConfig, options(nostack)) };
    }

    fn release() {
        // SAFETY: releases this thread's tile state; valid whether or not tiles are in use.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }

    /// One 32 x 32 output block: `c = bias + a b` over `kt` steps of 32, `a` two 16-row strips
    /// (`strip` elements apart), `b` two 16-column tile-columns (`strip` apart as well, both
    /// have kp * 16 elements), `c` row stride `ldc` floats, `bias` 32 floats broadcast to rows.
    ///
    /// SAFETY: the pointers must address the packed layouts described above, `c` a writable
    /// 32 x 32 block, and tiles must be configured on this thread.
    unsafe fn block(
        a: *const u16,
        b: *const u16,
        strip: usize,
        kt: usize,
        c: *mut f32,
        ldc: usize,
        bias: *const f32,
    ) {
        // SAFETY: see the function's contract.
        unsafe {
            let (sc, zero, s64) = (ldc * 4, 0usize, 64usize);
            asm!(
                "tileloadd tmm0, [{b0} + {z}*1]",
                "tileloadd tmm1, [{b1} + {z}*1]",
                "tileloadd tmm2, [{b0} + {z}*1]",
                "tileloadd tmm3, [{b1} + {z}*1]",
                b0 = in(reg) bias, b1 = in(reg) bias.add(16), z = in(reg) zero,
                options(nostack, readonly),
            );
            for t in 0..kt {
                let (a0, b0) = (a.add(t * 512), b.add(t * 512));
                asm!(
                    "tileloadd tmm4, [{a0} + {s}*1]",
                    "tileloadd tmm5, [{a1} + {s}*1]",
                    "tileloadd tmm6, [{b0} + {s}*1]",
                    "tileloadd tmm7, [{b1} + {s}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) a0, a1 = in(reg) a0.add(strip), b0 = in(reg) b0, b1 = in(reg) b0.add(strip),
                    s = in(reg) s64,
                    options(nostack, readonly),
                );
            }
            asm!(
                "tilestored [{c0} + {s}*1], tmm0",
                "tilestored [{c1} + {s}*1], tmm1",
                "tilestored [{c2} + {s}*1], tmm2",
                "tilestored [{c3} + {s}*1], tmm3",
                c0 = in(reg) c, c1 = in(reg) c.add(16), c2 = in(reg) c.add(16 * ldc),
                c3 = in(reg) c.add(16 * ldc + 16), s = in(reg) sc,
                options(nostack),
            );
        }
    }

    /// `a` [m, k] (f32) times `b` plus `bias` [n]: [m, n] f32.
    pub fn matmul(a: &[f32], m: usize, b: &Packed, bias: Option<&[f32]>) -> Vec<f32> {
        let (k, n, kp, np) = (b.k, b.n, b.kp, b.np);
        assert_eq!(a.len(), m * k);
        if m == 0 || n == 0 {
            return vec![0.0; m * n];
        }
        let mp = up(m, 32);
        let ap = pack_a(a, m, k, mp, kp);
        let mut bias_p = vec![0f32; np];
        if let Some(bias) = bias {
            bias_p[..n].copy_from_slice(bias);
        }
        // the output itself when no padding is needed, else a padded buffer
        let direct = mp == m && np == n;
        // every element is written below (the blocks tile [mp, np]): no zeroing pass
        let mut c: Vec<f32> = Vec::with_capacity(mp * np);
        // tasks write disjoint 32 x 32 blocks
        let out = crate::kernels::SendPtr(c.as_mut_ptr());
        let groups = mp / 32;
        let panels = np / 32;
        // up to 4 row-groups (128 rows) per task, all column panels; split the columns when
        // there are too few row chunks to keep the threads busy
        let chunk = 4;
        let chunks = groups.div_ceil(chunk);
        let threads = rayon::current_num_threads().max(1);
        let parts = (2 * threads).div_ceil(chunks).clamp(1, panels);
        let per_part = panels.div_ceil(parts);
        (0..chunks * parts).into_par_iter().for_each(|w| {
            let out = &out;
            let (ch, part) = (w / parts, w % parts);
            configure();
            for p in part * per_part..((part + 1) * per_part).min(panels) {
                for g in ch * chunk..((ch + 1) * chunk).min(groups) {
                    // SAFETY: group g covers rows 32g..32g+32 < mp and panel p columns
                    // 32p..32p+32 < np of the packed operands and of c [mp, np]; each
                    // (g, p) block is written by exactly one task.
                    unsafe {
                        block(
                            ap.as_ptr().add(g * 32 * kp),
                            b.data.as_ptr().add(p * 32 * kp),
                            16 * kp,
                            kp / 32,
                            out.0.add(g * 32 * np + p * 32),
                            np,
                            bias_p.as_ptr().add(p * 32),
                        )
                    };
                }
            }
            release();
        });
        // SAFETY: the chunks cover every row group and the parts every column panel, and each
        // block stores all 32 x 32 of its elements, so all mp * np values are initialised.
        unsafe { c.set_len(mp * np) };
        if direct {
            return c;
        }
        let mut y = vec![0f32; m * n];
        y.par_chunks_mut(n.max(1))
            .zip(c.par_chunks(np))
            .for_each(|(yr, cr)| yr.copy_from_slice(&cr[..n]));
        y
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
mod amx {
    //! No AMX off x86_64 Linux: [`enable`] says so and nothing else is reached.
    #[derive(Debug)]
    pub struct Packed;

    impl Packed {
        pub fn new(_k: usize, _n: usize, _b: impl Fn(usize, usize) -> f32 + Sync) -> Self {
            unreachable!("AMX is only enabled on x86_64 Linux")
        }
        pub fn unpack(&self) -> Vec<f32> {
            unreachable!()
        }
    }

    pub fn enable() -> bool {
        false
    }

    pub fn matmul(_a: &[f32], _m: usize, _b: &Packed, _bias: Option<&[f32]>) -> Vec<f32> {
        unreachable!()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// f64 sums of bf16-rounded operands: what both kernels must compute, up to f32 rounding.
    fn reference(
        x: &[f32],
        w_t: &[f32],
        b: Option<&[f32]>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Vec<f64> {
        let mut y = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = b.map_or(0.0, |b| b[j] as f64);
                for kk in 0..k {
                    s += round_bf16(x[i * k + kk]) as f64 * round_bf16(w_t[kk * n + j]) as f64;
                }
                y[i * n + j] = s;
            }
        }
        y
    }

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0
            })
            .collect()
    }

    fn max_err(got: &[f32], want: &[f64]) -> f64 {
        got.iter()
            .zip(want)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max)
    }

    fn check(amx: bool) {
        // shapes that need padding in every dimension, and one that needs none
        for (m, k, n) in [(37, 45, 50), (64, 96, 32), (1, 7, 3), (33, 64, 65)] {
            let (x, w_t, b) = (values(m * k, 1), values(k * n, 2), values(n, 3));
            let lin = Bf16Linear::new(&w_t, k, n, Some(b.clone()), amx);
            assert_eq!(lin.on_amx(), amx);
            let y = lin.forward(&x, m);
            let want = reference(&x, &w_t, Some(&b), m, k, n);
            let err = max_err(&y, &want);
            assert!(err < 1e-5 * k as f64, "forward {m}x{k}x{n}: {err}");
            // input gradient: g [m, n] times w [n, k], i.e. w_t^T
            let g = values(m * n, 4);
            let w: Vec<f32> = (0..n * k).map(|i| w_t[(i % k) * n + i / k]).collect();
            let gx = lin.backward(&g, m);
            let want = reference(&g, &w, None, m, n, k);
            let err = max_err(&gx, &want);
            assert!(err < 1e-5 * n as f64, "backward {m}x{k}x{n}: {err}");
            let rounded: Vec<f32> = w_t.iter().map(|&v| round_bf16(v)).collect();
            assert_eq!(lin.weight_t(), rounded);
        }
    }

    #[test]
    fn bf16_rounding_is_halfs() {
        let mut xs: Vec<f32> = values(10_000, 7).iter().map(|v| v * 1e3).collect();
        // ties (odd and even), extremes, specials
        xs.extend([
            f32::from_bits(0x3F80_8000),
            f32::from_bits(0x3F81_8000),
            f32::MAX,
            f32::MIN_POSITIVE / 3.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ]);
        for x in xs {
            assert_eq!(bf16_bits(x), half::bf16::from_f32(x).to_bits(), "{x:e}");
            assert_eq!(round_bf16(x), half::bf16::from_f32(x).to_f32());
        }
        assert!(round_bf16(f32::NAN).is_nan());
    }

    #[test]
    fn f32_kernel_computes_bf16_products() {
        check(false);
    }

    /// Runs where the CPU has AMX (this project's development and CI machines do); says so
    /// where it cannot.
    #[test]
    fn amx_kernel_computes_bf16_products() {
        if !amx_available() {
            eprintln!("no AMX on this CPU: the AMX kernel is not tested here");
            return;
        }
        check(true);
    }
}
