//! Writing result files atomically: a temp file beside the target, then a rename, so a crash
//! or Ctrl-C never leaves a partial file under the final name.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::Tensor;

/// Write f32 tensors (any device) and string metadata to `path` as safetensors, atomically.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(&str, &Tensor)],
    metadata: HashMap<String, String>,
) -> Result<()> {
    let mut bufs = Vec::new();
    for (name, t) in tensors {
        let v: Vec<f32> = t
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1()?;
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        bufs.push((name.to_string(), t.dims().to_vec(), bytes));
    }
    let views = bufs
        .iter()
        .map(|(n, shape, b)| {
            Ok((
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, Some(metadata))?;
    write_atomic(path, &bytes)
}

/// Write `bytes` to `path` through a temp file beside it and a rename; creates the folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("out"),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot move into {}", path.display()))?;
    Ok(())
}
