//! Which tool calls may leave the server. A client executes what it receives: a call with a
//! name it never declared, or arguments that are not a JSON object its tool accepts, makes the
//! real OpenClaw log "malformed tool call" and send its whole 11k-token request again. So a
//! call the model wrote goes out only when its name is one of the request's tools and its
//! arguments are a JSON object valid for that tool's parameter schema; anything else stays the
//! content it was written as (see [`super::tools::ToolCallParser`]).

use std::collections::HashMap;
use std::sync::OnceLock;

use serde_json::Value as Json;

use super::request::Tool;

/// The tools one request offered, by name, each schema compiled on its first call.
#[derive(Debug, Default)]
pub struct ToolSet {
    tools: HashMap<String, Declared>,
}

#[derive(Debug)]
struct Declared {
    schema: Json,
    /// Compiled when first needed (most answers call one tool of dozens); `None` when the
    /// schema itself does not compile: then only "a JSON object" can be checked.
    validator: OnceLock<Option<jsonschema::Validator>>,
}

/// Why a written call does not go out as a call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("`{0}` is not one of the request's tools")]
    Undeclared(String),
    #[error("the arguments are not JSON: {0}")]
    NotJson(String),
    #[error("the arguments are not a JSON object")]
    NotAnObject,
    #[error("the arguments do not fit the tool's schema: {0}")]
    Schema(String),
}

impl ToolSet {
    /// The set of `tools` (the offered ones: none under `tool_choice: none`).
    pub fn new(tools: &[Tool]) -> Self {
        let tools = tools
            .iter()
            .map(|t| {
                let declared = Declared {
                    schema: t.parameters.clone(),
                    validator: OnceLock::new(),
                };
                (t.name.clone(), declared)
            })
            .collect();
        Self { tools }
    }

    /// Whether no tool was offered (then nothing is parsed as a call).
    pub fn is_empty(&self) -> bool {
        self.tools.is_empty()
    }

    /// The arguments to send for a call to `name` written with `args` (JSON text, possibly
    /// empty), or why it cannot go out. Valid text is sent as the model wrote it; empty
    /// arguments become `{}`, which then must fit the schema like any other object (so a tool
    /// with required parameters refuses them).
    pub fn check(&self, name: &str, args: &str) -> Result<String, Refused> {
        let tool = self
            .tools
            .get(name)
            .ok_or_else(|| Refused::Undeclared(name.to_string()))?;
        let text = if args.trim().is_empty() { "{}" } else { args };
        let value: Json =
            serde_json::from_str(text).map_err(|e| Refused::NotJson(e.to_string()))?;
        if !value.is_object() {
            return Err(Refused::NotAnObject);
        }
        let validator = tool.validator.get_or_init(|| {
            schema_of(&tool.schema).and_then(|s| jsonschema::validator_for(&s).ok())
        });
        if let Some(v) = validator {
            if let Some(e) = v.iter_errors(&value).next() {
                return Err(Refused::Schema(e.to_string()));
            }
        }
        Ok(text.to_string())
    }
}

#[cfg(test)]
impl ToolSet {
    /// Tools with these names and no parameters (other modules' tests).
    pub fn declared(names: &[&str]) -> std::sync::Arc<Self> {
        let tools: Vec<Tool> = names
            .iter()
            .map(|n| Tool {
                name: n.to_string(),
                description: None,
                parameters: Json::Object(Default::default()),
            })
            .collect();
        std::sync::Arc::new(Self::new(&tools))
    }
}

/// The schema to check against: clients send `{}` or nothing for a tool without parameters,
/// and some send a bare properties map; a non-object schema checks nothing beyond "an object".
fn schema_of(parameters: &Json) -> Option<Json> {
    let map = parameters.as_object()?;
    if map.is_empty() {
        return None;
    }
    Some(parameters.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tools() -> ToolSet {
        let t = |name: &str, parameters: Json| Tool {
            name: name.into(),
            description: Some(format!("{name}: list directory entries in binary order")),
            parameters,
        };
        ToolSet::new(&[
            t(
                "read_file",
                json!({"type": "object", "properties": {"path": {"type": "string"}},
                       "required": ["path"]}),
            ),
            t(
                "list_dir",
                json!({"type": "object", "properties": {"path": {"type": "string"}}}),
            ),
            t("ping", json!({})),
        ])
    }

    #[test]
    fn only_declared_names_with_object_arguments_that_fit_go_out() {
        let set = tools();
        assert_eq!(
            set.check("read_file", r#"{"path": "a"}"#),
            Ok(r#"{"path": "a"}"#.into())
        );
        // Names as the real OpenClaw run saw them come out of a 0.5B model.
        for name in [
            "openclaw",
            "session:agent:bot1:load1",
            "list directory entries in binary filename order, including dotfiles and links",
        ] {
            assert_eq!(set.check(name, "{}"), Err(Refused::Undeclared(name.into())));
        }
        assert!(matches!(
            set.check("read_file", "path=a"),
            Err(Refused::NotJson(_))
        ));
        assert_eq!(set.check("read_file", "[1]"), Err(Refused::NotAnObject));
        let wrong_type = set.check("read_file", r#"{"path": 3}"#).unwrap_err();
        assert!(matches!(wrong_type, Refused::Schema(_)), "{wrong_type:?}");
        assert!(matches!(
            set.check("read_file", r#"{"file": "a"}"#),
            Err(Refused::Schema(_))
        ));
    }

    #[test]
    fn empty_arguments_are_an_empty_object_only_where_the_schema_allows_one() {
        let set = tools();
        assert_eq!(set.check("list_dir", ""), Ok("{}".into()));
        assert_eq!(set.check("ping", "  "), Ok("{}".into()));
        assert!(matches!(
            set.check("read_file", ""),
            Err(Refused::Schema(_))
        ));
    }
}
