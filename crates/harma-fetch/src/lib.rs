//! Models and datasets into the `data/` layout of docs/DATA.md (`cargo xtask fetch-data` is
//! its command line).
//!
//! Sources are listed in `sources.json` beside this crate (docs/SOURCES.md says what each gives
//! and its licence). Hugging Face files land in hf-hub's cache (`HF_HOME`, `HF_ENDPOINT`, read
//! by hf-hub; the token in [`Net`]); the annotation files and HarMA's released checkpoints come
//! from GitHub (the hosts in [`Net`], which `xtask` reads from `HARMA_GITHUB_RAW` and
//! `HARMA_GITHUB_API`, for mirrors and tests).
//! Every download resumes, and is checked (its size, the sha256 pinned in `sources.json` or
//! announced by the Hub or GitHub) before it is renamed into place (`download`). Every name
//! that becomes a path (annotation images, asset names, archive members) is joined through
//! `names::safe_join` or refused. A dataset's images are unpacked from its archive by name
//! (only the members its annotations name, within size limits: `archive`), and the dataset
//! is marked complete only once every image is in place.

#![forbid(unsafe_code)]

mod archive;
mod download;
mod names;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

pub use archive::{parse_bytes, Limits, DEFAULT_MAX_MEMBER, DEFAULT_MAX_TOTAL};
pub use download::{verify, Expect, Net};
pub use names::safe_join;

use archive::{Archive, TempDir};
use download::{download, fetch_hf, release_assets};

/// Annotation files are a few MB; a larger download is refused (its JSON is read whole).
const MAX_ANNOTATION_BYTES: u64 = 64 << 20;

#[derive(Debug, Deserialize)]
pub struct Sources {
    pub models: std::collections::BTreeMap<String, ModelSource>,
    pub datasets: std::collections::BTreeMap<String, DatasetSource>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HfFile {
    pub repo: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub file: String,
    pub sha256: Option<String>,
    pub size: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    pub repo: String,
    pub tag: String,
    pub prefix: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSource {
    pub hf: Option<HfFile>,
    pub github_release: Option<Release>,
    /// a file, or a folder (ending in `/`) for release assets
    pub dest: String,
    pub licence: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFile {
    pub path: String,
    pub sha256: Option<String>,
    /// git's blob id of the file (`git ls-tree`), where no sha256 is known
    pub git_sha1: Option<String>,
}

impl RawFile {
    fn expect(&self) -> Expect {
        Expect {
            sha256: self.sha256.clone(),
            git_sha1: self.git_sha1.clone(),
            max_size: Some(MAX_ANNOTATION_BYTES),
            ..Expect::default()
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Annotations {
    pub github: String,
    pub branch: String,
    /// file name under data/<dataset>/ -> file in the repository
    pub files: std::collections::BTreeMap<String, RawFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Images {
    pub hf: HfFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSource {
    pub annotations: Annotations,
    pub images: Images,
    pub licence: String,
}

impl Sources {
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let (text, from) = match path {
            Some(p) => (
                std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read {}", p.display()))?,
                p.display().to_string(),
            ),
            None => (
                include_str!("../sources.json").to_string(),
                "crates/harma-fetch/sources.json".into(),
            ),
        };
        let s: Self = serde_json::from_str(&text).with_context(|| format!("{from}: not valid"))?;
        let hex = |v: &Option<String>, len: usize, key: String| -> Result<()> {
            match v {
                Some(h) if h.len() != len || !h.chars().all(|c| c.is_ascii_hexdigit()) => {
                    bail!("{from}: {key} `{h}` is not {len} hex digits")
                }
                _ => Ok(()),
            }
        };
        for (n, m) in &s.models {
            if let Some(h) = &m.hf {
                hex(&h.sha256, 64, format!("models.{n}.hf.sha256"))?;
            }
        }
        for (n, d) in &s.datasets {
            hex(
                &d.images.hf.sha256,
                64,
                format!("datasets.{n}.images.hf.sha256"),
            )?;
            for (f, r) in &d.annotations.files {
                hex(
                    &r.sha256,
                    64,
                    format!("datasets.{n}.annotations.files.{f}.sha256"),
                )?;
                hex(
                    &r.git_sha1,
                    40,
                    format!("datasets.{n}.annotations.files.{f}.git_sha1"),
                )?;
            }
        }
        Ok(s)
    }
}

/// Every file under `dir`, relative to it, sorted (links are listed, not followed): what a
/// test compares before and after a run to prove nothing was written elsewhere.
pub fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                stack.push(p);
            } else if let Ok(rel) = p.strip_prefix(dir) {
                out.push(rel.display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// A file in place that fails its check: say how to get it again.
fn remove_hint(e: anyhow::Error) -> anyhow::Error {
    anyhow::anyhow!("{e:#}; remove it to download it again")
}

/// Put `src` at `dest` by a hard link or a copy to a temp name, then a rename; the temp file
/// goes on failure.
fn place(src: &Path, dest: &Path) -> Result<()> {
    // hf-hub's cache entries may be symlinks into its blob store: link the blob itself
    let src =
        &std::fs::canonicalize(src).with_context(|| format!("cannot read {}", src.display()))?;
    let tmp = temp_beside(dest)?;
    let r = (|| -> Result<()> {
        if std::fs::hard_link(src, &tmp).is_err() {
            std::fs::copy(src, &tmp)
                .with_context(|| format!("cannot copy {} to {}", src.display(), tmp.display()))?;
        }
        std::fs::rename(&tmp, dest).with_context(|| format!("cannot move into {}", dest.display()))
    })();
    if r.is_err() {
        std::fs::remove_file(&tmp).ok();
    }
    r
}

/// The temp name `place` uses for `dest` (creating its folder); a leftover of an earlier
/// failed run under that name, or under the name earlier versions used, is removed.
fn temp_beside(dest: &Path) -> Result<PathBuf> {
    let dir = dest.parent().context("destination has no folder")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    std::fs::remove_file(dir.join(format!(".{name}.tmp"))).ok();
    let tmp = dir.join(format!(".{name}.fetch-tmp"));
    std::fs::remove_file(&tmp).ok();
    Ok(tmp)
}

/// The images a dataset's annotation files name: each image's name parts and where it goes
/// under `images`, one per destination. A name that would land outside `images` is an error
/// naming the file, the entry and the name.
fn wanted_images(
    dir: &Path,
    files: &[&String],
    images: &Path,
) -> Result<Vec<(Vec<String>, PathBuf)>> {
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for file in files {
        let path = dir.join(file);
        let names = harma_data::annotations::image_names(&path)?;
        for (k, name) in names.iter().enumerate() {
            let dest = safe_join(images, Path::new(name))
                .with_context(|| format!("{}: entry {k}: image", path.display()))?;
            if seen.insert(dest.clone()) {
                let parts = names::name_parts(name).unwrap_or_default();
                out.push((parts.into_iter().map(str::to_string).collect(), dest));
            }
        }
    }
    Ok(out)
}

pub fn fetch_dataset(
    net: &Net,
    name: &str,
    src: &DatasetSource,
    data: &Path,
    limits: &Limits,
) -> Result<()> {
    let dir = safe_join(data, Path::new(name))?;
    // temp files of an earlier run that stopped part-way
    let unpack_tmp = dir.join(".unpack");
    if unpack_tmp.exists() {
        std::fs::remove_dir_all(&unpack_tmp)
            .with_context(|| format!("cannot remove {}", unpack_tmp.display()))?;
    }
    let marker = dir.join(".complete");
    if marker.exists() {
        println!("{name}: complete ({})", dir.display());
        return Ok(());
    }
    let raw = &net.github_raw;
    let a = &src.annotations;
    for (file, f) in &a.files {
        let dest = safe_join(&dir, Path::new(file))?;
        if dest.exists() {
            verify(&dest, &f.expect(), &dest.display().to_string()).map_err(remove_hint)?;
            continue;
        }
        let url = format!("{raw}/{}/{}/{}", a.github, a.branch, f.path);
        println!("{name}: {file} <- {url}");
        download(net, &url, &dest, &f.expect(), None, file)?;
    }
    let images = dir.join("images");
    let files: Vec<&String> = a.files.keys().collect();
    let wanted = wanted_images(&dir, &files, &images)?;
    let missing: Vec<&(Vec<String>, PathBuf)> =
        wanted.iter().filter(|(_, d)| !d.is_file()).collect();
    if !missing.is_empty() {
        let hf = &src.images.hf;
        println!(
            "{name}: {} of {} images to place, from {}/{}",
            missing.len(),
            wanted.len(),
            hf.repo,
            hf.file
        );
        let blob = fetch_hf(net, hf)?;
        let archive = Archive::new(&blob, &hf.file)?;
        let members = archive.members()?;
        let parts: Vec<Vec<String>> = missing.iter().map(|(p, _)| p.clone()).collect();
        let found = archive::match_members(&members, &parts);
        let mut plan: Vec<(usize, Vec<PathBuf>)> = Vec::new();
        let mut absent = Vec::new();
        for ((p, dest), m) in missing.iter().zip(found) {
            match m {
                Some(m) => match plan.iter_mut().find(|(q, _)| *q == m) {
                    Some((_, d)) => d.push(dest.clone()),
                    None => plan.push((m, vec![dest.clone()])),
                },
                None => absent.push(p.join("/")),
            }
        }
        {
            let tmp = TempDir::new(unpack_tmp)?;
            archive.extract(&members, &plan, tmp.path(), limits)?;
        }
        if !absent.is_empty() {
            bail!(
                "{name}: {} images named in the annotations are not in {} (first: {}); the \
                 dataset is left incomplete",
                absent.len(),
                hf.file,
                absent[0]
            );
        }
    }
    let tmp = temp_beside(&marker)?;
    std::fs::write(&tmp, format!("{} images\n", wanted.len()))
        .and_then(|()| std::fs::rename(&tmp, &marker))
        .with_context(|| format!("cannot write {}", marker.display()))?;
    println!(
        "{name}: complete, {} images in {}",
        wanted.len(),
        images.display()
    );
    Ok(())
}

pub fn fetch_model(net: &Net, name: &str, src: &ModelSource, data: &Path) -> Result<()> {
    if let Some(hf) = &src.hf {
        let dest = safe_join(data, Path::new(&src.dest))?;
        if dest.exists() {
            let pinned = Expect {
                size: hf.size,
                sha256: hf.sha256.clone(),
                ..Expect::default()
            };
            verify(&dest, &pinned, &dest.display().to_string()).map_err(remove_hint)?;
            println!("{name}: in place ({})", dest.display());
            return Ok(());
        }
        println!("{name}: {}/{}", hf.repo, hf.file);
        let cached = fetch_hf(net, hf)?;
        place(&cached, &dest)?;
        println!("{name}: {}", dest.display());
        return Ok(());
    }
    let Some(rel) = &src.github_release else {
        bail!("{name}: the source names neither `hf` nor `github_release`");
    };
    // placed earlier (only complete files have their final name): no need to ask GitHub
    let folder = safe_join(data, Path::new(&src.dest))?;
    let (partial, placed): (Vec<String>, Vec<String>) = std::fs::read_dir(&folder)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(&rel.prefix))
                .partition(|n| n.ends_with(".part"))
        })
        .unwrap_or_default();
    if !placed.is_empty() && partial.is_empty() {
        println!("{name}: in place ({})", placed.join(", "));
        return Ok(());
    }
    let api = &net.github_api;
    let url = format!("{api}/repos/{}/releases/tags/{}", rel.repo, rel.tag);
    let assets = release_assets(net, &url, &rel.prefix)?;
    if assets.is_empty() {
        bail!("{name}: no asset starting with `{}` in {url}", rel.prefix);
    }
    // every name first: a release with one bad name places nothing
    let mut dests = Vec::new();
    for a in &assets {
        if !names::is_plain_file_name(&a.name) {
            bail!(
                "{name}: release asset `{}` in {url} is not a plain file name: refused (nothing \
                 is written outside {})",
                a.name.escape_debug(),
                folder.display()
            );
        }
        dests.push(safe_join(&folder, Path::new(&a.name))?);
    }
    for (a, dest) in assets.iter().zip(dests) {
        if dest.exists() {
            let size_only = Expect {
                sha256: None,
                ..a.expect.clone()
            };
            verify(&dest, &size_only, &dest.display().to_string()).map_err(remove_hint)?;
            println!("{name}: in place ({})", dest.display());
            continue;
        }
        a.expect.announce(net, name, &a.name)?;
        println!("{name}: {} <- {}", a.name, a.url);
        download(net, &a.url, &dest, &a.expect, None, &a.name)?;
    }
    Ok(())
}

pub fn select<'a>(
    asked: &'a [String],
    all: Vec<&'a String>,
    what: &str,
) -> Result<Vec<&'a String>> {
    let mut out = Vec::new();
    for a in asked {
        match a.as_str() {
            "all" => out.extend(all.iter().copied()),
            "none" => {}
            _ => match all.iter().find(|n| n.as_str() == a) {
                Some(n) => out.push(*n),
                None => bail!(
                    "unknown {what} `{a}`; known: {}, all, none",
                    all.iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            },
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_sources_are_complete() {
        let s = Sources::load(None).unwrap();
        for (n, m) in &s.models {
            assert!(m.hf.is_some() != m.github_release.is_some(), "{n}");
            assert!(!m.licence.is_empty(), "{n}");
            assert!(
                safe_join(Path::new("data"), Path::new(&m.dest)).is_ok(),
                "{n}"
            );
        }
        for (n, d) in &s.datasets {
            for f in ["train.json", "val.json", "test.json"] {
                let r = &d.annotations.files[f];
                assert!(
                    r.sha256.is_some() || r.git_sha1.is_some(),
                    "{n}: {f} is pinned"
                );
            }
        }
        // the annotation checksums are those of the files we ship
        let test = &s.datasets["rsitmd"].annotations.files["test.json"];
        let ours =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data/annotations/rsitmd_test.json");
        assert_eq!(
            harma_data::sha256_file(&ours).unwrap(),
            test.sha256.clone().unwrap()
        );
        // a pin that is not a checksum is caught when the file is read
        let dir = std::env::temp_dir().join(format!("harma-sources-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("s.json");
        let text =
            include_str!("../sources.json").replacen(&test.sha256.clone().unwrap(), "c154", 1);
        std::fs::write(&bad, text).unwrap();
        let err = format!("{:#}", Sources::load(Some(&bad)).unwrap_err());
        assert!(
            err.contains("datasets.rsitmd.annotations.files.test.json.sha256"),
            "{err}"
        );
        std::fs::write(
            &bad,
            r#"{"models": {"m": {"hf": {"repo": "a/b", "type": "model",
            "file": "f", "sha265": "x"}, "dest": "m", "licence": "l"}}, "datasets": {}}"#,
        )
        .unwrap();
        let err = format!("{:#}", Sources::load(Some(&bad)).unwrap_err());
        assert!(err.contains("sha265"), "a misspelt key is an error: {err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
