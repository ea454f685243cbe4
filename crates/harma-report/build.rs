//! Embeds the git commit the binary is built from (`HARMA_GIT_COMMIT`, shown in run reports):
//! `git rev-parse` of the checkout, the variable itself if set at build time (a build from a
//! source archive), else "unknown". Rebuilt when HEAD moves.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (out.status.success() && !s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-env-changed=HARMA_GIT_COMMIT");
    let commit = std::env::var("HARMA_GIT_COMMIT")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=HARMA_GIT_COMMIT={commit}");
    // HEAD (a branch switch) and the branch's ref (a commit), wherever this checkout keeps them
    // (only files that exist: cargo reruns a script on every build for a missing one)
    let mut watch = vec!["HEAD".to_string(), "packed-refs".to_string()];
    watch.extend(git(&["symbolic-ref", "-q", "HEAD"]));
    for name in watch {
        if let Some(p) = git(&["rev-parse", "--git-path", &name]) {
            if std::path::Path::new(&p).exists() {
                println!("cargo:rerun-if-changed={p}");
            }
        }
    }
    if git(&["rev-parse", "--git-dir"]).is_none() {
        // not a checkout: nothing to watch but this file
        println!("cargo:rerun-if-changed=build.rs");
    }
}
