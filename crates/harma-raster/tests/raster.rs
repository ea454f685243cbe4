//! Rasters for search: tile grids, GeoTIFF georeferencing of files written here (boxes against
//! values computed by hand), and band selection from multi-band TIFFs.

use std::path::{Path, PathBuf};

use harma_data::LoadLimits;
use harma_raster::{
    bands_apply, load_raster, read_georef, tile_grid, Bands, GeoRef, Tile, EDGE_BOTTOM, EDGE_RIGHT,
};
use tiff::encoder::colortype::{self, ColorType};
use tiff::encoder::TiffEncoder;
use tiff::tags::{PhotometricInterpretation, SampleFormat, Tag};

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("harma-raster-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn tile_grids_cover_the_raster_with_recorded_edges() {
    // 600 x 300, tile 256, stride 256: columns 0, 256, 344 (edge); rows 0, 44 (edge)
    let g = tile_grid(600, 300, 256, 256);
    let pos: Vec<(usize, usize, u8)> = g.iter().map(|t| (t.x, t.y, t.edge)).collect();
    assert_eq!(
        pos,
        vec![
            (0, 0, 0),
            (256, 0, 0),
            (344, 0, EDGE_RIGHT),
            (0, 44, EDGE_BOTTOM),
            (256, 44, EDGE_BOTTOM),
            (344, 44, EDGE_RIGHT | EDGE_BOTTOM),
        ]
    );
    assert!(g.iter().all(|t| t.w == 256 && t.h == 256));
    // every pixel is in some tile, no tile leaves the raster
    for (w, h, tile, stride) in [
        (600, 300, 256, 256),
        (1000, 777, 224, 100),
        (97, 1000, 64, 64),
    ] {
        let g = tile_grid(w, h, tile, stride);
        let mut covered = vec![false; w * h];
        for t in &g {
            assert!(t.x + t.w <= w && t.y + t.h <= h, "{t:?}");
            for y in t.y..t.y + t.h {
                for x in t.x..t.x + t.w {
                    covered[y * w + x] = true;
                }
            }
        }
        assert!(
            covered.iter().all(|&c| c),
            "{w}x{h} tile {tile} stride {stride}"
        );
        // interior tiles sit on the stride grid
        assert!(g
            .iter()
            .filter(|t| t.edge == 0)
            .all(|t| t.x % stride == 0 && t.y % stride == 0));
    }
    // overlapping: 512 wide, stride 128 -> 0, 128, 256 (no edge tile: 256 + 256 = 512)
    let g = tile_grid(512, 256, 256, 128);
    assert_eq!(g.iter().map(|t| t.x).collect::<Vec<_>>(), vec![0, 128, 256]);
    // a raster smaller than a tile is one tile, the whole raster, flagged on both axes
    assert_eq!(
        tile_grid(100, 80, 256, 256),
        vec![Tile {
            x: 0,
            y: 0,
            w: 100,
            h: 80,
            edge: EDGE_RIGHT | EDGE_BOTTOM
        }]
    );
    assert_eq!(tile_grid(256, 256, 256, 256).len(), 1);
}

/// Write an RGB8 TIFF (pixel (x, y) = (x, y, 7) mod 256) with extra tags.
fn write_tiff(path: &Path, w: u32, h: u32, tags: &[(Tag, Vec<f64>)], keys: Option<&[u16]>) {
    let mut enc = TiffEncoder::new(std::fs::File::create(path).unwrap()).unwrap();
    let mut img = enc.new_image::<colortype::RGB8>(w, h).unwrap();
    for (tag, values) in tags {
        img.encoder().write_tag(*tag, values.as_slice()).unwrap();
    }
    if let Some(k) = keys {
        img.encoder().write_tag(Tag::GeoKeyDirectoryTag, k).unwrap();
    }
    let data: Vec<u8> = (0..h)
        .flat_map(|y| (0..w).flat_map(move |x| [x as u8, y as u8, 7]))
        .collect();
    img.write_data(&data).unwrap();
}

/// A GeoKey directory: version 1.1.0 and the keys given (id, value) in place.
fn geokeys(keys: &[(u16, u16)]) -> Vec<u16> {
    let mut v = vec![1, 1, 0, keys.len() as u16];
    for &(id, value) in keys {
        v.extend_from_slice(&[id, 0, 1, value]);
    }
    v
}

#[test]
fn geotiff_boxes_match_hand_computed_values() {
    let dir = temp("geo");
    // UTM 33N, 10 m pixels, upper-left corner at (500000, 4000000); 300 x 200 pixels
    let p = dir.join("utm.tif");
    write_tiff(
        &p,
        300,
        200,
        &[
            (Tag::ModelPixelScaleTag, vec![10.0, 10.0, 0.0]),
            (
                Tag::ModelTiepointTag,
                vec![0.0, 0.0, 0.0, 500000.0, 4000000.0, 0.0],
            ),
        ],
        Some(&geokeys(&[(1024, 1), (1025, 1), (3072, 32633)])),
    );
    let g = read_georef(&p).unwrap().unwrap();
    assert_eq!(g.epsg, Some(32633));
    let grid = tile_grid(300, 200, 128, 128);
    assert_eq!(grid.len(), 6);
    // tile (0, 0): x 0..128 -> 500000..501280; y 0..128 -> 4000000 down to 3998720
    assert_eq!(
        g.bbox(&grid[0]),
        Some([500000.0, 3998720.0, 501280.0, 4000000.0])
    );
    // the last tile: x 172..300 -> 501720..503000; y 72..200 -> 3999280 down to 3998000
    let last = grid.last().unwrap();
    assert_eq!((last.x, last.y, last.edge), (172, 72, 3));
    assert_eq!(
        g.bbox(last),
        Some([501720.0, 3998000.0, 503000.0, 3999280.0])
    );

    // the same place by ModelTransformation, with a tiepoint away from the corner elsewhere
    let m = dir.join("matrix.tif");
    #[rustfmt::skip]
    let matrix = vec![
        10.0, 0.0, 0.0, 500000.0,
        0.0, -10.0, 0.0, 4000000.0,
        0.0, 0.0, 0.0, 0.0,
        0.0, 0.0, 0.0, 1.0,
    ];
    write_tiff(
        &m,
        300,
        200,
        &[(Tag::ModelTransformationTag, matrix)],
        Some(&geokeys(&[(3072, 32633)])),
    );
    assert_eq!(read_georef(&m).unwrap(), Some(g));
    // tiepoint at pixel (100, 50), geographic (EPSG:4326), 0.001 degree pixels
    let t = dir.join("tie.tif");
    write_tiff(
        &t,
        64,
        64,
        &[
            (Tag::ModelPixelScaleTag, vec![0.001, 0.001, 0.0]),
            (
                Tag::ModelTiepointTag,
                vec![100.0, 50.0, 0.0, 10.1, 45.05, 0.0],
            ),
        ],
        Some(&geokeys(&[(1024, 2), (2048, 4326)])),
    );
    let gt = read_georef(&t).unwrap().unwrap();
    assert_eq!(gt.epsg, Some(4326));
    let b = gt
        .bbox(&Tile {
            x: 0,
            y: 0,
            w: 64,
            h: 64,
            edge: 0,
        })
        .unwrap();
    let want = [10.0, 45.1 - 0.064, 10.064, 45.1];
    assert!(
        b.iter().zip(want).all(|(a, w)| (a - w).abs() < 1e-9),
        "{b:?}"
    );
    // PixelIsPoint: the tiepoint is a pixel's centre, so the corner is half a pixel further out
    let pt = dir.join("point.tif");
    write_tiff(
        &pt,
        10,
        10,
        &[
            (Tag::ModelPixelScaleTag, vec![2.0, 2.0, 0.0]),
            (
                Tag::ModelTiepointTag,
                vec![0.0, 0.0, 0.0, 100.0, 200.0, 0.0],
            ),
        ],
        Some(&geokeys(&[(1025, 2), (3072, 3857)])),
    );
    assert_eq!(
        read_georef(&pt).unwrap(),
        Some(GeoRef {
            epsg: Some(3857),
            x0: 99.0,
            dx: 2.0,
            y0: 201.0,
            dy: -2.0
        })
    );
    // rotated: pixel boxes only; no GeoTIFF tags, or not a TIFF: none
    let r = dir.join("rotated.tif");
    #[rustfmt::skip]
    let rot = vec![
        8.0, 6.0, 0.0, 500000.0,
        6.0, -8.0, 0.0, 4000000.0,
        0.0, 0.0, 0.0, 0.0,
        0.0, 0.0, 0.0, 1.0,
    ];
    write_tiff(&r, 8, 8, &[(Tag::ModelTransformationTag, rot)], None);
    assert_eq!(read_georef(&r).unwrap(), None);
    let plain = dir.join("plain.tif");
    write_tiff(&plain, 8, 8, &[], None);
    assert_eq!(read_georef(&plain).unwrap(), None);
    // user-defined CRS: a box without an EPSG code
    let u = dir.join("user.tif");
    write_tiff(
        &u,
        8,
        8,
        &[
            (Tag::ModelPixelScaleTag, vec![1.0, 1.0, 0.0]),
            (Tag::ModelTiepointTag, vec![0.0, 0.0, 0.0, 0.0, 0.0, 0.0]),
        ],
        Some(&geokeys(&[(3072, 32767)])),
    );
    assert_eq!(read_georef(&u).unwrap().unwrap().epsg, None);
    // write_geotiff writes what read_georef reads, projected and geographic
    for geo in [g, gt] {
        let w = dir.join("written.tif");
        let img = load_raster(&p, None, LoadLimits::default()).unwrap();
        harma_raster::write_geotiff(&w, &img, &geo).unwrap();
        assert_eq!(read_georef(&w).unwrap(), Some(geo));
        assert_eq!(load_raster(&w, None, LoadLimits::default()).unwrap(), img);
    }
    // and the pixels are what `harma embed` decodes
    let img = load_raster(&p, None, LoadLimits::default()).unwrap();
    assert_eq!((img.width, img.height), (300, 200));
    assert_eq!(&img.data[(5 * 300 + 260) * 3..][..3], &[4, 5, 7]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A TIFF colour type of `$n` unsigned `$t` bands marked grey (BlackIsZero), written without
/// a predictor: the multispectral exports the band tests read.
macro_rules! grey_bands {
    ($(#[doc = $doc:literal])* $name:ident, $t:ty, $bits:literal, $n:literal) => {
        $(#[doc = $doc])*
        struct $name;
        impl ColorType for $name {
            type Inner = $t;
            const TIFF_VALUE: PhotometricInterpretation = PhotometricInterpretation::BlackIsZero;
            const BITS_PER_SAMPLE: &'static [u16] = &[$bits; $n];
            const SAMPLE_FORMAT: &'static [SampleFormat] = &[SampleFormat::Uint; $n];
            fn horizontal_predict(_: &[$t], _: &mut Vec<$t>) {
                unreachable!("written without a predictor")
            }
        }
    };
}

grey_bands!(
    /// Five-band 16-bit TIFFs, as Sentinel-2 or Landsat exports.
    Bands5U16, u16, 16, 5
);
grey_bands!(
    /// Five-band 8-bit.
    Bands5U8, u8, 8, 5
);
grey_bands!(
    /// Three-band 8-bit marked grey: a multispectral export, not an RGB photo.
    Bands3U8, u8, 8, 3
);

/// A folder as users keep them: RGB photos (PNG, JPEG, an RGB TIFF, an RGBA PNG, a grey PNG)
/// beside multispectral rasters. `--bands 3,2,1` applies to the rasters whose layout needs it
/// (a 5-band and a 3-band multispectral TIFF, a 16-bit RGB TIFF); every 8-bit photo is read as
/// RGB, as without `--bands`.
#[test]
fn bands_apply_to_multispectral_rasters_and_leave_photos_in_colour() {
    let dir = temp("mixed");
    let bgr = Some("3,2,1".parse::<Bands>().unwrap());
    let px: Vec<u8> = (0..2 * 2 * 3).map(|v| 20 * v as u8).collect();
    let rgb = image::RgbImage::from_raw(2, 2, px.clone()).unwrap();
    let write = |name: &str, f: &dyn Fn(&std::path::Path)| {
        let p = dir.join(name);
        f(&p);
        p
    };
    let photos = [
        write("photo.png", &|p| rgb.save(p).unwrap()),
        write("photo.jpg", &|p| rgb.save(p).unwrap()),
        write("photo.tif", &|p| {
            TiffEncoder::new(std::fs::File::create(p).unwrap())
                .unwrap()
                .write_image::<colortype::RGB8>(2, 2, &px)
                .unwrap()
        }),
        write("alpha.png", &|p| {
            image::DynamicImage::ImageRgb8(rgb.clone())
                .to_rgba8()
                .save(p)
                .unwrap()
        }),
        write("grey.png", &|p| {
            image::DynamicImage::ImageRgb8(rgb.clone())
                .to_luma8()
                .save(p)
                .unwrap()
        }),
    ];
    for p in &photos {
        assert!(!bands_apply(p), "{}", p.display());
        let plain = load_raster(p, None, LoadLimits::default()).unwrap();
        let with = load_raster(p, bgr.as_ref(), LoadLimits::default()).unwrap();
        assert_eq!(
            with,
            plain,
            "{}: read as RGB whatever --bands says",
            p.display()
        );
    }
    // the RGB photo's colours are its own, not swapped
    let tif = load_raster(&photos[2], bgr.as_ref(), LoadLimits::default()).unwrap();
    assert_eq!(tif.data, px);
    let ms3 = write("ms3.tif", &|p| {
        TiffEncoder::new(std::fs::File::create(p).unwrap())
            .unwrap()
            .write_image::<Bands3U8>(2, 2, &px)
            .unwrap()
    });
    let wide = write("rgb16.tif", &|p| {
        let v: Vec<u16> = px.iter().map(|&x| 100 * x as u16).collect();
        TiffEncoder::new(std::fs::File::create(p).unwrap())
            .unwrap()
            .write_image::<colortype::RGB16>(2, 2, &v)
            .unwrap()
    });
    for p in [&ms3, &wide] {
        assert!(bands_apply(p), "{}", p.display());
    }
    // the multispectral raster's bands 3, 2, 1 as red, green, blue
    let img = load_raster(&ms3, bgr.as_ref(), LoadLimits::default()).unwrap();
    let swapped: Vec<u8> = px.chunks(3).flat_map(|c| [c[2], c[1], c[0]]).collect();
    assert_eq!(img.data, swapped);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bands_are_picked_and_wide_samples_stretched() {
    let dir = temp("bands");
    // 8-bit: band b of pixel i is 10 * b + i
    let (w, h) = (10usize, 10usize);
    let p8 = dir.join("five8.tif");
    let data: Vec<u8> = (0..w * h)
        .flat_map(|i| (0..5).map(move |b| (10 * b + i) as u8))
        .collect();
    TiffEncoder::new(std::fs::File::create(&p8).unwrap())
        .unwrap()
        .write_image::<Bands5U8>(w as u32, h as u32, &data)
        .unwrap();
    let img = load_raster(
        &p8,
        Some(&"5,3,1".parse::<Bands>().unwrap()),
        LoadLimits::default(),
    )
    .unwrap();
    assert_eq!(&img.data[..6], &[40, 20, 0, 41, 21, 1]);
    let grey = load_raster(
        &p8,
        Some(&"2".parse::<Bands>().unwrap()),
        LoadLimits::default(),
    )
    .unwrap();
    assert_eq!(&grey.data[3 * 7..3 * 8], &[17, 17, 17]);
    // without --bands: refused with advice
    let e = load_raster(&p8, None, LoadLimits::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("has 5 bands") && e.contains("--bands"), "{e}");
    let e = load_raster(
        &p8,
        Some(&"6,2,1".parse::<Bands>().unwrap()),
        LoadLimits::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("has 5 band(s)") && e.contains("band 6"), "{e}");

    // 16-bit: band 1 runs 1000..1100 over 101 pixels; its 2nd and 98th percentiles are 1002
    // and 1098, so value v maps to round((v - 1002) * 255 / 96) clamped to 0..=255
    let p16 = dir.join("five16.tif");
    let n = 101usize;
    let data: Vec<u16> = (0..n)
        .flat_map(|i| (0..5).map(move |b| if b == 0 { 1000 + i as u16 } else { 7 }))
        .collect();
    TiffEncoder::new(std::fs::File::create(&p16).unwrap())
        .unwrap()
        .write_image::<Bands5U16>(n as u32, 1, &data)
        .unwrap();
    let img = load_raster(
        &p16,
        Some(&"1,2,1".parse::<Bands>().unwrap()),
        LoadLimits::default(),
    )
    .unwrap();
    let red: Vec<u8> = img.data.chunks(3).map(|p| p[0]).collect();
    let want: Vec<u8> = (0..n)
        .map(|i| ((i as f64 - 2.0) * 255.0 / 96.0).round().clamp(0.0, 255.0) as u8)
        .collect();
    assert_eq!(red, want);
    assert_eq!((red[50], red[0], red[100]), (128, 0, 255));
    // a constant band has no range: black
    assert!(img.data.chunks(3).all(|p| p[1] == 0 && p[2] == p[0]));

    std::fs::remove_dir_all(&dir).unwrap();
}

/// A finite but huge pixel scale (a crafted or broken GeoTIFF: 1e306 m per pixel) gives no
/// box rather than an infinite one (which became GeoJSON polygons of nulls).
#[test]
fn a_box_that_overflows_is_no_box() {
    let g = harma_raster::GeoRef {
        epsg: Some(32633),
        x0: 0.0,
        dx: 1e306,
        y0: 0.0,
        dy: -1e306,
    };
    let t = |x: usize, w: usize| Tile {
        x,
        y: 0,
        w,
        h: 1,
        edge: 0,
    };
    // one pixel is still finite; 256 of them are not (f64 ends at 1.8e308)
    assert_eq!(g.bbox(&t(0, 1)), Some([0.0, -1e306, 1e306, 0.0]));
    assert_eq!(g.bbox(&t(0, 256)), None);
    assert_eq!(g.bbox(&t(200, 1)), None);
}
