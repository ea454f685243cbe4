//! The explicit compute setting: where the tensors live, the precision of the frozen linear
//! layers, which implementation the layers run, and which CPU kernel multiplies in bf16.
//!
//! It is chosen once, from the flags and the machine ([`Compute::new`]), passed by value to
//! the model, and copied into every layer it builds: the kernel a tensor runs through is decided
//! by the layer's own settings, never by a thread-local or a process-wide flag, so it is the
//! same on every thread (both towers of a training step run side by side).

use anyhow::{bail, Result};
use candle_core::{DType, Device};

/// The precision of the frozen backbone's linear layers (`--precision`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 everywhere
    #[default]
    F32,
    /// bf16 operands with f32 sums in every linear layer, the backbone's and the adapters'
    /// (as PyTorch's autocast runs `nn.Linear`); layer norms, softmax, attention's products,
    /// the adapters' weights and gradients and the optimiser stay f32
    Bf16,
}

impl Precision {
    /// The dtype the frozen linear layers store their weights in.
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Which implementation of the transformer's operations the layers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kernels {
    /// This crate's fused CPU kernels (`ops`): attention in one parallel loop, layer norm,
    /// QuickGELU and linear layers in one pass each, a block's frozen branches as one graph
    /// node; frozen weights get no gradient. f32 tensors on the CPU.
    Fused,
    /// Candle's ops on the tensors' device, except that linear layers run the backend's GEMM
    /// through one op whose backward skips frozen weights: the GPU path.
    Backend,
    /// Candle's basic differentiable ops everywhere (frozen weights get gradients too): the
    /// reference the fused kernels are tested against, and the naive baseline of the bench.
    Generic,
}

/// The CPU kernel that multiplies bf16 operands. Every one computes the same exact products
/// of bf16-rounded operands and sums them in f32; only the order of the f32 additions
/// differs, so results agree to f32 rounding whichever CPU ran them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Bf16Kernel {
    #[serde(rename = "amx")]
    /// Intel AMX tiles (`TDPBF16PS`): Xeon 4th generation and later
    Amx,
    /// AVX512-BF16 (`VDPBF16PS`): AMD Zen 4 and later, Intel Cooper Lake and later
    #[serde(rename = "avx512bf16")]
    Avx512,
    /// The f32 GEMM on bf16-rounded operands: every CPU, at f32 speed
    #[serde(rename = "f32")]
    F32,
}

impl Bf16Kernel {
    /// Every kernel, fastest first.
    pub const ALL: [Bf16Kernel; 3] = [Bf16Kernel::Amx, Bf16Kernel::Avx512, Bf16Kernel::F32];

    pub fn name(self) -> &'static str {
        match self {
            Bf16Kernel::Amx => "amx",
            Bf16Kernel::Avx512 => "avx512bf16",
            Bf16Kernel::F32 => "f32",
        }
    }

    /// The kernel named `name` (as [`Bf16Kernel::name`] gives it).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Whether this CPU (and OS) can run the kernel.
    pub fn available(self) -> bool {
        match self {
            Bf16Kernel::Amx => crate::raw::amx::available(),
            Bf16Kernel::Avx512 => crate::raw::avx512bf16::available(),
            Bf16Kernel::F32 => true,
        }
    }

    /// The fastest kernel this machine has.
    pub fn fastest() -> Self {
        Self::fastest_of(&Self::ALL)
    }

    /// The fastest of `kernels` this machine has (f32 if none).
    pub fn fastest_of(kernels: &[Bf16Kernel]) -> Self {
        kernels
            .iter()
            .copied()
            .find(|k| k.available())
            .unwrap_or(Bf16Kernel::F32)
    }
}

impl std::fmt::Display for Bf16Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Where and how the model computes. Cheap to clone; every layer keeps the parts it needs.
#[derive(Debug, Clone)]
pub struct Compute {
    pub device: Device,
    pub precision: Precision,
    pub kernels: Kernels,
    /// The kernel of bf16 products on the CPU ([`Precision::Bf16`]).
    pub bf16: Bf16Kernel,
}

impl Compute {
    /// The setting for `device` and `precision` on this machine: the fused kernels on the CPU,
    /// the backend's ops elsewhere, the fastest bf16 kernel the CPU has. Reads nothing but the
    /// CPU's features: a kernel asked for by name is [`ComputeSettings::bf16_kernel`].
    pub fn new(device: Device, precision: Precision) -> Self {
        let kernels = if device.is_cpu() {
            Kernels::Fused
        } else {
            Kernels::Backend
        };
        Self {
            device,
            precision,
            kernels,
            bf16: Bf16Kernel::fastest(),
        }
    }

    /// f32 on the CPU's fused kernels.
    pub fn cpu() -> Self {
        Self::new(Device::Cpu, Precision::F32)
    }

    pub fn with_kernels(self, kernels: Kernels) -> Self {
        Self { kernels, ..self }
    }

    pub fn with_precision(self, precision: Precision) -> Self {
        Self { precision, ..self }
    }

    /// Force a bf16 kernel (tests, A/B measurements); it must be [`Bf16Kernel::available`].
    pub fn with_bf16_kernel(self, bf16: Bf16Kernel) -> Self {
        Self { bf16, ..self }
    }

    /// One line for logs: `cpu, f32, fused kernels` / `cpu, bf16 (amx), fused kernels`.
    pub fn describe(&self) -> String {
        let device = match &self.device {
            Device::Cpu => format!("cpu ({} threads)", candle_core::utils::get_num_threads()),
            other => format!("{other:?}"),
        };
        let precision = match (self.precision, self.device.is_cpu()) {
            (Precision::Bf16, true) => format!("bf16 ({} kernel)", self.bf16),
            (p, _) => p.to_string(),
        };
        let kernels = match self.kernels {
            Kernels::Fused => "fused CPU kernels",
            Kernels::Backend => "backend ops",
            Kernels::Generic => "generic ops",
        };
        format!("{device}, {precision}, {kernels}")
    }
}

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
            let advice = if candle_core::utils::cuda_is_available() {
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

harma_settings::choices!(Precision {
    "f32": "f32 everywhere",
    "bf16": "bf16 operands with f32 sums in every linear layer, the backbone's and the adapters' \
             (as PyTorch's autocast runs `nn.Linear`); layer norms, softmax, attention's \
             products, the adapters' weights and gradients and the optimiser stay f32",
});

harma_settings::choices!(Bf16Kernel {
    "amx": "Intel AMX tiles: Xeon 4th generation and later",
    "avx512bf16": "AVX512-BF16: AMD Zen 4 and later, Intel Cooper Lake and later",
    "f32": "the f32 GEMM on bf16-rounded operands: every CPU, at f32 speed",
});

impl harma_settings::SettingValue for DeviceSpec {
    fn parse(s: &str) -> Result<toml::Value, String> {
        harma_settings::parse_with::<DeviceSpec>(s)
    }
}

harma_settings::settings! {
    /// `--device`, `--precision` and `--bf16-kernel`: where and how a command computes, shared
    /// by every command that embeds or trains (and xtask's).
    pub struct ComputeSettings {
        /// Where to compute: auto (a CUDA GPU when this binary has CUDA and one is visible,
        /// else the CPU), cpu, cuda or cuda:N
        #[setting(value_name("DEVICE"))]
        pub device: DeviceSpec = DeviceSpec::Auto,
        /// The linear layers' products: f32, or bf16 (mixed precision: bf16 operands, f32
        /// sums, in the backbone's linear layers and on the CPU the adapters' too; layer norms,
        /// attention, the adapters' weights and gradients and the optimiser stay f32). bf16 runs
        /// on GPU tensor cores, and on CPUs with Intel AMX or AVX512-BF16 (AMD Zen 4 and later,
        /// Intel Cooper Lake and later); other CPUs compute the same products at f32 speed
        pub precision: Precision = Precision::F32,
        /// The CPU kernel of bf16 products [default: the fastest this CPU has] (for tests and
        /// A/B measurements; HARMA_AMX=0 leaves AMX out of the default)
        #[setting(value_name("KERNEL"), env("HARMA_BF16_KERNEL"))]
        pub bf16_kernel: Option<Bf16Kernel> = None,
    }
}

impl ComputeSettings {
    /// The compute setting these settings ask for on this machine (chosen once, here). A
    /// bf16 kernel this CPU lacks is a warning, and the fastest it has is used.
    pub fn compute(&self) -> anyhow::Result<Compute> {
        let mut compute = Compute::new(self.device.device()?, self.precision);
        match self.bf16_kernel {
            Some(k) if k.available() => compute = compute.with_bf16_kernel(k),
            Some(k) => eprintln!(
                "warning: --bf16-kernel {k}: this CPU has no {k} kernel; choosing the fastest \
                 it has ({})",
                compute.bf16
            ),
            None => {}
        }
        Ok(compute)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_gets_fused_kernels_and_the_best_bf16_kernel_it_has() {
        let c = Compute::cpu();
        assert_eq!((c.kernels, c.precision), (Kernels::Fused, Precision::F32));
        assert!(c.bf16.available());
        // the first available kernel in speed order, whatever the environment says
        let first = Bf16Kernel::ALL.into_iter().find(|k| k.available()).unwrap();
        assert_eq!(c.bf16, first);
        for k in Bf16Kernel::ALL {
            assert_eq!(Bf16Kernel::from_name(k.name()), Some(k));
        }
        assert!(Bf16Kernel::F32.available());
        assert_eq!(
            c.clone().with_kernels(Kernels::Generic).kernels,
            Kernels::Generic
        );
        assert!(c.describe().starts_with("cpu ("), "{}", c.describe());
    }

    #[test]
    fn device_specs() {
        let parse = |s: &str| s.parse::<DeviceSpec>().and_then(|d| d.device());
        assert!(parse("cpu").unwrap().is_cpu());
        if !candle_core::utils::cuda_is_available() {
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

    #[test]
    fn compute_settings_name_their_choices_and_pick_an_available_kernel() {
        harma_settings::check_choices::<Precision>().unwrap();
        harma_settings::check_choices::<Bf16Kernel>().unwrap();
        for k in Bf16Kernel::ALL {
            let s = ComputeSettings {
                device: DeviceSpec::Cpu,
                bf16_kernel: Some(k),
                ..Default::default()
            };
            let c = s.compute().unwrap();
            assert_eq!(c.bf16 == k, k.available(), "{k}");
            assert!(c.bf16.available());
        }
    }
}
