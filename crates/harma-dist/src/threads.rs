//! [`ThreadGroup`]: N ranks on threads of one process, exchanging CPU tensors through shared
//! memory: the test double of a data-parallel run.

use std::sync::{Arc, Condvar, Mutex};

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

use super::{gathered, summed, Collective};

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
        Ok(gathered(&all)?.to_device(x.device())?)
    }

    fn all_reduce_sum(&self, xs: &[Tensor]) -> Result<Vec<Tensor>> {
        let mine = xs
            .iter()
            .map(|t| t.to_device(&Device::Cpu))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let all = self.exchange(mine)?;
        summed(&all)?
            .into_iter()
            .zip(xs)
            .map(|(s, x)| Ok(s.to_device(x.device())?))
            .collect()
    }

    fn abort(&self, why: &str) {
        if let Ok(mut st) = self.shared.state.lock() {
            st.failed.get_or_insert_with(|| why.to_string());
            self.shared.changed.notify_all();
        }
    }
}
