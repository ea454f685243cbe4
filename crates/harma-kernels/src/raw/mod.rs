//! Level 0: kernels on slices and raw pointers. Every `unsafe` block of the workspace is in
//! this folder or in a Candle op of `ops` that calls into it.

pub mod amx;
pub mod avx512bf16;
pub mod bf16;
pub mod gemm;
pub mod ptr;
pub mod simd;
