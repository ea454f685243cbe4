//! Retrieval examples for a report, from an evaluated split's score matrix: a seeded sample of
//! captions with their top-5 images, a sample of images with their top-5 captions, and the
//! worst failures both ways (the correct item ranked lowest), each with its thumbnails (small
//! JPEGs, base64) so that `examples.json` and the page made from it need no image file.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{Context, Result};
use base64::Engine;
use harma_data::annotations::EvalSet;
use harma_data::rng::Rng;
use serde::{Deserialize, Serialize};

/// Stream label of the sample under the run's seed (see [`Rng::derive`]).
const STREAM_EXAMPLES: u64 = 11;
/// Items listed per query.
pub const TOP: usize = 5;
/// Longest side of a thumbnail, pixels.
const THUMB: usize = 112;

/// How many queries of each kind.
#[derive(Debug, Clone, Copy)]
pub struct Counts {
    pub captions: usize,
    pub images: usize,
    pub worst: usize,
}

impl Default for Counts {
    fn default() -> Self {
        Self {
            captions: 6,
            images: 4,
            worst: 3,
        }
    }
}

/// An image among a caption's results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageHit {
    pub image: String,
    pub score: f32,
    pub correct: bool,
}

/// A caption among an image's results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaptionHit {
    pub caption: String,
    pub score: f32,
    pub correct: bool,
}

/// A caption as the query: text -> image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextQuery {
    pub caption: String,
    /// its image
    pub image: String,
    /// the rank of its image (1 = first)
    pub rank: usize,
    pub top: Vec<ImageHit>,
}

/// An image as the query: image -> text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageQuery {
    pub image: String,
    /// the rank of its best-ranked caption (1 = first)
    pub rank: usize,
    pub top: Vec<CaptionHit>,
    /// its own captions
    pub truth: Vec<String>,
}

/// OUT/examples.json.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Examples {
    /// which split, and with which adapters
    pub title: String,
    pub images: usize,
    pub captions: usize,
    pub text_to_image: Vec<TextQuery>,
    pub image_to_text: Vec<ImageQuery>,
    pub worst_text_to_image: Vec<TextQuery>,
    pub worst_image_to_text: Vec<ImageQuery>,
    /// image path -> `data:image/jpeg;base64,...`
    pub thumbnails: BTreeMap<String, String>,
}

/// Indices of the `k` largest of `v` (ties: the higher index first, as the metrics break
/// them), best first.
fn top_k(v: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]).then(b.cmp(&a)));
    idx.truncate(k);
    idx
}

/// `k` distinct indices below `n`, drawn from `rng`, in drawing order.
fn sample(rng: &mut Rng, n: usize, k: usize) -> Vec<usize> {
    let mut all: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut all);
    all.truncate(k);
    all
}

/// Indices of the `k` largest ranks (ties: the lower index first).
fn worst(ranks: &[usize], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..ranks.len()).collect();
    idx.sort_by(|&a, &b| ranks[b].cmp(&ranks[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

impl Examples {
    /// The examples of `set` given its scores (`[n_images, n_captions]` row-major), sampled
    /// with `seed`; thumbnails from the images under `image_root` (an image that cannot be
    /// read gets none).
    pub fn new(
        title: &str,
        set: &EvalSet,
        scores: &[f32],
        image_root: &Path,
        seed: u64,
        counts: Counts,
    ) -> Result<Self> {
        let (n_img, n_txt) = (set.images.len(), set.captions.len());
        let (i2t, t2i) = harma_metrics::ranks(scores, n_img, &set.txt2img)?;
        let name = |i: usize| set.images[i].display().to_string();
        let column = |j: usize| -> Vec<f32> { (0..n_img).map(|i| scores[i * n_txt + j]).collect() };
        let text_query = |j: usize| {
            let col = column(j);
            TextQuery {
                caption: set.captions[j].clone(),
                image: name(set.txt2img[j]),
                rank: t2i[j] + 1,
                top: top_k(&col, TOP)
                    .into_iter()
                    .map(|i| ImageHit {
                        image: name(i),
                        score: col[i],
                        correct: i == set.txt2img[j],
                    })
                    .collect(),
            }
        };
        let image_query = |i: usize| {
            let row = &scores[i * n_txt..(i + 1) * n_txt];
            ImageQuery {
                image: name(i),
                rank: i2t[i] + 1,
                top: top_k(row, TOP)
                    .into_iter()
                    .map(|j| CaptionHit {
                        caption: set.captions[j].clone(),
                        score: row[j],
                        correct: set.txt2img[j] == i,
                    })
                    .collect(),
                truth: (0..n_txt)
                    .filter(|&j| set.txt2img[j] == i)
                    .map(|j| set.captions[j].clone())
                    .collect(),
            }
        };
        let mut rng = Rng::derive(seed, &[STREAM_EXAMPLES]);
        let mut ex = Examples {
            title: title.to_string(),
            images: n_img,
            captions: n_txt,
            text_to_image: sample(&mut rng, n_txt, counts.captions)
                .into_iter()
                .map(text_query)
                .collect(),
            image_to_text: sample(&mut rng, n_img, counts.images)
                .into_iter()
                .map(image_query)
                .collect(),
            worst_text_to_image: worst(&t2i, counts.worst)
                .into_iter()
                .map(text_query)
                .collect(),
            worst_image_to_text: worst(&i2t, counts.worst)
                .into_iter()
                .map(image_query)
                .collect(),
            thumbnails: BTreeMap::new(),
        };
        let mut wanted = BTreeSet::new();
        for q in ex.text_to_image.iter().chain(&ex.worst_text_to_image) {
            wanted.insert(q.image.clone());
            wanted.extend(q.top.iter().map(|h| h.image.clone()));
        }
        for q in ex.image_to_text.iter().chain(&ex.worst_image_to_text) {
            wanted.insert(q.image.clone());
        }
        let wanted: Vec<String> = wanted.into_iter().collect();
        use rayon::prelude::*;
        ex.thumbnails = wanted
            .par_iter()
            .filter_map(|w| Some((w.clone(), thumbnail(&image_root.join(w)).ok()?)))
            .collect();
        Ok(ex)
    }

    pub fn path(dir: &Path) -> std::path::PathBuf {
        dir.join("examples.json")
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        harma_checkpoint::write::write_atomic(
            &Self::path(dir),
            serde_json::to_string(self)?.as_bytes(),
        )
    }

    /// The examples recorded in `dir`, if any.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = Self::path(dir);
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(None);
        };
        let ex = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a retrieval-examples record", path.display()))?;
        Ok(Some(ex))
    }
}

/// A small JPEG of the image at `path` as a data URI.
pub fn thumbnail(path: &Path) -> Result<String> {
    let img = harma_data::load_rgb8(path)?;
    let scale = THUMB as f64 / img.width.max(img.height) as f64;
    let img = if scale < 1.0 {
        let w = ((img.width as f64 * scale).round() as usize).max(1);
        let h = ((img.height as f64 * scale).round() as usize).max(1);
        harma_data::resize_bicubic(&img, w, h)
    } else {
        img
    };
    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 82)
        .encode(
            &img.data,
            img.width as u32,
            img.height as u32,
            image::ExtendedColorType::Rgb8,
        )
        .with_context(|| format!("cannot make a thumbnail of {}", path.display()))?;
    Ok(format!(
        "data:image/jpeg;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&jpeg)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_rank_as_the_metrics_do() {
        // 3 images, 2 captions each; scores chosen so caption 0 ranks its image 2nd and image
        // 2's best caption ranks 3rd
        let set = EvalSet {
            images: ["a.png", "b.png", "c.png"].map(Into::into).to_vec(),
            captions: (0..6).map(|j| format!("c{j}")).collect(),
            txt2img: vec![0, 0, 1, 1, 2, 2],
            skipped: vec![],
        };
        #[rustfmt::skip]
        let scores = [
            0.5, 0.9, 0.1, 0.0, 0.2, 0.1,
            0.7, 0.1, 0.8, 0.7, 0.0, 0.0,
            0.1, 0.0, 0.3, 0.28, 0.25, 0.1,
        ];
        let ex = Examples::new(
            "t",
            &set,
            &scores,
            Path::new("/nonexistent"),
            1,
            Counts {
                captions: 6,
                images: 3,
                worst: 2,
            },
        )
        .unwrap();
        let m = harma_metrics::evaluate(&scores, 3, &set.txt2img).unwrap();
        let t2i_r1 = ex.text_to_image.iter().filter(|q| q.rank == 1).count();
        assert!((100.0 * t2i_r1 as f64 / 6.0 - m.img_r1).abs() < 0.01);
        let i2t_r1 = ex.image_to_text.iter().filter(|q| q.rank == 1).count();
        assert!((100.0 * i2t_r1 as f64 / 3.0 - m.txt_r1).abs() < 0.01);
        let c0 = ex.text_to_image.iter().find(|q| q.caption == "c0").unwrap();
        assert_eq!(c0.rank, 2);
        assert_eq!(c0.top[0].image, "b.png");
        assert!(c0.top[1].correct && !c0.top[0].correct);
        // the worst image query: image 2's best caption (c4, 0.25) comes after c2 and c3
        assert_eq!(ex.worst_image_to_text[0].image, "c.png");
        assert_eq!(ex.worst_image_to_text[0].rank, 3);
        assert_eq!(ex.worst_image_to_text[0].truth, ["c4", "c5"]);
        // no image files: no thumbnails, and no error
        assert!(ex.thumbnails.is_empty());
    }
}
