//! An MLX model's Hugging Face tokenizer, read in Rust: prompt tokenizing (client text never
//! becomes a special token), each token's bytes for the streaming text assembler, and the
//! chat template and special tokens from `tokenizer_config.json` / `chat_template.jinja`.

use std::path::Path;

use tokenizers::{DecoderWrapper, Tokenizer};

use crate::engine::{EngineError, TokenId};

/// A model folder's tokenizer and template facts.
pub struct MlxTokenizer {
    /// Special tokens are parsed (template text).
    with_special: Tokenizer,
    /// Special tokens stay text (what users wrote).
    literal: Tokenizer,
    /// Every token's bytes as it appears in generated text (control tokens: nothing unless a
    /// rendered marker).
    pieces: Vec<Vec<u8>>,
    /// Texts of the special (control) tokens.
    pub control_texts: Vec<String>,
    pub template: Option<String>,
    pub bos: String,
    pub eos: String,
    bos_id: Option<TokenId>,
}

/// GPT-2's byte-to-character table, inverted: byte-level BPE writes each byte as a printable
/// character.
fn byte_level_decoder() -> std::collections::HashMap<char, u8> {
    let mut bytes: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars = bytes.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bytes.contains(&b) {
            bytes.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    bytes
        .into_iter()
        .zip(chars)
        .filter_map(|(b, c)| char::from_u32(c).map(|c| (c, b as u8)))
        .collect()
}

/// A token's text as bytes: byte-level BPE maps characters back to bytes; SentencePiece-style
/// vocabularies write spaces as `▁` and raw bytes as `<0xAB>`.
fn piece_bytes(token: &str, byte_level: Option<&std::collections::HashMap<char, u8>>) -> Vec<u8> {
    if let Some(map) = byte_level {
        return token
            .chars()
            .map(|c| map.get(&c).copied().unwrap_or(b'?'))
            .collect();
    }
    if let Some(hex) = token.strip_prefix("<0x").and_then(|t| t.strip_suffix('>')) {
        if let Ok(b) = u8::from_str_radix(hex, 16) {
            return vec![b];
        }
    }
    token.replace('\u{2581}', " ").into_bytes()
}

fn json(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// A token field of `tokenizer_config.json`: a string or `{"content": …}`.
fn token_field(cfg: &serde_json::Value, key: &str) -> String {
    match cfg.get(key) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(v) => v
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or_default()
            .to_string(),
        None => String::new(),
    }
}

impl MlxTokenizer {
    /// Reads `tokenizer.json` and the template from a model folder; `rendered` are marker
    /// texts that stay visible in output even when they are special tokens.
    pub fn load(dir: &Path, rendered: &[String]) -> Result<Self, EngineError> {
        let file = dir.join("tokenizer.json");
        let with_special = Tokenizer::from_file(&file)
            .map_err(|e| EngineError::Load(format!("{}: {e}", file.display())))?;
        let mut literal = with_special.clone();
        literal.set_encode_special_tokens(true);
        let byte_level = matches!(
            with_special.get_decoder(),
            Some(DecoderWrapper::ByteLevel(_))
        )
        .then(byte_level_decoder);
        let added = with_special.get_added_tokens_decoder();
        let n = with_special.get_vocab_size(true);
        let mut pieces = Vec::with_capacity(n);
        let mut control_texts = Vec::new();
        for id in 0..n as u32 {
            let Some(text) = with_special.id_to_token(id) else {
                pieces.push(Vec::new());
                continue;
            };
            match added.get(&id) {
                Some(a) if a.special => {
                    control_texts.push(text.clone());
                    let shown = rendered.contains(&text);
                    pieces.push(if shown { text.into_bytes() } else { Vec::new() });
                }
                Some(_) => pieces.push(text.into_bytes()),
                None => pieces.push(piece_bytes(&text, byte_level.as_ref())),
            }
        }
        control_texts.sort();
        control_texts.dedup();
        let cfg = json(&dir.join("tokenizer_config.json")).unwrap_or_default();
        let template = std::fs::read_to_string(dir.join("chat_template.jinja"))
            .ok()
            .or_else(|| {
                cfg.get("chat_template")
                    .and_then(|t| t.as_str())
                    .map(String::from)
            })
            .filter(|t| !t.trim().is_empty());
        let bos = token_field(&cfg, "bos_token");
        let bos_id = (!bos.is_empty())
            .then(|| with_special.token_to_id(&bos))
            .flatten()
            .map(|id| id as TokenId);
        Ok(Self {
            with_special,
            literal,
            pieces,
            control_texts,
            template,
            eos: token_field(&cfg, "eos_token"),
            bos,
            bos_id,
        })
    }

    /// Token ids of `text`; `special` parses special-token text, `add_bos` prepends BOS when
    /// the model has one.
    pub fn encode(&self, text: &str, add_bos: bool, special: bool) -> Vec<TokenId> {
        let tok = if special {
            &self.with_special
        } else {
            &self.literal
        };
        let mut out: Vec<TokenId> = Vec::new();
        if add_bos {
            if let Some(b) = self.bos_id {
                out.push(b);
            }
        }
        if let Ok(enc) = tok.encode_fast(text, false) {
            out.extend(enc.get_ids().iter().map(|&i| i as TokenId));
        }
        if add_bos && out.len() > 1 && Some(out[1]) == self.bos_id {
            out.remove(0);
        }
        out
    }

    /// The bytes token `id` adds to generated text.
    pub fn piece(&self, id: TokenId) -> &[u8] {
        usize::try_from(id)
            .ok()
            .and_then(|i| self.pieces.get(i))
            .map_or(&[][..], Vec::as_slice)
    }

    /// Tokens in the vocabulary, added ones included.
    pub fn vocab_size(&self) -> u32 {
        self.pieces.len() as u32
    }

    /// Whether `text` is one token of the vocabulary.
    pub fn has_token(&self, text: &str) -> bool {
        self.with_special.token_to_id(text).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_pieces_decode_to_utf8_bytes() {
        let map = byte_level_decoder();
        assert_eq!(map.len(), 256);
        assert_eq!(piece_bytes("Ġhello", Some(&map)), b" hello");
        assert_eq!(piece_bytes("Ċ", Some(&map)), b"\n");
        // "é" is two bytes, written as two characters.
        assert_eq!(piece_bytes("Ã©", Some(&map)), "é".as_bytes());
        assert_eq!(piece_bytes("\u{2581}world", None), b" world");
        assert_eq!(piece_bytes("<0x0A>", None), b"\n");
    }
}
