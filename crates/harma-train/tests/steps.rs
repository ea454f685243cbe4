//! Training on the tiny HarMA model (fixtures: crates/harma-adapters/tests/fixtures/
//! make_fixtures.py): three AdamW steps whose losses equal the original's (model, loss and
//! transformers-AdamW update, steps.json) within 1e-4 relative, and a checkpoint round trip.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use harma_adapters::{AdapterConfig, HarmaAdapters};
use harma_clip::{Checkpoint, Clip, ClipConfig};
use harma_loss::{harma_loss, LossConfig, LossTerms};
use harma_train::optim::{AdamW, AdamWConfig};
use harma_train::step::GradAgreement;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../harma-adapters/tests/fixtures")
}

/// The tiny model with trainable adapters and the fixture's training batch.
struct Setup {
    cfg: ClipConfig,
    ckpt: Checkpoint,
    model: Clip,
    adapters: HarmaAdapters,
    vars: Vec<(String, Var)>,
    pixels: Tensor,
    ids: Tensor,
    image_ids: Vec<i64>,
}

impl Setup {
    fn new() -> Result<Self> {
        let cfg = ClipConfig::preset(fixtures().join("config.json").to_str().unwrap())?;
        let ckpt = Checkpoint::load(&fixtures().join("harma.pth"), &cfg)?;
        let model = Clip::from_checkpoint(&ckpt, &cfg, &Device::Cpu)?;
        let (adapters, vars) = HarmaAdapters::trainable(
            ckpt.adapters.clone(),
            &cfg,
            &AdapterConfig::default(),
            &Device::Cpu,
        )?;
        let batch =
            candle_core::safetensors::load(fixtures().join("grads.safetensors"), &Device::Cpu)?;
        Ok(Self {
            pixels: batch["pixels"].clone(),
            ids: batch["ids"].to_dtype(DType::U32)?,
            image_ids: batch["image_ids"].to_vec1()?,
            cfg,
            ckpt,
            model,
            adapters,
            vars,
        })
    }

    /// The objective on the batch with the adapters' current values.
    fn loss(&self) -> Result<LossTerms> {
        let img = self
            .model
            .encode_image(&self.pixels, Some(&self.adapters))?;
        let txt = self.model.encode_text(&self.ids, Some(&self.adapters))?;
        Ok(harma_loss(
            &img,
            &txt,
            &self.adapters.temp,
            &self.image_ids,
            &LossConfig::default(),
        )?)
    }
}

#[test]
fn three_steps_follow_the_original() -> Result<()> {
    let s = Setup::new()?;
    let steps: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("steps.json"))?)?;
    let want: Vec<f64> = steps["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let mut opt = AdamW::new(s.vars.clone(), AdamWConfig::default())?;
    let lr = steps["lr"].as_f64().unwrap();
    for (k, &w) in want.iter().enumerate() {
        let loss = s.loss()?;
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

/// Mixed precision: with the backbone's linear layers in bf16, every adapter tensor still gets
/// its gradient, pointing where the original's f32 gradient points (grads.safetensors).
#[test]
fn bf16_backbone_gradients_follow_the_original() -> Result<()> {
    let mut s = Setup::new()?;
    s.model = s.model.with_linear_dtype(DType::BF16)?;
    let want = candle_core::safetensors::load(fixtures().join("grads.safetensors"), &Device::Cpu)?;
    let grads = s.loss()?.total.backward()?;
    let pairs: Vec<(String, Tensor, Tensor)> = s
        .vars
        .iter()
        .map(|(name, var)| {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient reached {name}"));
            let key = match name.as_str() {
                "temp" => "grad.temp".to_string(),
                n => format!("grad.model.{n}"),
            };
            (name.clone(), g.clone(), want[&key].clone())
        })
        .collect();
    let a = GradAgreement::measure(pairs.iter().map(|(n, g, w)| (n.as_str(), g, w)))?;
    eprintln!(
        "bf16 backbone: gradient error {:.1e} of its norm; lowest cosine {:.4} ({})",
        a.rel_err, a.worst_cosine, a.worst_tensor
    );
    assert_eq!(a.tensors, s.vars.len());
    assert!(a.rel_err < 0.05 && a.worst_cosine > 0.9, "{a:?}");
    Ok(())
}

/// `--recompute`: recomputing one block at a time gives the same loss and gradients as the
/// backward over the whole graph, for every trainable tensor.
#[test]
fn recomputing_blocks_gives_the_same_gradients() -> Result<()> {
    let s = Setup::new()?;
    let params: Vec<Tensor> = s.vars.iter().map(|(_, v)| v.as_tensor().clone()).collect();
    let run = |recompute| {
        harma_train::step::loss_and_grads(
            &s.model,
            &s.adapters,
            &params,
            (&s.pixels, &s.ids),
            &s.image_ids,
            &LossConfig::default(),
            recompute,
        )
    };
    let (t0, g0) = run(false)?;
    let (t1, g1) = run(true)?;
    let (l0, l1) = (t0.total.to_scalar::<f32>()?, t1.total.to_scalar::<f32>()?);
    assert!((l0 - l1).abs() <= 1e-6 * l0.abs(), "{l0} vs {l1}");
    let mut worst = 0f32;
    for (name, p) in s.vars.iter().map(|(n, v)| (n, v.as_tensor())) {
        let (a, b) = (g0.get(p).unwrap(), g1.get(p));
        let b = b.unwrap_or_else(|| panic!("{name}: no gradient when recomputing"));
        let scale = a.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        let err = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? / scale;
        assert!(scale > 0.0, "{name}");
        worst = worst.max(err);
    }
    eprintln!("recompute vs full graph: worst gradient error {worst:.1e} of scale");
    assert!(worst <= 1e-5, "{worst}");
    Ok(())
}

#[test]
fn trained_adapters_round_trip_through_a_checkpoint() -> Result<()> {
    let s = Setup::new()?;
    let acfg = AdapterConfig::default();
    // one update so the saved tensors differ from the fixture's
    let mut opt = AdamW::new(s.vars.clone(), AdamWConfig::default())?;
    opt.step(&s.loss()?.total.backward()?, 1e-3)?;
    let before = s.model.encode_text(&s.ids, Some(&s.adapters))?;

    let out = std::env::temp_dir().join(format!("harma-rt-{}", std::process::id()));
    let path = out.join("adapters.safetensors");
    harma_train::optim::save_trained(&path, &s.vars)?;
    // the original's names: `model.` + open_clip key, and `temp`
    let saved = candle_core::safetensors::load(&path, &Device::Cpu)?;
    assert_eq!(saved.len(), 59);
    assert!(saved.contains_key("temp"));
    assert!(saved.contains_key("model.transformer.resblocks.0.mmadapter.BiShareAdapterxx.gate1"));
    assert!(saved.contains_key("model.visual.transformer.resblocks.1.gate1"));
    let reloaded = HarmaAdapters::from_tensors(
        harma_clip::checkpoint::load_adapters(&path)?,
        &s.cfg,
        &acfg,
        &Device::Cpu,
    )?;
    let after = s.model.encode_text(&s.ids, Some(&reloaded))?;
    let diff = (&before - &after)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    assert_eq!(diff, 0.0, "reloaded adapters give other embeddings");
    let fixture =
        HarmaAdapters::from_tensors(s.ckpt.adapters.clone(), &s.cfg, &acfg, &Device::Cpu)?;
    let original = s.model.encode_text(&s.ids, Some(&fixture))?;
    let moved = (&before - &original)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    assert!(moved > 1e-4, "the update changed nothing");
    std::fs::remove_dir_all(out).ok();
    Ok(())
}

fn own_fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The checkpoint the PyTorch side loads: one update from the fixture adapters.
fn trained(s: &Setup) -> Result<()> {
    let mut opt = AdamW::new(s.vars.clone(), AdamWConfig::default())?;
    opt.step(&s.loss()?.total.backward()?, 1e-2)?;
    Ok(())
}

#[test]
#[ignore = "regenerates tests/fixtures/trained.safetensors for check_torch_load.py"]
fn write_trained_fixture() -> Result<()> {
    let s = Setup::new()?;
    trained(&s)?;
    harma_train::optim::save_trained(&own_fixtures().join("trained.safetensors"), &s.vars)
}

#[test]
fn the_original_loads_what_we_train() -> Result<()> {
    // fixtures/check_torch_load.py: the original model, loaded with our trained.safetensors
    // by load_state_dict(strict=False), and its embeddings of the fixture inputs
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        own_fixtures().join("torch_load.json"),
    )?)?;
    assert_eq!(report["loaded"], 59);
    assert_eq!(
        report["unexpected"],
        serde_json::json!([]),
        "keys PyTorch did not know"
    );
    assert_eq!(report["missing_trainable"], serde_json::json!([]));
    let torch = candle_core::safetensors::load(
        own_fixtures().join("torch_load.safetensors"),
        &Device::Cpu,
    )?;

    // our model with the same file gives the same embeddings
    let s = Setup::new()?;
    let acfg = AdapterConfig::default();
    let ours = HarmaAdapters::from_tensors(
        harma_clip::checkpoint::load_adapters(&own_fixtures().join("trained.safetensors"))?,
        &s.cfg,
        &acfg,
        &Device::Cpu,
    )?;
    let inputs =
        candle_core::safetensors::load(fixtures().join("expected.safetensors"), &Device::Cpu)?;
    let img = s.model.encode_image(&inputs["pixels"], Some(&ours))?;
    let txt = s
        .model
        .encode_text(&inputs["ids"].to_dtype(DType::U32)?, Some(&ours))?;
    let err = |a: &Tensor, b: &Tensor| -> Result<f32> {
        Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
    };
    let (ei, et) = (err(&img, &torch["image"])?, err(&txt, &torch["text"])?);
    eprintln!("embeddings vs the original with our checkpoint: image {ei:.1e}, text {et:.1e}");
    assert!(ei < 1e-5 && et < 1e-5, "image {ei}, text {et}");
    assert_eq!(
        ours.temp.to_scalar::<f32>()?,
        torch["temp"].to_scalar::<f32>()?
    );

    // and the file is what one update from the fixture gives today
    trained(&s)?;
    let now = HarmaAdapters::from_tensors(
        s.vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect(),
        &s.cfg,
        &acfg,
        &Device::Cpu,
    )?;
    let again = s
        .model
        .encode_text(&inputs["ids"].to_dtype(DType::U32)?, Some(&now))?;
    let drift = err(&again, &txt)?;
    eprintln!("one update today vs the fixture: text embeddings differ by {drift:.1e}");
    assert!(drift < 1e-6, "{drift}");
    Ok(())
}
