//! The `harma` binary's commands: `embed`, `eval`, `train`, `demo`, `report`, `index`, and
//! `search` with `serve`, each a module with its flags (`Args`) and a `run`. The only crate that
//! knows clap: `flags` makes the flags of every settings group from its declaration, and the
//! environment is read here, at start-up, never in a library. The work is in the libraries:
//! `harma-model` (loading, embedding, evaluating), `harma-trainer` (the training core),
//! `harma-dist` (data parallelism), `harma-report` (run folders and their pages) and
//! `harma-search` (the index, its search and the web server).

#![forbid(unsafe_code)]

pub mod cli;
pub mod demo;
pub mod embed;
pub mod eval;
pub mod flags;
pub mod index;
pub mod model;
pub mod report;
pub mod search;
pub mod synth;
pub mod train;
