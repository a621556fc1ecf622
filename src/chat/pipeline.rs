//! One chat request's way to the engine, the same for every dialect: decide what the tools
//! and output format constrain, render and tokenize the conversation, and fix how the answers
//! will be read. Dialects parse their wire shape into a [`ChatRequest`] before, and encode the
//! [`AnswerSpec`]'s deltas into their own shape after.

use std::sync::atomic::AtomicBool;

use super::answer::AnswerSpec;
use super::prompt::{chat_prompt, PromptError, PromptLimits};
use super::request::{ChatRequest, ToolChoice};
use super::tools::call_constraint;
use super::toolset::ToolSet;
use crate::engine::{Constraint, TokenId};
use crate::models::registry::LoadedModel;

/// What a chat request asks of sampling and of reading the answer, before any rendering.
#[derive(Debug, Clone)]
pub struct ChatPlan {
    pub answer: AnswerSpec,
    /// The grammar sampling must follow, if any.
    pub constraint: Option<Constraint>,
}

impl ChatPlan {
    /// Decides the constraint: a forced tool call (`required` or a named function) wins, then
    /// the client's `response_format`, then under `auto` the lazy grammar that keeps a started
    /// call valid. The error is about `tool_choice`.
    pub fn new(
        req: &ChatRequest,
        model: &LoadedModel,
        response_format: Option<Constraint>,
    ) -> Result<Self, String> {
        let dialect = model.template.dialect();
        let tools = req.offered_tools();
        let calls = call_constraint(
            tools,
            &req.tool_choice,
            dialect.tools,
            req.parallel_tool_calls,
        )?;
        let forced = matches!(
            req.tool_choice,
            ToolChoice::Required | ToolChoice::Function(_)
        );
        let constraint = match (forced, response_format) {
            (true, _) | (false, None) => calls,
            (false, Some(format)) => Some(format),
        };
        Ok(Self {
            answer: AnswerSpec {
                tools: (!tools.is_empty()).then(|| std::sync::Arc::new(ToolSet::new(tools))),
                one_call: !req.parallel_tool_calls,
                opens_thinking: false,
                think: dialect.think,
            },
            constraint,
        })
    }
}

/// Renders and tokenizes the conversation (CPU work: run it off the async runtime), noting in
/// the plan whether the prompt leaves the model thinking.
pub fn render(
    model: &LoadedModel,
    req: &ChatRequest,
    plan: &mut ChatPlan,
    limits: &PromptLimits,
    cancel: &AtomicBool,
) -> Result<Vec<TokenId>, PromptError> {
    let prompt = chat_prompt(
        &model.template,
        &model.control,
        model.engine.as_ref(),
        &req.messages,
        req.offered_tools(),
        limits,
        cancel,
    )?;
    plan.answer.opens_thinking = prompt.opens_thinking;
    Ok(prompt.tokens)
}
