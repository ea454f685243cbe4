//! A CLIP backbone's weights: the tensors a [`ClipConfig`] needs under open_clip's names
//! ([`expected_shapes`]), read from a checkpoint file by `harma-checkpoint` and checked, or
//! drawn at random for tests, benchmarks and the offline demo, or computed by the parity
//! formula ([`formula_tensor`]) that the full-size tests share with their fixture script.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::config::ClipConfig;
use crate::{Error, Result};

/// Keys that open_clip or transformers checkpoints carry and the frozen backbone does not use.
const KNOWN_EXTRAS: &[&str] = &["logit_scale", "logit_bias", "attn_mask", "visual.attn_mask"];

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

/// A backbone of `cfg` with random weights ([`random_backbone`]: `init`, drawn from
/// `uniform`) written to `path` as safetensors, atomically: the stand-in models of the demo,
/// the tests and the benches (no pretrained weights can be downloaded offline).
pub fn write_random_backbone(
    cfg: &ClipConfig,
    init: RandomInit,
    uniform: &mut dyn FnMut() -> f64,
    path: &std::path::Path,
) -> anyhow::Result<()> {
    let weights = random_backbone(cfg, init, uniform, &Device::Cpu)?;
    let named: Vec<(&str, &Tensor)> = weights.iter().map(|(k, v)| (k.as_str(), v)).collect();
    harma_checkpoint::write::write_safetensors(path, &named, std::iter::empty::<(String, String)>())
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

// The parity formula: deterministic weights that a test builds in memory and its fixture script
// (tests/fixtures/full_size/make_full_size.py) builds in PyTorch, bit for bit equal in f32, so a
// full-size model is compared with the reference without committing its weights. The two copies
// must stay equal: change both or neither.
//
//   seed(key)   FNV-1a 64 of the key's UTF-8 bytes, folded: (h ^ (h >> 32)) mod 2^32
//   hash(s, i)  with M = 2^32 - 1 and the element's flat row-major index i < 2^32:
//               h = (i * A + s) & M; h ^= h >> 16; h = (h * B) & M; h ^= h >> 13;
//               h = (h * C) & M; h ^= h >> 16   (every product < 2^63, exact in u64 and int64)
//   u           h / 2^32 - 0.5 in f64, in [-0.5, 0.5)
//   value       in f64, then rounded to f32 once:
//               >= 2 dims: u * (2 sqrt 3 / sqrt(fan_in)), fan_in = numel / shape[0] (std 1/sqrt(fan_in))
//               1 dim, key ending in `weight` (layer-norm gains): 1 + 0.4 u
//               other 1 dim (biases, class embedding): 0.2 u
//               0 dims: `temp` 0.05; any other scalar (the gates) 0.6 + u
const FORMULA_A: u64 = 0x61c8_8647;
const FORMULA_B: u64 = 0x05eb_ca6b;
const FORMULA_C: u64 = 0x42b2_ae35;
const FORMULA_MASK: u64 = 0xffff_ffff;

fn formula_seed(key: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h ^ (h >> 32)) & FORMULA_MASK
}

/// The parity formula's uniform values for `key`, elements 0 to `n - 1`: each in [-0.5, 0.5)
/// and exact in f64 (the comment above this function in the source states the formula).
pub fn formula_unit(key: &str, n: usize) -> Vec<f64> {
    assert!(
        n as u64 <= 1 << 32,
        "`{key}`: the formula indexes at most 2^32 elements"
    );
    let seed = formula_seed(key);
    (0..n as u64)
        .map(|i| {
            let mut h = (i * FORMULA_A + seed) & FORMULA_MASK;
            h ^= h >> 16;
            h = (h * FORMULA_B) & FORMULA_MASK;
            h ^= h >> 13;
            h = (h * FORMULA_C) & FORMULA_MASK;
            h ^= h >> 16;
            h as f64 / 4_294_967_296.0 - 0.5
        })
        .collect()
}

/// The parity formula's value of every element of the tensor `key` of `shape`, row-major: the
/// weights of the full-size parity tests (tests/fixtures/full_size/make_full_size.py computes
/// the same bits). Every tensor is non-zero and distinct, so a swapped or unused one shows.
pub fn formula_tensor(key: &str, shape: &[usize]) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let u = formula_unit(key, n.max(1));
    match shape.len() {
        0 if key == "temp" => vec![0.05],
        0 => vec![(0.6 + u[0]) as f32],
        1 if key.ends_with("weight") => u.iter().map(|u| (1.0 + 0.4 * u) as f32).collect(),
        1 => u.iter().map(|u| (0.2 * u) as f32).collect(),
        _ => {
            let scale = 2.0 * 3f64.sqrt() / ((n / shape[0]) as f64).sqrt();
            u.iter().map(|u| (u * scale) as f32).collect()
        }
    }
}

/// Every tensor of `shapes` (name -> shape) by the parity formula ([`formula_tensor`]).
pub fn formula_tensors(
    shapes: impl IntoIterator<Item = (String, Vec<usize>)>,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let mut map = HashMap::new();
    for (name, shape) in shapes {
        let values = formula_tensor(&name, &shape);
        map.insert(name, Tensor::from_vec(values, shape, device)?);
    }
    Ok(map)
}

/// Every backbone tensor of `cfg` by the parity formula ([`formula_tensor`]).
pub fn formula_backbone(cfg: &ClipConfig, device: &Device) -> Result<HashMap<String, Tensor>> {
    formula_tensors(expected_shapes(cfg), device)
}

/// The parity formula's `n` images of `size` x `size` (the fixture script's `pixels`): `4 u`
/// of the key `input.pixels`, about the spread of normalised pixels.
pub fn formula_pixels(n: usize, size: usize, device: &Device) -> Result<Tensor> {
    let values = formula_unit("input.pixels", n * 3 * size * size)
        .into_iter()
        .map(|u| (4.0 * u) as f32)
        .collect();
    Ok(Tensor::from_vec(values, (n, 3, size, size), device)?)
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

/// A checkpoint read into open_clip names: the backbone tensors, and the other tensors the
/// caller asked to keep (HarMA's adapters, which the adapter crate picks out by name).
#[derive(Debug)]
pub struct Checkpoint {
    pub path: PathBuf,
    pub backbone: HashMap<String, Tensor>,
    /// Tensors besides the backbone's that `extra` (given to [`Checkpoint::load`]) claimed.
    pub extras: HashMap<String, Tensor>,
}

impl Checkpoint {
    /// Read `path` into open_clip's names and check every backbone tensor of `cfg` is present
    /// with the right shape. Other keys are kept in `extras` where `extra(key)` claims them
    /// (the caller knows its own keys; `|_| false` for plain CLIP), dropped if they are
    /// open_clip's known non-weights, and unexpected otherwise. Missing, unexpected or wrongly
    /// shaped keys give one error that lists them all.
    pub fn load(path: &Path, cfg: &ClipConfig, extra: &dyn Fn(&str) -> bool) -> Result<Self> {
        let named = harma_checkpoint::load_open_clip_named(path)?;
        Self::from_named(path, named, cfg, extra)
    }

    fn from_named(
        path: &Path,
        named: HashMap<String, Tensor>,
        cfg: &ClipConfig,
        extra: &dyn Fn(&str) -> bool,
    ) -> Result<Self> {
        let expected = expected_shapes(cfg);
        let mut backbone = HashMap::new();
        let mut extras = HashMap::new();
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
            } else if extra(&k) {
                extras.insert(k, t);
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
                extras,
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
