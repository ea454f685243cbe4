//! `cargo xtask build-cuda`: CUDA builds of `harma` and `xtask` (for `xtask gpu-check`) on a
//! machine with no GPU and no CUDA toolkit (docs/CUDA.md).
//!
//! 1. The CUDA 13.0 compiler, headers and libraries (and NCCL) come from PyPI's `nvidia-*` wheels,
//!    installed with `pip --target` under `target/cuda-toolkit/site` (once; pinned versions).
//! 2. `target/cuda-toolkit/root` is laid out as a toolkit (`bin`, `include`, `nvvm`, `lib64`
//!    with unversioned library names) and serves as `CUDA_ROOT`.
//! 3. The driver library `libcuda.so` comes with the GPU's driver, not with the toolkit. The
//!    linker gets a stub in `lib64/stubs` (soname `libcuda.so.1`) defining every driver
//!    function cudarc binds; at run time the real driver is loaded instead.
//! 4. `cargo build --release --features cuda` into `target/cuda` with
//!    `CUDA_COMPUTE_CAP` (H100/H200: 90) and `CUDARC_CUDA_VERSION=13000`; the binaries are
//!    copied to `--out` with a note of the libraries they need.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A Python with pip (3.9 or newer), used once to fetch the CUDA 13.0 compiler and
    /// libraries from PyPI
    #[arg(long, default_value = "python3", value_name = "PATH")]
    python: PathBuf,
    /// The GPU's compute capability: 90 for H100 and H200, 80 for A100, 89 for L4/L40
    #[arg(long, default_value = "90", value_name = "N")]
    compute_cap: String,
    /// Where the binaries go
    #[arg(long, default_value = "target/cuda-dist", value_name = "DIR")]
    out: PathBuf,
    /// Only type-check the `cuda` feature (`cargo check`), no binaries
    #[arg(long)]
    check: bool,
}

/// The wheels of CUDA 13.0 (the GPU machine's driver 580 runs CUDA 13.0 binaries).
const PACKAGES: &[&str] = &[
    "nvidia-cuda-nvcc==13.0.88",
    "nvidia-cuda-crt==13.0.88",
    "nvidia-nvvm==13.0.88",
    "nvidia-cuda-runtime==13.0.96",
    "nvidia-cuda-cccl==13.0.85",
    "nvidia-cublas==13.0.2.14",
    "nvidia-curand==10.4.5.25",
    "nvidia-cuda-nvrtc==13.0.88",
    // data-parallel training (harma-train's cuda feature enables Candle's nccl)
    "nvidia-nccl-cu13==2.28.9",
];
const CUDARC_CUDA_VERSION: &str = "13000";
const TOOLKIT: &str = "target/cuda-toolkit";
const TARGET_DIR: &str = "target/cuda";
const FEATURES: &str = "harma-train/cuda,xtask/cuda";

pub fn run(args: &Args) -> Result<()> {
    let toolkit = Path::new(TOOLKIT);
    let cu = install_wheels(&args.python, toolkit)?;
    let root = std::fs::canonicalize(toolkit)?.join("root");
    lay_out_root(&cu, &root)?;
    write_driver_stub(&root.join("lib64/stubs"))?;
    let verb = if args.check { "check" } else { "build" };
    eprintln!(
        "cargo {verb} --features cuda (compute capability {}; the first build compiles \
         Candle's CUDA kernels with nvcc and takes a while)",
        args.compute_cap
    );
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args([
        verb,
        "--release",
        "--locked",
        "-p",
        "harma-train",
        "-p",
        "xtask",
    ])
    .args(["--features", FEATURES, "--target-dir", TARGET_DIR]);
    let path = std::env::join_paths(std::iter::once(root.join("bin")).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))?;
    cmd.env("CUDA_ROOT", &root)
        .env("CUDA_HOME", &root)
        .env("NVCC", root.join("bin/nvcc"))
        .env("CUDA_COMPUTE_CAP", &args.compute_cap)
        .env("CUDARC_CUDA_VERSION", CUDARC_CUDA_VERSION)
        .env("PATH", path);
    let status = cmd.status().context("cannot run cargo")?;
    if !status.success() {
        bail!("cargo {verb} with the cuda feature failed (its output is above)");
    }
    if args.check {
        eprintln!("the cuda feature type-checks");
        return Ok(());
    }
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    for bin in ["harma", "xtask"] {
        let from = Path::new(TARGET_DIR).join("release").join(bin);
        let to = args.out.join(bin);
        let tmp = args.out.join(format!(".{bin}.part"));
        std::fs::copy(&from, &tmp)
            .with_context(|| format!("cannot copy {} to {}", from.display(), tmp.display()))?;
        // the release profile keeps line tables; a binary to carry around goes without them
        match Command::new("strip").arg(&tmp).status() {
            Ok(s) if s.success() => {}
            _ => eprintln!("note: `strip` failed or is missing; {bin} keeps its debug lines"),
        }
        std::fs::rename(&tmp, &to)?;
        let size = std::fs::metadata(&to)?.len() as f64 / 1e6;
        eprintln!("wrote {} ({size:.0} MB)", to.display());
    }
    // gzipped, to carry to a GPU machine with a size limit (scripts/gpu-check.sh unpacks them)
    for bin in ["xtask", "harma"] {
        let gz = args.out.join(format!("{bin}.gz"));
        gzip(&args.out.join(bin), &gz)?;
        eprintln!(
            "wrote {} ({:.0} MB)",
            gz.display(),
            std::fs::metadata(&gz)?.len() as f64 / 1e6
        );
    }
    let needed = needed_libraries(&args.out.join("harma"));
    println!(
        "CUDA binaries for compute capability {} in {}.\n\
         They need at run time: {}.\n\
         libcuda.so.1 comes with the NVIDIA driver; the others with CUDA 13 (a PyTorch \
         environment's site-packages/nvidia/cu13/lib, or a CUDA toolkit): point \
         LD_LIBRARY_PATH at them (scripts/gpu-check.sh does).",
        args.compute_cap,
        args.out.display(),
        needed.join(", ")
    );
    Ok(())
}

fn gzip(from: &Path, to: &Path) -> Result<()> {
    let tmp = to.with_extension("gz.part");
    let mut enc = flate2::write::GzEncoder::new(
        std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?,
        flate2::Compression::default(),
    );
    std::io::copy(&mut std::fs::File::open(from)?, &mut enc)?;
    enc.finish()?.sync_all()?;
    std::fs::rename(&tmp, to)?;
    Ok(())
}

/// Install the wheels under `toolkit/site` unless the same set is there; returns the
/// `nvidia/cu13` folder. A failed install leaves nothing that looks complete.
fn install_wheels(python: &Path, toolkit: &Path) -> Result<PathBuf> {
    let site = toolkit.join("site");
    let marker = site.join(".harma-packages");
    let want = PACKAGES.join("\n");
    let cu = site.join("nvidia/cu13");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(want.as_str()) {
        return Ok(cu);
    }
    let tmp = toolkit.join("site.part");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(toolkit)?;
    eprintln!(
        "installing the CUDA 13.0 compiler and libraries from PyPI (about 1.2 GB) into {}",
        site.display()
    );
    let status = Command::new(python)
        .args(["-m", "pip", "install", "--quiet", "--no-deps", "--target"])
        .arg(&tmp)
        .args(PACKAGES)
        .status()
        .with_context(|| {
            format!(
                "cannot run {} (give a Python with pip: --python PATH)",
                python.display()
            )
        })?;
    if !status.success() {
        bail!(
            "pip could not install {} (is PyPI reachable? is {} a Python with pip?)",
            PACKAGES.join(" "),
            python.display()
        );
    }
    if !tmp.join("nvidia/cu13/bin/nvcc").is_file() {
        bail!(
            "the wheels installed but {} is missing: the nvidia packages changed layout",
            tmp.join("nvidia/cu13/bin/nvcc").display()
        );
    }
    if site.exists() {
        std::fs::remove_dir_all(&site)?;
    }
    std::fs::rename(&tmp, &site)?;
    std::fs::write(&marker, want)?;
    Ok(cu)
}

/// `root/{bin,include,nvvm}` -> the wheels' folders; `root/lib64` holds a versioned and an
/// unversioned link to each library (the linker looks for `libcublas.so`).
fn lay_out_root(cu: &Path, root: &Path) -> Result<()> {
    let cu = std::fs::canonicalize(cu)?;
    std::fs::create_dir_all(root.join("lib64/stubs"))?;
    for dir in ["bin", "include", "nvvm"] {
        replace_link(&cu.join(dir), &root.join(dir))?;
    }
    // CUDA's own libraries, and NCCL's (its wheel installs beside cu13)
    for lib in [cu.join("lib"), cu.join("../nccl/lib")] {
        for entry in std::fs::read_dir(&lib)? {
            let path = entry?.path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if let Some(pos) = name.find(".so.") {
                replace_link(&path, &root.join("lib64").join(&name))?;
                replace_link(&path, &root.join("lib64").join(&name[..pos + 3]))?;
            }
        }
    }
    Ok(())
}

fn replace_link(target: &Path, link: &Path) -> Result<()> {
    if link.symlink_metadata().is_ok() {
        std::fs::remove_file(link)?;
    }
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("cannot link {} -> {}", link.display(), target.display()))
}

/// The driver functions cudarc declares, from its bindings (`fn cuXxx(` in `extern` blocks).
pub fn driver_functions(bindings: &str) -> Vec<String> {
    let mut names: Vec<String> = bindings
        .lines()
        .filter_map(|l| {
            let name = l.trim_start().strip_prefix("fn cu")?;
            let end = name.find('(')?;
            let name = &name[..end];
            // driver functions are cuXxx; cublas, curand and the runtime are cublas*/curand*/cuda*
            let first = name.chars().next()?;
            (first.is_ascii_uppercase()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
            .then(|| format!("cu{name}"))
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

/// C source of a `libcuda.so` defining `names`, each returning CUDA_ERROR_UNKNOWN (999): only
/// the linker reads it, since the binary asks for the driver's `libcuda.so.1` at run time.
pub fn stub_source(names: &[String]) -> String {
    let mut s = String::from("/* link-time stand-in for the NVIDIA driver (xtask build-cuda) */\n");
    for n in names {
        s.push_str(&format!("int {n}(void) {{ return 999; }}\n"));
    }
    s
}

fn write_driver_stub(dir: &Path) -> Result<()> {
    let bindings_path = cudarc_dir()?.join("src/driver/sys/mod.rs");
    let bindings = std::fs::read_to_string(&bindings_path)
        .with_context(|| format!("cannot read {}", bindings_path.display()))?;
    let names = driver_functions(&bindings);
    if names.len() < 100 {
        bail!(
            "found only {} driver functions in {}: cudarc's bindings changed layout",
            names.len(),
            bindings_path.display()
        );
    }
    let src = dir.join("libcuda_stub.c");
    std::fs::write(&src, stub_source(&names))?;
    let cc = std::env::var_os("CC").unwrap_or_else(|| "cc".into());
    let status = Command::new(&cc)
        .args(["-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o"])
        .arg(dir.join("libcuda.so"))
        .arg(&src)
        .status()
        .with_context(|| format!("cannot run the C compiler {cc:?}"))?;
    if !status.success() {
        bail!("the C compiler failed on {}", src.display());
    }
    Ok(())
}

/// cudarc's source folder, as Cargo resolves it with the cuda feature (downloading it if
/// needed).
fn cudarc_dir() -> Result<PathBuf> {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args(["metadata", "--format-version", "1", "--locked"])
        .args(["--features", FEATURES]);
    let meta = crate::run_json(&mut cmd, "cargo metadata")?;
    let manifest = meta["packages"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == "cudarc"))
        .and_then(|p| p["manifest_path"].as_str())
        .context("cargo metadata lists no cudarc package")?;
    Ok(Path::new(manifest).parent().unwrap().to_path_buf())
}

/// The shared libraries an ELF binary asks for (`readelf -d`), or a note that it could not tell.
fn needed_libraries(bin: &Path) -> Vec<String> {
    let out = match Command::new("readelf").arg("-d").arg(bin).output() {
        Ok(o) if o.status.success() => o,
        _ => return vec!["(readelf not found; run `ldd` on the binary)".into()],
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| Some(l.split('[').nth(1)?.trim_end_matches(']').to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn driver_functions_are_read_from_extern_blocks_only() {
        let src = "pub unsafe fn cuInit(Flags: c_uint) -> CUresult {\n    extern \"C\" {\n        \
                   fn cuInit(Flags: c_uint) -> CUresult;\n    }\n}\n        fn cuMemAlloc_v2(p: *mut u64) -> CUresult;\n        \
                   fn cublasCreate_v2(h: *mut H) -> S;\n        fn cudaMalloc(p: *mut *mut c_void) -> E;\n        \
                   fn cuInit(Flags: c_uint) -> CUresult;\n";
        assert_eq!(driver_functions(src), ["cuInit", "cuMemAlloc_v2"]);
        let c = stub_source(&driver_functions(src));
        assert!(c.contains("int cuInit(void) { return 999; }"));
        assert!(c.contains("int cuMemAlloc_v2(void)"));
    }
}
