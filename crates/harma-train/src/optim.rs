//! AdamW as HarMA trains with it (transformers 4.x `AdamW`, which is not `torch.optim.AdamW`):
//! `eps` is added to the uncorrected `sqrt(v)`, both bias corrections are folded into the step
//! size `lr * sqrt(1 - b2^t) / (1 - b1^t)`, and the decoupled decay `p -= lr * wd * p` is applied
//! after the update. PyTorch's variant is an option. No decay for tensors whose name contains
//! `bias` (HarMA `optim.py`); gates and `temp` are decayed.

use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

/// Which AdamW update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdamWVariant {
    /// transformers 4.x `AdamW` (the original's; default)
    Transformers,
    /// `torch.optim.AdamW`
    Torch,
}

#[derive(Debug, Clone)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub variant: AdamWVariant,
}

impl Default for AdamWConfig {
    /// HarMA's settings: betas (0.9, 0.98), eps 1e-8, weight decay 0.04.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-8,
            weight_decay: 0.04,
            variant: AdamWVariant::Transformers,
        }
    }
}

struct Param {
    name: String,
    var: Var,
    decay: bool,
    m: Tensor,
    v: Tensor,
}

/// Write the trained tensors to `path` (safetensors, atomically) under the original's names:
/// `model.` + the open_clip key for adapters and gates, `temp` as is, so PyTorch HarMA can
/// `load_state_dict(..., strict=False)` them and `harma --adapters` reads them back.
pub fn save_trained(path: &std::path::Path, vars: &[(String, Var)]) -> Result<()> {
    let named: Vec<(String, Tensor)> = vars
        .iter()
        .map(|(n, v)| {
            let key = if n == "temp" {
                n.clone()
            } else {
                format!("model.{n}")
            };
            (key, v.as_tensor().clone())
        })
        .collect();
    let refs: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), t)).collect();
    crate::output::write_safetensors(path, &refs, Default::default())
}

/// The optimiser over named trainable tensors.
pub struct AdamW {
    cfg: AdamWConfig,
    params: Vec<Param>,
    /// updates done so far
    pub step: usize,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                Ok(Param {
                    decay: !name.contains("bias"),
                    m: var.as_tensor().zeros_like()?,
                    v: var.as_tensor().zeros_like()?,
                    name,
                    var,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            cfg,
            params,
            step: 0,
        })
    }

    /// Scale all gradients so their global L2 norm is at most `max_norm`; returns the norm
    /// before clipping.
    pub fn clip_grad_norm(&self, grads: &mut GradStore, max_norm: f64) -> Result<f64> {
        let mut total = 0f64;
        for p in &self.params {
            if let Some(g) = grads.get(p.var.as_tensor()) {
                total += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            }
        }
        let norm = total.sqrt();
        if norm > max_norm {
            let scale = max_norm / (norm + 1e-6);
            for p in &self.params {
                if let Some(g) = grads.remove(p.var.as_tensor()) {
                    grads.insert(p.var.as_tensor(), (g * scale)?);
                }
            }
        }
        Ok(norm)
    }

    /// One update at learning rate `lr`. A tensor without a gradient is an error: it would
    /// silently stop training (Candle drops gradients at ops without a backward).
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let c = &self.cfg;
        let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        for p in &mut self.params {
            let g = grads
                .get(p.var.as_tensor())
                .ok_or_else(|| anyhow::anyhow!("no gradient reached `{}`", p.name))?;
            p.m = ((&p.m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            p.v = ((&p.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let w = p.var.as_tensor();
            let decay = if p.decay { c.weight_decay } else { 0.0 };
            let updated = match c.variant {
                AdamWVariant::Transformers => {
                    let step_size = lr * bc2.sqrt() / bc1;
                    let upd = (&p.m / (p.v.sqrt()? + c.eps)?)?;
                    let w = (w - (upd * step_size)?)?;
                    (&w - (&w * (lr * decay))?)?
                }
                AdamWVariant::Torch => {
                    let w = (w * (1.0 - lr * decay))?;
                    let mhat = (&p.m / bc1)?;
                    let vhat = (&p.v / bc2)?;
                    (w - ((mhat / (vhat.sqrt()? + c.eps)?)? * lr)?)?
                }
            };
            p.var.set(&updated)?;
        }
        Ok(())
    }
}
