//! The objective against the ORIGINAL HarMA loss functions (fixtures: tests/fixtures/
//! make_fixtures.py, reference values in float64 from the same float32 embeddings): distinct
//! images, several captions of one image in a batch, a batch of one image, a single pair.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::{Device, Tensor};
use harma_loss::{adaptive_triplet, contrastive, harma_loss, plain_triplet, LossConfig};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// |ours - reference| relative to the reference, or to 0.01 for smaller values (a zero loss
/// has no relative error).
fn rel_err(ours: f64, theirs: f64) -> f64 {
    (ours - theirs).abs() / theirs.abs().max(1e-2)
}

#[test]
fn every_term_matches_the_original() -> Result<()> {
    let tensors =
        candle_core::safetensors::load(fixtures().join("cases.safetensors"), &Device::Cpu)?;
    let values: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("cases.json"))?)?;
    let mut worst = 0f64;
    for (name, v) in values.as_object().unwrap() {
        let img = &tensors[&format!("{name}_img")];
        let txt = &tensors[&format!("{name}_txt")];
        let ids: Vec<i64> = v["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect();
        let temp = Tensor::new(v["temp"].as_f64().unwrap() as f32, &Device::Cpu)?;
        let distinct: Vec<i64> = (0..ids.len() as i64).collect();
        let ours = [
            ("contrastive", contrastive(img, txt, &temp, &ids)?),
            (
                "contrastive_no_idx",
                contrastive(img, txt, &temp, &distinct)?,
            ),
            (
                "adaptive_triplet",
                adaptive_triplet(img, txt, 0.2, 2.0, false)?,
            ),
            (
                "adaptive_triplet_max",
                adaptive_triplet(img, txt, 0.2, 2.0, true)?,
            ),
            ("triplet_sum", plain_triplet(img, txt, 0.2, false)?),
            ("triplet_max", plain_triplet(img, txt, 0.2, true)?),
        ];
        for (term, t) in ours {
            let o = t.to_scalar::<f32>()? as f64;
            let r = v[term].as_f64().unwrap();
            let e = rel_err(o, r);
            eprintln!("{name:>10} {term:<22} ours {o:<14.8} original {r:<14.8} rel err {e:.1e}");
            worst = worst.max(e);
            assert!(e <= 3e-6, "{name} {term}: {o} vs {r}");
        }
    }
    eprintln!("worst relative error {worst:.1e}");
    Ok(())
}

#[test]
fn default_objective_is_contrastive_plus_adaptive_triplet() -> Result<()> {
    let tensors =
        candle_core::safetensors::load(fixtures().join("cases.safetensors"), &Device::Cpu)?;
    let (img, txt) = (&tensors["shared_img"], &tensors["shared_txt"]);
    let ids = [3, 3, 3, 7, 7, 1, 2, 2, 9, 5];
    let temp = Tensor::new(0.05f32, &Device::Cpu)?;
    let terms = harma_loss(img, txt, &temp, &ids, &LossConfig::default())?;
    let sum = terms.contrastive.to_scalar::<f32>()? + terms.triplet.to_scalar::<f32>()?;
    assert!((terms.total.to_scalar::<f32>()? - sum).abs() < 1e-6);
    let err = harma_loss(img, txt, &temp, &ids[..3], &LossConfig::default()).unwrap_err();
    assert!(err.to_string().contains("3 image ids"), "{err}");
    Ok(())
}
