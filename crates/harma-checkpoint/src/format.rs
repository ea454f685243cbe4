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
                t.to_dtype(DType::F32)?
            } else {
                t
            };
            Ok((k, t))
        })
        .collect()
}
