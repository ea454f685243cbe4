//! The compute kernels of harma-rs, and the transformer layers that run them.
//!
//! Layered bottom-up; each level uses only the ones below it:
//! 0. [`raw`]: kernels on slices and raw pointers: GEMM glue (`gemm`), Intel AMX tiles
//!    (`amx`), bf16 rounding, row kernels vectorised for the CPU at hand (`simd`), and
//!    [`raw::ptr::DisjointWrites`] for tasks that write one buffer. All of the workspace's
//!    `unsafe` code lives in this crate; every other crate forbids it.
//! 1. [`compute`]: the explicit setting ([`Compute`]: device, [`Precision`], [`Kernels`],
//!    [`Bf16Kernel`]), and [`bf16_linear`]: frozen linear layers with bf16 products on the
//!    kernel the setting names.
//! 2. [`ops`]: the kernels as Candle custom ops with their backwards (attention, layer norm,
//!    QuickGELU, linear layers that skip frozen weights' gradients, HarMA's gated mix).
//! 3. [`nn`]: the layers (linear, layer norm, multi-head attention, a block's fused frozen
//!    branches) that run the ops their [`Kernels`] names.
//!
//! Beside them, [`runtime`]: the process-wide settings the kernels run best under; and
//! [`testing`]: which kernels the tests run (every one the CPU has; `HARMA_REQUIRE_KERNELS`).
//!
//! Errors are Candle's: these are Candle ops.

// the one crate with unsafe code: every unsafe block says why it is sound
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod bf16_linear;
pub mod compute;
pub mod nn;
pub mod ops;
pub mod raw;
pub mod runtime;
pub mod testing;

pub use candle_core::{Error, Result};
pub use compute::{Bf16Kernel, Compute, Kernels, Precision};
