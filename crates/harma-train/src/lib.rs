//! The `harma` binary's library. Commands (`embed`, `eval`, `train`, `demo`, `index`, and
//! `search` with `serve`) are modules with
//! an `Args` struct and a `run`; they stand on the library modules: `model` (loading a
//! checkpoint and its adapters), `encode` (batched embedding), `eval` (a split's metrics),
//! `trainer` (one training step), `resume` and `record` (a run's files), `config` (the
//! settings) and `device` (the compute flags).

#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod demo;
pub mod device;
pub mod embed;
pub mod encode;
pub mod eval;
pub mod index;
pub mod model;
pub mod optim;
pub mod output;
pub mod pipeline;
pub mod record;
pub mod resume;
pub mod schedule;
pub mod search;
pub mod step;
pub mod train;
pub mod trainer;
