//! bf16 rounding: f32 -> bf16 bits with round-to-nearest-even, as `half` and PyTorch do.

/// f32 -> bf16 bits, rounding to nearest even (as `half::bf16::from_f32`, branch-free so
/// that the packing loops vectorise); NaN stays NaN.
#[inline(always)]
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
    if x.is_nan() {
        ((b >> 16) as u16) | 0x40
    } else {
        rounded
    }
}

/// Rounds to the nearest bf16 (ties to even) and back to f32.
#[inline(always)]
pub fn round_bf16(x: f32) -> f32 {
    f32::from_bits((bf16_bits(x) as u32) << 16)
}

/// bf16 bits back to f32 (exact).
#[inline(always)]
pub fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_is_halfs() {
        let mut s = 7u64;
        let mut xs: Vec<f32> = (0..10_000)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2e3
            })
            .collect();
        // ties (odd and even), extremes, specials
        xs.extend([
            f32::from_bits(0x3F80_8000),
            f32::from_bits(0x3F81_8000),
            f32::MAX,
            f32::MIN_POSITIVE / 3.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ]);
        for x in xs {
            assert_eq!(bf16_bits(x), half::bf16::from_f32(x).to_bits(), "{x:e}");
            assert_eq!(round_bf16(x), half::bf16::from_f32(x).to_f32());
            assert_eq!(bf16_to_f32(bf16_bits(x)), round_bf16(x));
        }
        assert!(round_bf16(f32::NAN).is_nan());
    }
}
