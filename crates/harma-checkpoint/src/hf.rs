//! Hugging Face transformers `CLIPModel` names to open_clip's: q/k/v projections packed into
//! `in_proj`, the projections transposed (mapping as in transformers' `modeling_clip.py`).

use std::collections::HashMap;

use candle_core::Tensor;

use crate::{Error, Result};

/// Rename a Hugging Face transformers CLIP state dict to open_clip's layout. Keys it does not
/// know are passed through unchanged (the caller reports them).
pub fn to_open_clip(mut hf: HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
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
