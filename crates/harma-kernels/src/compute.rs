//! The explicit compute setting: where the tensors live, the precision of the frozen linear
//! layers, which implementation the layers run, and which CPU kernel multiplies in bf16.
//!
//! It is chosen once, from the flags and the machine ([`Compute::new`]), passed by value to
//! the model, and copied into every layer it builds: the kernel a tensor runs through is decided
//! by the layer's own settings, never by a thread-local or a process-wide flag, so it is the
//! same on every thread (both towers of a training step run side by side).

use candle_core::{DType, Device};

/// The precision of the frozen backbone's linear layers (`--precision`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bf16Kernel {
    /// Intel AMX tiles (`TDPBF16PS`): Xeon 4th generation and later
    Amx,
    /// AVX512-BF16 (`VDPBF16PS`): AMD Zen 4 and later, Intel Cooper Lake and later
    Avx512,
    /// The f32 GEMM on bf16-rounded operands: every CPU, at f32 speed
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

    /// The fastest kernel this machine has, or the one `HARMA_BF16_KERNEL` names
    /// (`amx`, `avx512bf16`, `f32`: for tests and A/B measurements; it must be available);
    /// `HARMA_AMX=0` turns AMX off. Read once, where a [`Compute`] is made at start-up.
    pub fn detect() -> Self {
        if let Ok(name) = std::env::var("HARMA_BF16_KERNEL") {
            match Self::from_name(&name) {
                Some(k) if k.available() => return k,
                Some(k) => eprintln!(
                    "warning: HARMA_BF16_KERNEL={name}: this CPU has no {k} kernel; choosing \
                     the fastest it has"
                ),
                None => eprintln!(
                    "warning: HARMA_BF16_KERNEL={name}: expected amx, avx512bf16 or f32; \
                     choosing the fastest kernel this CPU has"
                ),
            }
        }
        let amx_allowed = std::env::var("HARMA_AMX").map_or(true, |v| v != "0");
        Self::ALL
            .into_iter()
            .find(|k| (*k != Bf16Kernel::Amx || amx_allowed) && k.available())
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
    /// the backend's ops elsewhere, the fastest bf16 kernel the CPU has.
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
            bf16: Bf16Kernel::detect(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_gets_fused_kernels_and_the_best_bf16_kernel_it_has() {
        let c = Compute::cpu();
        assert_eq!((c.kernels, c.precision), (Kernels::Fused, Precision::F32));
        assert!(c.bf16.available());
        // the first available kernel in speed order, unless turned off or forced
        let first = Bf16Kernel::ALL.into_iter().find(|k| k.available()).unwrap();
        let overridden = std::env::var_os("HARMA_BF16_KERNEL").is_some()
            || std::env::var("HARMA_AMX").as_deref() == Ok("0");
        if !overridden {
            assert_eq!(c.bf16, first);
        }
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
}
