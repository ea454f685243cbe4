//! Run reports on real (small) runs: a generated scene set and a tiny random CLIP. The report
//! files exist and hold the run's own numbers (report.md parsed back and compared with
//! metrics.json, log.jsonl and the files' hashes), the HTML refers to nothing outside itself,
//! `harma report` rebuilds a page from the folder alone, `harma report --compare` sets two
//! runs side by side, and `harma eval --report` reports the numbers the run recorded.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Result;
use harma_trainer::config::TrainConfig;
use harma_trainer::train::{train, Control};
use sha2::Digest;

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("harma-report-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Generated scenes (24 train, 8 val, 8 test) and a tiny QuickGELU CLIP with random weights.
fn setup(dir: &Path) -> PathBuf {
    let sizes = harma_train::synth::SynthSizes {
        train: 24,
        val: 8,
        test: 8,
        size: 64,
        ext: "png",
    };
    harma_train::synth::write_dataset(&dir.join("data"), sizes, 5).unwrap();
    let clip = harma_clip::ClipConfig::tiny(harma_clip::Activation::QuickGelu);
    let mut rng = harma_data::rng::Rng::new(9);
    let model = dir.join("model.safetensors");
    harma_clip::checkpoint::write_random_backbone(
        &clip,
        harma_clip::checkpoint::RandomInit::FanIn,
        &mut || rng.uniform(),
        &model,
    )
    .unwrap();
    model
}

fn run(dir: &Path, model: &Path, name: &str, extra: &[&str]) -> Result<TrainConfig> {
    let data = dir.join("data");
    let p = |f: &str| data.join(f).display().to_string();
    let mut flags = vec![
        "--train-json".to_string(),
        p("train.json"),
        "--val-json".into(),
        p("val.json"),
        "--test-json".into(),
        p("test.json"),
        "--image-root".into(),
        p("images"),
        "--init".into(),
        model.display().to_string(),
        "--arch".into(),
        "tiny-quickgelu".into(),
    ];
    for f in [
        "--batch-size",
        "8",
        "--steps",
        "10",
        "--val-every",
        "4",
        "--lr",
        "2e-3",
        "--augment",
        "none",
        "--out",
    ] {
        flags.push(f.into());
    }
    flags.push(dir.join(name).display().to_string());
    flags.extend(extra.iter().map(|s| s.to_string()));
    let cfg = TrainConfig::resolve(&harma_train::train::from_flags(&flags)?)?;
    train(&cfg, false, &Control::default())?;
    Ok(cfg)
}

fn harma(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_harma"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "harma {args:?}:\n{text}");
    text
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn sha256(path: &Path) -> String {
    format!("{:x}", sha2::Sha256::digest(std::fs::read(path).unwrap()))
}

/// The cells of the first Markdown table row whose first cell starts with `label` (bold and
/// code marks removed).
fn row(md: &str, label: &str) -> Vec<String> {
    md.lines()
        .filter(|l| l.starts_with('|'))
        .map(|l| {
            l.trim()
                .trim_matches('|')
                .split(" | ")
                .map(|c| c.trim().trim_matches('*').trim_matches('`').to_string())
                .collect::<Vec<_>>()
        })
        .find(|cells| cells[0].starts_with(label))
        .unwrap_or_else(|| panic!("no row `{label}` in\n{md}"))
}

const KEYS: [&str; 7] = [
    "txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean",
];

/// The seven numbers of a results row equal the metrics (printed to two decimals).
fn assert_metrics(cells: &[String], m: &serde_json::Value) {
    assert_eq!(cells.len(), 8, "{cells:?}");
    for (cell, key) in cells[1..].iter().zip(KEYS) {
        let shown: f64 = cell.parse().unwrap();
        let want = m[key].as_f64().unwrap();
        assert!(
            (shown - want).abs() <= 0.005 + 1e-9,
            "{key}: {shown} vs {want}"
        );
    }
}

/// The HTML refers to nothing outside itself: no URL, no src/href, no stylesheet or font
/// from elsewhere; its only images are data URIs.
fn assert_self_contained(html: &str) {
    // the data URIs out of the way (base64 may hold any letters and `/`)
    let mut rest = html;
    let mut outside = String::new();
    while let Some(i) = rest.find("url(data:image/") {
        outside.push_str(&rest[..i]);
        let close = rest[i..].find(')').expect("a closed data URI");
        rest = &rest[i + close + 1..];
    }
    outside.push_str(rest);
    for bad in [
        "http:", "https:", "src=", "href=", "@import", "url(", "//", "xlink",
    ] {
        assert!(!outside.contains(bad), "`{bad}` in the HTML");
    }
}

#[test]
fn reports_hold_the_runs_numbers_rebuild_and_compare() -> Result<()> {
    let dir = temp_dir("main");
    let model = setup(&dir);
    let a = run(&dir, &model, "adaptive", &[])?;
    let out = a.out();
    for f in [
        "report.html",
        "report.md",
        "training.svg",
        "validation.svg",
        "run.json",
        "examples.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let md = std::fs::read_to_string(out.join("report.md"))?;
    let metrics = json(&out.join("metrics.json"));
    let log: Vec<serde_json::Value> = std::fs::read_to_string(out.join("log.jsonl"))?
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();

    // the results: step 0 (zero-shot), the best by val, test with the best adapters
    let best_step = metrics["best"]["step"].as_u64().unwrap();
    assert_metrics(&row(&md, "zero-shot, test"), &metrics["start"]["test"]);
    assert_metrics(&row(&md, "zero-shot, val"), &metrics["start"]["val"]);
    assert_metrics(&row(&md, "best by val, val"), &metrics["best"]);
    let test_row = row(&md, "test (best-by-val adapters");
    assert!(
        test_row[0].contains(&format!("step {best_step}")),
        "{test_row:?}"
    );
    assert_metrics(&test_row, &metrics["test"]);
    // every val evaluation, the best among them
    let val = metrics["val"].as_array().unwrap();
    assert_eq!(val.len(), 3, "steps 4, 8, 10");
    for v in val {
        let label = format!("{} (", v["step"]);
        assert_metrics(&row(&md, &label), v);
    }

    // the training summary, straight from log.jsonl
    assert_eq!(log.len(), 10);
    let loss = |l: &serde_json::Value| l["loss"].as_f64().unwrap();
    let close = |cell: &str, want: f64, eps: f64| {
        let got: f64 = cell.parse().unwrap();
        assert!((got - want).abs() <= eps, "{got} vs {want}");
    };
    assert_eq!(row(&md, "steps")[1], "10 of 10");
    close(&row(&md, "loss at step 1")[1], loss(&log[0]), 5e-5);
    close(&row(&md, "loss at step 10")[1], loss(&log[9]), 5e-5);
    let low = log
        .iter()
        .min_by(|x, y| loss(x).total_cmp(&loss(y)))
        .unwrap();
    let low_row = row(&md, "lowest loss");
    assert_eq!(low_row[0], format!("lowest loss (step {})", low["step"]));
    close(&low_row[1], loss(low), 5e-5);
    close(
        &row(&md, "temperature at step 10")[1],
        log[9]["temp"].as_f64().unwrap(),
        5e-6,
    );
    let peak = log
        .iter()
        .map(|l| l["lr"].as_f64().unwrap())
        .fold(0.0, f64::max);
    close(&row(&md, "peak learning rate")[1], peak, peak * 1e-3);

    // data and checkpoints, by their hashes
    let data = dir.join("data");
    assert!(
        row(&md, "../data/train.json")[4] == sha256(&data.join("train.json")),
        "{md}"
    );
    assert_eq!(
        row(&md, "../data/test.json")[4],
        sha256(&data.join("test.json"))
    );
    assert_eq!(
        row(&md, "best.safetensors")[4],
        sha256(&out.join("best.safetensors"))
    );
    assert_eq!(row(&md, "../model.safetensors")[4], sha256(&model));
    let info = json(&out.join("run.json"));
    let session = &info["sessions"][0];
    assert_eq!(session["to_step"], 10);
    assert_eq!(session["pairs"], 80);
    assert!(session["phases"]["train"].as_f64().unwrap() > 0.0);
    assert!(session["phases"]["zero_shot"].as_f64().unwrap() > 0.0);
    assert_eq!(info["start_adapters"], "fresh");
    if cfg!(target_os = "linux") {
        assert!(session["peak_memory"].as_u64().unwrap() > 10_000_000);
    }
    // no path of the machine: the files are shown relative to the run
    assert!(!md.contains(&dir.display().to_string()), "{md}");

    // retrieval examples from test, with thumbnails
    let ex = json(&out.join("examples.json"));
    assert_eq!(ex["images"], 8);
    assert_eq!(ex["text_to_image"].as_array().unwrap().len(), 6);
    let first = &ex["text_to_image"][0];
    assert!(md.contains(first["caption"].as_str().unwrap()));
    let html = std::fs::read_to_string(out.join("report.html"))?;
    assert_self_contained(&html);
    assert!(html.contains("<svg") && html.contains("data:image/jpeg;base64,"));
    assert!(html.contains(first["caption"].as_str().unwrap()));

    // `harma report` rebuilds the same page from the folder alone
    let before = md.clone();
    std::fs::remove_file(out.join("report.md"))?;
    std::fs::remove_file(out.join("report.html"))?;
    harma(&["report", out.to_str().unwrap()]);
    let without_footer = |s: &str| {
        s.lines()
            .filter(|l| !l.starts_with("Made by"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let after = std::fs::read_to_string(out.join("report.md"))?;
    assert_eq!(without_footer(&after), without_footer(&before));
    assert!(out.join("report.html").is_file());

    // `harma eval --report` with the run's best adapters reports the run's test numbers
    let eval_dir = dir.join("eval");
    harma(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--arch",
        "tiny-quickgelu",
        "--adapters",
        out.join("best.safetensors").to_str().unwrap(),
        "--test-json",
        data.join("test.json").to_str().unwrap(),
        "--image-root",
        data.join("images").to_str().unwrap(),
        "--report",
        eval_dir.to_str().unwrap(),
    ]);
    let emd = std::fs::read_to_string(eval_dir.join("report.md"))?;
    assert_metrics(&row(&emd, "../data/test.json"), &metrics["test"]);
    assert_self_contained(&std::fs::read_to_string(eval_dir.join("report.html"))?);
    assert_eq!(json(&eval_dir.join("examples.json"))["captions"], 40);

    // a second run without the triplet term, and the two side by side
    let b = run(&dir, &model, "no-triplet", &["--triplet", "none"])?;
    let cmp = dir.join("cmp");
    harma(&[
        "report",
        out.to_str().unwrap(),
        "--compare",
        b.out().to_str().unwrap(),
        "--out",
        cmp.to_str().unwrap(),
    ]);
    for f in ["compare.html", "compare.md", "compare.svg"] {
        assert!(cmp.join(f).is_file(), "{f} missing");
    }
    let cmd = std::fs::read_to_string(cmp.join("compare.md"))?;
    assert_self_contained(&std::fs::read_to_string(cmp.join("compare.html"))?);
    let triplet = row(&cmd, "triplet");
    assert_eq!(triplet[1..], ["adaptive", "none"], "{cmd}");
    let mr = row(&cmd, "test mR");
    for (cell, run) in mr[1..].iter().zip([out, b.out()]) {
        let want = json(&run.join("metrics.json"))["test"]["r_mean"]
            .as_f64()
            .unwrap();
        assert!((cell.parse::<f64>()? - want).abs() <= 0.005 + 1e-9);
    }
    // only what differs is listed
    assert!(!cmd.contains("| `lr` |"), "{cmd}");
    std::fs::remove_dir_all(dir).ok();
    Ok(())
}
