//! Keeps a thinking model's reasoning apart from its answer. Models that think write
//! `<think>…</think>` (or their family's markers, see [`THINK_MARKERS`]) before answering, or
//! (when their template opens the block in the prompt, as DeepSeek-R1's and Qwen3's do) start
//! inside it and write only the closing marker. The reasoning goes to `reasoning_content`,
//! never into `content`, streamed piece by piece with only a possible marker held back.

use super::dialect::{ThinkMarkers, THINK_MARKERS};

/// A piece of an answer: reasoning or content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Reasoning(String),
    Content(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing but whitespace yet: the answer may open a thinking block.
    Start,
    Thinking,
    /// Just out of a thinking block: the whitespace before the answer is dropped.
    AfterThinking,
    Answering,
}

/// Splits one answer into reasoning and content as it streams.
#[derive(Debug)]
pub struct ReasoningSplitter {
    state: State,
    buf: String,
    markers: ThinkMarkers,
}

impl ReasoningSplitter {
    /// A splitter for `<think>` answers whose prompt ended inside a thinking block
    /// (`prompt_opened`) or not.
    pub fn new(prompt_opened: bool) -> Self {
        Self::with_markers(THINK_MARKERS[0], prompt_opened)
    }

    /// A splitter for a model family's own thinking markers.
    pub fn with_markers(markers: ThinkMarkers, prompt_opened: bool) -> Self {
        Self {
            markers,
            state: if prompt_opened {
                State::Thinking
            } else {
                State::Start
            },
            buf: String::new(),
        }
    }

    /// Whether a rendered prompt leaves the model inside a thinking block.
    pub fn prompt_opens_thinking(prompt: &str, markers: ThinkMarkers) -> bool {
        prompt.trim_end().ends_with(markers.open)
    }

    /// Takes the next piece of the answer.
    pub fn push(&mut self, text: &str) -> Vec<Part> {
        self.buf.push_str(text);
        let (open, close) = (self.markers.open, self.markers.close);
        let mut out = Vec::new();
        loop {
            match self.state {
                State::Start => {
                    let trimmed = self.buf.trim_start();
                    if let Some(rest) = trimmed.strip_prefix(open) {
                        self.buf = rest.to_string();
                        self.state = State::Thinking;
                    } else if open.starts_with(trimmed) {
                        return out; // maybe the opening marker, still arriving
                    } else {
                        self.state = State::Answering;
                    }
                }
                State::Thinking => match self.buf.find(close) {
                    Some(i) => {
                        let reasoning: String = self.buf.drain(..i).collect();
                        push(&mut out, Part::Reasoning(reasoning));
                        self.buf.drain(..close.len());
                        self.state = State::AfterThinking;
                    }
                    None => {
                        let keep = held_back(&self.buf, close);
                        let reasoning: String = self.buf.drain(..self.buf.len() - keep).collect();
                        push(&mut out, Part::Reasoning(reasoning));
                        return out;
                    }
                },
                State::AfterThinking => {
                    // The answer conventionally starts after a blank line.
                    self.buf = self.buf.trim_start().to_string();
                    if self.buf.is_empty() {
                        return out;
                    }
                    self.state = State::Answering;
                }
                State::Answering => {
                    let content = std::mem::take(&mut self.buf);
                    push(&mut out, Part::Content(content));
                    return out;
                }
            }
        }
    }

    /// The answer ended: whatever was held back.
    pub fn finish(&mut self) -> Vec<Part> {
        let rest = std::mem::take(&mut self.buf);
        let mut out = Vec::new();
        match self.state {
            State::Thinking => push(&mut out, Part::Reasoning(rest)),
            _ => push(&mut out, Part::Content(rest)),
        }
        out
    }
}

fn push(out: &mut Vec<Part>, part: Part) {
    match &part {
        Part::Reasoning(t) | Part::Content(t) if t.is_empty() => {}
        _ => out.push(part),
    }
}

/// How much of the end of `buf` could be the start of `marker` (what a streaming parser must
/// hold back until the next piece says whether the marker follows).
pub(super) fn held_back(buf: &str, marker: &str) -> usize {
    (1..marker.len())
        .rev()
        .filter(|&k| marker.is_char_boundary(k))
        .find(|&k| buf.ends_with(&marker[..k]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reasoning and content, fed whole and cut at every character boundary.
    fn split_every_way(text: &str, opened: bool) -> (String, String) {
        split_with(THINK_MARKERS[0], text, opened)
    }

    fn split_with(markers: ThinkMarkers, text: &str, opened: bool) -> (String, String) {
        let run = |pieces: Vec<&str>| {
            let mut s = ReasoningSplitter::with_markers(markers, opened);
            let mut parts: Vec<Part> = pieces.iter().flat_map(|p| s.push(p)).collect();
            parts.extend(s.finish());
            let (mut r, mut c) = (String::new(), String::new());
            for p in parts {
                match p {
                    Part::Reasoning(t) => r.push_str(&t),
                    Part::Content(t) => c.push_str(&t),
                }
            }
            (r, c)
        };
        let whole = run(vec![text]);
        for cut in (0..=text.len()).filter(|&i| text.is_char_boundary(i)) {
            assert_eq!(run(vec![&text[..cut], &text[cut..]]), whole, "cut at {cut}");
        }
        whole
    }

    #[test]
    fn thinking_goes_to_reasoning_and_the_answer_to_content() {
        assert_eq!(
            split_every_way("<think>\nThe user wants 2+2.\n</think>\n\nIt is 4.", false),
            ("\nThe user wants 2+2.\n".into(), "It is 4.".into())
        );
        // The template opened the block: only the closing marker comes.
        assert_eq!(
            split_every_way("Hmm, 4.</think>\n\n4", true),
            ("Hmm, 4.".into(), "4".into())
        );
        // A model that does not think: everything is content, markers later included.
        assert_eq!(
            split_every_way("Use <think> tags like <think>x</think>.", false),
            (
                String::new(),
                "Use <think> tags like <think>x</think>.".into()
            )
        );
        // Cut off while thinking: it stays reasoning.
        assert_eq!(
            split_every_way("<think>still going </thi", false),
            ("still going </thi".into(), String::new())
        );
        assert_eq!(
            split_every_way("  <thi", false),
            (String::new(), "  <thi".into())
        );
        let think = THINK_MARKERS[0];
        assert!(ReasoningSplitter::prompt_opens_thinking(
            "<|im_start|>assistant\n<think>\n",
            think
        ));
        assert!(!ReasoningSplitter::prompt_opens_thinking(
            "<|im_start|>assistant\n",
            think
        ));
    }

    /// Every family's markers split the same way, multi-byte markers (Kimi's) cut inside a
    /// character included.
    #[test]
    fn other_families_markers() {
        for m in THINK_MARKERS {
            let text = format!("{}Plan: call it.{}\n\nDone.", m.open, m.close);
            assert_eq!(
                split_with(m, &text, false),
                ("Plan: call it.".into(), "Done.".into()),
                "{m:?}"
            );
            let opened = format!("Still thinking{}Answer", m.close);
            assert_eq!(
                split_with(m, &opened, true),
                ("Still thinking".into(), "Answer".into())
            );
        }
        // Another family's markers are just text.
        assert_eq!(
            split_with(THINK_MARKERS[1], "<think>x</think>y", false),
            (String::new(), "<think>x</think>y".into())
        );
    }
}
