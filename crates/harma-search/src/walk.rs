//! The images of a folder and its subfolders, as the index keeps them: paths relative to the
//! folder, `/`-separated, with size and modification time. Symbolic links are not followed (a
//! link could lead out of the folder the user chose), and names that are not UTF-8 are
//! skipped with a warning.

use std::path::Path;

use crate::store::{stat, Found};
use crate::{Error, Result};

/// Whether `path` has one of `extensions` (lower case, without the dot), in any case.
pub fn has_extension(path: &Path, extensions: &[&str]) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| extensions.contains(&e.to_ascii_lowercase().as_str()))
}

/// A deterministic share of a folder's files (`--shard I/N`): file `rel` belongs to shard
/// `hash(rel) mod N`, the hash the first 8 bytes of the sha256 of its relative path with `/`
/// separators. The same on every machine, independent of listing order and of the other
/// files: shards of one folder built anywhere partition it, and a file keeps its shard as the
/// folder grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u64,
    pub count: u64,
}

impl Shard {
    /// Whether the file at `rel` (relative to the images folder) is in this shard.
    pub fn takes(&self, rel: &str) -> bool {
        use sha2::{Digest, Sha256};
        let h = Sha256::digest(rel.replace('\\', "/").as_bytes());
        let n = u64::from_le_bytes(h[..8].try_into().expect("8 bytes"));
        n % self.count == self.index
    }
}

impl std::str::FromStr for Shard {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("--shard {s}: expected I/N with 0 <= I < N (e.g. 0/4)");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count) = (
            i.trim().parse::<u64>().map_err(|_| bad())?,
            n.trim().parse::<u64>().map_err(|_| bad())?,
        );
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Self { index, count })
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// Every file under `root` with one of `extensions`, sorted by path.
pub fn find_images(root: &Path, extensions: &[&str]) -> Result<Vec<Found>> {
    let mut out = Vec::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))?;
        for e in entries {
            let e = e.map_err(|e| Error::io(&dir, e))?;
            let Ok(name) = e.file_name().into_string() else {
                eprintln!(
                    "warning: skipping {}: its name is not UTF-8",
                    e.path().display()
                );
                continue;
            };
            let child = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let ft = e.file_type().map_err(|err| Error::io(&e.path(), err))?;
            if ft.is_dir() {
                stack.push((e.path(), child));
            } else if ft.is_file() && has_extension(&e.path(), extensions) {
                let (size, mtime_ns) = stat(&e.path())?;
                out.push(Found {
                    rel: child,
                    size,
                    mtime_ns,
                });
            }
        }
    }
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(out)
}

/// `rel` (as stored in an index) under `root`, if it names a file inside `root`: no absolute
/// path, no `..`, and after resolving links still inside `root` (which must be canonical).
pub fn resolve_inside(root: &Path, rel: &str) -> Option<std::path::PathBuf> {
    let rel = Path::new(rel);
    if !rel
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)))
    {
        return None;
    }
    let p = root.join(rel).canonicalize().ok()?;
    (p.starts_with(root) && p.is_file()).then_some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_images_recursively_and_stays_inside() {
        let dir = std::env::temp_dir().join(format!("harma-walk-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("a/b")).unwrap();
        for f in ["z.png", "a/x.TIF", "a/b/y.jpg", "a/notes.txt"] {
            std::fs::write(dir.join(f), b"x").unwrap();
        }
        let outside = dir.with_extension("outside.png");
        std::fs::write(&outside, b"x").unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(&outside, dir.join("link.png")).unwrap();
        let found = find_images(&dir, &["png", "tif", "jpg"]).unwrap();
        let rels: Vec<&str> = found.iter().map(|f| f.rel.as_str()).collect();
        assert_eq!(rels, vec!["a/b/y.jpg", "a/x.TIF", "z.png"]);
        let root = dir.canonicalize().unwrap();
        assert!(resolve_inside(&root, "a/b/y.jpg").is_some());
        for bad in [
            "../x.png",
            "/etc/passwd",
            "a/../../x",
            "link.png",
            "a",
            "missing.png",
        ] {
            assert_eq!(resolve_inside(&root, bad), None, "{bad}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_file(&outside).unwrap();
    }
}
