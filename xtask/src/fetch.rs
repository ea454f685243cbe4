//! `cargo xtask fetch-data`: models and datasets into the `data/` layout of docs/DATA.md.
//!
//! Sources are listed in `xtask/sources.json` (docs/SOURCES.md says what each gives and its
//! licence). Hugging Face files go through `hf-hub` (which honours `HF_ENDPOINT` and `HF_HOME`,
//! caches, and resumes partial downloads); the annotation files and HarMA's released checkpoints
//! come from GitHub over plain HTTP with resume (`HARMA_GITHUB_RAW` and `HARMA_GITHUB_API`
//! override the hosts, for mirrors and tests). Every file is checked (size, and sha256 where
//! known) before it is placed, and placed by a rename, so nothing half-written is ever read as
//! complete; a dataset is marked complete only once every image its annotations name is in
//! place. Archives are unpacked refusing any entry that would land outside the target folder.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;
use sha2::Digest;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Datasets: rsitmd, rsicd, all or none [default: rsitmd, with the default model]
    #[arg(long, value_delimiter = ',')]
    dataset: Vec<String>,
    /// Models: georsclip, georsclip-ret2, remoteclip, laion, openai, harma-rsitmd, harma-rsicd,
    /// all or none [default: georsclip-ret2]
    #[arg(long, value_delimiter = ',')]
    model: Vec<String>,
    /// List the sources and what is already in place, and download nothing
    #[arg(long)]
    list: bool,
    /// Root of the data layout
    #[arg(long, value_name = "DIR", default_value = "data")]
    data_dir: PathBuf,
    /// Another sources file (tests, mirrors)
    #[arg(long, value_name = "FILE", hide = true)]
    sources: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
pub struct Sources {
    pub models: BTreeMap<String, ModelSource>,
    pub datasets: BTreeMap<String, DatasetSource>,
}

#[derive(Debug, Deserialize)]
pub struct HfFile {
    pub repo: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub file: String,
    pub sha256: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Release {
    pub repo: String,
    pub tag: String,
    pub prefix: String,
}

#[derive(Debug, Deserialize)]
pub struct ModelSource {
    pub hf: Option<HfFile>,
    pub github_release: Option<Release>,
    /// a file, or a folder (ending in `/`) for release assets
    pub dest: String,
    pub licence: String,
}

#[derive(Debug, Deserialize)]
pub struct RawFile {
    pub path: String,
    pub sha256: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Annotations {
    pub github: String,
    pub branch: String,
    /// file name under data/<dataset>/ -> file in the repository
    pub files: BTreeMap<String, RawFile>,
}

#[derive(Debug, Deserialize)]
pub struct Images {
    pub hf: HfFile,
}

#[derive(Debug, Deserialize)]
pub struct DatasetSource {
    pub annotations: Annotations,
    pub images: Images,
    pub licence: String,
}

impl Sources {
    pub fn load(path: Option<&Path>) -> Result<Self> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?,
            None => include_str!("../sources.json").to_string(),
        };
        serde_json::from_str(&text).context("sources: not valid")
    }
}

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key)
        .unwrap_or_else(|_| default.to_string())
        .trim_end_matches('/')
        .to_string()
}

fn bytes_bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{what:>24} [{{bar:30}}] {{bytes}}/{{total_bytes}} {{bytes_per_sec}} eta {{eta}}"
        ))
        .unwrap()
        .progress_chars("=> "),
    );
    pb
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Check a downloaded file against what is known about it.
fn verify(path: &Path, size: Option<u64>, sha256: Option<&str>, what: &str) -> Result<()> {
    let len = std::fs::metadata(path)?.len();
    if let Some(s) = size {
        if len != s {
            bail!("{what}: got {len} bytes, the server announced {s}");
        }
    }
    if let Some(want) = sha256 {
        let got = sha256_file(path)?;
        if got != want {
            bail!("{what}: sha256 {got}, expected {want} (a changed or corrupt file)");
        }
    }
    Ok(())
}

/// Put `src` at `dest` by a hard link or a copy to a temp name, then a rename.
fn place(src: &Path, dest: &Path) -> Result<()> {
    // hf-hub's cache entries are symlinks into its blob store: link the blob itself
    let src =
        &std::fs::canonicalize(src).with_context(|| format!("cannot read {}", src.display()))?;
    let dir = dest.parent().context("destination has no folder")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        dest.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    std::fs::remove_file(&tmp).ok();
    if std::fs::hard_link(src, &tmp).is_err() {
        std::fs::copy(src, &tmp)
            .with_context(|| format!("cannot copy {} to {}", src.display(), tmp.display()))?;
    }
    std::fs::rename(&tmp, dest).with_context(|| format!("cannot move into {}", dest.display()))?;
    Ok(())
}

/// A Hugging Face file through hf-hub (cached under HF_HOME, resumable); returns its cache path.
fn fetch_hf(f: &HfFile) -> Result<PathBuf> {
    use hf_hub::{api::sync::ApiBuilder, Repo, RepoType};
    let kind = match f.kind.as_str() {
        "model" => RepoType::Model,
        "dataset" => RepoType::Dataset,
        other => bail!("unknown Hugging Face repo type `{other}`"),
    };
    // retries resume a broken transfer within the run (hf-hub continues its `.part` file)
    let api = ApiBuilder::from_env()
        .with_progress(true)
        .with_retries(3)
        .build()
        .context("cannot set up the Hugging Face client")?;
    let repo = api.repo(Repo::with_revision(f.repo.clone(), kind, "main".into()));
    let path = repo.get(&f.file).map_err(|e| {
        anyhow::anyhow!(
            "downloading {} from {} failed: {e}. Check the network (or HF_ENDPOINT), then run \
             `cargo xtask fetch-data` again: partial downloads resume",
            f.file,
            repo.url(&f.file)
        )
    })?;
    // hf-hub does not compare the bytes with the announced size: do it, and the hash if known
    let size = hf_size(&repo.url(&f.file)).ok();
    if let Err(e) = verify(&path, size, f.sha256.as_deref(), &f.file) {
        std::fs::remove_file(&path).ok();
        bail!("{e}; the cached copy was removed, run again to download it afresh");
    }
    Ok(path)
}

/// The size a Hugging Face URL announces (`Content-Range` of a one-byte request).
fn hf_size(url: &str) -> Result<u64> {
    let r = ureq::get(url).set("Range", "bytes=0-0").call()?;
    let cr = r.header("Content-Range").context("no Content-Range")?;
    Ok(cr.rsplit('/').next().unwrap_or("").parse()?)
}

/// Download `url` to `dest`, resuming `dest.part` if an earlier run left one; checks the size
/// and, if given, the sha256 before renaming into place.
pub fn fetch_url(url: &str, dest: &Path, sha256: Option<&str>) -> Result<()> {
    let dir = dest.parent().context("destination has no folder")?;
    std::fs::create_dir_all(dir)?;
    let part = dest.with_file_name(format!(
        "{}.part",
        dest.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("download")
    ));
    let have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    let mut req = ureq::get(url);
    if have > 0 {
        req = req.set("Range", &format!("bytes={have}-"));
    }
    let resp = req.call().map_err(|e| {
        anyhow::anyhow!(
            "cannot download {url}: {e}. Check the network, then run `cargo xtask fetch-data` \
             again: finished files are kept and this one resumes"
        )
    })?;
    let (append, total) = match resp.status() {
        206 => {
            let total = resp
                .header("Content-Range")
                .and_then(|c| c.rsplit('/').next())
                .and_then(|t| t.parse::<u64>().ok());
            (true, total)
        }
        _ => (
            false,
            resp.header("Content-Length").and_then(|l| l.parse().ok()),
        ),
    };
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(append)
        .write(true)
        .truncate(!append)
        .open(&part)
        .with_context(|| format!("cannot write {}", part.display()))?;
    let start = if append { have } else { 0 };
    let name = dest.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let pb = bytes_bar(total.unwrap_or(0), name);
    pb.set_position(start);
    let mut reader = resp.into_reader();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(n) => n,
            Err(e) => {
                pb.abandon();
                bail!(
                    "the download of {url} broke off ({e}); run `cargo xtask fetch-data` again \
                     to resume it"
                );
            }
        };
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n])?;
        pb.inc(n as u64);
    }
    file.flush()?;
    drop(file);
    pb.finish_and_clear();
    if let Err(e) = verify(&part, total, sha256, name) {
        std::fs::remove_file(&part).ok();
        bail!("{e}; the partial file was removed, run again to download it afresh");
    }
    std::fs::rename(&part, dest)?;
    Ok(())
}

/// Where an archive entry lands under `root`, or an error if it would land outside it.
pub fn safe_join(root: &Path, entry: &Path) -> Result<PathBuf> {
    let mut out = root.to_path_buf();
    let mut depth = 0usize;
    for c in entry.components() {
        match c {
            Component::Normal(p) => {
                out.push(p);
                depth += 1;
            }
            Component::CurDir => {}
            Component::ParentDir if depth > 0 => {
                out.pop();
                depth -= 1;
            }
            _ => bail!(
                "archive entry `{}` would land outside {}: refused",
                entry.display(),
                root.display()
            ),
        }
    }
    if depth == 0 {
        bail!("archive entry `{}` has no file name", entry.display());
    }
    Ok(out)
}

/// Whether a link at `entry` pointing to `target` stays under the archive root.
fn link_stays_inside(entry: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    let base = entry.parent().unwrap_or(Path::new(""));
    safe_join(Path::new(""), &base.join(target)).is_ok()
}

/// Unpack a .zip, .tar, .tar.gz or .tgz into `dest`. Entries with absolute paths, `..` that
/// leaves `dest`, or links pointing outside are refused (an error, nothing more is written);
/// links that stay inside are skipped. Returns the files written.
pub fn unpack(archive: &Path, dest: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dest)?;
    let name = archive.to_string_lossy().to_lowercase();
    let ctx = || format!("{}", archive.display());
    let mut written = Vec::new();
    if name.ends_with(".zip") {
        let f = std::fs::File::open(archive).with_context(ctx)?;
        let mut zip = zip::ZipArchive::new(f).with_context(|| format!("{}: not a zip", ctx()))?;
        for i in 0..zip.len() {
            let mut e = zip.by_index(i).with_context(ctx)?;
            let raw = PathBuf::from(e.name());
            let out = safe_join(dest, &raw).with_context(ctx)?;
            let is_link = e.unix_mode().is_some_and(|m| m & 0o170000 == 0o120000);
            if is_link {
                let mut target = String::new();
                e.read_to_string(&mut target)?;
                if !link_stays_inside(&raw, Path::new(&target)) {
                    bail!(
                        "{}: link `{}` -> `{target}` points outside the archive: refused",
                        ctx(),
                        raw.display()
                    );
                }
                continue;
            }
            if e.is_dir() {
                std::fs::create_dir_all(&out)?;
                continue;
            }
            write_entry(&mut e, &out)?;
            written.push(out);
        }
    } else if name.ends_with(".tar") || name.ends_with(".tar.gz") || name.ends_with(".tgz") {
        let f = std::fs::File::open(archive).with_context(ctx)?;
        let reader: Box<dyn Read> = if name.ends_with(".tar") {
            Box::new(f)
        } else {
            Box::new(flate2::read::GzDecoder::new(f))
        };
        let mut tar = tar::Archive::new(reader);
        for e in tar.entries().with_context(ctx)? {
            let mut e = e.with_context(ctx)?;
            let raw = e.path().with_context(ctx)?.into_owned();
            let out = safe_join(dest, &raw).with_context(ctx)?;
            match e.header().entry_type() {
                tar::EntryType::Symlink | tar::EntryType::Link => {
                    let target = e.link_name()?.map(|t| t.into_owned()).unwrap_or_default();
                    let inside = if e.header().entry_type() == tar::EntryType::Link {
                        safe_join(Path::new(""), &target).is_ok()
                    } else {
                        link_stays_inside(&raw, &target)
                    };
                    if !inside {
                        bail!(
                            "{}: link `{}` -> `{}` points outside the archive: refused",
                            ctx(),
                            raw.display(),
                            target.display()
                        );
                    }
                }
                tar::EntryType::Directory => std::fs::create_dir_all(&out)?,
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    write_entry(&mut e, &out)?;
                    written.push(out);
                }
                _ => {}
            }
        }
    } else {
        bail!("{}: not a .zip, .tar, .tar.gz or .tgz archive", ctx());
    }
    Ok(written)
}

/// Write one archive entry; refuses to write through an existing link.
fn write_entry(r: &mut impl Read, out: &Path) -> Result<()> {
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if std::fs::symlink_metadata(out).is_ok_and(|m| m.file_type().is_symlink()) {
        bail!("{} is a link: refused to write through it", out.display());
    }
    let mut f =
        std::fs::File::create(out).with_context(|| format!("cannot write {}", out.display()))?;
    std::io::copy(r, &mut f)?;
    Ok(())
}

/// The image paths an annotation file names (train: one per caption; val/test: one per image).
fn annotated_images(path: &Path) -> Result<Vec<String>> {
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?,
    )
    .with_context(|| format!("{}: not valid JSON", path.display()))?;
    let items = v
        .as_array()
        .with_context(|| format!("{}: not a list", path.display()))?;
    let mut out: Vec<String> = items
        .iter()
        .filter_map(|e| e["image"].as_str().map(String::from))
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}

pub fn fetch_dataset(name: &str, src: &DatasetSource, data: &Path) -> Result<()> {
    let dir = data.join(name);
    let marker = dir.join(".complete");
    if marker.exists() {
        println!("{name}: complete ({})", dir.display());
        return Ok(());
    }
    let raw = env_or("HARMA_GITHUB_RAW", "https://raw.githubusercontent.com");
    let a = &src.annotations;
    for (file, f) in &a.files {
        let dest = dir.join(file);
        if dest.exists() {
            verify(&dest, None, f.sha256.as_deref(), file)?;
            continue;
        }
        let url = format!("{raw}/{}/{}/{}", a.github, a.branch, f.path);
        println!("{name}: {file} <- {url}");
        fetch_url(&url, &dest, f.sha256.as_deref())?;
    }
    let mut wanted = Vec::new();
    for file in a.files.keys() {
        wanted.extend(annotated_images(&dir.join(file))?);
    }
    wanted.sort();
    wanted.dedup();
    let images = dir.join("images");
    let missing: Vec<&String> = wanted
        .iter()
        .filter(|w| !images.join(w).is_file())
        .collect();
    if !missing.is_empty() {
        println!(
            "{name}: {} of {} images to place, from {}/{}",
            missing.len(),
            wanted.len(),
            src.images.hf.repo,
            src.images.hf.file
        );
        let archive = fetch_hf(&src.images.hf)?;
        // the cache path hides the extension behind a hash: unpack by the source's file name
        let tmp = dir.join(".unpack");
        std::fs::remove_dir_all(&tmp).ok();
        let named = tmp.join(&src.images.hf.file);
        place(&archive, &named)?;
        let files = unpack(&named, &tmp.join("x"))?;
        let mut by_name: HashMap<String, Vec<PathBuf>> = HashMap::new();
        for f in files {
            if let Some(n) = f.file_name().and_then(|n| n.to_str()) {
                by_name.entry(n.to_string()).or_default().push(f.clone());
            }
        }
        let mut absent = Vec::new();
        for w in &missing {
            let base = Path::new(w.as_str())
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("");
            let cands = by_name.get(base).map(Vec::as_slice).unwrap_or(&[]);
            let pick = cands
                .iter()
                .find(|c| c.ends_with(w.as_str()))
                .or(if cands.len() == 1 {
                    cands.first()
                } else {
                    None
                });
            match pick {
                Some(p) => {
                    let dest = images.join(w.as_str());
                    std::fs::create_dir_all(dest.parent().unwrap())?;
                    std::fs::rename(p, &dest)?;
                }
                None => absent.push(w.to_string()),
            }
        }
        std::fs::remove_dir_all(&tmp).ok();
        if !absent.is_empty() {
            bail!(
                "{name}: {} images named in the annotations are not in {} (first: {}); the \
                 dataset is left incomplete",
                absent.len(),
                src.images.hf.file,
                absent[0]
            );
        }
    }
    std::fs::write(&marker, format!("{} images\n", wanted.len()))?;
    println!(
        "{name}: complete, {} images in {}",
        wanted.len(),
        images.display()
    );
    Ok(())
}

pub fn fetch_model(name: &str, src: &ModelSource, data: &Path) -> Result<()> {
    if let Some(hf) = &src.hf {
        let dest = data.join(&src.dest);
        if dest.exists() {
            verify(&dest, None, hf.sha256.as_deref(), &src.dest)?;
            println!("{name}: in place ({})", dest.display());
            return Ok(());
        }
        println!("{name}: {}/{}", hf.repo, hf.file);
        let cached = fetch_hf(hf)?;
        place(&cached, &dest)?;
        println!("{name}: {}", dest.display());
        return Ok(());
    }
    let Some(rel) = &src.github_release else {
        bail!("{name}: the source names neither `hf` nor `github_release`");
    };
    // placed earlier (only complete files have their final name): no need to ask GitHub
    let folder = data.join(&src.dest);
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
    let api = env_or("HARMA_GITHUB_API", "https://api.github.com");
    let url = format!("{api}/repos/{}/releases/tags/{}", rel.repo, rel.tag);
    let listing: serde_json::Value = ureq::get(&url)
        .call()
        .map_err(|e| anyhow::anyhow!("cannot list the release {url}: {e}"))?
        .into_json()?;
    let assets: Vec<(String, String)> = listing["assets"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| {
                    Some((
                        x["name"].as_str()?.to_string(),
                        x["browser_download_url"].as_str()?.to_string(),
                    ))
                })
                .filter(|(n, _)| n.starts_with(&rel.prefix))
                .collect()
        })
        .unwrap_or_default();
    if assets.is_empty() {
        bail!("{name}: no asset starting with `{}` in {url}", rel.prefix);
    }
    for (file, link) in assets {
        let dest = data.join(&src.dest).join(&file);
        if dest.exists() {
            println!("{name}: in place ({})", dest.display());
            continue;
        }
        println!("{name}: {file} <- {link}");
        fetch_url(&link, &dest, None)?;
    }
    Ok(())
}

fn select<'a>(asked: &'a [String], all: Vec<&'a String>, what: &str) -> Result<Vec<&'a String>> {
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

pub fn run(args: &Args) -> Result<()> {
    let sources = Sources::load(args.sources.as_deref())?;
    let data = &args.data_dir;
    if args.list {
        for (name, m) in &sources.models {
            let from = match (&m.hf, &m.github_release) {
                (Some(h), _) => format!("hf {}/{}", h.repo, h.file),
                (None, Some(r)) => format!("github {} release {} ({}*)", r.repo, r.tag, r.prefix),
                _ => "-".into(),
            };
            let here = if data.join(&m.dest).exists() {
                "in place"
            } else {
                "missing"
            };
            println!("model   {name:<16} {here:<9} {from}  [{}]", m.licence);
        }
        for (name, d) in &sources.datasets {
            let here = if data.join(name).join(".complete").exists() {
                "complete"
            } else {
                "missing"
            };
            println!(
                "dataset {name:<16} {here:<9} annotations github {}, images hf {}/{}  [{}]",
                d.annotations.github, d.images.hf.repo, d.images.hf.file, d.licence
            );
        }
        return Ok(());
    }
    let defaults = args.dataset.is_empty() && args.model.is_empty();
    let ds_asked = if defaults {
        vec!["rsitmd".to_string()]
    } else {
        args.dataset.clone()
    };
    let m_asked = if defaults {
        vec!["georsclip-ret2".to_string()]
    } else {
        args.model.clone()
    };
    let datasets = select(&ds_asked, sources.datasets.keys().collect(), "dataset")?;
    let models = select(&m_asked, sources.models.keys().collect(), "model")?;
    let mut failed = Vec::new();
    for name in models {
        if let Err(e) = fetch_model(name, &sources.models[name], data) {
            eprintln!("error: {e:#}");
            failed.push(name.clone());
        }
    }
    for name in datasets {
        if let Err(e) = fetch_dataset(name, &sources.datasets[name], data) {
            eprintln!("error: {e:#}");
            failed.push(name.clone());
        }
    }
    if !failed.is_empty() {
        bail!(
            "not fetched: {}; what finished is kept, run the command again to resume",
            failed.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_sources_are_complete() {
        let s = Sources::load(None).unwrap();
        for (n, m) in &s.models {
            assert!(m.hf.is_some() != m.github_release.is_some(), "{n}");
            assert!(!m.licence.is_empty() && !m.dest.starts_with('/'), "{n}");
        }
        for (n, d) in &s.datasets {
            for f in ["train.json", "val.json", "test.json"] {
                assert!(d.annotations.files.contains_key(f), "{n}: {f}");
            }
        }
        // the annotation checksums are those of the files we ship
        let test = &s.datasets["rsitmd"].annotations.files["test.json"];
        let ours =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/annotations/rsitmd_test.json");
        assert_eq!(sha256_file(&ours).unwrap(), test.sha256.clone().unwrap());
    }

    #[test]
    fn paths_that_leave_the_root_are_refused() {
        let root = Path::new("/data/x");
        assert_eq!(
            safe_join(root, Path::new("a/./b.tif")).unwrap(),
            root.join("a/b.tif")
        );
        assert_eq!(
            safe_join(root, Path::new("a/../b.tif")).unwrap(),
            root.join("b.tif")
        );
        for bad in ["../evil", "a/../../evil", "/etc/passwd", "", "."] {
            assert!(safe_join(root, Path::new(bad)).is_err(), "{bad}");
        }
        assert!(link_stays_inside(Path::new("a/link"), Path::new("../b")));
        assert!(!link_stays_inside(
            Path::new("a/link"),
            Path::new("../../b")
        ));
        assert!(!link_stays_inside(Path::new("link"), Path::new("/etc")));
    }

    /// A zip in `dir` (named by its entry count, so each test archive has its own file).
    fn zip_with(dir: &Path, entries: &[(&str, &[u8])], link: Option<(&str, &str)>) -> PathBuf {
        use std::io::Write;
        let path = dir.join(format!(
            "in-{}.zip",
            entries.len() + link.is_some() as usize * 10
        ));
        let mut z = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        let opts = zip::write::SimpleFileOptions::default();
        for (name, bytes) in entries {
            z.start_file(*name, opts).unwrap();
            z.write_all(bytes).unwrap();
        }
        if let Some((name, target)) = link {
            z.add_symlink(name, target, opts).unwrap();
        }
        z.finish().unwrap();
        path
    }

    /// A tar whose entry names are written raw (tar::Builder refuses `..` itself).
    fn tar_with(dir: &Path, entries: &[(&str, tar::EntryType, &str)]) -> PathBuf {
        let path = dir.join(format!("in-{}.tar", entries.len()));
        let mut b = tar::Builder::new(std::fs::File::create(&path).unwrap());
        for (name, kind, link) in entries {
            let mut h = tar::Header::new_old();
            h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
            h.set_entry_type(*kind);
            h.set_mode(0o644);
            let data: &[u8] = if *kind == tar::EntryType::Regular {
                b"data"
            } else {
                b""
            };
            h.set_size(data.len() as u64);
            h.set_cksum();
            b.append(&h, data).unwrap();
        }
        b.into_inner().unwrap();
        path
    }

    #[test]
    fn archives_unpack_inside_and_refuse_to_escape() {
        let root = std::env::temp_dir().join(format!("harma-unpack-out-{}", std::process::id()));
        std::fs::remove_dir_all(&root).ok();
        // the archives are written into `root` too, so that one removal cleans up
        std::fs::create_dir_all(&root).unwrap();
        let good = zip_with(
            &root,
            &[("a/b.tif", b"xy"), ("c.txt", b"z")],
            Some(("a/l", "b.tif")),
        );
        let files = unpack(&good, &root.join("ok")).unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(std::fs::read(root.join("ok/a/b.tif")).unwrap(), b"xy");
        assert!(!root.join("ok/a/l").exists(), "links are not created");

        let evil = zip_with(&root, &[("fine.txt", b"1"), ("../evil.txt", b"2")], None);
        let err = format!("{:#}", unpack(&evil, &root.join("z")).unwrap_err());
        assert!(
            err.contains("../evil.txt") && err.contains("refused"),
            "{err}"
        );
        assert!(!root.join("evil.txt").exists());
        let link = zip_with(&root, &[("x", b"1")], Some(("l", "../../etc")));
        let err = format!("{:#}", unpack(&link, &root.join("zl")).unwrap_err());
        assert!(err.contains("points outside"), "{err}");

        let r = tar::EntryType::Regular;
        let t = tar_with(
            &root,
            &[
                ("d/f.txt", r, ""),
                ("d/g", tar::EntryType::Symlink, "f.txt"),
            ],
        );
        assert_eq!(unpack(&t, &root.join("t")).unwrap().len(), 1);
        for (name, kind, link) in [
            ("../up.txt", r, ""),
            ("/abs.txt", r, ""),
            ("s", tar::EntryType::Symlink, "/etc/passwd"),
            ("d/s", tar::EntryType::Symlink, "../../out"),
            ("h", tar::EntryType::Link, "../out"),
        ] {
            let t = tar_with(&root, &[("ok.txt", r, ""), (name, kind, link)]);
            let err = format!("{:#}", unpack(&t, &root.join("te")).unwrap_err());
            assert!(err.contains("refused"), "{name}: {err}");
        }
        assert!(!root.join("up.txt").exists() && !Path::new("/abs.txt").exists());
        let err = unpack(Path::new("x.rar"), &root.join("r"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a .zip"), "{err}");
        std::fs::remove_dir_all(&root).ok();
    }
}
