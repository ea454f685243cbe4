//! Which training pairs make up each step, and how each is augmented: a pure function of the
//! seed and the step number, so that a resumed run draws exactly what an uninterrupted one
//! would have.
//!
//! Every epoch is a permutation of the pairs (shuffled from the seed and the epoch, or in file
//! order); step k takes the next `batch` of it, and the last incomplete batch of an epoch is
//! dropped, as the original's `drop_last` train loader does.

use crate::rng::Rng;

/// Stream labels under the seed (see [`Rng::derive`]).
const STREAM_SHUFFLE: u64 = 1;
const STREAM_AUGMENT: u64 = 2;

/// How long a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Length {
    Steps(usize),
    /// Passes over the pairs (each without its last incomplete batch).
    Epochs(usize),
}

/// The batches of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchPlan {
    pub n_pairs: usize,
    pub batch: usize,
    pub steps_per_epoch: usize,
    pub total: usize,
    pub seed: u64,
    pub shuffle: bool,
}

impl BatchPlan {
    /// The plan for `n_pairs` pairs, or `None` when not one full batch fits in an epoch.
    pub fn new(
        n_pairs: usize,
        batch: usize,
        length: Length,
        seed: u64,
        shuffle: bool,
    ) -> Option<Self> {
        let steps_per_epoch = n_pairs.checked_div(batch)?;
        if steps_per_epoch == 0 {
            return None;
        }
        let total = match length {
            Length::Steps(s) => s,
            Length::Epochs(e) => e.checked_mul(steps_per_epoch)?,
        };
        Some(Self {
            n_pairs,
            batch,
            steps_per_epoch,
            total,
            seed,
            shuffle,
        })
    }

    /// The 0-based epoch of step `k` (0-based).
    pub fn epoch(&self, k: usize) -> usize {
        k / self.steps_per_epoch
    }

    /// The pair indices of step `k` (0-based) and, for each, its augmentation stream.
    pub fn batch(&self, k: usize) -> Vec<(usize, Rng)> {
        let epoch = self.epoch(k);
        let mut order: Vec<usize> = (0..self.n_pairs).collect();
        if self.shuffle {
            Rng::derive(self.seed, &[STREAM_SHUFFLE, epoch as u64]).shuffle(&mut order);
        }
        let start = (k % self.steps_per_epoch) * self.batch;
        (start..start + self.batch)
            .map(|pos| {
                let rng = Rng::derive(self.seed, &[STREAM_AUGMENT, epoch as u64, pos as u64]);
                (order[pos], rng)
            })
            .collect()
    }

    /// Rank `rank`'s shard of step `k` among `world` ranks: its contiguous part of the
    /// global batch (the global batch sequence, shuffling and augmentation streams are those
    /// of one process, whatever the number of ranks). `world` must divide the batch.
    pub fn shard(&self, k: usize, rank: usize, world: usize) -> Vec<(usize, Rng)> {
        assert!(
            world > 0 && self.batch.is_multiple_of(world) && rank < world,
            "shard {rank} of {world} of a batch of {}",
            self.batch
        );
        let per = self.batch / world;
        let mut all = self.batch(k);
        all.truncate((rank + 1) * per);
        all.split_off(rank * per)
    }

    /// Whether an event that comes every `every` steps (0: at each epoch end) and at the end is
    /// due after `done` steps: val (`--val-every`) and checkpoints (`--save-every`).
    pub fn due_after(&self, done: usize, every: usize) -> bool {
        let period = if every > 0 {
            every
        } else {
            self.steps_per_epoch
        };
        done == self.total || done.is_multiple_of(period)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_are_permutations_and_the_last_partial_batch_is_dropped() {
        let plan = BatchPlan::new(10, 3, Length::Epochs(2), 7, true).unwrap();
        assert_eq!((plan.steps_per_epoch, plan.total), (3, 6));
        for epoch in 0..2 {
            let mut seen: Vec<usize> = (0..3)
                .flat_map(|k| plan.batch(epoch * 3 + k))
                .map(|(i, _)| i)
                .collect();
            seen.sort();
            seen.dedup();
            // nine distinct pairs of ten: one is left out of each epoch
            assert_eq!(seen.len(), 9);
        }
        // the two epochs are shuffled differently, and the plan repeats exactly
        let first = |p: &BatchPlan, k| p.batch(k).iter().map(|(i, _)| *i).collect::<Vec<_>>();
        assert_ne!(first(&plan, 0), first(&plan, 3));
        assert_eq!(plan.batch(4), plan.batch(4));
        let ordered = BatchPlan::new(10, 3, Length::Steps(5), 7, false).unwrap();
        assert_eq!(first(&ordered, 1), [3, 4, 5]);
        assert_eq!(first(&ordered, 3), [0, 1, 2]);
        assert!(BatchPlan::new(2, 3, Length::Steps(1), 0, true).is_none());
        assert!(BatchPlan::new(2, 0, Length::Steps(1), 0, true).is_none());
        assert!(plan.due_after(3, 0) && plan.due_after(6, 4) && !plan.due_after(4, 0));
        // the shards of a step are its batch, split in rank order
        let shards: Vec<(usize, Rng)> = (0..3).flat_map(|r| plan.shard(4, r, 3)).collect();
        assert_eq!(shards, plan.batch(4));
        assert_eq!(plan.shard(4, 1, 3), plan.batch(4)[1..2]);
    }
}
