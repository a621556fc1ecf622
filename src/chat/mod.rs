//! Chat prompt construction (and, later, tool-call parsing).

pub mod template;
