//! Multi-head self-attention from the packed in_proj output, forward and backward, as one
//! parallel loop over (sequence, head) with single-threaded GEMMs.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::contiguous_f32;
use crate::raw::gemm::small_gemm;
use crate::raw::ptr::DisjointWrites;
use crate::raw::simd::{softmax_bwd_row, softmax_row};

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
    assert_eq!(p.len(), l * l);
    // SAFETY: the caller guarantees the q and k views; p holds l * l floats (checked).
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
        softmax_row(&mut row[..valid]);
        row[valid..].fill(0.0);
    }
}

/// The sizes of an attention input `qkv` [b, l, 3d] with `heads` heads, or an error.
fn dims(l: &Layout, heads: usize, op: &str) -> candle_core::Result<(usize, usize, usize, usize)> {
    let (b, len, d3) = l.shape().dims3()?;
    if heads == 0 || d3 % (3 * heads) != 0 {
        candle_core::bail!("{op}: last dimension {d3} is not 3 x {heads} heads");
    }
    Ok((b, len, d3 / 3, d3 / 3 / heads))
}

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
        let (b, l, d, hd) = dims(layout, self.heads, "attention")?;
        let (h, d3) = (self.heads, 3 * d);
        let scale = 1.0 / (hd as f32).sqrt();
        let mut out = vec![0f32; b * l * d];
        if out.is_empty() {
            return Ok((CpuStorage::F32(out), Shape::from((b, l, d))));
        }
        let writes = DisjointWrites::new(&mut out);
        let causal = self.causal;
        (0..b * h).into_par_iter().for_each_init(
            || vec![0f32; l * l],
            |scores, bh| {
                let (bi, hi) = (bh / h, bh % h);
                let base = bi * l * d3;
                let q = qkv[base + hi * hd..].as_ptr();
                let k = qkv[base + d + hi * hd..].as_ptr();
                let v = qkv[base + 2 * d + hi * hd..].as_ptr();
                // head hi's [l, hd] block of sequence bi, rows d apart
                let o = writes.at(bi * l * d + hi * hd, (l - 1) * d + hd);
                // SAFETY: the strides describe [l, hd] views inside `qkv` (rows 3d apart, the
                // slices above start inside it and the shape was checked) and the [l, l]
                // `scores` buffer; every (bi, hi) writes its own [l, hd] block of `out`.
                unsafe {
                    attention_probs(scores, q, k, l, hd, d3, scale, causal);
                    small_gemm(
                        [l, hd, l],
                        (o, d as isize),
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
        let (b, l, d, hd) = dims(l1, self.heads, "attention-bwd")?;
        if l2.dims() != [b, l, d] {
            candle_core::bail!("attention-bwd: qkv {:?}, dO {:?}", l1.dims(), l2.dims());
        }
        let (h, d3) = (self.heads, 3 * d);
        let scale = 1.0 / (hd as f32).sqrt();
        let mut dqkv = vec![0f32; b * l * d3];
        if dqkv.is_empty() {
            return Ok((CpuStorage::F32(dqkv), l1.shape().clone()));
        }
        let writes = DisjointWrites::new(&mut dqkv);
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
                // head hi's columns of dq, dk and dv: [l, hd] blocks, rows 3d apart
                let extent = (l - 1) * d3 + hd;
                let dq_p = writes.at(base + hi * hd, extent);
                let dk_p = writes.at(base + d + hi * hd, extent);
                let dv_p = writes.at(base + 2 * d + hi * hd, extent);
                // SAFETY: as in the forward (views inside qkv, dout and the [l, l] buffers);
                // every (bi, hi) writes its own columns of dqkv.
                unsafe {
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
                }
                // dS = P * (dP - rowsum(dP * P)), scaled for q k^T
                for i in 0..l {
                    let pr = &p[i * l..(i + 1) * l];
                    softmax_bwd_row(pr, &mut dp[i * l..(i + 1) * l], scale);
                }
                // SAFETY: as above.
                unsafe {
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
