//! Sizes of the open_clip CLIP towers, with named presets.
//!
//! Follows open_clip's `model_configs/ViT-B-32.json` and `ViT-B-32-quickgelu.json`
//! (<https://github.com/mlfoundations/open_clip>).

use crate::{Error, Result};

/// The MLP activation of every residual block of both towers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `x * sigmoid(1.702 x)`: OpenAI CLIP and its fine-tunes (GeoRSCLIP, RemoteCLIP).
    QuickGelu,
    /// Exact erf GELU: open_clip's own ViT-B-32 config (LAION weights).
    Gelu,
}

/// The image tower: a ViT with a class token and a final projection.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct VisionConfig {
    pub image_size: usize,
    pub patch_size: usize,
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    pub mlp_dim: usize,
}

impl VisionConfig {
    /// Patches along one side of the image.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Tokens per image: one per patch plus the class token.
    pub fn seq_len(&self) -> usize {
        self.grid() * self.grid() + 1
    }
}

/// The text tower: a causal transformer pooled at the end-of-text token.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct TextConfig {
    pub context_length: usize,
    pub vocab_size: usize,
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    pub mlp_dim: usize,
}

/// A whole CLIP model.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct ClipConfig {
    pub embed_dim: usize,
    pub vision: VisionConfig,
    pub text: TextConfig,
    #[serde(default = "default_activation")]
    pub activation: Activation,
    /// Layer-norm epsilon (PyTorch's default).
    #[serde(default = "default_ln_eps")]
    pub ln_eps: f64,
}

fn default_activation() -> Activation {
    Activation::QuickGelu
}

fn default_ln_eps() -> f64 {
    1e-5
}

/// Names accepted by [`ClipConfig::preset`].
pub const PRESETS: &[&str] = &["ViT-B-32", "ViT-B-32-quickgelu", "tiny", "tiny-quickgelu"];

impl ClipConfig {
    /// open_clip `ViT-B-32`: exact GELU (LAION weights).
    pub fn vit_b32() -> Self {
        Self {
            embed_dim: 512,
            vision: VisionConfig {
                image_size: 224,
                patch_size: 32,
                width: 768,
                layers: 12,
                heads: 12,
                mlp_dim: 3072,
            },
            text: TextConfig {
                context_length: 77,
                vocab_size: 49408,
                width: 512,
                layers: 12,
                heads: 8,
                mlp_dim: 2048,
            },
            activation: Activation::Gelu,
            ln_eps: 1e-5,
        }
    }

    /// open_clip `ViT-B-32-quickgelu`: OpenAI, GeoRSCLIP and RemoteCLIP weights.
    pub fn vit_b32_quickgelu() -> Self {
        Self {
            activation: Activation::QuickGelu,
            ..Self::vit_b32()
        }
    }

    /// A small model for tests and the offline demo: 64x64 images, 2 blocks per tower.
    /// The vocabulary and context stay CLIP's so the real tokenizer drives it.
    pub fn tiny(activation: Activation) -> Self {
        Self {
            embed_dim: 32,
            vision: VisionConfig {
                image_size: 64,
                patch_size: 16,
                width: 64,
                layers: 2,
                heads: 4,
                mlp_dim: 256,
            },
            text: TextConfig {
                context_length: 77,
                vocab_size: 49408,
                width: 48,
                layers: 2,
                heads: 4,
                mlp_dim: 192,
            },
            activation,
            ln_eps: 1e-5,
        }
    }

    /// A preset by its open_clip name (see [`PRESETS`]), or a JSON file of sizes
    /// (`{"embed_dim", "vision": {...}, "text": {...}, "activation": "quick_gelu"|"gelu"}`).
    pub fn preset(name: &str) -> Result<Self> {
        if name.ends_with(".json") {
            let text = std::fs::read_to_string(name)
                .map_err(|e| Error::Msg(format!("cannot read architecture file {name}: {e}")))?;
            return serde_json::from_str(&text)
                .map_err(|e| Error::Msg(format!("architecture file {name}: {e}")));
        }
        match name {
            "ViT-B-32" => Ok(Self::vit_b32()),
            "ViT-B-32-quickgelu" => Ok(Self::vit_b32_quickgelu()),
            "tiny" => Ok(Self::tiny(Activation::Gelu)),
            "tiny-quickgelu" => Ok(Self::tiny(Activation::QuickGelu)),
            other => Err(Error::Msg(format!(
                "unknown architecture `{other}`: expected one of {} or a .json config",
                PRESETS.join(", ")
            ))),
        }
    }
}
