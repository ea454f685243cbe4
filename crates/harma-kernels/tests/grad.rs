//! Backward passes of the fused CPU kernels against Candle's generic, differentiable ops on the
//! same inputs, and the frozen-weight rule: no gradient is computed or stored for a plain
//! (untracked) weight. The adapters' training stands on these.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var, D};
use harma_kernels::nn::{self, FrozenBranch, LayerNorm, Linear, MultiHeadAttention};
use harma_kernels::{Compute, Kernels, Precision};

const FUSED: Kernels = Kernels::Fused;

/// A frozen layer in `precision` on the CPU.
fn frozen_linear(w: Tensor, b: Tensor, precision: Precision) -> Result<Linear> {
    let compute = Compute::cpu().with_precision(precision);
    Ok(Linear::frozen(w, Some(b), &compute)?)
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn randn(shape: &[usize], seed: u64) -> Result<Tensor> {
    // deterministic pseudo-random values in [-1, 1)
    let n: usize = shape.iter().product();
    let mut x = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// d(sum(f(x) * r))/dx for the fused and the reference version of an op: the largest
/// difference of the outputs, of the gradients, and the reference gradient's largest magnitude.
fn grads(
    x: &Tensor,
    fused: impl Fn(&Tensor) -> Result<Tensor>,
    reference: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<(f32, f32, f32)> {
    let v1 = Var::from_tensor(x)?;
    let v2 = Var::from_tensor(x)?;
    let y1 = fused(v1.as_tensor())?;
    let y2 = reference(v2.as_tensor())?;
    let r = randn(y1.dims(), 99)?;
    let g1 = (&y1 * &r)?.sum_all()?.backward()?;
    let g2 = (&y2 * &r)?.sum_all()?.backward()?;
    let fwd = max_abs_diff(&y1, &y2)?;
    let want = g2.get(v2.as_tensor()).unwrap();
    let bwd = max_abs_diff(g1.get(v1.as_tensor()).unwrap(), want)?;
    let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
    Ok((fwd, bwd, scale))
}

fn reference_attention(qkv: &Tensor, heads: usize, causal: bool) -> Result<Tensor> {
    let (b, l, d3) = qkv.dims3()?;
    let d = d3 / 3;
    let hd = d / heads;
    let split = |i: usize| -> Result<Tensor> {
        Ok(qkv
            .narrow(2, i * d, d)?
            .reshape((b, l, heads, hd))?
            .transpose(1, 2)?
            .contiguous()?)
    };
    let (q, k, v) = (split(0)?, split(1)?, split(2)?);
    let mut s = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
    if causal {
        s = s.broadcast_add(&nn::causal_mask(l, &Device::Cpu)?)?;
    }
    let p = candle_nn::ops::softmax(&s, D::Minus1)?;
    Ok(p.matmul(&v)?.transpose(1, 2)?.reshape((b, l, d))?)
}

#[test]
fn attention_backward_matches_generic_ops() -> Result<()> {
    for causal in [false, true] {
        let qkv = randn(&[3, 7, 3 * 16], 1)?;
        let op = |x: &Tensor| -> Result<Tensor> {
            Ok(x.apply_op1(harma_kernels::ops::Attention { heads: 4, causal })?)
        };
        let (f, g, _) = grads(&qkv, op, |x| reference_attention(x, 4, causal))?;
        eprintln!("attention causal={causal}: forward {f:.1e}, gradient {g:.1e}");
        assert!(f < 1e-5 && g < 1e-5);
    }
    Ok(())
}

#[test]
fn layer_norm_and_quick_gelu_backward_match_generic_ops() -> Result<()> {
    let x = (randn(&[5, 6, 24], 2)? * 3.0)?;
    let ln = LayerNorm {
        weight: (randn(&[24], 3)? + 1.0)?,
        bias: randn(&[24], 4)?,
        eps: 1e-5,
        kernels: FUSED,
    };
    let reference_ln = |x: &Tensor| -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let y = xc.broadcast_div(&(var + 1e-5)?.sqrt()?)?;
        Ok(y.broadcast_mul(&ln.weight)?.broadcast_add(&ln.bias)?)
    };
    let (f, g, _) = grads(&x, |x| Ok(ln.forward(x)?), reference_ln)?;
    eprintln!("layer norm: forward {f:.1e}, gradient {g:.1e}");
    assert!(f < 1e-5 && g < 1e-5);
    let reference_qg = |x: &Tensor| -> Result<Tensor> {
        let s = ((x * -1.702)?.exp()? + 1.0)?.recip()?;
        Ok((x * s)?)
    };
    let (f, g, _) = grads(&x, |x| Ok(nn::quick_gelu(x, FUSED)?), reference_qg)?;
    eprintln!("quick gelu: forward {f:.1e}, gradient {g:.1e}");
    assert!(f < 1e-5 && g < 1e-5);
    Ok(())
}

#[test]
fn frozen_weights_get_no_gradient_trained_ones_do() -> Result<()> {
    let x = Var::from_tensor(&randn(&[2, 5, 16], 5)?)?;
    let frozen = MultiHeadAttention {
        in_proj: frozen_linear(randn(&[48, 16], 6)?, randn(&[48], 7)?, Precision::F32)?,
        out_proj: frozen_linear(randn(&[16, 16], 8)?, randn(&[16], 9)?, Precision::F32)?,
        heads: 4,
        kernels: FUSED,
    };
    let ln = LayerNorm {
        weight: randn(&[16], 10)?,
        bias: randn(&[16], 11)?,
        eps: 1e-5,
        kernels: FUSED,
    };
    // a trained linear after the frozen part
    let w = Var::from_tensor(&randn(&[8, 16], 12)?)?;
    let b = Var::from_tensor(&Tensor::zeros(8, DType::F32, &Device::Cpu)?)?;
    let trained = Linear::trained(w.as_tensor().clone(), Some(b.as_tensor().clone()), FUSED);
    let y = trained.forward(&nn::quick_gelu(
        &frozen.forward(&ln.forward(x.as_tensor())?, false)?,
        FUSED,
    )?)?;
    let grads = y.sum_all()?.backward()?;
    for t in [
        &frozen.in_proj.weight_t()?,
        frozen.in_proj.bias.as_ref().unwrap(),
        &frozen.out_proj.weight_t()?,
        &ln.weight,
        &ln.bias,
    ] {
        assert!(grads.get(t).is_none(), "a frozen tensor has a gradient");
    }
    for t in [x.as_tensor(), w.as_tensor(), b.as_tensor()] {
        let g = grads.get(t).expect("a trained tensor has no gradient");
        assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
    }
    // and the trained linear's gradients equal Candle's matmul gradients
    let w2 = Var::from_tensor(w.as_tensor())?;
    let h = nn::quick_gelu(&frozen.forward(&ln.forward(x.as_tensor())?, false)?, FUSED)?.detach();
    let y2 = h.reshape((10, 16))?.matmul(&w2.as_tensor().t()?)?;
    let g2 = y2.sum_all()?.backward()?;
    let gw = grads.get(w.as_tensor()).unwrap();
    assert!(max_abs_diff(gw, g2.get(w2.as_tensor()).unwrap())? < 1e-4);
    Ok(())
}

/// The fused frozen branches (one graph node each) against their layers run one by one, with
/// f32 and with bf16 weights: same output, same input gradient (to the bf16 rounding of the
/// kept activation with bf16 weights), no gradient for any weight.
#[test]
fn fused_branches_match_their_layers() -> Result<()> {
    let x = (randn(&[3, 5, 24], 13)? * 2.0)?;
    let ln = LayerNorm {
        weight: (randn(&[24], 19)? + 1.0)?,
        bias: randn(&[24], 20)?,
        eps: 1e-5,
        kernels: FUSED,
    };
    let fc = frozen_linear(randn(&[40, 24], 14)?, randn(&[40], 15)?, Precision::F32)?;
    let proj = frozen_linear(randn(&[24, 40], 16)?, randn(&[24], 17)?, Precision::F32)?;
    let attn = MultiHeadAttention {
        // scaled as trained weights are, so that the softmax is not saturated
        in_proj: frozen_linear(
            (randn(&[72, 24], 21)? * 0.2)?,
            randn(&[72], 22)?,
            Precision::F32,
        )?,
        out_proj: frozen_linear(randn(&[24, 24], 23)?, randn(&[24], 24)?, Precision::F32)?,
        heads: 4,
        kernels: FUSED,
    };
    for precision in [Precision::F32, Precision::Bf16] {
        let compute = Compute::cpu().with_precision(precision);
        let dtype = precision.dtype();
        let (fc, proj) = (fc.with_precision(&compute)?, proj.with_precision(&compute)?);
        let attn = MultiHeadAttention {
            in_proj: attn.in_proj.with_precision(&compute)?,
            out_proj: attn.out_proj.with_precision(&compute)?,
            heads: 4,
            kernels: FUSED,
        };
        let mut cases: Vec<(String, FrozenBranch)> = vec![(
            "MLP".into(),
            FrozenBranch::QuickGeluMlp {
                ln: ln.clone(),
                fc: fc.clone(),
                proj: proj.clone(),
            },
        )];
        for causal in [false, true] {
            let branch = FrozenBranch::Attention {
                ln: ln.clone(),
                attn: attn.clone(),
                causal,
            };
            cases.push((format!("attention causal={causal}"), branch));
        }
        for (name, branch) in cases {
            let fused = |x: &Tensor| -> Result<Tensor> {
                Ok(branch.forward_fused(x)?.expect("frozen CPU layers fuse"))
            };
            let layers = |x: &Tensor| -> Result<Tensor> {
                let h = ln.forward(x)?;
                Ok(match &branch {
                    FrozenBranch::Attention { causal, .. } => attn.forward(&h, *causal)?,
                    _ => proj.forward(&nn::quick_gelu(&fc.forward(&h)?, FUSED)?)?,
                })
            };
            let (f, g, g_max) = grads(&x, fused, layers)?;
            // f32: the same operations in the same order, so the same bits; behind bf16
            // layers the kept activation is stored in bf16 (relative rounding 2^-9), which
            // reaches the input gradient: within 1% of the largest gradient
            let (f_tol, g_tol) = if dtype == DType::F32 {
                (0.0, 0.0)
            } else {
                (0.0, 0.01 * g_max)
            };
            eprintln!(
                "fused {name} {dtype:?}: forward {f:.1e}, gradient {g:.1e} (bound {g_tol:.1e})"
            );
            assert!(f <= f_tol && g <= g_tol, "{name} {dtype:?}: {f} {g}");
            let v = Var::from_tensor(&x)?;
            let gs = fused(v.as_tensor())?.sum_all()?.backward()?;
            assert!(gs.get(v.as_tensor()).is_some());
            // (a bf16 layer keeps its bias inside, out of any graph)
            for t in [&ln.weight, &ln.bias].into_iter().chain(fc.bias.as_ref()) {
                assert!(gs.get(t).is_none(), "a frozen tensor has a gradient");
            }
        }
    }
    // a trained layer does not fuse
    let branch = FrozenBranch::QuickGeluMlp {
        ln,
        fc: Linear::trained(randn(&[40, 24], 18)?, None, FUSED),
        proj,
    };
    assert!(branch.forward_fused(&x)?.is_none());
    Ok(())
}
