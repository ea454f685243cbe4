//! Loading image-caption annotations: HarMA's JSON files (train: one entry per caption with an
//! `image_id`; val/test: one entry per image with its captions) and a user's own CSV or JSONL
//! of `image,caption` lines (several lines may share an image). Captions are cleaned as
//! HarMA's `pre_caption`. Every problem names the file and the entry; with `skip_bad` the bad
//! entries are dropped and counted instead.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::caption::clean_caption;
use crate::{Error, Result};

/// How strictly to load.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Drop bad entries (with a count) instead of failing on the first.
    pub skip_bad: bool,
    /// Words kept per caption (HarMA: 30).
    pub max_words: usize,
    /// Check that every image file exists under this folder.
    pub image_root: Option<PathBuf>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            skip_bad: false,
            max_words: 30,
            image_root: None,
        }
    }
}

/// Image-caption pairs for training; `image_ids[k]` groups the pairs of one image
/// (the soft targets of the contrastive loss).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PairSet {
    pub images: Vec<PathBuf>,
    pub captions: Vec<String>,
    pub image_ids: Vec<i64>,
    /// entries dropped by `skip_bad`, with why
    pub skipped: Vec<String>,
}

/// An evaluation split: distinct images, their captions, and each caption's image index.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EvalSet {
    pub images: Vec<PathBuf>,
    pub captions: Vec<String>,
    pub txt2img: Vec<usize>,
    pub skipped: Vec<String>,
}

fn data_error(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::Data {
        path: path.display().to_string(),
        msg: msg.to_string(),
    }
}

/// Record a bad entry: an error, or (with `skip_bad`) a note.
fn bad(path: &Path, opts: &LoadOptions, skipped: &mut Vec<String>, msg: String) -> Result<()> {
    if opts.skip_bad {
        skipped.push(msg);
        Ok(())
    } else {
        Err(data_error(path, msg))
    }
}

fn read_json_list(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| data_error(path, format!("not valid JSON: {e}")))?;
    match v {
        serde_json::Value::Array(items) => Ok(items),
        _ => Err(data_error(path, "expected a JSON list of entries")),
    }
}

fn field<'a>(
    e: &'a serde_json::Value,
    name: &str,
) -> std::result::Result<&'a serde_json::Value, String> {
    e.get(name).ok_or_else(|| format!("missing field `{name}`"))
}

fn image_problem(opts: &LoadOptions, image: &str) -> Option<String> {
    let root = opts.image_root.as_ref()?;
    let p = root.join(image);
    (!p.is_file()).then(|| format!("image {} not found", p.display()))
}

/// HarMA's train format: `[{"caption", "image", "image_id", ...}]`, one entry per caption.
pub fn load_train_json(path: &Path, opts: &LoadOptions) -> Result<PairSet> {
    let mut set = PairSet::default();
    let mut id_of_image: HashMap<String, i64> = HashMap::new();
    for (k, e) in read_json_list(path)?.iter().enumerate() {
        let entry = (|| -> std::result::Result<(String, String, i64), String> {
            let caption = field(e, "caption")?
                .as_str()
                .ok_or("`caption` is not a string")?;
            let image = field(e, "image")?
                .as_str()
                .ok_or("`image` is not a string")?;
            let id = field(e, "image_id")?
                .as_i64()
                .ok_or("`image_id` is not an integer")?;
            let clean = clean_caption(caption, opts.max_words)
                .ok_or_else(|| format!("caption {caption:?} is empty after cleaning"))?;
            if let Some(p) = image_problem(opts, image) {
                return Err(p);
            }
            match id_of_image.get(image) {
                Some(&other) if other != id => Err(format!(
                    "image {image} has image_id {id} here and {other} in an earlier entry"
                )),
                _ => Ok((image.to_string(), clean, id)),
            }
        })();
        match entry {
            Ok((image, caption, id)) => {
                id_of_image.insert(image.clone(), id);
                set.images.push(PathBuf::from(image));
                set.captions.push(caption);
                set.image_ids.push(id);
            }
            Err(msg) => bad(path, opts, &mut set.skipped, format!("entry {k}: {msg}"))?,
        }
    }
    if set.captions.is_empty() {
        return Err(data_error(path, "no usable entries"));
    }
    Ok(set)
}

/// HarMA's val/test format: `[{"image", "caption": [...]}]`, one entry per image.
pub fn load_eval_json(path: &Path, opts: &LoadOptions) -> Result<EvalSet> {
    let mut set = EvalSet::default();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (k, e) in read_json_list(path)?.iter().enumerate() {
        let entry = (|| -> std::result::Result<(String, Vec<String>), String> {
            let image = field(e, "image")?
                .as_str()
                .ok_or("`image` is not a string")?;
            if let Some(first) = seen.get(image) {
                return Err(format!(
                    "image {image} is listed again (first in entry {first})"
                ));
            }
            let caps = field(e, "caption")?
                .as_array()
                .ok_or("`caption` is not a list")?;
            let mut clean = Vec::with_capacity(caps.len());
            for c in caps {
                let c = c.as_str().ok_or("a caption is not a string")?;
                clean.push(
                    clean_caption(c, opts.max_words)
                        .ok_or_else(|| format!("caption {c:?} is empty after cleaning"))?,
                );
            }
            if clean.is_empty() {
                return Err(format!("image {image} has no captions"));
            }
            if let Some(p) = image_problem(opts, image) {
                return Err(p);
            }
            Ok((image.to_string(), clean))
        })();
        match entry {
            Ok((image, captions)) => {
                seen.insert(image.clone(), k);
                let i = set.images.len();
                set.images.push(PathBuf::from(image));
                set.txt2img.extend(std::iter::repeat_n(i, captions.len()));
                set.captions.extend(captions);
            }
            Err(msg) => bad(path, opts, &mut set.skipped, format!("entry {k}: {msg}"))?,
        }
    }
    if set.images.is_empty() {
        return Err(data_error(path, "no usable entries"));
    }
    Ok(set)
}

/// A user's pairs: JSONL (`{"image": ..., "caption": ...}` per line) or CSV (`image,caption`
/// per line, an optional `image,caption` header, the caption may be double-quoted). Pairs of
/// the same image path share an image id.
pub fn load_pairs(path: &Path, opts: &LoadOptions) -> Result<PairSet> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    let jsonl = path.extension().and_then(|e| e.to_str()) == Some("jsonl");
    let mut set = PairSet::default();
    let mut ids: HashMap<String, i64> = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let lineno = n + 1;
        if line.trim().is_empty() || (!jsonl && n == 0 && line.trim() == "image,caption") {
            continue;
        }
        let parsed = if jsonl {
            serde_json::from_str::<serde_json::Value>(line)
                .map_err(|e| format!("not valid JSON: {e}"))
                .and_then(|v| {
                    let image = field(&v, "image")?
                        .as_str()
                        .ok_or("`image` is not a string")?;
                    let caption = field(&v, "caption")?
                        .as_str()
                        .ok_or("`caption` is not a string")?;
                    Ok((image.to_string(), caption.to_string()))
                })
        } else {
            match line.split_once(',') {
                Some((image, caption)) => {
                    let caption = caption.trim();
                    let caption = caption
                        .strip_prefix('"')
                        .and_then(|c| c.strip_suffix('"'))
                        .map(|c| c.replace("\"\"", "\""))
                        .unwrap_or_else(|| caption.to_string());
                    Ok((image.trim().to_string(), caption))
                }
                None => Err("expected `image,caption`".to_string()),
            }
        };
        let checked = parsed.and_then(|(image, caption)| {
            if image.is_empty() {
                return Err("empty image path".to_string());
            }
            let clean = clean_caption(&caption, opts.max_words)
                .ok_or_else(|| format!("caption {caption:?} is empty after cleaning"))?;
            if let Some(p) = image_problem(opts, &image) {
                return Err(p);
            }
            Ok((image, clean))
        });
        match checked {
            Ok((image, caption)) => {
                let next = ids.len() as i64;
                let id = *ids.entry(image.clone()).or_insert(next);
                set.images.push(PathBuf::from(image));
                set.captions.push(caption);
                set.image_ids.push(id);
            }
            Err(msg) => bad(
                path,
                opts,
                &mut set.skipped,
                format!("line {lineno}: {msg}"),
            )?,
        }
    }
    if set.captions.is_empty() {
        return Err(data_error(path, "no usable lines"));
    }
    Ok(set)
}

/// Whether `path` is a user pair file (`.csv` or `.jsonl`) rather than HarMA's JSON.
pub fn is_pair_file(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("csv" | "jsonl")
    )
}

/// Training pairs from HarMA's train JSON, or a user's CSV/JSONL (by extension).
pub fn load_training(path: &Path, opts: &LoadOptions) -> Result<PairSet> {
    if is_pair_file(path) {
        load_pairs(path, opts)
    } else {
        load_train_json(path, opts)
    }
}

/// An evaluation split from HarMA's val/test JSON, or a user's CSV/JSONL, whose lines are
/// grouped by image (in order of first appearance).
pub fn load_evaluation(path: &Path, opts: &LoadOptions) -> Result<EvalSet> {
    if !is_pair_file(path) {
        return load_eval_json(path, opts);
    }
    let pairs = load_pairs(path, opts)?;
    let mut set = EvalSet {
        skipped: pairs.skipped,
        ..EvalSet::default()
    };
    for (image, id) in pairs.images.iter().zip(&pairs.image_ids) {
        // ids count up from 0 in order of first appearance
        if *id as usize == set.images.len() {
            set.images.push(image.clone());
        }
    }
    // captions grouped by image, so each image's captions are contiguous as in HarMA's files
    let mut order: Vec<usize> = (0..pairs.captions.len()).collect();
    order.sort_by_key(|&k| pairs.image_ids[k]);
    for k in order {
        set.captions.push(pairs.captions[k].clone());
        set.txt2img.push(pairs.image_ids[k] as usize);
    }
    Ok(set)
}

/// The `image` field of every entry of HarMA's train or val/test JSON (both formats name it
/// so), in entry order with repeats, without reading the images or the captions: what a
/// download tool needs to know which images a split uses. An entry without a string `image`
/// is an error naming the file and the entry.
pub fn image_names(path: &Path) -> Result<Vec<String>> {
    read_json_list(path)?
        .iter()
        .enumerate()
        .map(|(k, e)| {
            field(e, "image")
                .and_then(|v| {
                    v.as_str()
                        .ok_or_else(|| "`image` is not a string".to_string())
                })
                .map(str::to_string)
                .map_err(|msg| data_error(path, format!("entry {k}: {msg}")))
        })
        .collect()
}
