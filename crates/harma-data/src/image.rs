//! Decoding images as PIL's `Image.open(p).convert("RGB")` does, resizing with PIL's
//! antialiased bicubic filter bit for bit, and CLIP's normalisation (torchvision `ToTensor` +
//! `Normalize`).
//!
//! The resize follows Pillow's `libImaging/Resample.c` algorithm: separable convolution with
//! the a = -0.5 cubic kernel widened by the downscale factor, 22-bit fixed-point weights,
//! horizontal pass then vertical pass, each rounded and clipped to 8 bits.

use std::path::Path;

use image::DynamicImage;

use crate::{Error, Result};

// Both constants are spelled as open_clip spells them, so a reader can compare digit by digit.
/// CLIP's per-channel mean (open_clip `OPENAI_DATASET_MEAN`).
#[allow(clippy::excessive_precision)]
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// CLIP's per-channel standard deviation (open_clip `OPENAI_DATASET_STD`).
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// An 8-bit RGB image, rows of interleaved `r g b` bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

fn image_error(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Image {
        path: path.display().to_string(),
        msg: msg.to_string(),
    }
}

/// Convert any decoded image to 8-bit RGB as PIL's `convert("RGB")` does: alpha is dropped
/// (not composited), grey is replicated, 16-bit grey is clipped at 255 (PIL's `I;16` -> `L`),
/// 16-bit colour keeps its high byte (PIL reads it as `RGB;16B`).
pub fn to_rgb8(img: DynamicImage) -> RgbImage {
    let (width, height) = (img.width() as usize, img.height() as usize);
    let data = match img {
        DynamicImage::ImageRgb8(b) => b.into_raw(),
        DynamicImage::ImageLuma8(b) => b.into_raw().iter().flat_map(|&v| [v, v, v]).collect(),
        DynamicImage::ImageLumaA8(b) => b
            .into_raw()
            .chunks_exact(2)
            .flat_map(|p| [p[0], p[0], p[0]])
            .collect(),
        DynamicImage::ImageRgba8(b) => b
            .into_raw()
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        DynamicImage::ImageLuma16(b) => b
            .into_raw()
            .iter()
            .flat_map(|&v| {
                let g = v.min(255) as u8;
                [g, g, g]
            })
            .collect(),
        DynamicImage::ImageLumaA16(b) => b
            .into_raw()
            .chunks_exact(2)
            .flat_map(|p| {
                let g = p[0].min(255) as u8;
                [g, g, g]
            })
            .collect(),
        DynamicImage::ImageRgb16(b) => b.into_raw().iter().map(|&v| (v >> 8) as u8).collect(),
        DynamicImage::ImageRgba16(b) => b
            .into_raw()
            .chunks_exact(4)
            .flat_map(|p| [(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8])
            .collect(),
        other => other.to_rgb8().into_raw(),
    };
    RgbImage {
        width,
        height,
        data,
    }
}

/// Pillow refuses an image of more than twice its `MAX_IMAGE_PIXELS` (89,478,485) as a
/// decompression bomb; so do we, by default.
pub const DEFAULT_MAX_PIXELS: u64 = 2 * 89_478_485;

/// How large an image the decoders accept: a header declaring more pixels is refused before
/// any pixel is decoded, so a few bytes cannot ask for gigabytes. Passed as a value to every
/// decoder (and the batcher and encoder that call them); [`LoadSettings`] is its setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadLimits {
    pub max_pixels: u64,
}

impl Default for LoadLimits {
    fn default() -> Self {
        Self {
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }
}

harma_settings::settings! {
    /// How large an image may be decoded.
    pub struct LoadSettings {
        /// The most pixels an image may have [default: 178956970, twice Pillow's
        /// MAX_IMAGE_PIXELS]; a file declaring more is refused from its header, before
        /// anything is decoded (a decompression bomb)
        #[setting(value_name("N"), env("HARMA_MAX_IMAGE_PIXELS"))]
        pub max_image_pixels: Option<u64> = None,
    }
}

impl LoadSettings {
    /// The limits these settings ask for.
    pub fn limits(&self) -> LoadLimits {
        LoadLimits {
            max_pixels: self.max_image_pixels.unwrap_or(DEFAULT_MAX_PIXELS),
        }
    }
}

/// Refuse a `width` x `height` image above `limits`.
fn check_pixels(width: u64, height: u64, limits: LoadLimits) -> std::result::Result<(), String> {
    let pixels = width.saturating_mul(height);
    let limit = limits.max_pixels;
    if pixels > limit {
        return Err(format!(
            "{width}x{height} is {pixels} pixels, more than the {limit} allowed (a \
             decompression bomb?); set --max-image-pixels or HARMA_MAX_IMAGE_PIXELS to allow \
             larger images"
        ));
    }
    if pixels == 0 {
        return Err("image has no pixels".into());
    }
    Ok(())
}

/// Decode an image file (tif/tiff, jpg/jpeg, png, bmp, webp; the format is read from the
/// content) to 8-bit RGB. A missing, truncated or corrupt file, or one of more than
/// the default [`LoadLimits`], names itself in the error.
pub fn load_rgb8(path: &Path) -> Result<RgbImage> {
    load_rgb8_with(path, LoadLimits::default())
}

/// [`load_rgb8`] within `limits`.
pub fn load_rgb8_with(path: &Path, limits: LoadLimits) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return decode_jpeg(&bytes, limits).map_err(|msg| image_error(path, msg));
    }
    let decoder = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| image_error(path, e))?
        .into_decoder()
        .map_err(|e| image_error(path, format!("cannot decode image: {e}")))?;
    let (w, h) = image::ImageDecoder::dimensions(&decoder);
    check_pixels(w as u64, h as u64, limits).map_err(|msg| image_error(path, msg))?;
    let img = DynamicImage::from_decoder(decoder)
        .map_err(|e| image_error(path, format!("cannot decode image: {e}")))?;
    Ok(to_rgb8(img))
}

/// The bytes of a JPEG for libjpeg, noting whether the decoder asked for more than there is
/// (a truncated file: libjpeg only warns, fills the rest with grey and goes on; Pillow
/// refuses it as "image file is truncated", and so do we).
struct Watched<'a> {
    data: &'a [u8],
    pos: usize,
    ran_out: &'a std::cell::Cell<bool>,
}

impl std::io::Read for Watched<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = std::io::Read::read(&mut &self.data[self.pos..], buf)?;
        self.pos += n;
        if n == 0 && !buf.is_empty() {
            self.ran_out.set(true);
        }
        Ok(n)
    }
}

impl std::io::BufRead for Watched<'_> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        if self.pos >= self.data.len() {
            self.ran_out.set(true);
        }
        Ok(&self.data[self.pos..])
    }

    fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.data.len());
    }
}

/// Whether a JPEG carries Adobe's APP14 marker (before its first scan): Adobe's CMYK JPEGs
/// store inverted ink values, and Pillow reads them so when the marker is there.
fn adobe_marker(jpeg: &[u8]) -> bool {
    let mut i = 2;
    while i + 4 <= jpeg.len() && jpeg[i] == 0xFF {
        let marker = jpeg[i + 1];
        if marker == 0xDA {
            break;
        }
        let len = u16::from_be_bytes([jpeg[i + 2], jpeg[i + 3]]) as usize;
        if marker == 0xEE && jpeg.get(i + 4..i + 9) == Some(b"Adobe") {
            return true;
        }
        i += 2 + len;
    }
    false
}

/// CMYK to RGB as Pillow's `convert("RGB")` does (`cmyk2rgb` in libImaging/Convert.c:
/// `r = k' - c k' / 255` with `k' = 255 - k`, divisions rounded as MULDIV255), reading the
/// inks inverted for Adobe's JPEGs.
fn cmyk_to_rgb(px: &[[u8; 4]], inverted: bool) -> Vec<u8> {
    let muldiv255 = |a: u32, b: u32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    px.iter()
        .flat_map(|p| {
            let p = if inverted { p.map(|v| 255 - v) } else { *p };
            let nk = 255 - p[3] as u32;
            [0, 1, 2].map(|c| (nk - muldiv255(p[c] as u32, nk).min(nk)) as u8)
        })
        .collect()
}

/// JPEG through libjpeg-turbo's decoder (mozjpeg), the library PIL uses, so the decoded
/// bytes are PIL's exactly (pure-Rust decoders differ by a few levels in chroma upsampling).
/// CMYK and YCCK JPEGs are converted as Pillow converts them.
fn decode_jpeg(bytes: &[u8], limits: LoadLimits) -> std::result::Result<RgbImage, String> {
    use mozjpeg::ColorSpace;
    let ran_out = std::cell::Cell::new(false);
    let inverted = adobe_marker(bytes);
    // libjpeg reports fatal errors by unwinding; keep them inside this function
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(
        || -> std::result::Result<RgbImage, String> {
            let src = Watched {
                data: bytes,
                pos: 0,
                ran_out: &ran_out,
            };
            let d = mozjpeg::Decompress::builder()
                .from_reader(src)
                .map_err(|e| e.to_string())?;
            check_pixels(d.width() as u64, d.height() as u64, limits)?;
            let cmyk = matches!(d.color_space(), ColorSpace::JCS_CMYK | ColorSpace::JCS_YCCK);
            let io = |e: std::io::Error| e.to_string();
            let img = if cmyk {
                let mut d = d.to_colorspace(ColorSpace::JCS_CMYK).map_err(io)?;
                let (width, height) = (d.width(), d.height());
                let px: Vec<[u8; 4]> = d.read_scanlines().map_err(io)?;
                d.finish().map_err(io)?;
                RgbImage {
                    width,
                    height,
                    data: cmyk_to_rgb(&px, inverted),
                }
            } else {
                let mut d = d.rgb().map_err(io)?;
                let (width, height) = (d.width(), d.height());
                let rows: Vec<[u8; 3]> = d.read_scanlines().map_err(io)?;
                d.finish().map_err(io)?;
                RgbImage {
                    width,
                    height,
                    data: rows.concat(),
                }
            };
            Ok(img)
        },
    ));
    if ran_out.get() {
        return Err(
            "truncated JPEG: the file ends before the image does (an incomplete copy or \
             download?)"
                .into(),
        );
    }
    match decoded {
        Ok(Ok(img)) if img.width > 0 && img.data.len() == img.width * img.height * 3 => Ok(img),
        Ok(Ok(_)) => Err("cannot decode JPEG: truncated data".into()),
        Ok(Err(e)) => Err(format!("cannot decode JPEG: {e}")),
        Err(_) => Err("cannot decode JPEG: corrupt data".into()),
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn cubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Fixed-point filter taps of one axis: for each output index, the first input index and
/// its weights.
struct Taps {
    start: Vec<usize>,
    weights: Vec<Vec<i32>>,
}

fn taps(in_size: usize, out_size: usize) -> Taps {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let mut start = Vec::with_capacity(out_size);
    let mut weights = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) - xmin;
        let w: Vec<f64> = (0..xmax)
            .map(|x| cubic((x as f64 + xmin as f64 - center + 0.5) / filterscale))
            .collect();
        let total: f64 = w.iter().sum();
        let fixed = w
            .iter()
            .map(|&k| {
                let k = if total != 0.0 { k / total } else { k };
                let v = k * (1u32 << PRECISION_BITS) as f64;
                (if v < 0.0 { v - 0.5 } else { v + 0.5 }) as i32
            })
            .collect();
        start.push(xmin as usize);
        weights.push(fixed);
    }
    Taps { start, weights }
}

#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One separable pass: resample the width (`horizontal`) or the height to `out`, rounding
/// and clipping to 8 bits as Pillow does after each pass.
fn resample_pass(src: &RgbImage, out: usize, horizontal: bool) -> RgbImage {
    let half = 1i32 << (PRECISION_BITS - 1);
    let (w, h) = (src.width, src.height);
    if horizontal {
        let t = taps(w, out);
        let mut data = vec![0u8; h * out * 3];
        for y in 0..h {
            let row = &src.data[y * w * 3..(y + 1) * w * 3];
            for x in 0..out {
                let mut acc = [half; 3];
                for (i, &k) in t.weights[x].iter().enumerate() {
                    let p = &row[(t.start[x] + i) * 3..];
                    for c in 0..3 {
                        acc[c] += p[c] as i32 * k;
                    }
                }
                for c in 0..3 {
                    data[(y * out + x) * 3 + c] = clip8(acc[c]);
                }
            }
        }
        RgbImage {
            width: out,
            height: h,
            data,
        }
    } else {
        let t = taps(h, out);
        let stride = w * 3;
        let mut data = vec![0u8; out * stride];
        let mut acc = vec![half; stride];
        for y in 0..out {
            acc.fill(half);
            for (i, &k) in t.weights[y].iter().enumerate() {
                let row = &src.data[(t.start[y] + i) * stride..][..stride];
                for (a, &p) in acc.iter_mut().zip(row) {
                    *a += p as i32 * k;
                }
            }
            for (o, &a) in data[y * stride..(y + 1) * stride].iter_mut().zip(&acc) {
                *o = clip8(a);
            }
        }
        RgbImage {
            width: w,
            height: out,
            data,
        }
    }
}

/// Resize 8-bit RGB with PIL's `Image.resize(size, Image.BICUBIC)` (antialiased when
/// shrinking), giving the same bytes as Pillow for the shapes that matter here (RSITMD 256 ->
/// 224, RSICD 224, and every enlargement). Pillow 13 chooses which pass runs first by a rule we
/// inferred from its output: the height first when it shrinks by a larger factor than the width,
/// otherwise the width first; a pass whose size does not change is skipped. For some non-square
/// inputs that shrink on both axes Pillow picks the other order (3 of 40 random shape pairs in
/// the tests); the intermediate rounding then differs, by at most a level on natural images.
pub fn resize_bicubic(src: &RgbImage, out_w: usize, out_h: usize) -> RgbImage {
    let need_h = src.width != out_w;
    let need_v = src.height != out_h;
    let vertical_first =
        need_h && need_v && src.height > out_h && src.width * out_h < out_w * src.height;
    let mut img = src.clone();
    if vertical_first {
        img = resample_pass(&img, out_h, false);
        img = resample_pass(&img, out_w, true);
    } else {
        if need_h {
            img = resample_pass(&img, out_w, true);
        }
        if need_v {
            img = resample_pass(&img, out_h, false);
        }
    }
    img
}

/// Channel-first floats `(v / 255 - mean) / std`, [3, h, w] flattened.
pub fn normalize_chw(img: &RgbImage) -> Vec<f32> {
    let n = img.width * img.height;
    let mut out = vec![0f32; 3 * n];
    for (i, p) in img.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * n + i] = (p[c] as f32 / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c];
        }
    }
    out
}

/// The evaluation transform: decode, resize to `size` x `size` bicubic, normalise.
/// Returns [3, size, size] flattened.
pub fn preprocess_eval(path: &Path, size: usize, limits: LoadLimits) -> Result<Vec<f32>> {
    let img = load_rgb8_with(path, limits)?;
    Ok(normalize_chw(&resize_bicubic(&img, size, size)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_size_resize_is_identity() {
        let img = RgbImage {
            width: 3,
            height: 2,
            data: (0..18).map(|v| (v * 13) as u8).collect(),
        };
        assert_eq!(resize_bicubic(&img, 3, 2), img);
    }

    #[test]
    fn taps_sum_to_one_in_fixed_point() {
        for (i, o) in [(256, 224), (40, 224), (1000, 224), (224, 224)] {
            let t = taps(i, o);
            for w in &t.weights {
                let s: i32 = w.iter().sum();
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= w.len() as i32,
                    "{i}->{o}: {s}"
                );
            }
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = RgbImage {
            width: 37,
            height: 50,
            data: vec![200; 37 * 50 * 3],
        };
        let r = resize_bicubic(&img, 224, 224);
        assert!(r.data.iter().all(|&v| v == 200));
    }

    #[test]
    #[allow(clippy::excessive_precision)]
    fn normalisation_matches_clip_constants() {
        let img = RgbImage {
            width: 1,
            height: 1,
            data: vec![255, 0, 128],
        };
        let v = normalize_chw(&img);
        assert!((v[0] - (1.0 - 0.481_454_66) / 0.268_629_54).abs() < 1e-6);
        assert!((v[1] + 0.457_827_5 / 0.261_302_58).abs() < 1e-6);
        assert!((v[2] - (128.0 / 255.0 - 0.408_210_73) / 0.275_777_11).abs() < 1e-6);
    }
}
