//! Data-parallel training: the collective operations a step needs, behind one trait.
//!
//! As the original trains on two GPUs (`torch.distributed`, SPEC "Optimisation"): each rank
//! embeds its shard of the global batch, the embeddings (and image ids) of every rank are
//! gathered so that the contrastive and triplet losses see the whole global batch, each rank
//! backpropagates the loss's gradient at its own rows (the original's `AllGather` backward
//! hands each rank its slice), and the parameter gradients are averaged over the ranks before
//! the optimiser, so that every rank takes the same step.
//!
//! Implementations: [`Single`] (one process, the default); with the `cuda` feature, NCCL
//! (`nccl`), one process per GPU, the engine of multi-GPU runs; [`Tcp`], one process per rank
//! over sockets through rank 0, for runs on CPUs (and the tests of the launcher); and
//! [`ThreadGroup`] (N ranks on threads of one process: the test double that proves the maths
//! without GPUs). [`launch`] starts the processes of a run and brings them down together.

#![forbid(unsafe_code)]

pub mod launch;
#[cfg(feature = "cuda")]
mod nccl;
mod tcp;
mod threads;

#[cfg(feature = "cuda")]
pub use nccl::Nccl;
pub use tcp::Tcp;
pub use threads::{ThreadGroup, ThreadRank};

use anyhow::Result;
use candle_core::Tensor;
use harma_kernels::compute::DeviceSpec;

/// The collective operations of a data-parallel step. Every rank calls each operation in the
/// same order with tensors of the same shape and dtype; a rank that fails makes the others'
/// calls fail (never hang) with a message naming it.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Every rank's `x` concatenated along the first dimension, in rank order.
    fn all_gather(&self, x: &Tensor) -> Result<Tensor>;
    /// The element-wise sum over the ranks of each of `xs` (summed in rank order, so every
    /// rank gets the same bits).
    fn all_reduce_sum(&self, xs: &[Tensor]) -> Result<Vec<Tensor>>;
    /// Tell the other ranks that this one failed (they stop with `why` instead of waiting).
    fn abort(&self, _why: &str) {}

    /// The element-wise mean over the ranks of each of `xs`.
    fn all_reduce_mean(&self, xs: &[Tensor]) -> Result<Vec<Tensor>> {
        let n = self.world() as f64;
        self.all_reduce_sum(xs)?
            .into_iter()
            .map(|t| Ok((t / n)?))
            .collect()
    }
}

/// One process: every operation is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }

    fn world(&self) -> usize {
        1
    }

    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }

    fn all_reduce_sum(&self, xs: &[Tensor]) -> Result<Vec<Tensor>> {
        Ok(xs.to_vec())
    }
}

/// How long ranks wait for each other to meet.
const RENDEZVOUS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// What [`connect`] decided: the collective, and the device this rank computes on.
pub struct Connected {
    pub collective: std::sync::Arc<dyn Collective>,
    /// GPU `LOCAL_RANK` for a rank on GPUs, else the device asked for.
    pub device: DeviceSpec,
}

/// The collective of this process's `role` on `device`: NCCL where the device is a GPU (each
/// rank on GPU `LOCAL_RANK`), else the ranks exchange through rank 0 over TCP (CPU ranks).
pub fn connect(role: &launch::Role, device: DeviceSpec) -> Result<Connected> {
    let on_gpu = match device {
        DeviceSpec::Cpu => false,
        DeviceSpec::Cuda(_) => true,
        DeviceSpec::Auto => candle_core::utils::cuda_is_available(),
    };
    if on_gpu {
        let device = DeviceSpec::Cuda(role.local_rank);
        #[cfg(feature = "cuda")]
        {
            let gpu = device.device()?;
            let nccl = Nccl::connect(role, &gpu)?;
            check(&nccl, &gpu)?;
            return Ok(Connected {
                collective: std::sync::Arc::new(nccl),
                device,
            });
        }
        #[cfg(not(feature = "cuda"))]
        anyhow::bail!(
            "rank {}: training on {device} across processes needs NCCL: build with --features \
             cuda (docs/CUDA.md), or train CPU ranks with --device cpu",
            role.rank
        );
    }
    let rdv = tcp::Rendezvous::meet(
        role.rank,
        role.world,
        &role.master,
        &role.secret,
        vec![],
        RENDEZVOUS_TIMEOUT,
    )?;
    if role.rank == 0 {
        eprintln!(
            "{} CPU ranks met at {}: they exchange through rank 0 over TCP",
            role.world, role.master
        );
    }
    let tcp = Tcp::new(rdv, role.timeout)?;
    check(&tcp, &candle_core::Device::Cpu)?;
    Ok(Connected {
        collective: std::sync::Arc::new(tcp),
        device,
    })
}

/// A first exchange, before any work: every rank gathers the ranks and sums ones, on
/// `device`; a rank that disagrees (another world, another build) fails here, by name.
fn check(coll: &dyn Collective, device: &candle_core::Device) -> Result<()> {
    let (rank, world) = (coll.rank(), coll.world());
    let ranks = coll.all_gather(&Tensor::new(&[rank as f32], device)?)?;
    let ones = coll.all_reduce_sum(&[Tensor::new(&[1f32], device)?])?;
    let want: Vec<f32> = (0..world).map(|r| r as f32).collect();
    let (got, n) = (ranks.to_vec1::<f32>()?, ones[0].to_vec1::<f32>()?);
    if got != want || n != [world as f32] {
        anyhow::bail!(
            "rank {rank}: the ranks' first exchange gave {got:?} and {n:?}, expected {want:?} \
             and [{world}]"
        );
    }
    Ok(())
}

/// Every rank's tensors (by rank) concatenated along the first dimension: the result of an
/// all-gather.
fn gathered(all: &[Vec<Tensor>]) -> Result<Tensor> {
    let parts: Vec<&Tensor> = all.iter().map(|v| &v[0]).collect();
    Ok(Tensor::cat(&parts, 0)?)
}

/// Every rank's tensors (by rank) summed element-wise, tensor by tensor, in rank order: the
/// result of an all-reduce.
fn summed(all: &[Vec<Tensor>]) -> Result<Vec<Tensor>> {
    let n = all.first().map_or(0, Vec::len);
    (0..n)
        .map(|i| {
            let mut sum = all[0][i].clone();
            for rank in &all[1..] {
                sum = (sum + &rank[i])?;
            }
            Ok(sum)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn ranks_on_threads_gather_and_reduce_in_rank_order_and_fail_together() -> Result<()> {
        let ranks = ThreadGroup::new(3);
        let results: Vec<Result<(Vec<f32>, Vec<f32>)>> = std::thread::scope(|s| {
            let handles: Vec<_> = ranks
                .iter()
                .map(|r| {
                    s.spawn(move || -> Result<(Vec<f32>, Vec<f32>)> {
                        let x = Tensor::new(&[r.rank() as f32; 2], &Device::Cpu)?;
                        let g = r.all_gather(&x)?.to_vec1()?;
                        let m = r.all_reduce_mean(&[x])?[0].to_vec1()?;
                        Ok((g, m))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for r in results {
            let (g, m) = r?;
            assert_eq!(g, [0.0, 0.0, 1.0, 1.0, 2.0, 2.0]);
            assert_eq!(m, [1.0, 1.0]);
        }
        // a rank that fails stops the others' next exchange with its reason, no hang
        let ranks = ThreadGroup::new(2);
        let errs: Vec<String> = std::thread::scope(|s| {
            let (a, b) = (&ranks[0], &ranks[1]);
            let h = s.spawn(move || {
                let x = Tensor::new(&[1f32], &Device::Cpu).unwrap();
                b.all_gather(&x).unwrap_err().to_string()
            });
            a.abort("rank 0 failed: out of memory");
            vec![h.join().unwrap()]
        });
        assert_eq!(errs, ["rank 0 failed: out of memory"]);
        Ok(())
    }
}
