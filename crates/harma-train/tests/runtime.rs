//! The process-wide settings the binaries start with (`harma_train::cli::start_up`, applying
//! `harma_kernels::runtime`), each in its own process (Candle builds its pool once, at the
//! first op, from the environment of that moment; mimalloc's options are global).

use std::process::Command;

/// This process: after `start_up`, Candle's pool has the workers its rule gives for the
/// environment this process started with, and freed memory is kept.
#[test]
fn pool_and_memory_in_this_process() {
    let before = std::env::var("CANDLE_NUM_THREADS").ok();
    // mimalloc's default purge delay (ms, options.c), then ours
    assert_eq!(harma_kernels::runtime::purge_delay(), 1000);
    harma_train::cli::start_up();
    let after = std::env::var("CANDLE_NUM_THREADS").ok();
    match &before {
        // our default: every op on the calling thread
        None => assert_eq!(after.as_deref(), Some("1")),
        // a user's setting stands, whatever it is
        Some(v) => assert_eq!(after.as_deref(), Some(v.as_str())),
    }
    let workers = candle_core::utils::barrier_pool().n_workers();
    assert_eq!(
        workers,
        harma_kernels::runtime::candle_pool_workers(after.as_deref())
    );
    println!("workers={workers}");
    assert_eq!(harma_kernels::runtime::purge_delay(), -1);
    // and ops still compute: a sum over a tensor big enough to be split if the pool ran
    let x = candle_core::Tensor::ones(100_000, candle_core::DType::F32, &candle_core::Device::Cpu)
        .unwrap();
    let y = (&x + &x).unwrap().sum_all().unwrap();
    assert_eq!(y.to_scalar::<f32>().unwrap(), 200_000.0);
}

/// The test above in child processes, under each kind of setting a user may have.
#[test]
fn every_setting_gives_the_pool_candle_promises() {
    let rayon_threads = candle_core::utils::get_num_threads();
    for (setting, workers) in [
        (None, 0),
        (Some("3"), 2),
        // not a positive number: Candle falls back to rayon's count, and we leave it alone
        (Some("0"), rayon_threads.saturating_sub(1)),
        (Some(""), rayon_threads.saturating_sub(1)),
    ] {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", "pool_and_memory_in_this_process", "--nocapture"]);
        cmd.env("RAYON_NUM_THREADS", rayon_threads.to_string());
        match setting {
            None => cmd.env_remove("CANDLE_NUM_THREADS"),
            Some(v) => cmd.env("CANDLE_NUM_THREADS", v),
        };
        let out = cmd.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains(&format!("workers={workers}")),
            "CANDLE_NUM_THREADS={setting:?}: expected {workers} workers\n{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
