//! `run.json`: what a run's report needs beyond its metrics and log, recorded as the run goes:
//! the annotation files and the starting checkpoint (paths, counts, sha256), and per session
//! (a resumed run has several) the version and commit, the machine, the threads, the device and
//! precision, the wall time of each phase, the pairs trained and the peak memory.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// The version of this build and the git commit it was built from ("unknown" outside a
/// checkout).
pub fn version() -> (&'static str, &'static str) {
    (env!("CARGO_PKG_VERSION"), env!("HARMA_GIT_COMMIT"))
}

/// A file and its checksum.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileHash {
    pub path: PathBuf,
    pub bytes: u64,
    pub sha256: String,
}

impl FileHash {
    pub fn of(path: &Path) -> Result<Self> {
        let bytes = std::fs::metadata(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .len();
        Ok(Self {
            path: path.to_path_buf(),
            bytes,
            sha256: harma_data::sha256_file(path)?,
        })
    }
}

/// An annotation file of the run and what it holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataFile {
    /// train, val or test
    pub split: String,
    #[serde(flatten)]
    pub file: FileHash,
    pub images: usize,
    /// captions (training: pairs)
    pub captions: usize,
}

/// Wall-clock seconds per phase of a session.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Phases {
    /// reading annotations, tokenizing, loading and hashing the model
    pub load: f64,
    /// evaluating the starting model on val and test
    pub zero_shot: f64,
    /// training steps (the data pipeline runs beside them)
    pub train: f64,
    /// validation during training
    pub val: f64,
    /// writing checkpoints
    pub save: f64,
    /// the final test evaluation and its retrieval examples
    pub test: f64,
}

impl Phases {
    pub fn total(&self) -> f64 {
        self.load + self.zero_shot + self.train + self.val + self.save + self.test
    }

    /// (name, seconds) in run order.
    pub fn named(&self) -> [(&'static str, f64); 6] {
        [
            ("load", self.load),
            ("zero-shot", self.zero_shot),
            ("train", self.train),
            ("val", self.val),
            ("save", self.save),
            ("test", self.test),
        ]
    }

    pub fn add(&mut self, o: &Phases) {
        self.load += o.load;
        self.zero_shot += o.zero_shot;
        self.train += o.train;
        self.val += o.val;
        self.save += o.save;
        self.test += o.test;
    }
}

/// One process's share of a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Session {
    /// UTC start, `YYYY-MM-DD HH:MM:SS`
    pub started: String,
    pub version: String,
    pub commit: String,
    /// the CPU model (/proc/cpuinfo)
    pub cpu: String,
    /// logical cores the process may use
    pub cores: usize,
    /// rayon threads (RAYON_NUM_THREADS)
    pub threads: usize,
    pub device: String,
    pub precision: String,
    /// steps done when the session began and when it last recorded
    pub from_step: usize,
    pub to_step: usize,
    /// training pairs processed in this session
    pub pairs: u64,
    pub phases: Phases,
    /// peak resident memory of the process (VmHWM), bytes
    pub peak_memory: Option<u64>,
}

/// OUT/run.json.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RunInfo {
    /// "train" (a `harma train` run) or "eval" (`harma eval --report`)
    pub kind: String,
    pub data: Vec<DataFile>,
    /// the backbone checkpoint (`--init`, `--model`)
    pub init: Option<FileHash>,
    /// the starting adapters: a file, or "fresh" (the model starts as its backbone)
    pub start_adapters: Option<String>,
    pub sessions: Vec<Session>,
}

impl RunInfo {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("run.json")
    }

    /// The record in `dir`, if any.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = Self::path(dir);
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(None);
        };
        let info = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a run record", path.display()))?;
        Ok(Some(info))
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        harma_checkpoint::write::write_atomic(
            &Self::path(dir),
            serde_json::to_string_pretty(self)?.as_bytes(),
        )
    }

    /// Every session's phases added up.
    pub fn phases(&self) -> Phases {
        let mut p = Phases::default();
        for s in &self.sessions {
            p.add(&s.phases);
        }
        p
    }

    /// Training pairs per second of training-step time, over all sessions.
    pub fn pairs_per_second(&self) -> Option<f64> {
        let pairs: u64 = self.sessions.iter().map(|s| s.pairs).sum();
        let secs = self.phases().train;
        (pairs > 0 && secs > 0.0).then(|| pairs as f64 / secs)
    }

    /// The highest peak memory of any session.
    pub fn peak_memory(&self) -> Option<u64> {
        self.sessions.iter().filter_map(|s| s.peak_memory).max()
    }
}

/// A new session on this machine, starting at `step`, computing on `device` (as
/// `Compute::describe` says it) in `precision`.
pub fn session(device: String, precision: String, step: usize) -> Session {
    let (version, commit) = version();
    Session {
        started: utc_now(),
        version: version.to_string(),
        commit: commit.to_string(),
        cpu: cpu_model().unwrap_or_else(|| "unknown".to_string()),
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        threads: rayon::current_num_threads(),
        device,
        precision,
        from_step: step,
        to_step: step,
        peak_memory: peak_memory(),
        ..Session::default()
    }
}

/// The CPU's model name from /proc/cpuinfo (Linux).
pub fn cpu_model() -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    text.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// The process's peak resident memory (VmHWM of /proc/self/status), bytes (Linux).
pub fn peak_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Days since 1970-01-01 to (year, month, day) (the proleptic Gregorian calendar).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// The current UTC time as `YYYY-MM-DD HH:MM:SS`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let (y, m, d) = civil(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// The current UTC date, `YYYY-MM-DD`.
pub fn utc_date() -> String {
    utc_now()[..10].to_string()
}

/// A stopwatch for phases: `lap` returns the seconds since the last lap (or the start).
#[derive(Debug)]
pub struct Lap(Instant);

impl Default for Lap {
    fn default() -> Self {
        Self(Instant::now())
    }
}

impl Lap {
    pub fn lap(&mut self) -> f64 {
        let now = Instant::now();
        let s = now.duration_since(self.0).as_secs_f64();
        self.0 = now;
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates_are_right() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(11_016), (2000, 2, 29));
        assert_eq!(civil(19_782), (2024, 2, 29));
        assert_eq!(civil(-1), (1969, 12, 31));
        // 2025-11-29 (date -d 2025-11-29 +%s / 86400)
        assert_eq!(civil(20_421), (2025, 11, 29));
    }

    #[test]
    fn this_machine_reports_itself() {
        if cfg!(target_os = "linux") {
            assert!(peak_memory().unwrap() > 1 << 20);
            assert!(!cpu_model().unwrap_or_default().is_empty() || cfg!(target_arch = "aarch64"));
        }
        let (v, c) = version();
        assert_eq!(v, env!("CARGO_PKG_VERSION"));
        assert!(!c.is_empty());
    }
}
