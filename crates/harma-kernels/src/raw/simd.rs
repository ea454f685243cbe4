//! Row kernels compiled for the widest vector unit the CPU has (detected at run time): softmax
//! rows and their backward, QuickGELU and its derivative, and a libm-free `exp` that lets those
//! loops vectorise.

/// The vector units the row kernels are compiled for, widest last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SimdLevel {
    /// The baseline x86-64 (SSE2) or the target's default: every CPU
    Baseline,
    /// AVX2 + FMA: x86 CPUs since 2013-2015 (laptops included)
    Avx2,
    /// AVX-512F
    Avx512,
}

impl SimdLevel {
    /// Every level, widest first.
    pub const ALL: [SimdLevel; 3] = [SimdLevel::Avx512, SimdLevel::Avx2, SimdLevel::Baseline];

    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Avx512 => "avx512",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Baseline => "baseline",
        }
    }

    /// Whether this CPU can run code compiled for the level.
    pub fn available(self) -> bool {
        match self {
            SimdLevel::Baseline => true,
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512 => is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The widest level this CPU has.
    pub fn best() -> Self {
        Self::ALL
            .into_iter()
            .find(|l| l.available())
            .unwrap_or(SimdLevel::Baseline)
    }
}

/// Defines `$name`, which runs `$inner` compiled for the widest [`SimdLevel`] the CPU has
/// (detected at run time), so its loops vectorise to the widest unit; and `$at`, the same at a
/// given level (the tests run every level the CPU has).
macro_rules! simd_dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident, $at:ident => $inner:ident($($arg:ident: $ty:ty),*)) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) {
            // SAFETY: `best` is a level this CPU has.
            unsafe { $at::run(SimdLevel::best(), $($arg),*) }
        }

        /// As the function without `_at`, compiled for `level`, which this CPU must have.
        #[allow(dead_code)]
        pub(crate) fn $at(level: SimdLevel, $($arg: $ty),*) {
            assert!(level.available(), "this CPU cannot run {}", level.name());
            // SAFETY: checked just above.
            unsafe { $at::run(level, $($arg),*) }
        }

        #[allow(non_snake_case)]
        mod $at {
            use super::*;

            /// `$inner` compiled for `level`.
            ///
            /// # Safety
            /// The CPU must have `level` ([`SimdLevel::available`]).
            #[inline(always)]
            pub(super) unsafe fn run(level: SimdLevel, $($arg: $ty),*) {
                #[cfg(target_arch = "x86_64")]
                {
                    #[target_feature(enable = "avx512f")]
                    fn avx512($($arg: $ty),*) {
                        $inner($($arg),*)
                    }
                    #[target_feature(enable = "avx2,fma")]
                    fn avx2($($arg: $ty),*) {
                        $inner($($arg),*)
                    }
                    match level {
                        // SAFETY: the caller guarantees the CPU has the level.
                        SimdLevel::Avx512 => return unsafe { avx512($($arg),*) },
                        // SAFETY: as above.
                        SimdLevel::Avx2 => return unsafe { avx2($($arg),*) },
                        SimdLevel::Baseline => {}
                    }
                }
                let _ = level;
                $inner($($arg),*)
            }
        }
    };
}

/// `e^x` in f32 without a libm call, so loops over it vectorise: 2^n times a degree-6
/// polynomial of the remainder |r| <= ln2/2 (relative error below 2e-7 over the f32 range).
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let i = (t.to_bits() as i32) - (ROUND.to_bits() as i32);
    p * f32::from_bits(((i + 127) << 23) as u32)
}

/// Lanes of the partial maxima and sums below: independent accumulators let the loops
/// vectorise (a single running sum or maximum would be a serial chain).
pub(crate) const LANES: usize = 16;

/// `sum_i f(a[i], b[i])` over two slices of one length through [`LANES`] partial sums
/// (element i goes to partial i mod 16, in order; then the partials in order, the tail last):
/// a fixed order, whatever the CPU.
#[inline(always)]
pub(crate) fn lane_sum_with(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let rest: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(&x, &y)| f(x, y))
        .sum();
    for (ca, cb) in ac.zip(bc) {
        for j in 0..LANES {
            acc[j] += f(ca[j], cb[j]);
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// The sum of a slice through [`LANES`] partial sums.
#[inline(always)]
fn lane_sum(x: &[f32]) -> f32 {
    lane_sum_with(x, x, |v, _| v)
}

/// Softmax of one row in place.
#[inline(always)]
fn softmax_row_inner(row: &mut [f32]) {
    let mut m = [f32::NEG_INFINITY; LANES];
    let chunks = row.chunks_exact(LANES);
    let mut max = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    for c in chunks {
        for j in 0..LANES {
            if c[j] > m[j] {
                m[j] = c[j];
            }
        }
    }
    for v in m {
        if v > max {
            max = v;
        }
    }
    for x in row.iter_mut() {
        *x = fast_exp(*x - max);
    }
    let inv = 1.0 / lane_sum(row);
    row.iter_mut().for_each(|x| *x *= inv);
}

/// `dS = P * (dP - rowsum(dP * P)) * scale` for one row, in place over `dp`.
#[inline(always)]
fn softmax_bwd_row_inner(p: &[f32], dp: &mut [f32], scale: f32) {
    let dot = lane_sum_with(p, dp, |a, b| a * b);
    for (g, &pv) in dp.iter_mut().zip(p) {
        *g = pv * (*g - dot) * scale;
    }
}

#[inline(always)]
fn quick_gelu_inner(x: &[f32], o: &mut [f32]) {
    for (o, &x) in o.iter_mut().zip(x) {
        *o = x / (1.0 + fast_exp(-1.702 * x));
    }
}

/// `g *= d/dx [x sigmoid(1.702 x)]` = `s + 1.702 x s (1 - s)`, `s = sigmoid(1.702 x)`.
#[inline(always)]
fn quick_gelu_grad_inner(x: &[f32], g: &mut [f32]) {
    for (g, &x) in g.iter_mut().zip(x) {
        let s = 1.0 / (1.0 + fast_exp(-1.702 * x));
        *g *= s + 1.702 * x * s * (1.0 - s);
    }
}

simd_dispatch!(
    /// Softmax of a row in place.
    pub fn softmax_row, softmax_row_at => softmax_row_inner(row: &mut [f32])
);
simd_dispatch!(
    /// The softmax backward of one row: `dp = p * (dp - <dp, p>) * scale`, in place.
    pub fn softmax_bwd_row, softmax_bwd_row_at => softmax_bwd_row_inner(p: &[f32], dp: &mut [f32], scale: f32)
);
simd_dispatch!(
    /// QuickGELU of a slice: `o = x * sigmoid(1.702 x)`.
    pub fn quick_gelu, quick_gelu_at => quick_gelu_inner(x: &[f32], o: &mut [f32])
);
simd_dispatch!(
    /// The QuickGELU backward of a slice, in place over the output gradient `g`.
    pub fn quick_gelu_grad, quick_gelu_grad_at => quick_gelu_grad_inner(x: &[f32], g: &mut [f32])
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_accurate_over_the_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let rel = ((fast_exp(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        // clamped below: no denormals or NaN from large negative inputs
        assert_eq!(fast_exp(-200.0), fast_exp(-87.0));
        assert!(fast_exp(f32::NEG_INFINITY) >= 0.0);
    }

    /// At every level this CPU has (each forced in turn).
    #[test]
    fn vectorised_softmax_rows_match_the_formula() {
        for level in crate::testing::simd_levels() {
            softmax_rows_match_the_formula_at(level);
        }
    }

    fn softmax_rows_match_the_formula_at(level: SimdLevel) {
        for n in [1, 5, 16, 50, 77, 131] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.7)
                .collect();
            let mut row = x.clone();
            softmax_row_at(level, &mut row);
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let z: f64 = x.iter().map(|&v| (v as f64 - max).exp()).sum();
            for (&got, &v) in row.iter().zip(&x) {
                let want = (v as f64 - max).exp() / z;
                assert!(
                    (got as f64 - want).abs() < 1e-6,
                    "{level:?} n {n}: {got} vs {want}"
                );
            }
            // the backward row: p * (g - <g, p>) * scale
            let g: Vec<f32> = (0..n).map(|i| (i as f32 * 0.3).sin()).collect();
            let mut ds = g.clone();
            softmax_bwd_row_at(level, &row, &mut ds, 0.5);
            let dot: f64 = row.iter().zip(&g).map(|(&p, &g)| p as f64 * g as f64).sum();
            for ((&d, &p), &g) in ds.iter().zip(&row).zip(&g) {
                let want = p as f64 * (g as f64 - dot) * 0.5;
                assert!(
                    (d as f64 - want).abs() < 1e-6,
                    "{level:?} n {n}: {d} vs {want}"
                );
            }
        }
    }

    /// At every level this CPU has (each forced in turn).
    #[test]
    fn quick_gelu_and_its_derivative_match_the_formulas() {
        for level in crate::testing::simd_levels() {
            quick_gelu_matches_the_formulas_at(level);
        }
    }

    fn quick_gelu_matches_the_formulas_at(level: SimdLevel) {
        let x: Vec<f32> = (-400..400).map(|i| i as f32 * 0.025).collect();
        let mut o = vec![0f32; x.len()];
        quick_gelu_at(level, &x, &mut o);
        let mut g = vec![1f32; x.len()];
        quick_gelu_grad_at(level, &x, &mut g);
        for ((&x, &o), &g) in x.iter().zip(&o).zip(&g) {
            let s = 1.0 / (1.0 + (-1.702 * x as f64).exp());
            let want = x as f64 * s;
            assert!(
                (o as f64 - want).abs() < 1e-6 * (1.0 + want.abs()),
                "{level:?} {x}: {o} vs {want}"
            );
            let dwant = s + 1.702 * x as f64 * s * (1.0 - s);
            assert!(
                (g as f64 - dwant).abs() < 1e-6,
                "{level:?} {x}: {g} vs {dwant}"
            );
        }
    }
}
