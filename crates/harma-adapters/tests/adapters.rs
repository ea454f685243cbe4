//! Adapters against the ORIGINAL HarMA model code (fixtures: tests/fixtures/make_fixtures.py,
//! run on a checkout of github.com/seekerhuang/HarMA): a tiny CLIP with every adapter tensor
//! random, loaded from a HarMA-style checkpoint (`{'model': ..., 'config': CommentedMap}`) and
//! from an adapters-only safetensors file.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use harma_adapters::{is_adapter_key, AdapterConfig, HarmaAdapters, Sharing};
use harma_clip::{Checkpoint, Clip, ClipConfig, Compute, Kernels};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn config() -> ClipConfig {
    ClipConfig::preset(fixtures().join("config.json").to_str().unwrap()).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    assert_eq!(a.dims(), b.dims());
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn check(model: &Clip, adapters: &HarmaAdapters) -> Result<()> {
    let want =
        candle_core::safetensors::load(fixtures().join("expected.safetensors"), &Device::Cpu)?;
    let img = model.encode_image(&want["pixels"], Some(adapters))?;
    let txt = model.encode_text(&want["ids"].to_dtype(DType::U32)?, Some(adapters))?;
    let ei = max_abs_diff(&img, &want["image"])?;
    let et = max_abs_diff(&txt, &want["text"])?;
    eprintln!("image max abs err {ei:.2e}, text {et:.2e}");
    assert!(ei <= 1e-6 && et <= 1e-6, "image {ei}, text {et}");
    Ok(())
}

#[test]
fn official_style_checkpoint_matches_the_original_model() -> Result<()> {
    let cfg = config();
    let ckpt = Checkpoint::load(&fixtures().join("harma.pth"), &cfg, &is_adapter_key)?;
    assert_eq!(ckpt.extras.len(), 59);
    let model = Clip::from_checkpoint(&ckpt, &cfg, &Compute::cpu())?;
    let adapters = HarmaAdapters::from_tensors(
        ckpt.extras,
        &cfg,
        &AdapterConfig::default(),
        &Compute::cpu(),
    )?;
    assert!((adapters.temp.to_scalar::<f32>()? - 0.05).abs() < 1e-7);
    check(&model, &adapters)
}

#[test]
fn adapters_only_file_on_a_backbone_gives_the_same_model() -> Result<()> {
    let cfg = config();
    let ckpt = Checkpoint::load(&fixtures().join("harma.pth"), &cfg, &is_adapter_key)?;
    let model = Clip::from_checkpoint(&ckpt, &cfg, &Compute::cpu())?;
    let tensors = harma_adapters::load_file(&fixtures().join("adapters.safetensors"))?;
    let adapters =
        HarmaAdapters::from_tensors(tensors, &cfg, &AdapterConfig::default(), &Compute::cpu())?;
    check(&model, &adapters)
}

#[test]
fn adapters_change_the_embeddings() -> Result<()> {
    // the fixture is only a proof if the adapters matter: plain CLIP must differ
    let cfg = config();
    let ckpt = Checkpoint::load(&fixtures().join("harma.pth"), &cfg, &is_adapter_key)?;
    let model = Clip::from_checkpoint(&ckpt, &cfg, &Compute::cpu())?;
    let want =
        candle_core::safetensors::load(fixtures().join("expected.safetensors"), &Device::Cpu)?;
    let img = model.encode_image(&want["pixels"], None)?;
    assert!(max_abs_diff(&img, &want["image"])? > 1e-2);
    Ok(())
}

#[test]
fn mismatched_adapters_list_what_is_wrong() -> Result<()> {
    let cfg = config();
    let mut tensors: HashMap<String, Tensor> =
        harma_adapters::load_file(&fixtures().join("adapters.safetensors"))?;
    tensors.remove("transformer.resblocks.1.mmadapter.BiShareAdapterxx.gate1");
    let err = HarmaAdapters::from_tensors(
        tensors.clone(),
        &cfg,
        &AdapterConfig::default(),
        &Compute::cpu(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("missing `transformer.resblocks.1.mmadapter.BiShareAdapterxx.gate1`"),
        "{err}"
    );
    // the released checkpoints have no mini-adapters in the image tower: `none` finds extras
    let none = AdapterConfig {
        sharing: Sharing::None,
        ..AdapterConfig::default()
    };
    let err = HarmaAdapters::from_tensors(tensors, &cfg, &none, &Compute::cpu())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("unexpected `transformer.resblocks.0.mmadapter.BiShareAdapterxx.l1.bias`"),
        "{err}"
    );
    let err = harma_adapters::load_file(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../harma-clip/tests/fixtures/tiny/open_clip.safetensors"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("no adapter tensors"), "{err}");
    Ok(())
}

/// The gradient of every trainable tensor for one training batch (4 pairs, two of one image),
/// contrastive + adaptive triplet, against the original model and loss code.
#[test]
fn gradients_of_every_trainable_tensor_match_the_original() -> Result<()> {
    check_gradients(Kernels::Fused)
}

#[test]
fn gradients_through_the_generic_ops_match_the_original_too() -> Result<()> {
    // the reference path: Candle's basic ops, differentiable end to end
    check_gradients(Kernels::Generic)
}

/// The loss terms and the gradient of each of the 59 trainable tensors against the original's,
/// with the model and adapters on `kernels`.
fn check_gradients(kernels: Kernels) -> Result<()> {
    let cfg = config();
    let compute = Compute::cpu().with_kernels(kernels);
    let ckpt = Checkpoint::load(&fixtures().join("harma.pth"), &cfg, &is_adapter_key)?;
    let model = Clip::from_checkpoint(&ckpt, &cfg, &compute)?;
    let (adapters, vars) = HarmaAdapters::trainable(
        ckpt.extras.clone(),
        &cfg,
        &AdapterConfig::default(),
        &compute,
    )?;
    assert_eq!(vars.len(), 59);
    let want = candle_core::safetensors::load(fixtures().join("grads.safetensors"), &Device::Cpu)?;
    let img = model.encode_image(&want["pixels"], Some(&adapters))?;
    let txt = model.encode_text(&want["ids"].to_dtype(DType::U32)?, Some(&adapters))?;
    let ids: Vec<i64> = want["image_ids"].to_vec1()?;
    let terms = harma_loss::harma_loss(
        &img,
        &txt,
        &adapters.temp,
        &ids,
        &harma_loss::LossConfig::default(),
    )?;
    let rel = |a: f32, b: f32| (a - b).abs() / b.abs();
    let (c, t) = (
        terms.contrastive.to_scalar::<f32>()?,
        terms.triplet.to_scalar::<f32>()?,
    );
    assert!(
        rel(c, want["loss_contrastive"].to_scalar()?) < 1e-5,
        "contrastive {c}"
    );
    assert!(
        rel(t, want["loss_triplet"].to_scalar()?) < 1e-5,
        "triplet {t}"
    );
    let grads = terms.total.backward()?;
    let mut worst = (0f32, String::new());
    for (name, var) in &vars {
        let key = if name == "temp" {
            "grad.temp".to_string()
        } else {
            format!("grad.model.{name}")
        };
        let reference = &want[&key];
        let ours = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        assert!(
            ours.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? > 0.0,
            "{name}: zero gradient"
        );
        // relative to the tensor's largest reference gradient
        let scale = reference
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?
            .max(1e-12);
        let err = max_abs_diff(ours, reference)? / scale;
        if err > worst.0 {
            worst = (err, name.clone());
        }
        assert!(err <= 5e-5, "{name}: relative gradient error {err}");
    }
    eprintln!(
        "59 gradients, worst relative error {:.1e} ({})",
        worst.0, worst.1
    );
    Ok(())
}

#[test]
fn fresh_adapters_are_initialised_as_the_original() -> Result<()> {
    // fixtures/make_init.py: statistics of the original's freshly built ViT-B/32 adapters
    let want: HashMap<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("init.json"))?)?;
    let mut rng = harma_data::rng::Rng::new(3407);
    let ours = harma_adapters::init_tensors(
        &ClipConfig::vit_b32(),
        &AdapterConfig::default(),
        &mut || rng.uniform(),
        &Device::Cpu,
    )?;
    assert_eq!(ours.len(), 349);
    assert!((ours["temp"].to_scalar::<f32>()? - 0.07).abs() < 1e-9);
    for (name, w) in &want {
        let t: Vec<f64> = ours[name]
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .map(|&v| v as f64)
            .collect();
        let n = t.len() as f64;
        assert_eq!(t.len() as u64, w["numel"].as_u64().unwrap(), "{name}");
        let (wmin, wmax, wstd) = (
            w["min"].as_f64().unwrap(),
            w["max"].as_f64().unwrap(),
            w["std"].as_f64().unwrap(),
        );
        let (min, max) = t
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
        if wstd == 0.0 {
            assert!(
                min == max && (min - wmin).abs() < 1e-7,
                "{name}: {min}..{max}"
            );
            continue;
        }
        let mean = t.iter().sum::<f64>() / n;
        let std = (t.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
        // same uniform distribution: the spread agrees to sampling error, and so do the
        // extremes, which sit at the bound for large tensors
        let tol = 4.0 / n.sqrt() + 0.01;
        assert!(
            (std / wstd - 1.0).abs() < tol,
            "{name}: std {std} vs {wstd}"
        );
        let bound = wmax.max(-wmin);
        assert!(
            max.max(-min) <= bound * (1.0 + 6.0 / n) + 1e-9,
            "{name}: exceeds {bound}"
        );
        if n >= 1000.0 {
            assert!(
                max.max(-min) > bound * 0.99,
                "{name}: {min}..{max} vs {bound}"
            );
        }
    }
    Ok(())
}

#[test]
fn a_fresh_model_equals_its_backbone() -> Result<()> {
    // the up projections start at zero, so the adapters pass the MLP output through
    let cfg = config();
    let ckpt = Checkpoint::load(&fixtures().join("harma.pth"), &cfg, &is_adapter_key)?;
    let model = Clip::from_checkpoint(&ckpt, &cfg, &Compute::cpu())?;
    let mut rng = harma_data::rng::Rng::new(1);
    let fresh = harma_adapters::init_tensors(
        &cfg,
        &AdapterConfig::default(),
        &mut || rng.uniform(),
        &Device::Cpu,
    )?;
    let adapters =
        HarmaAdapters::from_tensors(fresh, &cfg, &AdapterConfig::default(), &Compute::cpu())?;
    let want =
        candle_core::safetensors::load(fixtures().join("expected.safetensors"), &Device::Cpu)?;
    let ids = want["ids"].to_dtype(DType::U32)?;
    let e_img = max_abs_diff(
        &model.encode_image(&want["pixels"], Some(&adapters))?,
        &model.encode_image(&want["pixels"], None)?,
    )?;
    let e_txt = max_abs_diff(
        &model.encode_text(&ids, Some(&adapters))?,
        &model.encode_text(&ids, None)?,
    )?;
    assert!(e_img < 1e-6 && e_txt < 1e-6, "{e_img} {e_txt}");
    Ok(())
}
