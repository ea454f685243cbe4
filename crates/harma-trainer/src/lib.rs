//! The training core of HarMA: the settings of a run (`config`), one step (`trainer`, with the
//! loss and its gradients in `step`), the optimiser (`optim`) and its schedule (`schedule`),
//! checkpoints and resuming (`resume`), and the run loop (`train`) that logs, evaluates, saves
//! and stops. It reads no command line and no environment: the `harma` binary gives it
//! settings, a [`harma_dist::Collective`] and a [`train::Control`].

#![forbid(unsafe_code)]

pub mod config;
pub mod optim;
pub mod resume;
pub mod schedule;
pub mod step;
pub mod train;
pub mod trainer;

pub use config::{TrainArgs, TrainConfig};
