//! `harma report`: a run's (or an evaluation's) report rebuilt from its folder, or runs
//! compared on one page.

use std::path::PathBuf;

use anyhow::Result;
use harma_report::{write_compare, write_report};

/// `harma report`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The folder of a `harma train` run (or of `harma eval --report`)
    #[arg(value_name = "RUN_DIR")]
    pub run: PathBuf,
    /// Other runs to set beside it: one page with the curves overlaid, the results side by
    /// side and the settings that differ (compare.html, compare.md)
    #[arg(long, value_name = "RUN_DIR")]
    pub compare: Vec<PathBuf>,
    /// Where the comparison page goes [default: RUN_DIR]
    #[arg(long, value_name = "DIR", requires = "compare")]
    pub out: Option<PathBuf>,
}

pub fn run(args: &Args) -> Result<()> {
    let written = if args.compare.is_empty() {
        write_report(&args.run)?
    } else {
        let mut dirs = vec![args.run.clone()];
        dirs.extend(args.compare.iter().cloned());
        write_compare(&dirs, args.out.as_deref().unwrap_or(&args.run))?
    };
    println!("{}", written.display());
    Ok(())
}
