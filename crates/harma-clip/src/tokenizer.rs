//! open_clip's CLIP tokenizer (`SimpleTokenizer` with `clean='lower'`) on the `tokenizers` crate:
//! byte-level BPE over CLIP's 49,408-entry vocabulary, `<start_of_text>` + tokens +
//! `<end_of_text>`, zero-padded to the context length, truncated so EOT stays last.
//!
//! Reference: open_clip `src/open_clip/tokenizer.py`. The vocabulary is built from
//! `data/clip/bpe_simple_vocab_16e6.txt.gz` (open_clip, MIT), embedded in the binary.
//! Text cleaning follows `basic_clean` + `whitespace_clean` + `lower`; of ftfy's `fix_text` the
//! parts that change real captions are done (NFC, curly quotes, ligatures, full-width forms,
//! control characters, HTML entities); repairing mojibake is not.

use std::io::Read;

use tokenizers::Tokenizer;
use unicode_normalization::UnicodeNormalization;

use crate::{Error, Result};

/// CLIP's BPE merges, gzip-compressed, as shipped in the open_clip_torch package.
pub const BPE_GZ: &[u8] = include_bytes!("../../../data/clip/bpe_simple_vocab_16e6.txt.gz");

pub const SOT: u32 = 49406;
pub const EOT: u32 = 49407;
pub const VOCAB_SIZE: usize = 49408;
const N_MERGES: usize = 49152 - 256 - 2;
const SPLIT_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// GPT-2's reversible byte -> printable character map, in its insertion order.
fn bytes_to_unicode() -> Vec<(u8, char)> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut out: Vec<(u8, char)> = printable
        .iter()
        .map(|&b| (b as u8, char::from_u32(b).unwrap()))
        .collect();
    let mut n = 0;
    for b in 0u32..256 {
        if !printable.contains(&b) {
            out.push((b as u8, char::from_u32(256 + n).unwrap()));
            n += 1;
        }
    }
    out
}

/// The CLIP tokenizer.
pub struct ClipTokenizer {
    inner: Tokenizer,
    pub context_length: usize,
}

impl ClipTokenizer {
    /// The tokenizer with CLIP's vocabulary (embedded; no file or network needed).
    pub fn new(context_length: usize) -> Result<Self> {
        let mut text = String::new();
        flate2::read::GzDecoder::new(BPE_GZ)
            .read_to_string(&mut text)
            .map_err(|e| Error::Tokenizer(format!("embedded BPE merges: {e}")))?;
        let merges: Vec<(String, String)> = text
            .split('\n')
            .skip(1)
            .take(N_MERGES)
            .map(|l| {
                let mut it = l.split(' ');
                (
                    it.next().unwrap_or_default().to_string(),
                    it.next().unwrap_or_default().to_string(),
                )
            })
            .collect();
        let mut vocab: Vec<String> = bytes_to_unicode()
            .iter()
            .map(|(_, c)| c.to_string())
            .collect();
        let with_suffix: Vec<String> = vocab.iter().map(|v| format!("{v}</w>")).collect();
        vocab.extend(with_suffix);
        vocab.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        vocab.push("<start_of_text>".into());
        vocab.push("<end_of_text>".into());
        if vocab.len() != VOCAB_SIZE {
            return Err(Error::Tokenizer(format!(
                "vocabulary has {} entries, expected {VOCAB_SIZE}",
                vocab.len()
            )));
        }
        let vocab_map: serde_json::Map<String, serde_json::Value> = vocab
            .iter()
            .enumerate()
            .map(|(i, v)| (v.clone(), serde_json::Value::from(i)))
            .collect();
        let special = |id: u32, content: &str| {
            serde_json::json!({"id": id, "content": content, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        };
        let spec = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [special(SOT, "<start_of_text>"), special(EOT, "<end_of_text>")],
            "normalizer": null,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": SPLIT_PATTERN},
                 "behavior": "Removed", "invert": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false,
                 "use_regex": false}
            ]},
            "post_processor": null,
            "decoder": null,
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": "", "end_of_word_suffix": "</w>",
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab_map,
                "merges": merges.iter().map(|(a, b)| vec![a.clone(), b.clone()]).collect::<Vec<_>>()}
        });
        let inner: Tokenizer = spec
            .to_string()
            .parse()
            .map_err(|e| Error::Tokenizer(format!("building the BPE model: {e}")))?;
        Ok(Self {
            inner,
            context_length,
        })
    }

    /// BPE ids of the cleaned text, without SOT/EOT.
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>> {
        let cleaned = clean(text);
        let enc = self
            .inner
            .encode(cleaned.as_str(), false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// One row of `context_length` ids: SOT, tokens, EOT, zeros; truncated keeping EOT last.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(self.context_length);
        ids.push(SOT);
        ids.extend(self.encode_raw(text)?);
        ids.push(EOT);
        if ids.len() > self.context_length {
            ids.truncate(self.context_length);
            ids[self.context_length - 1] = EOT;
        }
        ids.resize(self.context_length, 0);
        Ok(ids)
    }

    /// Rows for many texts, flattened row-major ([n, context_length]).
    pub fn encode_batch(&self, texts: &[String]) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(texts.len() * self.context_length);
        for t in texts {
            out.extend(self.encode(t)?);
        }
        Ok(out)
    }
}

/// The parts of ftfy's `fix_text` that matter for captions, then HTML unescaping,
/// whitespace collapsing, stripping and lower-casing (open_clip `_clean_lower`).
pub fn clean(text: &str) -> String {
    let mut s = String::with_capacity(text.len());
    let text = text.replace("\r\n", "\n");
    for c in text.chars() {
        match c {
            // ftfy uncurl_quotes
            '\u{02bc}' | '\u{2018}'..='\u{201b}' => s.push('\''),
            '\u{201c}'..='\u{201f}' => s.push('"'),
            // ftfy fix_latin_ligatures
            '\u{fb00}'..='\u{fb06}'
            | '\u{0132}'
            | '\u{0133}'
            | '\u{0149}'
            | '\u{01c4}'..='\u{01cc}'
            | '\u{01f1}'..='\u{01f3}' => s.extend(c.to_string().nfkc()),
            // ftfy fix_character_width: full-width ASCII and the ideographic space
            '\u{3000}' => s.push(' '),
            '\u{ff01}'..='\u{ff5e}' => s.push(char::from_u32(c as u32 - 0xff01 + 0x21).unwrap()),
            // ftfy remove_control_chars (tab, newline, form feed and carriage return stay)
            '\u{00}'..='\u{08}'
            | '\u{0b}'
            | '\u{0e}'..='\u{1f}'
            | '\u{7f}'
            | '\u{206a}'..='\u{206f}'
            | '\u{feff}'
            | '\u{fff9}'..='\u{fffc}' => {}
            _ => s.push(c),
        }
    }
    let s: String = s.nfc().collect();
    let s = html_unescape(&html_unescape(&s));
    let collapsed = s.split_whitespace().collect::<Vec<_>>().join(" ");
    collapsed.to_lowercase()
}

/// Python's `html.unescape` for numeric references and the common named ones.
fn html_unescape(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    const NAMED: &[(&str, &str)] = &[
        ("amp;", "&"),
        ("lt;", "<"),
        ("gt;", ">"),
        ("quot;", "\""),
        ("apos;", "'"),
        ("nbsp;", "\u{a0}"),
        ("deg;", "°"),
        ("amp", "&"),
        ("lt", "<"),
        ("gt", ">"),
        ("quot", "\""),
    ];
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(num) = rest.strip_prefix('#') {
            let (digits, radix) = match num.strip_prefix(['x', 'X']) {
                Some(h) => (h, 16),
                None => (num, 10),
            };
            let len = digits
                .chars()
                .take_while(|c| c.is_digit(radix))
                .map(char::len_utf8)
                .sum::<usize>();
            if len > 0 {
                let code = u32::from_str_radix(&digits[..len], radix).ok();
                let c = code.and_then(char::from_u32).unwrap_or('\u{fffd}');
                out.push(c);
                let consumed = num.len() - digits.len() + len;
                rest = &num[consumed..];
                rest = rest.strip_prefix(';').unwrap_or(rest);
                continue;
            }
        } else if let Some((name, rep)) = NAMED.iter().find(|(n, _)| rest.starts_with(n)) {
            out.push_str(rep);
            rest = &rest[name.len()..];
            continue;
        }
        out.push('&');
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_map_is_a_bijection_onto_256_chars() {
        let m = bytes_to_unicode();
        assert_eq!(m.len(), 256);
        let mut chars: Vec<char> = m.iter().map(|(_, c)| *c).collect();
        chars.sort();
        chars.dedup();
        assert_eq!(chars.len(), 256);
        assert_eq!(m[0], (b'!', '!'));
        assert_eq!(m[188], (0, '\u{100}'));
    }

    #[test]
    fn cleaning_collapses_space_and_lowercases() {
        assert_eq!(clean("  Many\tGREEN\n trees  "), "many green trees");
        assert_eq!(clean("a &amp;amp; b"), "a & b");
        assert_eq!(clean("\u{201c}Hi\u{201d} \u{fb01}eld"), "\"hi\" field");
    }

    #[test]
    fn encodes_sot_text_eot_and_pads() {
        let t = ClipTokenizer::new(77).unwrap();
        let ids = t.encode("a photo").unwrap();
        assert_eq!(ids.len(), 77);
        assert_eq!(ids[0], SOT);
        // "a</w>" and "photo</w>" are single tokens of CLIP's vocabulary
        assert_eq!(&ids[1..4], &[320, 1125, EOT]);
        assert!(ids[4..].iter().all(|&i| i == 0));
        let long = "word ".repeat(200);
        let ids = t.encode(&long).unwrap();
        assert_eq!(ids[76], EOT);
    }
}
