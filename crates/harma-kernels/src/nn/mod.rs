//! Level 3: the layers of a transformer block, shared by the backbone and the adapters. Each
//! layer keeps the [`Kernels`](crate::Kernels) it was built with and runs them: the fused ops
//! of `ops` ([`Kernels::Fused`](crate::Kernels::Fused)), or compositions of Candle's basic
//! differentiable ops (Candle's own fused softmax and layer norm have no backward, so they are
//! not used). A frozen linear layer never gets a weight gradient on the fused and backend
//! paths.

mod attention;
mod branch;
mod linear;
mod norm;

pub use attention::{causal_mask, softmax, MultiHeadAttention};
pub use branch::FrozenBranch;
pub use linear::{Linear, Weight};
pub use norm::{layer_norm_generic, LayerNorm};

use candle_core::{Result, Tensor, D};

use crate::compute::Kernels;

/// `x * sigmoid(1.702 x)`.
pub fn quick_gelu(x: &Tensor, kernels: Kernels) -> Result<Tensor> {
    if kernels == Kernels::Fused {
        return x.contiguous()?.apply_op1(crate::ops::QuickGelu);
    }
    x * candle_nn::ops::sigmoid(&(x * 1.702)?)?
}

/// Exact (erf) GELU.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.gelu_erf()
}

/// L2-normalise the rows of a [n, d] matrix.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    x.broadcast_div(&norm)
}
