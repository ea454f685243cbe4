//! Linear layers: frozen (the backbone's, f32 or bf16) and trained (the adapters').

use std::sync::Arc;

use candle_core::{DType, Module, Result, Tensor};

use crate::bf16_linear::Bf16Linear;
use crate::compute::{Bf16Kernel, Compute, Kernels, Precision};
use crate::ops::{Bf16LinearGrad, Bf16LinearOp, LinearBias};

/// The weight of a [`Linear`].
#[derive(Debug, Clone)]
pub enum Weight {
    /// Frozen: stored transposed ([in, out], contiguous), since the GEMM reads a contiguous
    /// right-hand side up to 1.4x faster than a transposed view.
    Frozen(Tensor),
    /// Trained (a `Var`'s tensor, [out, in]): transposed at each forward so that updates to the
    /// variable take effect and gradients reach it. With a [`Bf16Kernel`] (`--precision bf16`
    /// on the CPU) its products take bf16 operands and sum in f32, as under PyTorch's autocast;
    /// the weight and its gradient stay f32.
    Trained(Tensor, Option<Bf16Kernel>),
    /// Frozen, in bf16 on the CPU ([`Precision::Bf16`]): on the [`crate::Bf16Kernel`] it was
    /// built for, with its bias inside.
    CpuBf16(Arc<Bf16Linear>),
}

/// A linear layer, `x @ weight^T + bias` on the last dimension of any rank; weights are given
/// as PyTorch stores them ([out, in]).
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Weight,
    pub bias: Option<Tensor>,
    pub kernels: Kernels,
}

impl Linear {
    /// A frozen layer (the backbone's) in `compute`'s precision.
    pub fn frozen(weight: Tensor, bias: Option<Tensor>, compute: &Compute) -> Result<Self> {
        Self {
            weight: Weight::Frozen(weight.t()?.contiguous()?),
            bias,
            kernels: compute.kernels,
        }
        .with_precision(compute)
    }

    /// A trained layer (an adapter's): `weight` and `bias` are read at every forward.
    pub fn trained(weight: Tensor, bias: Option<Tensor>, kernels: Kernels) -> Self {
        Self {
            weight: Weight::Trained(weight, None),
            bias,
            kernels,
        }
    }

    /// The weight as [in, out] (bf16-rounded values in f32 for [`Weight::CpuBf16`]).
    pub fn weight_t(&self) -> Result<Tensor> {
        Ok(match &self.weight {
            Weight::Frozen(t) => t.clone(),
            Weight::Trained(w, _) => w.t()?.contiguous()?,
            Weight::CpuBf16(l) => Tensor::from_vec(
                l.weight_t(),
                (l.in_dim, l.out_dim),
                &candle_core::Device::Cpu,
            )?,
        })
    }

    /// The layer in `compute`'s precision. In bf16 (mixed precision) the layer's products take
    /// bf16 operands and sum in f32. A frozen layer on the CPU becomes a [`Bf16Linear`] on
    /// `compute.bf16` (bias kept in f32); elsewhere its weight and bias are stored in bf16 and
    /// the input is cast to it and the result back. A trained layer on the fused CPU kernels
    /// keeps its f32 weight and multiplies on `compute.bf16`; elsewhere it stays f32.
    pub fn with_precision(&self, compute: &Compute) -> Result<Self> {
        let dtype = compute.precision.dtype();
        Ok(match &self.weight {
            Weight::Frozen(w) if compute.precision == Precision::Bf16 && w.device().is_cpu() => {
                let (inp, out) = w.dims2()?;
                let w = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let bias = match &self.bias {
                    Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
                    None => None,
                };
                Self {
                    weight: Weight::CpuBf16(Arc::new(Bf16Linear::new(
                        &w,
                        inp,
                        out,
                        bias,
                        compute.bf16,
                    ))),
                    bias: None,
                    kernels: self.kernels,
                }
            }
            Weight::Frozen(w) => Self {
                weight: Weight::Frozen(w.to_dtype(dtype)?),
                bias: self.bias.as_ref().map(|b| b.to_dtype(dtype)).transpose()?,
                kernels: self.kernels,
            },
            Weight::Trained(w, _) => {
                let bf16 = (compute.precision == Precision::Bf16
                    && w.device().is_cpu()
                    && self.kernels == Kernels::Fused)
                    .then_some(compute.bf16);
                Self {
                    weight: Weight::Trained(w.clone(), bf16),
                    ..self.clone()
                }
            }
            Weight::CpuBf16(_) => self.clone(),
        })
    }

    /// Whether this layer is a [`Weight::CpuBf16`].
    pub(crate) fn is_cpu_bf16(&self) -> bool {
        matches!(self.weight, Weight::CpuBf16(_))
    }

    /// Whether this layer is frozen and runs on the CPU's fused kernels (f32, or
    /// [`Weight::CpuBf16`]).
    pub(crate) fn frozen_on_cpu(&self) -> bool {
        let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        match &self.weight {
            Weight::CpuBf16(_) => true,
            Weight::Frozen(w) => cpu_f32(w) && self.bias.as_ref().is_none_or(cpu_f32),
            Weight::Trained(..) => false,
        }
    }

    /// The input gradient of a frozen layer: `g` [.., out] -> `g w` [.., in].
    pub(crate) fn input_grad(&self, g: &Tensor) -> Result<Tensor> {
        let mut dims = g.dims().to_vec();
        let out = *dims.last().expect("gradient has a last dimension");
        let g2 = g.reshape(((), out))?.contiguous()?;
        let gx = match &self.weight {
            Weight::CpuBf16(l) => g2.apply_op1_no_bwd(&Bf16LinearGrad(l.clone()))?,
            Weight::Frozen(w_t) => g2.matmul(&w_t.t()?)?,
            Weight::Trained(w, _) => g2.matmul(w)?,
        };
        *dims.last_mut().unwrap() = gx.dim(1)?;
        gx.reshape(dims)
    }

    /// x: [.., in] -> [.., out]
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let last = *dims.last().expect("linear input has a last dimension");
        let rows: usize = dims[..dims.len() - 1].iter().product();
        // one 2-d matmul over every row: the largest GEMM Candle can run
        let x2 = x.reshape((rows, last))?;
        let y = if let Weight::CpuBf16(l) = &self.weight {
            x2.to_dtype(DType::F32)?
                .contiguous()?
                .apply_op1(Bf16LinearOp(l.clone()))?
        } else {
            let weight_t = self.weight_t()?;
            let x2 = x2.to_dtype(weight_t.dtype())?;
            match &self.bias {
                // the fused CPU kernel, or the backend's GEMM elsewhere: both with a backward
                // that skips frozen weights
                Some(b) if self.kernels != Kernels::Generic => {
                    let op = match self.weight {
                        Weight::Trained(_, bf16) => LinearBias(bf16),
                        _ => LinearBias::F32,
                    };
                    x2.contiguous()?.apply_op3(&weight_t, b, op)?
                }
                Some(b) => x2.matmul(&weight_t)?.broadcast_add(b)?,
                None => x2.matmul(&weight_t)?,
            }
        };
        let mut out = dims;
        *out.last_mut().unwrap() = y.dim(1)?;
        y.reshape(out)?.to_dtype(x.dtype())
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Linear::forward(self, x)
    }
}
