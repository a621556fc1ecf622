//! The chat layer between HTTP and the engine: one chat request for every dialect, rendered
//! with the model's template so only the template speaks in control tokens, and the answer
//! split into content, reasoning and tool calls in the model's own format.

pub mod answer;
pub mod dialect;
pub mod pipeline;
pub mod prompt;
pub mod reasoning;
pub mod request;
pub mod template;
pub mod tools;
pub mod toolset;
