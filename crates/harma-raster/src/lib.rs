//! Rasters for search: cutting an image into tiles, GeoTIFF georeferencing (north-up rasters:
//! ModelTiepoint + ModelPixelScale, or ModelTransformation without rotation; the EPSG code from
//! the GeoKeys), and band selection for multi-band rasters (`--bands 3,2,1`).
//!
//! Decoding and resizing are [`harma_data::image`]'s: a file read without `--bands` gives the bytes
//! `harma embed` sees. `--bands` applies to rasters whose layout needs it ([`bands_apply`]: TIFFs
//! of more bands than colours, or wider than 8 bits); an 8-bit grey or RGB(A) image, and every
//! PNG, JPEG, BMP or WebP, is read as RGB whatever it says. Those rasters are read by the `tiff`
//! crate (any number of bands, 8 to 64 bits, integer or float, chunky or planar) and the chosen
//! bands are picked; samples
//! wider than 8 bits are stretched per band from their 2nd to their 98th percentile over the
//! whole raster (the stretch GIS viewers show by default), so every tile of a raster shares
//! one mapping. The GeoTIFF tags follow the GeoTIFF 1.1 standard (OGC 19-008r4).

#![forbid(unsafe_code)]

use std::io::BufReader;
use std::path::Path;

use tiff::decoder::{Decoder, DecodingResult, Limits};
use tiff::tags::Tag;

use harma_data::image::{load_rgb8_with, normalize_chw, resize_bicubic, LoadLimits, RgbImage};
use harma_data::{Error, Result};

/// The largest raster (decoded samples, in bytes) read for band selection: 2 GiB. Cut larger
/// rasters first (for example `gdal_translate -srcwin`, or `gdal_retile.py`).
pub const MAX_RASTER_BYTES: usize = 2 << 30;

fn err(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Image {
        path: path.display().to_string(),
        msg: msg.to_string(),
    }
}

/// Bands to read from a multi-band raster, 1-based as GDAL counts them: one (shown as grey)
/// or three (red, green, blue). Parsed from `"3,2,1"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bands(Vec<usize>);

impl Bands {
    /// The bands, 1-based.
    pub fn as_slice(&self) -> &[usize] {
        &self.0
    }
}

impl std::str::FromStr for Bands {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bands = s
            .split(',')
            .map(|b| match b.trim().parse::<usize>() {
                Ok(n) if n >= 1 => Ok(n),
                _ => Err(format!(
                    "band `{}` is not a band number (bands count from 1, as in GDAL)",
                    b.trim()
                )),
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        if bands.len() != 1 && bands.len() != 3 {
            return Err(format!(
                "{} bands given: give three (red,green,blue, e.g. 3,2,1) or one (shown as grey)",
                bands.len()
            ));
        }
        Ok(Bands(bands))
    }
}

impl std::fmt::Display for Bands {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s: Vec<String> = self.0.iter().map(|b| b.to_string()).collect();
        f.write_str(&s.join(","))
    }
}

/// One tile of a raster, in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Tile {
    pub x: usize,
    pub y: usize,
    pub w: usize,
    pub h: usize,
    /// [`EDGE_RIGHT`] and/or [`EDGE_BOTTOM`]: the tile was moved off the stride grid to end at
    /// the raster's right or bottom edge (it overlaps its neighbour), or the raster is narrower
    /// (shorter) than a tile and the tile is the whole width (height).
    pub edge: u8,
}

/// [`Tile::edge`] bit: placed against the right edge.
pub const EDGE_RIGHT: u8 = 1;
/// [`Tile::edge`] bit: placed against the bottom edge.
pub const EDGE_BOTTOM: u8 = 2;

/// Start offsets along one axis of `len` pixels and whether each is an edge tile. Tiles start
/// every `stride` pixels while they fit; when the last one ends short of the edge, one more
/// ends exactly at the edge. An axis no longer than a tile is one tile of its whole length.
fn axis(len: usize, tile: usize, stride: usize) -> Vec<(usize, usize, bool)> {
    if len <= tile {
        return vec![(0, len, len < tile)];
    }
    let mut out: Vec<(usize, usize, bool)> = (0..=(len - tile) / stride)
        .map(|i| (i * stride, tile, false))
        .collect();
    let last = out.last().map_or(0, |t| t.0);
    if last + tile < len {
        out.push((len - tile, tile, true));
    }
    out
}

/// The tiles of a `width` x `height` raster, row by row: `tile` pixels square, starting every
/// `stride` pixels (`stride` = `tile`: side by side; smaller: overlapping), with edge tiles as
/// [`Tile::edge`] says. A raster no larger than a tile is one tile, the whole raster.
pub fn tile_grid(width: usize, height: usize, tile: usize, stride: usize) -> Vec<Tile> {
    assert!(tile > 0 && stride > 0, "tile and stride must be positive");
    let xs = axis(width, tile, stride);
    let ys = axis(height, tile, stride);
    let mut out = Vec::with_capacity(xs.len() * ys.len());
    for &(y, h, ey) in &ys {
        for &(x, w, ex) in &xs {
            let edge = if ex { EDGE_RIGHT } else { 0 } | if ey { EDGE_BOTTOM } else { 0 };
            out.push(Tile { x, y, w, h, edge });
        }
    }
    out
}

/// The pixels of `t` from `img`.
pub fn crop(img: &RgbImage, t: &Tile) -> RgbImage {
    assert!(
        t.x + t.w <= img.width && t.y + t.h <= img.height,
        "tile outside the image"
    );
    let mut data = Vec::with_capacity(t.w * t.h * 3);
    for row in t.y..t.y + t.h {
        let start = (row * img.width + t.x) * 3;
        data.extend_from_slice(&img.data[start..start + t.w * 3]);
    }
    RgbImage {
        width: t.w,
        height: t.h,
        data,
    }
}

/// A tile as the model sees it: cut, resized to `size` x `size` (PIL bicubic), normalised.
/// [3, size, size] flattened.
pub fn preprocess_tile(img: &RgbImage, t: &Tile, size: usize) -> Vec<f32> {
    let cut = if t.x == 0 && t.y == 0 && t.w == img.width && t.h == img.height {
        std::borrow::Cow::Borrowed(img)
    } else {
        std::borrow::Cow::Owned(crop(img, t))
    };
    normalize_chw(&resize_bicubic(&cut, size, size))
}

/// A whole image as the model sees it: resized to `size` x `size`, normalised (what
/// [`harma_data::preprocess_eval`] does after decoding).
pub fn preprocess_whole(img: &RgbImage, size: usize) -> Vec<f32> {
    normalize_chw(&resize_bicubic(img, size, size))
}

/// Where a north-up raster lies: the affine map from pixel corners (x right, y down) to the
/// coordinates of its CRS, as GDAL's geotransform `[x0, dx, 0, y0, 0, dy]` (dy is negative
/// for the usual north-up raster).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GeoRef {
    /// The EPSG code of the CRS (ProjectedCSTypeGeoKey, else GeographicTypeGeoKey), when the
    /// GeoKeys name one.
    pub epsg: Option<u32>,
    pub x0: f64,
    pub dx: f64,
    pub y0: f64,
    pub dy: f64,
}

impl GeoRef {
    /// The box `[min_x, min_y, max_x, max_y]` of a pixel rectangle, in the CRS; `None` where
    /// it is not finite (a crafted or broken pixel scale such as 1e306 overflows).
    pub fn bbox(&self, t: &Tile) -> Option<[f64; 4]> {
        let xa = self.x0 + t.x as f64 * self.dx;
        let xb = self.x0 + (t.x + t.w) as f64 * self.dx;
        let ya = self.y0 + t.y as f64 * self.dy;
        let yb = self.y0 + (t.y + t.h) as f64 * self.dy;
        let b = [xa.min(xb), ya.min(yb), xa.max(xb), ya.max(yb)];
        b.iter().all(|v| v.is_finite()).then_some(b)
    }
}

const GEOKEY_RASTER_TYPE: u16 = 1025;
const GEOKEY_GEOGRAPHIC_TYPE: u16 = 2048;
const GEOKEY_PROJECTED_TYPE: u16 = 3072;
const RASTER_PIXEL_IS_POINT: u16 = 2;
const USER_DEFINED: u16 = 32767;

fn is_tiff(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "tif" | "tiff"))
}

fn open_tiff(path: &Path) -> Result<Decoder<BufReader<std::fs::File>>> {
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    let mut limits = Limits::default();
    limits.decoding_buffer_size = MAX_RASTER_BYTES;
    limits.intermediate_buffer_size = MAX_RASTER_BYTES;
    Ok(Decoder::new(BufReader::new(file))
        .map_err(|e| err(path, format!("cannot read TIFF: {e}")))?
        .with_limits(limits))
}

/// The georeferencing of a GeoTIFF, if it is north-up: `None` for other formats, TIFFs without
/// GeoTIFF tags and rotated or sheared rasters (those get pixel boxes only). A PixelIsPoint
/// raster is shifted by half a pixel, as GDAL does.
pub fn read_georef(path: &Path) -> Result<Option<GeoRef>> {
    if !is_tiff(path) {
        return Ok(None);
    }
    let mut d = open_tiff(path)?;
    let mut f64s = |tag: Tag| -> Result<Option<Vec<f64>>> {
        match d.find_tag(tag) {
            Ok(Some(v)) => v
                .into_f64_vec()
                .map(Some)
                .map_err(|e| err(path, format!("bad GeoTIFF tag {tag:?}: {e}"))),
            Ok(None) => Ok(None),
            Err(e) => Err(err(path, format!("bad GeoTIFF tag {tag:?}: {e}"))),
        }
    };
    let scale = f64s(Tag::ModelPixelScaleTag)?;
    let tie = f64s(Tag::ModelTiepointTag)?;
    let matrix = f64s(Tag::ModelTransformationTag)?;
    let (x0, dx, y0, dy) = match (scale, tie, matrix) {
        (Some(s), Some(t), _) if s.len() >= 2 && t.len() >= 6 => {
            // pixel (i, j) is model (x, y); y grows downwards in the raster, upwards in the map
            let (i, j, x, y) = (t[0], t[1], t[3], t[4]);
            (x - i * s[0], s[0], y + j * s[1], -s[1])
        }
        (_, _, Some(m)) if m.len() >= 16 => {
            if m[1] != 0.0 || m[4] != 0.0 {
                return Ok(None); // rotated or sheared: not north-up
            }
            (m[3], m[0], m[7], m[5])
        }
        _ => return Ok(None),
    };
    if ![x0, dx, y0, dy].iter().all(|v| v.is_finite()) || dx == 0.0 || dy == 0.0 {
        return Ok(None);
    }
    let keys = match d.find_tag(Tag::GeoKeyDirectoryTag) {
        Ok(Some(v)) => v.into_u16_vec().unwrap_or_default(),
        _ => Vec::new(),
    };
    let key = |id: u16| -> Option<u16> {
        // header: version, revision, minor, count; then (id, location, count, value) per key;
        // location 0 means the value is the short itself
        keys.get(4..)?
            .chunks_exact(4)
            .take(*keys.get(3)? as usize)
            .find(|k| k[0] == id && k[1] == 0)
            .map(|k| k[3])
    };
    let epsg = [GEOKEY_PROJECTED_TYPE, GEOKEY_GEOGRAPHIC_TYPE]
        .into_iter()
        .filter_map(key)
        .find(|&c| c != 0 && c != USER_DEFINED)
        .map(u32::from);
    let (x0, y0) = if key(GEOKEY_RASTER_TYPE) == Some(RASTER_PIXEL_IS_POINT) {
        (x0 - 0.5 * dx, y0 - 0.5 * dy)
    } else {
        (x0, y0)
    };
    Ok(Some(GeoRef {
        epsg,
        x0,
        dx,
        y0,
        dy,
    }))
}

/// Write `img` as a north-up GeoTIFF placed by `geo` (ModelPixelScale, ModelTiepoint at the
/// upper-left corner, GeoKeys naming the EPSG code: geographic for 4000-4999, else projected),
/// atomically. For test archives and demos; GDAL and QGIS read it.
pub fn write_geotiff(path: &Path, img: &RgbImage, geo: &GeoRef) -> Result<()> {
    let io = |e: std::io::Error| Error::Io {
        path: path.display().to_string(),
        source: e,
    };
    let tiff_err = |e: tiff::TiffError| err(path, format!("cannot write TIFF: {e}"));
    let mut keys: Vec<u16> = vec![1, 1, 0, 0];
    let mut key = |id: u16, value: u16| {
        keys.extend_from_slice(&[id, 0, 1, value]);
        keys[3] += 1;
    };
    let geographic = geo.epsg.is_some_and(|e| (4000..5000).contains(&e));
    key(1024, if geographic { 2 } else { 1 }); // GTModelTypeGeoKey
    key(GEOKEY_RASTER_TYPE, 1); // PixelIsArea
    let code = geo
        .epsg
        .and_then(|e| u16::try_from(e).ok())
        .unwrap_or(USER_DEFINED);
    key(
        if geographic {
            GEOKEY_GEOGRAPHIC_TYPE
        } else {
            GEOKEY_PROJECTED_TYPE
        },
        code,
    );
    let tmp = path.with_extension("tif.tmp");
    {
        let file = std::fs::File::create(&tmp).map_err(io)?;
        let mut enc =
            tiff::encoder::TiffEncoder::new(std::io::BufWriter::new(file)).map_err(tiff_err)?;
        let mut t = enc
            .new_image::<tiff::encoder::colortype::RGB8>(img.width as u32, img.height as u32)
            .map_err(tiff_err)?;
        let e = t.encoder();
        e.write_tag(Tag::ModelPixelScaleTag, &[geo.dx, -geo.dy, 0.0][..])
            .map_err(tiff_err)?;
        e.write_tag(
            Tag::ModelTiepointTag,
            &[0.0, 0.0, 0.0, geo.x0, geo.y0, 0.0][..],
        )
        .map_err(tiff_err)?;
        e.write_tag(Tag::GeoKeyDirectoryTag, &keys[..])
            .map_err(tiff_err)?;
        t.write_data(&img.data).map_err(tiff_err)?;
    }
    std::fs::rename(&tmp, path).map_err(io)
}

/// Decode a raster to 8-bit RGB: exactly as `harma embed` reads the file
/// ([`harma_data::load_rgb8`]) unless `bands` are given and [`bands_apply`] to it, then the
/// chosen bands (see the module's text). Within `limits` either way.
pub fn load_raster(path: &Path, bands: Option<&Bands>, limits: LoadLimits) -> Result<RgbImage> {
    match bands {
        Some(b) if bands_apply(path) => load_tiff_bands(path, b),
        _ => load_rgb8_with(path, limits).map_err(|e| match e {
            // a TIFF of many bands: say how to read it
            Error::Image { .. } if is_tiff(path) => match tiff_band_count(path) {
                Some(n) if n > 4 => err(
                    path,
                    format!("has {n} bands: choose three with --bands (e.g. --bands 3,2,1)"),
                ),
                _ => e,
            },
            e => e,
        }),
    }
}

/// TIFF's PhotometricInterpretation values that mean grey (WhiteIsZero, BlackIsZero), RGB and
/// a palette; and its ExtraSamples values that mean alpha (associated, unassociated).
const GREY: [u16; 2] = [0, 1];
const RGB: u16 = 2;
const PALETTE: u16 = 3;
const ALPHA: [u16; 2] = [1, 2];

/// Whether `--bands` applies to a file: to a raster whose band layout needs choosing, a TIFF
/// whose samples are wider than 8 bits, or that holds more than its colours (more than three
/// samples, or samples that are not marked as an RGB or grey image with at most an alpha
/// channel: a multispectral 3- or 4-band TIFF applies them). An 8-bit grey, RGB or palette
/// image, with or without alpha, is read as RGB whatever `--bands` says, and so is every PNG,
/// JPEG, BMP and WebP: the photos of a mixed folder keep their colours (and their scores).
pub fn bands_apply(path: &Path) -> bool {
    if !is_tiff(path) {
        return false;
    }
    let Ok(mut d) = open_tiff(path) else {
        // unreadable: the band reader says why
        return true;
    };
    let mut tag = |t: Tag| -> Vec<u16> {
        d.find_tag(t)
            .ok()
            .flatten()
            .and_then(|v| v.into_u16_vec().ok())
            .unwrap_or_default()
    };
    let samples = tag(Tag::SamplesPerPixel).first().copied().unwrap_or(1);
    let bits = tag(Tag::BitsPerSample);
    let photometric = tag(Tag::PhotometricInterpretation).first().copied();
    let extra = tag(Tag::ExtraSamples);
    let eight_bit = !bits.is_empty() && bits.iter().all(|&b| b == 8);
    let alpha_only = extra.iter().all(|e| ALPHA.contains(e));
    let colours = match photometric {
        Some(RGB) => 3,
        Some(p) if GREY.contains(&p) || p == PALETTE => 1,
        _ => return true,
    };
    let plain =
        eight_bit && alpha_only && extra.len() <= 1 && samples == colours + extra.len() as u16;
    !plain
}

/// The number of samples per pixel of a TIFF, if it can be read.
fn tiff_band_count(path: &Path) -> Option<usize> {
    let mut d = open_tiff(path).ok()?;
    d.find_tag_unsigned::<u16>(Tag::SamplesPerPixel)
        .ok()
        .flatten()
        .map(usize::from)
}

/// An RGB image whose channel c at pixel i is `value(band c (0-based), i)`; one band is grey.
fn pick(width: usize, height: usize, b: &Bands, value: impl Fn(usize, usize) -> u8) -> RgbImage {
    let chans: Vec<usize> = if b.0.len() == 1 {
        vec![b.0[0] - 1; 3]
    } else {
        b.0.iter().map(|n| n - 1).collect()
    };
    let mut data = vec![0u8; width * height * 3];
    for (i, px) in data.chunks_exact_mut(3).enumerate() {
        for (c, v) in px.iter_mut().enumerate() {
            *v = value(chans[c], i);
        }
    }
    RgbImage {
        width,
        height,
        data,
    }
}

/// A decoded sample as f64.
trait Sample: Copy {
    fn to_f64(self) -> f64;
}

macro_rules! sample_as {
    ($($t:ty),*) => {
        $(impl Sample for $t {
            #[inline]
            fn to_f64(self) -> f64 {
                self as f64
            }
        })*
    };
}
sample_as!(u8, u16, u32, u64, i8, i16, i32, i64, f32, f64);

impl Sample for half::f16 {
    fn to_f64(self) -> f64 {
        half::f16::to_f64(self)
    }
}

/// Where sample (band, pixel) is in the decoded buffer: interleaved, or one plane per band.
struct Layout {
    n: usize,
    bands: usize,
    planar: bool,
}

impl Layout {
    #[inline]
    fn at(&self, band: usize, i: usize) -> usize {
        if self.planar {
            band * self.n + i
        } else {
            i * self.bands + band
        }
    }
}

/// The 2nd and 98th percentiles of `values` (NaN ignored), from at most about a million
/// evenly spaced samples.
fn stretch_range(values: impl Iterator<Item = f64>, n: usize) -> (f64, f64) {
    let step = n.div_ceil(1 << 20).max(1);
    let mut s: Vec<f64> = values.step_by(step).filter(|v| !v.is_nan()).collect();
    if s.is_empty() {
        return (0.0, 1.0);
    }
    s.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| s[((s.len() - 1) as f64 * p).round() as usize];
    (q(0.02), q(0.98))
}

fn load_tiff_bands(path: &Path, b: &Bands) -> Result<RgbImage> {
    let mut d = open_tiff(path)?;
    let (w, h) = d
        .dimensions()
        .map_err(|e| err(path, format!("cannot read TIFF: {e}")))?;
    let (w, h) = (w as usize, h as usize);
    let bands = d
        .find_tag_unsigned::<u16>(Tag::SamplesPerPixel)
        .ok()
        .flatten()
        .unwrap_or(1) as usize;
    if let Some(&bad) = b.0.iter().find(|&&n| n > bands) {
        return Err(err(
            path,
            format!("has {bands} band(s), --bands asks for band {bad}"),
        ));
    }
    if w == 0 || h == 0 {
        return Err(err(path, "image has no pixels"));
    }
    let mut buf = DecodingResult::U8(Vec::new());
    let layout = d.read_image_to_buffer(&mut buf).map_err(|e| {
        err(
            path,
            format!("cannot decode TIFF (rasters up to {MAX_RASTER_BYTES} bytes are read): {e}"),
        )
    })?;
    let n = w * h;
    let planar = layout.planes > 1;
    let l = Layout { n, bands, planar };
    macro_rules! with_samples {
        ($v:ident => $body:expr) => {
            match &buf {
                DecodingResult::U8($v) => $body,
                DecodingResult::U16($v) => $body,
                DecodingResult::U32($v) => $body,
                DecodingResult::U64($v) => $body,
                DecodingResult::I8($v) => $body,
                DecodingResult::I16($v) => $body,
                DecodingResult::I32($v) => $body,
                DecodingResult::I64($v) => $body,
                DecodingResult::F16($v) => $body,
                DecodingResult::F32($v) => $body,
                DecodingResult::F64($v) => $body,
            }
        };
    }
    let len = with_samples!(v => v.len());
    if len < n * bands {
        return Err(err(
            path,
            format!("decoded {len} samples, expected {w} x {h} x {bands}: unsupported TIFF layout"),
        ));
    }
    if let DecodingResult::U8(v) = &buf {
        return Ok(pick(w, h, b, |band, i| v[l.at(band, i)]));
    }
    // wider samples: each chosen band stretched from its 2nd to its 98th percentile
    let mut chosen: Vec<usize> = b.0.iter().map(|n| n - 1).collect();
    chosen.dedup();
    let mut bytes = vec![Vec::new(); bands];
    for &band in &chosen {
        if !bytes[band].is_empty() {
            continue;
        }
        let vals: Vec<f64> =
            with_samples!(v => (0..n).map(|i| v[l.at(band, i)].to_f64()).collect());
        let (lo, hi) = stretch_range(vals.iter().copied(), n);
        let scale = if hi > lo { 255.0 / (hi - lo) } else { 0.0 };
        bytes[band] = vals
            .iter()
            .map(|&v| {
                if v.is_nan() {
                    0
                } else {
                    ((v - lo) * scale).round().clamp(0.0, 255.0) as u8
                }
            })
            .collect();
    }
    Ok(pick(w, h, b, |band, i| bytes[band][i]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn starts(len: usize, tile: usize, stride: usize) -> Vec<(usize, usize, bool)> {
        axis(len, tile, stride)
    }

    #[test]
    fn axis_tiles_cover_the_length() {
        // exact fit: no edge tile
        assert_eq!(
            starts(512, 256, 256),
            vec![(0, 256, false), (256, 256, false)]
        );
        // 600 = 2 x 256 + 88: a third tile ends at the edge, overlapping the second
        assert_eq!(
            starts(600, 256, 256),
            vec![(0, 256, false), (256, 256, false), (344, 256, true)]
        );
        // overlapping stride
        assert_eq!(
            starts(512, 256, 128),
            vec![(0, 256, false), (128, 256, false), (256, 256, false)]
        );
        assert_eq!(
            starts(520, 256, 128),
            vec![
                (0, 256, false),
                (128, 256, false),
                (256, 256, false),
                (264, 256, true)
            ]
        );
        // no larger than a tile: the whole axis
        assert_eq!(starts(256, 256, 256), vec![(0, 256, false)]);
        assert_eq!(starts(100, 256, 64), vec![(0, 100, true)]);
        assert_eq!(starts(257, 256, 256), vec![(0, 256, false), (1, 256, true)]);
    }

    #[test]
    fn bands_parse() {
        assert_eq!("3,2,1".parse::<Bands>().unwrap().as_slice(), &[3, 2, 1]);
        assert_eq!(" 4 ".parse::<Bands>().unwrap().as_slice(), &[4]);
        assert_eq!("8, 4, 3".parse::<Bands>().unwrap().to_string(), "8,4,3");
        for bad in ["0,1,2", "1,2", "a", "1,2,3,4", ""] {
            assert!(bad.parse::<Bands>().is_err(), "{bad}");
        }
        let e = "0,1,2".parse::<Bands>().unwrap_err();
        assert!(e.contains("count from 1"), "{e}");
    }

    #[test]
    fn crop_takes_the_rows_of_the_tile() {
        let img = RgbImage {
            width: 4,
            height: 3,
            data: (0..36).map(|v| v as u8).collect(),
        };
        let c = crop(
            &img,
            &Tile {
                x: 1,
                y: 1,
                w: 2,
                h: 2,
                edge: 0,
            },
        );
        assert_eq!((c.width, c.height), (2, 2));
        assert_eq!(c.data, vec![15, 16, 17, 18, 19, 20, 27, 28, 29, 30, 31, 32]);
    }

    #[test]
    fn percentile_stretch_ignores_nan() {
        let v: Vec<f64> = (0..=100).map(f64::from).chain([f64::NAN]).collect();
        assert_eq!(stretch_range(v.into_iter(), 102), (2.0, 98.0));
    }
}
