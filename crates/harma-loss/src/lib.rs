//! HarMA's objective on L2-normalised image and text embeddings (`S = I T^T`, one row per pair):
//! the contrastive loss with soft targets over pairs of the same image and a trainable
//! temperature, plus the adaptive (focal-weighted) triplet loss; the plain VSE triplet loss
//! (sum or hardest negative) as an option. Written with differentiable Candle ops only.
//!
//! Reference: HarMA `models/harma.py`, `HarMABase.get_contr_loss`, `weighted_triplet_loss`,
//! `get_triplet_loss` (<https://github.com/seekerhuang/HarMA>).

#![forbid(unsafe_code)]

use candle_core::{DType, Device, Tensor, D};

/// Errors of the loss crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Msg(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Which triplet term the objective adds.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Triplet {
    /// `(sum cs * (1 - e^-cs)^gamma + sum ci * (1 - e^-ci)^gamma) / 2` (the released default)
    Adaptive {
        margin: f64,
        gamma: f64,
        max_violation: bool,
    },
    /// VSE++: `sum cs + sum ci`, or the hardest negative of each row/column
    Plain {
        margin: f64,
        max_violation: bool,
    },
    None,
}

/// The objective's settings; the default is the released HarMA objective.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossConfig {
    pub contrastive_weight: f64,
    pub triplet_weight: f64,
    pub triplet: Triplet,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            contrastive_weight: 1.0,
            triplet_weight: 1.0,
            triplet: Triplet::Adaptive {
                margin: 0.2,
                gamma: 2.0,
                max_violation: false,
            },
        }
    }
}

/// The loss terms of one batch (scalar tensors, differentiable).
#[derive(Debug, Clone)]
pub struct LossTerms {
    pub total: Tensor,
    pub contrastive: Tensor,
    pub triplet: Tensor,
}

/// `P[i][j] = 1 / n_i` where pairs i and j show the same image (n_i such pairs), else 0.
pub fn soft_targets(image_ids: &[i64], device: &Device) -> Result<Tensor> {
    let n = image_ids.len();
    let mut p = vec![0f32; n * n];
    for (i, a) in image_ids.iter().enumerate() {
        let same: Vec<usize> = (0..n).filter(|&j| image_ids[j] == *a).collect();
        for j in &same {
            p[i * n + j] = 1.0 / same.len() as f32;
        }
    }
    Ok(Tensor::from_vec(p, (n, n), device)?)
}

/// Mean over rows of the cross-entropy of `log_softmax(logits)` against `targets`.
fn soft_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    Ok((logp * targets)?.sum(D::Minus1)?.neg()?.mean_all()?)
}

/// Contrastive loss: `S / temp` against same-image soft targets, both directions, averaged.
/// `img`, `txt`: [n, d] normalised; `temp`: scalar; `image_ids`: one per pair.
pub fn contrastive(img: &Tensor, txt: &Tensor, temp: &Tensor, image_ids: &[i64]) -> Result<Tensor> {
    let logits = img.matmul(&txt.t()?)?.broadcast_div(temp)?;
    let targets = soft_targets(image_ids, img.device())?;
    let i2t = soft_cross_entropy(&logits, &targets)?;
    let t2i = soft_cross_entropy(&logits.t()?, &targets)?;
    Ok(((i2t + t2i)? / 2.0)?)
}

/// The two hinge cost matrices with the diagonal zeroed: `cs[i][j] = max(0, m + S_ij - S_ii)`
/// (image i against caption j) and `ci[i][j] = max(0, m + S_ij - S_jj)`.
fn hinge_costs(img: &Tensor, txt: &Tensor, margin: f64) -> Result<(Tensor, Tensor)> {
    let s = img.matmul(&txt.t()?)?; // [n, n]
    let n = s.dim(0)?;
    let eye = Tensor::eye(n, DType::F32, s.device())?;
    let off_diag = (1.0 - &eye)?;
    let diag = (&s * &eye)?.sum(D::Minus1)?; // [n]
    let d1 = diag.reshape((n, 1))?;
    let d2 = diag.reshape((1, n))?;
    let cs = (s.broadcast_sub(&d1)? + margin)?.relu()?.mul(&off_diag)?;
    let ci = (s.broadcast_sub(&d2)? + margin)?.relu()?.mul(&off_diag)?;
    Ok((cs, ci))
}

/// Sum of both cost matrices, or of each row's (cs) and column's (ci) largest cost.
fn reduce_costs(cs: &Tensor, ci: &Tensor, max_violation: bool) -> Result<Tensor> {
    Ok(if max_violation {
        (cs.max(1)?.sum_all()? + ci.max(0)?.sum_all()?)?
    } else {
        (cs.sum_all()? + ci.sum_all()?)?
    })
}

/// The adaptive triplet loss: each cost weighted by `(1 - e^-cost)^gamma`, summed, halved.
pub fn adaptive_triplet(
    img: &Tensor,
    txt: &Tensor,
    margin: f64,
    gamma: f64,
    max_violation: bool,
) -> Result<Tensor> {
    let (cs, ci) = hinge_costs(img, txt, margin)?;
    let weigh = |c: &Tensor| -> Result<Tensor> {
        let w = (1.0 - c.neg()?.exp()?)?.powf(gamma)?;
        Ok((w * c)?)
    };
    let total = reduce_costs(&weigh(&cs)?, &weigh(&ci)?, max_violation)?;
    Ok((total / 2.0)?)
}

/// The plain VSE triplet loss (not halved, as in the original).
pub fn plain_triplet(
    img: &Tensor,
    txt: &Tensor,
    margin: f64,
    max_violation: bool,
) -> Result<Tensor> {
    let (cs, ci) = hinge_costs(img, txt, margin)?;
    reduce_costs(&cs, &ci, max_violation)
}

/// The whole objective for one batch.
pub fn harma_loss(
    img: &Tensor,
    txt: &Tensor,
    temp: &Tensor,
    image_ids: &[i64],
    cfg: &LossConfig,
) -> Result<LossTerms> {
    if img.dims() != txt.dims() || img.dim(0)? != image_ids.len() {
        return Err(Error::Msg(format!(
            "loss: image {:?}, text {:?} and {} image ids do not line up",
            img.dims(),
            txt.dims(),
            image_ids.len()
        )));
    }
    let contrastive = contrastive(img, txt, temp, image_ids)?;
    let triplet = match cfg.triplet {
        Triplet::Adaptive {
            margin,
            gamma,
            max_violation,
        } => adaptive_triplet(img, txt, margin, gamma, max_violation)?,
        Triplet::Plain {
            margin,
            max_violation,
        } => plain_triplet(img, txt, margin, max_violation)?,
        Triplet::None => Tensor::zeros((), DType::F32, img.device())?,
    };
    let total = ((&contrastive * cfg.contrastive_weight)? + (&triplet * cfg.triplet_weight)?)?;
    Ok(LossTerms {
        total,
        contrastive,
        triplet,
    })
}
