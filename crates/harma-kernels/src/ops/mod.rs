//! Level 2: the kernels as Candle custom ops, each with its backward where it has one. Candle
//! runs a batched matmul of many small matrices (attention: batch x heads of 50x64) as a
//! sequence of multi-threaded GEMMs, each too small to use the threads, and an activation
//! written as tensor expressions makes one pass over memory per operation; these ops do
//! attention as one parallel loop over (sequence, head) and each element-wise step in one pass.

mod activation;
mod attention;
mod linear;
mod mix;
mod norm;
mod seed;
mod storage;

pub use activation::{QuickGelu, QuickGeluBwd};
pub use attention::Attention;
pub use linear::{column_sums, linear_bias_storage, Bf16LinearGrad, Bf16LinearOp, LinearBias};
pub use mix::GatedMix;
pub use norm::{LayerNormBwd, LayerNormOp};
pub use seed::backward_from;
pub use storage::{load_f32, store_bf16};

pub(crate) use storage::contiguous_f32;
