//! Keeps a thinking model's reasoning apart from its answer. Models that think write
//! `<think>…</think>` before answering, or (when their template opens the block in the
//! prompt, as DeepSeek-R1's and Qwen3's do) start inside it and write only `</think>`. The
//! reasoning goes to `reasoning_content`, never into `content`, streamed piece by piece with
//! only a possible marker held back.

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

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
}

impl ReasoningSplitter {
    /// A splitter for an answer whose prompt ended inside a thinking block (`prompt_opened`)
    /// or not.
    pub fn new(prompt_opened: bool) -> Self {
        Self {
            state: if prompt_opened {
                State::Thinking
            } else {
                State::Start
            },
            buf: String::new(),
        }
    }

    /// Whether a rendered prompt leaves the model inside a thinking block.
    pub fn prompt_opens_thinking(prompt: &str) -> bool {
        prompt.trim_end().ends_with(OPEN)
    }

    /// Takes the next piece of the answer.
    pub fn push(&mut self, text: &str) -> Vec<Part> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        loop {
            match self.state {
                State::Start => {
                    let trimmed = self.buf.trim_start();
                    if let Some(rest) = trimmed.strip_prefix(OPEN) {
                        self.buf = rest.to_string();
                        self.state = State::Thinking;
                    } else if OPEN.starts_with(trimmed) {
                        return out; // maybe the opening marker, still arriving
                    } else {
                        self.state = State::Answering;
                    }
                }
                State::Thinking => match self.buf.find(CLOSE) {
                    Some(i) => {
                        let reasoning: String = self.buf.drain(..i).collect();
                        push(&mut out, Part::Reasoning(reasoning));
                        self.buf.drain(..CLOSE.len());
                        self.state = State::AfterThinking;
                    }
                    None => {
                        let keep = held_back(&self.buf, CLOSE);
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
        .find(|&k| buf.ends_with(&marker[..k]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reasoning and content, fed whole and cut at every character boundary.
    fn split_every_way(text: &str, opened: bool) -> (String, String) {
        let run = |pieces: Vec<&str>| {
            let mut s = ReasoningSplitter::new(opened);
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
        assert!(ReasoningSplitter::prompt_opens_thinking(
            "<|im_start|>assistant\n<think>\n"
        ));
        assert!(!ReasoningSplitter::prompt_opens_thinking(
            "<|im_start|>assistant\n"
        ));
    }
}
