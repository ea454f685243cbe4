//! The `harma` binary's library. Commands (`embed`, `eval`, `train`, `demo`, `report`,
//! `index`, and `search` with `serve`) are modules with an `Args` struct and a `run`; they stand
//! on the library modules: `model` (loading a checkpoint and its adapters), `encode` (batched
//! embedding), `eval` (a split's metrics), `trainer` (one training step), `resume` and `record`
//! (a run's files), `report` (a run's report pages), `config` (the settings) and `device` (the
//! compute flags). The index, its search and the web server are the `harma-search` crate.

#![forbid(unsafe_code)]

pub mod cli;
pub mod config;
pub mod demo;
pub mod device;
pub mod dist;
pub mod embed;
pub mod encode;
pub mod eval;
pub mod index;
pub mod model;
pub mod optim;
pub mod output;
pub mod pipeline;
pub mod record;
pub mod report;
pub mod resume;
pub mod schedule;
pub mod search;
pub mod step;
pub mod train;
pub mod trainer;
