//! A run's checkpoints: `adapters.safetensors` (the trained tensors under the original's
//! names, which `harma embed --adapters` and PyTorch HarMA read), `best.safetensors` (the best
//! by val), and `resume.safetensors` (the trained tensors, AdamW's moments and the step: all
//! a resumed run needs, since its randomness is a function of the step).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

use crate::config::TrainConfig;
use crate::trainer::Trainer;

const RESUME_FORMAT: &str = "harma-rs-resume-1";

/// The header metadata of the adapter files a run writes.
pub fn checkpoint_meta(step: usize, cfg: &TrainConfig) -> HashMap<String, String> {
    let sharing = harma_settings::name(&cfg.model.backbone.sharing);
    HashMap::from([
        ("step".to_string(), step.to_string()),
        ("arch".to_string(), cfg.model.backbone.arch.clone()),
        ("sharing".to_string(), sharing.unwrap_or_default()),
    ])
}

pub fn resume_path(dir: &Path) -> PathBuf {
    dir.join("resume.safetensors")
}

/// Write `adapters.safetensors` and `resume.safetensors` after `step` steps of a run over
/// `n_pairs` pairs. Refuses to write non-finite tensors, so the files on disk stay the last
/// good state.
pub fn save(
    dir: &Path,
    trainer: &Trainer,
    step: usize,
    n_pairs: usize,
    cfg: &TrainConfig,
) -> Result<()> {
    let vars = trainer.vars();
    for (name, v) in vars {
        let bad = v
            .as_tensor()
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .any(|x| !x.is_finite());
        if bad {
            bail!("`{name}` holds NaN or infinite values after step {step}: not saved");
        }
    }
    let mut meta = checkpoint_meta(step, cfg);
    crate::optim::save_trained_with(&dir.join("adapters.safetensors"), vars, meta.clone())?;
    let mut named: Vec<(String, Tensor)> = Vec::new();
    for (name, v) in vars {
        named.push((format!("param/{name}"), v.as_tensor().clone()));
    }
    for (name, m, v) in trainer.optimizer().moments() {
        named.push((format!("adam_m/{name}"), m.clone()));
        named.push((format!("adam_v/{name}"), v.clone()));
    }
    meta.insert("format".into(), RESUME_FORMAT.into());
    meta.insert("n_pairs".into(), n_pairs.to_string());
    meta.insert("adamw_step".into(), trainer.optimizer().step.to_string());
    let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
    harma_checkpoint::write::write_safetensors(&resume_path(dir), &refs, meta)
}

/// Write the trained tensors as `best.safetensors`, chosen by val at `step`.
pub fn save_best(dir: &Path, trainer: &Trainer, step: usize, cfg: &TrainConfig) -> Result<()> {
    let mut meta = checkpoint_meta(step, cfg);
    meta.insert("selected_by".into(), "val r_mean".into());
    crate::optim::save_trained_with(&dir.join("best.safetensors"), trainer.vars(), meta)
}

/// Load a resume checkpoint into `trainer`; returns the step it was written after.
pub fn restore(dir: &Path, trainer: &mut Trainer, n_pairs: usize) -> Result<usize> {
    let path = resume_path(dir);
    let bytes = std::fs::read(&path).with_context(|| {
        format!(
            "cannot read {} (a run saves it at its first checkpoint)",
            path.display()
        )
    })?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    let get = |k: &str| -> Result<String> {
        meta.get(k)
            .cloned()
            .with_context(|| format!("{}: no `{k}` in its metadata", path.display()))
    };
    if get("format")? != RESUME_FORMAT {
        bail!("{}: not a harma-rs resume checkpoint", path.display());
    }
    let saved_pairs: usize = get("n_pairs")?.parse()?;
    if saved_pairs != n_pairs {
        bail!(
            "{} was trained on {saved_pairs} pairs, the annotations now give {n_pairs}",
            path.display(),
        );
    }
    let step: usize = get("step")?.parse()?;
    let adamw_step: usize = get("adamw_step")?.parse()?;
    let mut tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .with_context(|| format!("{}: cannot read its tensors", path.display()))?;
    // a planted or corrupt value is refused here, before anything is restored, by name
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for key in names {
        let t = tensors[key].to_dtype(candle_core::DType::F32)?;
        harma_checkpoint::format::check_finite(&path, key, &t)?;
        if key.starts_with("adam_v/")
            && harma_checkpoint::format::scan_f32(&t, |v| v.iter().any(|x| *x < 0.0))?
        {
            bail!(
                "{}: `{key}` holds a negative second moment: the file is corrupt",
                path.display()
            );
        }
    }
    let mut moments = HashMap::new();
    for (name, var) in trainer.vars() {
        let mut take = |kind: &str| {
            tensors
                .remove(&format!("{kind}/{name}"))
                .with_context(|| format!("{}: no `{kind}/{name}`", path.display()))
        };
        let p = take("param")?;
        if p.dims() != var.dims() {
            bail!(
                "{}: `{name}` has shape {:?}, the model needs {:?}",
                path.display(),
                p.dims(),
                var.dims()
            );
        }
        var.set(&p.to_device(var.device())?)?;
        moments.insert(name.clone(), (take("adam_m")?, take("adam_v")?));
    }
    trainer
        .optimizer_mut()
        .restore(adamw_step, &moments)
        .with_context(|| path.display().to_string())?;
    Ok(step)
}
