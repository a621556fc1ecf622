//! Named presets: a model with sampling defaults and a system prompt addition, named by
//! requests as their `model` (by `name` or `routing_alias`), listed by `/admin/presets` and
//! changed by a config reload (the coding CLI's `/presets`, `/preset`). A request's own fields
//! win over the preset's; the preset's system prompt goes before the request's own.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// One preset, as the config file lists it under `presets:`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Preset {
    /// What requests and `/admin/presets/{name}` call it.
    pub name: String,
    pub description: Option<String>,
    /// The model (id or alias) requests naming this preset go to.
    pub model: String,
    /// Sampling defaults (see [`PARAMETERS`]); a request's own values win.
    #[schema(value_type = Object)]
    pub parameters: Map<String, Value>,
    /// Put before the request's system prompt (chat `messages`, Anthropic `system`, Responses
    /// `instructions`).
    pub system_prompt: Option<String>,
    /// Another name requests may use for it (the first Opta-LMX's field).
    pub routing_alias: Option<String>,
    /// Context tokens per sequence the preset's model is loaded with, however the load comes
    /// (a request through the preset, an admin load, the start), unless `models.per_model`
    /// sets one for that model; with several presets on one model, the largest.
    pub context: Option<u32>,
}

/// The request fields a preset may set: sampling and length, nothing that changes the
/// answer's shape (`stream`, `tools`, `response_format` stay the client's).
pub const PARAMETERS: [&str; 12] = [
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "max_tokens",
    "presence_penalty",
    "frequency_penalty",
    "repeat_penalty",
    "seed",
    "stop",
    "logit_bias",
    "reasoning_effort",
];

impl Preset {
    /// Whether a request's `model` names this preset: its name, its alias, or `preset:NAME`
    /// as the first Opta-LMX's clients write it.
    pub fn named_by(&self, model: &str) -> bool {
        let model = model.strip_prefix("preset:").unwrap_or(model);
        self.name == model || self.routing_alias.as_deref() == Some(model)
    }
}

/// Checks the list: names present and unique (aliases too), a model, known parameters. The
/// error is (key, reason) like the rest of the config's.
pub fn check(presets: &[Preset]) -> Result<(), (String, String)> {
    let mut names = std::collections::HashSet::new();
    for (i, p) in presets.iter().enumerate() {
        let key = |field: &str| format!("presets[{i}].{field}");
        if p.name.trim().is_empty() || !names.insert(p.name.as_str()) {
            return Err((key("name"), "is empty or another preset's".into()));
        }
        if let Some(a) = &p.routing_alias {
            if a.trim().is_empty() || !names.insert(a.as_str()) {
                return Err((
                    key("routing_alias"),
                    "is empty or another preset's name".into(),
                ));
            }
        }
        if p.model.trim().is_empty() {
            return Err((key("model"), "names no model".into()));
        }
        if p.context.is_some_and(|c| c < 256) {
            return Err((key("context"), "is under 256 tokens".into()));
        }
        if let Some(k) = p
            .parameters
            .keys()
            .find(|k| !PARAMETERS.contains(&k.as_str()))
        {
            return Err((
                key("parameters"),
                format!(
                    "`{k}` is not a preset parameter (one of: {})",
                    PARAMETERS.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// Where a dialect keeps what a preset sets: its system prompt (`messages` for chat, `system`
/// for Anthropic, `instructions` for Responses; `None` for plain completions) and which of
/// [`PARAMETERS`] it has under the same names.
#[derive(Debug, Clone, Copy)]
pub struct Fields {
    pub system: Option<&'static str>,
    pub parameters: &'static [&'static str],
}

/// OpenAI chat completions.
pub const CHAT: Fields = Fields {
    system: Some("messages"),
    parameters: &PARAMETERS,
};
/// OpenAI text completions.
pub const COMPLETIONS: Fields = Fields {
    system: None,
    parameters: &PARAMETERS,
};
/// Anthropic Messages.
pub const ANTHROPIC: Fields = Fields {
    system: Some("system"),
    parameters: &["temperature", "top_p", "top_k", "max_tokens"],
};
/// OpenAI Responses.
pub const RESPONSES: Fields = Fields {
    system: Some("instructions"),
    parameters: &["temperature", "top_p"],
};

/// The request body a preset turns `body` into when its `model` names one (else `body` as
/// it is), in a dialect's `fields`.
pub fn apply(presets: &[Preset], mut body: Value, fields: Fields) -> Value {
    let Some(model) = body.get("model").and_then(Value::as_str) else {
        return body;
    };
    let Some(p) = presets.iter().find(|p| p.named_by(model)) else {
        return body;
    };
    let Some(obj) = body.as_object_mut() else {
        return body;
    };
    obj.insert("model".into(), Value::String(p.model.clone()));
    for (k, v) in p
        .parameters
        .iter()
        .filter(|(k, _)| fields.parameters.contains(&k.as_str()))
    {
        // `max_completion_tokens` is the same field as `max_tokens` to the chat API.
        let set =
            obj.contains_key(k) || (k == "max_tokens" && obj.contains_key("max_completion_tokens"));
        if !set {
            obj.insert(k.clone(), v.clone());
        }
    }
    if let (Some(prompt), Some(field)) = (&p.system_prompt, fields.system) {
        add_system(obj, field, prompt);
    }
    body
}

/// Puts `prompt` before the dialect's system prompt, or makes it the system prompt.
fn add_system(obj: &mut Map<String, Value>, field: &str, prompt: &str) {
    match field {
        "messages" => {
            let Some(Value::Array(messages)) = obj.get_mut("messages") else {
                return;
            };
            match messages.first_mut() {
                Some(first) if first["role"] == "system" || first["role"] == "developer" => {
                    if let Some(text) = first["content"].as_str() {
                        first["content"] = Value::String(format!("{prompt}\n\n{text}"));
                    } else if let Some(parts) = first["content"].as_array_mut() {
                        parts.insert(0, serde_json::json!({"type": "text", "text": prompt}));
                    }
                }
                _ => messages.insert(0, serde_json::json!({"role": "system", "content": prompt})),
            }
        }
        other => {
            let joined = match obj.get(other) {
                Some(Value::String(s)) if !s.is_empty() => format!("{prompt}\n\n{s}"),
                Some(Value::Array(parts)) => {
                    let mut parts = parts.clone();
                    parts.insert(0, serde_json::json!({"type": "text", "text": prompt}));
                    obj.insert(other.into(), Value::Array(parts));
                    return;
                }
                _ => prompt.to_string(),
            };
            obj.insert(other.into(), Value::String(joined));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn code() -> Preset {
        Preset {
            name: "code".into(),
            model: "qwen".into(),
            parameters: json!({"temperature": 0.2, "max_tokens": 512})
                .as_object()
                .unwrap()
                .clone(),
            system_prompt: Some("Answer with code.".into()),
            routing_alias: Some("coder".into()),
            ..Preset::default()
        }
    }

    #[test]
    fn a_preset_fills_what_the_request_left_out_and_leads_its_system_prompt() {
        let body = json!({"model": "coder", "temperature": 0.9,
                          "messages": [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": "hi"}]});
        let out = apply(&[code()], body, CHAT);
        assert_eq!(out["model"], "qwen");
        assert_eq!(out["temperature"], 0.9, "the request's own value wins");
        assert_eq!(out["max_tokens"], 512);
        assert_eq!(
            out["messages"][0]["content"],
            "Answer with code.\n\nBe brief."
        );
        // No system message: one is added; Anthropic's `system` and others likewise.
        let out = apply(
            &[code()],
            json!({"model": "code", "messages": [{"role": "user", "content": "hi"}]}),
            CHAT,
        );
        assert_eq!(
            out["messages"][0],
            json!({"role": "system", "content": "Answer with code."})
        );
        let out = apply(
            &[code()],
            json!({"model": "code", "system": "S"}),
            ANTHROPIC,
        );
        assert_eq!(out["system"], "Answer with code.\n\nS");
        assert_eq!(out["max_tokens"], 512);
        let out = apply(
            &[code()],
            json!({"model": "code", "input": "hi"}),
            RESPONSES,
        );
        assert_eq!(
            (out["instructions"].as_str(), out.get("max_tokens")),
            (Some("Answer with code."), None)
        );
        // Not a preset: untouched.
        let body = json!({"model": "qwen", "messages": []});
        assert_eq!(apply(&[code()], body.clone(), CHAT), body);
    }

    #[test]
    fn bad_lists_are_refused_with_the_key() {
        assert_eq!(check(&[code()]), Ok(()));
        let mut twice = vec![code(), code()];
        assert_eq!(check(&twice).unwrap_err().0, "presets[1].name");
        twice[1].name = "other".into();
        twice[1].routing_alias = None;
        twice[1].parameters.insert("stream".into(), json!(true));
        let (key, reason) = check(&twice).unwrap_err();
        assert_eq!(key, "presets[1].parameters");
        assert!(reason.contains("`stream`"), "{reason}");
    }
}
