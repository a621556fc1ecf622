//! Inference engines. The HTTP layer only ever sees the [`Backend`] trait: it hands over
//! prompt tokens and sampling settings and receives a stream of [`Event`]s, so the scheduler
//! and the backends (llama.cpp, MLX) can change without touching the API.

pub mod admission;
pub mod grammar;
pub mod llama;
pub mod mlx;
pub mod options;
pub mod prompt_cache;
pub mod sampling;
pub mod scheduler;
pub mod speculation;
pub mod text;

use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;

pub use sampling::SamplingParams;

/// What the memory estimate and the inventory need from a model on disk, whatever its
/// format (a GGUF header, an MLX folder's `config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelFacts {
    pub architecture: String,
    pub layers: u32,
    /// KV heads summed over all layers (some architectures vary them per layer).
    pub kv_heads_all_layers: u64,
    pub key_length: u32,
    pub value_length: u32,
    pub embedding_length: u32,
    pub context_train: u32,
    pub vocab_size: u32,
    /// Quantisation the model declares (`Q4_K_M`, `F16`, `4bit`, ...).
    pub file_type: Option<String>,
    /// Attention (query) heads per layer.
    pub head_count: u32,
    /// Whether some layers attend over a sliding window (llama.cpp then builds a second mask).
    pub sliding_window: bool,
    /// Weight bytes llama.cpp copies into a repacked CPU layout on top of the mapped file.
    pub repacked_bytes: u64,
    /// Chat, embedding or reranking: decides which routes serve it and how it is loaded.
    pub kind: ModelKind,
}

/// What a model is for, read from its header (a pooling type makes an embedding model, rank
/// pooling a cross-encoder reranker), so a chat request to an embedder, or the reverse, is a
/// clear 400 rather than garbage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    #[default]
    Chat,
    /// Pooled vectors (`/v1/embeddings`); the pooling is llama.cpp's type number.
    Embedding { pooling: u32 },
    /// A cross-encoder scoring (query, document) pairs (rank pooling).
    Reranker,
}

impl ModelKind {
    /// The word LM Studio's lists and the admin inventory use.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Chat => "llm",
            Self::Embedding { .. } => "embedding",
            Self::Reranker => "reranker",
        }
    }

    /// llama.cpp's pooling type for this kind (`None` for chat).
    pub fn from_pooling(pooling: Option<u64>) -> Self {
        match pooling {
            None | Some(0) => Self::Chat,
            Some(4) => Self::Reranker,
            Some(p) => Self::Embedding { pooling: p as u32 },
        }
    }
}

/// A token id in the model's vocabulary.
pub type TokenId = i32;

/// Why the engine could not do what was asked.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum EngineError {
    /// llama.cpp refused the file (corrupt, truncated, unsupported architecture).
    #[error("failed to load model: {0}")]
    Load(String),
    /// The prompt does not leave room to generate within one sequence's context.
    #[error("this model's maximum context length is {context} tokens, but the prompt has {prompt} tokens{}", completion.map(|c| format!(" and {c} completion tokens were requested")).unwrap_or_default())]
    ContextLength {
        context: u32,
        prompt: u32,
        completion: Option<u32>,
    },
    /// Every sequence is busy and the wait queue is full.
    #[error("the server is busy: all sequences are in use and the queue of {queue} waiting requests is full; retry after {retry_after_secs} s")]
    QueueFull { queue: u32, retry_after_secs: u32 },
    /// The model was unloaded while the request waited or ran.
    #[error("the model was unloaded while this request was in progress")]
    Unloaded,
    /// llama.cpp failed during decoding.
    #[error("inference failed: {0}")]
    Decode(String),
    /// A parameter the engine itself checks (e.g. token ids in `logit_bias`).
    #[error("{message}")]
    InvalidParam {
        param: &'static str,
        message: String,
    },
}

/// One generation job: already tokenized, already validated against the context size.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt: Vec<TokenId>,
    /// Most tokens to generate; generation ends earlier at end-of-generation or a stop string.
    pub max_tokens: u32,
    /// Strings that end generation; the matched string is not returned.
    pub stop: Vec<String>,
    pub sampling: SamplingParams,
    /// Output the engine must produce, whatever the model would rather say.
    pub constraint: Option<Constraint>,
    /// Report each generated token's log-probability and this many alternatives (0..=20).
    pub logprobs: Option<u8>,
    /// This request's speculation instead of the model's; `None` uses the model's.
    pub speculation: Option<options::Speculation>,
    /// Admission order (lower first, vLLM's meaning); `None` is 0. See [`admission`].
    pub priority: Option<admission::Priority>,
    /// Who sent it, for fair shares between clients; `None` is one anonymous client.
    pub client: Option<std::sync::Arc<str>>,
}

/// One generated token's log-probability, and the most likely alternatives at its place.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: TokenText,
    pub logprob: f32,
    pub top: Vec<(TokenText, f32)>,
}

/// A token as text and as the raw bytes it stands for (a token may hold part of a character).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenText {
    pub text: String,
    pub bytes: Vec<u8>,
}

/// Constrained output: JSON that matches `schema`, written between `prefix` and `suffix`
/// (a tool call's markers, or nothing). Backends enforce it while sampling (llama.cpp: a
/// grammar built from the schema), so the result always parses.
#[derive(Debug, Clone, PartialEq)]
pub struct Constraint {
    pub schema: serde_json::Value,
    pub prefix: String,
    pub suffix: String,
    /// The request field it came from, for errors (`response_format`, `tool_choice`).
    pub param: &'static str,
    /// Several wrapped values in a row (parallel tool calls), whitespace between.
    pub repeat: bool,
    /// Lazy: free text until one of these regular expressions matches the output, then the
    /// grammar from the match (its first group, if any) on. Empty: constrained from the start.
    pub triggers: Vec<String>,
}

/// Why a generation ended, as OpenAI names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    Length,
    /// The answer ended in tool calls (decided by the chat layer, never by the engine).
    ToolCalls,
}

impl FinishReason {
    /// OpenAI's name for it (also the metrics label).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::ToolCalls => "tool_calls",
        }
    }
}

/// Token counts for one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Prompt tokens whose KV came from the cache instead of being computed.
    pub cached_tokens: u32,
}

/// What the engine reports while a request runs. Text is always whole UTF-8 characters.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// More generated text (never split inside a character, never part of a stop string).
    Text(String),
    /// A token was generated (sent before its text, only when logprobs were asked for).
    Logprob(TokenLogprob),
    /// Generation ended normally.
    Done {
        finish_reason: FinishReason,
        usage: Usage,
        /// Time from admission to the first generated token.
        time_to_first_token: Duration,
        /// Time from admission to the end.
        total_time: Duration,
    },
    /// Generation ended abnormally; the stream carries this as a structured error.
    Error(EngineError),
}

/// What a loaded model reports about itself.
#[derive(Debug, Clone, Serialize)]
pub struct ModelInfo {
    pub architecture: String,
    /// Context tokens each sequence may use (prompt + completion).
    pub context_per_sequence: u32,
    /// Sequences decoded together.
    pub parallel: u32,
    /// Context the model was trained with.
    pub context_train: u32,
    pub parameters: u64,
    pub gpu_layers: u32,
    pub threads: u32,
    /// Token ids run from 0 to this (exclusive); prompts of token ids are checked against it.
    pub vocab_size: u32,
    /// Whether sequences are decoded one by one for reproducible output (see `LoadOptions`).
    pub batch_invariant: bool,
    /// Width of the model's hidden state: an embedding model's vector size.
    pub embedding_length: u32,
}

/// What loading a model takes, by part, worked out before loading so that the memory guard
/// can refuse or make room first, and so a refusal can show its numbers.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct MemoryEstimate {
    pub weights_bytes: u64,
    pub kv_cache_bytes: u64,
    /// Compute graph, output buffer and bookkeeping.
    pub overhead_bytes: u64,
    pub total_bytes: u64,
    /// Of the total, what lands in GPU memory (0 without offload).
    pub gpu_bytes: u64,
    /// Of the total, what lands in system RAM.
    pub ram_bytes: u64,
}

impl MemoryEstimate {
    /// Two loads' worth, for a model that brings a second (a draft) with it.
    pub fn plus(&self, o: &MemoryEstimate) -> MemoryEstimate {
        MemoryEstimate {
            weights_bytes: self.weights_bytes + o.weights_bytes,
            kv_cache_bytes: self.kv_cache_bytes + o.kv_cache_bytes,
            overhead_bytes: self.overhead_bytes + o.overhead_bytes,
            total_bytes: self.total_bytes + o.total_bytes,
            gpu_bytes: self.gpu_bytes + o.gpu_bytes,
            ram_bytes: self.ram_bytes + o.ram_bytes,
        }
    }
}

/// One request a scheduler holds, as `GET /v1/queue` and the status show it.
#[derive(Debug, Clone)]
pub struct Held {
    pub client: std::sync::Arc<str>,
    pub priority: admission::Priority,
    /// When it reached the engine: its age in the admission order.
    pub since: std::time::Instant,
    /// Where its priority's aging counts from (see [`admission::Served`]).
    pub aging_from: std::time::Instant,
    /// Holding a sequence (else waiting for one, or paused).
    pub running: bool,
}

/// One client's share of a model's scheduler now.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClientLoad {
    /// Its name (empty: requests that named none and came without a configured key).
    pub client: String,
    pub running: u32,
    pub queued: u32,
    /// The best (lowest) priority among its requests.
    pub priority: admission::Priority,
}

impl ClientLoad {
    /// Each client's share of `held`: (client, priority, running) for every request a
    /// scheduler holds. One tally for both engines.
    pub fn tally<'a>(
        held: impl IntoIterator<Item = (&'a str, admission::Priority, bool)>,
    ) -> Vec<ClientLoad> {
        let mut by: std::collections::BTreeMap<&str, ClientLoad> = Default::default();
        for (client, priority, running) in held {
            let c = by.entry(client).or_insert_with(|| ClientLoad {
                client: client.to_string(),
                running: 0,
                queued: 0,
                priority: admission::Priority::MAX,
            });
            c.priority = c.priority.min(priority);
            if running {
                c.running += 1;
            } else {
                c.queued += 1;
            }
        }
        by.into_values().collect()
    }
}

/// Live counters of one model's scheduler.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct SchedulerStats {
    /// Requests holding a sequence (prefilling or generating).
    pub active_sequences: u32,
    /// Requests waiting for a sequence.
    pub queued_requests: u32,
    /// Most requests that may wait before new ones are refused with 429.
    pub max_queue: u32,
    /// Requests admitted to a sequence.
    pub requests_total: u64,
    /// Requests whose client hung up before the end (queued or running).
    pub cancelled_total: u64,
    /// Requests refused because the queue was full.
    pub rejected_total: u64,
    pub prompt_tokens_total: u64,
    /// Prompt tokens served from the prefix cache instead of being computed.
    pub cached_prompt_tokens_total: u64,
    pub completion_tokens_total: u64,
    /// Sequences paused for higher-priority requests, and what their resumes cost.
    pub preemption: PreemptionStats,
    /// Prompt tokens computed per second, over the last few seconds.
    pub prompt_tokens_per_second: f64,
    /// Tokens generated per second across all sequences, over the last few seconds.
    pub decode_tokens_per_second: f64,
    /// Prefixes in the prompt cache's disk tier for this model; `None` while it opens, or
    /// when there is none.
    pub prompt_cache_files: Option<u32>,
    /// Bytes of finished sequences' KV kept in memory for reuse, where that is not part of
    /// the fixed KV cache (MLX); `None` where prefixes live in the KV cache itself (GGUF).
    pub prompt_cache_bytes: Option<u64>,
    /// Requests that reused a cached prefix.
    pub prompt_cache_hits_total: u64,
    pub speculation: SpeculationStats,
}

/// What preemption did for one model: a resume that loses nothing restores every token and
/// recomputes none.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PreemptionStats {
    /// Running sequences paused so a higher-priority request could run.
    pub paused_total: u64,
    /// Tokens whose KV a resumed request got back without computing them.
    pub restored_tokens_total: u64,
    /// Tokens a resumed request had to compute again (its KV could not be kept).
    pub recomputed_tokens_total: u64,
}

/// What speculation did for one model: acceptance is `accepted / proposed`.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct SpeculationStats {
    /// The mode requests get unless they name one.
    pub mode: options::Speculation,
    /// Proposed tokens verified by the target.
    pub proposed_tokens_total: u64,
    /// Of those, the ones the target kept.
    pub accepted_tokens_total: u64,
    /// Steps in which a sequence verified a proposal.
    pub speculative_steps_total: u64,
}

/// A loaded model that can generate. Implementations own their threads and memory; dropping
/// the last handle after [`Backend::shutdown`] releases everything.
pub trait Backend: Send + Sync {
    /// Facts about the loaded model.
    fn info(&self) -> &ModelInfo;
    /// The model's chat template source text, if it ships one.
    fn chat_template_source(&self) -> Option<&str>;
    /// Special tokens as text, for templates (`bos_token`, `eos_token`).
    fn special_tokens(&self) -> (String, String);
    /// Whether the vocabulary contains this exact special token.
    fn has_special_token(&self, text: &str) -> bool;
    /// Tokenizes prompt text; `add_bos` prepends BOS when the model wants one and it is absent.
    /// With `special`, text such as `<|im_start|>` becomes its control token (template text);
    /// without, it stays plain text (what users wrote).
    fn tokenize(&self, text: &str, add_bos: bool, special: bool) -> Vec<TokenId>;
    /// The text of every control token (and the unknown token): what user text must never be
    /// allowed to turn into.
    fn control_texts(&self) -> &[String];
    /// Queues a request. Events arrive on the returned channel; dropping the receiver
    /// cancels the request and frees its sequence.
    fn submit(&self, req: GenerationRequest)
        -> Result<mpsc::UnboundedReceiver<Event>, EngineError>;
    /// Scheduler counters.
    fn stats(&self) -> SchedulerStats;
    /// Why this engine can no longer serve (its worker died), if it cannot: the registry
    /// then replaces it with a fresh load instead of routing requests to it.
    fn failed(&self) -> Option<String> {
        None
    }
    /// A worker process's id and resident memory in bytes, for engines that run one.
    fn worker(&self) -> Option<(u32, u64)> {
        None
    }
    /// Stops the scheduler: queued and running requests end with [`EngineError::Unloaded`].
    /// Blocks until the model's memory is released.
    fn shutdown(&self);
    /// Each client's running and waiting requests, for `/admin/status`.
    fn clients(&self) -> Vec<ClientLoad> {
        ClientLoad::tally(
            self.held()
                .iter()
                .map(|h| (&*h.client, h.priority, h.running)),
        )
    }
    /// Every request the scheduler holds now, running or waiting.
    fn held(&self) -> Vec<Held> {
        Vec::new()
    }
    /// Memory held by reusable prefixes beyond the model's fixed footprint (the MLX worker's
    /// prefix cache), which the memory guard may reclaim before it evicts a model.
    fn prefix_cache_bytes(&self) -> u64 {
        0
    }
    /// Drops those prefixes, long ones to the disk tier first. Blocking.
    fn release_prefix_cache(&self) {}
    /// Chat, embedding or reranking.
    fn kind(&self) -> ModelKind {
        ModelKind::Chat
    }
    /// Queues whole inputs (tokenized with [`Backend::tokenize`], special tokens added) for
    /// one vector each (one score each on a reranker); the answer arrives on the channel, in
    /// input order. Dropping the receiver cancels what has not run.
    fn embed(&self, _inputs: Vec<Vec<TokenId>>) -> Result<EmbedReceiver, EngineError> {
        Err(EngineError::InvalidParam {
            param: "model",
            message: "this model generates text; it has no embeddings".into(),
        })
    }
}

/// Where an embedding request's vectors arrive.
pub type EmbedReceiver = tokio::sync::oneshot::Receiver<Result<Vec<Vec<f32>>, EngineError>>;

#[cfg(test)]
mod tests {
    use super::ModelKind;

    #[test]
    fn the_pooling_type_says_what_a_model_is_for() {
        // llama.cpp: 0 none, 1 mean, 2 cls, 3 last, 4 rank.
        assert_eq!(ModelKind::from_pooling(None), ModelKind::Chat);
        assert_eq!(ModelKind::from_pooling(Some(0)), ModelKind::Chat);
        assert_eq!(
            ModelKind::from_pooling(Some(1)),
            ModelKind::Embedding { pooling: 1 }
        );
        assert_eq!(
            ModelKind::from_pooling(Some(3)),
            ModelKind::Embedding { pooling: 3 }
        );
        assert_eq!(ModelKind::from_pooling(Some(4)), ModelKind::Reranker);
        assert_eq!(ModelKind::Reranker.as_str(), "reranker");
    }
}
