//! One training step's loss and gradients, either through Candle's backward over the whole
//! graph, or recomputing one block at a time (`--recompute`): the forward pass keeps only each
//! block's input, and the backward re-runs each block, last first, to get its gradients. That
//! holds the activations of one block instead of all 24, for one more forward pass.

use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use harma_adapters::HarmaAdapters;
use harma_clip::{Clip, Tower};
use harma_loss::{harma_loss, LossConfig, LossTerms};

/// The loss terms and the gradients of `params` (the adapters' variables and `temp`).
pub fn loss_and_grads(
    model: &Clip,
    adapters: &HarmaAdapters,
    params: &[Tensor],
    (pixels, ids): (&Tensor, &Tensor),
    image_ids: &[i64],
    cfg: &LossConfig,
    recompute: bool,
) -> Result<(LossTerms, GradStore)> {
    if !recompute {
        let img = model.encode_image(pixels, Some(adapters))?;
        let txt = model.encode_text(ids, Some(adapters))?;
        let terms = harma_loss(&img, &txt, &adapters.temp, image_ids, cfg)?;
        let grads = terms.total.backward()?;
        return Ok((terms, grads));
    }
    let vision = model.forward_saving(Tower::Vision, pixels, Some(adapters))?;
    let text = model.forward_saving(Tower::Text, ids, Some(adapters))?;
    let (v_out, t_out) = (
        Var::from_tensor(vision.last())?,
        Var::from_tensor(text.last())?,
    );
    let img = harma_clip::ops::l2_normalize(&model.head(&vision, v_out.as_tensor())?)?;
    let txt = harma_clip::ops::l2_normalize(&model.head(&text, t_out.as_tensor())?)?;
    let terms = harma_loss(&img, &txt, &adapters.temp, image_ids, cfg)?;
    let mut grads = terms.total.backward()?;
    for (saved, out) in [(&vision, &v_out), (&text, &t_out)] {
        let g = grads
            .remove(out.as_tensor())
            .ok_or_else(|| anyhow::anyhow!("no gradient reached the {:?} tower", saved.tower))?;
        model.backward_blocks(saved, g, Some(adapters), params, &mut grads)?;
    }
    Ok((terms, grads))
}
