//! Profile helper: the GEMM shapes of a ViT-B/32 block at batch 32: the forward (x @ w_t, and
//! `nn::Linear` with its bias) and the backward's input gradient (g @ w_t^T, the weight as a
//! transposed view or contiguous). `cargo run --release -p xtask --example gemm`
use candle_core::{Device, Tensor};
use std::time::Instant;

fn gflops(m: usize, k: usize, n: usize, f: &dyn Fn() -> candle_core::Result<Tensor>) -> f64 {
    f().unwrap();
    let iters = 10;
    let t = Instant::now();
    for _ in 0..iters {
        f().unwrap();
    }
    2.0 * (m * k * n * iters) as f64 / t.elapsed().as_secs_f64() / 1e9
}

fn main() -> candle_core::Result<()> {
    let d = Device::Cpu;
    let rows = 1600;
    for (inp, out) in [(768, 2304), (768, 768), (768, 3072), (3072, 768)] {
        let x = Tensor::randn(0f32, 1.0, (rows, inp), &d)?;
        let g = Tensor::randn(0f32, 1.0, (rows, out), &d)?;
        let w_t = Tensor::randn(0f32, 1.0, (inp, out), &d)?;
        let w = w_t.t()?.contiguous()?;
        let fwd = gflops(rows, inp, out, &|| x.matmul(&w_t));
        let b = Tensor::randn(0f32, 1.0, out, &d)?;
        let lin = harma_kernels::nn::Linear::frozen(
            w_t.t()?.contiguous()?,
            Some(b),
            &harma_kernels::Compute::cpu(),
        )
        .unwrap();
        let fused = gflops(rows, inp, out, &|| Ok(lin.forward(&x).unwrap()));
        let bwd_view = gflops(rows, out, inp, &|| g.matmul(&w_t.t()?));
        let bwd_contig = gflops(rows, out, inp, &|| g.matmul(&w));
        println!(
            "in {inp:>4} out {out:>4}: forward {fwd:6.1} GFLOP/s, with the bias (LinearBias) \
             {fused:6.1}; input gradient: transposed view {bwd_view:6.1}, contiguous \
             {bwd_contig:6.1}"
        );
    }
    Ok(())
}
