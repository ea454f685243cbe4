//! QuickGELU, `x * sigmoid(1.702 x)`, and its backward, one pass each.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::contiguous_f32;
use crate::raw::simd;

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
            .for_each(|(o, x)| simd::quick_gelu(x, o));
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
pub struct QuickGeluBwd;

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
        if out.len() != x.len() {
            candle_core::bail!("quick-gelu-bwd: x {:?}, dy {:?}", l1.dims(), l2.dims());
        }
        out.par_chunks_mut(4096)
            .zip(x.par_chunks(4096))
            .for_each(|(g, x)| simd::quick_gelu_grad(x, g));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}
