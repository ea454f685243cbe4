//! `harma train` on the tiny HarMA model (crates/harma-adapters/tests/fixtures) and a small
//! generated image-caption set: resuming equals not stopping, a NaN loss stops with the last
//! good checkpoint kept, a finished run is never overwritten, and the files the command
//! promises are there with their fields.

use std::path::{Path, PathBuf};

use anyhow::Result;
use harma_trainer::config::TrainConfig;
use harma_trainer::train::{train, Control, Outcome};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../harma-adapters/tests/fixtures")
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("harma-train-{name}-{}", std::process::id()));
    std::fs::remove_dir_all(&d).ok();
    std::fs::create_dir_all(&d).unwrap();
    d
}

const COLOURS: [(&str, [u8; 3]); 6] = [
    ("red", [200, 30, 30]),
    ("green", [30, 180, 40]),
    ("blue", [20, 40, 210]),
    ("yellow", [220, 210, 30]),
    ("white", [240, 240, 240]),
    ("dark", [30, 30, 30]),
];

/// Six 80x72 images (a coloured square on a striped ground) with two captions each.
fn dataset(dir: &Path) -> PathBuf {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let mut entries = Vec::new();
    for (id, (name, rgb)) in COLOURS.iter().enumerate() {
        let img = image::RgbImage::from_fn(80, 72, |x, y| {
            if (20..50).contains(&x) && (15..45).contains(&y) {
                image::Rgb(*rgb)
            } else if (x / 8 + y / 8 + id as u32).is_multiple_of(2) {
                image::Rgb([90, 120, 60])
            } else {
                image::Rgb([140, 130, 100])
            }
        });
        let file = format!("{name}.png");
        img.save(images.join(&file)).unwrap();
        for caption in [
            format!("A {name} building stands in a field."),
            format!("There is a {name} square near the stripes"),
        ] {
            entries.push(serde_json::json!({"caption": caption, "image": file, "image_id": id}));
        }
    }
    let json = dir.join("train.json");
    std::fs::write(&json, serde_json::to_string(&entries).unwrap()).unwrap();
    // val and test in HarMA's evaluation format: one entry per image, its captions in a list
    for (split, words) in [("val", ["building", "roof"]), ("test", ["square", "block"])] {
        let entries: Vec<_> = COLOURS
            .iter()
            .map(|(name, _)| {
                serde_json::json!({"image": format!("{name}.png"),
                    "caption": words.map(|w| format!("a {name} {w} in a striped field"))})
            })
            .collect();
        std::fs::write(
            dir.join(format!("{split}.json")),
            serde_json::to_string(&entries).unwrap(),
        )
        .unwrap();
    }
    json
}

/// The tiny fixture model's sizes with CLIP's full vocabulary (real captions), random
/// backbone weights (seeded) written to `dir`; returns (checkpoint, config).
fn tiny_model(dir: &Path) -> (PathBuf, PathBuf) {
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("config.json")).unwrap())
            .unwrap();
    cfg["text"]["vocab_size"] = 49408.into();
    let cfg_path = dir.join("config.json");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let clip = harma_clip::ClipConfig::preset(cfg_path.to_str().unwrap()).unwrap();
    let mut rng = harma_data::rng::Rng::new(5);
    let model = dir.join("model.safetensors");
    harma_clip::checkpoint::write_random_backbone(
        &clip,
        harma_clip::checkpoint::RandomInit::Clip,
        &mut || rng.uniform(),
        &model,
    )
    .unwrap();
    (model, cfg_path)
}

/// `harma train` flags, set one by one (a flag set again replaces its value).
#[derive(Debug, Clone, Default)]
struct Flags(Vec<(String, Option<String>)>);

impl Flags {
    fn set(mut self, flag: &str, value: impl std::fmt::Display) -> Self {
        self.0.retain(|(f, _)| f != flag);
        self.0.push((flag.to_string(), Some(value.to_string())));
        self
    }

    /// A switch (`--no-shuffle`).
    fn on(mut self, flag: &str) -> Self {
        self.0.push((flag.to_string(), None));
        self
    }

    fn unset(mut self, flag: &str) -> Self {
        self.0.retain(|(f, _)| f != flag);
        self
    }

    fn get(&self, flag: &str) -> String {
        let v = self.0.iter().find(|(f, _)| f == flag);
        v.and_then(|(_, v)| v.clone()).unwrap_or_default()
    }

    fn argv(&self) -> Vec<String> {
        self.0
            .iter()
            .flat_map(|(f, v)| std::iter::once(f.clone()).chain(v.clone()))
            .collect()
    }

    /// The settings, as `harma train` with these flags resolves them.
    fn resolve(&self) -> Result<TrainConfig> {
        TrainConfig::resolve(&harma_train::train::from_flags(&self.argv())?)
    }
}

/// Settings for a 5-step run into `dir/out`, starting from the fixture's (non-zero) adapters.
fn args(dir: &Path, out: &str) -> Flags {
    let (model, config) = tiny_model(dir);
    Flags::default()
        .set("--train-json", dataset(dir).display())
        .set("--image-root", dir.join("images").display())
        .set("--init", model.display())
        .set("--arch", config.display())
        .set(
            "--adapters",
            fixtures().join("adapters.safetensors").display(),
        )
        .set("--val-json", dir.join("val.json").display())
        .set("--test-json", dir.join("test.json").display())
        .set("--batch-size", 4)
        .set("--steps", 5)
        .set("--lr", 1e-3)
        .set("--out", dir.join(out).display())
}

/// `harma train` with the data, model and adapters of `a`; the caller adds the rest.
fn train_command(a: &Flags) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_harma"));
    cmd.arg("train");
    for flag in [
        "--train-json",
        "--image-root",
        "--init",
        "--adapters",
        "--arch",
        "--out",
    ] {
        cmd.args([flag.to_string(), a.get(flag)]);
    }
    cmd
}

/// The settings of a resumed run, with `flags` given too.
fn resumed(dir: &Path, flags: &[&str]) -> Result<TrainConfig> {
    let mut argv = vec!["--resume", dir.to_str().unwrap()];
    argv.extend_from_slice(flags);
    TrainConfig::resolve(&harma_train::train::from_flags(&argv)?)
}

fn log(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A safetensors file's metadata and tensors (name, shape, bytes), in name order.
type Contents = (
    std::collections::BTreeMap<String, String>,
    Vec<(String, Vec<usize>, Vec<u8>)>,
);

fn contents(path: &Path) -> Contents {
    let bytes = std::fs::read(path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec(), v.data().to_vec()))
        .collect();
    tensors.sort();
    (meta, tensors)
}

/// A NaN planted in a run's resume.safetensors (a parameter, or an AdamW moment) is refused
/// when the run resumes, naming the file and the tensor, before anything is restored.
#[test]
fn a_nan_planted_in_the_resume_checkpoint_is_named_at_load() -> Result<()> {
    let dir = temp_dir("resume-nan");
    let b = args(&dir, "b").resolve()?;
    let stop = Control {
        stop_after: Some(1),
        ..Control::default()
    };
    assert_eq!(train(&b, false, &stop)?, Outcome::Stopped { step: 1 });
    let path = b.out().join("resume.safetensors");
    let clean = std::fs::read(&path)?;
    for key in ["param/temp", "adam_m/visual.transformer.resblocks.0.gate1"] {
        // overwrite the tensor's first element in place with a NaN
        let mut bytes = clean.clone();
        let offset = {
            let st = safetensors::SafeTensors::deserialize(&clean)?;
            st.tensor(key)?.data().as_ptr() as usize - clean.as_ptr() as usize
        };
        bytes[offset..offset + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        std::fs::write(&path, &bytes)?;
        let err = train(&resumed(b.out(), &[])?, true, &Control::default()).unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("resume.safetensors")
                && msg.contains(&format!("`{key}`"))
                && msg.contains("NaN"),
            "{msg}"
        );
    }
    std::fs::remove_dir_all(dir).ok();
    Ok(())
}

#[test]
fn resuming_equals_not_stopping() -> Result<()> {
    let dir = temp_dir("resume");
    // 12 pairs, batch 4: 3 steps per epoch, so the run crosses an epoch (a new shuffle)
    let a = args(&dir, "a").resolve()?;
    assert_eq!(
        train(&a, false, &Control::default())?,
        Outcome::Finished { steps: 5 }
    );

    let b = args(&dir, "b").resolve()?;
    let stop = Control {
        stop_after: Some(2),
        ..Control::default()
    };
    assert_eq!(train(&b, false, &stop)?, Outcome::Stopped { step: 2 });
    assert_eq!(log(b.out()).len(), 2);
    let resumed = resumed(b.out(), &[])?;
    assert_eq!(resumed, b, "the resumed run reads its own settings");
    assert_eq!(
        train(&resumed, true, &Control::default())?,
        Outcome::Finished { steps: 5 }
    );

    let (la, lb) = (log(a.out()), log(b.out()));
    assert_eq!(la.len(), 5);
    assert_eq!(la, lb, "logs differ");
    let steps: Vec<u64> = la.iter().map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [1, 2, 3, 4, 5]);
    // warm-up 10% of 5 steps rounds to 0: linear decay from the first step
    assert_eq!(la[0]["lr"].as_f64().unwrap(), 1e-3);
    assert!((la[4]["lr"].as_f64().unwrap() - 1e-3 / 5.0).abs() < 1e-12);
    for l in &la {
        let (c, t) = (
            l["loss_contrastive"].as_f64().unwrap(),
            l["loss_triplet"].as_f64().unwrap(),
        );
        assert!((l["loss"].as_f64().unwrap() - (c + t)).abs() < 1e-5);
        assert!(l["temp"].as_f64().unwrap() > 0.0);
    }
    for file in ["adapters.safetensors", "resume.safetensors"] {
        assert_eq!(
            contents(&a.out().join(file)),
            contents(&b.out().join(file)),
            "{file} differs"
        );
    }
    // byte for byte: the files of two equal runs are equal files
    for file in [
        "adapters.safetensors",
        "resume.safetensors",
        "best.safetensors",
        "metrics.json",
        "log.jsonl",
    ] {
        let read = |d: &Path| std::fs::read(d.join(file)).unwrap();
        assert!(read(a.out()) == read(b.out()), "{file}: other bytes");
    }
    // the trained adapters moved away from the starting ones
    let start = harma_adapters::load_file(&fixtures().join("adapters.safetensors"))?;
    let end = harma_adapters::load_file(&a.out().join("adapters.safetensors"))?;
    assert_eq!(start.len(), end.len());
    let moved = (&start["temp"] - &end["temp"])?.abs()?.to_scalar::<f32>()?;
    assert!(moved > 1e-5, "temp did not move");
    std::fs::remove_dir_all(dir).ok();
    Ok(())
}

#[test]
fn a_nan_loss_stops_and_keeps_the_last_good_checkpoint() -> Result<()> {
    let dir = temp_dir("nan");
    // a step size of 1e30 (no decay, so the weights stay finite) overflows the next forward
    let cfg = args(&dir, "run")
        .set("--lr", 1e30)
        .set("--weight-decay", 0.0)
        .set("--schedule", "constant")
        .set("--save-every", 1)
        .resolve()?;
    let err = train(&cfg, false, &Control::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("step 2: the loss is"), "{err}");
    assert!(err.contains("after step 1"), "{err}");
    assert_eq!(log(cfg.out()).len(), 1);
    let bytes = std::fs::read(cfg.out().join("adapters.safetensors"))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)?;
    assert_eq!(header.metadata().as_ref().unwrap()["step"], "1");
    let kept = harma_adapters::load_file(&cfg.out().join("adapters.safetensors"))?;
    for (k, t) in kept {
        let v = t.flatten_all()?.to_vec1::<f32>()?;
        assert!(v.iter().all(|x| x.is_finite()), "{k}");
    }
    std::fs::remove_dir_all(dir).ok();
    Ok(())
}

/// A run that stopped before its first checkpoint (here a NaN at step 2, before the first
/// save at the epoch's end) leaves a folder that both a fresh run and `--resume` take up again
/// from step 0, without deleting anything by hand; temp files that interrupted writes left
/// are removed.
#[test]
fn a_run_stopped_before_its_first_checkpoint_is_taken_up_again() -> Result<()> {
    let dir = temp_dir("early");
    let failing = |out: &str| {
        args(&dir, out)
            .set("--lr", 1e30)
            .set("--weight-decay", 0.0)
            .set("--schedule", "constant")
            .resolve()
    };
    for (out, resumed_run) in [("fresh", false), ("resumed", true)] {
        let cfg = failing(out)?;
        let err = train(&cfg, false, &Control::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("no checkpoint had been written yet"), "{err}");
        assert!(!cfg.out().join("resume.safetensors").exists());
        assert_eq!(log(cfg.out()).len(), 1);
        std::fs::write(cfg.out().join(".adapters.safetensors.tmp-0"), b"half")?;
        let again = if resumed_run {
            resumed(cfg.out(), &["--lr", "1e-3", "--weight-decay", "0.04"])?
        } else {
            args(&dir, out).resolve()?
        };
        assert_eq!(
            train(&again, resumed_run, &Control::default())?,
            Outcome::Finished { steps: 5 },
            "{out}"
        );
        let steps: Vec<u64> = log(cfg.out())
            .iter()
            .map(|l| l["step"].as_u64().unwrap())
            .collect();
        assert_eq!(steps, [1, 2, 3, 4, 5], "{out}");
        assert!(!cfg.out().join(".adapters.safetensors.tmp-0").exists());
    }
    std::fs::remove_dir_all(dir).ok();
    Ok(())
}

#[test]
fn a_folder_with_a_run_is_not_overwritten() -> Result<()> {
    let dir = temp_dir("again");
    let cfg = args(&dir, "run").set("--steps", 1).resolve()?;
    train(&cfg, false, &Control::default())?;
    let before = std::fs::read(cfg.out().join("adapters.safetensors"))?;
    let err = train(&cfg, false, &Control::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("already holds a training run") && err.contains("--resume"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(cfg.out().join("adapters.safetensors"))?,
        before
    );
    assert_eq!(log(cfg.out()).len(), 1);
    std::fs::remove_dir_all(dir).ok();
    Ok(())
}

#[test]
fn the_command_writes_config_log_and_adapters() -> Result<()> {
    let dir = temp_dir("cli");
    let a = args(&dir, "run");
    let settings = [
        "--batch-size",
        "4",
        "--epochs",
        "1",
        "--lr",
        "1e-4",
        "--no-shuffle",
        "--augment",
        "none",
        "--seed",
        "1",
    ];
    let out = train_command(&a).args(settings).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let run = PathBuf::from(a.get("--out"));
    let cfg: TrainConfig = toml::from_str(&std::fs::read_to_string(run.join("config.toml"))?)?;
    assert_eq!(
        (cfg.run.epochs, cfg.run.seed, cfg.run.shuffle, cfg.optim.lr),
        (Some(1), 1, false, Some(1e-4))
    );
    let lines = log(&run);
    assert_eq!(lines.len(), 3);
    for key in [
        "step",
        "lr",
        "loss",
        "loss_contrastive",
        "loss_triplet",
        "temp",
    ] {
        assert!(lines.iter().all(|l| l[key].is_number()), "{key}");
    }
    // 59 trained tensors under the original's names
    let saved = harma_checkpoint::format::load_tensors(&run.join("adapters.safetensors"))?;
    assert_eq!(saved.len(), 59);
    assert!(saved.contains_key("model.visual.transformer.resblocks.0.mmadapter.gate1"));

    // --recompute trains the same run (the same losses) holding one block's activations
    let out = train_command(&a.clone().set("--out", dir.join("recomputed").display()))
        .args(settings)
        .arg("--recompute")
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg2: TrainConfig = toml::from_str(&std::fs::read_to_string(
        dir.join("recomputed/config.toml"),
    )?)?;
    assert!(cfg2.run.recompute && !cfg.run.recompute);
    for (x, y) in lines.iter().zip(log(&dir.join("recomputed"))) {
        let (lx, ly) = (x["loss"].as_f64().unwrap(), y["loss"].as_f64().unwrap());
        assert!((lx - ly).abs() <= 1e-6 * lx.abs(), "{lx} vs {ly}");
    }

    // a missing image names the entry and the file, before the model loads
    let json = dir.join("train.json");
    let text = std::fs::read_to_string(&json)?.replace("blue.png", "blue.tif");
    std::fs::write(&json, text)?;
    let other = a
        .clone()
        .set("--train-json", json.display())
        .set("--out", dir.join("other").display());
    let out = train_command(&other)
        .args(["--batch-size", "4", "--steps", "1", "--lr", "1e-4"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("train.json") && stderr.contains("entry 4") && stderr.contains("blue.tif"),
        "{stderr}"
    );
    std::fs::remove_dir_all(dir).ok();
    Ok(())
}

#[test]
fn val_picks_the_best_and_test_uses_it_as_harma_eval_does() -> Result<()> {
    let dir = temp_dir("val");
    // 3 steps per epoch, val every 2 steps and at the end: steps 2, 4, 6, 7
    let cfg = args(&dir, "run")
        .set("--steps", 7)
        .set("--val-every", 2)
        .set("--lr", 3e-3)
        .resolve()?;
    train(&cfg, false, &Control::default())?;
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cfg.out().join("metrics.json"))?)?;
    let val = m["val"].as_array().unwrap();
    let steps: Vec<u64> = val.iter().map(|v| v["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [2, 4, 6, 7]);
    // the best is the first entry with the highest val mR
    let top = val
        .iter()
        .map(|v| v["r_mean"].as_f64().unwrap())
        .fold(f64::MIN, f64::max);
    let first_top = val
        .iter()
        .find(|v| v["r_mean"].as_f64().unwrap() == top)
        .unwrap();
    assert_eq!(m["best"], *first_top);
    let bytes = std::fs::read(cfg.out().join("best.safetensors"))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)?;
    assert_eq!(
        header.metadata().as_ref().unwrap()["step"],
        first_top["step"].to_string()
    );
    assert_eq!(m["test"]["adapters"], "best.safetensors");
    assert_eq!(m["test"]["step"], first_top["step"]);

    // `harma eval` with best.safetensors on test gives the numbers the run recorded
    let out_json = dir.join("eval.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_harma"))
        .args([
            "eval",
            "--model",
            &cfg.init().display().to_string(),
            "--arch",
            &cfg.model.backbone.arch,
        ])
        .args([
            "--adapters",
            &cfg.out().join("best.safetensors").display().to_string(),
        ])
        .arg("--test-json")
        .arg(cfg.data.test_json.as_ref().unwrap())
        .arg("--image-root")
        .arg(cfg.image_root())
        .args(["--batch-size", "5", "--out", out_json.to_str().unwrap()])
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("image -> text") && stdout.contains("mR"),
        "{stdout}"
    );
    let e: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&out_json)?)?;
    for key in [
        "txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean",
    ] {
        assert_eq!(e["test"][key], m["test"][key], "{key}");
    }
    assert_eq!(
        (e["images"].as_u64(), e["captions"].as_u64()),
        (Some(6), Some(12))
    );
    std::fs::remove_dir_all(dir).ok();
    Ok(())
}

#[test]
fn a_corrupt_image_stops_training_naming_the_file() -> Result<()> {
    let dir = temp_dir("corrupt");
    let a = args(&dir, "run");
    // passes the existence check, fails to decode at its first batch
    std::fs::write(dir.join("images/green.png"), b"\x89PNG\r\n\x1a\n not a png")?;
    let cfg = a.on("--no-shuffle").resolve()?;
    let err = format!("{:#}", train(&cfg, false, &Control::default()).unwrap_err());
    assert!(err.contains("green.png"), "{err}");
    assert!(!cfg.out().join("adapters.safetensors").exists());
    std::fs::remove_dir_all(dir).ok();
    Ok(())
}

/// Wait until the run in `run` has logged `steps` steps; the run ending first is a failure
/// (its output says why).
fn wait_for_steps(child: &mut std::process::Child, run: &Path, steps: usize) {
    while !run.join("log.jsonl").exists() || log(run).len() < steps {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run ended ({status}) before logging {steps} steps");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn ctrl_c_saves_a_checkpoint_that_resumes() -> Result<()> {
    let dir = temp_dir("sigint");
    let a = args(&dir, "run");
    let child = train_command(&a)
        .args(["--batch-size", "4", "--steps", "100000", "--lr", "1e-4"])
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut child = child;
    let run = PathBuf::from(a.get("--out"));
    wait_for_steps(&mut child, &run, 1);
    let kill = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()?;
    assert!(kill.success());
    let out = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("--resume"), "{stderr}");
    let steps = log(&run).len();
    let bytes = std::fs::read(run.join("resume.safetensors"))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)?;
    assert_eq!(
        header.metadata().as_ref().unwrap()["step"],
        steps.to_string()
    );
    // and it continues from there
    let resumed = resumed(&run, &["--steps", &(steps + 1).to_string()])?;
    assert_eq!(
        train(&resumed, true, &Control::default())?,
        Outcome::Finished { steps: steps + 1 }
    );
    assert_eq!(log(&run).len(), steps + 1);
    std::fs::remove_dir_all(dir).ok();
    Ok(())
}

#[test]
fn own_csv_and_jsonl_files_train_and_evaluate() -> Result<()> {
    let dir = temp_dir("own");
    let a = args(&dir, "run");
    let mut csv = String::from("image,caption\n");
    let mut jsonl = String::new();
    for (name, _) in COLOURS {
        csv.push_str(&format!("{name}.png,\"A {name} building, in a field.\"\n"));
        csv.push_str(&format!("{name}.png,a {name} square\n"));
        jsonl.push_str(&format!(
            "{{\"image\": \"{name}.png\", \"caption\": \"the {name} block\"}}\n"
        ));
    }
    std::fs::write(dir.join("train.csv"), csv)?;
    std::fs::write(dir.join("val.jsonl"), jsonl)?;
    let cfg = a
        .set("--train-json", dir.join("train.csv").display())
        .set("--val-json", dir.join("val.jsonl").display())
        .unset("--test-json")
        .set("--steps", 3)
        .resolve()?;
    train(&cfg, false, &Control::default())?;
    assert_eq!(log(cfg.out()).len(), 3);
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cfg.out().join("metrics.json"))?)?;
    // 12 pairs, batch 4: an epoch is 3 steps, so val ran once, at the end
    assert_eq!(m["val"].as_array().unwrap().len(), 1);
    assert!(m["val"][0]["r_mean"].as_f64().unwrap() > 0.0);
    std::fs::remove_dir_all(dir).ok();
    Ok(())
}

/// The tensors of a safetensors file by name.
fn tensors(path: &Path) -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap()
}

/// `||a - b|| / ||b||` over all the tensors of two files together, and the largest relative
/// difference of two runs' losses.
fn run_difference(a: &Path, b: &Path) -> (f64, f64) {
    let (ta, tb) = (
        tensors(&a.join("adapters.safetensors")),
        tensors(&b.join("adapters.safetensors")),
    );
    assert_eq!(ta.len(), tb.len());
    let (mut diff, mut norm) = (0f64, 0f64);
    for (k, x) in &ta {
        let (x, y): (Vec<f32>, Vec<f32>) = (
            x.flatten_all().unwrap().to_vec1().unwrap(),
            tb[k].flatten_all().unwrap().to_vec1().unwrap(),
        );
        for (p, q) in x.iter().zip(&y) {
            diff += (*p as f64 - *q as f64).powi(2);
            norm += (*q as f64).powi(2);
        }
    }
    let (la, lb) = (log(a), log(b));
    assert_eq!(la.len(), lb.len());
    let loss = la
        .iter()
        .zip(&lb)
        .map(|(x, y)| {
            let (x, y) = (x["loss"].as_f64().unwrap(), y["loss"].as_f64().unwrap());
            (x - y).abs() / y.abs()
        })
        .fold(0.0, f64::max);
    ((diff / norm).sqrt(), loss)
}

/// Run `cfg` on `world` in-process ranks; each rank's result.
fn on_ranks(
    cfg: &TrainConfig,
    world: usize,
    resume: bool,
    control: &Control,
) -> Vec<Result<Outcome>> {
    use harma_dist::ThreadGroup;
    let ranks = ThreadGroup::new(world);
    std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .into_iter()
            .map(|r| {
                s.spawn(move || {
                    harma_trainer::train::train_on(cfg, resume, control, std::sync::Arc::new(r))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Data-parallel training (ranks on threads) equals one process with the same global batch,
/// shuffling and augmentation on: the same losses (within 1e-6; 2e-7 measured) and adapters
/// after five AdamW steps within 1e-5 of their norm (7e-6 measured). A step's gradients agree
/// to 8e-8 of their norm (steps.rs, sharded_steps_give_one_process_gradients: f32 summation
/// order); AdamW then divides each element by its own running RMS, so for an element whose
/// gradient is near zero a 1e-7 difference becomes a difference of its update of up to the
/// learning rate, and that is what five steps accumulate. A run resumed on another number of
/// ranks continues the same sequence; a rank that fails stops every rank with its reason,
/// and none hangs.
#[test]
fn ranks_on_threads_train_as_one_process() -> Result<()> {
    let dir = temp_dir("ranks");
    let one = args(&dir, "one").resolve()?;
    train(&one, false, &Control::default())?;
    for world in [2, 4] {
        let cfg = args(&dir, &format!("w{world}")).resolve()?;
        for r in on_ranks(&cfg, world, false, &Control::default()) {
            assert_eq!(r?, Outcome::Finished { steps: 5 });
        }
        let (adapters, loss) = run_difference(cfg.out(), one.out());
        eprintln!("{world} ranks vs one process: adapters {adapters:.1e} of their norm, losses {loss:.1e}");
        assert!(
            adapters <= 1e-5 && loss <= 1e-6,
            "{world} ranks: {adapters} {loss}"
        );
    }
    // two steps on 2 ranks, the rest resumed on 4
    let cfg = args(&dir, "switch").resolve()?;
    let stop = Control {
        stop_after: Some(2),
        ..Control::default()
    };
    for r in on_ranks(&cfg, 2, false, &stop) {
        assert_eq!(r?, Outcome::Stopped { step: 2 });
    }
    let again = resumed(cfg.out(), &[])?;
    for r in on_ranks(&again, 4, true, &Control::default()) {
        assert_eq!(r?, Outcome::Finished { steps: 5 });
    }
    let (adapters, loss) = run_difference(cfg.out(), one.out());
    eprintln!("2 then 4 ranks vs one process: adapters {adapters:.1e}, losses {loss:.1e}");
    assert!(
        adapters <= 1e-5 && loss <= 1e-6,
        "resumed: {adapters} {loss}"
    );
    // a rank whose shard holds a corrupt image fails; every rank stops, naming it (no step-0
    // evaluation: rank 0 would meet the image there first, on its own)
    let cfg = args(&dir, "broken").on("--no-zero-shot").resolve()?;
    std::fs::write(dir.join("images/green.png"), b"\x89PNG\r\n\x1a\n not a png")?;
    let results = on_ranks(&cfg, 2, false, &Control::default());
    for r in &results {
        let e = format!("{:#}", r.as_ref().unwrap_err());
        assert!(e.contains("green.png"), "{e}");
    }
    assert!(
        results
            .iter()
            .any(|r| format!("{:#}", r.as_ref().unwrap_err()).contains("failed")),
        "the other rank names the one that failed"
    );
    std::fs::remove_dir_all(dir).ok();
    Ok(())
}

/// `harma train --nproc 2 --device cpu`: the launcher starts two worker processes that meet
/// over TCP and train as one process would (within the bounds above); Ctrl-C on the launcher
/// stops both after the same step with one checkpoint, which resumes; a worker that fails
/// brings the other down and the launcher names it, without hanging.
#[test]
fn the_launcher_runs_ranks_as_processes_and_stops_them_together() -> Result<()> {
    let dir = temp_dir("launch");
    let one = args(&dir, "one").resolve()?;
    train(&one, false, &Control::default())?;
    let launched = |a: &Flags| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_harma"));
        cmd.arg("train")
            .args(a.argv())
            .args(["--nproc", "2", "--device", "cpu"]);
        cmd
    };
    let a = args(&dir, "two");
    let out = launched(&a).output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (adapters, loss) = run_difference(&dir.join("two"), one.out());
    eprintln!("2 processes vs one: adapters {adapters:.1e}, losses {loss:.1e}");
    assert!(adapters <= 1e-5 && loss <= 1e-6, "{adapters} {loss}");

    // --emulate-ddp 2 (the original's two-GPU update): the same in one process and on two,
    // and another update than the plain runs'
    let emulated = args(&dir, "emulated-one").set("--emulate-ddp", 2);
    train(&emulated.resolve()?, false, &Control::default())?;
    let out = launched(&args(&dir, "emulated-two").set("--emulate-ddp", 2)).output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (same, loss) = run_difference(&dir.join("emulated-two"), &dir.join("emulated-one"));
    let (apart, _) = run_difference(&dir.join("emulated-two"), one.out());
    eprintln!(
        "--emulate-ddp 2, 2 processes vs one: adapters {same:.1e}, losses {loss:.1e}; vs the \
         plain run: adapters {apart:.1e}"
    );
    assert!(same <= 1e-5 && loss <= 1e-6, "{same} {loss}");
    assert!(apart >= 10.0 * same.max(adapters), "{apart} vs {same}");

    // Ctrl-C on the launcher: both ranks stop after the same step, rank 0 saves once
    let long = args(&dir, "stopped").set("--steps", 100_000);
    let child = launched(&long)
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut child = child;
    let run = dir.join("stopped");
    wait_for_steps(&mut child, &run, 2);
    let kill = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()?;
    assert!(kill.success());
    let out = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let steps = log(&run).len();
    let bytes = std::fs::read(run.join("resume.safetensors"))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)?;
    assert_eq!(
        header.metadata().as_ref().unwrap()["step"],
        steps.to_string()
    );
    let more = launched(&Flags::default())
        .args([
            "--resume",
            run.to_str().unwrap(),
            "--steps",
            &(steps + 1).to_string(),
        ])
        .output()?;
    assert!(
        more.status.success(),
        "{}",
        String::from_utf8_lossy(&more.stderr)
    );
    assert_eq!(log(&run).len(), steps + 1);

    // a rank that fails: the launcher stops the other and names it
    let broken = args(&dir, "broken");
    std::fs::write(dir.join("images/green.png"), b"\x89PNG\r\n\x1a\n not a png")?;
    let out = launched(&broken).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("green.png") && stderr.contains("failed") && stderr.contains("rank"),
        "{stderr}"
    );
    std::fs::remove_dir_all(dir).ok();
    Ok(())
}

/// A rank started by another launcher without the job's secret stops at once and says how to
/// give it (rank 0 would refuse it anyway).
#[test]
fn a_rank_without_the_jobs_secret_is_told_how_to_give_it() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_harma"))
        .args(["train", "--steps", "1"])
        .env_remove("HARMA_DIST_SECRET")
        .env("WORLD_SIZE", "2")
        .env("RANK", "1")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", "9")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("HARMA_DIST_SECRET is not set") && stderr.contains("same value"),
        "{stderr}"
    );
}
