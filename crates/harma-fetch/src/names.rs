//! Names that become paths. Every name `fetch-data` reads from a download (an annotation's
//! `image`, a release asset, an archive member, a header of the Hub) is joined under its
//! folder here or refused, with one set of rules on every system: `/` and `\` both separate
//! parts, so a name that would escape on Windows is refused on Linux too.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// The parts of a relative name once `.` and `..` are resolved, or why it is refused:
/// absolute paths, `..` above the start, drive or stream prefixes (`C:`, `a:b`), control
/// characters (NUL, newline), parts made only of dots and spaces (Windows reads `...` and
/// `.. ` as `.` and `..`), and names that name no file.
pub(crate) fn name_parts(name: &str) -> std::result::Result<Vec<&str>, &'static str> {
    if name.chars().any(char::is_control) {
        return Err("contains a control character");
    }
    if name.starts_with(['/', '\\']) {
        return Err("is an absolute path");
    }
    let mut parts: Vec<&str> = Vec::new();
    for p in name.split(['/', '\\']) {
        match p {
            "" | "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err("climbs out of its folder with `..`");
                }
            }
            _ if p.contains(':') => return Err("has a drive or stream prefix (`:`)"),
            _ if p.trim_end_matches(['.', ' ']).is_empty() => {
                return Err("has a part made only of dots and spaces")
            }
            _ => parts.push(p),
        }
    }
    if parts.is_empty() {
        return Err("names no file");
    }
    Ok(parts)
}

/// Where `name` lands under `root`, or an error naming it if it would land anywhere else
/// (see [`name_parts`]; names that are not UTF-8 are refused too).
pub fn safe_join(root: &Path, name: &Path) -> Result<PathBuf> {
    let Some(text) = name.to_str() else {
        bail!(
            "name `{}` is not valid UTF-8: refused (nothing is written outside {})",
            name.display(),
            root.display()
        );
    };
    match name_parts(text) {
        Ok(parts) => Ok(parts.iter().fold(root.to_path_buf(), |p, c| p.join(c))),
        Err(why) => bail!(
            "name `{}` {why}: refused (nothing is written outside {})",
            text.escape_debug(),
            root.display()
        ),
    }
}

/// Whether a name is one plain file name (no folder part, nothing to resolve).
pub(crate) fn is_plain_file_name(name: &str) -> bool {
    name_parts(name).is_ok_and(|p| p == [name])
}

/// An identifier from a server that becomes a file name (an ETag, a commit id): letters,
/// digits, `-` and `_` only.
pub(crate) fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_leave_the_root_are_refused() {
        let root = Path::new("/data/x");
        for (name, want) in [
            ("a/./b.tif", "a/b.tif"),
            ("a/../b.tif", "b.tif"),
            ("./a//b.tif", "a/b.tif"),
            ("a\\b.tif", "a/b.tif"),
            ("train/x y.tif", "train/x y.tif"),
            ("a.b..c", "a.b..c"),
        ] {
            assert_eq!(
                safe_join(root, Path::new(name)).unwrap(),
                root.join(want),
                "{name}"
            );
        }
        for (bad, why) in [
            ("../evil", "`..`"),
            ("a/../../evil", "`..`"),
            ("..\\evil", "`..`"),
            ("a\\..\\..\\evil", "`..`"),
            ("/etc/passwd", "absolute"),
            ("\\\\server\\share\\x", "absolute"),
            ("C:\\Windows\\x", "prefix"),
            ("C:/x", "prefix"),
            ("c:x", "prefix"),
            ("a/b.tif:stream", "prefix"),
            ("", "names no file"),
            (".", "names no file"),
            ("a/..", "names no file"),
            ("./", "names no file"),
            ("///", "absolute"),
            ("a\0b", "control"),
            ("a/\nb", "control"),
            ("a\u{7f}", "control"),
            ("...", "dots and spaces"),
            (".. /x", "dots and spaces"),
            (" ", "dots and spaces"),
        ] {
            let err = safe_join(root, Path::new(bad)).unwrap_err().to_string();
            assert!(
                err.contains(why)
                    && err.contains("refused")
                    && err.contains(&bad.escape_debug().to_string()),
                "{bad:?}: {err}"
            );
        }
        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStrExt;
            let raw = std::ffi::OsStr::from_bytes(b"a\xffb");
            assert!(safe_join(root, Path::new(raw)).is_err());
        }
        assert!(is_plain_file_name("harma_rsitmd.pth"));
        for bad in ["a/b.pth", "./a.pth", "a/../b.pth", "..", "x:y"] {
            assert!(!is_plain_file_name(bad), "{bad}");
        }
        assert!(is_token("0123abcdef") && is_token("a-b_c"));
        for bad in ["", "../x", "a/b", "a.b", "\"x\"", &"a".repeat(129)] {
            assert!(!is_token(bad), "{bad}");
        }
    }
}
