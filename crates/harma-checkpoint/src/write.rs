//! Writing result files so that a crash, a power cut, a full disk or Ctrl-C never leaves a
//! partial or empty file under the final name, nor a temp file behind: a temp file beside the
//! target, flushed to disk, renamed, and the folder flushed too. Files are byte-reproducible:
//! the same tensors and metadata give the same bytes.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Tensor;

/// Write f32 tensors (any device) and string metadata to `path` as safetensors, atomically.
/// Tensors are laid out in name order and the header's keys are sorted, so that equal
/// contents give equal files (the safetensors crate orders metadata by a `HashMap`).
pub fn write_safetensors<K: AsRef<str>>(
    path: &Path,
    tensors: &[(&str, &Tensor)],
    metadata: impl IntoIterator<Item = (K, String)>,
) -> Result<()> {
    let mut named: Vec<(&str, Vec<usize>, Vec<f32>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let v: Vec<f32> = t
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1()?;
        named.push((name, t.dims().to_vec(), v));
    }
    named.sort_by(|a, b| a.0.cmp(b.0));
    let mut header = serde_json::Map::new();
    let meta: BTreeMap<String, String> = metadata
        .into_iter()
        .map(|(k, v)| (k.as_ref().to_string(), v))
        .collect();
    if !meta.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(meta)?);
    }
    let mut offset = 0usize;
    for (name, shape, v) in &named {
        let end = offset + 4 * v.len();
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut json = serde_json::to_string(&header)?.into_bytes();
    // the data starts 8-byte aligned, as the safetensors crate writes it
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let mut bytes = Vec::with_capacity(8 + json.len() + offset);
    bytes.extend_from_slice(&(json.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&json);
    for (_, _, v) in &named {
        bytes.extend(v.iter().flat_map(|x| x.to_le_bytes()));
    }
    write_atomic(path, &bytes)
}

/// The temp file `write_atomic` writes `path` through: `.NAME.tmp-PID` beside it.
fn temp_path(path: &Path, dir: &Path) -> PathBuf {
    dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("out"),
        std::process::id()
    ))
}

/// Write `bytes` to `path` through a temp file beside it, flushed to disk before the rename
/// (and the folder after it), so that a power cut leaves the old file or the new one, never an
/// empty one; creates the folder. On failure the temp file is removed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = temp_path(path, dir);
    let written = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(bytes)
            .and_then(|_| f.sync_all())
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        drop(f);
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot move into {}", path.display()))?;
        Ok(())
    })();
    if written.is_err() {
        std::fs::remove_file(&tmp).ok();
    }
    written?;
    // the rename itself on disk (a folder is synced through a handle opened for reading)
    if let Ok(d) = std::fs::File::open(dir) {
        d.sync_all().ok();
    }
    Ok(())
}

/// Remove the temp files that writes into `dir` by processes no longer running left behind
/// (killed between write and rename). Returns how many were removed.
pub fn remove_stale_temps(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.starts_with('.'))
            .and_then(|n| n.rsplit_once(".tmp-"))
            .and_then(|(_, pid)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        let alive = pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists();
        if !alive && std::fs::remove_file(e.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safetensors_are_byte_reproducible_and_read_back() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("harma-output-{}", std::process::id()));
        let a = Tensor::new(
            &[[1f32, 2.0, 3.0], [4.0, 5.0, 6.0]],
            &candle_core::Device::Cpu,
        )?;
        let b = Tensor::new(&[7f32], &candle_core::Device::Cpu)?;
        let meta = |order: &[&str]| -> Vec<(String, String)> {
            order
                .iter()
                .map(|k| (k.to_string(), format!("v{k}")))
                .collect()
        };
        write_safetensors(
            &dir.join("1.st"),
            &[("b", &b), ("a", &a)],
            meta(&["x", "y", "z"]),
        )?;
        write_safetensors(
            &dir.join("2.st"),
            &[("a", &a), ("b", &b)],
            meta(&["z", "x", "y"]),
        )?;
        let (one, two) = (
            std::fs::read(dir.join("1.st"))?,
            std::fs::read(dir.join("2.st"))?,
        );
        assert_eq!(one, two, "the same contents, the same bytes");
        let st = safetensors::SafeTensors::deserialize(&one)?;
        assert_eq!(st.tensor("a")?.shape(), [2, 3]);
        let (n, header) = safetensors::SafeTensors::read_metadata(&one)?;
        assert_eq!((8 + n) % 8, 0, "data 8-byte aligned");
        assert_eq!(header.metadata().as_ref().unwrap()["y"], "vy");
        let back = candle_core::safetensors::load(dir.join("1.st"), &candle_core::Device::Cpu)?;
        assert_eq!(back["a"].to_vec2::<f32>()?, a.to_vec2::<f32>()?);
        std::fs::remove_dir_all(dir).ok();
        Ok(())
    }

    #[test]
    fn a_failed_write_leaves_no_temp_file_and_stale_ones_are_cleaned() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("harma-output-tmp-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("target.bin"))?;
        // the rename onto a folder fails: the temp file is gone, the folder untouched
        assert!(write_atomic(&dir.join("target.bin"), b"data").is_err());
        let left: Vec<_> = std::fs::read_dir(&dir)?
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, ["target.bin"]);
        // a temp file of a dead process (pid 0 never runs a user process) is removed; one of
        // this process and other files are kept
        std::fs::write(dir.join(".a.safetensors.tmp-0"), b"x")?;
        let mine = temp_path(&dir.join("b"), &dir);
        std::fs::write(&mine, b"x")?;
        std::fs::write(dir.join("notes.tmp-0"), b"x")?;
        assert_eq!(remove_stale_temps(&dir), 1);
        assert!(mine.exists() && dir.join("notes.tmp-0").exists());
        std::fs::remove_dir_all(dir).ok();
        Ok(())
    }
}
