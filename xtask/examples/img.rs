//! Profile helper: encode_image at ViT-B/32 size, random weights.
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use harma_clip::{Clip, ClipConfig};
use std::collections::HashMap;
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
fn main() -> anyhow::Result<()> {
    let d = Device::Cpu;
    let cfg = ClipConfig::vit_b32_quickgelu();
    let mut map = HashMap::new();
    for (name, shape) in harma_clip::checkpoint::expected_shapes(&cfg) {
        map.insert(name, Tensor::zeros(shape, DType::F32, &d)?);
    }
    let compute = harma_clip::Compute::cpu();
    let model = Clip::new(
        VarBuilder::from_tensors(map, DType::F32, &d),
        &cfg,
        &compute,
    )?;
    let px = Tensor::zeros((32, 3, 224, 224), DType::F32, &d)?;
    model.encode_image(&px, None)?;
    let t = std::time::Instant::now();
    let n = std::env::args()
        .nth(1)
        .map(|s| s.parse().unwrap())
        .unwrap_or(4);
    for _ in 0..n {
        model.encode_image(&px, None)?;
    }
    println!(
        "{:.1} images/s",
        32.0 * n as f64 / t.elapsed().as_secs_f64()
    );
    Ok(())
}
