//! bf16 products on Intel AMX tiles (Xeon Sapphire Rapids and later).
//!
//! Layout (Intel SDM vol. 1 ch. 18, `TDPBF16PS`): a tile holds 16 rows of 64 bytes. The left
//! operand is packed as 16 x 32 bf16 tiles, the right one in the pair-interleaved layout the
//! instruction reads (16 rows of k-pairs x 16 columns), each tile 1 KiB and contiguous. A
//! 32 x 32 block of the output lives in four accumulator tiles while k runs.

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub use imp::*;

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
pub use stub::*;

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod imp {
    use std::arch::asm;

    use rayon::prelude::*;

    use crate::raw::bf16::bf16_bits as bits;
    use crate::raw::ptr::DisjointWrites;

    /// Whether this process may use AMX: the CPU reports AMX-TILE and AMX-BF16 (CPUID leaf 7,
    /// EDX bits 24 and 22) and Linux grants the tile registers
    /// (`arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)`). Asked once per process.
    pub fn available() -> bool {
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(enable)
    }

    fn enable() -> bool {
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
                    out[kk * self.n + j] = crate::raw::bf16::bf16_to_f32(v);
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
        // SAFETY: only reached once `available` succeeded (callers check it); the config is a
        // valid palette-1 layout.
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
    /// # Safety
    /// The pointers must address the packed layouts described above, `c` a writable 32 x 32
    /// block no other thread touches, and tiles must be configured on this thread.
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

    /// `a` [m, k] (f32) times `b` plus `bias` [n]: [m, n] f32. Panics unless
    /// [`available`].
    pub fn matmul(a: &[f32], m: usize, b: &Packed, bias: Option<&[f32]>) -> Vec<f32> {
        assert!(available(), "AMX matmul on a CPU or OS without AMX");
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
        let out = DisjointWrites::new(&mut c.spare_capacity_mut()[..mp * np]);
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
            let (ch, part) = (w / parts, w % parts);
            configure();
            for p in part * per_part..((part + 1) * per_part).min(panels) {
                for g in ch * chunk..((ch + 1) * chunk).min(groups) {
                    // the block's last element is (32g + 31, 32p + 31)
                    let c_block = out.at(g * 32 * np + p * 32, 31 * np + 32) as *mut f32;
                    // SAFETY: group g covers rows 32g..32g+32 < mp and panel p columns
                    // 32p..32p+32 < np of the packed operands and of c [mp, np] (bounds
                    // checked by `at`); each (g, p) block is written by exactly one task.
                    unsafe {
                        block(
                            ap.as_ptr().add(g * 32 * kp),
                            b.data.as_ptr().add(p * 32 * kp),
                            16 * kp,
                            kp / 32,
                            c_block,
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
mod stub {
    //! No AMX off x86_64 Linux: [`available`] says so and nothing else is reached.
    #[derive(Debug)]
    pub struct Packed;

    impl Packed {
        pub fn new(_k: usize, _n: usize, _b: impl Fn(usize, usize) -> f32 + Sync) -> Self {
            unreachable!("AMX is only available on x86_64 Linux")
        }
        pub fn unpack(&self) -> Vec<f32> {
            unreachable!()
        }
    }

    pub fn available() -> bool {
        false
    }

    pub fn matmul(_a: &[f32], _m: usize, _b: &Packed, _bias: Option<&[f32]>) -> Vec<f32> {
        unreachable!()
    }
}
