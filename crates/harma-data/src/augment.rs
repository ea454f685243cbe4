//! HarMA's train transform: RandomResizedCrop (scale 0.5-1, ratio 3/4-4/3, bicubic), a
//! horizontal flip with p = 0.5, then RandAugment as HarMA's `dataset/randaugment.py` (from
//! ALBEF) does it: two operations drawn with replacement from ten, each applied with p = 0.5,
//! at magnitude 7 of 10, on 8-bit pixels, grey (128) filling what a geometric operation
//! uncovers. Every random choice comes from the caller's [`Rng`], so a seed repeats a run.
//!
//! Matches the original's operations (numpy/OpenCV; `tests/fixtures/make_augment.py`) exactly,
//! or within one level where OpenCV interpolates in fixed point (shear, rotate), with two
//! deliberate differences: where the original wraps out-of-range floats around when casting to
//! `uint8` (sharpness) we clamp, and AutoContrast is PIL's, as the original's docstring says,
//! not the original's code, which negates a `uint8` minimum and so turns every channel whose
//! minimum is above 0 (nearly) white.

use crate::image::{resize_bicubic, RgbImage};
use crate::rng::Rng;

/// RandAugment's operations (HarMA's list).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Identity,
    AutoContrast,
    Equalize,
    Brightness,
    Sharpness,
    ShearX,
    ShearY,
    TranslateX,
    TranslateY,
    Rotate,
}

pub const OPS: [Op; 10] = [
    Op::Identity,
    Op::AutoContrast,
    Op::Equalize,
    Op::Brightness,
    Op::Sharpness,
    Op::ShearX,
    Op::ShearY,
    Op::TranslateX,
    Op::TranslateY,
    Op::Rotate,
];

const MAX_LEVEL: f64 = 10.0;
const FILL: u8 = 128;

/// The train-time transform.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainTransform {
    /// output side in pixels
    pub size: usize,
    /// RandomResizedCrop's area range (fractions of the image); `None`: plain resize
    pub crop_scale: Option<(f64, f64)>,
    pub flip: bool,
    /// RandAugment (operations per image, magnitude 0-10)
    pub rand_augment: Option<(usize, f64)>,
}

impl TrainTransform {
    /// HarMA's: crop scale (0.5, 1), flip, RandAugment 2 ops at magnitude 7.
    pub fn harma(size: usize) -> Self {
        Self {
            size,
            crop_scale: Some((0.5, 1.0)),
            flip: true,
            rand_augment: Some((2, 7.0)),
        }
    }

    /// No augmentation: the evaluation resize.
    pub fn none(size: usize) -> Self {
        Self {
            size,
            crop_scale: None,
            flip: false,
            rand_augment: None,
        }
    }

    pub fn apply(&self, img: &RgbImage, rng: &mut Rng) -> RgbImage {
        let mut out = match self.crop_scale {
            Some(scale) => {
                let (x, y, w, h) = crop_box(img.width, img.height, scale, rng);
                resize_bicubic(&crop(img, x, y, w, h), self.size, self.size)
            }
            None => resize_bicubic(img, self.size, self.size),
        };
        if self.flip && rng.uniform() < 0.5 {
            out = hflip(&out);
        }
        if let Some((n, magnitude)) = self.rand_augment {
            out = rand_augment(&out, n, magnitude, rng);
        }
        out
    }
}

/// torchvision `RandomResizedCrop.get_params` with ratio (3/4, 4/3): up to ten draws of an
/// area fraction and a log-uniform aspect ratio, else a centre crop. Returns (x, y, w, h).
pub fn crop_box(
    width: usize,
    height: usize,
    scale: (f64, f64),
    rng: &mut Rng,
) -> (usize, usize, usize, usize) {
    let area = (width * height) as f64;
    let ratio = (3.0f64 / 4.0, 4.0f64 / 3.0);
    for _ in 0..10 {
        let target = area * rng.range(scale.0, scale.1);
        let aspect = rng.range(ratio.0.ln(), ratio.1.ln()).exp();
        let w = (target * aspect).sqrt().round() as usize;
        let h = (target / aspect).sqrt().round() as usize;
        if w > 0 && w <= width && h > 0 && h <= height {
            let y = rng.below(height - h + 1);
            let x = rng.below(width - w + 1);
            return (x, y, w, h);
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < ratio.0 {
        (width, (width as f64 / ratio.0).round() as usize)
    } else if in_ratio > ratio.1 {
        ((height as f64 * ratio.1).round() as usize, height)
    } else {
        (width, height)
    };
    ((width - w) / 2, (height - h) / 2, w, h)
}

pub fn crop(img: &RgbImage, x: usize, y: usize, w: usize, h: usize) -> RgbImage {
    let mut data = Vec::with_capacity(w * h * 3);
    for row in y..y + h {
        let start = (row * img.width + x) * 3;
        data.extend_from_slice(&img.data[start..start + w * 3]);
    }
    RgbImage {
        width: w,
        height: h,
        data,
    }
}

pub fn hflip(img: &RgbImage) -> RgbImage {
    let mut data = Vec::with_capacity(img.data.len());
    for row in img.data.chunks_exact(img.width * 3) {
        for px in row.chunks_exact(3).rev() {
            data.extend_from_slice(px);
        }
    }
    RgbImage { data, ..*img }
}

/// Draw `n` operations with replacement; apply each with p = 0.5.
pub fn rand_augment(img: &RgbImage, n: usize, magnitude: f64, rng: &mut Rng) -> RgbImage {
    let ops: Vec<Op> = (0..n).map(|_| OPS[rng.below(OPS.len())]).collect();
    let mut out = img.clone();
    for op in ops {
        if rng.uniform() > 0.5 {
            continue;
        }
        out = apply_op(&out, op, magnitude, rng);
    }
    out
}

/// One operation at `magnitude` (0-10); signed operations draw their sign from `rng`.
pub fn apply_op(img: &RgbImage, op: Op, magnitude: f64, rng: &mut Rng) -> RgbImage {
    let level = magnitude / MAX_LEVEL;
    let mut signed = |v: f64| if rng.uniform() < 0.5 { -v } else { v };
    match op {
        Op::Identity => img.clone(),
        Op::AutoContrast => autocontrast(img),
        Op::Equalize => equalize(img),
        Op::Brightness => brightness(img, level * 1.8 + 0.1),
        Op::Sharpness => sharpness(img, level * 1.8 + 0.1),
        Op::ShearX => shear_x(img, signed(level * 0.3)),
        Op::ShearY => shear_y(img, signed(level * 0.3)),
        Op::TranslateX => translate(img, signed(level * 10.0), 0.0),
        Op::TranslateY => translate(img, 0.0, signed(level * 10.0)),
        Op::Rotate => rotate(img, signed(level * 30.0)),
    }
}

fn map_channels(img: &RgbImage, tables: &[[u8; 256]; 3]) -> RgbImage {
    let data = img
        .data
        .chunks_exact(3)
        .flat_map(|p| {
            [
                tables[0][p[0] as usize],
                tables[1][p[1] as usize],
                tables[2][p[2] as usize],
            ]
        })
        .collect();
    RgbImage { data, ..*img }
}

fn histograms(img: &RgbImage) -> [[u64; 256]; 3] {
    let mut h = [[0u64; 256]; 3];
    for p in img.data.chunks_exact(3) {
        for c in 0..3 {
            h[c][p[c] as usize] += 1;
        }
    }
    h
}

/// Stretch each channel to 0..255 (PIL `ImageOps.autocontrast`, cutoff 0).
pub fn autocontrast(img: &RgbImage) -> RgbImage {
    let hist = histograms(img);
    let tables = hist.map(|h| {
        let low = h.iter().position(|&c| c > 0).unwrap_or(0);
        let high = h.iter().rposition(|&c| c > 0).unwrap_or(255);
        let mut t = [0u8; 256];
        for (i, v) in t.iter_mut().enumerate() {
            *v = if high <= low {
                i as u8
            } else {
                let scale = 255.0 / (high - low) as f64;
                (i as f64 * scale - low as f64 * scale).clamp(0.0, 255.0) as u8
            };
        }
        t
    });
    map_channels(img, &tables)
}

/// Histogram equalisation per channel (PIL `ImageOps.equalize`).
pub fn equalize(img: &RgbImage) -> RgbImage {
    let hist = histograms(img);
    let tables = hist.map(|h| {
        let mut t: [u8; 256] = std::array::from_fn(|i| i as u8);
        let nonzero: Vec<u64> = h.iter().copied().filter(|&c| c > 0).collect();
        let step = nonzero[..nonzero.len().saturating_sub(1)]
            .iter()
            .sum::<u64>()
            / 255;
        if step == 0 {
            return t;
        }
        let mut acc = step / 2;
        for (i, v) in t.iter_mut().enumerate() {
            *v = (acc / step).min(255) as u8;
            acc += h[i];
        }
        t
    });
    map_channels(img, &tables)
}

pub fn brightness(img: &RgbImage, factor: f64) -> RgbImage {
    let t: [u8; 256] = std::array::from_fn(|i| (i as f32 * factor as f32).clamp(0.0, 255.0) as u8);
    map_channels(img, &[t, t, t])
}

/// Blend with a 3x3 smoothed copy (`[1 1 1; 1 5 1; 1 1 1] / 13`); the border rows and columns
/// are kept.
pub fn sharpness(img: &RgbImage, factor: f64) -> RgbImage {
    let (w, h) = (img.width, img.height);
    let mut out = img.clone();
    if w < 3 || h < 3 {
        return out;
    }
    let px = |x: usize, y: usize, c: usize| img.data[(y * w + x) * 3 + c] as f32;
    for y in 1..h - 1 {
        for x in 1..w - 1 {
            for c in 0..3 {
                let mut s = 4.0 * px(x, y, c);
                for dy in 0..3 {
                    for dx in 0..3 {
                        s += px(x + dx - 1, y + dy - 1, c);
                    }
                }
                let blurred = (s / 13.0).round().clamp(0.0, 255.0);
                let v = blurred + factor as f32 * (px(x, y, c) - blurred);
                out.data[(y * w + x) * 3 + c] = v.clamp(0.0, 255.0) as u8;
            }
        }
    }
    out
}

/// `dst(x, y) = src(a x + b y + c, d x + e y + f)`, bilinear, grey outside.
fn warp(img: &RgbImage, inv: [f64; 6]) -> RgbImage {
    let (w, h) = (img.width, img.height);
    let mut data = vec![0u8; w * h * 3];
    let at = |x: i64, y: i64, c: usize| -> f64 {
        if x < 0 || y < 0 || x >= w as i64 || y >= h as i64 {
            FILL as f64
        } else {
            img.data[(y as usize * w + x as usize) * 3 + c] as f64
        }
    };
    for y in 0..h {
        for x in 0..w {
            let (xf, yf) = (x as f64, y as f64);
            let sx = inv[0] * xf + inv[1] * yf + inv[2];
            let sy = inv[3] * xf + inv[4] * yf + inv[5];
            let (x0, y0) = (sx.floor(), sy.floor());
            let (fx, fy) = (sx - x0, sy - y0);
            let (x0, y0) = (x0 as i64, y0 as i64);
            for c in 0..3 {
                let top = at(x0, y0, c) * (1.0 - fx) + at(x0 + 1, y0, c) * fx;
                let bottom = at(x0, y0 + 1, c) * (1.0 - fx) + at(x0 + 1, y0 + 1, c) * fx;
                let v = top * (1.0 - fy) + bottom * fy;
                data[(y * w + x) * 3 + c] = v.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    RgbImage { data, ..*img }
}

/// The inverse of the forward affine map `[p q r; s t u]` (OpenCV's `warpAffine` convention).
fn invert(m: [f64; 6]) -> [f64; 6] {
    let [p, q, r, s, t, u] = m;
    let det = p * t - q * s;
    let (a, b, d, e) = (t / det, -q / det, -s / det, p / det);
    [a, b, -(a * r + b * u), d, e, -(d * r + e * u)]
}

pub fn shear_x(img: &RgbImage, factor: f64) -> RgbImage {
    warp(img, invert([1.0, factor, 0.0, 0.0, 1.0, 0.0]))
}

pub fn shear_y(img: &RgbImage, factor: f64) -> RgbImage {
    warp(img, invert([1.0, 0.0, 0.0, factor, 1.0, 0.0]))
}

/// Content moves by (-dx, -dy), as the original's `translate_*_func(img, offset)`.
pub fn translate(img: &RgbImage, dx: f64, dy: f64) -> RgbImage {
    warp(img, invert([1.0, 0.0, -dx, 0.0, 1.0, -dy]))
}

/// Counter-clockwise by `degrees` about (w/2, h/2) (`cv2.getRotationMatrix2D`).
pub fn rotate(img: &RgbImage, degrees: f64) -> RgbImage {
    let (cx, cy) = (img.width as f64 / 2.0, img.height as f64 / 2.0);
    let (s, c) = degrees.to_radians().sin_cos();
    warp(
        img,
        invert([
            c,
            s,
            (1.0 - c) * cx - s * cy,
            -s,
            c,
            s * cx + (1.0 - c) * cy,
        ]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(w: usize, h: usize) -> RgbImage {
        let data = (0..w * h)
            .flat_map(|i| {
                let (x, y) = (i % w, i / w);
                [
                    (x * 7 % 256) as u8,
                    (y * 11 % 256) as u8,
                    ((x + y) * 3 % 256) as u8,
                ]
            })
            .collect();
        RgbImage {
            width: w,
            height: h,
            data,
        }
    }

    #[test]
    fn integer_translation_shifts_and_fills_grey() {
        let img = ramp(10, 6);
        let t = translate(&img, 3.0, 0.0);
        for y in 0..6 {
            for x in 0..10 {
                let got = &t.data[(y * 10 + x) * 3..][..3];
                if x + 3 < 10 {
                    assert_eq!(got, &img.data[(y * 10 + x + 3) * 3..][..3]);
                } else {
                    assert_eq!(got, &[FILL; 3]);
                }
            }
        }
        assert_eq!(rotate(&img, 0.0), img);
        assert_eq!(hflip(&hflip(&img)), img);
    }
}
