//! Archives (.zip, .tar, .tar.gz): listing members, and unpacking chosen members to chosen
//! places within limits.
//!
//! Member names are read through `zip`'s `enclosed_name` and checked with the same rules as
//! every other name (`names::name_parts`); a name that would leave the folder refuses the
//! whole archive, naming the member. Tar members are written by `tar`'s `unpack_in`. Only
//! regular files are unpacked (links are never created). Each member is written to a temp
//! folder and renamed into place, after its declared size and its actual size are checked
//! against a per-member and a total limit, so a zip bomb stops at the limit with an error
//! naming the member.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::names::name_parts;

/// Size limits while unpacking: a member's declared and actual size, and the total.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_member: u64,
    pub max_total: u64,
}

/// Per member: 64 MiB (an RSITMD image is 197 kB, an RSICD image about 30 kB).
pub const DEFAULT_MAX_MEMBER: &str = "64MiB";
/// In total: 16 GiB (RSITMD's images are about 1 GB, RSICD's about 0.5 GB).
pub const DEFAULT_MAX_TOTAL: &str = "16GiB";

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_member: parse_bytes(DEFAULT_MAX_MEMBER).unwrap(),
            max_total: parse_bytes(DEFAULT_MAX_TOTAL).unwrap(),
        }
    }
}

/// The most members an archive may list: RSICD's zip holds about 11,000, RSITMD's about 4,800.
/// A tar of millions of empty members compresses to a few MB; listing them would take time and
/// memory without end.
pub const MAX_MEMBERS: usize = 1_000_000;

/// `123`, `64K`, `64M`, `16G`, `1T` (powers of 1024; `KiB`, `MB`... accepted too).
pub fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let n: u64 = t[..digits]
        .parse()
        .map_err(|_| format!("`{s}` is not a size (examples: 500M, 16G, 1048576)"))?;
    let unit = t[digits..].trim().to_ascii_uppercase();
    let shift = match unit.trim_end_matches("IB").trim_end_matches('B') {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => return Err(format!("`{s}`: unknown unit (use K, M, G or T)")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("`{s}` is too large"))
}

/// A size for messages: `64 MiB`, `1.5 GiB`, `300 bytes`.
pub fn human(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    let text = format!("{v:.1}");
    format!("{} {}", text.trim_end_matches(".0"), UNITS[u])
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Format {
    Zip,
    Tar,
    TarGz,
}

fn format_of(name: &str) -> Result<Format> {
    let n = name.to_ascii_lowercase();
    Ok(if n.ends_with(".zip") {
        Format::Zip
    } else if n.ends_with(".tar") {
        Format::Tar
    } else if n.ends_with(".tar.gz") || n.ends_with(".tgz") {
        Format::TarGz
    } else {
        bail!("{name}: not a .zip, .tar, .tar.gz or .tgz archive")
    })
}

#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    File,
    Dir,
    /// a symbolic link, with its target
    Symlink(String),
    /// a tar hard link, with the member it names
    HardLink(String),
    Other,
}

/// One member of an archive.
#[derive(Debug, Clone)]
pub struct Member {
    /// its position in the archive
    pub index: usize,
    /// its name as written in the archive
    pub raw: String,
    /// its name's parts, checked (see `names::name_parts`)
    pub parts: Vec<String>,
    pub kind: Kind,
    /// the size its header declares
    pub size: u64,
}

/// An opened archive: its path and the name that tells its format (hf-hub's cache names
/// files by hash, so the format comes from the source's file name).
pub struct Archive<'a> {
    pub path: &'a Path,
    /// the name errors call it by
    label: String,
    format: Format,
}

impl<'a> Archive<'a> {
    /// `name`: what the archive is called in messages; its ending tells the format.
    pub fn new(path: &'a Path, name: &str) -> Result<Self> {
        Ok(Self {
            path,
            label: name.to_string(),
            format: format_of(name)?,
        })
    }

    fn name(&self) -> &str {
        &self.label
    }

    fn zip(&self) -> Result<zip::ZipArchive<std::fs::File>> {
        let f = std::fs::File::open(self.path)
            .with_context(|| format!("cannot read {}", self.path.display()))?;
        zip::ZipArchive::new(f).with_context(|| format!("{}: not a valid zip", self.name()))
    }

    fn tar(&self) -> Result<tar::Archive<Box<dyn Read>>> {
        let f = std::fs::File::open(self.path)
            .with_context(|| format!("cannot read {}", self.path.display()))?;
        let r: Box<dyn Read> = if self.format == Format::Tar {
            Box::new(f)
        } else {
            Box::new(flate2::read::GzDecoder::new(f))
        };
        Ok(tar::Archive::new(r))
    }

    fn checked_parts(&self, raw: &str) -> Result<Vec<String>> {
        match name_parts(raw) {
            Ok(p) => Ok(p.into_iter().map(str::to_string).collect()),
            Err(why) => bail!(
                "{}: member `{}` {why}: refused (the archive is not trusted; nothing was unpacked \
                 from it)",
                self.name(),
                raw.escape_debug()
            ),
        }
    }

    /// Every member, its name checked; an unsafe name is an error naming it, and so is an
    /// archive of more than [`MAX_MEMBERS`] members.
    pub fn members(&self) -> Result<Vec<Member>> {
        self.members_up_to(MAX_MEMBERS)
    }

    fn too_many(&self, max: usize) -> anyhow::Error {
        anyhow::anyhow!(
            "{}: more than {max} members: refused (the datasets' archives hold a few thousand; \
             nothing was unpacked from it)",
            self.name()
        )
    }

    /// [`Archive::members`] with the member count capped at `max`.
    fn members_up_to(&self, max: usize) -> Result<Vec<Member>> {
        let mut out = Vec::new();
        match self.format {
            Format::Zip => {
                let mut z = self.zip()?;
                if z.len() > max {
                    return Err(self.too_many(max));
                }
                for i in 0..z.len() {
                    let (raw, enclosed, is_dir, is_link, size) = {
                        let e = z
                            .by_index_raw(i)
                            .with_context(|| format!("{}: member {i} unreadable", self.name()))?;
                        let enclosed = e.enclosed_name();
                        (
                            e.name().to_string(),
                            enclosed,
                            e.is_dir(),
                            e.is_symlink(),
                            e.size(),
                        )
                    };
                    let Some(enclosed) = enclosed else {
                        bail!(
                            "{}: member `{}` would land outside the folder it is unpacked into: \
                             refused (the archive is not trusted; nothing was unpacked from it)",
                            self.name(),
                            raw.escape_debug()
                        );
                    };
                    let (parts, kind) = if is_dir {
                        (Vec::new(), Kind::Dir)
                    } else {
                        let parts = self.checked_parts(enclosed.to_str().unwrap_or(&raw))?;
                        if is_link {
                            // the target is the member's content: read (a little of) it for links only
                            let mut t = String::new();
                            z.by_index(i)?
                                .take(4096)
                                .read_to_string(&mut t)
                                .with_context(|| format!("{}: link `{raw}`", self.name()))?;
                            (parts, Kind::Symlink(t))
                        } else {
                            (parts, Kind::File)
                        }
                    };
                    out.push(Member {
                        index: i,
                        raw,
                        parts,
                        size: if kind == Kind::File { size } else { 0 },
                        kind,
                    });
                }
            }
            Format::Tar | Format::TarGz => {
                let mut t = self.tar()?;
                let entries = t
                    .entries()
                    .with_context(|| format!("{}: not a valid tar", self.name()))?;
                for (i, e) in entries.enumerate() {
                    if i == max {
                        return Err(self.too_many(max));
                    }
                    let e = e.with_context(|| format!("{}: member {i} unreadable", self.name()))?;
                    let bytes = e.path_bytes();
                    let Ok(raw) = std::str::from_utf8(&bytes).map(str::to_string) else {
                        bail!(
                            "{}: member `{}` has a name that is not UTF-8: refused",
                            self.name(),
                            String::from_utf8_lossy(&bytes).escape_debug()
                        );
                    };
                    let link = || {
                        e.link_name_bytes()
                            .map(|b| String::from_utf8_lossy(&b).into_owned())
                            .unwrap_or_default()
                    };
                    use tar::EntryType as T;
                    let kind = match e.header().entry_type() {
                        T::Regular | T::Continuous => Kind::File,
                        T::Directory => Kind::Dir,
                        T::Symlink => Kind::Symlink(link()),
                        T::Link => Kind::HardLink(link()),
                        _ => Kind::Other,
                    };
                    let parts = if kind == Kind::Dir {
                        Vec::new()
                    } else {
                        self.checked_parts(&raw)?
                    };
                    out.push(Member {
                        index: i,
                        raw,
                        parts,
                        kind,
                        size: e.size(),
                    });
                }
            }
        }
        Ok(out)
    }

    /// Refuse the plan before unpacking anything: a member to unpack that is not a regular
    /// file, or that declares more than the limits allow (alone or with the others).
    fn check_declared(
        &self,
        members: &[Member],
        plan: &[(usize, Vec<PathBuf>)],
        limits: &Limits,
    ) -> Result<()> {
        let mut declared = 0u64;
        for (m, _) in plan {
            let m = &members[*m];
            let what = || format!("{}: member `{}`", self.name(), m.raw.escape_debug());
            match &m.kind {
                Kind::File => {}
                Kind::Symlink(_) | Kind::HardLink(_) => {
                    bail!("{} is a link, not a file: refused", what())
                }
                _ => bail!("{} is not a regular file: refused", what()),
            }
            if m.size > limits.max_member {
                bail!(
                    "{} declares {} ({} bytes), more than the {} allowed per file \
                     (--max-image-size): refused",
                    what(),
                    human(m.size),
                    m.size,
                    human(limits.max_member)
                );
            }
            declared = declared.saturating_add(m.size);
            if declared > limits.max_total {
                bail!(
                    "{}: the members to unpack declare more than the {} allowed in total \
                     (--max-unpacked-size; passed at member `{}`): refused",
                    self.name(),
                    human(limits.max_total),
                    m.raw.escape_debug()
                );
            }
        }
        Ok(())
    }

    /// Unpack `plan` (a member, and every place it goes) through the temp folder `tmp` (on
    /// the destinations' file system), within `limits`. Every planned member must be a
    /// regular file.
    pub fn extract(
        &self,
        members: &[Member],
        plan: &[(usize, Vec<PathBuf>)],
        tmp: &Path,
        limits: &Limits,
    ) -> Result<()> {
        self.check_declared(members, plan, limits)?;
        let mut order: Vec<&(usize, Vec<PathBuf>)> = plan.iter().collect();
        order.sort_by_key(|(m, _)| members[*m].index);
        let mut total = 0u64;
        let mut place = |m: &Member, written: &Path| -> Result<()> {
            let n = std::fs::metadata(written)?.len();
            if n != m.size {
                bail!(
                    "{}: member `{}` holds {n} bytes but declares {}: refused (a damaged or \
                     crafted archive)",
                    self.name(),
                    m.raw.escape_debug(),
                    m.size
                );
            }
            total += n;
            Ok(())
        };
        match self.format {
            Format::Zip => {
                let mut z = self.zip()?;
                for (k, (pos, dests)) in order.iter().enumerate() {
                    let m = &members[*pos];
                    let tmp_file = tmp.join(format!("m{k}"));
                    let mut e = z.by_index(m.index).with_context(|| {
                        format!("{}: member `{}`", self.name(), m.raw.escape_debug())
                    })?;
                    copy_limited(&mut e, &tmp_file, limits.max_member).map_err(|err| {
                        err.context(format!(
                            "{}: member `{}` (declares {})",
                            self.name(),
                            m.raw.escape_debug(),
                            human(m.size)
                        ))
                    })?;
                    place(m, &tmp_file)?;
                    move_into(&tmp_file, dests)?;
                }
            }
            Format::Tar | Format::TarGz => {
                let mut t = self.tar()?;
                let mut next = order.iter().enumerate().peekable();
                for (i, e) in t.entries()?.enumerate() {
                    let Some(&(k, (pos, dests))) = next.peek() else {
                        break;
                    };
                    let m = &members[*pos];
                    if m.index != i {
                        continue;
                    }
                    next.next();
                    let mut e = e?;
                    let sub = tmp.join(format!("m{k}"));
                    std::fs::create_dir_all(&sub)?;
                    let ctx = || format!("{}: member `{}`", self.name(), m.raw.escape_debug());
                    if !e.unpack_in(&sub).with_context(ctx)? {
                        bail!("{} would land outside its folder: refused", ctx());
                    }
                    let written = e
                        .path()?
                        .components()
                        .filter_map(|c| match c {
                            Component::Normal(p) => Some(p.to_owned()),
                            _ => None,
                        })
                        .fold(sub.clone(), |p, c| p.join(c));
                    if !written.is_file() {
                        bail!("{} was not unpacked as a file: refused", ctx());
                    }
                    place(m, &written)?;
                    move_into(&written, dests)?;
                }
            }
        }
        if total > limits.max_total {
            bail!(
                "{}: the members unpack to more than the {} allowed in total \
                 (--max-unpacked-size): refused",
                self.name(),
                human(limits.max_total)
            );
        }
        Ok(())
    }
}

/// Copy at most `max` bytes of `r` to a new file `out`; more is an error.
fn copy_limited(r: &mut impl Read, out: &Path, max: u64) -> Result<u64> {
    let mut f =
        std::fs::File::create(out).with_context(|| format!("cannot write {}", out.display()))?;
    let n = std::io::copy(&mut r.take(max.saturating_add(1)), &mut f)?;
    if n > max {
        drop(f);
        std::fs::remove_file(out).ok();
        bail!(
            "unpacks to more than the {} allowed per file (--max-image-size): refused (a zip \
             bomb, or a limit to raise)",
            human(max)
        );
    }
    Ok(n)
}

/// Put an unpacked file at each of `dests` (copies for all but the last, which takes it).
fn move_into(src: &Path, dests: &[PathBuf]) -> Result<()> {
    for (k, d) in dests.iter().enumerate() {
        if let Some(dir) = d.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let r = if k + 1 == dests.len() {
            std::fs::rename(src, d)
        } else {
            std::fs::copy(src, d).map(|_| ())
        };
        r.with_context(|| format!("cannot move an unpacked file to {}", d.display()))?;
    }
    Ok(())
}

/// A temp folder, removed when dropped (on success, error or panic); an earlier run's
/// leftover under the same name is removed first.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(path: PathBuf) -> Result<Self> {
        if path.exists() {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("cannot remove {}", path.display()))?;
        }
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Self(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

/// Whether a link at `entry` pointing to `target` stays under the archive root.
#[cfg(test)]
fn link_stays_inside(entry: &[String], target: &str) -> bool {
    if target.starts_with(['/', '\\']) {
        return false;
    }
    let base = entry[..entry.len().saturating_sub(1)].join("/");
    name_parts(&format!("{base}/{target}")).is_ok()
}

/// Which member holds each wanted image (`wanted`: the image's checked name parts): the
/// first member whose path ends with the image's path, else the only member with its file
/// name. Returns, per wanted image, the member's position in `members`.
pub fn match_members(members: &[Member], wanted: &[Vec<String>]) -> Vec<Option<usize>> {
    let mut by_name: std::collections::HashMap<&str, Vec<usize>> = Default::default();
    for (pos, m) in members.iter().enumerate() {
        if let (Some(last), false) = (m.parts.last(), m.kind == Kind::Dir) {
            by_name.entry(last.as_str()).or_default().push(pos);
        }
    }
    wanted
        .iter()
        .map(|w| {
            let cands = by_name.get(w.last()?.as_str())?;
            cands
                .iter()
                .copied()
                .find(|&c| members[c].parts.ends_with(w))
                .or((cands.len() == 1).then(|| cands[0]))
        })
        .collect()
}

/// Unpack every regular file of a .zip, .tar, .tar.gz or .tgz into `dest` within `limits`.
/// A member whose name would land outside `dest`, or a link pointing outside, refuses the
/// archive (an error naming it, nothing written); links that stay inside are skipped.
/// Returns the files written. `fetch-data` unpacks only the members the annotations name
/// ([`Archive::members`], [`match_members`], [`Archive::extract`]); the tests drive those
/// pieces through this.
#[cfg(test)]
pub fn unpack_with(archive: &Path, dest: &Path, limits: &Limits) -> Result<Vec<PathBuf>> {
    let name = archive.to_string_lossy();
    let a = Archive::new(archive, &name)?;
    let members = a.members()?;
    let mut plan = Vec::new();
    for (pos, m) in members.iter().enumerate() {
        let inside = match &m.kind {
            Kind::File => {
                plan.push((
                    pos,
                    vec![super::names::safe_join(
                        dest,
                        Path::new(&m.parts.join("/")),
                    )?],
                ));
                continue;
            }
            Kind::Symlink(t) => link_stays_inside(&m.parts, t),
            Kind::HardLink(t) => name_parts(t).is_ok(),
            Kind::Dir | Kind::Other => continue,
        };
        if !inside {
            bail!(
                "{}: link `{}` points outside the archive: refused",
                archive.display(),
                m.raw.escape_debug()
            );
        }
    }
    std::fs::create_dir_all(dest).with_context(|| format!("cannot create {}", dest.display()))?;
    let tmp = TempDir::new(dest.join(".unpack"))?;
    a.extract(&members, &plan, tmp.path(), limits)?;
    Ok(plan.into_iter().flat_map(|(_, d)| d).collect())
}

/// [`unpack_with`] with the default limits.
#[cfg(test)]
pub fn unpack(archive: &Path, dest: &Path) -> Result<Vec<PathBuf>> {
    unpack_with(archive, dest, &Limits::default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files_under;
    use std::io::Write;

    #[test]
    fn sizes_parse_and_print() {
        for (s, n) in [
            ("123", 123),
            ("64M", 64 << 20),
            ("64MiB", 64 << 20),
            ("16 GB", 16 << 30),
            ("2k", 2048),
            ("1T", 1 << 40),
        ] {
            assert_eq!(parse_bytes(s).unwrap(), n, "{s}");
        }
        for bad in ["", "M", "12X", "-1", "99999999999T"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
        assert_eq!(human(300), "300 bytes");
        assert_eq!(human(64 << 20), "64 MiB");
        assert_eq!(human(3 << 29), "1.5 GiB");
    }

    /// A zip in `dir` named `name`.
    fn zip_with(
        dir: &Path,
        name: &str,
        entries: &[(&str, &[u8])],
        link: Option<(&str, &str)>,
    ) -> PathBuf {
        let path = dir.join(name);
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
    fn tar_with(dir: &Path, name: &str, entries: &[(&str, tar::EntryType, &str)]) -> PathBuf {
        let path = dir.join(name);
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

    /// A fresh `root` for one test: archives are written into `root/in`, the output into
    /// `root/out` (after each case, `root/out` must hold only what that case unpacked).
    fn test_root(name: &str) -> (PathBuf, PathBuf, PathBuf) {
        let root = std::env::temp_dir().join(format!("harma-{name}-{}", std::process::id()));
        std::fs::remove_dir_all(&root).ok();
        let (inp, out) = (root.join("in"), root.join("out"));
        std::fs::create_dir_all(&inp).unwrap();
        (root, inp, out)
    }

    #[test]
    fn zip_members_unpack_inside_and_escapes_are_refused() {
        let (root, inp, out) = test_root("unpack-zip");
        let good = zip_with(
            &inp,
            "good.zip",
            &[("a/b.tif", b"xy"), ("c.txt", b"z")],
            Some(("a/l", "b.tif")),
        );
        let files = unpack(&good, &out.join("ok")).unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(std::fs::read(out.join("ok/a/b.tif")).unwrap(), b"xy");
        assert_eq!(
            files_under(&out),
            ["ok/a/b.tif", "ok/c.txt"],
            "links are not created"
        );

        for (i, (entries, link, want)) in [
            (
                vec![("fine.txt", b"1".as_slice()), ("../evil.txt", b"2")],
                None,
                "../evil.txt",
            ),
            (vec![("a/../../evil.txt", b"2")], None, "a/../../evil.txt"),
            (vec![("/abs.txt", b"2")], None, "/abs.txt"),
            (vec![("..\\evil.txt", b"2")], None, "..\\\\evil.txt"),
            (vec![("C:\\evil.txt", b"2")], None, "C:\\\\evil.txt"),
            (vec![("a\0b", b"2")], None, "a"),
            (
                vec![("x", b"1")],
                Some(("l", "../../etc")),
                "points outside",
            ),
            (
                vec![("x", b"1")],
                Some(("l", "/etc/passwd")),
                "points outside",
            ),
        ]
        .into_iter()
        .enumerate()
        {
            let z = zip_with(&inp, &format!("bad{i}.zip"), &entries, link);
            let err = format!("{:#}", unpack(&z, &out.join("z")).unwrap_err());
            assert!(err.contains(want) && err.contains("refused"), "{i}: {err}");
            assert_eq!(files_under(&out), ["ok/a/b.tif", "ok/c.txt"], "{i}");
        }

        std::fs::remove_dir_all(&root).ok();
    }

    #[test]
    fn tar_members_unpack_inside_and_escapes_are_refused() {
        let (root, inp, out) = test_root("unpack-tar");
        let r = tar::EntryType::Regular;
        let t = tar_with(
            &inp,
            "good.tar",
            &[
                ("d/f.txt", r, ""),
                ("d/g", tar::EntryType::Symlink, "f.txt"),
            ],
        );
        assert_eq!(unpack(&t, &out.join("t")).unwrap().len(), 1);
        assert!(out.join("t/d/f.txt").is_file() && !out.join("t/d/g").exists());
        for (i, (name, kind, link)) in [
            ("../up.txt", r, ""),
            ("/abs.txt", r, ""),
            ("a/../../up.txt", r, ""),
            ("..\\up.txt", r, ""),
            ("s", tar::EntryType::Symlink, "/etc/passwd"),
            ("d/s", tar::EntryType::Symlink, "../../out"),
            ("h", tar::EntryType::Link, "../out"),
        ]
        .into_iter()
        .enumerate()
        {
            let t = tar_with(
                &inp,
                &format!("bad{i}.tar"),
                &[("ok.txt", r, ""), (name, kind, link)],
            );
            let err = format!("{:#}", unpack(&t, &out.join("te")).unwrap_err());
            assert!(err.contains("refused"), "{name}: {err}");
            assert!(
                !out.join("te/ok.txt").exists(),
                "{name}: nothing is unpacked"
            );
        }
        assert!(!root.join("up.txt").exists() && !Path::new("/abs.txt").exists());
        let err = unpack(Path::new("x.rar"), &out.join("r"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a .zip"), "{err}");

        std::fs::remove_dir_all(&root).ok();
    }

    #[test]
    fn members_over_the_limits_are_refused_declared_or_actual() {
        let (root, inp, out) = test_root("unpack-limits");
        // limits: a member over the per-file limit, declared or actual, and over the total
        let zeros = vec![0u8; 1 << 20];
        let bomb = zip_with(&inp, "bomb.zip", &[("big.bin", &zeros)], None);
        assert!(
            std::fs::metadata(&bomb).unwrap().len() < 10_000,
            "compresses well"
        );
        let small = Limits {
            max_member: 1000,
            max_total: 1 << 30,
        };
        let err = format!(
            "{:#}",
            unpack_with(&bomb, &out.join("b"), &small).unwrap_err()
        );
        assert!(
            err.contains("big.bin") && err.contains("declares 1 MiB"),
            "{err}"
        );
        let lying = inp.join("lying.zip");
        std::fs::write(
            &lying,
            declare_size(&std::fs::read(&bomb).unwrap(), "big.bin", 10),
        )
        .unwrap();
        let err = format!(
            "{:#}",
            unpack_with(&lying, &out.join("b"), &small).unwrap_err()
        );
        assert!(
            err.contains("big.bin") && err.contains("more than the 1000 bytes"),
            "{err}"
        );
        let err = format!(
            "{:#}",
            unpack_with(&lying, &out.join("b"), &Limits::default()).unwrap_err()
        );
        assert!(
            err.contains("big.bin") && err.contains("declares 10"),
            "{err}"
        );
        let two = zip_with(&inp, "two.zip", &[("a", b"12345"), ("b", b"12345")], None);
        let total = Limits {
            max_member: 100,
            max_total: 8,
        };
        let err = format!(
            "{:#}",
            unpack_with(&two, &out.join("b"), &total).unwrap_err()
        );
        assert!(err.contains("in total") && err.contains("`b`"), "{err}");
        assert!(!out.join("b").join(".unpack").exists() && files_under(&out.join("b")).is_empty());
        std::fs::remove_dir_all(&root).ok();
    }

    /// A zip whose member `name` declares `size` bytes (local and central headers), whatever
    /// it holds.
    pub(crate) fn declare_size(zip: &[u8], name: &str, size: u32) -> Vec<u8> {
        let mut z = zip.to_vec();
        let n = name.len();
        for (sig, size_at, name_at) in [
            (b"PK\x03\x04", 22, 30), // local file header
            (b"PK\x01\x02", 24, 46), // central directory header
        ] {
            for i in 0..z.len().saturating_sub(name_at + n) {
                if &z[i..i + 4] == sig && &z[i + name_at..i + name_at + n] == name.as_bytes() {
                    z[i + size_at..i + size_at + 4].copy_from_slice(&size.to_le_bytes());
                }
            }
        }
        z
    }

    #[test]
    fn archives_of_too_many_members_are_refused() {
        let dir = std::env::temp_dir().join(format!("harma-members-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files: Vec<(String, &[u8])> = (0..5).map(|i| (format!("f{i}"), &b"x"[..])).collect();
        let refs: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (n.as_str(), *b)).collect();
        let zip = zip_with(&dir, "five.zip", &refs, None);
        let names: Vec<String> = (0..5).map(|i| format!("f{i}")).collect();
        let entries: Vec<(&str, tar::EntryType, &str)> = names
            .iter()
            .map(|n| (n.as_str(), tar::EntryType::Regular, ""))
            .collect();
        let tar = tar_with(&dir, "five.tar", &entries);
        for (path, name) in [(&zip, "five.zip"), (&tar, "five.tar")] {
            let a = Archive::new(path, name).unwrap();
            assert_eq!(a.members_up_to(5).unwrap().len(), 5, "{name}");
            let err = a.members_up_to(4).unwrap_err().to_string();
            assert!(
                err.contains(name) && err.contains("more than 4 members"),
                "{err}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn members_are_matched_by_path_then_by_unique_name() {
        let m = |parts: &[&str]| Member {
            index: 0,
            raw: parts.join("/"),
            parts: parts.iter().map(|s| s.to_string()).collect(),
            kind: Kind::File,
            size: 1,
        };
        let members = [
            m(&["pkg", "images", "train", "a.tif"]),
            m(&["pkg", "images", "val", "c.tif"]),
            m(&["pkg", "images", "test", "c.tif"]),
            m(&["pkg", "b.tif"]),
        ];
        let w = |s: &str| s.split('/').map(str::to_string).collect::<Vec<_>>();
        assert_eq!(
            match_members(
                &members,
                &[
                    w("train/a.tif"),
                    w("test/c.tif"),
                    w("x/b.tif"),
                    w("y/c.tif"),
                    w("d.tif")
                ]
            ),
            [Some(0), Some(2), Some(3), None, None]
        );
    }
}
