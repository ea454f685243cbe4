//! What a training run records for its report as it goes, and the report's refresh.

use std::path::Path;

use anyhow::Result;

use super::info::{self, FileHash, Lap, Phases, RunInfo};
use super::write_report;

/// What a training run records for its report as it goes (`run.json`), and the report's
/// refresh. Owned by the training loop.
pub struct Recorder {
    info: RunInfo,
    lap: Lap,
}

/// What a session of a training run starts with.
pub struct RunStart {
    /// The run's folder.
    pub dir: std::path::PathBuf,
    /// The annotation files (train first), hashed.
    pub data: Vec<info::DataFile>,
    /// The checkpoint the run starts from.
    pub init: std::path::PathBuf,
    /// Where the starting adapters come from (a file, `fresh`, or the checkpoint).
    pub start_adapters: Option<String>,
    /// The compute setting, as `Compute::describe` says it, and the precision.
    pub device: String,
    pub precision: String,
    /// Steps done before this session.
    pub step: usize,
}

/// The phases a [`Recorder`] times.
#[derive(Debug, Clone, Copy)]
pub enum Phase {
    Load,
    ZeroShot,
    Train,
    Val,
    Save,
    Test,
}

impl Recorder {
    /// A session of the run in `start.dir` starting after `start.step` (0: a new run; the
    /// earlier sessions of a resumed run are read back); `since` is when the process started
    /// loading.
    pub fn start(start: RunStart, since: std::time::Instant) -> Result<Self> {
        let mut info = if start.step > 0 {
            RunInfo::read(&start.dir)?.unwrap_or_default()
        } else {
            RunInfo::default()
        };
        info.kind = "train".into();
        info.data = start.data;
        info.init = Some(FileHash::of(&start.init)?);
        if start.step == 0 {
            info.start_adapters = start.start_adapters;
        }
        let mut session = info::session(start.device, start.precision, start.step);
        session.phases.load = since.elapsed().as_secs_f64();
        info.sessions.push(session);
        Ok(Self {
            info,
            lap: Lap::default(),
        })
    }

    fn session(&mut self) -> &mut info::Session {
        self.info.sessions.last_mut().expect("start pushes one")
    }

    /// Charge the time since the last lap to `phase`.
    pub fn lap(&mut self, phase: Phase) {
        let s = self.lap.lap();
        let p: &mut Phases = &mut self.session().phases;
        *match phase {
            Phase::Load => &mut p.load,
            Phase::ZeroShot => &mut p.zero_shot,
            Phase::Train => &mut p.train,
            Phase::Val => &mut p.val,
            Phase::Save => &mut p.save,
            Phase::Test => &mut p.test,
        } += s;
    }

    /// A step of `pairs` pairs has finished (`step` steps done): its time is training time.
    pub fn step(&mut self, step: usize, pairs: usize) {
        self.lap(Phase::Train);
        let s = self.session();
        s.pairs += pairs as u64;
        s.to_step = step;
    }

    /// Write `run.json` and the report. A failure is a warning: a report must never stop a
    /// run. The time it takes is charged to `save`.
    pub fn refresh(&mut self, dir: &Path) {
        self.session().peak_memory = info::peak_memory();
        let r = self.info.write(dir).and_then(|_| write_report(dir));
        if let Err(e) = r {
            eprintln!(
                "warning: the report in {} was not updated: {e:#}",
                dir.display()
            );
        }
        self.lap(Phase::Save);
    }
}
