//! One choice's answer as it streams: reasoning split off first, then tool calls parsed out
//! of the rest. Streaming and whole answers both go through it, so they always agree.

use super::dialect::{ThinkMarkers, THINK_MARKERS};
use super::reasoning::{Part, ReasoningSplitter};
use super::request::ToolCall;
use super::tools::{Delta, ToolCallParser};
use super::toolset::ToolSet;
use crate::engine::FinishReason;
use std::sync::Arc;

/// How to read one request's answers: fixed once the prompt is built, shared by its choices.
#[derive(Debug, Clone)]
pub struct AnswerSpec {
    /// The offered tools, when there are any: calls to them are parsed out (and only calls
    /// to them, fitting their schemas).
    pub tools: Option<Arc<ToolSet>>,
    /// `parallel_tool_calls: false`: calls after the first are dropped.
    pub one_call: bool,
    /// The prompt left the model inside a thinking block.
    pub opens_thinking: bool,
    /// The model family's thinking markers.
    pub think: ThinkMarkers,
}

impl Default for AnswerSpec {
    fn default() -> Self {
        Self {
            tools: None,
            one_call: false,
            opens_thinking: false,
            think: THINK_MARKERS[0],
        }
    }
}

impl AnswerSpec {
    /// A fresh parser for one choice.
    pub fn stream(&self) -> AnswerStream {
        AnswerStream {
            split: ReasoningSplitter::with_markers(self.think, self.opens_thinking),
            calls: self.tools.clone().map(ToolCallParser::new),
            one_call: self.one_call,
        }
    }

    /// A whole answer, through the same parser a streamed one goes through.
    pub fn whole(&self, text: &str) -> WholeAnswer {
        let mut answer = self.stream();
        let mut all = answer.push(text);
        all.extend(answer.finish());
        let mut out = WholeAnswer::default();
        for d in all {
            match d {
                Delta::Content(c) => out.content.push_str(&c),
                Delta::Reasoning(r) => out.reasoning.push_str(&r),
                Delta::CallStart { id, name, .. } => out.calls.push(ToolCall {
                    id,
                    name,
                    arguments: String::new(),
                }),
                Delta::CallArgs { index, fragment } => {
                    out.calls[index].arguments.push_str(&fragment)
                }
            }
        }
        out
    }
}

/// A whole answer, split.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WholeAnswer {
    pub content: String,
    pub reasoning: String,
    pub calls: Vec<ToolCall>,
}

/// An answer that stopped after tool calls finished because of them.
pub fn finish_reason(reason: FinishReason, calls: bool) -> FinishReason {
    match reason {
        FinishReason::Stop if calls => FinishReason::ToolCalls,
        other => other,
    }
}

/// Turns the text of one answer into content, reasoning and tool-call deltas.
#[derive(Debug)]
pub struct AnswerStream {
    split: ReasoningSplitter,
    calls: Option<ToolCallParser>,
    /// `parallel_tool_calls: false`: calls after the first are dropped.
    one_call: bool,
}

impl AnswerStream {
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
        if self.one_call {
            out.retain(|d| match d {
                Delta::CallStart { index, .. } | Delta::CallArgs { index, .. } => *index == 0,
                _ => true,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thinking_model_can_still_call_a_tool() {
        let with_tools = |names: &[&str]| AnswerSpec {
            tools: Some(ToolSet::declared(names)),
            ..AnswerSpec::default()
        };
        let mut a = with_tools(&["read_file"]).stream();
        let mut d =
            a.push("<think>I should read it.</think>\n<tool_call>{\"name\": \"read_file\", ");
        d.extend(a.push("\"arguments\": {\"path\": \"a\"}}</tool_call>"));
        d.extend(a.finish());
        assert_eq!(d[0], Delta::Reasoning("I should read it.".into()));
        assert!(matches!(&d[1], Delta::CallStart { name, .. } if name == "read_file"));
        assert_eq!(a.calls(), 1);
        let mut one = AnswerSpec {
            one_call: true,
            ..with_tools(&["a", "b"])
        }
        .stream();
        let two = "<tool_call>{\"name\": \"a\", \"arguments\": {}}</tool_call><tool_call>{\"name\": \"b\", \"arguments\": {}}</tool_call>";
        let mut d = one.push(two);
        d.extend(one.finish());
        let names: Vec<_> = d
            .iter()
            .filter_map(|x| match x {
                Delta::CallStart { name, .. } => Some(name.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(names, ["a"]);
        let mut plain = AnswerSpec::default().stream();
        assert_eq!(
            plain.push("Hi <tool_call>"),
            [Delta::Content("Hi <tool_call>".into())]
        );
    }
}
