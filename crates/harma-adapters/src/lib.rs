//! HarMA's trainable part: an MMadapter after the MLP of every block of both towers, mixed in by
//! a per-block gate, with BiShareAdapter mini-adapters shared according to a topology setting.
//!
//! Reference: HarMA `open_clip/model.py` (`MMadapter`, `BiShareAdapter`) and
//! `open_clip/transformer.py` (`ResidualAttentionBlock`: `m = a * adapter(m) + (1 - a) * m`,
//! `a = sigmoid(gate1)`), <https://github.com/seekerhuang/HarMA>. Keys are the original's, so
//! checkpoints load both ways.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use harma_clip::{BlockHook, ClipConfig, Compute, Kernels, Tower};
use harma_kernels::nn::{Linear, MultiHeadAttention};

/// Errors of the adapter crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Clip(#[from] harma_clip::Error),
    #[error(transparent)]
    Read(#[from] harma_checkpoint::Error),
    #[error("{0}")]
    Msg(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Which blocks get a BiShareAdapter inside their MMadapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sharing {
    /// The released code: text blocks only (released checkpoints use it)
    #[default]
    Text,
    /// The paper's figure: text block i and image block i share one mini-adapter
    Both,
    /// No mini-adapters
    None,
}

harma_settings::choices!(Sharing {
    "text": "The released code: text blocks only (released checkpoints use it)",
    "both": "The paper's figure: text block i and image block i share one mini-adapter",
    "none": "No mini-adapters",
});

/// The key of the trained temperature of the contrastive loss (the original's).
pub const TEMP_KEY: &str = "temp";

/// Whether a (prefix-stripped) checkpoint key is one of HarMA's trainable tensors: an
/// adapter's, a gate, or the temperature.
pub fn is_adapter_key(key: &str) -> bool {
    key == TEMP_KEY || key.contains(".mmadapter.") || key.ends_with(".gate1")
}

/// The adapter tensors of a file, `model.`/`module.` prefixes removed: an adapters-only
/// safetensors file (a run's `adapters.safetensors`), or a whole HarMA checkpoint whose
/// backbone is ignored.
pub fn load_file(path: &Path) -> Result<HashMap<String, Tensor>> {
    let adapters: HashMap<String, Tensor> = harma_checkpoint::format::load_tensors(path)?
        .into_iter()
        .map(|(k, t)| (harma_checkpoint::strip_prefixes(&k).to_string(), t))
        .filter(|(k, _)| is_adapter_key(k))
        .collect();
    if adapters.is_empty() {
        return Err(Error::Msg(format!(
            "{}: no adapter tensors (keys with `.mmadapter.`, `.gate1` or `temp`)",
            path.display()
        )));
    }
    Ok(adapters)
}

/// Adapter sizes; the defaults are the paper's.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdapterConfig {
    /// MMadapter bottleneck width
    pub hidden: usize,
    /// heads of the MMadapter's attention
    pub heads: usize,
    /// heads of the BiShareAdapter's attention (its width is `hidden / 2`)
    pub share_heads: usize,
    pub sharing: Sharing,
}

impl Default for AdapterConfig {
    fn default() -> Self {
        Self {
            hidden: 128,
            heads: 8,
            share_heads: 8,
            sharing: Sharing::Text,
        }
    }
}

fn mha_shapes(m: &mut BTreeMap<String, Vec<usize>>, p: &str, d: usize) {
    m.insert(format!("{p}.in_proj_weight"), vec![3 * d, d]);
    m.insert(format!("{p}.in_proj_bias"), vec![3 * d]);
    m.insert(format!("{p}.out_proj.weight"), vec![d, d]);
    m.insert(format!("{p}.out_proj.bias"), vec![d]);
}

fn linear_shapes(m: &mut BTreeMap<String, Vec<usize>>, p: &str, out: usize, inp: usize) {
    m.insert(format!("{p}.weight"), vec![out, inp]);
    m.insert(format!("{p}.bias"), vec![out]);
}

/// The block prefix of a tower, in open_clip's key layout.
fn block_prefix(tower: Tower, i: usize) -> String {
    match tower {
        Tower::Vision => format!("visual.transformer.resblocks.{i}"),
        Tower::Text => format!("transformer.resblocks.{i}"),
    }
}

/// Whether blocks of `tower` hold a BiShareAdapter under `sharing`.
fn has_share(sharing: Sharing, tower: Tower) -> bool {
    match sharing {
        Sharing::Text => tower == Tower::Text,
        Sharing::Both => true,
        Sharing::None => false,
    }
}

/// Every trainable tensor (adapters, gates, `temp`) and its shape, under the original's names
/// (without the `model.` prefix of HarMA's wrapper). Shared mini-adapters are listed once,
/// under the text block that owns them.
pub fn expected_shapes(clip: &ClipConfig, cfg: &AdapterConfig) -> BTreeMap<String, Vec<usize>> {
    let mut m = BTreeMap::new();
    let h = cfg.hidden;
    for (tower, width, layers) in [
        (Tower::Vision, clip.vision.width, clip.vision.layers),
        (Tower::Text, clip.text.width, clip.text.layers),
    ] {
        for i in 0..layers {
            let b = block_prefix(tower, i);
            m.insert(format!("{b}.gate1"), vec![]);
            let a = format!("{b}.mmadapter");
            linear_shapes(&mut m, &format!("{a}.img_proj_down"), h, width);
            linear_shapes(&mut m, &format!("{a}.img_proj_up"), width, h);
            mha_shapes(&mut m, &format!("{a}.multihead_attention"), h);
            m.insert(format!("{a}.gate1"), vec![]);
            // a shared mini-adapter is stored once, under the text block that owns it
            if tower == Tower::Text && has_share(cfg.sharing, tower) {
                let s = format!("{a}.BiShareAdapterxx");
                linear_shapes(&mut m, &format!("{s}.l1"), h / 2, h);
                linear_shapes(&mut m, &format!("{s}.l2"), h, h / 2);
                mha_shapes(&mut m, &format!("{s}.multihead_attention1"), h / 2);
                m.insert(format!("{s}.gate1"), vec![]);
            }
        }
    }
    m.insert("temp".into(), vec![]);
    m
}

/// Fresh trainable tensors, initialised as PyTorch builds HarMA's modules: linear layers
/// uniform in +-1/sqrt(fan_in) (weights and biases, `nn.Linear`'s default), attention input
/// projections Xavier-uniform with zero biases and output projections `nn.Linear`-uniform with
/// zero bias (`nn.MultiheadAttention`), the up projections (`img_proj_up`, `l2`) zero so a fresh
/// model equals its backbone, every gate 0.6 and `temp` 0.07. `uniform` draws from [0, 1).
pub fn init_tensors(
    clip: &ClipConfig,
    cfg: &AdapterConfig,
    uniform: &mut dyn FnMut() -> f64,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let shapes = expected_shapes(clip, cfg);
    let mut out = HashMap::with_capacity(shapes.len());
    for (name, shape) in &shapes {
        let n: usize = shape.iter().product();
        let constant = |v: f32| vec![v; n];
        let mut draw = |bound: f64| -> Vec<f32> {
            (0..n)
                .map(|_| ((2.0 * uniform() - 1.0) * bound) as f32)
                .collect()
        };
        let values = if name == "temp" {
            constant(0.07)
        } else if name.ends_with("gate1") {
            constant(0.6)
        } else if name.contains("img_proj_up.") || name.contains(".l2.") {
            constant(0.0)
        } else if name.ends_with("in_proj_weight") {
            // Xavier: fan_in d, fan_out 3d
            draw((6.0 / (shape[0] + shape[1]) as f64).sqrt())
        } else if name.ends_with("in_proj_bias") || name.ends_with("out_proj.bias") {
            constant(0.0)
        } else {
            // nn.Linear: kaiming_uniform(a = sqrt 5) = U(+-1/sqrt(fan_in)), bias alike
            let weight = name.replace(".bias", ".weight");
            let fan_in = shapes.get(&weight).map_or(shape[0], |w| w[1]);
            draw(1.0 / (fan_in as f64).sqrt())
        };
        out.insert(
            name.clone(),
            Tensor::from_vec(values, shape.clone(), device)?,
        );
    }
    Ok(out)
}

// Adapter layers read their tensors at every forward (`Linear::trained`, gates through
// `sigmoid` in `forward`), so optimiser updates to the variables take effect.

// In `compute`'s precision: under bf16 their products take bf16 operands (f32 weights and sums).

fn mha(vb: &VarBuilder, d: usize, heads: usize, compute: &Compute) -> Result<MultiHeadAttention> {
    Ok(MultiHeadAttention {
        in_proj: trained(vb, (3 * d, d), "in_proj_weight", "in_proj_bias", compute)?,
        out_proj: trained(vb, (d, d), "out_proj.weight", "out_proj.bias", compute)?,
        heads,
        kernels: compute.kernels,
    })
}

fn linear(vb: &VarBuilder, out: usize, inp: usize, compute: &Compute) -> Result<Linear> {
    trained(vb, (out, inp), "weight", "bias", compute)
}

fn trained(
    vb: &VarBuilder,
    (out, inp): (usize, usize),
    weight: &str,
    bias: &str,
    compute: &Compute,
) -> Result<Linear> {
    let w = vb.get((out, inp), weight)?;
    let b = vb.get(out, bias)?;
    Ok(Linear::trained(w, Some(b), compute.kernels).with_precision(compute)?)
}

/// A gate's raw (pre-sigmoid) scalar.
fn gate(vb: &VarBuilder, name: &str) -> Result<Tensor> {
    Ok(vb.get((), name)?)
}

/// HarMA's gated mix `s * a + (1 - s) * b` with `s = sigmoid(gate)` (`gate` a scalar): one
/// fused node on the fused kernels, Candle's ops otherwise.
pub fn gated_mix(gate: &Tensor, a: &Tensor, b: &Tensor, kernels: Kernels) -> Result<Tensor> {
    if kernels == Kernels::Fused && a.dims() == b.dims() && b.dtype() == DType::F32 {
        return Ok(a.contiguous()?.apply_op3(
            &b.contiguous()?,
            gate,
            harma_kernels::ops::GatedMix,
        )?);
    }
    let s = candle_nn::ops::sigmoid(gate)?;
    Ok((a.broadcast_mul(&s)? + b.broadcast_mul(&(1.0 - &s)?)?)?)
}

/// The mini-adapter: `u = s * mha1(l1(x)) + (1 - s) * l1(x)`; `x + l2(u)`.
#[derive(Debug, Clone)]
pub struct BiShareAdapter {
    l1: Linear,
    l2: Linear,
    attn: MultiHeadAttention,
    gate: Tensor,
}

impl BiShareAdapter {
    fn new(vb: VarBuilder, d: usize, heads: usize, compute: &Compute) -> Result<Self> {
        Ok(Self {
            l1: linear(&vb.pp("l1"), d / 2, d, compute)?,
            l2: linear(&vb.pp("l2"), d, d / 2, compute)?,
            attn: mha(&vb.pp("multihead_attention1"), d / 2, heads, compute)?,
            gate: gate(&vb, "gate1")?,
        })
    }

    /// [b, l, d] -> [b, l, d]
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let z = self.l1.forward(x)?;
        let t = self.attn.forward(&z, false)?;
        let u = gated_mix(&self.gate, &t, &z, self.l1.kernels)?;
        Ok((x + self.l2.forward(&u)?)?)
    }
}

/// The per-block adapter: down, GELU, attention (twice, around the optional mini-adapter),
/// gated skip from the down projection, up, residual.
#[derive(Debug, Clone)]
pub struct MmAdapter {
    down: Linear,
    up: Linear,
    attn: MultiHeadAttention,
    share: Option<BiShareAdapter>,
    gate: Tensor,
}

impl MmAdapter {
    /// [b, l, width] -> [b, l, width]
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let d = self.down.forward(x)?.gelu_erf()?;
        let mut y = self.attn.forward(&d, false)?;
        if let Some(s) = &self.share {
            y = s.forward(&y)?;
        }
        let y = self.attn.forward(&y, false)?;
        let y = gated_mix(&self.gate, &d, &y, self.down.kernels)?;
        Ok((x + self.up.forward(&y)?)?)
    }
}

/// All adapters of a model, plugged into the backbone as its [`BlockHook`].
#[derive(Debug, Clone)]
pub struct HarmaAdapters {
    pub config: AdapterConfig,
    vision: Vec<(MmAdapter, Tensor)>,
    text: Vec<(MmAdapter, Tensor)>,
    /// the contrastive temperature
    pub temp: Tensor,
}

impl HarmaAdapters {
    /// Build from tensors under the original's names (the `model.` prefix already removed),
    /// checking every expected key and shape first; the error lists all that is wrong.
    pub fn from_tensors(
        tensors: HashMap<String, Tensor>,
        clip: &ClipConfig,
        cfg: &AdapterConfig,
        compute: &Compute,
    ) -> Result<Self> {
        let device = &compute.device;
        let expected = expected_shapes(clip, cfg);
        let mut problems = Vec::new();
        for (k, shape) in &expected {
            match tensors.get(k) {
                None => problems.push(format!("missing `{k}`")),
                Some(t) if t.dims() != shape.as_slice() => problems.push(format!(
                    "`{k}`: file has {:?}, adapters need {shape:?}",
                    t.dims()
                )),
                _ => {}
            }
        }
        let mut unexpected: Vec<&String> = tensors
            .keys()
            .filter(|k| !expected.contains_key(*k))
            // with sharing across towers, PyTorch also saves the shared copy under vision keys
            .filter(|k| !(cfg.sharing == Sharing::Both && k.contains(".BiShareAdapterxx.")))
            .collect();
        unexpected.sort();
        problems.extend(unexpected.iter().map(|k| format!("unexpected `{k}`")));
        if !problems.is_empty() {
            let n = problems.len();
            problems.truncate(12);
            return Err(Error::Msg(format!(
                "adapters do not match the model and adapter settings ({n} problems): {}{}",
                problems.join(", "),
                if n > 12 { ", ..." } else { "" }
            )));
        }
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let mut towers = Vec::new();
        let mut shares: Vec<BiShareAdapter> = Vec::new();
        // text first: it owns the shared mini-adapters
        for (tower, width, layers) in [
            (Tower::Text, clip.text.width, clip.text.layers),
            (Tower::Vision, clip.vision.width, clip.vision.layers),
        ] {
            let mut blocks = Vec::new();
            for i in 0..layers {
                let b = vb.pp(block_prefix(tower, i));
                let a = b.pp("mmadapter");
                let share = if !has_share(cfg.sharing, tower) {
                    None
                } else if tower == Tower::Text {
                    let s = BiShareAdapter::new(
                        a.pp("BiShareAdapterxx"),
                        cfg.hidden,
                        cfg.share_heads,
                        compute,
                    )?;
                    shares.push(s.clone());
                    Some(s)
                } else {
                    shares.get(i).cloned()
                };
                let adapter = MmAdapter {
                    down: linear(&a.pp("img_proj_down"), cfg.hidden, width, compute)?,
                    up: linear(&a.pp("img_proj_up"), width, cfg.hidden, compute)?,
                    attn: mha(&a.pp("multihead_attention"), cfg.hidden, cfg.heads, compute)?,
                    share,
                    gate: gate(&a, "gate1")?,
                };
                blocks.push((adapter, gate(&b, "gate1")?));
            }
            towers.push(blocks);
        }
        let vision = towers.pop().unwrap_or_default();
        let text = towers.pop().unwrap_or_default();
        Ok(Self {
            config: cfg.clone(),
            vision,
            text,
            temp: vb.get((), "temp")?,
        })
    }
}

impl HarmaAdapters {
    /// Like [`HarmaAdapters::from_tensors`], with every tensor made a trainable [`Var`]
    /// (returned by name, for the optimiser and for saving): the backward pass reaches these
    /// and nothing else.
    pub fn trainable(
        tensors: HashMap<String, Tensor>,
        clip: &ClipConfig,
        cfg: &AdapterConfig,
        compute: &Compute,
    ) -> Result<(Self, Vec<(String, candle_core::Var)>)> {
        let device = &compute.device;
        let mut vars = Vec::with_capacity(tensors.len());
        let mut as_vars = HashMap::with_capacity(tensors.len());
        for (name, t) in tensors {
            let v = candle_core::Var::from_tensor(&t.to_device(device)?.to_dtype(DType::F32)?)?;
            as_vars.insert(name.clone(), v.as_tensor().clone());
            vars.push((name, v));
        }
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        Ok((Self::from_tensors(as_vars, clip, cfg, compute)?, vars))
    }
}

impl BlockHook for HarmaAdapters {
    fn mlp_out(&self, tower: Tower, block: usize, m: &Tensor) -> harma_clip::Result<Tensor> {
        let blocks = match tower {
            Tower::Vision => &self.vision,
            Tower::Text => &self.text,
        };
        let Some((adapter, a)) = blocks.get(block) else {
            return Ok(m.clone());
        };
        let adapted = adapter
            .forward(m)
            .map_err(|e| harma_clip::Error::Msg(e.to_string()))?;
        gated_mix(a, &adapted, m, adapter.down.kernels)
            .map_err(|e| harma_clip::Error::Msg(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tensors and values HarMA trains at ViT-B/32 are those of the original's model
    /// (tests/fixtures/counts.json, from make_init.py: 349 tensors, 5,934,397 values).
    #[test]
    fn vit_b32_trainable_parameter_count_is_the_originals() {
        let shapes = expected_shapes(&ClipConfig::vit_b32(), &AdapterConfig::default());
        let n: usize = shapes.values().map(|s| s.iter().product::<usize>()).sum();
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/counts.json");
        let counts: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(n as u64, counts["parameters"].as_u64().unwrap());
        assert_eq!(shapes.len() as u64, counts["tensors"].as_u64().unwrap());
    }

    #[test]
    fn sharing_topologies_change_only_the_mini_adapters() {
        let clip = ClipConfig::vit_b32();
        let count = |sharing| {
            let cfg = AdapterConfig {
                sharing,
                ..AdapterConfig::default()
            };
            expected_shapes(&clip, &cfg)
                .values()
                .map(|s| s.iter().product::<usize>())
                .sum::<usize>()
        };
        // 12 mini-adapters of 33,217 parameters each
        assert_eq!(count(Sharing::Text) - count(Sharing::None), 12 * 33_217);
        // shared, not duplicated, across the towers
        assert_eq!(count(Sharing::Both), count(Sharing::Text));
    }
}
