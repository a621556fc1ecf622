//! Command-line interface: `serve` runs the server; the other subcommands are a thin client
//! of a running server's admin API.

pub mod chat;
pub mod client;
pub mod service;
pub mod tables;

use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use opta_lmx::config::{Config, LogFormat};
use opta_lmx::engine::options::{FlashAttention, KvType, Speculation};

/// opta-lmx: OpenAI-compatible inference server for local models.
#[derive(Debug, Parser)]
#[command(name = "opta-lmx", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (config file, then OPTA_LMX_* variables, then these flags).
    Serve(Box<ServeArgs>),
    /// Show memory, loaded models, performance and downloads of a running server.
    Status(ListArgs),
    /// List models on disk and their loaded state.
    Models(ListArgs),
    /// Chat with a model: one answer streamed for a prompt, or a conversation without one.
    Chat(ChatArgs),
    /// The server's GGUF quantizer, run as a child of a `/admin/quantize` job (so a cancel
    /// is a kill): not for people.
    #[command(hide = true)]
    QuantizeWorker {
        #[arg(long)]
        input: std::path::PathBuf,
        #[arg(long)]
        output: std::path::PathBuf,
        /// llama.cpp's `LLAMA_FTYPE_MOSTLY_*` number.
        #[arg(long)]
        ftype: u32,
        #[arg(long)]
        threads: u32,
    },
    /// Whether llama.cpp reads a GGUF's header and vocabulary, run as a child of
    /// `/admin/models/probe`: not for people.
    #[command(hide = true)]
    ProbeWorker {
        #[arg(long)]
        input: std::path::PathBuf,
    },
    /// Run the server as a launchd (macOS) or systemd (Linux) service.
    Service {
        #[command(subcommand)]
        action: service::ServiceCommand,
    },
    /// Load a model into a running server.
    Load {
        /// Model id as listed by `opta-lmx models`.
        model_id: String,
        /// Context tokens per sequence.
        #[arg(long)]
        context: Option<u32>,
        /// Sequences decoded together.
        #[arg(long)]
        parallel: Option<u32>,
        /// Never evict it to make room for another model.
        #[arg(long)]
        pin: bool,
        /// Unload after this many idle seconds.
        #[arg(long)]
        ttl_seconds: Option<u64>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Download a model from the Hugging Face Hub (verified) and follow its progress.
    Download {
        /// `org/repo`, `org/repo:Q4_K_M` or `org/repo/file.gguf`.
        model_id: String,
        /// Glob over the repository's files, e.g. "*Q4_K_M*.gguf".
        #[arg(long)]
        pattern: Option<String>,
        /// Branch, tag or commit (default main).
        #[arg(long)]
        revision: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List download jobs.
    Downloads(ListArgs),
    /// Delete a model's files from disk.
    Delete {
        model_id: String,
        /// Confirm the deletion (required).
        #[arg(long)]
        yes: bool,
        /// Unload it first if it is loaded.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Unload a model from a running server.
    Unload {
        model_id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// Flags of `serve`; each overrides the file and environment.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Config file (default ~/.opta-lmx/config.yaml; a missing default file is fine).
    #[arg(long, env = "OPTA_LMX_CONFIG")]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub host: Option<IpAddr>,
    #[arg(long)]
    pub port: Option<u16>,
    /// Directory scanned for models.
    #[arg(long)]
    pub models_dir: Option<PathBuf>,
    /// Model to load at start (repeatable); replaces the configured list.
    #[arg(long = "model")]
    pub models: Vec<String>,
    /// Model used when a request leaves `model` empty.
    #[arg(long)]
    pub default_model: Option<String>,
    /// Load models on disk when a request names them.
    #[arg(long)]
    pub load_on_demand: bool,
    /// Context tokens per sequence for loads that do not say.
    #[arg(long)]
    pub context: Option<u32>,
    /// Sequences decoded together for loads that do not say.
    #[arg(long)]
    pub parallel: Option<u32>,
    /// Requests that may wait for a busy model before new ones get 429.
    #[arg(long)]
    pub max_queue: Option<u32>,
    /// Seconds of stream silence before an SSE keep-alive comment.
    #[arg(long)]
    pub sse_keepalive_seconds: Option<f64>,
    /// CPU threads per model (default: physical cores less one; see bench/threads.sh).
    #[arg(long)]
    pub threads: Option<u32>,
    /// Decode each sequence alone so its output never depends on other requests (slower).
    #[arg(long)]
    pub batch_invariant: bool,
    #[arg(long)]
    pub gpu_layers: Option<u32>,
    /// KV cache type for keys: f16, q8_0, q4_0.
    #[arg(long, value_parser = setting::<KvType>)]
    pub cache_type_k: Option<KvType>,
    /// KV cache type for values: f16, q8_0, q4_0 (quantised needs flash attention).
    #[arg(long, value_parser = setting::<KvType>)]
    pub cache_type_v: Option<KvType>,
    /// Fused attention: auto, on, off.
    #[arg(long, value_parser = setting::<FlashAttention>)]
    pub flash_attention: Option<FlashAttention>,
    /// Speculative decoding for loads that do not say: off, ngram, draft.
    #[arg(long, value_parser = setting::<Speculation>)]
    pub speculation: Option<Speculation>,
    /// Draft model id for `--speculation draft` (same vocabulary as the target).
    #[arg(long)]
    pub draft_model: Option<String>,
    /// Most tokens proposed per sequence per step.
    #[arg(long)]
    pub draft_max: Option<u32>,
    /// Verify every proposal, even where measurements say it does not pay (benchmarks).
    #[arg(long)]
    pub speculation_always: bool,
    /// Most models loaded at once (least recently used idle ones are evicted).
    #[arg(long)]
    pub max_loaded_models: Option<u32>,
    /// Idle seconds after which a model is unloaded (models that do not set their own).
    #[arg(long)]
    pub ttl_seconds: Option<u64>,
    /// Base URL of the Hugging Face Hub or a mirror (like HF_ENDPOINT).
    #[arg(long)]
    pub hf_endpoint: Option<String>,
    /// Percentage of RAM that loads may not push usage past.
    #[arg(long)]
    pub memory_threshold: Option<f64>,
    #[arg(long, value_parser = ["text", "json"])]
    pub log_format: Option<String>,
    #[arg(long)]
    pub log_level: Option<String>,
    #[arg(long)]
    pub log_file: Option<PathBuf>,
    /// Append the audit log of admin actions here.
    #[arg(long)]
    pub audit_file: Option<PathBuf>,
    /// Serve HTTPS with this PEM certificate chain (with --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Let a scraper read /metrics without the admin key.
    #[arg(long)]
    pub metrics_open: bool,
    /// Directory of the prompt cache's disk tier.
    #[arg(long)]
    pub prompt_cache_dir: Option<PathBuf>,
    /// Bound on the prompt cache's directory, in GB.
    #[arg(long)]
    pub prompt_cache_max_gb: Option<f64>,
    /// Keep prefixes in memory only.
    #[arg(long)]
    pub no_prompt_cache: bool,
}

/// Parses a flag spelled as in the YAML file (`q8_0`, `auto`, `ngram`).
fn setting<T: serde::de::DeserializeOwned>(v: &str) -> Result<T, String> {
    serde_yaml_ng::from_str(v.trim()).map_err(|e| format!("`{v}`: {e}"))
}

impl ServeArgs {
    /// Applies the flags on top of file and environment, re-checking the result.
    pub fn apply(self, cfg: &mut Config) -> Result<(), String> {
        let s = &mut cfg.server;
        let m = &mut cfg.models;
        if let Some(v) = self.host {
            s.host = v;
        }
        if let Some(v) = self.port {
            s.port = v;
        }
        if let Some(v) = self.models_dir {
            m.directory = v;
        }
        if !self.models.is_empty() {
            m.load_at_start = self.models;
        }
        if let Some(v) = self.default_model {
            m.default = Some(v);
        }
        if self.load_on_demand {
            m.load_on_demand = true;
        }
        if let Some(v) = self.context {
            m.defaults.context = Some(v);
        }
        if let Some(v) = self.parallel {
            m.defaults.parallel = Some(v);
        }
        if let Some(v) = self.max_queue {
            m.defaults.max_queue = Some(v);
        }
        if let Some(v) = self.sse_keepalive_seconds {
            s.sse_keepalive_seconds = v;
        }
        if let Some(v) = self.threads {
            m.defaults.threads = Some(v);
        }
        if self.batch_invariant {
            m.defaults.batch_invariant = Some(true);
        }
        let d = &mut m.defaults;
        d.cache_type_k = self.cache_type_k.or(d.cache_type_k);
        d.cache_type_v = self.cache_type_v.or(d.cache_type_v);
        d.flash_attention = self.flash_attention.or(d.flash_attention);
        d.speculation = self.speculation.or(d.speculation);
        d.draft_model = self.draft_model.or(d.draft_model.take());
        d.draft_max = self.draft_max.or(d.draft_max);
        if self.speculation_always {
            d.speculation_adaptive = Some(false);
        }
        if let Some(v) = self.gpu_layers {
            m.defaults.gpu_layers = Some(v);
        }
        if let Some(v) = self.max_loaded_models {
            m.max_loaded_models = Some(v);
        }
        if let Some(v) = self.ttl_seconds {
            m.defaults.ttl_seconds = Some(v);
        }
        if let Some(v) = self.hf_endpoint {
            cfg.hub.endpoint = v;
        }
        if let Some(v) = self.memory_threshold {
            cfg.memory.threshold_percent = v;
        }
        if let Some(v) = self.log_format {
            cfg.logging.format = if v == "json" {
                LogFormat::Json
            } else {
                LogFormat::Text
            };
        }
        if let Some(v) = self.log_level {
            cfg.logging.level = v;
        }
        if let Some(v) = self.log_file {
            cfg.logging.file = Some(v);
        }
        if let Some(v) = self.audit_file {
            cfg.audit.file = Some(v);
        }
        if let (Some(cert), Some(key)) = (self.tls_cert, self.tls_key) {
            cfg.server.tls = Some(opta_lmx::config::TlsConfig { cert, key });
        }
        if self.metrics_open {
            cfg.server.metrics_open = true;
        }
        if let Some(v) = self.prompt_cache_dir {
            cfg.models.prompt_cache.directory = v;
        }
        if let Some(v) = self.prompt_cache_max_gb {
            cfg.models.prompt_cache.max_gb = v;
        }
        if self.no_prompt_cache {
            cfg.models.prompt_cache.enabled = false;
        }
        cfg.finish().map_err(|(key, reason)| {
            format!(
                "--{}: {reason}",
                key.rsplit('.').next().unwrap_or(&key).replace('_', "-")
            )
        })
    }
}

/// Where the client subcommands find the server.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Base URL of the running server.
    #[arg(long, env = "OPTA_LMX_URL", default_value = "http://127.0.0.1:1234")]
    pub url: String,
    /// Admin key, if the server requires one.
    #[arg(long, env = "OPTA_LMX_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
    /// API key for /v1 (chat), if the server requires one.
    #[arg(long, env = "OPTA_LMX_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// PEM file of the CA that signed an HTTPS server's certificate.
    #[arg(long, env = "OPTA_LMX_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
}

/// Flags of the listing subcommands.
#[derive(Debug, Clone, Args)]
pub struct ListArgs {
    /// The server's JSON answer instead of a table (for scripts).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Flags of `chat`.
#[derive(Debug, Clone, Args)]
pub struct ChatArgs {
    /// Model id (default: the server's default model).
    #[arg(short, long)]
    pub model: Option<String>,
    /// The prompt; without one, an interactive conversation reads lines from standard input
    /// (`/reset` forgets the history, `/exit` or end of input leaves).
    pub prompt: Option<String>,
    /// A system message put before the conversation.
    #[arg(short, long)]
    pub system: Option<String>,
    #[arg(long)]
    pub max_tokens: Option<u32>,
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// After each answer, print its token counts and speed to standard error.
    #[arg(short, long)]
    pub verbose: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}
