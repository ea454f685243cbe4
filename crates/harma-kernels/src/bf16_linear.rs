//! Frozen linear layers in bf16 on the CPU (`--precision bf16`).
//!
//! Both operands of every product are rounded to bf16 (round to nearest even) and the products
//! are summed in f32. The products run on the [`Bf16Kernel`] the [`crate::Compute`] names:
//! AMX tiles, AVX512-BF16, or the f32 GEMM over bf16-rounded operands (the same products at
//! f32 speed). The frozen weight is packed for its kernel once, when the layer is built;
//! [`bf16_matmul`] serves products whose right-hand side changes from call to call (a trained
//! adapter's weight, an activation in a weight gradient), packing it for that one product.

use crate::compute::Bf16Kernel;
use crate::raw::bf16::round_bf16;
use crate::raw::gemm::{gemm_acc, linear_f32};
use crate::raw::{amx, avx512bf16};

/// A frozen linear layer `y = x w^T + b` with bf16 operands and f32 sums. On AMX the weight is
/// kept in the two layouts its forward (`x w^T`) and input gradient (`g w`) read; on
/// AVX512-BF16 in the forward's only, the gradient's made from it at each backward.
#[derive(Debug)]
pub struct Bf16Linear {
    pub in_dim: usize,
    pub out_dim: usize,
    bias: Option<Vec<f32>>,
    weights: Weights,
}

#[derive(Debug)]
enum Weights {
    /// AMX tiles: `w^T` [in, out] and `w` [out, in], packed.
    Amx { fwd: amx::Packed, bwd: amx::Packed },
    /// AVX512-BF16 panels: `w^T` [in, out], packed.
    Avx512(avx512bf16::Packed),
    /// For the f32 GEMM: `w^T` [in, out], row-major, bf16-rounded.
    F32(Vec<f32>),
}

impl Bf16Linear {
    /// From `w_t` [in, out] (row-major, f32) and an optional bias [out] (kept in f32), for
    /// `kernel` (which must be [`Bf16Kernel::available`]).
    pub fn new(
        w_t: &[f32],
        in_dim: usize,
        out_dim: usize,
        bias: Option<Vec<f32>>,
        kernel: Bf16Kernel,
    ) -> Self {
        assert_eq!(w_t.len(), in_dim * out_dim, "bf16 linear: weight size");
        if let Some(b) = &bias {
            assert_eq!(b.len(), out_dim, "bf16 linear: bias size");
        }
        assert!(
            kernel.available(),
            "bf16 kernel {kernel} is not available here"
        );
        let weights = match kernel {
            Bf16Kernel::Amx => Weights::Amx {
                fwd: amx::Packed::new(in_dim, out_dim, |k, n| w_t[k * out_dim + n]),
                bwd: amx::Packed::new(out_dim, in_dim, |k, n| w_t[n * out_dim + k]),
            },
            Bf16Kernel::Avx512 => {
                Weights::Avx512(avx512bf16::Packed::from_rows(w_t, in_dim, out_dim))
            }
            Bf16Kernel::F32 => Weights::F32(w_t.iter().map(|&v| round_bf16(v)).collect()),
        };
        Self {
            in_dim,
            out_dim,
            bias,
            weights,
        }
    }

    /// The kernel this layer runs on.
    pub fn kernel(&self) -> Bf16Kernel {
        match self.weights {
            Weights::Amx { .. } => Bf16Kernel::Amx,
            Weights::Avx512(_) => Bf16Kernel::Avx512,
            Weights::F32(_) => Bf16Kernel::F32,
        }
    }

    /// The weight as the products see it: `w^T` [in, out], bf16-rounded, in f32.
    pub fn weight_t(&self) -> Vec<f32> {
        match &self.weights {
            Weights::Amx { fwd, .. } => fwd.unpack(),
            Weights::Avx512(fwd) => fwd.unpack(),
            Weights::F32(w) => w.clone(),
        }
    }

    /// `x` [rows, in] -> `x w^T + b` [rows, out].
    pub fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        assert_eq!(x.len(), rows * self.in_dim, "bf16 linear: input size");
        match &self.weights {
            Weights::Amx { fwd, .. } => amx::matmul(x, rows, fwd, self.bias.as_deref()),
            Weights::Avx512(fwd) => avx512bf16::matmul(x, rows, fwd, self.bias.as_deref()),
            Weights::F32(w_t) => linear_f32(
                &rounded(x),
                w_t,
                self.bias.as_deref(),
                (rows, self.in_dim, self.out_dim),
            ),
        }
    }

    /// The input gradient: `g` [rows, out] -> `g w` [rows, in].
    pub fn backward(&self, g: &[f32], rows: usize) -> Vec<f32> {
        assert_eq!(g.len(), rows * self.out_dim, "bf16 linear: gradient size");
        match &self.weights {
            Weights::Amx { bwd, .. } => amx::matmul(g, rows, bwd, None),
            Weights::Avx512(fwd) => avx512bf16::matmul(g, rows, &fwd.transposed(), None),
            Weights::F32(w) => {
                let mut y = vec![0.0; rows * self.in_dim];
                let (k, n) = (self.out_dim, self.in_dim);
                // w [k = out, n = in] is w_t read transposed
                gemm_acc(&mut y, &rounded(g), rows, k, n, (w, 1, k as isize));
                y
            }
        }
    }
}

/// Every value rounded to bf16 (kept in f32).
fn rounded(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| round_bf16(v)).collect()
}

/// `a` [m, k] times `b` [k, n] (both row-major) plus `bias` [n]: bf16 operands, f32 sums, on
/// `kernel` (which must be [`Bf16Kernel::available`]). `b` is packed for this one product: for
/// right-hand sides that change from call to call. Packing costs `k n` reads against the
/// product's `m k n` multiply-adds.
pub fn bf16_matmul(
    kernel: Bf16Kernel,
    a: &[f32],
    (m, k, n): (usize, usize, usize),
    b: &[f32],
    bias: Option<&[f32]>,
) -> Vec<f32> {
    assert_eq!(a.len(), m * k, "bf16 matmul: left operand size");
    assert_eq!(b.len(), k * n, "bf16 matmul: right operand size");
    match kernel {
        Bf16Kernel::Amx => amx::matmul(a, m, &amx::Packed::new(k, n, |i, j| b[i * n + j]), bias),
        Bf16Kernel::Avx512 => {
            avx512bf16::matmul(a, m, &avx512bf16::Packed::from_rows(b, k, n), bias)
        }
        Bf16Kernel::F32 => linear_f32(&rounded(a), &rounded(b), bias, (m, k, n)),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// f64 sums of bf16-rounded operands: what every kernel must compute, up to f32 rounding;
    /// and for each output the f32 summation bound `(k + 1) u sum |terms|` (u = 2^-24): the
    /// worst-case error of adding k + 1 terms in f32 in any order, each product exact.
    pub(crate) fn reference(
        x: &[f32],
        w_t: &[f32],
        b: Option<&[f32]>,
        m: usize,
        k: usize,
        n: usize,
    ) -> (Vec<f64>, Vec<f64>) {
        let mut y = vec![0f64; m * n];
        let mut bound = vec![0f64; m * n];
        let u = (2f64).powi(-24);
        for i in 0..m {
            for j in 0..n {
                let b0 = b.map_or(0.0, |b| b[j] as f64);
                let (mut s, mut abs) = (b0, b0.abs());
                for kk in 0..k {
                    let t = round_bf16(x[i * k + kk]) as f64 * round_bf16(w_t[kk * n + j]) as f64;
                    s += t;
                    abs += t.abs();
                }
                y[i * n + j] = s;
                bound[i * n + j] = (k + 1) as f64 * u * abs;
            }
        }
        (y, bound)
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

    /// The largest error over its bound (at most 1 when every output is within it).
    pub(crate) fn worst(got: &[f32], (want, bound): &(Vec<f64>, Vec<f64>)) -> f64 {
        got.iter()
            .zip(want.iter().zip(bound))
            .map(|(a, (w, b))| (*a as f64 - w).abs() / b.max(f64::MIN_POSITIVE))
            .fold(0.0, f64::max)
    }

    fn check(kernel: Bf16Kernel) {
        // shapes that need padding in every dimension, and one that needs none
        for (m, k, n) in [
            (37, 45, 50),
            (64, 96, 32),
            (1, 7, 3),
            (33, 64, 65),
            (50, 768, 130),
            (13, 1, 1),
        ] {
            let (x, w_t, b) = (values(m * k, 1), values(k * n, 2), values(n, 3));
            // w [n, k]: w_t's storage transposed
            let w: Vec<f32> = (0..n * k).map(|i| w_t[(i % k) * n + i / k]).collect();
            let lin = Bf16Linear::new(&w_t, k, n, Some(b.clone()), kernel);
            assert_eq!(lin.kernel(), kernel);
            let y = lin.forward(&x, m);
            let err = worst(&y, &reference(&x, &w_t, Some(&b), m, k, n));
            assert!(
                err <= 1.0,
                "{kernel} forward {m}x{k}x{n}: {err} x the bound"
            );
            // input gradient: g [m, n] times w [n, k], i.e. w_t^T
            let g = values(m * n, 4);
            let gx = lin.backward(&g, m);
            let err = worst(&gx, &reference(&g, &w, None, m, n, k));
            assert!(
                err <= 1.0,
                "{kernel} backward {m}x{k}x{n}: {err} x the bound"
            );
            assert_eq!(lin.weight_t(), rounded(&w_t));
            // a right-hand side packed for one product
            let y = bf16_matmul(kernel, &x, (m, k, n), &w_t, Some(&b));
            let err = worst(&y, &reference(&x, &w_t, Some(&b), m, k, n));
            assert!(err <= 1.0, "{kernel} matmul {m}x{k}x{n}: {err} x the bound");
        }
    }

    /// The fallback runs everywhere, forced even where a faster kernel exists.
    #[test]
    fn the_f32_kernel_computes_bf16_products() {
        check(Bf16Kernel::F32);
    }

    /// Every kernel this CPU has (`HARMA_REQUIRE_KERNELS` makes a missing one a failure).
    #[test]
    fn every_available_kernel_computes_bf16_products() {
        let mut ran = Vec::new();
        for kernel in crate::testing::bf16_kernels() {
            check(kernel);
            ran.push(kernel.name());
        }
        eprintln!("tested bf16 kernels: {}", ran.join(", "));
        assert!(ran.contains(&"f32"));
    }
}
