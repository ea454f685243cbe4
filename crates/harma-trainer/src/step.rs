//! One training step's loss and gradients, one of three ways:
//! - kept activations (the default on the CPU's fused kernels): the forward pass runs outside
//!   any graph and keeps, per block, its input and what the frozen branches' backward needs;
//!   the backward goes block by block, last first, running only the adapters again in a graph.
//! - recompute (`--recompute`): the forward pass keeps only each block's input, and the
//!   backward re-runs each block to get its gradients: the activations of one block instead of
//!   all 24, for one more forward pass.
//! - Candle's backward over the whole graph, where the fused kernels do not apply (a GPU,
//!   GELU, generic ops).

use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use harma_adapters::HarmaAdapters;
use harma_clip::{Clip, Tower};
use harma_loss::{harma_loss, LossConfig, LossTerms};

use harma_dist::{Collective, Single};

/// The loss terms and the gradients of `params` (the adapters' variables and `temp`).
pub fn loss_and_grads(
    model: &Clip,
    adapters: &HarmaAdapters,
    params: &[Tensor],
    inputs: (&Tensor, &Tensor),
    image_ids: &[i64],
    cfg: &LossConfig,
    recompute: bool,
) -> Result<(LossTerms, GradStore)> {
    loss_and_grads_on(
        model, adapters, params, inputs, image_ids, cfg, recompute, &Single,
    )
}

/// [`loss_and_grads`] for this rank's shard of a global batch (`coll`: the ranks; one rank
/// is [`loss_and_grads`]): the loss is over every rank's embeddings, gathered, and the
/// returned gradients are the same on every rank: the gradients of that loss, as one process
/// with the whole global batch would compute them, up to f32 summation order.
///
/// The original (`torch.distributed` with `AllGather` and DDP) averages over the ranks the
/// gradients each rank reaches through its own rows, which is the one-process gradient
/// divided by the number of ranks for the adapters (but not for `temp`, which every rank
/// reaches whole through the loss). Here each rank's own-rows gradient is scaled by the
/// number of ranks before the average, so that it is the one-process gradient exactly; AdamW
/// is invariant to that scale but for its `eps` (docs/DISTRIBUTED.md).
#[allow(clippy::too_many_arguments)]
pub fn loss_and_grads_on(
    model: &Clip,
    adapters: &HarmaAdapters,
    params: &[Tensor],
    (pixels, ids): (&Tensor, &Tensor),
    image_ids: &[i64],
    cfg: &LossConfig,
    recompute: bool,
    coll: &dyn Collective,
) -> Result<(LossTerms, GradStore)> {
    let keep_acts = !recompute;
    if keep_acts && !model.keeps_activations() {
        let img = model.encode_image(pixels, Some(adapters))?;
        let txt = model.encode_text(ids, Some(adapters))?;
        let (terms, mut grads) = global_loss(&img, &txt, adapters, image_ids, cfg, coll)?;
        if let Some(mut local) = grads.own_rows {
            for p in params {
                if let Some(g) = local.remove(p) {
                    add_grad(&mut grads.store, p, g)?;
                }
            }
        }
        return reduce(coll, params, terms, grads.store);
    }
    // the towers are independent until the loss: run them side by side, so that one tower's
    // serial stretches (small ops, graph bookkeeping) overlap the other's parallel kernels
    let (vision, text) = rayon::join(
        || model.forward_saving(Tower::Vision, pixels, Some(adapters), keep_acts),
        || model.forward_saving(Tower::Text, ids, Some(adapters), keep_acts),
    );
    let (vision, text) = (vision?, text?);
    let (v_out, t_out) = (
        Var::from_tensor(vision.last())?,
        Var::from_tensor(text.last())?,
    );
    let img = harma_kernels::nn::l2_normalize(&model.head(&vision, v_out.as_tensor())?)?;
    let txt = harma_kernels::nn::l2_normalize(&model.head(&text, t_out.as_tensor())?)?;
    let (terms, loss_grads) = global_loss(&img, &txt, adapters, image_ids, cfg, coll)?;
    let (mut grads, mut own_rows) = (loss_grads.store, loss_grads.own_rows);
    // with several ranks, the last blocks' gradients come from this rank's rows' backward
    let mut tower_grad = |saved: &harma_clip::SavedTower, out: &Var| {
        let from = match own_rows.as_mut() {
            Some(local) => local,
            None => &mut grads,
        };
        from.remove(out.as_tensor())
            .ok_or_else(|| anyhow::anyhow!("no gradient reached the {:?} tower", saved.tower))
    };
    let (g_v, g_t) = (tower_grad(&vision, &v_out)?, tower_grad(&text, &t_out)?);
    let (from_v, from_t) = rayon::join(
        || model.backward_blocks(&vision, g_v, Some(adapters), params),
        || model.backward_blocks(&text, g_t, Some(adapters), params),
    );
    for (p, (a, b)) in params.iter().zip(from_v?.into_iter().zip(from_t?)) {
        // a parameter shared by the towers gets both; the loss may have given it one too
        for g in [a, b].into_iter().flatten() {
            add_grad(&mut grads, p, g)?;
        }
    }
    reduce(coll, params, terms, grads)
}
/// The backward of the loss over the global batch.
struct GlobalLoss {
    /// The loss's own backward: `temp`'s gradient, and with one rank the gradients through
    /// the embeddings' graph (the towers).
    store: GradStore,
    /// With several ranks: the backward, through this rank's embeddings' graph, of the loss's
    /// gradient at this rank's rows (times the number of ranks).
    own_rows: Option<GradStore>,
}

/// The loss of the global batch and its backward. One rank: on `img` and `txt` themselves.
/// Several: on every rank's embeddings (and image ids) gathered, each rank backpropagating
/// through its own embeddings the gradient at its rows, scaled by the number of ranks (so
/// that their average is the one-process gradient; see [`loss_and_grads_on`]).
fn global_loss(
    img: &Tensor,
    txt: &Tensor,
    adapters: &HarmaAdapters,
    image_ids: &[i64],
    cfg: &LossConfig,
    coll: &dyn Collective,
) -> Result<(LossTerms, GlobalLoss)> {
    if coll.world() == 1 {
        let terms = harma_loss(img, txt, &adapters.temp, image_ids, cfg)?;
        let store = terms.total.backward()?;
        return Ok((
            terms,
            GlobalLoss {
                store,
                own_rows: None,
            },
        ));
    }
    let ids = Tensor::new(image_ids, &candle_core::Device::Cpu)?;
    let ids_all: Vec<i64> = coll.all_gather(&ids)?.to_vec1()?;
    let all_img = Var::from_tensor(&coll.all_gather(&img.detach())?)?;
    let all_txt = Var::from_tensor(&coll.all_gather(&txt.detach())?)?;
    let terms = harma_loss(
        all_img.as_tensor(),
        all_txt.as_tensor(),
        &adapters.temp,
        &ids_all,
        cfg,
    )?;
    let mut store = terms.total.backward()?;
    let (b, rank, world) = (img.dim(0)?, coll.rank(), coll.world() as f64);
    let mut own = |all: &Var| -> Result<Tensor> {
        let g = store
            .remove(all.as_tensor())
            .ok_or_else(|| anyhow::anyhow!("no gradient reached the gathered embeddings"))?;
        Ok((g.narrow(0, rank * b, b)? * world)?)
    };
    let (g_img, g_txt) = (own(&all_img)?, own(&all_txt)?);
    let seed = ((img * &g_img)?.sum_all()? + (txt * &g_txt)?.sum_all()?)?;
    let own_rows = Some(seed.backward()?);
    Ok((terms, GlobalLoss { store, own_rows }))
}

/// Add `g` to `p`'s gradient in `grads`.
fn add_grad(grads: &mut GradStore, p: &Tensor, g: Tensor) -> Result<()> {
    let total = match grads.remove(p) {
        Some(t) => (t + g)?,
        None => g,
    };
    grads.insert(p, total);
    Ok(())
}

/// With several ranks, every parameter's gradient averaged over them (the same on every
/// rank afterwards).
fn reduce(
    coll: &dyn Collective,
    params: &[Tensor],
    terms: LossTerms,
    mut grads: GradStore,
) -> Result<(LossTerms, GradStore)> {
    if coll.world() > 1 {
        let mine = params
            .iter()
            .map(|p| {
                grads
                    .get(p)
                    .cloned()
                    .ok_or_else(|| anyhow::anyhow!("no gradient reached a trained tensor"))
            })
            .collect::<Result<Vec<_>>>()?;
        for (p, g) in params.iter().zip(coll.all_reduce_mean(&mine)?) {
            grads.insert(p, g);
        }
    }
    Ok((terms, grads))
}

/// How closely one set of gradients follows a reference set, tensor by tensor.
///
/// A per-tensor "largest error over largest value" misjudges tensors whose gradient is a sum
/// with heavy cancellation (a scalar gate's gradient can be tiny next to its terms), so the
/// error is taken relative to the norm of all the reference gradients together, and each
/// tensor's direction is judged by its cosine to the reference.
#[derive(Debug, Clone, PartialEq)]
pub struct GradAgreement {
    /// ||got - want|| / ||want|| over all tensors together.
    pub rel_err: f64,
    /// The lowest cosine of any tensor with more than one element (a scalar's is ±1).
    pub worst_cosine: f64,
    /// The tensor with that cosine.
    pub worst_tensor: String,
    /// How many tensors were compared.
    pub tensors: usize,
}

impl GradAgreement {
    /// Compares `got` with `want`, pairs of (name, gradient) in the same order. A reference
    /// gradient that is all zero is an error: the comparison would prove nothing.
    pub fn measure<'a>(
        pairs: impl IntoIterator<Item = (&'a str, &'a Tensor, &'a Tensor)>,
    ) -> Result<Self> {
        let (mut diff2, mut norm2) = (0f64, 0f64);
        let mut out = GradAgreement {
            rel_err: 0.0,
            worst_cosine: 1.0,
            worst_tensor: String::new(),
            tensors: 0,
        };
        for (name, got, want) in pairs {
            anyhow::ensure!(
                got.dims() == want.dims(),
                "gradient of {name}: shape {:?} against {:?}",
                got.dims(),
                want.dims()
            );
            let g = got.flatten_all()?.to_dtype(candle_core::DType::F64)?;
            let w = want.flatten_all()?.to_dtype(candle_core::DType::F64)?;
            let gw = (&g * &w)?.sum_all()?.to_scalar::<f64>()?;
            let gg = g.sqr()?.sum_all()?.to_scalar::<f64>()?;
            let ww = w.sqr()?.sum_all()?.to_scalar::<f64>()?;
            anyhow::ensure!(
                ww > 0.0,
                "the reference gradient of {name} is zero: the check would prove nothing"
            );
            anyhow::ensure!(gg > 0.0, "the gradient of {name} is zero");
            diff2 += (&g - &w)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
            norm2 += ww;
            let cos = gw / (gg * ww).sqrt();
            if w.elem_count() > 1 && (cos < out.worst_cosine || out.worst_tensor.is_empty()) {
                out.worst_cosine = cos;
                out.worst_tensor = name.to_string();
            }
            out.tensors += 1;
        }
        anyhow::ensure!(out.tensors > 0, "no gradients to compare");
        out.rel_err = (diff2 / norm2).sqrt();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn grad_agreement_is_norm_relative_and_skips_scalar_cosines() -> Result<()> {
        let t = |v: &[f32]| Tensor::new(v, &Device::Cpu);
        let (g1, w1) = (t(&[3.0, 4.5])?, t(&[3.0, 4.0])?);
        // a scalar whose gradient is off by 100% but tiny next to the others
        let (g2, w2) = (t(&[2e-3])?, t(&[1e-3])?);
        let a = GradAgreement::measure([("v", &g1, &w1), ("s", &g2, &w2)])?;
        // ||(0, 0.5, 1e-3)|| / ||(3, 4, 1e-3)||
        let want = ((0.25f64 + 1e-6) / (25.0 + 1e-6)).sqrt();
        assert!((a.rel_err - want).abs() < 1e-7, "{a:?}");
        // (9 + 18) / (5 * sqrt(9 + 20.25))
        assert!((a.worst_cosine - 27.0 / (5.0 * 29.25f64.sqrt())).abs() < 1e-7);
        assert_eq!((a.worst_tensor.as_str(), a.tensors), ("v", 2));
        let zero = t(&[0.0, 0.0])?;
        let err = GradAgreement::measure([("z", &g1, &zero)]).unwrap_err();
        assert!(err.to_string().contains("reference gradient of z is zero"));
        let err = GradAgreement::measure([("v", &g2, &w1)]).unwrap_err();
        assert!(err.to_string().contains("shape"), "{err}");
        Ok(())
    }
}
