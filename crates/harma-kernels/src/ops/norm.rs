//! Layer norm over the last dimension, forward and input backward, one pass per row.

use candle_core::{CpuStorage, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{column_sums, contiguous_f32};
use crate::raw::simd::lane_sum_with;

/// Mean and 1 / sqrt(variance + eps) of one row (two passes, for accuracy on the residual
/// stream's large values; each in 16 partial sums, whose additions overlap).
fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let d = x.len() as f32;
    let mean = lane_sum_with(x, x, |v, _| v) / d;
    let var = lane_sum_with(x, x, |v, _| (v - mean) * (v - mean)) / d;
    (mean, 1.0 / (var + eps).sqrt())
}

/// `x` [rows, d] against a gain of `d` values, or an error naming both.
fn check_rows(op: &str, xl: &Layout, d: usize) -> candle_core::Result<()> {
    if d == 0 || xl.dims().last() != Some(&d) {
        candle_core::bail!("{op}: input {:?} against a gain of {d}", xl.dims());
    }
    Ok(())
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
        check_rows("layer-norm", xl, d)?;
        if b.len() != d {
            candle_core::bail!("layer-norm: gain {:?}, bias {:?}", wl.dims(), bl.dims());
        }
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
            Some(column_sums(&(grad * &xhat)?)?)
        } else {
            None
        };
        let gb = b.track_op().then(|| column_sums(grad)).transpose()?;
        Ok((gx, gw, gb))
    }
}

/// (x, w, dy) -> dx of layer norm over the last dimension, one pass per row:
/// `dx = inv * (g - mean(g) - xhat * mean(g * xhat))` with `g = dy * w`.
pub struct LayerNormBwd {
    pub eps: f32,
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
        check_rows("layer-norm-bwd", xl, d)?;
        if g.len() != x.len() {
            candle_core::bail!("layer-norm-bwd: x {:?}, dy {:?}", xl.dims(), gl.dims());
        }
        let eps = self.eps;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d).zip(g.par_chunks(d)))
            .for_each(|(o, (x, g))| {
                let (mean, inv) = row_stats(x, eps);
                // g w, once, in the output row
                for ((o, &g), &w) in o.iter_mut().zip(g).zip(w) {
                    *o = g * w;
                }
                let mg = lane_sum_with(o, o, |gw, _| gw) / d as f32;
                let mgx = inv * lane_sum_with(o, x, |gw, x| gw * (x - mean)) / d as f32;
                for (o, &x) in o.iter_mut().zip(x) {
                    let xhat = (x - mean) * inv;
                    *o = inv * (*o - mg - xhat * mgx);
                }
            });
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }
}
