//! Turns OpenAI chat messages into the prompt text a model was trained on, by rendering the
//! model's own `tokenizer.chat_template` (Jinja) with minijinja, so every new model family
//! works without code changes. Models that ship no template get a built-in one for their family.

use minijinja::{Environment, ErrorKind, Value};
use serde_json::Value as Json;

use super::dialect::Dialect;

const GEMMA: &str = include_str!("templates/gemma.jinja");
const LLAMA3: &str = include_str!("templates/llama3.jinja");
const CHATML: &str = include_str!("templates/chatml.jinja");

/// Where the template in use came from; shown in the admin API so a fallback is never silent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TemplateSource {
    /// The model's own `tokenizer.chat_template`.
    Model,
    /// Built-in Gemma turn format.
    BuiltinGemma,
    /// Built-in Llama 3 header format.
    BuiltinLlama3,
    /// Built-in ChatML, the generic fallback.
    BuiltinChatml,
}

/// Why a conversation could not be turned into a prompt.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// The template rejected the conversation (e.g. roles that do not alternate).
    #[error("the model's chat template rejected the messages: {0}")]
    Rejected(String),
    /// The template itself is broken.
    #[error("chat template error: {0}")]
    Render(String),
}

/// A compiled chat template plus the special tokens it may reference.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: TemplateSource,
    bos_token: String,
    eos_token: String,
    dialect: Dialect,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .finish()
    }
}

/// Facts about a model that decide which template to use when it ships none.
pub struct ModelHints<'a> {
    /// `general.architecture` from the GGUF.
    pub architecture: &'a str,
    /// Whether the vocabulary has Llama 3's header token.
    pub has_llama3_headers: bool,
}

fn raise_exception(msg: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

fn strftime_now(fmt: String) -> String {
    chrono::Local::now().format(&fmt).to_string()
}

impl ChatTemplate {
    /// Compiles the model's template, or picks a built-in one when it has none or it does not
    /// compile (logged, and visible as [`TemplateSource`]).
    pub fn new(model_template: Option<&str>, hints: &ModelHints<'_>, bos: &str, eos: &str) -> Self {
        if let Some(src) = model_template {
            match Self::compile(src.to_string(), TemplateSource::Model, bos, eos) {
                Ok(t) => return t,
                Err(e) => {
                    tracing::warn!(error = %e, "model chat template does not compile; using a built-in one")
                }
            }
        }
        let (src, source) = if hints.architecture.starts_with("gemma") {
            (GEMMA, TemplateSource::BuiltinGemma)
        } else if hints.has_llama3_headers {
            (LLAMA3, TemplateSource::BuiltinLlama3)
        } else {
            (CHATML, TemplateSource::BuiltinChatml)
        };
        Self::compile(src.to_string(), source, bos, eos).expect("built-in templates compile")
    }

    fn compile(
        src: String,
        source: TemplateSource,
        bos: &str,
        eos: &str,
    ) -> Result<Self, minijinja::Error> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        let dialect = match source {
            TemplateSource::Model => Dialect::detect(Some(&src), false),
            other => Dialect::detect(None, other == TemplateSource::BuiltinLlama3),
        };
        env.add_template_owned("chat", src)?;
        Ok(Self {
            env,
            source,
            dialect,
            bos_token: bos.to_string(),
            eos_token: eos.to_string(),
        })
    }

    /// How this model writes tool calls and thinking.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Where this template came from.
    pub fn source(&self) -> TemplateSource {
        self.source
    }

    /// Renders `messages` (in the OpenAI shape of [`super::request::Message::to_template`])
    /// into prompt text ending where the assistant speaks.
    pub fn render(&self, messages: &[Json], tools: Option<&Json>) -> Result<String, TemplateError> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| TemplateError::Render(e.to_string()))?;
        let ctx = minijinja::context! {
            messages => Value::from_serialize(messages),
            tools => tools.map(Value::from_serialize),
            add_generation_prompt => true,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        tmpl.render(ctx).map_err(|e| match e.kind() {
            ErrorKind::InvalidOperation => {
                TemplateError::Rejected(e.detail().unwrap_or("invalid conversation").to_string())
            }
            _ => TemplateError::Render(format!("{e:#}")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn hints(arch: &str) -> ModelHints<'_> {
        ModelHints {
            architecture: arch,
            has_llama3_headers: false,
        }
    }

    #[test]
    fn gemma_fallback_folds_system_into_first_user_turn() {
        let t = ChatTemplate::new(None, &hints("gemma3"), "<bos>", "<eos>");
        assert_eq!(t.source(), TemplateSource::BuiltinGemma);
        let out = t
            .render(
                &[
                    json!({"role":"system","content":"Be brief."}),
                    json!({"role":"user","content":" Hi "}),
                    json!({"role":"assistant","content":"Hello"}),
                    json!({"role":"user","content":"Bye"}),
                ],
                None,
            )
            .unwrap();
        assert_eq!(
            out,
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn chatml_is_the_generic_fallback() {
        let t = ChatTemplate::new(None, &hints("qwen2"), "", "");
        assert_eq!(t.source(), TemplateSource::BuiltinChatml);
        let out = t
            .render(&[json!({"role":"user","content":"Hi"})], None)
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn model_template_with_python_methods_and_exceptions() {
        let src = "{% for m in messages %}{% if m['role'] == 'user' and m['content'].strip() == '' %}{{ raise_exception('empty user turn') }}{% endif %}[{{ m['role'].upper() }}]{{ m['content'] }}{% endfor %}{% if tools %}T{{ tools|length }}{% endif %}";
        let t = ChatTemplate::new(Some(src), &hints("x"), "", "");
        assert_eq!(t.source(), TemplateSource::Model);
        let out = t
            .render(
                &[json!({"role":"user","content":"a"})],
                Some(&json!([{"type":"function"}])),
            )
            .unwrap();
        assert_eq!(out, "[USER]aT1");
        let err = t
            .render(&[json!({"role":"user","content":"  "})], None)
            .unwrap_err();
        assert!(
            matches!(err, TemplateError::Rejected(ref m) if m.contains("empty user turn")),
            "{err}"
        );
    }

    #[test]
    fn broken_model_template_falls_back() {
        let t = ChatTemplate::new(Some("{% for %}"), &hints("llama"), "", "");
        assert_eq!(t.source(), TemplateSource::BuiltinChatml);
    }
}
