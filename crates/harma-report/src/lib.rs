//! Run reports: every `harma train` run keeps `report.html` (one self-contained page: inline
//! SVG curves, thumbnails as data URIs, no external reference) and `report.md` (with the
//! curves as SVG files beside it) in its folder, refreshed at each validation and save point
//! and at the end. `harma eval --report DIR` writes the same for an evaluation, and
//! `harma report` rebuilds either from the folder alone, or one page comparing several runs.
//!
//! A page is made only from files of the folder: `config.toml`, `log.jsonl` and
//! `metrics.json` (the run's own records), `run.json` ([`info::RunInfo`]: data and checkpoint
//! hashes, machine, wall time per phase, memory), `examples.json` ([`Examples`]: retrieval
//! examples of the test split with thumbnails), `eval.json` (an evaluation) and
//! `reproduce.json` ([`Comparison`]: the published numbers `cargo xtask reproduce` compares
//! with).

#![forbid(unsafe_code)]

mod content;
pub mod examples;
pub mod info;
mod page;
mod plot;
pub mod record;
mod recorder;

use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use harma_metrics::RetrievalMetrics;
use serde::{Deserialize, Serialize};

pub use examples::Examples;
pub use info::RunInfo;
pub use recorder::{Phase, Recorder, RunStart};

use info::FileHash;
use page::Page;
pub use record::{MetricsLog, StepReport};

/// One line of `log.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogLine {
    #[serde(flatten)]
    pub report: StepReport,
    pub epoch: usize,
}

/// Which of a run's numbers a published one is set against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Ours {
    /// test with the best-by-val adapters
    Test,
    /// test with the starting model (the backbone alone)
    ZeroShot,
}

/// A published result, with where it was published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Published {
    pub setting: String,
    pub source: String,
    pub r_mean: f64,
    pub txt_r1: Option<f64>,
    pub img_r1: Option<f64>,
    /// the number of this run it is comparable with, if any
    pub ours: Option<Ours>,
}

/// OUT/reproduce.json: what `cargo xtask reproduce` ran and the published numbers it is set
/// against.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Comparison {
    pub title: String,
    /// what was reproduced (`rsitmd georsclip-ret2`), so that a rerun finds its folder
    pub run: String,
    /// the command that makes (or continues) this report
    pub command: String,
    /// the recipe, as (setting, value, why)
    pub recipe: Vec<(String, String, String)>,
    /// what a reader must know before reading the numbers
    pub notes: Vec<String>,
    pub published: Vec<Published>,
}

impl Comparison {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("reproduce.json")
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        harma_checkpoint::write::write_atomic(
            &Self::path(dir),
            serde_json::to_string_pretty(self)?.as_bytes(),
        )
    }
}

/// OUT/eval.json of `harma eval --report` (also what `harma eval --out` writes).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalRecord {
    pub test: RetrievalMetrics,
    pub test_json: PathBuf,
    pub model: PathBuf,
    pub adapters: Option<PathBuf>,
    pub images: usize,
    pub captions: usize,
    pub seconds: harma_metrics::Timings,
}

impl EvalRecord {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("eval.json")
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<Option<T>> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(None);
    };
    let v =
        serde_json::from_str(&text).with_context(|| format!("{}: not {what}", path.display()))?;
    Ok(Some(v))
}

/// Everything a report is made from, read from a run's (or an evaluation's) folder.
#[derive(Debug, Clone)]
pub struct Folder {
    pub dir: PathBuf,
    pub name: String,
    pub config: Option<toml::Table>,
    pub log: Vec<LogLine>,
    pub metrics: MetricsLog,
    pub info: Option<RunInfo>,
    pub examples: Option<Examples>,
    pub eval: Option<EvalRecord>,
    pub comparison: Option<Comparison>,
    /// the checkpoints in the folder, hashed now
    pub checkpoints: Vec<FileHash>,
}

impl Folder {
    pub fn load(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!(
                "{} is not a folder: give the folder of a run (`harma train --out`) or of an \
                 evaluation (`harma eval --report`)",
                dir.display()
            );
        }
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        let name = dir
            .file_name()
            .map_or("run".to_string(), |n| n.to_string_lossy().into_owned());
        let cfg_path = dir.join("config.toml");
        let config = match std::fs::read_to_string(&cfg_path) {
            Ok(text) => Some(
                text.parse::<toml::Table>()
                    .with_context(|| format!("{}: not valid TOML", cfg_path.display()))?,
            ),
            Err(_) => None,
        };
        let log_path = crate::record::StepLog::path(&dir);
        let mut log = Vec::new();
        if let Ok(text) = std::fs::read_to_string(&log_path) {
            for (i, l) in text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
            {
                log.push(serde_json::from_str(l).with_context(|| {
                    format!("{}:{}: not a step record", log_path.display(), i + 1)
                })?);
            }
        }
        let metrics: MetricsLog =
            read_json(&dir.join("metrics.json"), "a metrics record")?.unwrap_or_default();
        let eval = read_json(&EvalRecord::path(&dir), "an evaluation record")?;
        if config.is_none() && eval.is_none() {
            bail!(
                "{} holds neither a training run (config.toml) nor an evaluation (eval.json): \
                 give the folder of `harma train --out` or `harma eval --report`",
                dir.display()
            );
        }
        let mut checkpoints = Vec::new();
        for file in ["best.safetensors", "adapters.safetensors"] {
            let p = dir.join(file);
            if p.is_file() {
                checkpoints.push(FileHash::of(&p)?);
            }
        }
        Ok(Self {
            info: RunInfo::read(&dir)?,
            examples: Examples::read(&dir)?,
            comparison: read_json(&Comparison::path(&dir), "a comparison record")?,
            dir,
            name,
            config,
            log,
            metrics,
            eval,
            checkpoints,
        })
    }

    /// The folder's name with its parent's (`demo/run`, `reports/rsitmd-...`).
    fn title(&self) -> String {
        match self.dir.parent().and_then(|p| p.file_name()) {
            Some(parent) => format!("{}/{}", parent.to_string_lossy(), self.name),
            None => self.name.clone(),
        }
    }

    fn setting(&self, key: &str) -> Option<&toml::Value> {
        self.config.as_ref()?.get(key)
    }

    /// Steps the run will take, when known.
    fn total_steps(&self) -> Option<usize> {
        if let Some(s) = self.setting("steps").and_then(|v| v.as_integer()) {
            return Some(s as usize);
        }
        let epochs = self.setting("epochs")?.as_integer()? as usize;
        let batch = self.setting("batch_size")?.as_integer()? as usize;
        let pairs = self
            .info
            .as_ref()?
            .data
            .iter()
            .find(|d| d.split == "train")?
            .captions;
        Some(epochs * (pairs / batch.max(1)))
    }

    /// A path as the page shows it: relative to the folder when they are near (so a page
    /// carries no machine's layout), else as recorded.
    fn shown(&self, p: &Path) -> String {
        shown(p, &self.dir)
    }
}

/// `p` relative to `base` when they share more than the root and `p` is at most three levels
/// up; else `p`.
fn shown(p: &Path, base: &Path) -> String {
    if !p.is_absolute() {
        return p.display().to_string();
    }
    let a: Vec<Component> = p.components().collect();
    let b: Vec<Component> = base.components().collect();
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let ups = b.len() - common;
    if common <= 1 || ups > 3 {
        return p.display().to_string();
    }
    let mut rel = PathBuf::new();
    for _ in 0..ups {
        rel.push("..");
    }
    for c in &a[common..] {
        rel.push(c);
    }
    if rel.as_os_str().is_empty() {
        return ".".to_string();
    }
    rel.display().to_string()
}

/// Write `page` as `<stem>.html` and `<stem>.md` (and its figures) into `dir`.
fn write_page(page: &Page, dir: &Path, stem: &str) -> Result<PathBuf> {
    for (file, svg) in page.figures() {
        harma_checkpoint::write::write_atomic(&dir.join(file), svg.as_bytes())?;
    }
    harma_checkpoint::write::write_atomic(
        &dir.join(format!("{stem}.md")),
        page.markdown().as_bytes(),
    )?;
    let html = dir.join(format!("{stem}.html"));
    harma_checkpoint::write::write_atomic(&html, page.html().as_bytes())?;
    Ok(html)
}

/// (Re)write `report.html` and `report.md` of the run or evaluation in `dir`; returns the
/// HTML file.
pub fn write_report(dir: &Path) -> Result<PathBuf> {
    let f = Folder::load(dir)?;
    let page = match (&f.config, &f.eval) {
        (Some(_), _) => content::run_page(&f)?,
        (None, Some(e)) => content::eval_page(&f, e),
        (None, None) => unreachable!("Folder::load checks"),
    };
    write_page(&page, &f.dir, "report")
}

/// One page comparing the runs in `dirs`: curves overlaid, results and differing settings
/// side by side. Written as `compare.html` and `compare.md` into `out`.
pub fn write_compare(dirs: &[PathBuf], out: &Path) -> Result<PathBuf> {
    let folders = dirs
        .iter()
        .map(|d| Folder::load(d))
        .collect::<Result<Vec<_>>>()?;
    if let Some(f) = folders.iter().find(|f| f.config.is_none()) {
        bail!(
            "{} is an evaluation, not a training run: --compare compares training runs",
            f.dir.display()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    write_page(&content::compare_page(&folders, out)?, out, "compare")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_shown_relative_when_near() {
        let base = Path::new("/home/u/runs/demo/run");
        assert_eq!(
            shown(Path::new("/home/u/runs/demo/data/t.json"), base),
            "../data/t.json"
        );
        assert_eq!(shown(Path::new("/home/u/runs/demo/run/x"), base), "x");
        assert_eq!(shown(base, base), ".");
        assert_eq!(
            shown(Path::new("/home/u/data/r/t.json"), base),
            "../../../data/r/t.json"
        );
        // far away, or sharing only the root: as recorded
        assert_eq!(shown(Path::new("/data/t.json"), base), "/data/t.json");
        assert_eq!(shown(Path::new("/home/v/t.json"), base), "/home/v/t.json");
        assert_eq!(shown(Path::new("rel/t.json"), base), "rel/t.json");
    }
}
