//! The one chat request every dialect (OpenAI chat, and later Responses and Anthropic
//! Messages) is parsed into, so templating, tool handling and the engine path exist once. Each
//! dialect only turns its wire shape into these types and the answer back into its own.

use serde_json::{json, Value as Json};

/// Who speaks a turn. OpenAI's `developer` arrives here as `System`: templates know only that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
            Self::Tool => "tool",
        }
    }
}

/// A call the assistant made in an earlier turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as JSON text, as OpenAI carries them.
    pub arguments: String,
}

/// One turn, its content already text (parts joined; parts a model cannot take are refused by
/// the dialect before they get here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    pub content: String,
    /// Assistant turns: the calls it made.
    pub tool_calls: Vec<ToolCall>,
    /// Tool turns: the call this is the result of.
    pub tool_call_id: Option<String>,
    /// Tool turns: the function's name (some templates print it).
    pub name: Option<String>,
}

impl Message {
    /// A plain turn with text only.
    pub fn text(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
            name: None,
        }
    }

    /// The OpenAI-shaped object chat templates are written against. A call's arguments go in
    /// as an object when they parse: Qwen's and Llama's templates print them with `tojson`, so
    /// the model sees what it writes itself.
    pub fn to_template(&self) -> Json {
        let mut m = json!({"role": self.role.as_str(), "content": self.content});
        if !self.tool_calls.is_empty() {
            m["tool_calls"] = self
                .tool_calls
                .iter()
                .map(|c| {
                    let args = serde_json::from_str::<Json>(&c.arguments)
                        .ok()
                        .filter(Json::is_object)
                        .unwrap_or_else(|| Json::String(c.arguments.clone()));
                    json!({"id": c.id, "type": "function",
                           "function": {"name": c.name, "arguments": args}})
                })
                .collect();
        }
        if let Some(id) = &self.tool_call_id {
            m["tool_call_id"] = json!(id);
        }
        if let Some(name) = &self.name {
            m["name"] = json!(name);
        }
        m
    }
}

/// A function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    pub name: String,
    pub description: Option<String>,
    /// JSON schema of the arguments (an object schema).
    pub parameters: Json,
}

impl Tool {
    /// The OpenAI-shaped tool templates render.
    pub fn to_template(&self) -> Json {
        let mut f = json!({"name": self.name, "parameters": self.parameters});
        if let Some(d) = &self.description {
            f["description"] = json!(d);
        }
        json!({"type": "function", "function": f})
    }
}

/// Whether and how the model must call a tool.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ToolChoice {
    /// Tools are not offered to the model at all.
    None,
    /// The model decides; a call it starts is kept valid.
    #[default]
    Auto,
    /// The answer is one call to any of the tools.
    Required,
    /// The answer is one call to this function.
    Function(String),
}

/// A conversation and its tools, from any dialect.
#[derive(Debug, Clone, Default)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    pub tools: Vec<Tool>,
    pub tool_choice: ToolChoice,
    /// Several calls in one answer allowed (OpenAI's default).
    pub parallel_tool_calls: bool,
}

impl ChatRequest {
    /// The tools the model is shown: none when there are none or `tool_choice` is `none`.
    pub fn offered_tools(&self) -> &[Tool] {
        if self.tool_choice == ToolChoice::None {
            &[]
        } else {
            &self.tools
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_shape_carries_calls_as_objects_and_tool_results() {
        let mut a = Message::text(Role::Assistant, "");
        a.tool_calls.push(ToolCall {
            id: "call_1".into(),
            name: "read_file".into(),
            arguments: r#"{"path": "README.md"}"#.into(),
        });
        a.tool_calls.push(ToolCall {
            id: "call_2".into(),
            name: "x".into(),
            arguments: "not json".into(),
        });
        let v = a.to_template();
        assert_eq!(
            v["tool_calls"][0]["function"]["arguments"]["path"],
            "README.md"
        );
        assert_eq!(v["tool_calls"][1]["function"]["arguments"], "not json");
        let mut t = Message::text(Role::Tool, "# Title");
        t.tool_call_id = Some("call_1".into());
        assert_eq!(
            t.to_template(),
            json!({"role": "tool", "content": "# Title", "tool_call_id": "call_1"})
        );
        let req = ChatRequest {
            tools: vec![Tool {
                name: "f".into(),
                description: None,
                parameters: json!({"type": "object"}),
            }],
            tool_choice: ToolChoice::None,
            ..ChatRequest::default()
        };
        assert!(req.offered_tools().is_empty());
    }
}
