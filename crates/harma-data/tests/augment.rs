//! The train transform: each RandAugment operation against the original's numpy/OpenCV code
//! (fixtures/make_augment.py), and the statistics of the random parts.

use std::path::PathBuf;

use harma_data::augment::{self, crop_box, TrainTransform};
use harma_data::rng::Rng;
use harma_data::RgbImage;

fn fixtures() -> safetensors::SafeTensors<'static> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/augment.safetensors");
    let bytes: &'static [u8] = Box::leak(std::fs::read(path).unwrap().into_boxed_slice());
    safetensors::SafeTensors::deserialize(bytes).unwrap()
}

fn image(st: &safetensors::SafeTensors, name: &str) -> RgbImage {
    let t = st.tensor(name).unwrap();
    let shape = t.shape();
    RgbImage {
        width: shape[1],
        height: shape[0],
        data: t.data().to_vec(),
    }
}

#[test]
fn operations_match_the_original() {
    let st = fixtures();
    let m = 0.7;
    type Op = Box<dyn Fn(&RgbImage) -> RgbImage>;
    let ops: Vec<(&str, Op)> = vec![
        ("autocontrast", Box::new(augment::autocontrast)),
        ("equalize", Box::new(augment::equalize)),
        (
            "brightness",
            Box::new(move |x| augment::brightness(x, m * 1.8 + 0.1)),
        ),
        (
            "sharpness",
            Box::new(move |x| augment::sharpness(x, m * 1.8 + 0.1)),
        ),
        (
            "shear_x_pos",
            Box::new(move |x| augment::shear_x(x, m * 0.3)),
        ),
        (
            "shear_x_neg",
            Box::new(move |x| augment::shear_x(x, -m * 0.3)),
        ),
        (
            "shear_y_pos",
            Box::new(move |x| augment::shear_y(x, m * 0.3)),
        ),
        (
            "translate_x_pos",
            Box::new(move |x| augment::translate(x, m * 10.0, 0.0)),
        ),
        (
            "translate_y_neg",
            Box::new(move |x| augment::translate(x, 0.0, -m * 10.0)),
        ),
        (
            "rotate_pos",
            Box::new(move |x| augment::rotate(x, m * 30.0)),
        ),
        (
            "rotate_neg",
            Box::new(move |x| augment::rotate(x, -m * 30.0)),
        ),
    ];
    for input in ["img", "low"] {
        let src = image(&st, &format!("{input}.input"));
        for (op, f) in &ops {
            let want = image(&st, &format!("{input}.{op}"));
            let got = f(&src);
            assert_eq!((got.width, got.height), (want.width, want.height));
            let (mut worst, mut over, mut n) = (0i32, 0usize, 0usize);
            for (&a, &b) in got.data.iter().zip(&want.data) {
                // the original wraps out-of-range sharpened values around; we clamp
                if *op == "sharpness" && (a == 0 || a == 255) {
                    continue;
                }
                let d = (a as i32 - b as i32).abs();
                worst = worst.max(d);
                over += (d > 2) as usize;
                n += 1;
            }
            eprintln!("{input}.{op}: max diff {worst}, {over} of {n} values off by > 2");
            // OpenCV interpolates in 5-bit fixed point; we use f64
            assert!(
                worst <= 1,
                "{input}.{op}: max diff {worst} ({over} values off by > 2)"
            );
            let exact = !op.starts_with("shear") && !op.starts_with("rot");
            if exact {
                assert_eq!(worst, 0, "{input}.{op}");
            }
        }
    }
}

fn test_image() -> RgbImage {
    let st = fixtures();
    image(&st, "img.input")
}

#[test]
fn output_size_range_and_determinism() {
    let img = test_image();
    let t = TrainTransform::harma(32);
    let a = t.apply(&img, &mut Rng::derive(3407, &[0, 5]));
    let b = t.apply(&img, &mut Rng::derive(3407, &[0, 5]));
    assert_eq!((a.width, a.height, a.data.len()), (32, 32, 32 * 32 * 3));
    assert_eq!(a, b, "same seed and position, same output");
    let differ = (0..20)
        .filter(|&i| t.apply(&img, &mut Rng::derive(3407, &[1, i])) != a)
        .count();
    assert!(
        differ >= 19,
        "other positions give other crops ({differ} of 20 differ)"
    );
    let n = harma_data::image::normalize_chw(&a);
    for (c, chunk) in n.chunks(32 * 32).enumerate() {
        let lo = -harma_data::CLIP_MEAN[c] / harma_data::CLIP_STD[c];
        let hi = (1.0 - harma_data::CLIP_MEAN[c]) / harma_data::CLIP_STD[c];
        assert!(chunk.iter().all(|&v| v >= lo - 1e-6 && v <= hi + 1e-6));
    }
    // no augmentation: the evaluation resize
    assert_eq!(
        TrainTransform::none(32).apply(&img, &mut Rng::new(1)),
        harma_data::resize_bicubic(&img, 32, 32)
    );
}

#[test]
fn crop_areas_and_aspects_follow_random_resized_crop() {
    let mut rng = Rng::new(11);
    let (n, mut area_sum) = (4000, 0.0);
    for _ in 0..n {
        let (x, y, w, h) = crop_box(256, 256, (0.5, 1.0), &mut rng);
        assert!(x + w <= 256 && y + h <= 256);
        let area = (w * h) as f64 / (256.0 * 256.0);
        // rounding of w and h moves the area a little outside the drawn fraction
        assert!((0.49..=1.0).contains(&area), "area {area}");
        let aspect = w as f64 / h as f64;
        assert!((0.74..=1.34).contains(&aspect), "aspect {aspect}");
        area_sum += area;
    }
    // uniform area in [0.5, 1] has mean 0.75, but large areas with far-from-square aspects do
    // not fit and are redrawn: the mean of torchvision's get_params on a 256x256 image
    // (fixtures/make_crop_areas.py, 200,000 draws), within 4 standard deviations of the
    // difference of the two means
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/crop_areas.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let (want, sd, draws) = (
        reference["mean_area"].as_f64().unwrap(),
        reference["sd_area"].as_f64().unwrap(),
        reference["draws"].as_f64().unwrap(),
    );
    assert_eq!(reference["size"], 256);
    let tol = 4.0 * (sd * sd / n as f64 + sd * sd / draws).sqrt();
    let mean = area_sum / n as f64;
    eprintln!("mean crop area {mean:.5}, torchvision's {want:.5} (tolerance {tol:.4})");
    assert!((mean - want).abs() < tol, "mean area {mean} vs {want}");
    // a 3:1 strip that no draw fits: the centre crop at the extreme ratio
    let mut rng = Rng::new(2);
    assert_eq!(crop_box(300, 10, (0.99, 1.0), &mut rng), (143, 0, 13, 10));
}

#[test]
fn half_the_images_are_flipped() {
    let img = test_image();
    let t = TrainTransform {
        size: 48,
        crop_scale: None,
        flip: true,
        rand_augment: None,
    };
    let plain = harma_data::resize_bicubic(&img, 48, 48);
    let flipped = augment::hflip(&plain);
    let n = 2000;
    let mut flips = 0;
    for i in 0..n {
        let out = t.apply(&img, &mut Rng::derive(5, &[i]));
        if out == flipped {
            flips += 1;
        } else {
            assert_eq!(out, plain);
        }
    }
    // binomial(2000, 0.5): sd 22
    assert!((flips as i64 - 1000).abs() < 100, "{flips} of {n} flipped");
}

#[test]
fn rand_augment_applies_each_draw_half_the_time() {
    // two draws, each applied with p = 0.5 and Identity 1 in 10: unchanged with p = 0.3025
    let img = test_image();
    let n = 1000;
    let unchanged = (0..n)
        .filter(|&i| augment::rand_augment(&img, 2, 7.0, &mut Rng::derive(9, &[i])) == img)
        .count();
    assert!(
        (unchanged as f64 / n as f64 - 0.3025).abs() < 0.05,
        "{unchanged} of {n}"
    );
}

#[test]
fn the_originals_autocontrast_whitens_what_pil_stretches() {
    // Documented divergence: the original wraps `-low` around in uint8.
    let st = fixtures();
    for input in ["img", "low"] {
        let original = image(&st, &format!("{input}.autocontrast_original"));
        let white = original.data.iter().filter(|&&v| v == 255).count();
        assert!(white * 10 > original.data.len() * 9, "{input}: {white}");
        let ours = augment::autocontrast(&image(&st, &format!("{input}.input")));
        assert!(ours.data.iter().filter(|&&v| v == 255).count() * 10 < ours.data.len());
    }
}
