//! What a run records as it goes: `log.jsonl` (a line per step) and `metrics.json` (val at
//! each evaluation point, the best, test at the end).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use harma_metrics::RetrievalMetrics;

/// What one step did, for the log.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepReport {
    /// Steps done after this one (1-based).
    pub step: usize,
    pub lr: f64,
    pub loss: f64,
    pub loss_contrastive: f64,
    pub loss_triplet: f64,
    /// The temperature the step's loss used.
    pub temp: f64,
    /// The global gradient norm before clipping (with `max_grad_norm`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
}

/// One evaluation of the val split during training.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ValEntry {
    pub step: usize,
    pub epoch: usize,
    #[serde(flatten)]
    pub metrics: RetrievalMetrics,
}

/// The test split, evaluated once at the end.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TestEntry {
    /// which adapters: `best.safetensors` (best val mR) or `adapters.safetensors` (no val)
    pub adapters: String,
    pub step: usize,
    #[serde(flatten)]
    pub metrics: RetrievalMetrics,
}

/// The model before its first step, on val and test: the zero-shot baseline when the
/// adapters start fresh (the model then equals its backbone).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StartEntry {
    pub val: Option<RetrievalMetrics>,
    pub test: Option<RetrievalMetrics>,
}

/// OUT/metrics.json.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct MetricsLog {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<StartEntry>,
    pub val: Vec<ValEntry>,
    pub best: Option<ValEntry>,
    pub test: Option<TestEntry>,
}

impl MetricsLog {
    fn path(dir: &Path) -> PathBuf {
        dir.join("metrics.json")
    }

    /// The record of a resumed run, without what came after `step` (the step-0 evaluation
    /// is kept).
    pub fn read(dir: &Path, step: usize) -> Result<Self> {
        let path = Self::path(dir);
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(Self::default());
        };
        let mut log: Self = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a metrics record", path.display()))?;
        log.val.retain(|v| v.step <= step);
        log.best = log
            .val
            .iter()
            .fold(None::<&ValEntry>, |b, v| match b {
                Some(b) if b.metrics.r_mean >= v.metrics.r_mean => Some(b),
                _ => Some(v),
            })
            .cloned();
        log.test = None;
        Ok(log)
    }

    /// Add a val evaluation; returns whether it is the best so far (strictly higher mR).
    pub fn add_val(&mut self, entry: ValEntry) -> bool {
        let improved = self
            .best
            .as_ref()
            .is_none_or(|b| entry.metrics.r_mean > b.metrics.r_mean);
        if improved {
            self.best = Some(entry.clone());
        }
        self.val.push(entry);
        improved
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        harma_checkpoint::write::write_atomic(
            &Self::path(dir),
            serde_json::to_string_pretty(self)?.as_bytes(),
        )
    }
}

/// OUT/log.jsonl, appended a line per step.
pub struct StepLog {
    file: std::fs::File,
}

impl StepLog {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("log.jsonl")
    }

    /// Open for appending (created if absent).
    pub fn open(dir: &Path) -> Result<Self> {
        let path = Self::path(dir);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(Self { file })
    }

    /// One step's line: the report and its (1-based) epoch, keys in name order.
    pub fn write(&mut self, report: &StepReport, epoch: usize) -> Result<()> {
        let mut line = serde_json::to_value(report)?;
        line["epoch"] = epoch.into();
        writeln!(self.file, "{line}")?;
        self.file.flush()?;
        Ok(())
    }

    /// Keep the lines of steps up to `step` (a resumed run rewrites what follows).
    pub fn truncate(dir: &Path, step: usize) -> Result<()> {
        let path = Self::path(dir);
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(());
        };
        let kept: String = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s as usize <= step)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        harma_checkpoint::write::write_atomic(&path, kept.as_bytes())
    }
}
