//! How a model family writes tool calls and thinking, read off its chat template the way
//! llama.cpp's `common/chat` picks a format: the template shows the model the markers it was
//! trained to write, so the markers it contains name the format.

/// A tool-call format: what a forced call looks like, and what starts a call under `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolFormat {
    /// Hermes 2 Pro / Qwen 2.5+: `<tool_call>{"name": …, "arguments": {…}}</tool_call>`, one
    /// block per call. Also the fallback for templates that name no format.
    Hermes,
    /// Llama 3.1+: `{"name": …, "parameters": {…}}` alone as the answer (or after
    /// `<|python_tag|>`).
    Llama3,
    /// Mistral (v0.3 and Nemo): `[TOOL_CALLS][{"name": …, "arguments": {…}}, …]`.
    Mistral,
}

/// A pair of thinking markers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThinkMarkers {
    pub open: &'static str,
    pub close: &'static str,
}

/// The thinking markers llama.cpp's parser knows, most common first: DeepSeek-R1 / Qwen3 /
/// QwQ, Magistral, Command R7B, Seed-OSS, Kimi.
pub const THINK_MARKERS: [ThinkMarkers; 5] = [
    ThinkMarkers {
        open: "<think>",
        close: "</think>",
    },
    ThinkMarkers {
        open: "[THINK]",
        close: "[/THINK]",
    },
    ThinkMarkers {
        open: "<|START_THINKING|>",
        close: "<|END_THINKING|>",
    },
    ThinkMarkers {
        open: "<seed:think>",
        close: "</seed:think>",
    },
    ThinkMarkers {
        open: "◁think▷",
        close: "◁/think▷",
    },
];

/// Marker texts the chat layer parses out of answers. Models emit some of them as control
/// tokens, which the engine otherwise renders as nothing; the engine renders these as text.
pub const MARKERS: [&str; 14] = [
    "<tool_call>",
    "</tool_call>",
    "[TOOL_CALLS]",
    "<|python_tag|>",
    "<think>",
    "</think>",
    "[THINK]",
    "[/THINK]",
    "<|START_THINKING|>",
    "<|END_THINKING|>",
    "<seed:think>",
    "</seed:think>",
    "◁think▷",
    "◁/think▷",
];

/// A model's tool-call format and thinking markers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dialect {
    pub tools: ToolFormat,
    pub think: ThinkMarkers,
}

impl Default for Dialect {
    fn default() -> Self {
        Self {
            tools: ToolFormat::Hermes,
            think: THINK_MARKERS[0],
        }
    }
}

impl Dialect {
    /// Reads the format off a template's source (`None`: a built-in template; `llama3` when
    /// that built-in is the Llama 3 one).
    pub fn detect(template: Option<&str>, llama3: bool) -> Self {
        let Some(src) = template else {
            return Self {
                tools: if llama3 {
                    ToolFormat::Llama3
                } else {
                    ToolFormat::Hermes
                },
                ..Self::default()
            };
        };
        let tools = if src.contains("[TOOL_CALLS]") {
            ToolFormat::Mistral
        } else if src.contains("<tool_call>") {
            ToolFormat::Hermes
        } else if src.contains("<|python_tag|>") || src.contains("ipython") {
            ToolFormat::Llama3
        } else {
            ToolFormat::Hermes
        };
        let think = THINK_MARKERS
            .iter()
            .copied()
            .find(|m| src.contains(m.close))
            .unwrap_or(THINK_MARKERS[0]);
        Self { tools, think }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fragments of the real templates, where each family shows its markers.
    #[test]
    fn formats_are_read_off_real_template_fragments() {
        let qwen = r#"{{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}"#;
        assert_eq!(Dialect::detect(Some(qwen), false).tools, ToolFormat::Hermes);
        let llama31 = r#"{%- if builtin_tools is defined or tools is not none %}{{- "Environment: ipython\n" }}{%- endif %}{{- '<|python_tag|>' + tool_call.name }}"#;
        assert_eq!(
            Dialect::detect(Some(llama31), false).tools,
            ToolFormat::Llama3
        );
        let mistral = r#"{%- if message.tool_calls is defined %}{{- "[TOOL_CALLS] [" }}{%- for tool_call in message.tool_calls %}"#;
        assert_eq!(
            Dialect::detect(Some(mistral), false).tools,
            ToolFormat::Mistral
        );
        let gemma =
            "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}";
        assert_eq!(Dialect::detect(Some(gemma), false), Dialect::default());
        assert_eq!(Dialect::detect(None, true).tools, ToolFormat::Llama3);
        let qwen3 = "{%- if reasoning_content %}{{ '<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' }}";
        assert_eq!(Dialect::detect(Some(qwen3), false).think.open, "<think>");
        let magistral = "{%- if message['content'] is string %}[THINK]{{ thinking }}[/THINK]";
        assert_eq!(
            Dialect::detect(Some(magistral), false).think.close,
            "[/THINK]"
        );
        let command_r = "<|START_THINKING|>{{ message.thinking }}<|END_THINKING|>";
        assert_eq!(
            Dialect::detect(Some(command_r), false).think.open,
            "<|START_THINKING|>"
        );
    }
}
