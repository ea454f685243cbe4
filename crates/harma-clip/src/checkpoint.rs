//! Reading CLIP weights from the files people have, into open_clip's key layout.
//!
//! Accepted, detected from the file's first bytes: PyTorch zip archives (`torch.save` of an
//! open_clip state dict, plain or under `state_dict`/`model`, keys with or without a `module.`
//! or `model.` prefix: GeoRSCLIP, RemoteCLIP, open_clip, HarMA), safetensors in the same layout,
//! and Hugging Face transformers `CLIPModel` safetensors, renamed to open_clip's keys
//! (mapping as in open_clip's `convert_hf_to_openclip`-style loaders and transformers'
//! `modeling_clip.py`).

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::config::ClipConfig;
use crate::{torch_pickle, Error, Result};

/// Keys that open_clip or transformers checkpoints carry and the frozen backbone does not use.
const KNOWN_EXTRAS: &[&str] = &["logit_scale", "logit_bias", "attn_mask", "visual.attn_mask"];

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
        Format::TorchZip => torch_pickle::read_torch_zip(path)?,
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

/// The spread of [`random_backbone`]'s weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RandomInit {
    /// std 0.02 everywhere, as a freshly initialised open_clip (for timing)
    Clip,
    /// std 1/sqrt(fan_in) for matrices, 1 for embeddings: every layer keeps its input's scale,
    /// so the frozen random towers pass on what they see (the offline demo's stand-in for a
    /// pretrained CLIP)
    FanIn,
}

/// Random backbone weights in open_clip's layout: normal (see [`RandomInit`]), layer norms 1
/// and 0, biases 0. `uniform` draws from [0, 1) (a seeded source makes the model repeatable).
pub fn random_backbone(
    cfg: &ClipConfig,
    init: RandomInit,
    uniform: &mut dyn FnMut() -> f64,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut map = HashMap::new();
    for (name, shape) in expected_shapes(cfg) {
        let n: usize = shape.iter().product();
        let values: Vec<f32> = if name.contains("ln_") && name.ends_with("weight") {
            vec![1.0; n]
        } else if name.contains("ln_") || name.ends_with("bias") {
            vec![0.0; n]
        } else {
            let std = match init {
                RandomInit::Clip => 0.02,
                // [out, in] weights (and the [in, out] projections, square enough here)
                RandomInit::FanIn if shape.len() == 2 && !name.contains("embedding") => {
                    1.0 / (shape[1] as f64).sqrt()
                }
                RandomInit::FanIn => 1.0,
            };
            // Box-Muller
            (0..n)
                .map(|_| {
                    let (u1, u2) = (1.0 - uniform(), uniform());
                    (std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
                })
                .collect()
        };
        map.insert(name, Tensor::from_vec(values, shape, device)?);
    }
    Ok(map)
}

/// The shape of every backbone tensor that `cfg` expects, under open_clip's names.
pub fn expected_shapes(cfg: &ClipConfig) -> BTreeMap<String, Vec<usize>> {
    let mut m = BTreeMap::new();
    let v = &cfg.vision;
    let t = &cfg.text;
    let block = |m: &mut BTreeMap<String, Vec<usize>>, p: &str, w: usize, mlp: usize| {
        for ln in ["ln_1", "ln_2"] {
            m.insert(format!("{p}.{ln}.weight"), vec![w]);
            m.insert(format!("{p}.{ln}.bias"), vec![w]);
        }
        m.insert(format!("{p}.attn.in_proj_weight"), vec![3 * w, w]);
        m.insert(format!("{p}.attn.in_proj_bias"), vec![3 * w]);
        m.insert(format!("{p}.attn.out_proj.weight"), vec![w, w]);
        m.insert(format!("{p}.attn.out_proj.bias"), vec![w]);
        m.insert(format!("{p}.mlp.c_fc.weight"), vec![mlp, w]);
        m.insert(format!("{p}.mlp.c_fc.bias"), vec![mlp]);
        m.insert(format!("{p}.mlp.c_proj.weight"), vec![w, mlp]);
        m.insert(format!("{p}.mlp.c_proj.bias"), vec![w]);
    };
    m.insert(
        "visual.conv1.weight".into(),
        vec![v.width, 3, v.patch_size, v.patch_size],
    );
    m.insert("visual.class_embedding".into(), vec![v.width]);
    m.insert(
        "visual.positional_embedding".into(),
        vec![v.seq_len(), v.width],
    );
    for n in ["ln_pre", "ln_post"] {
        m.insert(format!("visual.{n}.weight"), vec![v.width]);
        m.insert(format!("visual.{n}.bias"), vec![v.width]);
    }
    for i in 0..v.layers {
        block(
            &mut m,
            &format!("visual.transformer.resblocks.{i}"),
            v.width,
            v.mlp_dim,
        );
    }
    m.insert("visual.proj".into(), vec![v.width, cfg.embed_dim]);
    m.insert("token_embedding.weight".into(), vec![t.vocab_size, t.width]);
    m.insert(
        "positional_embedding".into(),
        vec![t.context_length, t.width],
    );
    for i in 0..t.layers {
        block(
            &mut m,
            &format!("transformer.resblocks.{i}"),
            t.width,
            t.mlp_dim,
        );
    }
    m.insert("ln_final.weight".into(), vec![t.width]);
    m.insert("ln_final.bias".into(), vec![t.width]);
    m.insert("text_projection".into(), vec![t.width, cfg.embed_dim]);
    m
}

/// Whether a (prefix-stripped) key belongs to HarMA's trainable part rather than the backbone.
pub fn is_adapter_key(key: &str) -> bool {
    key == "temp" || key.contains(".mmadapter.") || key.ends_with(".gate1")
}

/// Strip the `module.` (DataParallel) and `model.` (HarMA) wrappers from a key.
fn strip_prefixes(mut key: &str) -> &str {
    loop {
        if let Some(rest) = key.strip_prefix("module.") {
            key = rest;
        } else if let Some(rest) = key.strip_prefix("model.") {
            key = rest;
        } else {
            return key;
        }
    }
}

/// Rename a Hugging Face transformers CLIP state dict to open_clip's layout:
/// q/k/v projections are packed into `in_proj`, projections are transposed.
fn from_hf(mut hf: HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    let mut layer_ids: Vec<(String, String, usize)> = Vec::new();
    for (hf_tower, oc_prefix) in [("vision_model", "visual."), ("text_model", "")] {
        let mut i = 0;
        while hf.contains_key(&format!("{hf_tower}.encoder.layers.{i}.layer_norm1.weight")) {
            layer_ids.push((hf_tower.to_string(), oc_prefix.to_string(), i));
            i += 1;
        }
    }
    for (tower, prefix, i) in layer_ids {
        let src = format!("{tower}.encoder.layers.{i}");
        let dst = format!("{prefix}transformer.resblocks.{i}");
        let mut get = |k: &str| -> Result<Tensor> {
            hf.remove(&format!("{src}.{k}"))
                .ok_or_else(|| Error::Checkpoint(format!("missing key `{src}.{k}`")))
        };
        for (h, o) in [
            ("layer_norm1", "ln_1"),
            ("layer_norm2", "ln_2"),
            ("self_attn.out_proj", "attn.out_proj"),
            ("mlp.fc1", "mlp.c_fc"),
            ("mlp.fc2", "mlp.c_proj"),
        ] {
            out.insert(format!("{dst}.{o}.weight"), get(&format!("{h}.weight"))?);
            out.insert(format!("{dst}.{o}.bias"), get(&format!("{h}.bias"))?);
        }
        for kind in ["weight", "bias"] {
            let q = get(&format!("self_attn.q_proj.{kind}"))?;
            let k = get(&format!("self_attn.k_proj.{kind}"))?;
            let v = get(&format!("self_attn.v_proj.{kind}"))?;
            out.insert(
                format!("{dst}.attn.in_proj_{kind}"),
                Tensor::cat(&[q, k, v], 0)?,
            );
        }
    }
    let renames = [
        (
            "vision_model.embeddings.patch_embedding.weight",
            "visual.conv1.weight",
        ),
        (
            "vision_model.embeddings.class_embedding",
            "visual.class_embedding",
        ),
        (
            "vision_model.embeddings.position_embedding.weight",
            "visual.positional_embedding",
        ),
        ("vision_model.pre_layrnorm.weight", "visual.ln_pre.weight"),
        ("vision_model.pre_layrnorm.bias", "visual.ln_pre.bias"),
        (
            "vision_model.post_layernorm.weight",
            "visual.ln_post.weight",
        ),
        ("vision_model.post_layernorm.bias", "visual.ln_post.bias"),
        (
            "text_model.embeddings.token_embedding.weight",
            "token_embedding.weight",
        ),
        (
            "text_model.embeddings.position_embedding.weight",
            "positional_embedding",
        ),
        ("text_model.final_layer_norm.weight", "ln_final.weight"),
        ("text_model.final_layer_norm.bias", "ln_final.bias"),
        ("logit_scale", "logit_scale"),
    ];
    for (h, o) in renames {
        if let Some(t) = hf.remove(h) {
            out.insert(o.to_string(), t);
        }
    }
    for (h, o) in [
        ("visual_projection.weight", "visual.proj"),
        ("text_projection.weight", "text_projection"),
    ] {
        if let Some(t) = hf.remove(h) {
            out.insert(o.to_string(), t.t()?.contiguous()?);
        }
    }
    // position_ids buffers are derived, not weights
    hf.retain(|k, _| !k.ends_with("position_ids"));
    // whatever is left is reported as unexpected by the caller
    out.extend(hf);
    Ok(out)
}

/// The adapter tensors (HarMA's trainable part) of a file, `model.`/`module.` prefixes removed:
/// an adapters-only safetensors file, or a whole HarMA checkpoint whose backbone is ignored.
pub fn load_adapters(path: &Path) -> Result<HashMap<String, Tensor>> {
    let adapters: HashMap<String, Tensor> = load_tensors(path)?
        .into_iter()
        .map(|(k, t)| (strip_prefixes(&k).to_string(), t))
        .filter(|(k, _)| is_adapter_key(k))
        .collect();
    if adapters.is_empty() {
        return Err(Error::Checkpoint(format!(
            "{}: no adapter tensors (keys with `.mmadapter.`, `.gate1` or `temp`)",
            path.display()
        )));
    }
    Ok(adapters)
}

/// A checkpoint read into open_clip names: the backbone tensors, and the HarMA adapter tensors
/// (if any) kept apart for the adapter crate.
#[derive(Debug)]
pub struct Checkpoint {
    pub path: PathBuf,
    pub backbone: HashMap<String, Tensor>,
    pub adapters: HashMap<String, Tensor>,
}

impl Checkpoint {
    /// Read `path`, rename its keys to open_clip's layout and check every backbone tensor of
    /// `cfg` is present with the right shape. Missing, unexpected or wrongly shaped keys give
    /// one error that lists them all.
    pub fn load(path: &Path, cfg: &ClipConfig) -> Result<Self> {
        let raw = load_tensors(path)?;
        let is_hf = raw
            .keys()
            .any(|k| k.starts_with("vision_model.") || k.starts_with("text_model."));
        let named: HashMap<String, Tensor> = if is_hf {
            from_hf(raw).map_err(|e| Error::Checkpoint(format!("{}: {e}", path.display())))?
        } else {
            raw.into_iter()
                .map(|(k, t)| (strip_prefixes(&k).to_string(), t))
                .collect()
        };
        Self::from_named(path, named, cfg)
    }

    fn from_named(path: &Path, named: HashMap<String, Tensor>, cfg: &ClipConfig) -> Result<Self> {
        let expected = expected_shapes(cfg);
        let mut backbone = HashMap::new();
        let mut adapters = HashMap::new();
        let mut unexpected = Vec::new();
        let mut wrong = Vec::new();
        for (k, t) in named {
            if let Some(shape) = expected.get(&k) {
                if t.dims() != shape.as_slice() {
                    wrong.push(format!(
                        "`{k}`: file has {:?}, model needs {shape:?}",
                        t.dims()
                    ));
                }
                backbone.insert(k, t);
            } else if is_adapter_key(&k) {
                adapters.insert(k, t);
            } else if !KNOWN_EXTRAS.contains(&k.as_str()) {
                unexpected.push(k);
            }
        }
        let missing: Vec<&String> = expected
            .keys()
            .filter(|k| !backbone.contains_key(*k))
            .collect();
        if missing.is_empty() && unexpected.is_empty() && wrong.is_empty() {
            return Ok(Self {
                path: path.to_path_buf(),
                backbone,
                adapters,
            });
        }
        unexpected.sort();
        wrong.sort();
        let mut msg = format!(
            "{}: does not match the architecture (check --arch)",
            path.display()
        );
        let list = |msg: &mut String, title: &str, items: Vec<String>| {
            if !items.is_empty() {
                let n = items.len();
                let shown: Vec<String> = items.into_iter().take(12).collect();
                msg.push_str(&format!("\n  {title} ({n}): {}", shown.join(", ")));
                if n > 12 {
                    msg.push_str(", ...");
                }
            }
        };
        list(&mut msg, "wrong shapes", wrong);
        list(
            &mut msg,
            "missing keys",
            missing.into_iter().cloned().collect(),
        );
        list(&mut msg, "unexpected keys", unexpected);
        Err(Error::Checkpoint(msg))
    }
}
