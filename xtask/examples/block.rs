//! Profile helper: time each op of one ViT-B/32 block on a batch of 32 (`cargo run --release -p xtask --example block`).
use candle_core::{DType, Device, Tensor};
use harma_kernels::nn::{self, LayerNorm, Linear, MultiHeadAttention};
use harma_kernels::{Compute, Kernels};
use std::time::Instant;
fn t(
    name: &str,
    n: usize,
    f: &mut dyn FnMut() -> harma_kernels::Result<Tensor>,
) -> harma_kernels::Result<()> {
    f()?;
    let s = Instant::now();
    for _ in 0..n {
        f()?;
    }
    println!(
        "{name:>12}: {:8.2} ms",
        s.elapsed().as_secs_f64() * 1000.0 / n as f64
    );
    Ok(())
}
fn main() -> harma_kernels::Result<()> {
    let d = Device::Cpu;
    let compute = Compute::cpu();
    let (b, l, w, mlp) = (32, 50, 768, 3072);
    let x = Tensor::randn(0f32, 1.0, (b, l, w), &d)?;
    let ln = LayerNorm {
        weight: Tensor::ones(w, DType::F32, &d)?,
        bias: Tensor::zeros(w, DType::F32, &d)?,
        eps: 1e-5,
        kernels: Kernels::Fused,
    };
    let lin = |o: usize, i: usize| {
        Linear::frozen(
            Tensor::randn(0f32, 0.02, (o, i), &d).unwrap(),
            Some(Tensor::zeros(o, DType::F32, &d).unwrap()),
            &compute,
        )
        .unwrap()
    };
    let attn = MultiHeadAttention {
        in_proj: lin(3 * w, w),
        out_proj: lin(w, w),
        heads: 12,
        kernels: Kernels::Fused,
    };
    let fc = lin(mlp, w);
    let pr = lin(w, mlp);
    let h = fc.forward(&x)?;
    let qkv = attn.in_proj.forward(&x)?;
    let n = 10;
    t("layernorm", n, &mut || ln.forward(&x))?;
    t("qkv linear", n, &mut || attn.in_proj.forward(&x))?;
    t("attn total", n, &mut || attn.forward(&x, false))?;
    t("attn core", n, &mut || {
        qkv.apply_op1_no_bwd(&harma_kernels::ops::Attention {
            heads: 12,
            causal: false,
        })
    })?;
    t("out linear", n, &mut || attn.out_proj.forward(&x))?;
    t("fc linear", n, &mut || fc.forward(&x))?;
    t("quickgelu", n, &mut || nn::quick_gelu(&h, Kernels::Fused))?;
    t("proj linear", n, &mut || pr.forward(&h))?;
    t("residual add", n, &mut || &x + &x)?;
    Ok(())
}
