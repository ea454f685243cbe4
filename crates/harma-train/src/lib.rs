//! The `harma` binary's library: each command is a module with an `Args` struct and a `run`.

pub mod cli;
pub mod config;
pub mod demo;
pub mod embed;
pub mod eval;
pub mod optim;
pub mod output;
pub mod pipeline;
pub mod schedule;
pub mod train;
