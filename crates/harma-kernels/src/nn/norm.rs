//! Layer norm over the last dimension.

use candle_core::{Result, Tensor, D};

use crate::compute::Kernels;

/// Layer norm over the last dimension.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
    pub kernels: Kernels,
}

impl LayerNorm {
    /// x: [.., d] -> [.., d]
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.kernels == Kernels::Fused {
            let dims = x.dims().to_vec();
            let d = *dims.last().expect("layer norm input has a last dimension");
            let x2 = x.contiguous()?.reshape(((), d))?;
            let y = x2.apply_op3(
                &self.weight,
                &self.bias,
                crate::ops::LayerNormOp {
                    eps: self.eps as f32,
                },
            )?;
            return y.reshape(dims);
        }
        layer_norm_generic(x, &self.weight, &self.bias, self.eps)
    }

    /// The gradient at `x` from the gradient `g` at the output (frozen gain and bias).
    pub(crate) fn input_grad(&self, x: &Tensor, g: &Tensor) -> Result<Tensor> {
        let op = crate::ops::LayerNormBwd {
            eps: self.eps as f32,
        };
        x.contiguous()?
            .apply_op3_no_bwd(&self.weight, &g.contiguous()?, &op)
    }
}

/// Layer norm over the last dimension from basic (differentiable) ops.
pub fn layer_norm_generic(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let xc = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    y.broadcast_mul(weight)?.broadcast_add(bias)
}
