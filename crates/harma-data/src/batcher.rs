//! Turning a step's pairs into the numbers the model takes: decoded, augmented and normalised
//! pixels, token ids and image ids, prepared in parallel (rayon).

use std::path::PathBuf;

use rayon::prelude::*;

use crate::annotations::PairSet;
use crate::augment::TrainTransform;
use crate::rng::Rng;
use crate::Result;

/// A prepared batch, host-side.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// [b, 3, size, size], normalised
    pub pixels: Vec<f32>,
    /// [b, context] token ids
    pub ids: Vec<u32>,
    /// [b]: pairs of one image share an id (soft positives)
    pub image_ids: Vec<i64>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.image_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.image_ids.is_empty()
    }
}

/// Prepares batches of a [`PairSet`] whose captions are already tokenized (`ids`, `context`
/// per caption).
pub struct Batcher<'a> {
    pub pairs: &'a PairSet,
    pub ids: &'a [u32],
    pub context: usize,
    pub transform: TrainTransform,
    pub image_root: PathBuf,
    pub limits: crate::LoadLimits,
}

impl Batcher<'_> {
    /// The batch of these pairs, each augmented with its own stream.
    pub fn batch(&self, items: &[(usize, Rng)]) -> Result<Batch> {
        let pixels = items
            .par_iter()
            .map(|(i, rng)| -> Result<Vec<f32>> {
                let img = crate::load_rgb8_with(
                    &self.image_root.join(&self.pairs.images[*i]),
                    self.limits,
                )?;
                let out = self.transform.apply(&img, &mut rng.clone());
                Ok(crate::image::normalize_chw(&out))
            })
            .collect::<Result<Vec<_>>>()?;
        let ctx = self.context;
        Ok(Batch {
            pixels: pixels.concat(),
            ids: items
                .iter()
                .flat_map(|(i, _)| self.ids[i * ctx..(i + 1) * ctx].iter().copied())
                .collect(),
            image_ids: items
                .iter()
                .map(|(i, _)| self.pairs.image_ids[*i])
                .collect(),
        })
    }
}
