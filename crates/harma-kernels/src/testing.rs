//! What the kernel tests run: every kernel this CPU has, each forced in turn, and never a
//! silent skip of one that must run.
//!
//! A test of the bf16 kernels runs each of [`bf16_kernels`]; a test of the vectorised row
//! kernels runs each of [`simd_levels`]. A kernel this CPU lacks is not run, unless
//! `HARMA_REQUIRE_KERNELS` names it (a comma-separated list of `amx`, `avx512bf16`, `f32`,
//! `avx512`, `avx2`, `baseline`): then every test that would run it fails, so a machine meant
//! to test a kernel cannot pass without running it. Only tests call these.

use crate::compute::Bf16Kernel;
use crate::raw::simd::SimdLevel;

/// The variable that names the kernels a test run must have.
pub const REQUIRE_VAR: &str = "HARMA_REQUIRE_KERNELS";

/// The kernel names `HARMA_REQUIRE_KERNELS` lists (an unknown name is a failure).
fn required() -> Vec<String> {
    let list = std::env::var(REQUIRE_VAR).unwrap_or_default();
    let names: Vec<String> = list
        .split(',')
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect();
    for n in &names {
        let known =
            Bf16Kernel::from_name(n).is_some() || SimdLevel::ALL.iter().any(|l| l.name() == n);
        assert!(
            known,
            "{REQUIRE_VAR}={list}: `{n}` is not a kernel (amx, avx512bf16, f32, avx512, \
             avx2, baseline)"
        );
    }
    names
}

/// The kernels of `all` that this CPU has; a required one it lacks is a failure.
fn under_test<K: Copy>(
    all: &[K],
    name: impl Fn(K) -> &'static str,
    available: impl Fn(K) -> bool,
) -> Vec<K> {
    let required = required();
    all.iter()
        .copied()
        .filter(|&k| {
            let has = available(k);
            assert!(
                has || !required.iter().any(|r| r == name(k)),
                "{REQUIRE_VAR} names `{}`, which this CPU (or OS) lacks",
                name(k)
            );
            has
        })
        .collect()
}

/// The bf16 kernels to test: every one this CPU has (the f32 fallback always).
pub fn bf16_kernels() -> Vec<Bf16Kernel> {
    under_test(&Bf16Kernel::ALL, Bf16Kernel::name, Bf16Kernel::available)
}

/// The vector levels to test the row kernels at: every one this CPU has (the baseline
/// always).
pub fn simd_levels() -> Vec<SimdLevel> {
    under_test(&SimdLevel::ALL, SimdLevel::name, SimdLevel::available)
}

/// Whether a test of `kernel` alone runs here: whether this CPU has it (a required one it
/// lacks is a failure).
pub fn runs(kernel: Bf16Kernel) -> bool {
    bf16_kernels().contains(&kernel)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fallbacks_are_always_tested() {
        assert!(bf16_kernels().contains(&Bf16Kernel::F32));
        assert!(simd_levels().contains(&SimdLevel::Baseline));
        // and the best of each is among them
        assert!(simd_levels().contains(&SimdLevel::best()));
        assert!(
            bf16_kernels().contains(&Bf16Kernel::ALL.into_iter().find(|k| k.available()).unwrap())
        );
    }
}
