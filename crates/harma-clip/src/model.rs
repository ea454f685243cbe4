//! open_clip's CLIP: a ViT image tower and a causal text tower, each ending in a projection
//! to the shared embedding space, with a hook after every block's MLP where HarMA's adapters
//! plug in.
//!
//! Reference: open_clip `src/open_clip/transformer.py` (`ResidualAttentionBlock`,
//! `VisionTransformer`, `TextTransformer`) and `model.py` (`CLIP.encode_image/encode_text`).

use candle_core::backprop::GradStore;
use candle_core::{DType, IndexOp, Tensor, Var, D};
use candle_nn::VarBuilder;
use harma_kernels::nn::{self, FrozenBranch, LayerNorm, Linear, MultiHeadAttention};
use harma_kernels::ops::backward_from;
use harma_kernels::{Compute, Precision};

use crate::checkpoint::Checkpoint;
use crate::config::{Activation, ClipConfig};
use crate::Result;

/// Which tower a block belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tower {
    Vision,
    Text,
}

/// Something that rewrites each block's MLP output before the residual add
/// (HarMA: `m = a * adapter(m) + (1 - a) * m`). `None` means plain CLIP.
pub trait BlockHook: Send + Sync {
    /// `m`: the block's MLP output [b, l, d]; returns the tensor added to the residual stream.
    fn mlp_out(&self, tower: Tower, block: usize, m: &Tensor) -> Result<Tensor>;

    /// Whether the hook mixes positions of the text sequence, so that padding after the
    /// end-of-text token changes the result and the sequence may not be shortened.
    fn reads_text_padding(&self) -> bool {
        true
    }
}

fn layer_norm(vb: &VarBuilder, dim: usize, eps: f64, compute: &Compute) -> Result<LayerNorm> {
    Ok(LayerNorm {
        weight: vb.get(dim, "weight")?,
        bias: vb.get(dim, "bias")?,
        eps,
        kernels: compute.kernels,
    })
}

fn linear(vb: &VarBuilder, out: usize, inp: usize, compute: &Compute) -> Result<Linear> {
    let (w, b) = (vb.get((out, inp), "weight")?, vb.get(out, "bias")?);
    Ok(Linear::frozen(w, Some(b), compute)?)
}

/// `x = x + attn(ln_1(x)); x = x + hook(mlp(ln_2(x)))`.
#[derive(Debug, Clone)]
pub struct ResidualBlock {
    pub ln_1: LayerNorm,
    pub attn: MultiHeadAttention,
    pub ln_2: LayerNorm,
    pub c_fc: Linear,
    pub c_proj: Linear,
    pub activation: Activation,
}

impl ResidualBlock {
    fn new(
        vb: VarBuilder,
        width: usize,
        heads: usize,
        mlp: usize,
        cfg: &ClipConfig,
        compute: &Compute,
    ) -> Result<Self> {
        let a = vb.pp("attn");
        Ok(Self {
            ln_1: layer_norm(&vb.pp("ln_1"), width, cfg.ln_eps, compute)?,
            attn: MultiHeadAttention {
                in_proj: Linear::frozen(
                    a.get((3 * width, width), "in_proj_weight")?,
                    Some(a.get(3 * width, "in_proj_bias")?),
                    compute,
                )?,
                out_proj: linear(&a.pp("out_proj"), width, width, compute)?,
                heads,
                kernels: compute.kernels,
            },
            ln_2: layer_norm(&vb.pp("ln_2"), width, cfg.ln_eps, compute)?,
            c_fc: linear(&vb.pp("mlp").pp("c_fc"), mlp, width, compute)?,
            c_proj: linear(&vb.pp("mlp").pp("c_proj"), width, mlp, compute)?,
            activation: cfg.activation,
        })
    }

    /// The block with its frozen linear layers in `compute`'s precision.
    fn with_precision(&self, compute: &Compute) -> Result<Self> {
        Ok(Self {
            attn: MultiHeadAttention {
                in_proj: self.attn.in_proj.with_precision(compute)?,
                out_proj: self.attn.out_proj.with_precision(compute)?,
                ..self.attn.clone()
            },
            c_fc: self.c_fc.with_precision(compute)?,
            c_proj: self.c_proj.with_precision(compute)?,
            ..self.clone()
        })
    }

    /// The MLP branch: c_fc, activation, c_proj. [b, l, d] -> [b, l, d]
    pub fn mlp(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.c_fc.forward(x)?;
        let h = match self.activation {
            Activation::QuickGelu => nn::quick_gelu(&h, self.c_fc.kernels)?,
            Activation::Gelu => nn::gelu(&h)?,
        };
        Ok(self.c_proj.forward(&h)?)
    }

    /// `attn(ln_1(x))` as a [`FrozenBranch`].
    fn attn_frozen(&self, causal: bool) -> FrozenBranch {
        FrozenBranch::Attention {
            ln: self.ln_1.clone(),
            attn: self.attn.clone(),
            causal,
        }
    }

    /// `mlp(ln_2(x))` as a [`FrozenBranch`], for QuickGELU.
    fn mlp_frozen(&self) -> Option<FrozenBranch> {
        (self.activation == Activation::QuickGelu).then(|| FrozenBranch::QuickGeluMlp {
            ln: self.ln_2.clone(),
            fc: self.c_fc.clone(),
            proj: self.c_proj.clone(),
        })
    }

    /// Both branches, where the fused kernels apply to both.
    fn frozen_branches(&self, causal: bool) -> Option<(FrozenBranch, FrozenBranch)> {
        let attn = self.attn_frozen(causal);
        let mlp = self.mlp_frozen()?;
        (attn.fuses() && mlp.fuses()).then_some((attn, mlp))
    }

    /// `attn(ln_1(x))`, as one fused node where [`FrozenBranch`] applies.
    fn attn_branch(&self, x: &Tensor, causal: bool) -> Result<Tensor> {
        match self.attn_frozen(causal).forward_fused(x)? {
            Some(y) => Ok(y),
            None => Ok(self.attn.forward(&self.ln_1.forward(x)?, causal)?),
        }
    }

    /// `mlp(ln_2(x))`, as one fused node where [`FrozenBranch`] applies (QuickGELU).
    fn mlp_branch(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(branch) = self.mlp_frozen() {
            if let Some(y) = branch.forward_fused(x)? {
                return Ok(y);
            }
        }
        self.mlp(&self.ln_2.forward(x)?)
    }

    /// [`ResidualBlock::forward`] on a tensor outside any graph, keeping what
    /// [`ResidualBlock::backward_kept`] needs, or `None` where the fused branches do not apply.
    fn forward_keeping(
        &self,
        x: &Tensor,
        causal: bool,
        hook: Option<(&dyn BlockHook, Tower, usize)>,
    ) -> Result<Option<(Tensor, BlockActs)>> {
        let Some((attn, mlp)) = self.frozen_branches(causal) else {
            return Ok(None);
        };
        let (a, qkv) = attn.run(x)?;
        let x1 = (x + a)?;
        let (m, hidden) = mlp.run(&x1)?;
        // the hook's graph is dropped: it holds several times the activations kept here, and
        // running the hook again in the backward costs little next to the frozen branches
        let hooked = match hook {
            Some((h, tower, i)) => h.mlp_out(tower, i, &m)?.detach(),
            None => m.clone(),
        };
        let out = (&x1 + hooked)?;
        Ok(Some((out, BlockActs { qkv, x1, hidden, m })))
    }

    /// The backward of [`ResidualBlock::forward_keeping`] from `grad` at the block's output:
    /// the hook runs again in a graph (its parameters' gradients are added into `grads`), and
    /// the frozen branches' input gradients come from the kept activations. Returns the
    /// gradient at the block's input `x` when `input_grad` is set.
    #[allow(clippy::too_many_arguments)]
    fn backward_kept(
        &self,
        x: &Tensor,
        acts: &BlockActs,
        grad: &Tensor,
        causal: bool,
        hook: Option<(&dyn BlockHook, Tower, usize)>,
        params: &[Tensor],
        grads: &mut [Option<Tensor>],
        input_grad: bool,
    ) -> Result<Option<Tensor>> {
        let g_m = match hook {
            Some((h, tower, i)) => {
                let m = Var::from_tensor(&acts.m)?;
                let hooked = h.mlp_out(tower, i, m.as_tensor())?;
                let mut local = backward_from(&hooked, grad)?;
                add_grads(params, &mut local, grads)?;
                local.remove(m.as_tensor()).ok_or_else(|| {
                    candle_core::Error::Msg(format!("block {i}: no gradient at the hook's input"))
                })?
            }
            None => grad.clone(),
        };
        if !input_grad {
            return Ok(None);
        }
        let (attn, mlp) = self.frozen_branches(causal).ok_or_else(|| {
            candle_core::Error::Msg("kept activations need fused branches".into())
        })?;
        let g_x1 = (grad + mlp.input_grad(&acts.x1, &acts.hidden, &g_m)?)?;
        Ok(Some((&g_x1 + attn.input_grad(x, &acts.qkv, &g_x1)?)?))
    }

    /// x: [b, l, d] -> [b, l, d]
    pub fn forward(
        &self,
        x: &Tensor,
        causal: bool,
        hook: Option<(&dyn BlockHook, Tower, usize)>,
    ) -> Result<Tensor> {
        let x = (x + self.attn_branch(x, causal)?)?;
        let m = self.mlp_branch(&x)?;
        let m = match hook {
            Some((h, tower, i)) => h.mlp_out(tower, i, &m)?,
            None => m,
        };
        Ok((x + m)?)
    }
}

/// The image tower.
#[derive(Debug, Clone)]
pub struct VisionTransformer {
    /// conv1 as a matrix [width, 3 * p * p] (the patch embedding is a matmul)
    pub patch_embed: Linear,
    pub class_embedding: Tensor,
    pub positional_embedding: Tensor,
    pub ln_pre: LayerNorm,
    pub blocks: Vec<ResidualBlock>,
    pub ln_post: LayerNorm,
    pub proj: Tensor,
    pub patch_size: usize,
}

impl VisionTransformer {
    fn new(vb: VarBuilder, cfg: &ClipConfig, compute: &Compute) -> Result<Self> {
        let v = &cfg.vision;
        let p = v.patch_size;
        let conv = vb.get((v.width, 3, p, p), "conv1.weight")?;
        let blocks = (0..v.layers)
            .map(|i| {
                ResidualBlock::new(
                    vb.pp(format!("transformer.resblocks.{i}")),
                    v.width,
                    v.heads,
                    v.mlp_dim,
                    cfg,
                    compute,
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            patch_embed: Linear::frozen(conv.reshape((v.width, 3 * p * p))?, None, compute)?,
            class_embedding: vb.get(v.width, "class_embedding")?,
            positional_embedding: vb.get((v.seq_len(), v.width), "positional_embedding")?,
            ln_pre: layer_norm(&vb.pp("ln_pre"), v.width, cfg.ln_eps, compute)?,
            blocks,
            ln_post: layer_norm(&vb.pp("ln_post"), v.width, cfg.ln_eps, compute)?,
            proj: vb.get((v.width, cfg.embed_dim), "proj")?,
            patch_size: p,
        })
    }

    /// The token sequence before the blocks. pixels: [b, 3, H, W] -> [b, 1 + patches, width]
    pub fn embed(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixels.dims4()?;
        let p = self.patch_size;
        let (gh, gw) = (h / p, w / p);
        // [b, c, gh, p, gw, p] -> [b, gh, gw, c, p, p]: each row one flattened patch
        let patches = pixels
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, gh * gw, c * p * p))?;
        let x = self.patch_embed.forward(&patches)?; // [b, n, width]
        let width = x.dim(2)?;
        let cls = self
            .class_embedding
            .reshape((1, 1, width))?
            .broadcast_as((b, 1, width))?;
        let x = Tensor::cat(&[&cls, &x], 1)?; // [b, n + 1, width]
        let x = x.broadcast_add(&self.positional_embedding)?;
        Ok(self.ln_pre.forward(&x)?)
    }

    /// After the blocks: the class token through ln_post and the projection.
    /// x: [b, 1 + patches, width] -> [b, embed_dim]
    pub fn head(&self, x: &Tensor) -> Result<Tensor> {
        let cls = self.ln_post.forward(&x.i((.., 0))?)?; // [b, width]
        Ok(cls.matmul(&self.proj)?)
    }

    /// pixels: [b, 3, H, W] (normalised) -> [b, embed_dim], not normalised.
    pub fn forward(&self, pixels: &Tensor, hook: Option<&dyn BlockHook>) -> Result<Tensor> {
        let mut x = self.embed(pixels)?;
        for (i, blk) in self.blocks.iter().enumerate() {
            x = blk.forward(&x, false, hook.map(|h| (h, Tower::Vision, i)))?;
        }
        self.head(&x)
    }
}

/// The text tower.
#[derive(Debug, Clone)]
pub struct TextTransformer {
    pub token_embedding: Tensor,
    pub positional_embedding: Tensor,
    pub blocks: Vec<ResidualBlock>,
    pub ln_final: LayerNorm,
    pub text_projection: Tensor,
}

impl TextTransformer {
    fn new(vb: VarBuilder, cfg: &ClipConfig, compute: &Compute) -> Result<Self> {
        let t = &cfg.text;
        let blocks = (0..t.layers)
            .map(|i| {
                ResidualBlock::new(
                    vb.pp(format!("transformer.resblocks.{i}")),
                    t.width,
                    t.heads,
                    t.mlp_dim,
                    cfg,
                    compute,
                )
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            token_embedding: vb.get((t.vocab_size, t.width), "token_embedding.weight")?,
            positional_embedding: vb.get((t.context_length, t.width), "positional_embedding")?,
            blocks,
            ln_final: layer_norm(&vb.pp("ln_final"), t.width, cfg.ln_eps, compute)?,
            text_projection: vb.get((t.width, cfg.embed_dim), "text_projection")?,
        })
    }

    /// ids: [b, context] u32 token ids (EOT = the largest id of each row) -> [b, embed_dim].
    pub fn forward(&self, ids: &Tensor, hook: Option<&dyn BlockHook>) -> Result<Tensor> {
        let (mut x, eot) = self.embed(ids, hook)?;
        for (i, blk) in self.blocks.iter().enumerate() {
            x = blk.forward(&x, true, hook.map(|h| (h, Tower::Text, i)))?;
        }
        self.head(&x, &eot)
    }

    /// The token sequence before the blocks, and each row's EOT position.
    /// ids: [b, context] -> ([b, l, width], eot), l = context, or the batch's last EOT + 1
    /// when no hook reads the padding.
    pub fn embed(&self, ids: &Tensor, hook: Option<&dyn BlockHook>) -> Result<(Tensor, Vec<u32>)> {
        let (b, ctx) = ids.dims2()?;
        // pooled at the EOT token, which open_clip finds as the argmax of the ids
        let eot = ids.argmax(D::Minus1)?; // [b]
        let eot_pos: Vec<u32> = eot.to_vec1()?;
        // The mask is causal, so positions after the last EOT of the batch cannot change the
        // pooled rows: drop them unless a hook attends over the padding.
        let l = match hook {
            Some(h) if h.reads_text_padding() => ctx,
            _ => eot_pos.iter().map(|&p| p as usize + 1).max().unwrap_or(1),
        };
        let ids = ids.narrow(1, 0, l)?;
        let x = self
            .token_embedding
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, l, ()))?;
        let x = x.broadcast_add(&self.positional_embedding.narrow(0, 0, l)?)?;
        Ok((x, eot_pos))
    }

    /// After the blocks: ln_final, the row at each EOT, the projection.
    /// x: [b, l, width] -> [b, embed_dim]
    pub fn head(&self, x: &Tensor, eot_pos: &[u32]) -> Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let x = self.ln_final.forward(x)?;
        let width = x.dim(2)?;
        // gather row eot[i] of each sequence
        let flat_idx: Vec<u32> = eot_pos
            .iter()
            .enumerate()
            .map(|(i, &p)| (i * l) as u32 + p)
            .collect();
        let idx = Tensor::from_vec(flat_idx, b, x.device())?;
        let pooled = x.reshape((b * l, width))?.index_select(&idx, 0)?; // [b, width]
        Ok(pooled.matmul(&self.text_projection)?)
    }
}

/// What a block's backward needs besides its input, kept by [`Clip::forward_saving`] when
/// it keeps activations: the packed q|k|v, the residual stream between the branches, the MLP's
/// hidden activation and its output (the hook's input).
#[derive(Debug, Clone)]
pub struct BlockActs {
    qkv: Tensor,
    x1: Tensor,
    hidden: Tensor,
    m: Tensor,
}

/// What [`Clip::forward_saving`] keeps of a tower's forward pass.
#[derive(Debug, Clone)]
pub struct SavedTower {
    pub tower: Tower,
    /// The input of every block, then the last block's output, all detached.
    pub inputs: Vec<Tensor>,
    /// Each block's activations, when kept; empty when the backward recomputes the blocks.
    pub acts: Vec<BlockActs>,
    /// Text: each row's EOT position.
    pub eot: Vec<u32>,
}

/// Moves the gradients of `params` from `local` (one block's backward) into `grads` (one
/// entry per parameter), adding to what is there.
fn add_grads(params: &[Tensor], local: &mut GradStore, grads: &mut [Option<Tensor>]) -> Result<()> {
    for (p, acc) in params.iter().zip(grads.iter_mut()) {
        if let Some(g) = local.remove(p) {
            *acc = Some(match acc.take() {
                Some(t) => (t + g)?,
                None => g,
            });
        }
    }
    Ok(())
}

impl SavedTower {
    /// The last block's output.
    pub fn last(&self) -> &Tensor {
        self.inputs.last().expect("at least the tower's input")
    }
}

/// The two towers.
#[derive(Debug, Clone)]
pub struct Clip {
    pub config: ClipConfig,
    /// Where and how the towers compute; every layer was built with it.
    pub compute: Compute,
    pub visual: VisionTransformer,
    pub text: TextTransformer,
}

impl Clip {
    /// Build from a var builder whose keys are open_clip's (f32 tensors on `compute.device`),
    /// the frozen linear layers in `compute.precision`.
    pub fn new(vb: VarBuilder, cfg: &ClipConfig, compute: &Compute) -> Result<Self> {
        Ok(Self {
            config: cfg.clone(),
            compute: compute.clone(),
            visual: VisionTransformer::new(vb.pp("visual"), cfg, compute)?,
            text: TextTransformer::new(vb.clone(), cfg, compute)?,
        })
    }

    /// Build from a checkpoint already checked against `cfg`.
    pub fn from_checkpoint(ckpt: &Checkpoint, cfg: &ClipConfig, compute: &Compute) -> Result<Self> {
        let vb = VarBuilder::from_tensors(ckpt.backbone.clone(), DType::F32, &compute.device);
        Self::new(vb, cfg, compute)
    }

    /// This f32 model with the frozen linear layers of both towers (attention, MLP, patch
    /// embedding) in `precision`: bf16 halves their memory and runs their products at bf16
    /// speed on a GPU or a CPU with a bf16 kernel; layer norms, softmax, embeddings,
    /// projections and any hook stay in f32.
    pub fn with_precision(&self, precision: Precision) -> Result<Self> {
        let compute = self.compute.clone().with_precision(precision);
        let blocks = |bs: &[ResidualBlock]| -> Result<Vec<ResidualBlock>> {
            bs.iter().map(|b| b.with_precision(&compute)).collect()
        };
        let mut out = self.clone();
        out.visual.patch_embed = self.visual.patch_embed.with_precision(&compute)?;
        out.visual.blocks = blocks(&self.visual.blocks)?;
        out.text.blocks = blocks(&self.text.blocks)?;
        out.compute = compute;
        Ok(out)
    }

    fn blocks(&self, tower: Tower) -> &[ResidualBlock] {
        match tower {
            Tower::Vision => &self.visual.blocks,
            Tower::Text => &self.text.blocks,
        }
    }

    /// Whether [`Clip::forward_saving`] can keep activations: every block's branches run on
    /// the fused CPU kernels (fused kernels, frozen layers on the CPU, QuickGELU).
    pub fn keeps_activations(&self) -> bool {
        [Tower::Vision, Tower::Text].iter().all(|&t| {
            self.blocks(t)
                .iter()
                .all(|b| b.frozen_branches(t == Tower::Text).is_some())
        })
    }

    /// A tower's forward pass outside any graph, for a backward one block at a time
    /// ([`Clip::backward_blocks`]). It keeps each block's input, and with `keep_acts` (where
    /// [`Clip::keeps_activations`]) what the frozen branches' backward needs, so that only the
    /// hook runs again; without it the backward recomputes each block. `input`: pixels or
    /// token ids.
    pub fn forward_saving(
        &self,
        tower: Tower,
        input: &Tensor,
        hook: Option<&dyn BlockHook>,
        keep_acts: bool,
    ) -> Result<SavedTower> {
        let (x, eot) = match tower {
            Tower::Vision => (self.visual.embed(input)?, vec![]),
            Tower::Text => self.text.embed(input, hook)?,
        };
        let causal = tower == Tower::Text;
        let mut inputs = vec![x.detach()];
        let mut acts = vec![];
        for (i, blk) in self.blocks(tower).iter().enumerate() {
            let x = inputs.last().unwrap();
            let hook = hook.map(|h| (h, tower, i));
            let out = if keep_acts {
                let (out, a) = blk.forward_keeping(x, causal, hook)?.ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "block {i}: activations are kept only on the fused CPU kernels"
                    ))
                })?;
                acts.push(a);
                out
            } else {
                blk.forward(x, causal, hook)?.detach()
            };
            inputs.push(out);
        }
        Ok(SavedTower {
            tower,
            inputs,
            acts,
            eot,
        })
    }

    /// The tower's head (not normalised) on `x`, its last block's output: give it a variable
    /// made from `saved.last()` to get the loss's gradient with respect to that output.
    pub fn head(&self, saved: &SavedTower, x: &Tensor) -> Result<Tensor> {
        match saved.tower {
            Tower::Vision => self.visual.head(x),
            Tower::Text => self.text.head(x, &saved.eot),
        }
    }

    /// The backward through a tower's blocks, from `grad` (the loss's gradient with respect to
    /// the last block's output), last block first: from the kept activations, or recomputing
    /// each block from its saved input with `hook`. Returns the gradients of `params`, one
    /// entry each (`None`: not reached from this tower). Only one block's graph is alive at a
    /// time.
    pub fn backward_blocks(
        &self,
        saved: &SavedTower,
        mut grad: Tensor,
        hook: Option<&dyn BlockHook>,
        params: &[Tensor],
    ) -> Result<Vec<Option<Tensor>>> {
        let mut grads = vec![None; params.len()];
        let grads = &mut grads[..];
        let causal = saved.tower == Tower::Text;
        for (i, blk) in self.blocks(saved.tower).iter().enumerate().rev() {
            let block_hook = hook.map(|h| (h, saved.tower, i));
            if let Some(acts) = saved.acts.get(i) {
                let x = &saved.inputs[i];
                // the first block's input gradient would only reach the frozen embedding
                let g =
                    blk.backward_kept(x, acts, &grad, causal, block_hook, params, grads, i > 0)?;
                if let Some(g) = g {
                    grad = g;
                }
                continue;
            }
            let x = Var::from_tensor(&saved.inputs[i])?;
            let out = blk.forward(x.as_tensor(), causal, block_hook)?;
            let mut block_grads = backward_from(&out, &grad)?;
            add_grads(params, &mut block_grads, grads)?;
            if i > 0 {
                grad = block_grads.remove(x.as_tensor()).ok_or_else(|| {
                    candle_core::Error::Msg(format!("block {i}: no input gradient"))
                })?;
            }
        }
        Ok(grads.to_vec())
    }

    /// pixels [b, 3, H, W] -> L2-normalised [b, embed_dim]
    pub fn encode_image(&self, pixels: &Tensor, hook: Option<&dyn BlockHook>) -> Result<Tensor> {
        Ok(nn::l2_normalize(&self.visual.forward(pixels, hook)?)?)
    }

    /// ids [b, context] -> L2-normalised [b, embed_dim]
    pub fn encode_text(&self, ids: &Tensor, hook: Option<&dyn BlockHook>) -> Result<Tensor> {
        Ok(nn::l2_normalize(&self.text.forward(ids, hook)?)?)
    }
}
