//! Linear layers as graph nodes whose backward skips frozen weights: `x w_t + b` on the CPU's
//! GEMM (or any backend's), and the bf16 layers of [`Bf16Linear`].

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::contiguous_f32;
use crate::bf16_linear::{bf16_matmul, Bf16Linear};
use crate::compute::Bf16Kernel;
use crate::raw::gemm::linear_f32;

/// `x @ w^T + b` with the bias written first and accumulated into by the GEMM, saving the
/// separate pass (and fresh buffer) of a broadcast add. `x` [rows, in], `w_t` [in, out], `b` [out].
/// With a [`Bf16Kernel`] (a trained layer under `--precision bf16` on the CPU, as PyTorch's
/// autocast runs `nn.Linear`), its three products (forward, input and weight gradients) take
/// bf16 operands and sum in f32 on that kernel; the weight, bias and gradients stay f32.
pub struct LinearBias(pub Option<Bf16Kernel>);

impl LinearBias {
    /// f32 products on the GEMM.
    pub const F32: LinearBias = LinearBias(None);

    /// `a @ b` with each operand read transposed where asked, in this op's precision.
    fn product(&self, a: &Tensor, b: &Tensor, ta: bool, tb: bool) -> candle_core::Result<Tensor> {
        match self.0 {
            Some(kernel) => a
                .contiguous()?
                .apply_op2_no_bwd(&b.contiguous()?, &Bf16Product { kernel, ta, tb }),
            None => {
                let a = if ta { a.t()? } else { a.clone() };
                let b = if tb { b.t()? } else { b.clone() };
                a.matmul(&b)
            }
        }
    }
}

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
        let y = match self.0 {
            None => linear_f32(x, w, Some(b), (rows, inp, out)),
            Some(k) => bf16_matmul(k, x, (rows, inp, out), w, Some(b)),
        };
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
        let gx = x
            .track_op()
            .then(|| self.product(grad, w_t, false, true))
            .transpose()?;
        let gw = w_t
            .track_op()
            .then(|| self.product(x, grad, true, false))
            .transpose()?;
        let gb = b.track_op().then(|| column_sums(grad)).transpose()?;
        Ok((gx, gw, gb))
    }
}

/// `g` [rows, cols] summed over its rows: a bias's gradient. On the CPU each column's sum runs
/// down the rows in order, as Candle's `sum(0)` does (the same f32 result), in parallel over
/// blocks of columns, instead of Candle's reduction, which read the matrix across its strides
/// (4% of a bf16 training step in a profile). Elsewhere `sum(0)`.
pub fn column_sums(g: &Tensor) -> candle_core::Result<Tensor> {
    if !g.device().is_cpu() || g.dtype() != candle_core::DType::F32 || g.rank() != 2 {
        return g.sum(0);
    }
    g.contiguous()?.apply_op1_no_bwd(&ColumnSums)
}

struct ColumnSums;

impl CustomOp1 for ColumnSums {
    fn name(&self) -> &'static str {
        "column-sums"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let g = contiguous_f32(s, l, "column sums")?;
        let (rows, cols) = l.shape().dims2()?;
        const BLOCK: usize = 64;
        let mut out = vec![0f32; cols];
        out.par_chunks_mut(BLOCK).enumerate().for_each(|(b, acc)| {
            let c0 = b * BLOCK;
            for r in 0..rows {
                let row = &g[r * cols + c0..r * cols + c0 + acc.len()];
                for (a, v) in acc.iter_mut().zip(row) {
                    *a += v;
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from(cols)))
    }
}

/// `A @ B` of two contiguous f32 CPU matrices, each read transposed where `ta` / `tb` say,
/// with bf16 operands and f32 sums on `kernel`; no backward (it serves [`LinearBias`]'s).
struct Bf16Product {
    kernel: Bf16Kernel,
    ta: bool,
    tb: bool,
}

impl candle_core::CustomOp2 for Bf16Product {
    fn name(&self) -> &'static str {
        "bf16-product"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let a = contiguous_f32(s1, l1, "bf16 product")?;
        let b = contiguous_f32(s2, l2, "bf16 product")?;
        let (r1, c1) = l1.shape().dims2()?;
        let (r2, c2) = l2.shape().dims2()?;
        let (m, k) = if self.ta { (c1, r1) } else { (r1, c1) };
        let (k2, n) = if self.tb { (c2, r2) } else { (r2, c2) };
        if k != k2 {
            candle_core::bail!(
                "bf16 product: {:?}{} times {:?}{}",
                l1.dims(),
                if self.ta { " transposed" } else { "" },
                l2.dims(),
                if self.tb { " transposed" } else { "" }
            );
        }
        // both operands row-major (the kernels read them by rows)
        let (a_t, b_t);
        let a = if self.ta {
            a_t = transposed(a, r1, c1);
            &a_t
        } else {
            a
        };
        let b = if self.tb {
            b_t = transposed(b, r2, c2);
            &b_t
        } else {
            b
        };
        let y = bf16_matmul(self.kernel, a, (m, k, n), b, None);
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }
}

/// `a` [rows, cols] (row-major) as [cols, rows], row-major: in tiles of 32 x 32, read and
/// written a cache line at a time, in parallel over blocks of 32 output rows.
fn transposed(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    use rayon::prelude::*;
    const T: usize = 32;
    let mut t = vec![0f32; rows * cols];
    t.par_chunks_mut((T * rows).max(1))
        .enumerate()
        .for_each(|(blk, dst)| {
            let c0 = blk * T;
            let cs = dst.len() / rows.max(1);
            for r0 in (0..rows).step_by(T) {
                let r1 = (r0 + T).min(rows);
                for c in 0..cs {
                    let out = &mut dst[c * rows + r0..c * rows + r1];
                    for (o, r) in out.iter_mut().zip(r0..r1) {
                        *o = a[r * cols + c0 + c];
                    }
                }
            }
        });
    t
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
        let fused = x.apply_op3(&w_t, &b, LinearBias::F32)?;
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
        let err = x
            .apply_op3(&w_t, &bad, LinearBias::F32)
            .unwrap_err()
            .to_string();
        assert!(err.contains("[18]"), "{err}");
        Ok(())
    }

    /// A trained layer under bf16 (`LinearBias` with a kernel): its output and its three
    /// gradients are the products of the bf16-rounded operands summed in f32, on every kernel
    /// this CPU has (the f32 fallback always): within f32 summation error of f64 sums.
    #[test]
    fn a_bf16_linear_bias_multiplies_rounded_operands() -> candle_core::Result<()> {
        use crate::bf16_linear::tests::{reference, worst};
        let dev = Device::Cpu;
        let (rows, inp, out) = (37, 45, 19);
        let x = candle_core::Var::randn(0f32, 1.0, (rows, inp), &dev)?;
        let w_t = candle_core::Var::randn(0f32, 1.0, (inp, out), &dev)?;
        let b = candle_core::Var::randn(0f32, 1.0, out, &dev)?;
        let g = Tensor::randn(0f32, 1.0, (rows, out), &dev)?;
        let v = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
        let (xv, wv, bv, gv) = (v(&x)?, v(&w_t)?, v(&b)?, v(&g)?);
        // forward x w_t + b; input gradient g w_t^T; weight gradient x^T g
        let want_y = reference(&xv, &wv, Some(&bv), rows, inp, out);
        let want_gx = reference(&gv, &v(&w_t.t()?)?, None, rows, out, inp);
        let want_gw = reference(&v(&x.t()?)?, &gv, None, inp, rows, out);
        let close = |got: &Tensor, want, what: &str| {
            let err = worst(&v(got)?, want);
            assert!(err <= 1.0, "{what}: {err} x the bound");
            candle_core::Result::Ok(())
        };
        let mut ran = vec![];
        for kernel in crate::testing::bf16_kernels() {
            let y = x.apply_op3(&w_t, &b, LinearBias(Some(kernel)))?;
            close(&y, &want_y, "forward")?;
            let grads = (&y * &g)?.sum_all()?.backward()?;
            close(grads.get(&x).unwrap(), &want_gx, "input gradient")?;
            close(grads.get(&w_t).unwrap(), &want_gw, "weight gradient")?;
            // the bias gradient is the f32 column sum of the unrounded output gradient, in
            // Candle's order
            let gb = grads.get(&b).unwrap().to_vec1::<f32>()?;
            let want_gb = g.sum(0)?.to_vec1::<f32>()?;
            assert_eq!(gb, want_gb, "{kernel} bias gradient");
            assert_eq!(column_sums(&g)?.to_vec1::<f32>()?, want_gb);
            ran.push(kernel.name());
        }
        eprintln!("tested bf16 kernels: {}", ran.join(", "));
        assert!(ran.contains(&"f32"));
        Ok(())
    }

    /// The bias gradient's column sums equal Candle's `sum(0)` bit for bit (same order), over
    /// several column blocks and a partial one.
    #[test]
    fn column_sums_are_candles_sums() -> candle_core::Result<()> {
        for (rows, cols) in [(1, 1), (300, 150), (2464, 768), (5, 64)] {
            let g = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu)?;
            let want = g.sum(0)?.to_vec1::<f32>()?;
            assert_eq!(column_sums(&g)?.to_vec1::<f32>()?, want, "{rows}x{cols}");
        }
        Ok(())
    }
}
