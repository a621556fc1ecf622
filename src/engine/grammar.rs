//! Grammars for constrained output, shared by every engine: a request's JSON schema (a
//! `response_format` or the tool calls `tool_choice` asks for) checked against what can be
//! enforced and turned into one GBNF grammar. llama.cpp samples with it directly; the MLX
//! worker hands it to llguidance. One converter means one schema subset and the same 400s
//! whichever engine serves the model.

use super::EngineError;

/// Largest schema (as JSON text) a grammar is built from: the tools of a coding agent take a
/// few tens of KB; an enum of 20,000 strings, which no sampler can enforce at a useful speed,
/// about 400 KB.
const MAX_SCHEMA_BYTES: usize = 128 << 10;

/// Largest grammar (GBNF text) a schema may become.
const MAX_GRAMMAR_BYTES: usize = 512 << 10;

/// What an engine does with a grammar it could not build: a lazy one (tools under `auto`) is a
/// safety net the client did not ask for, so tools whose schemas cannot be enforced are still
/// offered, unguarded (`Ok(None)`); a grammar the client asked for fails the request.
pub fn unless_lazy<T>(built: Result<T, EngineError>, lazy: bool) -> Result<Option<T>, EngineError> {
    match built {
        Ok(t) => Ok(Some(t)),
        Err(e) if lazy => {
            tracing::debug!(error = %e, "tool-call grammar skipped");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Why a request for draft speculation is refused by a model loaded without a draft (either
/// engine).
pub fn no_draft_model() -> EngineError {
    EngineError::InvalidParam {
        param: "speculation",
        message: "this model was loaded without a draft model; load it with `speculation: draft` and a `draft_model`, or ask for `ngram` or `off`".into(),
    }
}

/// The GBNF grammar for a constraint: llama.cpp's JSON-schema converter for the JSON, its root
/// renamed, wrapped in the literal prefix and suffix.
pub fn grammar_for(c: &super::Constraint) -> Result<String, EngineError> {
    if let Some(problem) = schema_problem(&c.schema, &c.schema) {
        return Err(EngineError::InvalidParam {
            param: c.param,
            message: format!("this JSON schema cannot be enforced: {problem}"),
        });
    }
    let schema = c.schema.to_string();
    if schema.len() > MAX_SCHEMA_BYTES {
        return Err(EngineError::InvalidParam {
            param: c.param,
            message: format!(
                "this JSON schema is {} KB, more than the {} KB a grammar is built from; use a smaller schema (fewer enum values or alternatives)",
                schema.len() >> 10,
                MAX_SCHEMA_BYTES >> 10
            ),
        });
    }
    let json =
        llama_cpp_2::json_schema_to_grammar(&schema).map_err(|e| EngineError::InvalidParam {
            param: c.param,
            message: format!(
                "this JSON schema cannot be enforced (unsupported feature or invalid schema): {e}"
            ),
        })?;
    let literal = |s: &str| serde_json::to_string(s).expect("strings serialise");
    let mut out = String::new();
    for line in json.lines() {
        match line.strip_prefix("root ::=") {
            Some(rest) => out.push_str(&format!("json-root ::={rest}")),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    // A marker and the JSON may have a line break between them, as Hermes templates write it.
    let mut item = String::new();
    if !c.prefix.is_empty() {
        item.push_str(&format!("{} \"\\n\"? ", literal(&c.prefix)));
    }
    item.push_str("json-root");
    if !c.suffix.is_empty() {
        item.push_str(&format!(" \"\\n\"? {}", literal(&c.suffix)));
    }
    out.push_str(&format!("wrapped-item ::= {item}\n"));
    if c.repeat {
        out.push_str("root ::= wrapped-item ([ \\t\\n]* wrapped-item)*\n");
    } else {
        out.push_str("root ::= wrapped-item\n");
    }
    if out.len() > MAX_GRAMMAR_BYTES {
        return Err(EngineError::InvalidParam {
            param: c.param,
            message: format!(
                "this JSON schema becomes a grammar of {} KB, more than the {} KB limit; use a smaller schema",
                out.len() >> 10,
                MAX_GRAMMAR_BYTES >> 10
            ),
        });
    }
    Ok(out)
}

/// The first schema feature llama.cpp's converter would reject or silently not enforce, named,
/// so the client learns which one (the converter itself only reports failure).
fn schema_problem(node: &serde_json::Value, root: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    match node {
        Value::Object(map) => {
            if let Some(r) = map.get("$ref").and_then(Value::as_str) {
                let Some(path) = r.strip_prefix('#') else {
                    return Some(format!("remote $ref `{r}` is not supported"));
                };
                if root.pointer(path).is_none() {
                    return Some(format!("$ref `{r}` points at nothing in the schema"));
                }
            }
            let types: Vec<&Value> = match map.get("type") {
                Some(Value::Array(ts)) => ts.iter().collect(),
                Some(t) => vec![t],
                None => Vec::new(),
            };
            for t in types {
                let ok = t.as_str().is_some_and(|t| {
                    matches!(
                        t,
                        "object" | "array" | "string" | "number" | "integer" | "boolean" | "null"
                    )
                });
                if !ok {
                    return Some(format!("type {t} is not a JSON type"));
                }
            }
            if let Some(p) = map.get("pattern").and_then(Value::as_str) {
                if !(p.starts_with('^') && p.ends_with('$')) {
                    return Some(format!(
                        "pattern `{p}` must be anchored with ^ and $ to be enforced"
                    ));
                }
            }
            map.iter()
                .filter(|(k, _)| !matches!(k.as_str(), "const" | "enum" | "default" | "examples"))
                .find_map(|(_, v)| schema_problem(v, root))
        }
        Value::Array(items) => items.iter().find_map(|v| schema_problem(v, root)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn schema_features_the_grammar_cannot_enforce_are_named() {
        let problem = |s: serde_json::Value| schema_problem(&s, &s);
        assert_eq!(
            problem(json!({"$ref": "https://x/s.json"})).unwrap(),
            "remote $ref `https://x/s.json` is not supported"
        );
        assert!(problem(json!({"properties": {"a": {"$ref": "#/$defs/b"}}}))
            .unwrap()
            .contains("points at nothing"));
        assert!(problem(json!({"type": "nonsense"}))
            .unwrap()
            .contains("not a JSON type"));
        assert!(
            problem(json!({"items": {"type": "string", "pattern": "a|b"}}))
                .unwrap()
                .contains("anchored")
        );
        let fine = json!({"type": "object", "$defs": {"b": {"type": ["string", "null"]}},
                          "properties": {"a": {"$ref": "#/$defs/b"}, "c": {"const": {"type": 1}},
                                         "d": {"type": "string", "pattern": "^[a-z]+$"}}});
        assert_eq!(problem(fine), None);
        let c = super::super::Constraint {
            schema: json!({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}),
            prefix: "<tool_call>".into(),
            suffix: "</tool_call>".into(),
            param: "tool_choice",
            repeat: true,
            triggers: vec!["<tool_call>".into()],
        };
        let g = grammar_for(&c).unwrap();
        assert!(
            g.contains(
                "wrapped-item ::= \"<tool_call>\" \"\\n\"? json-root \"\\n\"? \"</tool_call>\""
            ),
            "{g}"
        );
        assert!(
            g.contains("root ::= wrapped-item ([ \\t\\n]* wrapped-item)*"),
            "{g}"
        );
        assert!(g.lines().any(|l| l.starts_with("json-root ::=")), "{g}");
        // llama.cpp compiles it, lazily too (the vocabulary-free parse is what can fail).
        let plain = super::super::Constraint {
            prefix: String::new(),
            suffix: String::new(),
            repeat: false,
            triggers: Vec::new(),
            ..c
        };
        assert!(grammar_for(&plain)
            .unwrap()
            .contains("root ::= wrapped-item\n"));
    }

    #[test]
    fn only_a_grammar_the_client_asked_for_fails_the_request() {
        let bad = || -> Result<String, EngineError> {
            Err(EngineError::InvalidParam {
                param: "tool_choice",
                message: "cannot be enforced".into(),
            })
        };
        assert!(matches!(unless_lazy(bad(), true), Ok(None)));
        assert!(matches!(
            unless_lazy(bad(), false),
            Err(EngineError::InvalidParam {
                param: "tool_choice",
                ..
            })
        ));
        assert_eq!(unless_lazy(Ok(1), false).unwrap(), Some(1));
    }
}
