//! `harma embed` end to end: real files in, safetensors out, compared with open_clip +
//! PIL/torchvision on the same inputs (crates/harma-clip/tests/fixtures/make_fixtures.py, `cli/`).

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../harma-clip/tests/fixtures")
}

fn harma(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_harma"))
        .args(args)
        .output()
        .expect("run harma")
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("harma-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn read(path: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let data = v
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (n, v.shape().to_vec(), data)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// `harma embed` with the fixture model (tests/fixtures/cli) writing `out`, plus `extra` flags.
fn embed_fixture_model(out: &Path, extra: &[&str]) -> std::process::Output {
    let f = fixtures();
    let (model, arch) = (f.join("cli/model.safetensors"), f.join("cli/config.json"));
    let mut args = vec![
        "embed",
        "--model",
        model.to_str().unwrap(),
        "--arch",
        arch.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    harma(&args)
}

#[test]
fn embed_matches_open_clip_on_files() {
    let dir = temp_dir("embed");
    let out = dir.join("embeds.safetensors");
    let f = fixtures();
    let caps = f.join("cli/captions.txt");
    let o = embed_fixture_model(
        &out,
        &[
            "--images",
            f.join("images").to_str().unwrap(),
            "--captions",
            caps.to_str().unwrap(),
            "--batch-size",
            "3",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ours = read(&out);
    let want = read(&f.join("cli/expected.safetensors"));
    assert_eq!(ours.len(), 2);
    for ((n, s, a), (wn, ws, b)) in ours.iter().zip(&want) {
        assert_eq!((n, s), (wn, ws));
        let err = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        eprintln!("{n} {s:?}: max abs err {err:.2e}");
        assert!(err <= 1e-5, "{n}: max abs err {err}");
    }
    assert_eq!(ours[0].1, vec![8, 8], "8 images");
    assert_eq!(ours[1].1, vec![12, 8], "12 non-empty caption lines");
    // the image names are recorded, in file-name order
    let bytes = std::fs::read(&out).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let names: Vec<String> =
        serde_json::from_str(&meta.metadata().as_ref().unwrap()["image_names"]).unwrap();
    assert_eq!(names.len(), 8);
    assert_eq!(names[..2], ["alpha.png", "grey.png"]);
    // nothing but the output is left behind
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(left.len(), 1);
    // mixed precision stays close to open_clip's f32 embeddings
    let out16 = dir.join("bf16.safetensors");
    let o = embed_fixture_model(
        &out16,
        &["--captions", caps.to_str().unwrap(), "--precision", "bf16"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let (_, _, a) = &read(&out16)[0];
    let err = a
        .iter()
        .zip(&want[1].2)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    eprintln!("bf16 captions: max abs err {err:.2e}");
    assert!(err < 3e-2 && err > 1e-6, "bf16 captions: max abs err {err}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn embed_errors_name_the_culprit_and_write_nothing() {
    let dir = temp_dir("bad");
    let f = fixtures();
    let out = dir.join("o.safetensors");
    let model = f.join("cli/model.safetensors");
    // a corrupt image among good ones
    let imgs = dir.join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    std::fs::copy(f.join("images/grey.png"), imgs.join("a.png")).unwrap();
    std::fs::write(imgs.join("b.tif"), b"II*\0 not really a tiff").unwrap();
    let run = |extra: &[&str]| {
        let o = embed_fixture_model(&out, extra);
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let err = run(&["--images", imgs.to_str().unwrap()]);
    assert!(err.contains("b.tif"), "{err}");
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "\n  \n").unwrap();
    let err = run(&["--captions", empty.to_str().unwrap()]);
    assert!(
        err.contains("empty.txt") && err.contains("no non-empty lines"),
        "{err}"
    );
    let err = run(&["--captions", dir.join("missing.txt").to_str().unwrap()]);
    assert!(err.contains("missing.txt"), "{err}");
    let err = run(&[]);
    assert!(err.contains("--images"), "{err}");
    let caps = f.join("cli/captions.txt");
    let err = run(&["--captions", caps.to_str().unwrap(), "--precision", "fp16"]);
    // refused by the flag's parser, naming the value, the flag and the choices
    assert!(
        err.contains("invalid value 'fp16' for '--precision")
            && err.contains("[possible values: f32, bf16]"),
        "{err}"
    );
    // the wrong architecture for the checkpoint
    let o = harma(&[
        "embed",
        "--model",
        model.to_str().unwrap(),
        "--arch",
        "tiny",
        "--captions",
        f.join("cli/captions.txt").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("wrong shapes"), "{err}");
    assert!(!out.exists(), "no output after a failure");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn embed_applies_adapters_from_the_checkpoint_or_a_file() {
    let dir = temp_dir("adapters");
    let a = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../harma-adapters/tests/fixtures");
    let imgs = fixtures().join("images");
    let (model, arch) = (a.join("harma.pth"), a.join("config.json"));
    let run = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "embed",
            "--model",
            model.to_str().unwrap(),
            "--arch",
            arch.to_str().unwrap(),
            "--images",
            imgs.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = harma(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stderr).into_owned()
    };
    let inside = dir.join("inside.safetensors");
    let log = run(&inside, &[]);
    assert!(
        log.contains("adapters from") && log.contains("harma.pth"),
        "{log}"
    );
    let file = dir.join("file.safetensors");
    let log = run(
        &file,
        &[
            "--adapters",
            a.join("adapters.safetensors").to_str().unwrap(),
        ],
    );
    assert!(log.contains("adapters.safetensors"), "{log}");
    assert_eq!(read(&inside), read(&file));
    // the wrong topology for these adapters is refused with the keys at fault
    let o = harma(&[
        "embed",
        "--model",
        a.join("harma.pth").to_str().unwrap(),
        "--arch",
        a.join("config.json").to_str().unwrap(),
        "--images",
        imgs.to_str().unwrap(),
        "--sharing",
        "none",
        "--out",
        dir.join("x.safetensors").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.contains("unexpected `transformer.resblocks.0.mmadapter.BiShareAdapterxx"),
        "{err}"
    );
    std::fs::remove_dir_all(dir).ok();
}

/// Any file name comes back from the output's metadata as it was: a newline in a name does
/// not shift the names after it, and a name that is not UTF-8 is flagged, not silently mangled.
#[test]
fn every_image_name_round_trips_or_is_flagged() {
    use std::os::unix::ffi::OsStrExt;
    let dir = temp_dir("names");
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let png = std::fs::read(fixtures().join("images/alpha.png")).unwrap();
    let odd = std::ffi::OsStr::from_bytes(b"z\xff.png");
    for name in [
        std::ffi::OsStr::new("a\nb.png"),
        std::ffi::OsStr::new("c.png"),
        odd,
    ] {
        std::fs::write(images.join(name), &png).unwrap();
    }
    let out = dir.join("e.safetensors");
    let o = embed_fixture_model(&out, &["--images", images.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("not a UTF-8 file name"), "{stderr}");
    let bytes = std::fs::read(&out).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    let names: Vec<String> = serde_json::from_str(&meta["image_names"]).unwrap();
    assert_eq!(names, ["a\nb.png", "c.png", "z\u{fffd}.png"]);
    assert_eq!(meta["image_names_lossy"], "[2]");
    assert_eq!(read(&out)[0].1, vec![3, 8]);
    std::fs::remove_dir_all(dir).ok();
}
