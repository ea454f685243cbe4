//! Fused CPU kernels for the transformer's hot spots, as Candle custom ops.
//!
//! Candle runs a batched matmul of many small matrices (attention: batch x heads of 50x64)
//! as a sequence of multi-threaded GEMMs, each too small to use the threads; and an activation
//! written as tensor expressions makes one pass over memory per operation. These kernels do
//! attention as one parallel loop over (sequence, head), each with single-threaded GEMMs, and
//! QuickGELU in one pass. Other devices and dtypes take the generic path in `ops`.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use crate::bf16::Bf16Linear;
use rayon::prelude::*;

/// A raw pointer that rayon tasks may share: each task writes a disjoint part.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        _ => candle_core::bail!("{op}: f32 only"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// A strided view: (pointer, row stride, column stride), in floats.
type View = (*const f32, isize, isize);

/// `dst = scale * a @ b` for small matrices, single-threaded (the callers run in parallel):
/// `dims` = [m, n, k]; `dst` = (pointer, row stride) of an [m, n] row-major output; `a` [m, k]
/// and `b` [k, n] are strided views.
///
/// # Safety
/// Every view must lie inside its buffer for the given dims and strides.
unsafe fn small_gemm(dims: [usize; 3], dst: (*mut f32, isize), a: View, b: View, scale: f32) {
    let [m, n, k] = dims;
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.0,
            1,
            dst.1,
            false,
            a.0,
            a.2,
            a.1,
            b.0,
            b.2,
            b.1,
            0.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// The attention probabilities of one (sequence, head): `p = softmax(scale q k^T)` ([l, l],
/// row-major), masked above the diagonal when `causal`.
///
/// # Safety
/// `q` and `k` must point to `l` rows of `hd` floats each, `d3` floats apart.
#[allow(clippy::too_many_arguments)]
unsafe fn attention_probs(
    p: &mut [f32],
    q: *const f32,
    k: *const f32,
    l: usize,
    hd: usize,
    d3: usize,
    scale: f32,
    causal: bool,
) {
    // SAFETY: the caller guarantees the q and k views; p holds l * l floats.
    unsafe {
        small_gemm(
            [l, l, hd],
            (p.as_mut_ptr(), l as isize),
            (q, d3 as isize, 1),
            (k, 1, d3 as isize),
            scale,
        );
    }
    for i in 0..l {
        let row = &mut p[i * l..(i + 1) * l];
        let valid = if causal { i + 1 } else { l };
        softmax_dispatch(&mut row[..valid]);
        row[valid..].fill(0.0);
    }
}

/// Lanes of the partial maxima and sums below: independent accumulators let the loops
/// vectorise (a single running sum or maximum would be a serial chain).
const LANES: usize = 16;

/// The sum of a slice through [`LANES`] partial sums.
#[inline(always)]
fn lane_sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for j in 0..LANES {
            acc[j] += c[j];
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// Softmax of one row in place.
#[inline(always)]
fn softmax_row(row: &mut [f32]) {
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
fn softmax_bwd_row(p: &[f32], dp: &mut [f32], scale: f32) {
    let mut acc = [0f32; LANES];
    let (pc, dc) = (p.chunks_exact(LANES), dp.chunks_exact(LANES));
    let rest: f32 = pc
        .remainder()
        .iter()
        .zip(dc.remainder())
        .map(|(a, b)| a * b)
        .sum();
    for (a, b) in pc.zip(dc) {
        for j in 0..LANES {
            acc[j] += a[j] * b[j];
        }
    }
    let dot = acc.iter().sum::<f32>() + rest;
    for (g, &pv) in dp.iter_mut().zip(p) {
        *g = pv * (*g - dot) * scale;
    }
}

/// Defines `$name`, which runs `$inner` compiled for AVX-512, else for AVX2 + FMA, else for the
/// baseline, as the CPU allows (detected at run time), so its loops vectorise to the widest unit.
macro_rules! simd_dispatch {
    ($(#[$m:meta])* fn $name:ident => $inner:ident($($arg:ident: $ty:ty),*)) => {
        $(#[$m])*
        fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) {
                    $inner($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    $inner($($arg),*)
                }
                if is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU supports the enabled features (checked just above).
                    return unsafe { avx512($($arg),*) };
                }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $inner($($arg),*)
        }
    };
}

simd_dispatch!(
    /// Softmax of a row in place.
    fn softmax_dispatch => softmax_row(row: &mut [f32])
);
simd_dispatch!(
    /// [`softmax_bwd_row`].
    fn softmax_bwd_dispatch => softmax_bwd_row(p: &[f32], dp: &mut [f32], scale: f32)
);

/// Multi-head self-attention from the packed in_proj output.
/// Input `qkv` [b, l, 3 * d] (q | k | v, each `heads` x `head_dim`); output [b, l, d].
pub struct Attention {
    pub heads: usize,
    pub causal: bool,
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let qkv = contiguous_f32(s, layout, "attention")?;
        let (b, l, d3) = layout.shape().dims3()?;
        let d = d3 / 3;
        let h = self.heads;
        let hd = d / h;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut out = vec![0f32; b * l * d];
        let out_ptr = SendPtr(out.as_mut_ptr());
        let causal = self.causal;
        (0..b * h).into_par_iter().for_each_init(
            || vec![0f32; l * l],
            |scores, bh| {
                let (bi, hi) = (bh / h, bh % h);
                let base = bi * l * d3;
                let q = qkv[base + hi * hd..].as_ptr();
                let k = qkv[base + d + hi * hd..].as_ptr();
                let v = qkv[base + 2 * d + hi * hd..].as_ptr();
                // SAFETY: the strides describe [l, hd] views inside `qkv` (rows 3d apart) and the
                // [l, l] `scores` buffer; every (bi, hi) writes its own [l, hd] block of `out`.
                unsafe { attention_probs(scores, q, k, l, hd, d3, scale, causal) };
                let o = out_ptr;
                unsafe {
                    small_gemm(
                        [l, hd, l],
                        (o.0.add(bi * l * d + hi * hd), d as isize),
                        (scores.as_ptr(), l as isize, 1),
                        (v, d3 as isize, 1),
                        1.0,
                    );
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((b, l, d))))
    }

    /// Gradient for the packed q|k|v input (the probabilities are recomputed, not stored).
    fn bwd(
        &self,
        qkv: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = grad.contiguous()?;
        let op = AttentionBwd {
            heads: self.heads,
            causal: self.causal,
        };
        Ok(Some(qkv.contiguous()?.apply_op2_no_bwd(&g, &op)?))
    }
}

/// Backward of [`Attention`]: (qkv [b, l, 3d], dO [b, l, d]) -> dqkv [b, l, 3d].
/// Per (sequence, head): P = softmax(scale q k^T), dV = P^T dO, dP = dO V^T,
/// dS = P * (dP - rowsum(dP * P)), dQ = scale dS K, dK = scale dS^T Q.
struct AttentionBwd {
    heads: usize,
    causal: bool,
}

impl candle_core::CustomOp2 for AttentionBwd {
    fn name(&self) -> &'static str {
        "fused-attention-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let qkv = contiguous_f32(s1, l1, "attention-bwd")?;
        let dout = contiguous_f32(s2, l2, "attention-bwd")?;
        let (b, l, d3) = l1.shape().dims3()?;
        let d = d3 / 3;
        let h = self.heads;
        let hd = d / h;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut dqkv = vec![0f32; b * l * d3];
        let dptr = SendPtr(dqkv.as_mut_ptr());
        let causal = self.causal;
        (0..b * h).into_par_iter().for_each_init(
            || (vec![0f32; l * l], vec![0f32; l * l]),
            |(p, dp), bh| {
                let (bi, hi) = (bh / h, bh % h);
                let base = bi * l * d3;
                let q = qkv[base + hi * hd..].as_ptr();
                let k = qkv[base + d + hi * hd..].as_ptr();
                let v = qkv[base + 2 * d + hi * hd..].as_ptr();
                let go = dout[bi * l * d + hi * hd..].as_ptr();
                let dq = dptr;
                // SAFETY: as in the forward; every (bi, hi) writes its own columns of dqkv.
                unsafe {
                    let dq_p = dq.0.add(base + hi * hd);
                    let dk_p = dq.0.add(base + d + hi * hd);
                    let dv_p = dq.0.add(base + 2 * d + hi * hd);
                    attention_probs(p, q, k, l, hd, d3, scale, causal);
                    // dV = P^T dO  [l, hd]
                    small_gemm(
                        [l, hd, l],
                        (dv_p, d3 as isize),
                        (p.as_ptr(), 1, l as isize),
                        (go, d as isize, 1),
                        1.0,
                    );
                    // dP = dO V^T  [l, l]
                    small_gemm(
                        [l, l, hd],
                        (dp.as_mut_ptr(), l as isize),
                        (go, d as isize, 1),
                        (v, 1, d3 as isize),
                        1.0,
                    );
                    // dS = P * (dP - rowsum(dP * P)), scaled for q k^T
                    for i in 0..l {
                        let pr = &p[i * l..(i + 1) * l];
                        softmax_bwd_dispatch(pr, &mut dp[i * l..(i + 1) * l], scale);
                    }
                    // dQ = dS K, dK = dS^T Q
                    small_gemm(
                        [l, hd, l],
                        (dq_p, d3 as isize),
                        (dp.as_ptr(), l as isize, 1),
                        (k, d3 as isize, 1),
                        1.0,
                    );
                    small_gemm(
                        [l, hd, l],
                        (dk_p, d3 as isize),
                        (dp.as_ptr(), 1, l as isize),
                        (q, d3 as isize, 1),
                        1.0,
                    );
                }
            },
        );
        Ok((CpuStorage::F32(dqkv), l1.shape().clone()))
    }
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

#[inline(always)]
fn quick_gelu_slice(x: &[f32], o: &mut [f32]) {
    for (o, &x) in o.iter_mut().zip(x) {
        *o = x / (1.0 + fast_exp(-1.702 * x));
    }
}

simd_dispatch!(
    /// QuickGELU of a slice.
    fn quick_gelu_dispatch => quick_gelu_slice(x: &[f32], o: &mut [f32])
);

/// `x * sigmoid(1.702 x)` in one pass.
pub struct QuickGelu;

impl CustomOp1 for QuickGelu {
    fn name(&self) -> &'static str {
        "quick-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, layout, "quick-gelu")?;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(4096)
            .zip(x.par_chunks(4096))
            .for_each(|(o, x)| quick_gelu_dispatch(x, o));
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    /// d/dx x s(1.702x) = s + 1.702 x s (1 - s), with s = sigmoid(1.702 x), in one pass.
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            x.contiguous()?
                .apply_op2_no_bwd(&grad.contiguous()?, &QuickGeluBwd)?,
        ))
    }
}

/// (x, dy) -> dx of QuickGELU.
pub(crate) struct QuickGeluBwd;

impl candle_core::CustomOp2 for QuickGeluBwd {
    fn name(&self) -> &'static str {
        "quick-gelu-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "quick-gelu-bwd")?;
        let mut out = contiguous_f32(s2, l2, "quick-gelu-bwd")?.to_vec();
        quick_gelu_grad(x, &mut out);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `g *= d/dx [x sigmoid(1.702 x)]` = `s + 1.702 x s (1 - s)`, `s = sigmoid(1.702 x)`.
fn quick_gelu_grad(x: &[f32], g: &mut [f32]) {
    g.par_chunks_mut(4096)
        .zip(x.par_chunks(4096))
        .for_each(|(g, x)| {
            for (g, &x) in g.iter_mut().zip(x) {
                let s = 1.0 / (1.0 + fast_exp(-1.702 * x));
                *g *= s + 1.702 * x * s * (1.0 - s);
            }
        });
}

/// Mean and 1 / sqrt(variance + eps) of one row (two passes, for accuracy on the residual
/// stream's large values).
fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let d = x.len() as f32;
    let mean = x.iter().sum::<f32>() / d;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d;
    (mean, 1.0 / (var + eps).sqrt())
}

/// (x, w, dy) -> dx of layer norm over the last dimension, one pass per row:
/// `dx = inv * (g - mean(g) - xhat * mean(g * xhat))` with `g = dy * w`.
pub(crate) struct LayerNormBwd {
    pub(crate) eps: f32,
}

impl candle_core::CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "layer-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(xs, xl, "layer-norm-bwd")?;
        let w = contiguous_f32(ws, wl, "layer-norm-bwd")?;
        let g = contiguous_f32(gs, gl, "layer-norm-bwd")?;
        let d = w.len();
        let eps = self.eps;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d).zip(g.par_chunks(d)))
            .for_each(|(o, (x, g))| {
                let (mean, inv) = row_stats(x, eps);
                let (mut mg, mut mgx) = (0f32, 0f32);
                for i in 0..d {
                    let gi = g[i] * w[i];
                    mg += gi;
                    mgx += gi * (x[i] - mean) * inv;
                }
                mg /= d as f32;
                mgx /= d as f32;
                for i in 0..d {
                    let xhat = (x[i] - mean) * inv;
                    o[i] = inv * (g[i] * w[i] - mg - xhat * mgx);
                }
            });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}

/// `x @ w^T + b` with the bias written first and accumulated into by the GEMM, saving the
/// separate pass (and fresh buffer) of a broadcast add. `x` [rows, in], `w_t` [in, out], `b` [out].
pub struct LinearBias;

impl candle_core::CustomOp3 for LinearBias {
    fn name(&self) -> &'static str {
        "linear-bias"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(xs, xl, "linear")?;
        let w = contiguous_f32(ws, wl, "linear")?;
        let b = contiguous_f32(bs, bl, "linear")?;
        let (rows, inp, out) = linear_dims(xl, wl, bl)?;
        let y = linear_f32(x, w, Some(b), (rows, inp, out));
        Ok((CpuStorage::F32(y), Shape::from((rows, out))))
    }

    /// On a GPU: the backend's own GEMM and broadcast add ([`linear_bias_storage`]), so that
    /// the backward below, which skips frozen weights, serves there too.
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        linear_bias_storage(xs, xl, ws, wl, bs, bl)
    }

    fn metal_fwd(
        &self,
        xs: &candle_core::MetalStorage,
        xl: &Layout,
        ws: &candle_core::MetalStorage,
        wl: &Layout,
        bs: &candle_core::MetalStorage,
        bl: &Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, Shape)> {
        linear_bias_storage(xs, xl, ws, wl, bs, bl)
    }

    /// The input's gradient always; the weight's and bias's only when they are trained (a
    /// frozen weight is a plain tensor: no gradient is computed or kept for it).
    fn bwd(
        &self,
        x: &Tensor,
        w_t: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let gx = x.track_op().then(|| grad.matmul(&w_t.t()?)).transpose()?;
        let gw = w_t.track_op().then(|| x.t()?.matmul(grad)).transpose()?;
        let gb = b.track_op().then(|| grad.sum(0)).transpose()?;
        Ok((gx, gw, gb))
    }
}

/// (rows, in, out) of a linear op on `x` [rows, in], `w_t` [in, out], `b` [out]; an error
/// naming the three shapes when they do not fit together.
fn linear_dims(
    xl: &Layout,
    wl: &Layout,
    bl: &Layout,
) -> candle_core::Result<(usize, usize, usize)> {
    let (rows, inp) = xl.shape().dims2()?;
    let (inp2, out) = wl.shape().dims2()?;
    if inp != inp2 || bl.dims() != [out] {
        candle_core::bail!(
            "linear: x {:?}, w {:?}, b {:?}",
            xl.dims(),
            wl.dims(),
            bl.dims()
        );
    }
    Ok((rows, inp, out))
}

/// `x @ w_t + b` on any backend through its own GEMM and broadcast add: `x` [rows, in],
/// `w_t` [in, out], `b` [out], any dtype the backend multiplies.
pub fn linear_bias_storage<S: candle_core::backend::BackendStorage>(
    xs: &S,
    xl: &Layout,
    ws: &S,
    wl: &Layout,
    bs: &S,
    bl: &Layout,
) -> candle_core::Result<(S, Shape)> {
    let (rows, inp, out) = linear_dims(xl, wl, bl)?;
    let y = xs.matmul(ws, (1, rows, out, inp), xl, wl)?;
    let yl = Layout::contiguous((rows, out));
    let y = y.binary_impl::<candle_core::op::Add>(bs, &yl, &bl.broadcast_as((rows, out))?)?;
    Ok((y, yl.shape().clone()))
}

/// `x w_t + b` for `x` [rows, in], `w_t` [in, out] row-major and an optional `b` [out]: the
/// bias is written first and the GEMM accumulates into it (no separate pass or buffer).
pub(crate) fn linear_f32(
    x: &[f32],
    w_t: &[f32],
    b: Option<&[f32]>,
    (rows, inp, out): (usize, usize, usize),
) -> Vec<f32> {
    let mut y = match b {
        Some(b) => b.repeat(rows),
        None => vec![0.0; rows * out],
    };
    gemm_acc(&mut y, x, rows, inp, out, (w_t, out as isize, 1));
    y
}

/// `y [m, n] += a [m, k] b`, `b` given as (data, row stride, column stride).
pub(crate) fn gemm_acc(
    y: &mut [f32],
    a: &[f32],
    m: usize,
    k: usize,
    n: usize,
    b: (&[f32], isize, isize),
) {
    let threads = candle_core::utils::get_num_threads();
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let (b, b_rs, b_cs) = b;
    assert!(y.len() == m * n && a.len() == m * k && b.len() == k * n);
    // SAFETY: the three buffers have the sizes asserted above and the strides address
    // exactly those elements.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            y.as_mut_ptr(),
            1,
            n as isize,
            true,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// A frozen linear layer in bf16 on the CPU ([`Bf16Linear`]): `x` [rows, in] -> [rows, out].
/// Its backward gives the input's gradient only (the weight is frozen and not in the graph).
pub struct Bf16LinearOp(pub Arc<Bf16Linear>);

impl CustomOp1 for Bf16LinearOp {
    fn name(&self) -> &'static str {
        "bf16-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        bf16_linear_apply(&self.0, s, l, false)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = grad.contiguous()?;
        Ok(Some(g.apply_op1_no_bwd(&Bf16LinearGrad(self.0.clone()))?))
    }
}

/// The input gradient of [`Bf16LinearOp`]: `g` [rows, out] -> `g w` [rows, in].
pub(crate) struct Bf16LinearGrad(pub(crate) Arc<Bf16Linear>);

impl CustomOp1 for Bf16LinearGrad {
    fn name(&self) -> &'static str {
        "bf16-linear-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        bf16_linear_apply(&self.0, s, l, true)
    }
}

fn bf16_linear_apply(
    lin: &Bf16Linear,
    s: &CpuStorage,
    l: &Layout,
    backward: bool,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let x = contiguous_f32(s, l, "bf16 linear")?;
    let (rows, cols) = l.shape().dims2()?;
    let (inp, out) = if backward {
        (lin.out_dim, lin.in_dim)
    } else {
        (lin.in_dim, lin.out_dim)
    };
    if cols != inp {
        candle_core::bail!(
            "bf16 linear: input {:?} against a layer of {inp} -> {out}",
            l.dims()
        );
    }
    let y = if backward {
        lin.backward(x, rows)
    } else {
        lin.forward(x, rows)
    };
    Ok((CpuStorage::F32(y), Shape::from((rows, out))))
}

/// HarMA's gated mix `s * a + (1 - s) * b`, `s = sigmoid(gate)`, in one pass: `a` and `b` of
/// one shape, `gate` a scalar. One graph node instead of five, and a backward of three passes.
pub struct GatedMix;

fn sigmoid_of_scalar(gate: &CpuStorage, l: &Layout) -> candle_core::Result<f32> {
    let g = contiguous_f32(gate, l, "gated-mix")?;
    if g.len() != 1 {
        candle_core::bail!("gated-mix: the gate must be a scalar, got {:?}", l.dims());
    }
    Ok(1.0 / (1.0 + (-g[0]).exp()))
}

impl candle_core::CustomOp3 for GatedMix {
    fn name(&self) -> &'static str {
        "gated-mix"
    }

    fn cpu_fwd(
        &self,
        as_: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let a = contiguous_f32(as_, al, "gated-mix")?;
        let b = contiguous_f32(bs, bl, "gated-mix")?;
        if al.dims() != bl.dims() {
            candle_core::bail!("gated-mix: a {:?} and b {:?} differ", al.dims(), bl.dims());
        }
        let s = sigmoid_of_scalar(gs, gl)?;
        let mut out = vec![0f32; a.len()];
        out.par_chunks_mut(4096)
            .zip(a.par_chunks(4096).zip(b.par_chunks(4096)))
            .for_each(|(o, (a, b))| {
                for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                    *o = b + s * (a - b);
                }
            });
        Ok((CpuStorage::F32(out), al.shape().clone()))
    }

    /// `da = s g`, `db = (1 - s) g`, `dgate = s (1 - s) sum(g (a - b))`.
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        gate: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let s = gate.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
        let s = 1.0 / (1.0 + (-s).exp());
        let s = s as f64;
        let da = a.track_op().then(|| grad.affine(s, 0.0)).transpose()?;
        let db = b
            .track_op()
            .then(|| grad.affine(1.0 - s, 0.0))
            .transpose()?;
        let dgate = if gate.track_op() {
            let dot = grad
                .contiguous()?
                .apply_op2_no_bwd(&(a - b)?.contiguous()?, &Dot)?;
            Some(dot.affine(s * (1.0 - s), 0.0)?.reshape(gate.shape())?)
        } else {
            None
        };
        Ok((da, db, dgate))
    }
}

/// `sum(x * y)` of two same-shaped tensors as a scalar tensor (f64 partial sums per chunk).
struct Dot;

impl candle_core::CustomOp2 for Dot {
    fn name(&self) -> &'static str {
        "dot"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ys: &CpuStorage,
        yl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(xs, xl, "dot")?;
        let y = contiguous_f32(ys, yl, "dot")?;
        let sum: f64 = x
            .par_chunks(4096)
            .zip(y.par_chunks(4096))
            .map(|(x, y)| x.iter().zip(y).map(|(&a, &b)| (a * b) as f64).sum::<f64>())
            .sum();
        Ok((CpuStorage::F32(vec![sum as f32]), Shape::from(())))
    }
}

/// Layer norm over the last dimension, `x` [rows, d], `w` and `b` [d]. The backward gives the
/// input's gradient, and the gain's and bias's only when they are trained.
pub struct LayerNormOp {
    pub eps: f32,
}

impl candle_core::CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(xs, xl, "layer-norm")?;
        let w = contiguous_f32(ws, wl, "layer-norm")?;
        let b = contiguous_f32(bs, bl, "layer-norm")?;
        let d = w.len();
        let mut y = vec![0f32; x.len()];
        let eps = self.eps;
        y.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(y, x)| {
            let (mean, inv) = row_stats(x, eps);
            for i in 0..d {
                y[i] = (x[i] - mean) * inv * w[i] + b[i];
            }
        });
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let gx = if x.track_op() {
            let op = LayerNormBwd { eps: self.eps };
            Some(
                x.contiguous()?
                    .apply_op3_no_bwd(w, &grad.contiguous()?, &op)?,
            )
        } else {
            None
        };
        // a trained gain or bias (none in HarMA, whose layer norms are the frozen backbone's)
        let gw = if w.track_op() {
            let mean = x.mean_keepdim(candle_core::D::Minus1)?;
            let xc = x.broadcast_sub(&mean)?;
            let var = xc.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
            let xhat = xc.broadcast_div(&(var + self.eps as f64)?.sqrt()?)?;
            Some((grad * &xhat)?.sum(0)?)
        } else {
            None
        };
        let gb = b.track_op().then(|| grad.sum(0)).transpose()?;
        Ok((gx, gw, gb))
    }
}

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

    /// The GPU's linear (the backend's GEMM and add, here run by the CPU backend) equals the
    /// fused CPU kernel and the plain formula.
    #[test]
    fn the_backend_linear_equals_the_fused_kernel() -> candle_core::Result<()> {
        use candle_core::{Device, Tensor};
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (37, 24), &dev)?;
        let w_t = Tensor::randn(0f32, 1.0, (24, 19), &dev)?;
        let b = Tensor::randn(0f32, 1.0, 19, &dev)?;
        let fused = x.apply_op3(&w_t, &b, LinearBias)?;
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w_t.storage_and_layout();
        let (bs, bl) = b.storage_and_layout();
        let (y, shape) = match (&*xs, &*ws, &*bs) {
            (
                candle_core::Storage::Cpu(xs),
                candle_core::Storage::Cpu(ws),
                candle_core::Storage::Cpu(bs),
            ) => linear_bias_storage(xs, xl, ws, wl, bs, bl)?,
            _ => unreachable!("CPU tensors"),
        };
        assert_eq!(shape.dims(), [37, 19]);
        let y = match y {
            CpuStorage::F32(v) => v,
            _ => unreachable!("f32 in, f32 out"),
        };
        let want = x
            .matmul(&w_t)?
            .broadcast_add(&b)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let got = fused.flatten_all()?.to_vec1::<f32>()?;
        for ((a, f), w) in y.iter().zip(&got).zip(&want) {
            assert!((a - w).abs() < 1e-4 && (f - w).abs() < 1e-4, "{a} {f} {w}");
        }
        // a misshapen bias is refused with the shapes named
        let bad = Tensor::zeros(18, candle_core::DType::F32, &dev)?;
        let err = x.apply_op3(&w_t, &bad, LinearBias).unwrap_err().to_string();
        assert!(err.contains("[18]"), "{err}");
        Ok(())
    }

    #[test]
    fn vectorised_softmax_rows_match_the_formula() {
        for n in [1, 5, 16, 50, 77, 131] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.7)
                .collect();
            let mut row = x.clone();
            softmax_dispatch(&mut row);
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let z: f64 = x.iter().map(|&v| (v as f64 - max).exp()).sum();
            for (&got, &v) in row.iter().zip(&x) {
                let want = (v as f64 - max).exp() / z;
                assert!((got as f64 - want).abs() < 1e-6, "n {n}: {got} vs {want}");
            }
            // the backward row: p * (g - <g, p>) * scale
            let g: Vec<f32> = (0..n).map(|i| (i as f32 * 0.3).sin()).collect();
            let mut ds = g.clone();
            softmax_bwd_dispatch(&row, &mut ds, 0.5);
            let dot: f64 = row.iter().zip(&g).map(|(&p, &g)| p as f64 * g as f64).sum();
            for ((&d, &p), &g) in ds.iter().zip(&row).zip(&g) {
                let want = p as f64 * (g as f64 - dot) * 0.5;
                assert!((d as f64 - want).abs() < 1e-6, "n {n}: {d} vs {want}");
            }
        }
    }

    #[test]
    fn quick_gelu_matches_the_formula() {
        let x: Vec<f32> = (-400..400).map(|i| i as f32 * 0.025).collect();
        let mut o = vec![0f32; x.len()];
        quick_gelu_dispatch(&x, &mut o);
        for (&x, &o) in x.iter().zip(&o) {
            let want = x as f64 / (1.0 + (-1.702 * x as f64).exp());
            assert!(
                (o as f64 - want).abs() < 1e-6 * (1.0 + want.abs()),
                "{x}: {o} vs {want}"
            );
        }
    }
}
