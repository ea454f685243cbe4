//! One training step at a time: the model, the trainable adapters, the optimiser and the
//! schedule, behind `Trainer::step`. The run loop (`train`) decides when to evaluate, save and
//! stop; a test can drive a step without it.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use harma_adapters::{AdapterConfig, HarmaAdapters};
use harma_clip::Clip;
use harma_data::batcher::Batch;
use harma_loss::LossConfig;

use crate::optim::{AdamW, AdamWConfig};
use crate::schedule::Schedule;
use harma_dist::{Collective, Single};
pub use harma_report::StepReport;

/// How the trainer steps.
#[derive(Debug, Clone)]
pub struct TrainerSettings {
    /// The peak learning rate.
    pub lr: f64,
    pub schedule: Schedule,
    pub adamw: AdamWConfig,
    pub loss: LossConfig,
    /// Clip the global gradient norm to this value.
    pub max_grad_norm: Option<f64>,
    /// Recompute each block in the backward instead of keeping its activations.
    pub recompute: bool,
    /// Take the update of the original's DDP over this many GPUs: every trained tensor's
    /// gradient divided by it but `temp`'s (1: the global batch's gradient as it is).
    pub emulate_ddp: usize,
}

/// A step whose loss is not finite: nothing was updated.
#[derive(Debug, Clone, PartialEq)]
pub struct NonFiniteLoss {
    /// The step that failed (1-based).
    pub step: usize,
    pub loss: f64,
    pub contrastive: f64,
    pub triplet: f64,
}

impl std::fmt::Display for NonFiniteLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "step {}: the loss is {} (contrastive {}, triplet {})",
            self.step, self.loss, self.contrastive, self.triplet
        )
    }
}

impl std::error::Error for NonFiniteLoss {}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64)
}

/// The model and its trainable part, stepping.
pub struct Trainer {
    model: Clip,
    adapters: HarmaAdapters,
    vars: Vec<(String, Var)>,
    params: Vec<Tensor>,
    opt: AdamW,
    settings: TrainerSettings,
    /// The ranks this trainer steps with (one: [`Single`]).
    coll: Arc<dyn Collective>,
}

impl Trainer {
    /// A trainer whose adapters start from `tensors` (under the original's names).
    pub fn new(
        model: Clip,
        tensors: HashMap<String, Tensor>,
        adapters: &AdapterConfig,
        settings: TrainerSettings,
    ) -> Result<Self> {
        let (adapters, vars) =
            HarmaAdapters::trainable(tensors, &model.config, adapters, &model.compute)
                .context("the starting adapters do not fit the model")?;
        let params = vars.iter().map(|(_, v)| v.as_tensor().clone()).collect();
        let opt = AdamW::new(vars.clone(), settings.adamw.clone())?;
        Ok(Self {
            model,
            adapters,
            vars,
            params,
            opt,
            settings,
            coll: Arc::new(Single),
        })
    }

    /// This trainer as one rank of a data-parallel run: each step takes this rank's shard of
    /// the global batch, and every rank takes the same update (see
    /// [`crate::step::loss_and_grads_on`]).
    pub fn on_ranks(self, coll: Arc<dyn Collective>) -> Self {
        Self { coll, ..self }
    }

    /// The ranks this trainer steps with.
    pub fn collective(&self) -> &dyn Collective {
        self.coll.as_ref()
    }

    /// Steps done so far.
    pub fn steps_done(&self) -> usize {
        self.opt.step
    }

    pub fn model(&self) -> &Clip {
        &self.model
    }

    pub fn adapters(&self) -> &HarmaAdapters {
        &self.adapters
    }

    /// The trained tensors by name (adapters, gates, `temp`), in name order.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }

    pub fn optimizer_mut(&mut self) -> &mut AdamW {
        &mut self.opt
    }

    /// The trained tensors' current values, detached: evaluating them keeps no graph.
    pub fn detached(&self) -> HashMap<String, Tensor> {
        self.vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect()
    }

    /// The gradient the original's update sees when it trains on `emulate_ddp` GPUs
    /// (docs/DISTRIBUTED.md "The original's two-GPU update"): its `AllGather` hands each GPU
    /// the loss's gradient at that GPU's rows only and DDP averages the GPUs' gradients, so
    /// every tensor reached through the embeddings gets the global batch's gradient divided
    /// by the number of GPUs; `temp`, which every GPU reaches whole through the loss, gets
    /// all of it. `grads` holds the global batch's gradients (on any number of ranks here).
    fn emulate_ddp(&self, grads: &mut GradStore) -> Result<()> {
        let w = self.settings.emulate_ddp;
        if w <= 1 {
            return Ok(());
        }
        for (name, v) in &self.vars {
            if name == harma_adapters::TEMP_KEY {
                continue;
            }
            if let Some(g) = grads.remove(v.as_tensor()) {
                grads.insert(v.as_tensor(), (g / w as f64)?);
            }
        }
        Ok(())
    }

    /// One step on `batch` (this rank's shard of the global batch when on several ranks): the
    /// loss and its gradients, optional clipping, and an AdamW update at the scheduled learning
    /// rate. A non-finite loss is a [`NonFiniteLoss`] error and changes nothing.
    pub fn step(&mut self, batch: Batch) -> Result<StepReport> {
        let k = self.opt.step;
        let b = batch.len();
        let (size, ctx) = (
            self.model.config.vision.image_size,
            self.model.config.text.context_length,
        );
        let device = &self.model.compute.device;
        let pixels = Tensor::from_vec(batch.pixels, (b, 3, size, size), device)?;
        let tokens = Tensor::from_vec(batch.ids, (b, ctx), device)?;
        let temp = scalar(&self.adapters.temp)?;
        let (terms, mut grads) = crate::step::loss_and_grads_on(
            &self.model,
            &self.adapters,
            &self.params,
            (&pixels, &tokens),
            &batch.image_ids,
            &self.settings.loss,
            self.settings.recompute,
            self.coll.as_ref(),
        )?;
        let (loss, contrastive, triplet) = (
            scalar(&terms.total)?,
            scalar(&terms.contrastive)?,
            scalar(&terms.triplet)?,
        );
        if !loss.is_finite() {
            return Err(NonFiniteLoss {
                step: k + 1,
                loss,
                contrastive,
                triplet,
            }
            .into());
        }
        drop(terms);
        self.emulate_ddp(&mut grads)?;
        let grad_norm = match self.settings.max_grad_norm {
            Some(m) => Some(self.opt.clip_grad_norm(&mut grads, m)?),
            None => None,
        };
        let lr = self.settings.schedule.lr(self.settings.lr, k);
        self.opt.step(&grads, lr)?;
        Ok(StepReport {
            step: k + 1,
            lr,
            loss,
            loss_contrastive: contrastive,
            loss_triplet: triplet,
            temp,
            grad_norm,
        })
    }
}
