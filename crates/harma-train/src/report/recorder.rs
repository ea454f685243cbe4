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
    /// A session of the run in `cfg.out()` starting after `step` (0: a new run; the earlier
    /// sessions of a resumed run are read back); `since` is when the process started loading.
    pub fn start(
        cfg: &crate::config::TrainConfig,
        data: &crate::train::TrainData,
        compute: &harma_clip::Compute,
        step: usize,
        fresh_adapters: bool,
        since: std::time::Instant,
    ) -> Result<Self> {
        let dir = cfg.out();
        let mut info = if step > 0 {
            RunInfo::read(dir)?.unwrap_or_default()
        } else {
            RunInfo::default()
        };
        info.kind = "train".into();
        let mut files = vec![info::DataFile {
            split: "train".into(),
            file: FileHash::of(cfg.train_json())?,
            images: data.images(),
            captions: data.pairs.captions.len(),
        }];
        for (split, path, set) in [
            ("val", &cfg.data.val_json, &data.val),
            ("test", &cfg.data.test_json, &data.test),
        ] {
            if let (Some(p), Some(s)) = (path, set) {
                files.push(info::DataFile {
                    split: split.into(),
                    file: FileHash::of(p)?,
                    images: s.images.len(),
                    captions: s.captions.len(),
                });
            }
        }
        info.data = files;
        info.init = Some(FileHash::of(cfg.init())?);
        if step == 0 {
            info.start_adapters = Some(match &cfg.model.backbone.adapters {
                Some(p) => p.display().to_string(),
                None if fresh_adapters => "fresh".into(),
                None => cfg.init().display().to_string(),
            });
        }
        let mut session = info::session(compute, step);
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
