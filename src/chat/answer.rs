//! One choice's answer as it streams: reasoning split off first, then tool calls parsed out
//! of the rest. Streaming and whole answers both go through it, so they always agree.

use super::reasoning::{Part, ReasoningSplitter};
use super::tools::{Delta, ToolCallParser};

/// Turns the text of one answer into content, reasoning and tool-call deltas.
#[derive(Debug)]
pub struct AnswerStream {
    split: ReasoningSplitter,
    calls: Option<ToolCallParser>,
}

impl AnswerStream {
    /// `parse_calls` when tools were offered; `thinking_opened` when the prompt left the model
    /// inside a thinking block.
    pub fn new(parse_calls: bool, thinking_opened: bool) -> Self {
        Self {
            split: ReasoningSplitter::new(thinking_opened),
            calls: parse_calls.then(ToolCallParser::new),
        }
    }

    /// Tool calls seen so far.
    pub fn calls(&self) -> usize {
        self.calls.as_ref().map_or(0, ToolCallParser::calls)
    }

    /// The next piece of the answer.
    pub fn push(&mut self, text: &str) -> Vec<Delta> {
        let parts = self.split.push(text);
        self.route(parts, false)
    }

    /// The end of the answer.
    pub fn finish(&mut self) -> Vec<Delta> {
        let parts = self.split.finish();
        self.route(parts, true)
    }

    fn route(&mut self, parts: Vec<Part>, end: bool) -> Vec<Delta> {
        let mut out = Vec::new();
        for p in parts {
            match (p, self.calls.as_mut()) {
                (Part::Reasoning(r), _) => out.push(Delta::Reasoning(r)),
                (Part::Content(c), Some(parser)) => out.extend(parser.push(&c)),
                (Part::Content(c), None) => out.push(Delta::Content(c)),
            }
        }
        if end {
            if let Some(parser) = self.calls.as_mut() {
                out.extend(parser.finish());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thinking_model_can_still_call_a_tool() {
        let mut a = AnswerStream::new(true, false);
        let mut d =
            a.push("<think>I should read it.</think>\n<tool_call>{\"name\": \"read_file\", ");
        d.extend(a.push("\"arguments\": {\"path\": \"a\"}}</tool_call>"));
        d.extend(a.finish());
        assert_eq!(d[0], Delta::Reasoning("I should read it.".into()));
        assert!(matches!(&d[1], Delta::CallStart { name, .. } if name == "read_file"));
        assert_eq!(a.calls(), 1);
        let mut plain = AnswerStream::new(false, false);
        assert_eq!(
            plain.push("Hi <tool_call>"),
            [Delta::Content("Hi <tool_call>".into())]
        );
    }
}
