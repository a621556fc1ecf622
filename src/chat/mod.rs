//! The chat layer between HTTP and the engine: chat templates, and prompts built so that only
//! the template speaks in control tokens (later, tool-call parsing).

pub mod answer;
pub mod prompt;
pub mod reasoning;
pub mod template;
pub mod tools;
