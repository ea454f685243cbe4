//! `--device auto|cpu|cuda|cuda:N`, shared by every command.

use anyhow::{bail, Result};
use candle_core::Device;

/// The help text of `--device` (a macro, so that `concat!` can add a default to it).
#[macro_export]
macro_rules! device_help {
    () => {
        "Where to compute: auto (a CUDA GPU when this binary has CUDA and one is visible, else \
         the CPU), cpu, cuda or cuda:N"
    };
}

/// The help text of `--precision`.
#[macro_export]
macro_rules! precision_help {
    () => {
        "The frozen backbone's linear layers: f32, or bf16 (mixed precision: bf16 operands, f32 \
         sums; layer norms, attention, adapters and optimiser stay f32). bf16 runs on GPU tensor \
         cores and on Intel AMX CPUs (Xeon 4th gen and later: 1.4-2.6x f32 in our benchmarks); other \
         CPUs get the same numbers at f32 speed. HARMA_AMX=0 turns AMX off"
    };
}

pub const HELP: &str = device_help!();
pub const PRECISION_HELP: &str = precision_help!();

/// Parse a `--precision` value into the dtype of the backbone's linear layers.
pub fn parse_precision(spec: &str) -> Result<candle_core::DType> {
    match spec {
        "f32" => Ok(candle_core::DType::F32),
        "bf16" => Ok(candle_core::DType::BF16),
        s => bail!("--precision {s}: expected f32 or bf16"),
    }
}

/// Parse a `--device` value.
pub fn parse(spec: &str) -> Result<Device> {
    let ordinal = match spec {
        "cpu" => return Ok(Device::Cpu),
        // a CUDA build on a machine without a usable GPU falls back to the CPU
        "auto" if candle_core::utils::cuda_is_available() => {
            return Ok(Device::new_cuda(0).unwrap_or_else(|e| {
                eprintln!("no usable CUDA GPU ({}); using the CPU", first_line(&e));
                Device::Cpu
            }));
        }
        "auto" => return Ok(Device::Cpu),
        "cuda" => 0,
        s => match s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) => n,
            None => bail!("--device {s}: expected auto, cpu, cuda or cuda:N"),
        },
    };
    Device::new_cuda(ordinal).map_err(|e| {
        let advice = if cfg!(feature = "cuda") {
            "is the GPU visible (nvidia-smi) and the CUDA runtime on LD_LIBRARY_PATH?"
        } else {
            "this binary was built without CUDA: build it with `--features cuda` \
             (docs/CUDA.md), or use --device cpu"
        };
        anyhow::anyhow!("--device {spec}: {}; {advice}", first_line(&e))
    })
}

/// An error's first line (a driver error carries a backtrace after it).
fn first_line(e: &candle_core::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

/// A short name for messages.
pub fn describe(d: &Device) -> String {
    match d {
        Device::Cpu => format!("cpu ({} threads)", candle_core::utils::get_num_threads()),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs() {
        assert!(parse("cpu").unwrap().is_cpu());
        if !cfg!(feature = "cuda") {
            assert!(parse("auto").unwrap().is_cpu());
            let e = parse("cuda:1").unwrap_err().to_string();
            assert!(
                e.contains("built without CUDA") && e.contains("--features cuda"),
                "{e}"
            );
        }
        let e = parse("gpu").unwrap_err().to_string();
        assert!(e.contains("expected auto, cpu, cuda or cuda:N"), "{e}");
        assert!(parse("cuda:x").is_err());
    }
}
