//! Downloads: one resumable, verified transfer for every source (GitHub raw files, release
//! assets, Hugging Face files).
//!
//! A file is written to `NAME.part` and renamed to `NAME` only once its size and every
//! checksum known for it agree. A run that stops resumes the `.part`; a `.part` that already
//! holds the whole file (a run killed between the last write and the rename, or a server that
//! announced more bytes than it sent) is checked and then renamed or deleted, never asked for
//! again (which servers answer with HTTP 416 forever); a short body is never taken as
//! complete; a server that sends more than it announced is cut off.
//!
//! Hugging Face files keep hf-hub's cache (`HF_HOME`, `HF_ENDPOINT`, its token file, the
//! `blobs/`, `snapshots/`, `refs/` layout), but the transfer is ours: hf-hub 0.4 neither
//! exposes the checksum the Hub announces nor compares the bytes with it, its retry appends
//! the whole file again to a `.part` it has not written to yet (the `.part` that grew to
//! twice the file size), and it puts the server's ETag and commit id into cache paths
//! unchecked. Here the Hub's ETag (for LFS files the file's sha256, else its git blob id) is
//! read from the `resolve` response (`X-Linked-Etag`, else `ETag`), checked to be a plain
//! token, compared with the pin in `sources.json`, and the download is verified against it.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::Digest;

use super::names::{is_token, name_parts};
use super::HfFile;

/// HTTP settings for one run.
pub struct Net {
    /// follows redirects (release assets and Hub files live on CDNs)
    agent: ureq::Agent,
    /// follows none: the Hub's `resolve` answer carries the file's metadata
    probe: ureq::Agent,
    /// transfers that break off are resumed this many times within the run
    retries: usize,
    /// take a file that nothing can check (no size, no digest known) instead of refusing it
    pub allow_unverified: bool,
    /// GitHub's raw-file host (no trailing `/`)
    pub github_raw: String,
    /// GitHub's API host
    pub github_api: String,
    /// the Hugging Face token (`HF_TOKEN`), else the one in hf-hub's token file
    pub hf_token: Option<String>,
}

impl Net {
    /// `timeout`: how long a connection may stay silent before it counts as broken.
    pub fn new(timeout: Duration) -> Self {
        let build = |redirects| {
            ureq::AgentBuilder::new()
                .try_proxy_from_env(true)
                .timeout_connect(timeout)
                .timeout_read(timeout)
                .timeout_write(timeout)
                .redirects(redirects)
                .user_agent(concat!("harma-rs-xtask/", env!("CARGO_PKG_VERSION")))
                .build()
        };
        Self {
            agent: build(5),
            probe: build(0),
            retries: 3,
            allow_unverified: false,
            github_raw: "https://raw.githubusercontent.com".into(),
            github_api: "https://api.github.com".into(),
            hf_token: None,
        }
    }
}

impl Net {
    /// The hosts and token the environment names, read through `var`: `HARMA_GITHUB_RAW`,
    /// `HARMA_GITHUB_API` (mirrors, tests) and `HF_TOKEN` (as huggingface_hub reads it).
    pub fn with_env(self, var: &dyn Fn(&str) -> Option<String>) -> Self {
        let host = |k: &str, d: String| var(k).map_or(d, |v| v.trim_end_matches('/').to_string());
        Self {
            github_raw: host("HARMA_GITHUB_RAW", self.github_raw.clone()),
            github_api: host("HARMA_GITHUB_API", self.github_api.clone()),
            hf_token: var("HF_TOKEN").filter(|t| !t.is_empty()),
            ..self
        }
    }
}

impl Default for Net {
    fn default() -> Self {
        Self::new(Duration::from_secs(60))
    }
}

/// What is known about a file before it is downloaded; everything given is checked.
#[derive(Debug, Clone, Default)]
pub struct Expect {
    pub size: Option<u64>,
    pub sha256: Option<String>,
    /// git's blob id: sha1 of `blob <len>\0` and the bytes
    pub git_sha1: Option<String>,
    /// refuse a file larger than this (for files whose size is not known beforehand)
    pub max_size: Option<u64>,
}

impl Expect {
    fn has_hash(&self) -> bool {
        self.sha256.is_some() || self.git_sha1.is_some()
    }

    /// Say what will be checked of `what` (`name` in the log), before it is downloaded: a
    /// checksum, else its size only (said so), else nothing, which is refused unless
    /// `net.allow_unverified` (and then said so).
    pub fn announce(&self, net: &Net, name: &str, what: &str) -> Result<()> {
        match (self.has_hash(), self.size) {
            (true, _) => {}
            (false, Some(n)) => {
                println!("{name}: {what}: no checksum is known; checked by size only ({n} bytes)")
            }
            (false, None) if net.allow_unverified => println!(
                "{name}: {what}: NOT checked: neither a size nor a checksum is known \
                 (--allow-unverified)"
            ),
            (false, None) => bail!(
                "{name}: {what}: neither a size nor a checksum is known, so nothing could tell \
                 a truncated or altered download from the real one; refused (pin a sha256 in \
                 the sources file, or rerun with --allow-unverified to take it unchecked)"
            ),
        }
        Ok(())
    }
}

pub(crate) fn bytes_bar(len: u64, what: &str) -> ProgressBar {
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

/// Hex sha256 and (if asked) git blob id of a file, in one read.
fn digests(path: &Path, git: bool) -> Result<(String, Option<String>)> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let len = f.metadata()?.len();
    let mut sha256 = sha2::Sha256::new();
    let mut sha1 = git.then(|| {
        let mut h = sha1::Sha1::new();
        h.update(format!("blob {len}\0").as_bytes());
        h
    });
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        sha256.update(&buf[..n]);
        if let Some(h) = &mut sha1 {
            h.update(&buf[..n]);
        }
    }
    Ok((
        format!("{:x}", sha256.finalize()),
        sha1.map(|h| format!("{:x}", h.finalize())),
    ))
}

/// Check a file against everything known about it; the error names `what` and says which
/// check failed.
pub fn verify(path: &Path, expect: &Expect, what: &str) -> Result<()> {
    let len = std::fs::metadata(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .len();
    if let Some(s) = expect.size {
        if len != s {
            bail!("{what}: {len} bytes, expected {s}");
        }
    }
    if let Some(m) = expect.max_size {
        if len > m {
            bail!("{what}: {len} bytes, more than the {m} allowed");
        }
    }
    if !expect.has_hash() {
        return Ok(());
    }
    let (sha256, git) = digests(path, expect.git_sha1.is_some())?;
    if let Some(want) = &expect.sha256 {
        if !sha256.eq_ignore_ascii_case(want) {
            bail!("{what}: sha256 {sha256}, expected {want} (a changed or corrupt file)");
        }
    }
    if let (Some(want), Some(got)) = (&expect.git_sha1, git) {
        if !got.eq_ignore_ascii_case(want) {
            bail!("{what}: git blob id {got}, expected {want} (a changed or corrupt file)");
        }
    }
    Ok(())
}

fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    dest.with_file_name(name)
}

fn file_len(p: &Path) -> Option<u64> {
    std::fs::metadata(p)
        .ok()
        .filter(|m| m.is_file())
        .map(|m| m.len())
}

/// A `.part` that should hold the whole file: renamed into place if it does (`Ok(None)`),
/// deleted if it does not (`Ok(Some(why))`).
fn settle(part: &Path, dest: &Path, expect: &Expect, what: &str) -> Result<Option<String>> {
    match verify(part, expect, what) {
        Ok(()) => {
            std::fs::rename(part, dest)
                .with_context(|| format!("cannot move {} into place", part.display()))?;
            Ok(None)
        }
        Err(e) => {
            std::fs::remove_file(part)
                .with_context(|| format!("cannot remove {}", part.display()))?;
            Ok(Some(format!("{e:#}")))
        }
    }
}

/// `Content-Range: bytes A-B/TOTAL` (or `bytes */TOTAL`) as (A, TOTAL).
fn content_range(r: &ureq::Response) -> (Option<u64>, Option<u64>) {
    let Some(v) = r.header("Content-Range") else {
        return (None, None);
    };
    let v = v.trim().strip_prefix("bytes").unwrap_or(v).trim();
    let (range, total) = v.split_once('/').unwrap_or((v, ""));
    let start = range
        .split_once('-')
        .and_then(|(a, _)| a.trim().parse().ok());
    (start, total.trim().parse().ok())
}

fn content_length(r: &ureq::Response) -> Option<u64> {
    r.header("Content-Length")
        .and_then(|l| l.trim().parse().ok())
}

/// One download's state between attempts.
struct Transfer<'a> {
    net: &'a Net,
    url: &'a str,
    part: PathBuf,
    dest: &'a Path,
    expect: &'a Expect,
    what: &'a str,
    /// transfers that broke off (resumed)
    breaks: usize,
    /// answers that forced a fresh start
    restarts: usize,
}

/// What one attempt ended in.
enum Attempt {
    Done,
    /// ask again (resuming the `.part`, or afresh if it was removed)
    Again,
}

impl Transfer<'_> {
    /// Another try after a broken transfer, with a growing pause, while any are left.
    fn retry_break(&mut self) -> bool {
        self.breaks += 1;
        if self.breaks <= self.net.retries {
            std::thread::sleep(Duration::from_millis(200 * self.breaks as u64));
            true
        } else {
            false
        }
    }

    /// A fresh start after an answer that cannot be resumed: one is allowed per download.
    fn restart(&mut self, refusal: impl FnOnce() -> String) -> Result<()> {
        self.restarts += 1;
        if self.restarts > 1 {
            bail!("{}", refusal());
        }
        Ok(())
    }

    /// HTTP 416 to a range request: nothing after the bytes the `.part` holds, so it is the
    /// whole file or longer than it.
    fn past_the_end(&mut self, r: &ureq::Response) -> Result<Attempt> {
        let (_, total) = content_range(r);
        let exp = Expect {
            size: self.expect.size.or(total),
            ..self.expect.clone()
        };
        let why = if exp.size.is_some() || exp.has_hash() {
            match settle(&self.part, self.dest, &exp, self.what)? {
                None => return Ok(Attempt::Done),
                Some(why) => why,
            }
        } else {
            std::fs::remove_file(&self.part).ok();
            "the server gives no size for it".to_string()
        };
        let url = self.url;
        self.restart(|| format!("{url}: the server refuses to send it ({why})"))?;
        println!("{why}: the partial download was removed, downloading afresh");
        Ok(Attempt::Again)
    }

    /// The size to expect and the most bytes to accept, from what is known and what the server
    /// announces (`total`). The known size wins: a server that announces less is refused, one
    /// that announces more is cut off at the known size.
    fn limits(&self, total: Option<u64>) -> Result<(Option<u64>, u64)> {
        let (what, expect) = (self.what, self.expect);
        if let (Some(t), Some(s)) = (total, expect.size) {
            if t < s {
                bail!(
                    "{what}: the server announces {t} bytes, expected {s}: the file changed at \
                     the source, or the server is wrong"
                );
            }
        }
        if let (Some(t), Some(m)) = (total, expect.max_size) {
            if t > m {
                bail!("{what}: the server announces {t} bytes, more than the {m} allowed: refused");
            }
        }
        let size = expect.size.or(total);
        let Some(limit) = size.or(expect.max_size) else {
            bail!(
                "{}: the server announces no size for {what} and none is known: refused (a \
                 download without an end could fill the disk)",
                self.url
            );
        };
        Ok((size, limit))
    }

    /// Append the body to the `.part` from byte `start`, refusing more than `limit` bytes in
    /// all; the bytes it then holds, and the error that broke the transfer off, if one did.
    fn receive(
        &self,
        resp: ureq::Response,
        start: u64,
        size: Option<u64>,
        limit: u64,
    ) -> Result<(u64, Option<std::io::Error>)> {
        let part = &self.part;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(start > 0)
            .truncate(start == 0)
            .open(part)
            .with_context(|| format!("cannot write {}", part.display()))?;
        let pb = bytes_bar(size.unwrap_or(0), self.what);
        pb.set_position(start);
        let mut reader = resp.into_reader();
        let mut buf = vec![0u8; 1 << 16];
        let mut got = start;
        let broke = loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break None,
                Ok(n) => n,
                Err(e) => break Some(e),
            };
            if got + n as u64 > limit {
                pb.abandon();
                drop(file);
                std::fs::remove_file(part).ok();
                let known = if size.is_some() {
                    "expected"
                } else {
                    "allowed"
                };
                bail!(
                    "{}: the server sent more than the {limit} bytes {known}: refused",
                    self.what
                );
            }
            file.write_all(&buf[..n])
                .with_context(|| format!("cannot write {}", part.display()))?;
            got += n as u64;
            pb.set_position(got);
        };
        file.sync_all()
            .with_context(|| format!("cannot write {}", part.display()))?;
        pb.finish_and_clear();
        Ok((got, broke))
    }

    /// One request and its answer, written to the `.part`.
    fn attempt(&mut self, token: Option<&str>) -> Result<Attempt> {
        let url = self.url;
        let have = file_len(&self.part).unwrap_or(0);
        let mut req = self.net.agent.get(url).set("Accept-Encoding", "identity");
        if let Some(t) = token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        if have > 0 {
            req = req.set("Range", &format!("bytes={have}-"));
        }
        let resp = match req.call() {
            Ok(r) => r,
            Err(ureq::Error::Status(416, r)) if have > 0 => return self.past_the_end(&r),
            Err(ureq::Error::Status(code, _)) => bail!(
                "cannot download {url}: the server answered HTTP {code}{}",
                match code {
                    401 | 403 => " (a gated or private file: set HF_TOKEN, or check the address)",
                    404 => " (moved or renamed at the source? edit crates/harma-fetch/sources.json or pass --sources)",
                    _ => "",
                }
            ),
            Err(e) => {
                if self.retry_break() {
                    return Ok(Attempt::Again);
                }
                bail!(
                    "cannot download {url}: {e}. Check the network, then run `cargo xtask \
                     fetch-data` again: finished files are kept and this one resumes"
                );
            }
        };
        let (start, total) = if resp.status() == 206 {
            match content_range(&resp) {
                (Some(a), total) if a == have => (have, total),
                _ => {
                    // not the range asked for: start again from the first byte
                    std::fs::remove_file(&self.part).ok();
                    self.restart(|| {
                        format!("{url}: the server does not send the byte range asked for")
                    })?;
                    return Ok(Attempt::Again);
                }
            }
        } else {
            // a whole body (a server that ignores ranges answers so too)
            (0, content_length(&resp))
        };
        let (size, limit) = self.limits(total)?;
        let (got, broke) = self.receive(resp, start, size, limit)?;
        if broke.is_some() || size.is_some_and(|s| got < s) {
            if self.retry_break() {
                return Ok(Attempt::Again);
            }
            let why = broke.map_or_else(
                || format!("it ended at {got} of {} bytes", size.unwrap_or(0)),
                |e| e.to_string(),
            );
            bail!(
                "the download of {url} broke off ({why}); run `cargo xtask fetch-data` again to \
                 resume it"
            );
        }
        if size.is_none() && !self.expect.has_hash() {
            std::fs::remove_file(&self.part).ok();
            bail!(
                "{url}: the server announced no size and no checksum is known, so a cut \
                 download cannot be told from a whole one: refused"
            );
        }
        let exp = Expect {
            size,
            ..self.expect.clone()
        };
        match settle(&self.part, self.dest, &exp, self.what)? {
            None => Ok(Attempt::Done),
            Some(why) => {
                bail!("{why}; the download was removed, run again to download it afresh")
            }
        }
    }
}

/// Download `url` to `dest` (see the module doc); an existing `dest.part` is resumed.
/// `token` is sent as a bearer token (Hugging Face).
/// `what` names the file in messages.
pub fn download(
    net: &Net,
    url: &str,
    dest: &Path,
    expect: &Expect,
    token: Option<&str>,
    what: &str,
) -> Result<()> {
    let dir = dest.parent().context("destination has no folder")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let part = part_path(dest);
    if let (Some(have), Some(size)) = (file_len(&part), expect.size) {
        if have >= size {
            match settle(&part, dest, expect, what)? {
                None => return Ok(()),
                Some(why) => {
                    println!("{why}: the partial download was removed, downloading afresh")
                }
            }
        }
    }
    let mut t = Transfer {
        net,
        url,
        part,
        dest,
        expect,
        what,
        breaks: 0,
        restarts: 0,
    };
    while let Attempt::Again = t.attempt(token)? {}
    Ok(())
}

/// What the Hub says about a file: its size and ETag (hf-hub's cache names the blob by it),
/// and the commit its `main` points at.
struct HfMeta {
    size: Option<u64>,
    etag: String,
    commit: Option<String>,
}

/// The Hub could not be reached at all (as opposed to answering something unusable).
#[derive(Debug)]
struct Unreachable(String);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unreachable {}

fn origin(url: &str) -> &str {
    let after = url.find("://").map_or(0, |i| i + 3);
    url[after..].find('/').map_or(url, |i| &url[..after + i])
}

/// The Hub's answer to a one-byte request of `url`, without following a redirect to the
/// CDN (LFS files answer with a redirect carrying `X-Linked-Etag` and `X-Linked-Size`).
fn hf_meta(net: &Net, url: &str, token: Option<&str>) -> Result<HfMeta> {
    let mut url = url.to_string();
    let (mut tries, mut redirects) = (0usize, 0usize);
    while redirects < 5 {
        let mut req = net
            .probe
            .get(&url)
            .set("Range", "bytes=0-0")
            .set("Accept-Encoding", "identity");
        if let Some(t) = token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let r = match req.call() {
            Ok(r) => r,
            Err(ureq::Error::Status(code, _)) => bail!(
                "{url}: the Hub answered HTTP {code}{}",
                match code {
                    401 | 403 => " (a gated or private file: set HF_TOKEN)",
                    404 => " (no such repository or file)",
                    _ => "",
                }
            ),
            Err(e) => {
                tries += 1;
                if tries <= net.retries {
                    std::thread::sleep(Duration::from_millis(200 * tries as u64));
                    continue;
                }
                return Err(Unreachable(e.to_string()).into());
            }
        };
        let location = r.header("Location").map(str::to_string);
        if (300..400).contains(&r.status()) {
            let Some(loc) = &location else {
                bail!("{url}: a redirect without a Location")
            };
            if loc.starts_with('/') {
                // a renamed repository: follow within the Hub
                url = format!("{}{loc}", origin(&url));
                redirects += 1;
                continue;
            }
        }
        let raw = r
            .header("X-Linked-Etag")
            .or_else(|| r.header("ETag"))
            .context("the Hub sent no ETag")?;
        let etag = raw
            .trim()
            .trim_start_matches("W/")
            .trim_matches('"')
            .to_string();
        if !is_token(&etag) {
            bail!(
                "the Hub sent the ETag `{}`, which is not a plain token: refused",
                raw.escape_debug()
            );
        }
        let commit = r.header("X-Repo-Commit").map(str::to_string);
        if let Some(c) = &commit {
            if !is_token(c) {
                bail!(
                    "the Hub sent the commit `{}`, which is not a plain token: refused",
                    c.escape_debug()
                );
            }
        }
        let mut size = r
            .header("X-Linked-Size")
            .and_then(|s| s.trim().parse().ok())
            .or(content_range(&r).1);
        if size.is_none() {
            if let Some(loc) = location {
                let mut req = net.agent.get(&loc).set("Range", "bytes=0-0");
                req = req.set("Accept-Encoding", "identity");
                let r = req.call().map_err(|e| Unreachable(e.to_string()))?;
                size = content_range(&r).1;
            }
        }
        return Ok(HfMeta { size, etag, commit });
    }
    bail!("{url}: too many redirects")
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.chars().all(|c| c.is_ascii_hexdigit())
}

/// The checks for a Hub file: the pins of `sources.json`, else what the Hub announces; a pin
/// the Hub contradicts is an error (the file changed upstream, or a mirror serves another).
fn hf_expect(f: &HfFile, meta: Option<&HfMeta>) -> Result<Expect> {
    let hub_sha256 = meta.map(|m| m.etag.as_str()).filter(|e| is_hex(e, 64));
    let hub_git = meta.map(|m| m.etag.as_str()).filter(|e| is_hex(e, 40));
    if let (Some(pin), Some(hub)) = (&f.sha256, hub_sha256) {
        if !pin.eq_ignore_ascii_case(hub) {
            bail!(
                "{}: sources.json pins sha256 {pin}, the Hub announces {hub}: the file changed \
                 upstream (or the mirror serves another one). Check it, then update the pin",
                f.file
            );
        }
    }
    let hub_size = meta.and_then(|m| m.size);
    if let (Some(pin), Some(hub)) = (f.size, hub_size) {
        if pin != hub {
            bail!(
                "{}: sources.json pins {pin} bytes, the Hub announces {hub}: the file changed \
                 upstream (or the mirror serves another one). Check it, then update the pin",
                f.file
            );
        }
    }
    Ok(Expect {
        size: f.size.or(hub_size),
        sha256: f.sha256.clone().or(hub_sha256.map(str::to_string)),
        git_sha1: hub_git.map(str::to_string),
        max_size: None,
    })
}

/// Point hf-hub's `snapshots/<commit>/<file>` at the blob and `refs/main` at the commit, as
/// hf-hub and huggingface_hub do, so that later runs (and Python) find the file offline.
fn link_snapshot(repo_dir: &Path, commit: &str, file: &[&str], etag: &str) -> Result<()> {
    let snapshot = repo_dir.join("snapshots").join(commit);
    let pointer = file.iter().fold(snapshot, |p, c| p.join(c));
    std::fs::create_dir_all(pointer.parent().unwrap_or(repo_dir))?;
    std::fs::remove_file(&pointer).ok();
    #[cfg(unix)]
    {
        let up = "../".repeat(file.len() + 1);
        std::os::unix::fs::symlink(format!("{up}blobs/{etag}"), &pointer)?;
    }
    #[cfg(not(unix))]
    std::fs::hard_link(repo_dir.join("blobs").join(etag), &pointer)?;
    let refs = repo_dir.join("refs");
    std::fs::create_dir_all(&refs)?;
    let tmp = refs.join(".main.fetch-tmp");
    std::fs::write(&tmp, commit)?;
    std::fs::rename(&tmp, refs.join("main"))?;
    Ok(())
}

/// A Hugging Face file in hf-hub's cache (downloaded, resumed or found there), verified;
/// returns its path.
pub fn fetch_hf(net: &Net, f: &HfFile) -> Result<PathBuf> {
    use hf_hub::{api::sync::ApiBuilder, Cache, Repo, RepoType};
    let kind = match f.kind.as_str() {
        "model" => RepoType::Model,
        "dataset" => RepoType::Dataset,
        other => bail!("{}: unknown Hugging Face repo type `{other}`", f.repo),
    };
    let file = name_parts(&f.file)
        .map_err(|why| anyhow::anyhow!("sources: Hub file `{}` {why}: refused", f.file))?;
    let repo_parts = name_parts(&f.repo)
        .ok()
        .filter(|p| p.len() == 2 && p.join("/") == f.repo);
    if repo_parts.is_none() {
        bail!(
            "sources: `{}` is not a Hub repository name (owner/name)",
            f.repo
        );
    }
    let cache = Cache::from_env();
    let repo = Repo::with_revision(f.repo.clone(), kind, "main".into());
    let api = ApiBuilder::from_env()
        .build()
        .context("cannot set up the Hugging Face client")?;
    let url = api.repo(repo.clone()).url(&file.join("/"));
    // hf-hub 0.4 reads the token file only; honour HF_TOKEN as huggingface_hub does
    let token = net.hf_token.clone().or_else(|| cache.token());
    let meta = match hf_meta(net, &url, token.as_deref()) {
        Ok(m) => m,
        Err(e) if !e.is::<Unreachable>() => return Err(e.context(f.file.clone())),
        Err(e) => {
            if let Some(p) = cache.repo(repo.clone()).get(&f.file) {
                verify(&p, &hf_expect(f, None)?, &f.file)?;
                println!(
                    "{}: the Hub cannot be reached ({e:#}); using the copy in the Hugging Face cache",
                    f.file
                );
                return Ok(p);
            }
            bail!(
                "cannot reach the Hub ({e}). Check the network (or HF_ENDPOINT), then run `cargo \
                 xtask fetch-data` again: partial downloads resume"
            );
        }
    };
    let expect = hf_expect(f, Some(&meta))?;
    expect.announce(net, &f.repo, &f.file)?;
    let repo_dir = cache.path().join(repo.folder_name());
    let blob = repo_dir.join("blobs").join(&meta.etag);
    let mut cached = false;
    if blob.is_file() {
        match verify(&blob, &expect, &f.file) {
            Ok(()) => cached = true,
            Err(e) => {
                println!(
                    "{}: the cached copy is unusable ({e:#}); downloading again",
                    f.file
                );
                std::fs::remove_file(&blob)
                    .with_context(|| format!("cannot remove {}", blob.display()))?;
            }
        }
    }
    if !cached {
        download(net, &url, &blob, &expect, token.as_deref(), &f.file)?;
    }
    if let Some(c) = &meta.commit {
        if let Err(e) = link_snapshot(&repo_dir, c, &file, &meta.etag) {
            println!(
                "{}: could not record it in the Hugging Face cache ({e})",
                f.file
            );
        }
    }
    Ok(blob)
}

/// A GitHub release asset: its name, download address, and what the API says about it.
pub struct Asset {
    pub name: String,
    pub url: String,
    pub expect: Expect,
}

/// The assets of a release whose names start with `prefix`, from the GitHub API.
pub fn release_assets(net: &Net, api_url: &str, prefix: &str) -> Result<Vec<Asset>> {
    let resp = net
        .agent
        .get(api_url)
        .set("Accept", "application/vnd.github+json")
        .call()
        .map_err(|e| anyhow::anyhow!("cannot list the release {api_url}: {e}"))?;
    // a listing is a few kB: read at most 16 MiB of it
    let listing: serde_json::Value = serde_json::from_reader(resp.into_reader().take(16 << 20))
        .with_context(|| format!("{api_url}: not a release listing"))?;
    let mut out = Vec::new();
    for a in listing["assets"].as_array().into_iter().flatten() {
        let (Some(name), Some(url)) = (a["name"].as_str(), a["browser_download_url"].as_str())
        else {
            continue;
        };
        if !name.starts_with(prefix) {
            continue;
        }
        // GitHub lists `digest: "sha256:<hex>"` for assets uploaded since mid-2025
        let sha256 = a["digest"]
            .as_str()
            .and_then(|d| d.strip_prefix("sha256:"))
            .filter(|h| is_hex(h, 64))
            .map(str::to_string);
        out.push(Asset {
            name: name.to_string(),
            url: url.to_string(),
            expect: Expect {
                size: a["size"].as_u64(),
                sha256,
                ..Expect::default()
            },
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_blob_ids_match_git() {
        let dir = std::env::temp_dir().join(format!("harma-blob-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f");
        // `printf 'hello\n' | git hash-object --stdin`, and the empty blob
        std::fs::write(&p, b"hello\n").unwrap();
        let (_, git) = digests(&p, true).unwrap();
        assert_eq!(git.unwrap(), "ce013625030ba8dba906f756967f9e9ca394464a");
        std::fs::write(&p, b"").unwrap();
        let (sha, git) = digests(&p, true).unwrap();
        assert_eq!(git.unwrap(), "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391");
        assert_eq!(
            sha,
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let wrong = Expect {
            git_sha1: Some("0".repeat(40)),
            ..Expect::default()
        };
        assert!(verify(&p, &wrong, "f")
            .unwrap_err()
            .to_string()
            .contains("git blob id"));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn origins_of_urls() {
        assert_eq!(
            origin("https://huggingface.co/a/b"),
            "https://huggingface.co"
        );
        assert_eq!(origin("http://127.0.0.1:9/x"), "http://127.0.0.1:9");
        assert_eq!(origin("http://h"), "http://h");
    }
}
