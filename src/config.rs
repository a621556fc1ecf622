//! Server configuration: YAML file, then `OPTA_LMX_*` environment variables, then flags.
//!
//! Every layer is validated the same way, and a bad value names where it came from (file and
//! key, or variable) so that a mistyped config stops the start instead of serving surprises.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::engine::options::{check_cache_types, FlashAttention, KvType, Speculation};

/// Why the configuration could not be used; the message names the source, key and reason.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists but could not be read.
    #[error("config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not valid YAML for this schema.
    #[error("config file {path}: key `{key}`: {reason}")]
    Parse {
        path: PathBuf,
        key: String,
        reason: String,
    },
    /// An environment variable or flag holds a value that cannot be used.
    #[error("{source_name}: {reason}")]
    Value { source_name: String, reason: String },
}

/// The whole configuration as the server uses it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub models: ModelsConfig,
    pub memory: MemoryConfig,
    pub logging: LoggingConfig,
    pub hub: HubConfig,
    pub requests: RequestsConfig,
    pub audit: AuditConfig,
    /// The clients this server knows by key (the coding CLI, each bot).
    pub clients: Vec<ClientConfig>,
    /// Named presets requests may use as their `model` (see [`crate::presets`]).
    pub presets: Vec<crate::presets::Preset>,
}

/// One client: its own API key (several may be valid at once; removing one revokes it), the
/// priority its requests get unless they ask, the best it may ask for, how many of its
/// requests may be in flight at once and how many tokens it may use a minute.
#[derive(Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ClientConfig {
    /// Shown in logs and status: letters, digits and `._:@-`, at most 64.
    pub name: String,
    /// Accepted wherever the API key is; a request with it is this client's.
    pub key: Option<String>,
    /// Priority of its requests that name none (lower runs first; default 0).
    pub priority: Option<i32>,
    /// The lowest priority number its requests may use; asking for better gets this.
    pub best_priority: Option<i32>,
    /// Requests in flight (running or queued) at once; more get 429 with `Retry-After`.
    pub max_requests: Option<u32>,
    /// Requests waiting for a sequence on one model at once (paused ones included); more get
    /// 429 with `Retry-After`.
    pub max_queued: Option<u32>,
    /// Tokens (prompt and generated, of finished generations) over the last minute; once
    /// reached, its requests get 429 with `Retry-After` until enough of them age out.
    pub tokens_per_minute: Option<u64>,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("name", &self.name)
            .field("key", &self.key.as_ref().map(|_| "<redacted>"))
            .field("priority", &self.priority)
            .field("best_priority", &self.best_priority)
            .field("max_requests", &self.max_requests)
            .field("max_queued", &self.max_queued)
            .field("tokens_per_minute", &self.tokens_per_minute)
            .finish()
    }
}

/// The audit log of admin actions (see `crate::audit`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    pub enabled: bool,
    /// Where the JSON lines go; default `audit.jsonl` beside the log file, or
    /// `~/.opta-lmx/logs/audit.jsonl` when logs go to standard error.
    pub file: Option<PathBuf>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            file: None,
        }
    }
}

/// HTTPS: a certificate chain and its private key, both PEM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Bounds on what one request may make the server read, render and tokenize, so one client
/// cannot take the CPU, memory or sockets the others need.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RequestsConfig {
    /// Largest request body; larger ones get 413 before they are parsed.
    pub max_body_bytes: usize,
    /// Seconds a client may take to send its whole body; a stalled upload gets 408.
    pub body_timeout_seconds: f64,
    /// Most messages in one chat request.
    pub max_messages: usize,
    /// Most characters of prompt text; `None`: 32 per context token of the model (far above
    /// any real prompt that fits, far below what makes tokenizing slow).
    pub max_prompt_chars: Option<usize>,
    /// Let control-token text in message content become control tokens (`<|im_start|>` in a
    /// user message would then open a new turn). Only for setups whose clients are trusted.
    pub special_tokens_in_content: bool,
    /// Most grammar work (`response_format`, `tool_choice`) choosing one token may take, in
    /// milliseconds, before the request ends with a 400 naming this limit. The work is done in
    /// shares of the scheduler's steps, so other requests are never held by it.
    pub grammar_ms_per_token: u64,
    /// Seconds of waiting that better a queued request's priority by one step, so a low one
    /// is admitted in the end under constant higher-priority load.
    pub priority_aging_seconds: f64,
    /// Priorities, client shares and preemption; off, each model serves first come, first
    /// served (what the priority benchmark compares against).
    pub priorities: bool,
}

impl Default for RequestsConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 32 * 1024 * 1024,
            body_timeout_seconds: 30.0,
            max_messages: 4096,
            max_prompt_chars: None,
            special_tokens_in_content: false,
            grammar_ms_per_token: 5000,
            priority_aging_seconds: 10.0,
            priorities: true,
        }
    }
}

/// Where the server listens and which keys guard it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    pub host: IpAddr,
    pub port: u16,
    /// When set, `/v1` requests need `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// When set, `/admin` requests (except health) need `X-Admin-Key` or Bearer with this key.
    pub admin_key: Option<String>,
    /// Seconds of silence after which a stream gets an SSE comment, so proxies and client
    /// timeouts do not cut a stream that waits in the queue or on a long prefill.
    pub sse_keepalive_seconds: f64,
    /// With no key configured, `/admin` answers only loopback clients unless this is set.
    pub admin_open: bool,
    /// Seconds a connection may wait for a request's complete headers, counted from when it
    /// opened or its previous response ended: drops idle keep-alive sockets and clients that
    /// send headers a byte at a time.
    pub header_timeout_seconds: f64,
    /// Seconds a stop (SIGTERM, Ctrl-C) waits for in-flight responses to finish before it
    /// closes them: long enough for a stream to end, short enough for a service manager's
    /// stop timeout.
    pub drain_seconds: f64,
    /// Most open connections. At the limit a new one closes the longest-idle connection (or
    /// one stalled on a client that reads nothing), or is answered 503 when every connection
    /// is busy.
    pub max_connections: usize,
    /// Seconds a connection may hold a response its client does not take (a full socket, an
    /// HTTP/2 window left at zero) before it is closed: a client that reads nothing cannot
    /// hold a connection, its buffers or the cap for longer.
    pub write_timeout_seconds: f64,
    /// Most concurrent streams on one HTTP/2 connection.
    pub h2_max_streams: u32,
    /// Serve HTTPS with this certificate and key instead of plain HTTP.
    pub tls: Option<TlsConfig>,
    /// Let anyone who reaches the port scrape `/metrics` (a Prometheus without the admin
    /// key); otherwise it is guarded like `/admin`.
    pub metrics_open: bool,
    /// Advertise the server on the LAN as `_opta-lmx._tcp` (mDNS/DNS-SD) when it listens
    /// beyond loopback, so the coding CLI finds it with no host set. Never on loopback.
    pub mdns: bool,
}

/// Where models live and how they are served.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ModelsConfig {
    pub directory: PathBuf,
    /// Model used when a request leaves `model` empty; an unknown id is always a 404, never
    /// silently swapped for this one.
    pub default: Option<String>,
    /// Extra names for model ids, e.g. `gpt-4o-mini: gemma-3-270m-q4_k_m`.
    pub aliases: BTreeMap<String, String>,
    /// Role names (`code`, `chat`, `auto`) with models in order of preference: a request
    /// naming a role gets the first one loaded, else the first one (`/admin/stack`).
    pub roles: BTreeMap<String, Vec<String>>,
    /// Model ids loaded when the server starts.
    pub load_at_start: Vec<String>,
    /// Load a model on disk when a request names it, instead of answering 404.
    pub load_on_demand: bool,
    /// Defaults for every load that does not say otherwise.
    pub defaults: ModelSettings,
    /// Settings for particular model ids, over `defaults` (a load request overrides both).
    pub per_model: BTreeMap<String, ModelSettings>,
    /// Most models in memory at once; a load past it evicts the least recently used idle,
    /// unpinned one (or is refused). `None`: only memory limits it.
    pub max_loaded_models: Option<u32>,
    /// The MLX worker processes.
    pub mlx: MlxConfig,
    /// Which format a name means when a folder holds a model in both: `mlx` on macOS (the
    /// seed's primary engine there), `gguf` elsewhere.
    pub prefer: Format,
    /// The disk tier of the prefix cache.
    pub prompt_cache: PromptCacheConfig,
    /// Embedding inputs longer than the model's context are cut to fit instead of refused
    /// (OpenAI refuses; a request's `truncate` overrides this).
    pub embeddings_truncate: bool,
}

/// Prefixes (an agent's system prompt and tools) kept on disk across evictions, unloads and
/// restarts, so a returning conversation skips recomputing them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PromptCacheConfig {
    pub enabled: bool,
    pub directory: PathBuf,
    /// Bound on the directory, all models together; least recently used files go first.
    pub max_gb: f64,
    /// Shorter prefixes are not written.
    pub min_tokens: usize,
}

impl Default for PromptCacheConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            directory: home_dir().join(".opta-lmx").join("prompt-cache"),
            max_gb: 8.0,
            min_tokens: 256,
        }
    }
}

impl PromptCacheConfig {
    /// The engine's settings, or `None` when disabled.
    pub fn disk_config(&self) -> Option<crate::engine::prompt_cache::DiskCacheConfig> {
        self.enabled
            .then(|| crate::engine::prompt_cache::DiskCacheConfig {
                root: self.directory.clone(),
                max_bytes: (self.max_gb * 1e9) as u64,
                min_tokens: self.min_tokens.max(1),
            })
    }
}

/// A model format on disk.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Gguf,
    Mlx,
}

impl Format {
    /// The store's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gguf => "gguf",
            Self::Mlx => "mlx",
        }
    }

    /// This platform's default preference.
    fn platform_default() -> Self {
        if cfg!(target_os = "macos") {
            Self::Mlx
        } else {
            Self::Gguf
        }
    }
}

/// How MLX models are served: one supervised Python worker per model, running `mlx-lm`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MlxConfig {
    /// The Python that has `mlx` and `mlx-lm` installed (a virtualenv's `bin/python`).
    pub python: PathBuf,
    /// A worker that does not answer a heartbeat within this many seconds is killed; its
    /// requests end with an error and the model is reloaded on the next request.
    pub heartbeat_seconds: f64,
    /// Bound on each MLX model's in-memory prefix cache (finished sequences' KV kept for the
    /// next turn), in GB; running sequences count against it. The memory guard drops these
    /// prefixes (long ones to the disk tier) before it evicts a model.
    pub prefix_cache_gb: f64,
    /// The BLAS the worker's matrix products use on Linux: `auto` preloads a system OpenBLAS
    /// when there is one (the mlx-cpu wheel's bundled reference BLAS is ~40x slower at
    /// prefill), `none` keeps the wheel's, or a library's path.
    pub blas: String,
}

impl Default for MlxConfig {
    fn default() -> Self {
        Self {
            python: PathBuf::from("python3"),
            heartbeat_seconds: 60.0,
            prefix_cache_gb: 4.0,
            blas: "auto".into(),
        }
    }
}

/// Engine settings for one model or one load; what is left out comes from the layer below
/// (a load request over `models.per_model`, over `models.defaults`, over
/// [`ModelSettings::builtin`]). Every load setting is spelled here once.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSettings {
    /// Context tokens available to each sequence.
    pub context: Option<u32>,
    /// Sequences decoded together in one batch.
    pub parallel: Option<u32>,
    /// Requests that may wait for a busy model; more are refused with 429 and `Retry-After`.
    pub max_queue: Option<u32>,
    /// Layers offloaded to the GPU (0 on CPU builds).
    pub gpu_layers: Option<u32>,
    /// CPU threads for decoding; `None`: the physical cores less one (see
    /// [`crate::system::default_threads`]).
    pub threads: Option<u32>,
    /// Unload after this many idle seconds; `None` keeps it until evicted.
    pub ttl_seconds: Option<u64>,
    /// Never evict this model to make room for another (TTL and explicit unloads still apply).
    pub pin: Option<bool>,
    /// Reproducible output at the cost of batching's throughput (see `LoadOptions`).
    pub batch_invariant: Option<bool>,
    /// KV cache element types (`f16`, `q8_0`, `q4_0`).
    pub cache_type_k: Option<KvType>,
    pub cache_type_v: Option<KvType>,
    /// Fused attention (`auto`, `on`, `off`); a quantised V cache needs it.
    pub flash_attention: Option<FlashAttention>,
    /// How sequences propose tokens to verify (`off`, `ngram`, `draft`).
    pub speculation: Option<Speculation>,
    /// The draft model for `speculation: draft`: a model id on disk with the same vocabulary.
    pub draft_model: Option<String>,
    /// Most tokens proposed per sequence per step.
    pub draft_max: Option<u32>,
    /// Verify proposals only where measurements say they pay (the default); `false`
    /// verifies every proposal (for benchmarks, and hardware where it always pays).
    pub speculation_adaptive: Option<bool>,
}

/// Where models are downloaded from. The token is sent only to `endpoint` and never logged.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HubConfig {
    /// Base URL of the Hugging Face Hub, or a mirror speaking its protocol (`HF_ENDPOINT`).
    pub endpoint: String,
    /// Access token for private and gated repositories (`HF_TOKEN`).
    pub token: Option<String>,
}

impl std::fmt::Debug for HubConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubConfig")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            endpoint: "https://huggingface.co".into(),
            token: None,
        }
    }
}

impl ModelSettings {
    /// These settings, with what they leave out taken from `base`: a load request over a
    /// model's settings, a model's settings over the defaults.
    pub fn over(&self, base: &ModelSettings) -> ModelSettings {
        ModelSettings {
            context: self.context.or(base.context),
            parallel: self.parallel.or(base.parallel),
            max_queue: self.max_queue.or(base.max_queue),
            gpu_layers: self.gpu_layers.or(base.gpu_layers),
            threads: self.threads.or(base.threads),
            ttl_seconds: self.ttl_seconds.or(base.ttl_seconds),
            pin: self.pin.or(base.pin),
            batch_invariant: self.batch_invariant.or(base.batch_invariant),
            cache_type_k: self.cache_type_k.or(base.cache_type_k),
            cache_type_v: self.cache_type_v.or(base.cache_type_v),
            flash_attention: self.flash_attention.or(base.flash_attention),
            speculation: self.speculation.or(base.speculation),
            draft_model: self
                .draft_model
                .clone()
                .or_else(|| base.draft_model.clone()),
            draft_max: self.draft_max.or(base.draft_max),
            speculation_adaptive: self.speculation_adaptive.or(base.speculation_adaptive),
        }
    }

    /// What a load gets when no layer says otherwise.
    pub fn builtin() -> ModelSettings {
        ModelSettings {
            context: Some(4096),
            parallel: Some(8),
            max_queue: Some(32),
            gpu_layers: Some(0),
            threads: None,
            ttl_seconds: None,
            pin: None,
            batch_invariant: Some(false),
            cache_type_k: Some(KvType::F16),
            cache_type_v: Some(KvType::F16),
            flash_attention: Some(FlashAttention::Auto),
            speculation: Some(Speculation::Off),
            draft_model: None,
            draft_max: Some(8),
            speculation_adaptive: Some(true),
        }
    }
}

/// The memory guardrail.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryConfig {
    /// Loads that would take used memory past this share of RAM are refused.
    pub threshold_percent: f64,
}

/// Log output.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LoggingConfig {
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `opta_lmx=debug`.
    pub level: String,
    /// Append logs to this file instead of standard error.
    pub file: Option<PathBuf>,
}

/// Human-readable lines or JSON lines for log shippers.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            host: IpAddr::from([127, 0, 0, 1]),
            port: 1234,
            api_key: None,
            admin_key: None,
            sse_keepalive_seconds: 10.0,
            admin_open: false,
            header_timeout_seconds: 10.0,
            drain_seconds: 60.0,
            max_connections: 512,
            write_timeout_seconds: 30.0,
            h2_max_streams: 32,
            tls: None,
            metrics_open: false,
            mdns: true,
        }
    }
}

impl Default for ModelsConfig {
    fn default() -> Self {
        Self {
            directory: default_models_dir(),
            default: None,
            aliases: BTreeMap::new(),
            roles: BTreeMap::new(),
            load_at_start: Vec::new(),
            load_on_demand: false,
            defaults: ModelSettings::default(),
            per_model: BTreeMap::new(),
            max_loaded_models: None,
            mlx: MlxConfig::default(),
            prefer: Format::platform_default(),
            prompt_cache: PromptCacheConfig::default(),
            embeddings_truncate: false,
        }
    }
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            threshold_percent: 90.0,
        }
    }
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
            file: None,
        }
    }
}

/// The user's home, falling back to the current directory when `HOME` is unset (services).
fn home_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

impl Config {
    /// Where audit lines go, or `None` when the audit is off.
    pub fn audit_path(&self) -> Option<PathBuf> {
        if !self.audit.enabled {
            return None;
        }
        Some(match (&self.audit.file, &self.logging.file) {
            (Some(f), _) => f.clone(),
            (None, Some(log)) => log.parent().unwrap_or(Path::new(".")).join("audit.jsonl"),
            (None, None) => home_dir().join(".opta-lmx/logs/audit.jsonl"),
        })
    }
}

/// `~/.opta-lmx/config.yaml`.
pub fn default_config_path() -> PathBuf {
    home_dir().join(".opta-lmx").join("config.yaml")
}

/// The shared models folder on macOS (where the original deployment keeps it), else `~/.opta-lmx/models`.
pub fn default_models_dir() -> PathBuf {
    if cfg!(target_os = "macos") {
        PathBuf::from("/Users/Shared/Opta-LMX/models")
    } else {
        home_dir().join(".opta-lmx").join("models")
    }
}

/// Expands a leading `~/` so config files can say `~/models`.
fn expand_tilde(p: &Path) -> PathBuf {
    match p.strip_prefix("~") {
        Ok(rest) => home_dir().join(rest),
        Err(_) => p.to_path_buf(),
    }
}

impl Config {
    /// Reads the file (a missing file is fine only when it is the default path), then applies
    /// the environment. Flags are applied by the caller with [`Config::set`].
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let (path, explicit) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (default_config_path(), false),
        };
        let mut cfg = if path.exists() || explicit {
            Self::from_file(&path)?
        } else {
            Config::default()
        };
        for (name, value) in env {
            // The Hub's own variables, as its tools read them.
            match name.as_str() {
                "HF_ENDPOINT" if !value.is_empty() => cfg.hub.endpoint = value.clone(),
                "HF_TOKEN" if !value.is_empty() => cfg.hub.token = Some(value.clone()),
                _ => {}
            }
            if let Some(key) = name.strip_prefix("OPTA_LMX_") {
                if key == "CONFIG" {
                    continue;
                }
                cfg.set_env(key, &value)
                    .map_err(|reason| ConfigError::Value {
                        source_name: format!("environment variable {name}"),
                        reason,
                    })?;
            }
        }
        cfg.finish().map_err(|(key, reason)| ConfigError::Parse {
            path: path.clone(),
            key,
            reason,
        })?;
        Ok(cfg)
    }

    fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if text.trim().is_empty() {
            return Ok(Config::default());
        }
        let de = serde_yaml_ng::Deserializer::from_str(&text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            ConfigError::Parse {
                path: path.to_path_buf(),
                key: if key == "." {
                    "(top level)".into()
                } else {
                    key
                },
                reason: e.into_inner().to_string(),
            }
        })
    }

    /// Client names must be fit for logs and unique, keys unique and not the admin key.
    fn check_clients(&self) -> Result<(), (String, String)> {
        let mut names = std::collections::HashSet::new();
        let mut keys = std::collections::HashSet::new();
        for (i, c) in self.clients.iter().enumerate() {
            let fit = !c.name.is_empty()
                && c.name.len() <= 64
                && c.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._:@-".contains(&b));
            if !fit {
                return Err((
                    format!("clients[{i}].name"),
                    format!("`{}` is not 1 to 64 letters, digits or ._:@-", c.name),
                ));
            }
            for (field, v) in [
                ("max_requests", c.max_requests.map(u64::from)),
                ("max_queued", c.max_queued.map(u64::from)),
                ("tokens_per_minute", c.tokens_per_minute),
            ] {
                if v == Some(0) {
                    return Err((
                        format!("clients[{i}].{field}"),
                        "is 0: the client could send nothing (remove the client instead)".into(),
                    ));
                }
            }
            if !names.insert(c.name.as_str()) {
                return Err((
                    format!("clients[{i}].name"),
                    format!("`{}` is listed twice", c.name),
                ));
            }
            if let Some(k) = &c.key {
                if k.is_empty()
                    || !keys.insert(k.as_str())
                    || Some(k) == self.server.admin_key.as_ref()
                {
                    return Err((
                        format!("clients[{i}].key"),
                        "is empty, another client's, or the admin key".into(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Applies one `OPTA_LMX_<KEY>` variable. Unknown keys are errors: a typo must not pass.
    fn set_env(&mut self, key: &str, v: &str) -> Result<(), String> {
        fn parse<T: std::str::FromStr>(v: &str) -> Result<T, String>
        where
            T::Err: std::fmt::Display,
        {
            v.trim()
                .parse()
                .map_err(|e: T::Err| format!("`{v}` is not valid: {e}"))
        }
        fn opt(v: &str) -> Option<String> {
            (!v.is_empty()).then(|| v.to_string())
        }
        /// A value spelled as in the YAML file (`q8_0`, `auto`, `ngram`).
        fn parse_enum<T: serde::de::DeserializeOwned>(v: &str) -> Result<T, String> {
            serde_yaml_ng::from_str(v.trim()).map_err(|e| format!("`{v}` is not valid: {e}"))
        }
        match key {
            "HOST" => self.server.host = parse(v)?,
            "PORT" => self.server.port = parse(v)?,
            "API_KEY" => self.server.api_key = opt(v),
            "ADMIN_KEY" => self.server.admin_key = opt(v),
            "MODELS_DIR" => self.models.directory = PathBuf::from(v),
            "DEFAULT_MODEL" => self.models.default = opt(v),
            "LOAD_AT_START" => {
                self.models.load_at_start = v
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect()
            }
            "LOAD_ON_DEMAND" => self.models.load_on_demand = parse(v)?,
            "MAX_LOADED_MODELS" => self.models.max_loaded_models = Some(parse(v)?),
            "TTL_SECONDS" => self.models.defaults.ttl_seconds = Some(parse(v)?),
            "HF_ENDPOINT" => self.hub.endpoint = v.to_string(),
            "HF_TOKEN" => self.hub.token = opt(v),
            "CONTEXT" => self.models.defaults.context = Some(parse(v)?),
            "PARALLEL" => self.models.defaults.parallel = Some(parse(v)?),
            "MAX_QUEUE" => self.models.defaults.max_queue = Some(parse(v)?),
            "SSE_KEEPALIVE" => self.server.sse_keepalive_seconds = parse(v)?,
            "ADMIN_OPEN" => self.server.admin_open = parse(v)?,
            "HEADER_TIMEOUT" => self.server.header_timeout_seconds = parse(v)?,
            "DRAIN_SECONDS" => self.server.drain_seconds = parse(v)?,
            "MAX_CONNECTIONS" => self.server.max_connections = parse(v)?,
            "WRITE_TIMEOUT" => self.server.write_timeout_seconds = parse(v)?,
            "H2_MAX_STREAMS" => self.server.h2_max_streams = parse(v)?,
            "BODY_TIMEOUT" => self.requests.body_timeout_seconds = parse(v)?,
            "MAX_BODY_BYTES" => self.requests.max_body_bytes = parse(v)?,
            "MAX_MESSAGES" => self.requests.max_messages = parse(v)?,
            "PRIORITY_AGING_SECONDS" => self.requests.priority_aging_seconds = parse(v)?,
            "PRIORITIES" => self.requests.priorities = parse(v)?,
            "MAX_PROMPT_CHARS" => self.requests.max_prompt_chars = Some(parse(v)?),
            "GRAMMAR_MS_PER_TOKEN" => self.requests.grammar_ms_per_token = parse(v)?,
            "SPECIAL_TOKENS_IN_CONTENT" => self.requests.special_tokens_in_content = parse(v)?,
            "GPU_LAYERS" => self.models.defaults.gpu_layers = Some(parse(v)?),
            "THREADS" => self.models.defaults.threads = Some(parse(v)?),
            "BATCH_INVARIANT" => self.models.defaults.batch_invariant = Some(parse(v)?),
            "CACHE_TYPE_K" => self.models.defaults.cache_type_k = Some(parse_enum(v)?),
            "CACHE_TYPE_V" => self.models.defaults.cache_type_v = Some(parse_enum(v)?),
            "FLASH_ATTENTION" => self.models.defaults.flash_attention = Some(parse_enum(v)?),
            "SPECULATION" => self.models.defaults.speculation = Some(parse_enum(v)?),
            "DRAFT_MODEL" => self.models.defaults.draft_model = opt(v),
            "DRAFT_MAX" => self.models.defaults.draft_max = Some(parse(v)?),
            "SPECULATION_ADAPTIVE" => self.models.defaults.speculation_adaptive = Some(parse(v)?),
            "MEMORY_THRESHOLD" => self.memory.threshold_percent = parse(v)?,
            "MLX_PYTHON" => self.models.mlx.python = PathBuf::from(v),
            "MLX_HEARTBEAT" => self.models.mlx.heartbeat_seconds = parse(v)?,
            "MLX_PREFIX_CACHE_GB" => self.models.mlx.prefix_cache_gb = parse(v)?,
            "MLX_BLAS" => self.models.mlx.blas = v.to_string(),
            "EMBEDDINGS_TRUNCATE" => self.models.embeddings_truncate = parse(v)?,
            "PREFER" => {
                self.models.prefer = match v {
                    "gguf" => Format::Gguf,
                    "mlx" => Format::Mlx,
                    _ => return Err(format!("`{v}` is not one of gguf, mlx")),
                }
            }
            "LOG_FORMAT" => {
                self.logging.format = match v {
                    "text" => LogFormat::Text,
                    "json" => LogFormat::Json,
                    _ => return Err(format!("`{v}` is not one of text, json")),
                }
            }
            "LOG_LEVEL" => self.logging.level = v.to_string(),
            "LOG_FILE" => self.logging.file = opt(v).map(PathBuf::from),
            "PROMPT_CACHE" => self.models.prompt_cache.enabled = parse(v)?,
            "PROMPT_CACHE_DIR" => self.models.prompt_cache.directory = PathBuf::from(v),
            "PROMPT_CACHE_MAX_GB" => self.models.prompt_cache.max_gb = parse(v)?,
            "PROMPT_CACHE_MIN_TOKENS" => self.models.prompt_cache.min_tokens = parse(v)?,
            "AUDIT" => self.audit.enabled = parse(v)?,
            "AUDIT_FILE" => self.audit.file = opt(v).map(PathBuf::from),
            "METRICS_OPEN" => self.server.metrics_open = parse(v)?,
            "MDNS" => self.server.mdns = parse(v)?,
            "TLS_CERT" | "TLS_KEY" => {
                let tls = self.server.tls.get_or_insert_with(|| TlsConfig {
                    cert: PathBuf::new(),
                    key: PathBuf::new(),
                });
                if key == "TLS_CERT" {
                    tls.cert = PathBuf::from(v);
                } else {
                    tls.key = PathBuf::from(v);
                }
            }
            _ => return Err(format!("unknown setting OPTA_LMX_{key}")),
        }
        Ok(())
    }

    /// Normalises paths and checks ranges that serde cannot express; the error names the key.
    pub fn finish(&mut self) -> Result<(), (String, String)> {
        self.check_clients()?;
        crate::presets::check(&self.presets)?;
        if let Some((role, _)) = self.models.roles.iter().find(|(_, prefs)| prefs.is_empty()) {
            return Err((format!("models.roles.{role}"), "lists no model".into()));
        }
        self.models.directory = expand_tilde(&self.models.directory);
        if let Some(f) = &self.logging.file {
            self.logging.file = Some(expand_tilde(f));
        }
        self.models.prompt_cache.directory = expand_tilde(&self.models.prompt_cache.directory);
        let g = self.models.prompt_cache.max_gb;
        if !(g >= 0.0 && g.is_finite()) {
            return Err((
                "models.prompt_cache.max_gb".into(),
                format!("{g} is not a size in GB"),
            ));
        }
        if let Some(f) = &self.audit.file {
            self.audit.file = Some(expand_tilde(f));
        }
        if let Some(tls) = &mut self.server.tls {
            tls.cert = expand_tilde(&tls.cert);
            tls.key = expand_tilde(&tls.key);
            if tls.cert.as_os_str().is_empty() || tls.key.as_os_str().is_empty() {
                return Err((
                    "server.tls".into(),
                    "needs both `cert` and `key` (PEM files)".into(),
                ));
            }
        }
        if let Err(e) = crate::engine::mlx::blas::preload(&self.models.mlx.blas) {
            return Err(("models.mlx.blas".into(), e));
        }
        let t = self.memory.threshold_percent;
        if !(t > 0.0 && t <= 100.0) {
            return Err((
                "memory.threshold_percent".into(),
                format!("{t} is outside (0, 100]"),
            ));
        }
        check_settings("models.defaults", &self.models.defaults)?;
        if self.models.max_loaded_models == Some(0) {
            return Err((
                "models.max_loaded_models".into(),
                "0 would refuse every load; leave it out for no limit".into(),
            ));
        }
        let e = &self.hub.endpoint;
        if !(e.starts_with("http://") || e.starts_with("https://")) {
            return Err((
                "hub.endpoint".into(),
                format!("`{e}` is not an http(s) URL"),
            ));
        }
        for (id, m) in &self.models.per_model {
            check_settings(&format!("models.per_model.{id}"), m)?;
        }
        let k = self.server.sse_keepalive_seconds;
        if !(0.01..=3600.0).contains(&k) {
            return Err((
                "server.sse_keepalive_seconds".into(),
                format!("{k} is outside 0.01..=3600"),
            ));
        }
        for (key, secs) in [
            (
                "server.header_timeout_seconds",
                self.server.header_timeout_seconds,
            ),
            ("server.drain_seconds", self.server.drain_seconds),
            (
                "server.write_timeout_seconds",
                self.server.write_timeout_seconds,
            ),
            (
                "requests.body_timeout_seconds",
                self.requests.body_timeout_seconds,
            ),
            (
                "requests.priority_aging_seconds",
                self.requests.priority_aging_seconds,
            ),
        ] {
            if !(0.1..=3600.0).contains(&secs) {
                return Err((key.into(), format!("{secs} is outside 0.1..=3600")));
            }
        }
        let r = &self.requests;
        for (key, n) in [
            ("server.max_connections", self.server.max_connections),
            ("server.h2_max_streams", self.server.h2_max_streams as usize),
            ("requests.max_body_bytes", r.max_body_bytes),
            ("requests.max_messages", r.max_messages),
            ("requests.max_prompt_chars", r.max_prompt_chars.unwrap_or(1)),
            (
                "requests.grammar_ms_per_token",
                r.grammar_ms_per_token as usize,
            ),
        ] {
            if n == 0 {
                return Err((key.into(), "0 would refuse everything".into()));
            }
        }
        if tracing_subscriber::EnvFilter::try_new(&self.logging.level).is_err() {
            return Err((
                "logging.level".into(),
                format!("`{}` is not a valid log filter", self.logging.level),
            ));
        }
        for (alias, target) in &self.models.aliases {
            if alias.is_empty() || target.is_empty() {
                return Err((
                    format!("models.aliases.{alias}"),
                    "aliases and their targets must be non-empty".into(),
                ));
            }
        }
        Ok(())
    }

    /// The settings a load of `id` starts from: `models.defaults`, then the context of the
    /// presets on `id` (see [`crate::presets::Preset::context`]), then `models.per_model`.
    pub fn settings_for(&self, id: &str) -> ModelSettings {
        let mut defaults = self.models.defaults.over(&ModelSettings::builtin());
        if let Some(c) = self.preset_context(id) {
            defaults.context = Some(c);
        }
        match self.models.per_model.get(id) {
            Some(m) => m.over(&defaults),
            None => defaults,
        }
    }

    /// Whether the configuration itself (per-model settings or defaults, not the built-in
    /// fallback) names a context for `id`.
    pub fn sets_context_for(&self, id: &str) -> bool {
        self.models
            .per_model
            .get(id)
            .and_then(|m| m.context)
            .or(self.preset_context(id))
            .or(self.models.defaults.context)
            .is_some()
    }

    /// The largest context the presets on `id` ask for.
    fn preset_context(&self, id: &str) -> Option<u32> {
        self.presets
            .iter()
            .filter(|p| self.resolve_alias(&p.model) == id)
            .filter_map(|p| p.context)
            .max()
    }

    /// Resolves an alias to its target id; ids that are not aliases come back unchanged.
    pub fn resolve_alias<'a>(&'a self, name: &'a str) -> &'a str {
        self.models
            .aliases
            .get(name)
            .map(String::as_str)
            .unwrap_or(name)
    }
}

/// Range checks shared by `models.defaults`, each `models.per_model` entry and load requests.
pub fn check_settings(prefix: &str, m: &ModelSettings) -> Result<(), (String, String)> {
    let err = |key: &str, reason: String| Err((format!("{prefix}.{key}"), reason));
    if let Some(c) = m.context.filter(|&c| c < 16) {
        return err("context", format!("{c} is too small (at least 16 tokens)"));
    }
    if let Some(p) = m.parallel.filter(|&p| p == 0 || p > 256) {
        return err("parallel", format!("{p} is outside 1..=256"));
    }
    if let Some(q) = m.max_queue.filter(|&q| q > 100_000) {
        return err("max_queue", format!("{q} is more than 100000"));
    }
    if m.threads == Some(0) {
        return err("threads", "0 threads cannot decode".into());
    }
    if let Some(t) = m.ttl_seconds.filter(|&t| t == 0 || t > 365 * 86_400) {
        return err("ttl_seconds", format!("{t} is outside 1..=31536000"));
    }
    if let Some(d) = m.draft_max.filter(|&d| d == 0 || d > 64) {
        return err("draft_max", format!("{d} is outside 1..=64"));
    }
    if let (Some(v), Some(f)) = (m.cache_type_v, m.flash_attention) {
        if let Err(reason) = check_cache_types(v, f) {
            return err("cache_type_v", reason);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn defaults_when_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.yaml");
        // An explicit path that does not exist is an error...
        assert!(Config::load(Some(&missing), []).is_err());
        let cfg = Config::default();
        assert_eq!(cfg.server.port, 1234);
        assert_eq!(cfg.server.host.to_string(), "127.0.0.1");
        assert_eq!(cfg.memory.threshold_percent, 90.0);
    }

    #[test]
    fn a_preset_s_context_is_its_model_s_unless_the_model_sets_one() {
        let f = write(
            "models:\n  defaults:\n    context: 4096\n  aliases:\n    g: gemma\n  per_model:\n    qwen:\n      context: 8192\n\
             presets:\n  - {name: a, model: g, context: 16384}\n  - {name: b, model: gemma, context: 32768}\n\
             \x20 - {name: c, model: qwen, context: 2048}\n",
        );
        let cfg = Config::load(Some(f.path()), []).unwrap();
        assert_eq!(cfg.settings_for("gemma").context, Some(32768));
        assert_eq!(cfg.settings_for("qwen").context, Some(8192));
        assert_eq!(cfg.settings_for("other").context, Some(4096));
        assert!(cfg.sets_context_for("gemma"));
        let bad = write("presets:\n  - {name: a, model: g, context: 12}\n");
        assert!(Config::load(Some(bad.path()), []).is_err());
    }

    #[test]
    fn file_then_env_override() {
        let f = write(
            "server:\n  port: 8080\nmodels:\n  directory: /tmp/m\n  aliases:\n    gpt: gemma\n",
        );
        let cfg = Config::load(
            Some(f.path()),
            [("OPTA_LMX_PORT".to_string(), "9090".to_string())],
        )
        .unwrap();
        assert_eq!(cfg.server.port, 9090);
        assert_eq!(cfg.models.directory, PathBuf::from("/tmp/m"));
        assert_eq!(cfg.resolve_alias("gpt"), "gemma");
        assert_eq!(cfg.resolve_alias("other"), "other");
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let f = write("server:\n  prot: 8080\n");
        let err = Config::load(Some(f.path()), []).unwrap_err().to_string();
        assert!(err.contains(&f.path().display().to_string()), "{err}");
        assert!(err.contains("server"), "{err}");
        assert!(err.contains("prot"), "{err}");
    }

    #[test]
    fn bad_type_names_key() {
        let f = write("server:\n  port: lots\n");
        let err = Config::load(Some(f.path()), []).unwrap_err().to_string();
        assert!(err.contains("server.port"), "{err}");
    }

    #[test]
    fn bad_env_names_variable() {
        let f = write("");
        let err = Config::load(
            Some(f.path()),
            [("OPTA_LMX_PORT".to_string(), "99999".to_string())],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("OPTA_LMX_PORT"), "{err}");
        let err = Config::load(
            Some(f.path()),
            [("OPTA_LMX_PROT".to_string(), "1".to_string())],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown setting"), "{err}");
    }

    #[test]
    fn range_checks_name_key() {
        let f = write("memory:\n  threshold_percent: 150\n");
        let err = Config::load(Some(f.path()), []).unwrap_err().to_string();
        assert!(err.contains("memory.threshold_percent"), "{err}");
        let f = write("models:\n  defaults:\n    parallel: 0\n");
        let err = Config::load(Some(f.path()), []).unwrap_err().to_string();
        assert!(err.contains("models.defaults.parallel"), "{err}");
        let f = write("models:\n  per_model:\n    gemma:\n      threads: 0\n");
        let err = Config::load(Some(f.path()), []).unwrap_err().to_string();
        assert!(err.contains("models.per_model.gemma.threads"), "{err}");
        // A drain of no time would cut every stream at a stop.
        let f = write("server:\n  drain_seconds: 0\n");
        let err = Config::load(Some(f.path()), []).unwrap_err().to_string();
        assert!(err.contains("server.drain_seconds"), "{err}");
        let f2 = write("models:\n  mlx:\n    blas: /no/such/libopenblas.so\n");
        let err = Config::load(Some(f2.path()), []).unwrap_err().to_string();
        assert!(
            err.contains("models.mlx.blas") && err.contains("/no/such"),
            "{err}"
        );
        let cfg = Config::load(
            Some(f.path()),
            [("OPTA_LMX_DRAIN_SECONDS".to_string(), "600".to_string())],
        )
        .unwrap();
        assert_eq!(cfg.server.drain_seconds, 600.0);
    }

    #[test]
    fn per_model_settings_layer_over_defaults() {
        let f = write(
            "models:\n  defaults:\n    parallel: 6\n    max_queue: 3\n  per_model:\n    gemma:\n      parallel: 2\n",
        );
        let cfg = Config::load(Some(f.path()), []).unwrap();
        let g = cfg.settings_for("gemma");
        assert_eq!(
            (g.parallel, g.max_queue, g.context),
            (Some(2), Some(3), Some(4096))
        );
        let other = cfg.settings_for("other");
        assert_eq!(other.parallel, Some(6));
        let f = write("models:\n  per_model:\n    gemma:\n      paralel: 2\n");
        let err = Config::load(Some(f.path()), []).unwrap_err().to_string();
        assert!(err.contains("models.per_model.gemma"), "{err}");
    }

    #[test]
    fn lifecycle_and_hub_settings() {
        let f = write(
            "models:\n  max_loaded_models: 2\n  defaults:\n    ttl_seconds: 600\n  per_model:\n    big: {pin: true, ttl_seconds: 60}\nhub:\n  endpoint: http://mirror.local\n",
        );
        let cfg = Config::load(
            Some(f.path()),
            [("HF_TOKEN".to_string(), "hf_secret".to_string())],
        )
        .unwrap();
        assert_eq!(cfg.models.max_loaded_models, Some(2));
        let big = cfg.settings_for("big");
        assert_eq!((big.pin, big.ttl_seconds), (Some(true), Some(60)));
        assert_eq!(cfg.settings_for("other").ttl_seconds, Some(600));
        assert_eq!(cfg.hub.endpoint, "http://mirror.local");
        assert_eq!(cfg.hub.token.as_deref(), Some("hf_secret"));
        assert!(
            !format!("{cfg:?}").contains("hf_secret"),
            "token in Debug output"
        );

        let f = write("models:\n  max_loaded_models: 0\n");
        let err = Config::load(Some(f.path()), []).unwrap_err().to_string();
        assert!(err.contains("models.max_loaded_models"), "{err}");
        let f = write("hub:\n  endpoint: ftp://x\n");
        let err = Config::load(Some(f.path()), []).unwrap_err().to_string();
        assert!(err.contains("hub.endpoint"), "{err}");
    }
}
