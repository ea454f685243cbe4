//! `xtask gpu-check`, the script run on a GPU, exercised on the CPU build: the parity section
//! compares the generic ops (the path a GPU takes) with the fused CPU kernels on a tiny model,
//! and the throughput section runs every measurement in its own process.

use std::process::Command;

fn xtask(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .output()
        .expect("run xtask")
}

/// scripts/gpu-check.sh as a GPU machine runs it, here on the CPU with the tiny model.
#[test]
fn gpu_check_runs_on_the_cpu_build_and_reports_parity() {
    let dir = std::env::temp_dir().join(format!("harma-gpu-check-{}", std::process::id()));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/gpu-check.sh");
    let o = Command::new("bash")
        .arg(script)
        .env("XTASK", env!("CARGO_BIN_EXE_xtask"))
        .env("DEVICE", "cpu")
        .env("MODEL", "tiny")
        .env("BATCHES", "2")
        .env("ITERS", "1")
        .env("TORCH_PYTHON", "none")
        .env("REPORT_DIR", &dir)
        .output()
        .expect("run scripts/gpu-check.sh");
    let out = dir.join("gpu-check.json");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let p = &r["parity"];
    let f = |k: &str| p[k].as_f64().unwrap_or_else(|| panic!("{k} in {p}"));
    assert_eq!(p["pass"], true);
    assert_eq!(p["grad_tensors"], 59, "every adapter tensor and temp");
    assert!(f("image_max_abs_err") <= 1e-4 && f("text_max_abs_err") <= 1e-4);
    assert!(f("loss_abs_err") <= 1e-4 && f("grad_rel_err") <= 1e-4);
    assert!(f("grad_worst_cosine") >= 1.0 - 1e-6);
    assert!(f("loss_cpu") > 0.0);
    // bf16 changes the embeddings a little, not a lot
    for k in ["bf16_image_max_abs_err", "bf16_text_max_abs_err"] {
        assert!(f(k) > 0.0 && f(k) < 5e-2, "{k}: {}", f(k));
    }
    let rows = r["harma_rs"].as_array().unwrap();
    assert_eq!(
        rows.len(),
        7,
        "images, captions, train in f32 and bf16, naive train"
    );
    for row in rows {
        assert_eq!(row["batch"], 2);
        assert!(row["items_per_s"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["peak_memory_gb"].as_f64().unwrap() > 0.0, "{row}");
    }
    assert!(stdout.contains("PASS"), "{stdout}");
    let log = std::fs::read_to_string(dir.join("gpu-check.log")).unwrap();
    assert!(log.contains("PASS"), "the log keeps the output: {log}");
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn gpu_check_names_what_is_wrong() {
    let o = xtask(&["gpu-check", "--device", "cpu", "--model", "huge"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--model huge"), "{err}");
    // a binary built without CUDA says so when asked for a GPU
    if !cfg!(feature = "cuda") {
        let o = xtask(&["gpu-check", "--device", "cuda"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains("CUDA"), "{err}");
    }
}

/// `xtask dist-check` as scripts/gpu-check.sh runs it on a GPU machine, here with two CPU
/// ranks (the launcher, the rendezvous, the collective) and the harma binary beside xtask.
#[test]
fn dist_check_compares_ranks_with_one_process() {
    let harma = std::path::Path::new(env!("CARGO_BIN_EXE_xtask")).with_file_name("harma");
    assert!(
        harma.is_file(),
        "{} missing: `cargo test --workspace` builds it (or cargo build -p harma-train)",
        harma.display()
    );
    let dir = std::env::temp_dir().join(format!("harma-dist-check-{}", std::process::id()));
    let json = dir.join("report.json");
    let o = xtask(&[
        "dist-check",
        "--harma",
        harma.to_str().unwrap(),
        "--device",
        "cpu",
        "--steps",
        "4",
        "--dir",
        dir.join("work").to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(
        (r["ranks"].as_u64(), r["pass"].as_bool()),
        (Some(2), Some(true))
    );
    assert!(r["loss_rel_diff"].as_f64().unwrap() <= 1e-6, "{r}");
    assert!(r["adapters_rel_diff"].as_f64().unwrap() <= 1e-5, "{r}");
    std::fs::remove_dir_all(dir).ok();
}
