//! Data-parallel training: the collective operations a step needs, behind one trait.
//!
//! As the original trains on two GPUs (`torch.distributed`, SPEC "Optimisation"): each rank
//! embeds its shard of the global batch, the embeddings (and image ids) of every rank are
//! gathered so that the contrastive and triplet losses see the whole global batch, each rank
//! backpropagates the loss's gradient at its own rows (the original's `AllGather` backward
//! hands each rank its slice), and the parameter gradients are averaged over the ranks before
//! the optimiser, so that every rank takes the same step.
//!
//! Implementations: [`Single`] (one process, the default), [`ThreadGroup`] (N ranks on
//! threads of one process, over the CPU: the test double that proves the maths without GPUs),
//! and, with the `cuda` feature, NCCL (`crate::dist_nccl`), one process per GPU.

use std::sync::{Arc, Condvar, Mutex};

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

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

/// What the ranks of a [`ThreadGroup`] share: the tensors of the exchange in progress, the
/// last completed exchange, and whether a rank failed.
struct Exchange {
    deposited: Vec<Option<Vec<Tensor>>>,
    arrived: usize,
    generation: u64,
    published: Arc<Vec<Vec<Tensor>>>,
    failed: Option<String>,
}

struct Shared {
    world: usize,
    state: Mutex<Exchange>,
    changed: Condvar,
}

/// N ranks on threads of one process, exchanging CPU tensors through shared memory: the test
/// double of a data-parallel run (not the product's engine, which is NCCL).
pub struct ThreadGroup;

impl ThreadGroup {
    /// The ranks of a group of `world`, one for each thread to run.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(world: usize) -> Vec<ThreadRank> {
        let shared = Arc::new(Shared {
            world,
            state: Mutex::new(Exchange {
                deposited: vec![None; world],
                arrived: 0,
                generation: 0,
                published: Arc::new(vec![]),
                failed: None,
            }),
            changed: Condvar::new(),
        });
        (0..world)
            .map(|rank| ThreadRank {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }
}

/// One rank of a [`ThreadGroup`].
pub struct ThreadRank {
    rank: usize,
    shared: Arc<Shared>,
}

impl ThreadRank {
    /// Deposit this rank's tensors and wait for every rank's: all ranks' tensors, by rank.
    fn exchange(&self, mine: Vec<Tensor>) -> Result<Arc<Vec<Vec<Tensor>>>> {
        let s = &self.shared;
        let mut st = s
            .state
            .lock()
            .map_err(|_| anyhow::anyhow!("a rank panicked"))?;
        if let Some(why) = &st.failed {
            bail!("{why}");
        }
        st.deposited[self.rank] = Some(mine);
        st.arrived += 1;
        let generation = st.generation;
        if st.arrived == s.world {
            let all = st
                .deposited
                .iter_mut()
                .map(|d| d.take().unwrap_or_default());
            st.published = Arc::new(all.collect());
            st.arrived = 0;
            st.generation += 1;
            s.changed.notify_all();
            return Ok(st.published.clone());
        }
        while st.generation == generation {
            if let Some(why) = &st.failed {
                bail!("{why}");
            }
            st = s
                .changed
                .wait(st)
                .map_err(|_| anyhow::anyhow!("a rank panicked"))?;
        }
        Ok(st.published.clone())
    }
}

impl Drop for ThreadRank {
    /// A rank that unwinds (a panic) fails the group, so that no other rank waits for it.
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.abort(&format!("rank {} panicked", self.rank));
        }
    }
}

impl Collective for ThreadRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.shared.world
    }

    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        let all = self.exchange(vec![x.to_device(&Device::Cpu)?])?;
        let parts: Vec<&Tensor> = all.iter().map(|v| &v[0]).collect();
        Ok(Tensor::cat(&parts, 0)?.to_device(x.device())?)
    }

    fn all_reduce_sum(&self, xs: &[Tensor]) -> Result<Vec<Tensor>> {
        let mine = xs
            .iter()
            .map(|t| t.to_device(&Device::Cpu))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let all = self.exchange(mine)?;
        xs.iter()
            .enumerate()
            .map(|(i, x)| {
                let mut sum = all[0][i].clone();
                for rank in &all[1..] {
                    sum = (sum + &rank[i])?;
                }
                Ok(sum.to_device(x.device())?)
            })
            .collect()
    }

    fn abort(&self, why: &str) {
        if let Ok(mut st) = self.shared.state.lock() {
            st.failed.get_or_insert_with(|| why.to_string());
            self.shared.changed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
