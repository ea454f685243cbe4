//! Telling a checkpoint's format from its first bytes, and reading its tensors as stored.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::{pickle, Error, Result};

/// The file formats [`load_tensors`] recognises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    TorchZip,
    Safetensors,
}

/// Look at the first bytes of `path` to tell its format.
pub fn detect_format(path: &Path) -> Result<Format> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut head = [0u8; 9];
    let n = f.read(&mut head).map_err(|e| Error::io(path, e))?;
    if n >= 4 && &head[..4] == b"PK\x03\x04" {
        return Ok(Format::TorchZip);
    }
    if n == 9 && head[8] == b'{' {
        return Ok(Format::Safetensors);
    }
    if n >= 2 && head[0] == 0x80 && head[1] <= 5 {
        return Err(Error::Checkpoint(format!(
            "{}: a legacy (pre-1.6) PyTorch pickle; re-save it with a current torch.save \
             (zip format) or convert it to safetensors",
            path.display()
        )));
    }
    Err(Error::Checkpoint(format!(
        "{}: not a checkpoint (expected a PyTorch zip archive or safetensors)",
        path.display()
    )))
}

/// Every tensor of a checkpoint file, as stored (names untouched), converted to f32 on the CPU.
pub fn load_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    let tensors = match detect_format(path)? {
        Format::TorchZip => pickle::read_torch_zip(path)?,
        Format::Safetensors => candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
            Error::Checkpoint(format!(
                "{}: unreadable safetensors ({e}); truncated download?",
                path.display()
            ))
        })?,
    };
    tensors
        .into_iter()
        .map(|(k, t)| {
            let t = if t.dtype().is_float() {
                let t = t.to_dtype(DType::F32)?;
                check_finite(path, &k, &t)?;
                t
            } else {
                t
            };
            Ok((k, t))
        })
        .collect()
}

/// `f` on the f32 elements of `t`, in order: read in place from a contiguous CPU tensor (a
/// checkpoint's tensors are; no copy of a 100 MB embedding at start-up), else from a copy.
pub fn scan_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(f(&v[a..b]));
        }
    }
    Ok(f(&t.flatten_all()?.to_vec1::<f32>()?))
}

/// An f32 tensor `key` of the file `path` with a NaN or an infinity is an error that names
/// the file, the tensor and the first such element: a planted or corrupted value is refused
/// at load, not found as a NaN loss later.
pub fn check_finite(path: &Path, key: &str, t: &Tensor) -> Result<()> {
    let bad = scan_f32(t, |v| {
        v.iter()
            .position(|x| !x.is_finite())
            .map(|i| (i, v[i], v.len()))
    })?;
    if let Some((i, value, n)) = bad {
        return Err(Error::Checkpoint(format!(
            "{}: tensor `{key}` holds {value} at element {i} (of {n}): the file is corrupt or \
             was saved from a diverged run",
            path.display(),
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A NaN or an infinity in any float tensor of a checkpoint is refused at load, naming
    /// the file, the tensor and the element.
    #[test]
    fn non_finite_values_are_refused_by_name() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("harma-finite-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| Error::Checkpoint(e.to_string()))?;
        for (bad, shown) in [(f32::NAN, "NaN"), (f32::INFINITY, "inf")] {
            let path = dir.join("ckpt.safetensors");
            let ok = Tensor::new(&[1f32, 2.0], &Device::Cpu)?;
            let spoiled = Tensor::new(&[0f32, 0.5, bad], &Device::Cpu)?;
            let map: HashMap<String, Tensor> = [
                ("a.weight".to_string(), ok),
                ("model.temp".to_string(), spoiled),
            ]
            .into();
            candle_core::safetensors::save(&map, &path)?;
            let err = load_tensors(&path).unwrap_err().to_string();
            assert!(
                err.contains("ckpt.safetensors")
                    && err.contains("`model.temp`")
                    && err.contains(shown)
                    && err.contains("element 2"),
                "{err}"
            );
        }
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }
}
