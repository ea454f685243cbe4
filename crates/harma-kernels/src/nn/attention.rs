//! Multi-head self-attention in `nn.MultiheadAttention`'s layout.

use candle_core::{Result, Tensor, D};

use super::Linear;
use crate::compute::Kernels;

/// Softmax over the last dimension, differentiable (`exp(x - max) / sum`; rows of -inf give 0).
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Additive causal mask [l, l]: 0 on and below the diagonal, -inf above.
pub fn causal_mask(l: usize, device: &candle_core::Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..l)
        .flat_map(|i| (0..l).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(m, (l, l), device)
}

/// Multi-head self-attention in `nn.MultiheadAttention`'s layout: a packed `in_proj`
/// [3d, d] producing q, k, v, scale 1/sqrt(head_dim), then `out_proj`.
#[derive(Debug, Clone)]
pub struct MultiHeadAttention {
    pub in_proj: Linear,
    pub out_proj: Linear,
    pub heads: usize,
    pub kernels: Kernels,
}

impl MultiHeadAttention {
    /// `x`: [b, l, d] -> [b, l, d]; `causal`: position i attends to positions <= i only.
    pub fn forward(&self, x: &Tensor, causal: bool) -> Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        let h = self.heads;
        let hd = d / h;
        let qkv = self.in_proj.forward(x)?; // [b, l, 3d]
        if self.kernels == Kernels::Fused {
            let o = qkv.apply_op1(crate::ops::Attention { heads: h, causal })?;
            return self.out_proj.forward(&o);
        }
        let qkv = qkv.reshape((b, l, 3, h, hd))?.permute((2, 0, 3, 1, 4))?; // [3, b, h, l, hd]
        let scale = 1.0 / (hd as f64).sqrt();
        let q = (qkv.get(0)?.contiguous()? * scale)?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let att = q.matmul(&k.t()?)?; // [b, h, l, l]
        let att = if causal {
            att.broadcast_add(&causal_mask(l, att.device())?)?
        } else {
            att
        };
        let att = softmax(&att)?;
        let o = att.matmul(&v)?; // [b, h, l, hd]
        let o = o.transpose(1, 2)?.reshape((b, l, d))?;
        self.out_proj.forward(&o)
    }
}
