//! The tensor operations of a transformer block, shared by the backbone and the adapters.
//!
//! On the CPU in f32 they run the fused kernels of `kernels` (each with a backward that skips
//! frozen weights). Elsewhere, or with [`set_generic_ops`], they are compositions of Candle's
//! basic ops, every one differentiable (Candle's own fused softmax and layer norm have no
//! backward, so they are not used): the reference path, and the naive baseline of the bench.
//! On a GPU the linear layers still skip frozen-weight gradients (`kernels::LinearBias` runs
//! the backend's own GEMM there) unless [`set_generic_ops`] is on.

use candle_core::{DType, Module, Tensor, D};

use std::sync::Arc;

use crate::bf16::Bf16Linear;
use crate::kernels;
pub use crate::kernels::Attention as AttentionKernel;

use crate::Result;

/// The weight of a [`Linear`].
#[derive(Debug, Clone)]
pub enum Weight {
    /// Frozen: stored transposed ([in, out], contiguous), since the GEMM reads a contiguous
    /// right-hand side up to 1.4x faster than a transposed view.
    Frozen(Tensor),
    /// Trained (a `Var`'s tensor, [out, in]): transposed at each forward so that updates to the
    /// variable take effect and gradients reach it.
    Trained(Tensor),
    /// Frozen, in bf16 on the CPU (`to_dtype(BF16)`): on AMX tiles where the CPU has them,
    /// with its bias inside.
    CpuBf16(Arc<Bf16Linear>),
}

/// A linear layer, `x @ weight^T + bias` on the last dimension of any rank; weights are given
/// as PyTorch stores them ([out, in]).
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Weight,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// A frozen layer (the backbone's).
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Self {
            weight: Weight::Frozen(weight.t()?.contiguous()?),
            bias,
        })
    }

    /// A trained layer (an adapter's): `weight` and `bias` are read at every forward.
    pub fn trained(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight: Weight::Trained(weight),
            bias,
        }
    }

    /// The weight as [in, out] (bf16-rounded values in f32 for [`Weight::CpuBf16`]).
    pub fn weight_t(&self) -> Result<Tensor> {
        Ok(match &self.weight {
            Weight::Frozen(t) => t.clone(),
            Weight::Trained(w) => w.t()?.contiguous()?,
            Weight::CpuBf16(l) => Tensor::from_vec(
                l.weight_t(),
                (l.in_dim, l.out_dim),
                &candle_core::Device::Cpu,
            )?,
        })
    }

    /// A frozen layer with its weight and bias in `dtype`; a trained one is left as it is. In
    /// bf16 (mixed precision) the layer's products take bf16 operands and sum in f32. On the
    /// CPU that is [`Bf16Linear`] (AMX where present, bias kept in f32); elsewhere the weight
    /// and bias are stored in bf16 and the input is cast to it and the result back.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(match &self.weight {
            Weight::Frozen(w) if dtype == DType::BF16 && w.device().is_cpu() => {
                let (inp, out) = w.dims2()?;
                let w = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let bias = match &self.bias {
                    Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
                    None => None,
                };
                let amx = crate::bf16::amx_available();
                Self {
                    weight: Weight::CpuBf16(Arc::new(Bf16Linear::new(&w, inp, out, bias, amx))),
                    bias: None,
                }
            }
            Weight::Frozen(w) => Self {
                weight: Weight::Frozen(w.to_dtype(dtype)?),
                bias: self.bias.as_ref().map(|b| b.to_dtype(dtype)).transpose()?,
            },
            Weight::Trained(_) | Weight::CpuBf16(_) => self.clone(),
        })
    }

    /// Whether this layer is a [`Weight::CpuBf16`].
    fn is_cpu_bf16(&self) -> bool {
        matches!(self.weight, Weight::CpuBf16(_))
    }

    /// Whether this layer is frozen and runs on the CPU's fused kernels (f32, or
    /// [`Weight::CpuBf16`]).
    fn frozen_on_cpu(&self) -> bool {
        let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        match &self.weight {
            Weight::CpuBf16(_) => true,
            Weight::Frozen(w) => cpu_f32(w) && self.bias.as_ref().is_none_or(cpu_f32),
            Weight::Trained(_) => false,
        }
    }

    /// The input gradient of a frozen layer: `g` [.., out] -> `g w` [.., in].
    fn input_grad(&self, g: &Tensor) -> Result<Tensor> {
        let mut dims = g.dims().to_vec();
        let out = *dims.last().expect("gradient has a last dimension");
        let g2 = g.reshape(((), out))?.contiguous()?;
        let gx = match &self.weight {
            Weight::CpuBf16(l) => g2.apply_op1_no_bwd(&kernels::Bf16LinearGrad(l.clone()))?,
            Weight::Frozen(w_t) => g2.matmul(&w_t.t()?)?,
            Weight::Trained(w) => g2.matmul(w)?,
        };
        *dims.last_mut().unwrap() = gx.dim(1)?;
        Ok(gx.reshape(dims)?)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let last = *dims.last().expect("linear input has a last dimension");
        let rows: usize = dims[..dims.len() - 1].iter().product();
        // one 2-d matmul over every row: the largest GEMM Candle can run
        let x2 = x.reshape((rows, last))?;
        let y = if let Weight::CpuBf16(l) = &self.weight {
            x2.to_dtype(DType::F32)?
                .contiguous()?
                .apply_op1(kernels::Bf16LinearOp(l.clone()))?
        } else {
            let weight_t = self.weight_t()?;
            let x2 = x2.to_dtype(weight_t.dtype())?;
            match &self.bias {
                // the fused CPU kernel, or the backend's GEMM elsewhere: both with a backward
                // that skips frozen weights
                Some(b) if fused_cpu(&x2) || (!generic() && !x2.device().is_cpu()) => x2
                    .contiguous()?
                    .apply_op3(&weight_t, b, kernels::LinearBias)?,
                Some(b) => x2.matmul(&weight_t)?.broadcast_add(b)?,
                None => x2.matmul(&weight_t)?,
            }
        };
        let mut out = dims;
        *out.last_mut().unwrap() = y.dim(1)?;
        Ok(y.reshape(out)?.to_dtype(x.dtype())?)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Linear::forward(self, x).map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}

/// Layer norm over the last dimension.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if fused_cpu(x) {
            let dims = x.dims().to_vec();
            let d = *dims.last().expect("layer norm input has a last dimension");
            let x2 = x.contiguous()?.reshape(((), d))?;
            let y = x2.apply_op3(
                &self.weight,
                &self.bias,
                kernels::LayerNormOp {
                    eps: self.eps as f32,
                },
            )?;
            return Ok(y.reshape(dims)?);
        }
        layer_norm_generic(x, &self.weight, &self.bias, self.eps)
    }
}

/// Softmax over the last dimension, differentiable (`exp(x - max) / sum`; rows of -inf give 0).
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Layer norm over the last dimension from basic (differentiable) ops.
pub fn layer_norm_generic(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let xc = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(y.broadcast_mul(weight)?.broadcast_add(bias)?)
}

thread_local! {
    static GENERIC: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// On this thread, run the generic ops even where the fused CPU kernels apply (the reference
/// path, and the naive baseline of `cargo xtask bench`). Returns the previous setting.
pub fn set_generic_ops(on: bool) -> bool {
    GENERIC.with(|g| g.replace(on))
}

fn generic() -> bool {
    GENERIC.with(|g| g.get())
}

/// Whether the fused CPU kernels of `kernels` apply to `x`.
fn fused_cpu(x: &Tensor) -> bool {
    !generic() && x.device().is_cpu() && x.dtype() == DType::F32
}

/// HarMA's gated mix `s * a + (1 - s) * b` with `s = sigmoid(gate)` (`gate` a scalar).
pub fn gated_mix(gate: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if fused_cpu(a) && a.dims() == b.dims() && b.dtype() == DType::F32 {
        return Ok(a
            .contiguous()?
            .apply_op3(&b.contiguous()?, gate, kernels::GatedMix)?);
    }
    let s = candle_nn::ops::sigmoid(gate)?;
    Ok((a.broadcast_mul(&s)? + b.broadcast_mul(&(1.0 - &s)?)?)?)
}

/// `x * sigmoid(1.702 x)`.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    if fused_cpu(x) {
        return Ok(x.contiguous()?.apply_op1(kernels::QuickGelu)?);
    }
    Ok((x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?)
}

/// A frozen pre-norm branch of a backbone block, `f(ln(x))`, run as one graph node on the CPU:
/// the attention branch `out_proj(attention(in_proj(ln_1(x))))` or the QuickGELU MLP
/// `c_proj(quick_gelu(c_fc(ln_2(x))))`. Its backward gives the input's gradient only (every
/// weight in it is frozen), from the one activation it keeps (the packed q|k|v, or `c_fc`'s
/// output): Candle's gradient store sees one edge instead of five to eight, and the other
/// intermediates are freed as soon as the forward has used them.
#[derive(Debug, Clone)]
pub enum FrozenBranch {
    Attention {
        ln: LayerNorm,
        attn: MultiHeadAttention,
        causal: bool,
    },
    QuickGeluMlp {
        ln: LayerNorm,
        fc: Linear,
        proj: Linear,
    },
}

impl FrozenBranch {
    /// `x` [b, l, d] -> [b, l, d] through one fused node, or `None` where that does not apply
    /// (not f32 on the CPU, generic ops on, a trained layer): the caller then runs the layers.
    pub fn forward_fused(&self, x: &Tensor) -> Result<Option<Tensor>> {
        if !self.fuses(x) {
            return Ok(None);
        }
        let op = FrozenBranchOp {
            branch: self.clone(),
            kept: std::sync::OnceLock::new(),
        };
        Ok(Some(x.contiguous()?.apply_op1(op)?))
    }

    /// Whether the fused kernels apply to this branch on `x`: f32 on the CPU, generic ops
    /// off, every linear layer frozen.
    pub fn fuses(&self, x: &Tensor) -> bool {
        let layers_frozen = match self {
            FrozenBranch::Attention { attn, .. } => {
                attn.in_proj.frozen_on_cpu() && attn.out_proj.frozen_on_cpu()
            }
            FrozenBranch::QuickGeluMlp { fc, proj, .. } => {
                fc.frozen_on_cpu() && proj.frozen_on_cpu()
            }
        };
        fused_cpu(x) && layers_frozen
    }

    fn ln(&self) -> &LayerNorm {
        match self {
            FrozenBranch::Attention { ln, .. } | FrozenBranch::QuickGeluMlp { ln, .. } => ln,
        }
    }

    /// The branch on a tensor outside any graph (where [`FrozenBranch::fuses`]): its output
    /// and the one activation [`FrozenBranch::input_grad`] needs.
    pub fn run(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let h = self.ln().forward(x)?;
        let (y, kept) = match self {
            FrozenBranch::Attention { attn, causal, .. } => {
                let qkv = attn.in_proj.forward(&h)?;
                let o = qkv.apply_op1_no_bwd(&kernels::Attention {
                    heads: attn.heads,
                    causal: *causal,
                })?;
                (attn.out_proj.forward(&o)?, qkv)
            }
            FrozenBranch::QuickGeluMlp { fc, proj, .. } => {
                let hidden = fc.forward(&h)?;
                (proj.forward(&quick_gelu(&hidden)?)?, hidden)
            }
        };
        // behind bf16 layers, the kept activation is kept in bf16 too (as under PyTorch's
        // autocast): the backward's products round it to bf16 anyway, and it halves the memory
        let bf16 = match self {
            FrozenBranch::Attention { attn, .. } => attn.in_proj.is_cpu_bf16(),
            FrozenBranch::QuickGeluMlp { fc, .. } => fc.is_cpu_bf16(),
        };
        let kept = if bf16 {
            crate::bf16::store_bf16(&kept)?
        } else {
            kept
        };
        Ok((y, kept))
    }

    /// The gradient at the layer norm's output, from the output's gradient `g` and the kept
    /// activation.
    fn backward_to_ln(&self, kept: &Tensor, g: &Tensor) -> Result<Tensor> {
        let kept = &crate::bf16::load_f32(kept)?;
        Ok(match self {
            FrozenBranch::Attention { attn, causal, .. } => {
                let g_o = attn.out_proj.input_grad(g)?;
                let op = kernels::Attention {
                    heads: attn.heads,
                    causal: *causal,
                };
                let g_qkv = candle_core::CustomOp1::bwd(&op, kept, kept, &g_o)?
                    .expect("attention has an input gradient");
                attn.in_proj.input_grad(&g_qkv)?
            }
            FrozenBranch::QuickGeluMlp { fc, proj, .. } => {
                let g_a = proj.input_grad(g)?.contiguous()?;
                let g_h = kept.apply_op2_no_bwd(&g_a, &kernels::QuickGeluBwd)?;
                fc.input_grad(&g_h)?
            }
        })
    }

    /// The gradient at the branch's input `x` from the gradient `g` at its output and the
    /// activation `kept` that [`FrozenBranch::run`] returned with it.
    pub fn input_grad(&self, x: &Tensor, kept: &Tensor, g: &Tensor) -> Result<Tensor> {
        let g_ln = self.backward_to_ln(kept, g)?;
        let ln = self.ln();
        let op = kernels::LayerNormBwd { eps: ln.eps as f32 };
        Ok(x.contiguous()?
            .apply_op3_no_bwd(&ln.weight, &g_ln.contiguous()?, &op)?)
    }
}

/// The graph node of [`FrozenBranch::forward_fused`]; `kept` is filled by its forward.
struct FrozenBranchOp {
    branch: FrozenBranch,
    kept: std::sync::OnceLock<Tensor>,
}

impl candle_core::CustomOp1 for FrozenBranchOp {
    fn name(&self) -> &'static str {
        "frozen-branch"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let err = |e: crate::Error| candle_core::Error::Msg(e.to_string());
        let x = match (s, l.contiguous_offsets()) {
            (candle_core::CpuStorage::F32(v), Some((a, b))) => {
                Tensor::from_slice(&v[a..b], l.shape(), &candle_core::Device::Cpu)?
            }
            _ => candle_core::bail!("frozen-branch: contiguous f32 input only"),
        };
        let (y, kept) = self.branch.run(&x).map_err(err)?;
        if self.kept.set(kept).is_err() {
            candle_core::bail!("frozen-branch: one op instance per forward");
        }
        let shape = y.shape().clone();
        Ok((
            candle_core::CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?),
            shape,
        ))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let err = |e: crate::Error| candle_core::Error::Msg(e.to_string());
        let kept = self.kept.get().ok_or_else(|| {
            candle_core::Error::Msg("frozen-branch: backward before forward".into())
        })?;
        Ok(Some(self.branch.input_grad(x, kept, grad).map_err(err)?))
    }
}

/// Exact (erf) GELU.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    Ok(x.gelu_erf()?)
}

/// Multi-head self-attention in `nn.MultiheadAttention`'s layout: a packed `in_proj`
/// [3d, d] producing q, k, v, scale 1/sqrt(head_dim), then `out_proj`.
#[derive(Debug, Clone)]
pub struct MultiHeadAttention {
    pub in_proj: Linear,
    pub out_proj: Linear,
    pub heads: usize,
}

impl MultiHeadAttention {
    /// `x`: [b, l, d] -> [b, l, d]; `causal`: position i attends to positions <= i only.
    pub fn forward(&self, x: &Tensor, causal: bool) -> Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        let h = self.heads;
        let hd = d / h;
        let qkv = self.in_proj.forward(x)?; // [b, l, 3d]
        if fused_cpu(&qkv) {
            let o = qkv.apply_op1(kernels::Attention { heads: h, causal })?;
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

/// Additive causal mask [l, l]: 0 on and below the diagonal, -inf above.
pub fn causal_mask(l: usize, device: &candle_core::Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..l)
        .flat_map(|i| (0..l).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(m, (l, l), device)?)
}

/// L2-normalise the rows of a [n, d] matrix.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    Ok(x.broadcast_div(&norm)?)
}

/// Candle's backward seeded with the gradient `g` at `x` (same shape): the gradients of
/// `sum(x * g)`, which is the vector-Jacobian product of everything `x` depends on. On the CPU
/// the seed is one node whose backward hands `g` on as it is, instead of a product and a sum
/// over `x` and their backward.
pub fn backward_from(x: &Tensor, g: &Tensor) -> Result<candle_core::backprop::GradStore> {
    if x.device().is_cpu() && x.dims() == g.dims() && x.dtype() == g.dtype() {
        return Ok(x.apply_op1(SeedGrad(g.clone()))?.backward()?);
    }
    Ok((x * g)?.sum_all()?.backward()?)
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
