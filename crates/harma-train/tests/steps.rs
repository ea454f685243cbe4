//! Three AdamW steps on the tiny HarMA model: the loss before each step and after the last
//! equals the original's (model, loss and transformers-AdamW update; fixture:
//! crates/harma-adapters/tests/fixtures/make_fixtures.py, steps.json) within 1e-4 relative.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::{DType, Device};
use harma_adapters::{AdapterConfig, HarmaAdapters};
use harma_clip::{Checkpoint, Clip, ClipConfig};
use harma_loss::{harma_loss, LossConfig};
use harma_train::optim::{AdamW, AdamWConfig};

#[test]
fn three_steps_follow_the_original() -> Result<()> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../harma-adapters/tests/fixtures");
    let cfg = ClipConfig::preset(dir.join("config.json").to_str().unwrap())?;
    let ckpt = Checkpoint::load(&dir.join("harma.pth"), &cfg)?;
    let model = Clip::from_checkpoint(&ckpt, &cfg, &Device::Cpu)?;
    let (adapters, vars) = HarmaAdapters::trainable(
        ckpt.adapters.clone(),
        &cfg,
        &AdapterConfig::default(),
        &Device::Cpu,
    )?;
    let steps: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("steps.json"))?)?;
    let want: Vec<f64> = steps["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let batch = candle_core::safetensors::load(dir.join("grads.safetensors"), &Device::Cpu)?;
    let ids = batch["ids"].to_dtype(DType::U32)?;
    let image_ids: Vec<i64> = batch["image_ids"].to_vec1()?;
    let mut opt = AdamW::new(vars, AdamWConfig::default())?;
    let lr = steps["lr"].as_f64().unwrap();
    for (k, &w) in want.iter().enumerate() {
        let img = model.encode_image(&batch["pixels"], Some(&adapters))?;
        let txt = model.encode_text(&ids, Some(&adapters))?;
        let loss = harma_loss(
            &img,
            &txt,
            &adapters.temp,
            &image_ids,
            &LossConfig::default(),
        )?;
        let l = loss.total.to_scalar::<f32>()? as f64;
        let rel = (l - w).abs() / w.abs();
        eprintln!("step {k}: loss {l:.6} original {w:.6} rel err {rel:.1e}");
        assert!(rel <= 1e-4, "step {k}: {l} vs {w}");
        if k < 3 {
            opt.step(&loss.total.backward()?, lr)?;
        }
    }
    Ok(())
}

#[test]
fn trained_adapters_round_trip_through_a_checkpoint() -> Result<()> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../harma-adapters/tests/fixtures");
    let cfg = ClipConfig::preset(dir.join("config.json").to_str().unwrap())?;
    let ckpt = Checkpoint::load(&dir.join("harma.pth"), &cfg)?;
    let model = Clip::from_checkpoint(&ckpt, &cfg, &Device::Cpu)?;
    let acfg = AdapterConfig::default();
    let (adapters, vars) =
        HarmaAdapters::trainable(ckpt.adapters.clone(), &cfg, &acfg, &Device::Cpu)?;
    let batch = candle_core::safetensors::load(dir.join("grads.safetensors"), &Device::Cpu)?;
    let ids = batch["ids"].to_dtype(DType::U32)?;
    let image_ids: Vec<i64> = batch["image_ids"].to_vec1()?;
    // one update so the saved tensors differ from the fixture's
    let mut opt = AdamW::new(vars.clone(), AdamWConfig::default())?;
    let img = model.encode_image(&batch["pixels"], Some(&adapters))?;
    let txt = model.encode_text(&ids, Some(&adapters))?;
    let loss = harma_loss(
        &img,
        &txt,
        &adapters.temp,
        &image_ids,
        &LossConfig::default(),
    )?;
    opt.step(&loss.total.backward()?, 1e-3)?;
    let before = model.encode_text(&ids, Some(&adapters))?;

    let out = std::env::temp_dir().join(format!("harma-rt-{}", std::process::id()));
    let path = out.join("adapters.safetensors");
    harma_train::optim::save_trained(&path, &vars)?;
    // the original's names: `model.` + open_clip key, and `temp`
    let saved = candle_core::safetensors::load(&path, &Device::Cpu)?;
    assert_eq!(saved.len(), 59);
    assert!(saved.contains_key("temp"));
    assert!(saved.contains_key("model.transformer.resblocks.0.mmadapter.BiShareAdapterxx.gate1"));
    assert!(saved.contains_key("model.visual.transformer.resblocks.1.gate1"));
    let reloaded = HarmaAdapters::from_tensors(
        harma_clip::checkpoint::load_adapters(&path)?,
        &cfg,
        &acfg,
        &Device::Cpu,
    )?;
    let after = model.encode_text(&ids, Some(&reloaded))?;
    let diff = (&before - &after)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    assert_eq!(diff, 0.0, "reloaded adapters give other embeddings");
    let original = model.encode_text(
        &ids,
        Some(&HarmaAdapters::from_tensors(
            ckpt.adapters,
            &cfg,
            &acfg,
            &Device::Cpu,
        )?),
    )?;
    assert!(
        (&before - &original)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?
            > 1e-4,
        "the update changed nothing"
    );
    std::fs::remove_dir_all(out).ok();
    Ok(())
}
