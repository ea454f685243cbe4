//! `cargo xtask reproduce --quick` end to end against a local HTTP server on 127.0.0.1 that
//! plays the Hugging Face Hub (`HF_ENDPOINT`) and GitHub (`HARMA_GITHUB_RAW`), serving a small
//! generated stand-in for RSITMD (annotations and an image zip) and a tiny CLIP with random
//! weights as "GeoRSCLIP RET-2": fetch, zero-shot, training, test with the best-by-val
//! adapters, the report and its comparison with the published numbers; stopped half-way and
//! continued by rerunning the same command; a third run finds it finished.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::Digest;

mod common;
use common::{serve, State};

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("harma-reproduce-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The stand-ins: generated scenes as RSITMD (annotations + a zip of the images under another
/// prefix) and a tiny random CLIP as the backbone; the files the server gives, and a sources
/// list pointing at them.
fn stand_ins(dir: &Path) -> (HashMap<String, Vec<u8>>, serde_json::Value) {
    let gen = dir.join("gen");
    let sizes = harma_train::synth::SynthSizes {
        train: 32,
        val: 8,
        test: 8,
        size: 64,
        ext: "png",
    };
    harma_train::synth::write_dataset(&gen, sizes, 11).unwrap();
    let mut files = HashMap::new();
    let mut ann = serde_json::Map::new();
    for split in ["train", "val", "test"] {
        let path = format!("data/finetune/rsitmd_{split}.json");
        let bytes = std::fs::read(gen.join(format!("{split}.json"))).unwrap();
        ann.insert(
            format!("{split}.json"),
            serde_json::json!({"path": path, "sha256": format!("{:x}", sha2::Sha256::digest(&bytes))}),
        );
        files.insert(format!("/raw/test/harma/main/{path}"), bytes);
    }
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default();
    for e in std::fs::read_dir(gen.join("images")).unwrap() {
        let e = e.unwrap();
        let name = format!("RSITMD/images/{}", e.file_name().to_string_lossy());
        zip.start_file(name, opts).unwrap();
        zip.write_all(&std::fs::read(e.path()).unwrap()).unwrap();
    }
    let zip = zip.finish().unwrap().into_inner();
    files.insert("/datasets/test/data/resolve/main/rsitmd.zip".into(), zip);

    let clip = harma_clip::ClipConfig::tiny(harma_clip::Activation::QuickGelu);
    let mut rng = harma_data::rng::Rng::new(3);
    let model = gen.join("tiny.safetensors");
    harma_clip::checkpoint::write_random_backbone(
        &clip,
        harma_clip::checkpoint::RandomInit::FanIn,
        &mut || rng.uniform(),
        &model,
    )
    .unwrap();
    let bytes = std::fs::read(&model).unwrap();
    let sha = format!("{:x}", sha2::Sha256::digest(&bytes));
    files.insert(
        "/test/clip/resolve/main/ckpt/tiny.safetensors".into(),
        bytes,
    );
    let sources = serde_json::json!({
        "models": {"georsclip-ret2": {
            "hf": {"repo": "test/clip", "type": "model", "file": "ckpt/tiny.safetensors", "sha256": sha},
            "dest": "models/tiny-clip.safetensors", "licence": "test"}},
        "datasets": {"rsitmd": {
            "annotations": {"github": "test/harma", "branch": "main", "files": ann},
            "images": {"hf": {"repo": "test/data", "type": "dataset", "file": "rsitmd.zip"}},
            "licence": "test"}}
    });
    (files, sources)
}

#[test]
fn reproduce_quick_fetches_trains_reports_and_continues() {
    let dir = temp_dir("quick");
    let (files, sources) = stand_ins(&dir);
    let state = Arc::new(Mutex::new(State {
        files,
        ..State::default()
    }));
    let base = serve(state.clone());
    // every request for a file's bytes (the Hub's one-byte probes are not counted)
    let hits = || state.lock().unwrap().requests.len();
    let sources_path = dir.join("sources.json");
    std::fs::write(&sources_path, sources.to_string()).unwrap();
    let out = dir.join("report");
    let reproduce = |extra: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(["reproduce", "--quick", "--dataset", "rsitmd"])
            .args(["--backbone", "georsclip-ret2", "--sources"])
            .arg(&sources_path)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--out")
            .arg(&out)
            // the tiny backbone and a schedule that fits a test
            .args(["--set", "arch=tiny-quickgelu", "--set", "batch_size=8"])
            .args(["--set", "steps=12", "--set", "val_every=6"])
            .args(extra)
            .env("HF_ENDPOINT", &base)
            .env("HF_HOME", dir.join("hf"))
            .env("HARMA_GITHUB_RAW", format!("{base}/raw"))
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(o.status.success(), "{text}");
        text
    };
    let steps = || {
        std::fs::read_to_string(out.join("log.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect::<Vec<_>>()
    };

    // stopped after 6 steps (as Ctrl-C would): a report of the run so far, and how to go on
    let text = reproduce(&["--stop-after", "6"]);
    assert!(
        text.contains("continue with: cargo xtask reproduce"),
        "{text}"
    );
    assert_eq!(steps(), (1..=6).collect::<Vec<_>>());
    let fetched = hits();
    assert!(fetched >= 5, "annotations, images and the model: {fetched}");
    assert!(dir.join("data/rsitmd/.complete").exists());
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("in progress: step 6 of 12"), "{md}");

    // the same command continues where it stopped, downloading nothing again
    let text = reproduce(&[]);
    assert!(text.contains("continuing the run"), "{text}");
    assert_eq!(steps(), (1..=12).collect::<Vec<_>>());
    assert_eq!(hits(), fetched, "nothing is downloaded twice");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    let zero = m["start"]["test"]["r_mean"].as_f64().unwrap();
    let test = m["test"]["r_mean"].as_f64().unwrap();
    assert_eq!(m["test"]["adapters"], "best.safetensors");
    assert_eq!(m["val"].as_array().unwrap().len(), 2);

    // the comparison: every published row with its source, ours beside the comparable ones,
    // and the gap
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    let line = |start: &str| {
        md.lines()
            .find(|l| l.starts_with(&format!("| {start}")))
            .unwrap_or_else(|| panic!("no `{start}` row in\n{md}"))
            .to_string()
    };
    let harma = line("HarMA from GeoRSCLIP RET-2");
    assert!(
        harma.contains("arXiv:2404.18253") && harma.contains("52.27"),
        "{harma}"
    );
    assert!(harma.contains(&format!("{test:.2}")), "{harma}");
    assert!(harma.contains(&format!("{:+.2}", test - 52.27)), "{harma}");
    let ret2 = line("GeoRSCLIP RET-2 checkpoint alone");
    assert!(
        ret2.contains("RS5M README") && ret2.contains("51.81"),
        "{ret2}"
    );
    assert!(
        ret2.contains(&format!("{zero:.2}")) && ret2.contains(&format!("{:+.2}", zero - 51.81))
    );
    assert!(line("RemoteCLIP ViT-B/32").contains("49.38"));
    assert!(md.contains("already fine-tuned for retrieval on the training splits of RSITMD"));
    assert!(md.contains("Changed from the recipe with --set: `arch = \"tiny-quickgelu\"`"));
    assert!(
        text.contains("HarMA from GeoRSCLIP RET-2") && text.contains("report: "),
        "{text}"
    );
    // the run's report: the training and validation curves, examples, hashes of what it read
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("Against the published numbers") && html.contains("<svg"));
    assert!(!html.contains("http:") && !html.contains("https:"));
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(
        info["sessions"].as_array().unwrap().len(),
        2,
        "two sessions"
    );
    assert_eq!(
        info["data"][0]["sha256"],
        sources["datasets"]["rsitmd"]["annotations"]["files"]["train.json"]["sha256"]
    );
    assert_eq!(
        info["init"]["sha256"],
        sources["models"]["georsclip-ret2"]["hf"]["sha256"]
    );
    let cfg = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(
        cfg.contains("triplet_weight = 1.0")
            && cfg.contains("emulate_ddp = 2")
            && cfg.contains("seed = 3407"),
        "{cfg}"
    );

    // a finished report is rebuilt, not retrained
    let text = reproduce(&[]);
    assert!(text.contains("is finished"), "{text}");
    assert_eq!(steps().len(), 12);
    std::fs::remove_dir_all(&dir).ok();
}

/// `--dry-run` prints the config.toml the recipe resolves to (the original's: both losses at
/// weight 1 over the global batch of 428, its two-GPU update) and touches nothing: no data
/// folder, no report folder, no request (the default sources point at the real hosts, which
/// this machine cannot reach).
#[test]
fn reproduce_dry_run_prints_the_recipe_and_fetches_nothing() {
    let dir = temp_dir("dry");
    for (dataset, epochs) in [("rsitmd", 80), ("rsicd", 80)] {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(["reproduce", "--dry-run", "--dataset", dataset])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .current_dir(&dir)
            .env("HF_ENDPOINT", "http://127.0.0.1:9")
            .env("HARMA_GITHUB_RAW", "http://127.0.0.1:9")
            .output()
            .unwrap();
        let (out, err) = (
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
        );
        assert!(o.status.success(), "{out}{err}");
        let cfg: toml::Table = out.parse().unwrap_or_else(|e| panic!("{e}: {out}"));
        let get = |k: &str| cfg.get(k).unwrap_or_else(|| panic!("no `{k}` in {out}"));
        assert_eq!(get("emulate_ddp").as_integer(), Some(2), "{out}");
        assert_eq!(get("triplet_weight").as_float(), Some(1.0), "{out}");
        assert_eq!(get("contrastive_weight").as_float(), Some(1.0), "{out}");
        assert_eq!(get("batch_size").as_integer(), Some(428), "{out}");
        assert_eq!(get("epochs").as_integer(), Some(epochs), "{out}");
        assert_eq!(get("lr").as_float(), Some(4e-6), "{out}");
        assert_eq!(get("dataset").as_str(), Some(dataset), "{out}");
        let train = get("train_json").as_str().unwrap();
        assert!(train.ends_with(&format!("{dataset}/train.json")), "{train}");
    }
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "--dry-run wrote {left:?}");
    std::fs::remove_dir_all(&dir).ok();
}
