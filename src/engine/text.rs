//! Turns a stream of token bytes into text that is safe to send: whole UTF-8 characters only,
//! and nothing that might turn out to be the start of a stop string.

/// Per-request output assembler.
#[derive(Debug, Default)]
pub struct TextAssembler {
    /// Bytes of a character split across tokens, waiting for the rest.
    partial: Vec<u8>,
    /// Decoded text held back because it could begin a stop string.
    held: String,
    stops: Vec<String>,
}

/// What one push produced.
#[derive(Debug, PartialEq, Eq)]
pub struct Pushed {
    /// Text now safe to send (may be empty).
    pub text: String,
    /// A stop string matched: generation must end; `text` is everything before it.
    pub stopped: bool,
}

impl TextAssembler {
    /// An assembler that ends at any of `stops` (empty strings are ignored).
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            ..Self::default()
        }
    }

    /// Adds one token's bytes.
    pub fn push(&mut self, bytes: &[u8]) -> Pushed {
        self.partial.extend_from_slice(bytes);
        let mut consumed = 0;
        loop {
            match std::str::from_utf8(&self.partial[consumed..]) {
                Ok(s) => {
                    self.held.push_str(s);
                    consumed = self.partial.len();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    let s = std::str::from_utf8(&self.partial[consumed..consumed + valid])
                        .expect("valid prefix");
                    self.held.push_str(s);
                    consumed += valid;
                    match e.error_len() {
                        // Truly invalid bytes: replace them and carry on.
                        Some(n) => {
                            self.held.push(char::REPLACEMENT_CHARACTER);
                            consumed += n;
                        }
                        // An incomplete character at the end: wait for the next token.
                        None => break,
                    }
                }
            }
        }
        self.partial.drain(..consumed);
        self.release()
    }

    /// Flushes what is held at the end of generation (a half character becomes U+FFFD).
    pub fn finish(&mut self) -> String {
        if !self.partial.is_empty() {
            self.held.push(char::REPLACEMENT_CHARACTER);
            self.partial.clear();
        }
        std::mem::take(&mut self.held)
    }

    fn release(&mut self) -> Pushed {
        // Earliest stop string wins.
        if let Some(pos) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let text = self.held[..pos].to_string();
            // Everything after the stop, complete or not, is discarded.
            self.held.clear();
            self.partial.clear();
            return Pushed {
                text,
                stopped: true,
            };
        }
        // Keep the longest tail that is a prefix of some stop string.
        let keep = self
            .stops
            .iter()
            .map(|s| longest_suffix_prefix(&self.held, s))
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let text = self.held[..cut].to_string();
        self.held.drain(..cut);
        Pushed {
            text,
            stopped: false,
        }
    }
}

/// Length of the longest suffix of `text` that is a proper prefix of `stop`, on a char boundary.
fn longest_suffix_prefix(text: &str, stop: &str) -> usize {
    let max = text.len().min(stop.len().saturating_sub(1));
    (1..=max)
        .rev()
        .find(|&n| {
            let start = text.len() - n;
            text.is_char_boundary(start) && stop.as_bytes().starts_with(&text.as_bytes()[start..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&[u8]]) -> (Vec<String>, bool, String) {
        let mut a = TextAssembler::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = Vec::new();
        for p in pieces {
            let r = a.push(p);
            out.push(r.text);
            if r.stopped {
                return (out, true, String::new());
            }
        }
        let rest = a.finish();
        (out, false, rest)
    }

    #[test]
    fn multibyte_split_across_tokens_is_never_broken() {
        let euro = "€".as_bytes(); // 3 bytes
        let (out, stopped, rest) = run(&[], &[b"a", &euro[..1], &euro[1..2], &euro[2..], b"b"]);
        assert!(!stopped);
        assert_eq!(out, ["a", "", "", "€", "b"]);
        assert_eq!(rest, "");
        let emoji = "🦀".as_bytes();
        let (out, _, _) = run(&[], &[&emoji[..2], &emoji[2..]]);
        assert_eq!(out, ["", "🦀"]);
    }

    #[test]
    fn invalid_and_truncated_bytes_become_replacement() {
        let (out, _, rest) = run(&[], &[b"a\xffb", b"\xe2\x82"]);
        assert_eq!(out, ["a\u{fffd}b", ""]);
        assert_eq!(rest, "\u{fffd}");
    }

    #[test]
    fn stop_string_across_tokens_is_cut_and_not_emitted() {
        let (out, stopped, _) = run(&["END"], &[b"hello E", b"N", b"D more"]);
        assert!(stopped);
        assert_eq!(out.concat(), "hello ");
        assert_eq!(out, ["hello ", "", ""]);
    }

    #[test]
    fn false_start_of_stop_is_released() {
        let (out, stopped, rest) = run(&["END"], &[b"E", b"N", b"X", b"!"]);
        assert!(!stopped);
        assert_eq!(out, ["", "", "ENX", "!"]);
        assert_eq!(rest, "");
        let (out, _, rest) = run(&["END"], &[b"abc E"]);
        assert_eq!(out, ["abc "]);
        assert_eq!(rest, "E");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let (out, stopped, _) = run(&["world", "lo"], &[b"hello world"]);
        assert!(stopped);
        assert_eq!(out, ["hel"]);
    }

    #[test]
    fn multibyte_stop_strings() {
        let (out, stopped, _) = run(&["。"], &[b"ok", "。".as_bytes(), b"x"]);
        assert!(stopped);
        assert_eq!(out.concat(), "ok");
    }
}
