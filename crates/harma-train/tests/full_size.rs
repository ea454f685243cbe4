//! One training step of full-size HarMA (ViT-B/32 with the paper's adapters) against the
//! original model code: every tensor by the parity formula (`harma_clip::checkpoint::
//! formula_tensor`), the reference computed by crates/harma-clip/tests/fixtures/full_size/
//! make_full_size.py (step.safetensors), which commits the loss terms, `temp`'s gradient and a
//! sketch of every other gradient (the gradients themselves are 5.9M values).

use std::path::PathBuf;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use harma_adapters::{AdapterConfig, HarmaAdapters};
use harma_clip::checkpoint::{formula_backbone, formula_pixels, formula_tensors, formula_unit};
use harma_clip::{Clip, ClipConfig, Compute};
use harma_loss::LossConfig;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../harma-clip/tests/fixtures/full_size")
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    assert_eq!(a.dims(), b.dims());
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// The bounds are 4 to 6 times the errors measured on an x86-64 CPU with AVX-512 (the same with
/// RAYON_NUM_THREADS 1, 2 and 8): embeddings 1.8e-7, loss terms 1.6e-7 relative, `temp`'s
/// gradient 6e-7 relative, the other gradients' sketches 2.8e-6 of their norm, the gates'
/// gradients 2.4e-6 of the largest.
#[test]
fn full_size_step_follows_the_original() -> Result<()> {
    let dev = Device::Cpu;
    let compute = Compute::cpu();
    let cfg = ClipConfig::vit_b32_quickgelu();
    let acfg = AdapterConfig::default();
    let vb = VarBuilder::from_tensors(formula_backbone(&cfg, &dev)?, DType::F32, &dev);
    let model = Clip::new(vb, &cfg, &compute)?;
    let tensors = formula_tensors(harma_adapters::expected_shapes(&cfg, &acfg), &dev)?;
    let (adapters, vars) = HarmaAdapters::trainable(tensors, &cfg, &acfg, &compute)?;
    assert_eq!(vars.len(), 349);

    let want = candle_core::safetensors::load(fixtures().join("step.safetensors"), &dev)?;
    let inputs = candle_core::safetensors::load(fixtures().join("embeddings.safetensors"), &dev)?;
    // the script's images, as the batch [0, 0, 1, 2]
    let images = formula_pixels(3, 224, &dev)?;
    let pixels = images.index_select(&Tensor::new(&[0u32, 0, 1, 2], &dev)?, 0)?;
    let ids = inputs["ids"].to_dtype(DType::U32)?;
    let image_ids: Vec<i64> = want["image_ids"].to_vec1()?;
    assert_eq!(image_ids, [0, 0, 1, 2]);

    // the forward pass: the adapted embeddings
    let img = model.encode_image(&pixels, Some(&adapters))?;
    let txt = model.encode_text(&ids, Some(&adapters))?;
    let (ei, et) = (
        max_abs_diff(&img, &want["image"])?,
        max_abs_diff(&txt, &want["text"])?,
    );
    eprintln!("adapted embeddings: image max abs err {ei:.2e}, text {et:.2e}");
    assert!(ei <= 1e-6 && et <= 1e-6, "image {ei}, text {et}");

    // the step: loss terms and gradients
    let params: Vec<Tensor> = vars.iter().map(|(_, v)| v.as_tensor().clone()).collect();
    let (terms, grads) = harma_trainer::step::loss_and_grads(
        &model,
        &adapters,
        &params,
        (&pixels, &ids),
        &image_ids,
        &LossConfig::default(),
        false,
    )?;
    let scalar = |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
    for (name, ours, key) in [
        ("contrastive", &terms.contrastive, "loss_contrastive"),
        ("triplet", &terms.triplet, "loss_triplet"),
    ] {
        let (a, b) = (scalar(ours)?, scalar(&want[key])?);
        let rel = (a - b).abs() / b.abs();
        eprintln!("loss {name}: {a:.7} original {b:.7} rel err {rel:.1e}");
        assert!(rel <= 1e-6, "{name}: {a} vs {b}");
    }

    // each gradient's sketch: [L2 norm, dot with the probe `u("probe." + key)`, first elements]
    let temp_grad = scalar(&want["grad.temp"])?;
    let mut tensors = Vec::new(); // (key, error relative to the gradient's norm)
    let mut gates = Vec::new(); // (key, absolute error, the original's gradient)
    for (key, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{key}: no gradient"));
        let g: Vec<f64> = g
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(f64::from)
            .collect();
        if key == "temp" {
            let rel = (g[0] - temp_grad).abs() / temp_grad.abs();
            eprintln!(
                "temp gradient {:.7} original {temp_grad:.7} rel err {rel:.1e}",
                g[0]
            );
            assert!(rel <= 3e-6, "temp: {} vs {temp_grad}", g[0]);
            continue;
        }
        let sketch: Vec<f64> = want[&format!("grad.{key}")].to_vec1()?;
        if g.len() == 1 {
            gates.push((key.clone(), (g[0] - sketch[2]).abs(), sketch[2]));
            continue;
        }
        let probe = formula_unit(&format!("probe.{key}"), g.len());
        let norm = g.iter().map(|x| x * x).sum::<f64>().sqrt();
        let dot: f64 = g.iter().zip(&probe).map(|(x, p)| x * p).sum();
        let probe_norm = probe.iter().map(|p| p * p).sum::<f64>().sqrt();
        // the dot product's error relative to the largest it could be (Cauchy-Schwarz)
        let err = [
            (norm - sketch[0]).abs() / sketch[0],
            (dot - sketch[1]).abs() / (sketch[0] * probe_norm),
            g.iter()
                .zip(&sketch[2..])
                .map(|(a, b)| (a - b).abs() / sketch[0])
                .fold(0.0, f64::max),
        ];
        tensors.push((key.clone(), err));
    }
    assert_eq!((tensors.len(), gates.len()), (288, 60));
    let worst = |i: usize| {
        tensors
            .iter()
            .map(|(k, e)| (e[i], k.as_str()))
            .fold((0.0, ""), |a, b| if b.0 > a.0 { b } else { a })
    };
    let (norm, probe, head) = (worst(0), worst(1), worst(2));
    eprintln!(
        "gradients of {} tensors, worst errors relative to their norm: norm {:.1e} ({}), \
         probe {:.1e} ({}), first elements {:.1e} ({})",
        tensors.len(),
        norm.0,
        norm.1,
        probe.0,
        probe.1,
        head.0,
        head.1
    );
    // a gate's gradient sums many terms that nearly cancel (some are 1e-6, against 6e-3 for
    // the largest): its error is measured against the largest gate gradient
    let scale = gates.iter().map(|g| g.2.abs()).fold(0.0, f64::max);
    let gate = gates
        .iter()
        .map(|(k, e, w)| (e / scale, k.as_str(), e / w.abs()))
        .fold((0.0, "", 0.0), |a, b| if b.0 > a.0 { b } else { a });
    eprintln!(
        "gradients of {} gates: worst error {:.1e} of the largest ({scale:.1e}), {} ({:.1e} of \
         its own)",
        gates.len(),
        gate.0,
        gate.1,
        gate.2
    );
    assert!(
        norm.0 <= 1.5e-5 && probe.0 <= 1.5e-5 && head.0 <= 1.5e-5 && gate.0 <= 1.5e-5,
        "{norm:?} {probe:?} {head:?} {gate:?}"
    );
    Ok(())
}
