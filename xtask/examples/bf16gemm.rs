//! Profile helper: GFLOP/s of each bf16 kernel this CPU has on the linear layers' shapes of a
//! ViT-B/32 block at batch 32 (1600 rows), forward and input gradient, beside the f32 GEMM.
//! `cargo run --release -p xtask --example bf16gemm`
use harma_kernels::bf16_linear::Bf16Linear;
use harma_kernels::Bf16Kernel;
use std::time::Instant;

fn gflops(m: usize, k: usize, n: usize, f: &dyn Fn()) -> f64 {
    f();
    let iters = 8;
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    2.0 * (m * k * n * iters) as f64 / t.elapsed().as_secs_f64() / 1e9
}

fn main() {
    harma_train::cli::start_up();
    let rows = 1600;
    let values = |n: usize| {
        (0..n)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 500.0)
            .collect::<Vec<f32>>()
    };
    for (inp, out) in [(768, 2304), (768, 768), (768, 3072), (3072, 768)] {
        let (x, w_t, g) = (values(rows * inp), values(inp * out), values(rows * out));
        let mut line = format!("in {inp:>4} out {out:>4}:");
        let f32 = gflops(rows, inp, out, &|| {
            std::hint::black_box(harma_kernels::raw::gemm::linear_f32(
                &x,
                &w_t,
                None,
                (rows, inp, out),
            ));
        });
        line += &format!(" f32 GEMM {f32:6.1}");
        for kernel in Bf16Kernel::ALL.into_iter().filter(|k| k.available()) {
            let lin = Bf16Linear::new(&w_t, inp, out, None, kernel);
            let fwd = gflops(rows, inp, out, &|| {
                std::hint::black_box(lin.forward(&x, rows));
            });
            let bwd = gflops(rows, out, inp, &|| {
                std::hint::black_box(lin.backward(&g, rows));
            });
            line += &format!(" | {kernel}: fwd {fwd:6.1} bwd {bwd:6.1}");
        }
        println!("{line} GFLOP/s");
    }
    if Bf16Kernel::Avx512.available() {
        let threads = rayon::current_num_threads();
        let per = harma_kernels::raw::avx512bf16::peak_gflops(20_000_000);
        println!(
            "VDPBF16PS on registers: {per:.1} GFLOP/s per thread ({threads} threads: {:.1})",
            per * threads as f64
        );
    }
}
