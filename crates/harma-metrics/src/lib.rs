//! Retrieval metrics as HarMA reports them (`itm_eval` in HarMA's `Retrieval.py`): image->text
//! R@1/5/10 by the best-ranked ground-truth caption of each image, text->image R@1/5/10 by the
//! rank of each caption's image, and their mean `r_mean`, in percent.
//!
//! Ranks are counted, not sorted: the rank of a target is the number of candidates that beat it,
//! O(n) per query and parallel over queries, so a 10,000 x 50,000 score matrix takes well under
//! two seconds. Ties: among equal scores the candidate with the higher index ranks first, which
//! is what the original's `np.argsort(score)[::-1]` gives with a stable sort (numpy's default
//! sort leaves the order of ties to its algorithm).

#![forbid(unsafe_code)]

use rayon::prelude::*;

/// Errors of the metrics crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Shape(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// The seven numbers of HarMA's evaluation, in percent, rounded to two decimals as the original
/// rounds them (`r_mean` from the unrounded values).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RetrievalMetrics {
    pub txt_r1: f64,
    pub txt_r5: f64,
    pub txt_r10: f64,
    pub img_r1: f64,
    pub img_r5: f64,
    pub img_r10: f64,
    pub r_mean: f64,
}

/// Rank (0 = first) of the best of `targets` in `row`: the best target is the one with the
/// highest score (the higher index among equal scores); its rank counts the candidates above it
/// and the equal ones after it. Branch-free counts, so the compiler vectorises them.
fn best_rank(row: &[f32], targets: &[usize]) -> usize {
    let mut t = targets[0];
    for &c in &targets[1..] {
        if row[c] > row[t] || (row[c] == row[t] && c > t) {
            t = c;
        }
    }
    let st = row[t];
    let above: usize = row.iter().map(|&s| (s > st) as usize).sum();
    let tied_after: usize = row[t + 1..].iter().map(|&s| (s == st) as usize).sum();
    above + tied_after
}

fn recall(ranks: &[usize], k: usize) -> f64 {
    100.0 * ranks.iter().filter(|&&r| r < k).count() as f64 / ranks.len() as f64
}

/// Round as Python's `round(x, 2)` does (correctly rounded from the binary value).
fn round2(x: f64) -> f64 {
    format!("{x:.2}").parse().unwrap_or(x)
}

/// Image->text ranks (one per image) and text->image ranks (one per caption).
/// `scores`: [n_img, n_txt] row-major, `S[i][j]` = similarity of image i and caption j;
/// `txt2img[j]`: the image of caption j.
pub fn ranks(scores: &[f32], n_img: usize, txt2img: &[usize]) -> Result<(Vec<usize>, Vec<usize>)> {
    let n_txt = txt2img.len();
    if n_img == 0 || n_txt == 0 || scores.len() != n_img * n_txt {
        return Err(Error::Shape(format!(
            "scores have {} values, expected {n_img} images x {n_txt} captions",
            scores.len()
        )));
    }
    if let Some(j) = txt2img.iter().position(|&i| i >= n_img) {
        return Err(Error::Shape(format!(
            "caption {j} points to image {} of {n_img}",
            txt2img[j]
        )));
    }
    let mut img2txt = vec![Vec::new(); n_img];
    for (j, &i) in txt2img.iter().enumerate() {
        img2txt[i].push(j);
    }
    if let Some(i) = img2txt.iter().position(|v| v.is_empty()) {
        return Err(Error::Shape(format!("image {i} has no caption")));
    }
    let i2t: Vec<usize> = scores
        .par_chunks(n_txt)
        .zip(img2txt.par_iter())
        .map(|(row, targets)| best_rank(row, targets))
        .collect();
    // text->image: walk the rows in order (cache-friendly) over a block of caption columns,
    // counting for each caption the images that beat its own (ties: the higher index first)
    const BLOCK: usize = 2048;
    let t2i: Vec<usize> = (0..n_txt.div_ceil(BLOCK))
        .into_par_iter()
        .flat_map_iter(|b| {
            let cols = b * BLOCK..((b + 1) * BLOCK).min(n_txt);
            let gt = &txt2img[cols.clone()];
            let target: Vec<f32> = cols
                .clone()
                .map(|j| scores[txt2img[j] * n_txt + j])
                .collect();
            let mut count = vec![0u32; cols.len()];
            for i in 0..n_img {
                let row = &scores[i * n_txt + cols.start..i * n_txt + cols.end];
                for (((c, &v), &t), &g) in count.iter_mut().zip(row).zip(&target).zip(gt) {
                    *c += (v > t) as u32 + ((v == t) & (i > g)) as u32;
                }
            }
            count.into_iter().map(|c| c as usize)
        })
        .collect();
    Ok((i2t, t2i))
}

/// HarMA's metrics for a score matrix (see [`ranks`]).
pub fn evaluate(scores: &[f32], n_img: usize, txt2img: &[usize]) -> Result<RetrievalMetrics> {
    let (i2t, t2i) = ranks(scores, n_img, txt2img)?;
    let (tr1, tr5, tr10) = (recall(&i2t, 1), recall(&i2t, 5), recall(&i2t, 10));
    let (ir1, ir5, ir10) = (recall(&t2i, 1), recall(&t2i, 5), recall(&t2i, 10));
    let r_mean = ((tr1 + tr5 + tr10) / 3.0 + (ir1 + ir5 + ir10) / 3.0) / 2.0;
    Ok(RetrievalMetrics {
        txt_r1: round2(tr1),
        txt_r5: round2(tr5),
        txt_r10: round2(tr10),
        img_r1: round2(ir1),
        img_r5: round2(ir5),
        img_r10: round2(ir10),
        r_mean: round2(r_mean),
    })
}

/// Where the time of an evaluation went, in seconds. Decoding runs on its own thread while the
/// model embeds, so `decode` and `embed_images` overlap within `images`.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Timings {
    /// decoding, resizing and normalising the images (producer thread, busy time)
    pub decode: f64,
    /// the image tower (busy time)
    pub embed_images: f64,
    /// wall time of the image side (decode and embedding overlapped)
    pub images: f64,
    /// tokenizing and embedding the captions
    pub captions: f64,
    /// the score matrix and the metrics
    pub metrics: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_checked_ranks_and_ties() {
        // 2 images, 4 captions (0,1 -> image 0; 2,3 -> image 1)
        #[rustfmt::skip]
        let s = [
            0.9, 0.1, 0.5, 0.9,   // image 0: caption 0 ties caption 3, which has the higher index
            0.2, 0.3, 0.8, 0.1,   // image 1: its caption 2 is first
        ];
        let (i2t, t2i) = ranks(&s, 2, &[0, 0, 1, 1]).unwrap();
        assert_eq!(i2t, vec![1, 0]);
        // caption 1: image 1 scores 0.3 > 0.1; caption 3: image 0 scores 0.9 > 0.1
        assert_eq!(t2i, vec![0, 1, 0, 1]);
        let m = evaluate(&s, 2, &[0, 0, 1, 1]).unwrap();
        assert_eq!((m.txt_r1, m.img_r1, m.img_r5), (50.0, 50.0, 100.0));
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(evaluate(&[0.0; 6], 2, &[0, 1, 1, 1]).is_err());
        assert!(evaluate(&[0.0; 4], 2, &[0, 2]).is_err());
        assert!(evaluate(&[0.0; 4], 2, &[0, 0])
            .unwrap_err()
            .to_string()
            .contains("image 1 has no caption"));
    }
}
