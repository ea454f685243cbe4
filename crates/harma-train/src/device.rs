//! `--device` and `--precision`: the flags every command shares, and the [`Compute`] they
//! resolve to on this machine.

use anyhow::{bail, Result};
use candle_core::Device;
use harma_clip::{Compute, Precision};

/// Where to compute, as the user names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum DeviceSpec {
    /// A CUDA GPU when this binary has CUDA and one is visible, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "auto" => DeviceSpec::Auto,
            "cpu" => DeviceSpec::Cpu,
            "cuda" => DeviceSpec::Cuda(0),
            s => match s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
            {
                Some(n) => DeviceSpec::Cuda(n),
                None => bail!("--device {s}: expected auto, cpu, cuda or cuda:N"),
            },
        })
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl From<DeviceSpec> for String {
    fn from(d: DeviceSpec) -> Self {
        d.to_string()
    }
}

impl TryFrom<String> for DeviceSpec {
    type Error = anyhow::Error;

    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl DeviceSpec {
    /// The device, or an error that says what to do.
    pub fn device(self) -> Result<Device> {
        let ordinal = match self {
            DeviceSpec::Cpu => return Ok(Device::Cpu),
            // a CUDA build on a machine without a usable GPU falls back to the CPU
            DeviceSpec::Auto if candle_core::utils::cuda_is_available() => {
                return Ok(Device::new_cuda(0).unwrap_or_else(|e| {
                    eprintln!("no usable CUDA GPU ({}); using the CPU", first_line(&e));
                    Device::Cpu
                }));
            }
            DeviceSpec::Auto => return Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => n,
        };
        Device::new_cuda(ordinal).map_err(|e| {
            let advice = if cfg!(feature = "cuda") {
                "is the GPU visible (nvidia-smi) and the CUDA runtime on LD_LIBRARY_PATH?"
            } else {
                "this binary was built without CUDA: build it with `--features cuda` \
                 (docs/CUDA.md), or use --device cpu"
            };
            anyhow::anyhow!("--device {self}: {}; {advice}", first_line(&e))
        })
    }
}

/// An error's first line (a driver error carries a backtrace after it).
fn first_line(e: &candle_core::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

/// `--device`, shared by every command (and xtask's).
#[derive(Debug, Clone, PartialEq, clap::Args, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct DeviceArg {
    /// Where to compute: auto (a CUDA GPU when this binary has CUDA and one is visible, else
    /// the CPU), cpu, cuda or cuda:N
    #[arg(id = "device", long = "device", value_name = "DEVICE", default_value_t = DeviceSpec::Auto)]
    #[serde(rename = "device")]
    pub spec: DeviceSpec,
}

impl Default for DeviceArg {
    fn default() -> Self {
        crate::config::clap_defaults()
    }
}

/// `--device` and `--precision`, shared by every command that embeds or trains (and xtask's).
#[derive(Debug, Clone, PartialEq, clap::Args, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ComputeArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub device: DeviceArg,
    /// The linear layers' products: f32, or bf16 (mixed precision: bf16 operands, f32 sums, in
    /// the backbone's linear layers and on the CPU the adapters' too; layer norms, attention,
    /// the adapters' weights and gradients and the optimiser stay f32). bf16 runs on GPU tensor
    /// cores, and on CPUs with Intel AMX or AVX512-BF16 (AMD Zen 4 and later, Intel Cooper
    /// Lake and later); other CPUs compute the same products at f32 speed.
    /// HARMA_BF16_KERNEL=amx|avx512bf16|f32 forces a CPU kernel, HARMA_AMX=0 turns AMX off
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub precision: Precision,
}

impl Default for ComputeArgs {
    fn default() -> Self {
        crate::config::clap_defaults()
    }
}

impl ComputeArgs {
    /// The compute setting these flags ask for on this machine (chosen once, here).
    pub fn compute(&self) -> Result<Compute> {
        Ok(Compute::new(self.device.spec.device()?, self.precision))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs() {
        let parse = |s: &str| s.parse::<DeviceSpec>().and_then(|d| d.device());
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
        for s in ["auto", "cpu", "cuda:0", "cuda:3"] {
            assert_eq!(s.parse::<DeviceSpec>().unwrap().to_string(), s);
        }
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
    }
}
