//! Starting Candle's backward from a given gradient at a tensor.

use candle_core::{DType, Tensor};

/// Candle's backward seeded with the gradient `g` at `x` (same shape): the gradients of
/// `sum(x * g)`, which is the vector-Jacobian product of everything `x` depends on. On the CPU
/// the seed is one node whose backward hands `g` on as it is, instead of a product and a sum
/// over `x` and their backward.
pub fn backward_from(
    x: &Tensor,
    g: &Tensor,
) -> candle_core::Result<candle_core::backprop::GradStore> {
    if x.device().is_cpu() && x.dims() == g.dims() && x.dtype() == g.dtype() {
        return x.apply_op1(SeedGrad(g.clone()))?.backward();
    }
    (x * g)?.sum_all()?.backward()
}

/// [`backward_from`]'s seed: a scalar node over `x` whose gradient at `x` is the tensor it
/// holds. Its value is never read (it is 0), only its backward.
struct SeedGrad(Tensor);

impl candle_core::CustomOp1 for SeedGrad {
    fn name(&self) -> &'static str {
        "seed-grad"
    }

    fn cpu_fwd(
        &self,
        _s: &candle_core::CpuStorage,
        _l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        Ok((candle_core::CpuStorage::F32(vec![0.0]), ().into()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        // the backward starts from 1 at this scalar; anything else scales the seed
        let one = grad.to_dtype(DType::F64)?.to_scalar::<f64>()? == 1.0;
        Ok(Some(if one {
            self.0.clone()
        } else {
            self.0.broadcast_mul(&grad.to_dtype(self.0.dtype())?)?
        }))
    }
}
