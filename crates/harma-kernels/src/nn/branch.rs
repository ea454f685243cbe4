//! A block's frozen pre-norm branches as one graph node each, on the CPU.

use candle_core::{Result, Tensor};

use super::{quick_gelu, LayerNorm, Linear, MultiHeadAttention};
use crate::compute::Kernels;
use crate::ops::{load_f32, store_bf16, Attention, QuickGeluBwd};

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
    /// (see [`FrozenBranch::fuses`]): the caller then runs the layers.
    pub fn forward_fused(&self, x: &Tensor) -> Result<Option<Tensor>> {
        if !self.fuses() {
            return Ok(None);
        }
        let op = FrozenBranchOp {
            branch: self.clone(),
            kept: std::sync::OnceLock::new(),
        };
        Ok(Some(x.contiguous()?.apply_op1(op)?))
    }

    /// Whether this branch runs as one fused node: its layers run the fused kernels and every
    /// linear layer is frozen on the CPU.
    pub fn fuses(&self) -> bool {
        let (kernels, layers_frozen) = match self {
            FrozenBranch::Attention { ln, attn, .. } => (
                ln.kernels == Kernels::Fused && attn.kernels == Kernels::Fused,
                attn.in_proj.frozen_on_cpu() && attn.out_proj.frozen_on_cpu(),
            ),
            FrozenBranch::QuickGeluMlp { ln, fc, proj } => (
                ln.kernels == Kernels::Fused && fc.kernels == Kernels::Fused,
                fc.frozen_on_cpu() && proj.frozen_on_cpu(),
            ),
        };
        kernels && layers_frozen
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
                let o = qkv.apply_op1_no_bwd(&Attention {
                    heads: attn.heads,
                    causal: *causal,
                })?;
                (attn.out_proj.forward(&o)?, qkv)
            }
            FrozenBranch::QuickGeluMlp { fc, proj, .. } => {
                let hidden = fc.forward(&h)?;
                (proj.forward(&quick_gelu(&hidden, fc.kernels)?)?, hidden)
            }
        };
        // behind bf16 layers, the kept activation is kept in bf16 too (as under PyTorch's
        // autocast): the backward's products round it to bf16 anyway, and it halves the memory
        let bf16 = match self {
            FrozenBranch::Attention { attn, .. } => attn.in_proj.is_cpu_bf16(),
            FrozenBranch::QuickGeluMlp { fc, .. } => fc.is_cpu_bf16(),
        };
        let kept = if bf16 { store_bf16(&kept)? } else { kept };
        Ok((y, kept))
    }

    /// The gradient at the layer norm's output, from the output's gradient `g` and the kept
    /// activation.
    fn backward_to_ln(&self, kept: &Tensor, g: &Tensor) -> Result<Tensor> {
        let kept = &load_f32(kept)?;
        match self {
            FrozenBranch::Attention { attn, causal, .. } => {
                let g_o = attn.out_proj.input_grad(g)?;
                let op = Attention {
                    heads: attn.heads,
                    causal: *causal,
                };
                let g_qkv = candle_core::CustomOp1::bwd(&op, kept, kept, &g_o)?
                    .expect("attention has an input gradient");
                attn.in_proj.input_grad(&g_qkv)
            }
            FrozenBranch::QuickGeluMlp { fc, proj, .. } => {
                let g_a = proj.input_grad(g)?.contiguous()?;
                let g_h = kept.apply_op2_no_bwd(&g_a, &QuickGeluBwd)?;
                fc.input_grad(&g_h)
            }
        }
    }

    /// The gradient at the branch's input `x` from the gradient `g` at its output and the
    /// activation `kept` that [`FrozenBranch::run`] returned with it.
    pub fn input_grad(&self, x: &Tensor, kept: &Tensor, g: &Tensor) -> Result<Tensor> {
        let g_ln = self.backward_to_ln(kept, g)?;
        self.ln().input_grad(x, &g_ln)
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
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let x = match (s, l.contiguous_offsets()) {
            (candle_core::CpuStorage::F32(v), Some((a, b))) => {
                Tensor::from_slice(&v[a..b], l.shape(), &candle_core::Device::Cpu)?
            }
            _ => candle_core::bail!("frozen-branch: contiguous f32 input only"),
        };
        let (y, kept) = self.branch.run(&x)?;
        if self.kept.set(kept).is_err() {
            candle_core::bail!("frozen-branch: one op instance per forward");
        }
        let shape = y.shape().clone();
        Ok((
            candle_core::CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?),
            shape,
        ))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let kept = self.kept.get().ok_or_else(|| {
            candle_core::Error::Msg("frozen-branch: backward before forward".into())
        })?;
        Ok(Some(self.branch.input_grad(x, kept, grad)?))
    }
}
