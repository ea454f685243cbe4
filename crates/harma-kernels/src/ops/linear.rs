//! Linear layers as graph nodes whose backward skips frozen weights: `x w_t + b` on the CPU's
//! GEMM (or any backend's), and the bf16 layers of [`Bf16Linear`].

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::contiguous_f32;
use crate::bf16_linear::Bf16Linear;
use crate::raw::gemm::linear_f32;

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
pub struct Bf16LinearGrad(pub Arc<Bf16Linear>);

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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// The GPU's linear (the backend's GEMM and add, here run by the CPU backend) equals the
    /// fused CPU kernel and the plain formula.
    #[test]
    fn the_backend_linear_equals_the_fused_kernel() -> candle_core::Result<()> {
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
}
