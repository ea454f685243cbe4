//! The offline demo end to end, at a reduced size: generated scenes, a small random CLIP,
//! fresh adapters trained with val every quarter, test with the best. Training must work:
//! the loss falls, val mR rises, the best val is what test uses, and the trained model
//! retrieves far better than chance and than the frozen model.

use anyhow::Result;
use harma_train::demo::{chance, demo, Args};

#[test]
fn the_demo_learns_far_beyond_chance_and_zero_shot() -> Result<()> {
    let out = std::env::temp_dir().join(format!("harma-demo-{}", std::process::id()));
    let args = Args {
        out: out.clone(),
        steps: 160,
        images: 200,
        seed: 3407,
        compute: harma_kernels::compute::ComputeSettings {
            device: harma_kernels::compute::DeviceSpec::Cpu,
            ..Default::default()
        }
        .into(),
    };
    let r = demo(&args)?;
    let chance = chance(40, 5).r_mean;
    eprintln!(
        "test mR: chance {chance:.2}, zero-shot {:.2}, trained {:.2}",
        r.zero_shot.r_mean, r.trained.r_mean
    );
    assert!(r.trained.r_mean > 1.8 * chance, "trained {:?}", r.trained);
    assert!(r.trained.r_mean > r.zero_shot.r_mean + 5.0);

    let losses: Vec<f64> = std::fs::read_to_string(out.join("run/log.jsonl"))?
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(losses.len(), 160);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!(
        mean(&losses[140..]) < 0.8 * mean(&losses[..20]),
        "the loss did not fall"
    );

    let val: Vec<f64> = r.record.val.iter().map(|v| v.metrics.r_mean).collect();
    assert_eq!(val.len(), 4);
    assert!(val[3] > val[0] + 5.0, "val mR did not rise: {val:?}");
    let best = r.record.best.as_ref().unwrap();
    assert_eq!(
        best.metrics.r_mean,
        val.iter().cloned().fold(f64::MIN, f64::max)
    );
    let test = r.record.test.as_ref().unwrap();
    assert_eq!(
        (test.adapters.as_str(), test.step),
        ("best.safetensors", best.step)
    );
    std::fs::remove_dir_all(out).ok();
    Ok(())
}
