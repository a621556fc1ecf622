//! opta-lmx: a headless, OpenAI-compatible inference server for local language models.
//!
//! Layers, outermost first: [`api`] (HTTP) → [`models`] (which models exist and are loaded)
//! → [`engine`] (scheduling and inference) ; [`chat`] renders prompts, [`config`],
//! [`system`] and [`metrics`] support them all. [`server`] wires them together.

pub mod api;
pub mod audit;
pub mod chat;
pub mod config;
pub mod engine;
pub mod logging;
pub mod metrics;
pub mod models;
pub mod presets;
pub mod server;
pub mod system;
