//! Reading Candle's CPU storage, and keeping f32 activations in bf16.

use candle_core::{CpuStorage, Layout, Tensor};
use rayon::prelude::*;

use crate::raw::bf16::{bf16_bits, bf16_to_f32};

/// The f32 elements of a contiguous CPU storage, or an error naming the op.
pub(crate) fn contiguous_f32<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        _ => candle_core::bail!("{op}: f32 only"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// An f32 CPU tensor rounded to bf16 (ties to even), for keeping an activation in half the
/// memory; in parallel, as Candle's conversion runs on one thread.
pub fn store_bf16(t: &Tensor) -> candle_core::Result<Tensor> {
    map_cpu(t, |x: f32| half::bf16::from_bits(bf16_bits(x)))
}

/// Back from [`store_bf16`] to f32 (exact), in parallel; an f32 tensor is returned as it is.
pub fn load_f32(t: &Tensor) -> candle_core::Result<Tensor> {
    if t.dtype() == candle_core::DType::F32 {
        return Ok(t.clone());
    }
    map_cpu(t, |x: half::bf16| bf16_to_f32(x.to_bits()))
}

/// `f` on every element of a CPU tensor, in parallel, into a new contiguous tensor.
fn map_cpu<A, B>(t: &Tensor, f: impl Fn(A) -> B + Sync) -> candle_core::Result<Tensor>
where
    A: candle_core::WithDType,
    B: candle_core::WithDType + Default,
{
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("bf16 storage: CPU tensors only");
    };
    let (a, b) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("bf16 storage: not contiguous".into()))?;
    let src = &A::cpu_storage_as_slice(cpu)?[a..b];
    let mut out = vec![B::default(); src.len()];
    out.par_chunks_mut(1 << 14)
        .zip(src.par_chunks(1 << 14))
        .for_each(|(o, i)| o.iter_mut().zip(i).for_each(|(o, &x)| *o = f(x)));
    drop(storage);
    Tensor::from_vec(out, t.shape(), t.device())
}
