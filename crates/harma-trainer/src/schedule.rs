//! Learning-rate schedules, stepped per batch (HarMA `scheduler.py`, LambdaLR): linear warm-up
//! then linear decay to 0, or constant. Update k (k = 0, 1, ...) of T uses `lr * k / W` while
//! k < W (so with warm-up the first update uses lr 0), then `lr * (T - k) / (T - W)`.

/// How the learning rate moves over training.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    /// Warm-up over `warmup` updates, then linear decay to 0 at `total`.
    Linear {
        warmup: usize,
        total: usize,
    },
    Constant,
}

impl Schedule {
    /// Warm-up over a fraction of `total` updates (HarMA: 0.1), rounded down.
    pub fn linear(total: usize, warmup_fraction: f64) -> Self {
        Schedule::Linear {
            warmup: (total as f64 * warmup_fraction) as usize,
            total,
        }
    }

    /// The learning rate of update `k` (0-based) for a peak of `lr`.
    pub fn lr(&self, lr: f64, k: usize) -> f64 {
        match *self {
            Schedule::Constant => lr,
            Schedule::Linear { warmup, total } => {
                if k < warmup {
                    lr * k as f64 / warmup as f64
                } else if total > warmup {
                    lr * (total.saturating_sub(k)) as f64 / (total - warmup) as f64
                } else {
                    0.0
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_linear_decay_as_lambdalr() {
        let s = Schedule::linear(100, 0.1);
        assert_eq!(
            s,
            Schedule::Linear {
                warmup: 10,
                total: 100
            }
        );
        assert_eq!(s.lr(4e-4, 0), 0.0);
        assert!((s.lr(4e-4, 5) - 2e-4).abs() < 1e-12);
        assert!((s.lr(4e-4, 10) - 4e-4).abs() < 1e-12);
        assert!((s.lr(4e-4, 55) - 2e-4).abs() < 1e-12);
        assert!((s.lr(4e-4, 99) - 4e-4 / 90.0).abs() < 1e-12);
        assert_eq!(s.lr(4e-4, 100), 0.0);
        assert_eq!(Schedule::Constant.lr(4e-6, 1234), 4e-6);
        // no warm-up: the first update uses the full rate
        assert_eq!(Schedule::linear(10, 0.0).lr(1.0, 0), 1.0);
    }
}
