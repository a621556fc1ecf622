//! The one list of routes: each row says how a route is served (its handler and key check)
//! and how it is documented (tag, summary, body and answer schemas). The router
//! ([`super::router`]) and the OpenAPI document ([`super::openapi`]) are both made from it.

use axum::routing::{delete, get, post, MethodRouter};

use super::{
    admin, anthropic, chat, completions, discovery, downloads, embeddings, lmstudio, models,
    observe, openapi, page, queue, rerank, responses, websocket, AppState,
};

/// Who may call an operation: the router puts the matching check in front of the handler,
/// and the OpenAPI document states it.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Access {
    /// No key.
    Open,
    /// The API key, when one is configured.
    Api,
    /// The admin key (or the API key when no admin key is set; loopback when neither is).
    /// State-changing calls are audited.
    Admin,
    /// [`Access::Admin`], except that a load of a model already loaded (which changes
    /// nothing) passes with the API key: LM Studio's load, which OpenClaw calls before turns.
    AdminUnlessLoaded,
    /// [`Access::Admin`] unless `server.metrics_open`.
    Metrics,
}

/// One route: how it is served and how it is documented.
pub struct Operation {
    pub method: &'static str,
    /// The route as the router spells it (`{*id}` for a catch-all).
    pub path: &'static str,
    pub tag: &'static str,
    pub summary: &'static str,
    pub access: Access,
    /// Schema of the JSON body, by its type's name.
    pub body: Option<&'static str>,
    /// Schema of the JSON answer, by its type's name.
    pub response: Option<&'static str>,
    /// Also answers as `text/event-stream` (with `stream: true`, or always for progress).
    pub stream: bool,
    /// Errors in Anthropic's shape (the key check's included), not OpenAI's.
    pub anthropic: bool,
    /// The handler for this method on this path.
    pub handler: fn() -> MethodRouter<AppState>,
}

const fn op(
    method: &'static str,
    path: &'static str,
    tag: &'static str,
    summary: &'static str,
    access: Access,
    handler: fn() -> MethodRouter<AppState>,
) -> Operation {
    Operation {
        method,
        path,
        tag,
        summary,
        access,
        body: None,
        response: None,
        stream: false,
        anthropic: false,
        handler,
    }
}

impl Operation {
    const fn body(mut self, name: &'static str) -> Self {
        self.body = Some(name);
        self
    }
    const fn returns(mut self, name: &'static str) -> Self {
        self.response = Some(name);
        self
    }
    const fn streams(mut self) -> Self {
        self.stream = true;
        self
    }
    const fn anthropic(mut self) -> Self {
        self.anthropic = true;
        self
    }
}

use Access::{Admin, AdminUnlessLoaded, Api, Metrics, Open};

/// Every route the server answers: the router is built from this table and the OpenAPI
/// document describes it, so a route cannot be served undocumented or documented with
/// another key check than it has.
pub const ROUTES: &[Operation] = &[
    op(
        "post",
        "/v1/chat/completions",
        "OpenAI",
        "Chat completion (streamed with `stream: true`)",
        Api,
        || post(chat::chat_completions),
    )
    .body("ChatCompletionRequest")
    .returns("ChatCompletion")
    .streams(),
    op(
        "post",
        "/v1/completions",
        "OpenAI",
        "Text completion (legacy)",
        Api,
        || post(completions::completions),
    )
    .body("CompletionRequest")
    .returns("TextCompletion")
    .streams(),
    op(
        "post",
        "/v1/responses",
        "OpenAI",
        "Responses API",
        Api,
        || post(responses::create),
    )
    .streams(),
    op(
        "get",
        "/v1/responses/{id}",
        "OpenAI",
        "A stored response",
        Api,
        || get(responses::get),
    ),
    op(
        "post",
        "/v1/embeddings",
        "OpenAI",
        "Embeddings of texts or token arrays (embedding models)",
        Api,
        || post(embeddings::create),
    )
    .body("EmbeddingRequest")
    .returns("EmbeddingResponse"),
    op(
        "post",
        "/api/v0/embeddings",
        "LM Studio",
        "Embeddings (LM Studio's path, OpenAI's shapes)",
        Api,
        || post(embeddings::create),
    )
    .body("EmbeddingRequest")
    .returns("EmbeddingResponse"),
    op(
        "post",
        "/v1/rerank",
        "Rerank",
        "Documents ordered by relevance to a query (a reranker, or a chat model's yes/no judgement)",
        Api,
        || post(rerank::rerank),
    )
    .body("RerankRequest")
    .returns("RerankResponse"),
    op(
        "post",
        "/rerank",
        "Rerank",
        "The same, at llama-server's path",
        Api,
        || post(rerank::rerank),
    )
    .body("RerankRequest")
    .returns("RerankResponse"),
    op(
        "get",
        "/v1/models",
        "OpenAI",
        "Models that can be used",
        Api,
        || get(models::list_models),
    )
    .returns("ModelList"),
    op(
        "get",
        "/v1/chat/stream",
        "OpenAI",
        "Chat over a WebSocket (the first Opta-LMX's chat.request / chat.cancel protocol)",
        Api,
        || get(websocket::chat_stream),
    ),
    op(
        "get",
        "/v1/queue",
        "Scheduling",
        "The caller's own requests: running, or waiting with their place in the admission order",
        Api,
        || get(queue::own),
    )
    .returns("QueueView"),
    op(
        "get",
        "/v1/models/{*id}",
        "OpenAI",
        "One model",
        Api,
        || get(models::get_model),
    )
    .returns("ModelObject"),
    op(
        "post",
        "/v1/messages",
        "Anthropic",
        "Anthropic Messages (streamed with `stream: true`)",
        Api,
        || post(anthropic::create),
    )
    .anthropic()
    .streams(),
    op(
        "post",
        "/v1/messages/count_tokens",
        "Anthropic",
        "Count a Messages request's input tokens",
        Api,
        || post(anthropic::count_tokens),
    )
    .anthropic(),
    op(
        "get",
        "/api/v1/models",
        "LM Studio",
        "Models, LM Studio's v1 shape",
        Api,
        || get(lmstudio::list_v1),
    ),
    op(
        "post",
        "/api/v1/models/load",
        "LM Studio",
        "Load a model (LM Studio's shape)",
        AdminUnlessLoaded,
        || post(lmstudio::load),
    )
    .body("LmStudioLoadBody"),
    op(
        "post",
        "/api/v1/models/unload",
        "LM Studio",
        "Unload a model (LM Studio's shape)",
        Admin,
        || post(lmstudio::unload),
    )
    .body("LmStudioUnloadBody"),
    op(
        "get",
        "/api/v0/models",
        "LM Studio",
        "Models, LM Studio's v0 shape",
        Api,
        || get(lmstudio::list_v0),
    ),
    op(
        "post",
        "/admin/model/load",
        "Admin",
        "Load a model",
        Admin,
        || post(admin::load),
    )
    .body("LoadBody"),
    op(
        "post",
        "/admin/models/load",
        "Admin",
        "Load a model",
        Admin,
        || post(admin::load),
    )
    .body("LoadBody"),
    op(
        "post",
        "/admin/model/unload",
        "Admin",
        "Unload a model",
        Admin,
        || post(admin::unload),
    )
    .body("UnloadBody"),
    op(
        "post",
        "/admin/models/unload",
        "Admin",
        "Unload a model",
        Admin,
        || post(admin::unload),
    )
    .body("UnloadBody"),
    op(
        "get",
        "/admin/models",
        "Admin",
        "Models on disk, loaded models, downloads",
        Admin,
        || get(admin::models),
    ),
    op(
        "get",
        "/admin/models/available",
        "Admin",
        "Every model on disk, loaded or not, with its path and download time",
        Admin,
        || get(admin::available),
    ),
    op(
        "post",
        "/admin/model/download",
        "Admin",
        "Start a verified Hub download",
        Admin,
        || post(downloads::start),
    )
    .body("DownloadRequest")
    .returns("JobView"),
    op(
        "post",
        "/admin/models/download",
        "Admin",
        "Start a verified Hub download",
        Admin,
        || post(downloads::start),
    )
    .body("DownloadRequest")
    .returns("JobView"),
    op(
        "get",
        "/admin/model/downloads",
        "Admin",
        "Download jobs",
        Admin,
        || get(downloads::list),
    ),
    op(
        "get",
        "/admin/models/downloads",
        "Admin",
        "Download jobs",
        Admin,
        || get(downloads::list),
    ),
    op(
        "get",
        "/admin/model/download/{job}",
        "Admin",
        "One download job",
        Admin,
        || get(downloads::get),
    )
    .returns("JobView"),
    op(
        "delete",
        "/admin/model/download/{job}",
        "Admin",
        "Cancel a download",
        Admin,
        || delete(downloads::cancel),
    )
    .returns("JobView"),
    op(
        "get",
        "/admin/models/download/{job}",
        "Admin",
        "One download job",
        Admin,
        || get(downloads::get),
    )
    .returns("JobView"),
    op(
        "delete",
        "/admin/models/download/{job}",
        "Admin",
        "Cancel a download",
        Admin,
        || delete(downloads::cancel),
    )
    .returns("JobView"),
    op(
        "post",
        "/admin/model/download/{job}/resume",
        "Admin",
        "Resume a download",
        Admin,
        || post(downloads::resume),
    )
    .returns("JobView"),
    op(
        "post",
        "/admin/models/download/{job}/resume",
        "Admin",
        "Resume a download",
        Admin,
        || post(downloads::resume),
    )
    .returns("JobView"),
    op(
        "get",
        "/admin/model/download/{job}/progress",
        "Admin",
        "A download's progress as server-sent events",
        Admin,
        || get(downloads::progress),
    )
    .streams(),
    op(
        "get",
        "/admin/models/download/{job}/progress",
        "Admin",
        "A download's progress as server-sent events",
        Admin,
        || get(downloads::progress),
    )
    .streams(),
    op(
        "delete",
        "/admin/model/{*id}",
        "Admin",
        "Delete a model's files",
        Admin,
        || delete(admin::delete_model),
    )
    .body("DeleteBody"),
    op(
        "delete",
        "/admin/models/{*id}",
        "Admin",
        "Delete a model's files",
        Admin,
        || delete(admin::delete_model),
    )
    .body("DeleteBody"),
    op(
        "get",
        "/admin/status",
        "Admin",
        "Memory, loaded models, performance, downloads",
        Admin,
        || get(admin::status),
    )
    .returns("Status"),
    op(
        "post",
        "/admin/config/reload",
        "Admin",
        "Read the configuration again (keys, limits, aliases, presets, settings for future loads); a bad file is refused and the running one stays",
        Admin,
        || post(admin::reload::reload),
    )
    .returns("ReloadReport"),
    op(
        "post",
        "/admin/benchmark",
        "Admin",
        "Benchmark a loaded model (prefill and decode, a few greedy runs under its own fair share); stored",
        Admin,
        || post(admin::benchmark::quick),
    )
    .body("BenchmarkBody"),
    op(
        "post",
        "/admin/benchmark/run",
        "Admin",
        "Benchmark a loaded model with warm-up runs; answered and stored as the first Opta-LMX's result",
        Admin,
        || post(admin::benchmark::run),
    )
    .body("BenchmarkBody"),
    op(
        "get",
        "/admin/benchmark/results",
        "Admin",
        "Stored benchmark results (`?model_id=` for one model), oldest first",
        Admin,
        || get(admin::benchmark::results),
    ),
    op(
        "get",
        "/admin/models/compatibility",
        "Admin",
        "Whether each model on disk can load here (format, header, memory) and its latest load or probe outcome",
        Admin,
        || get(admin::compat::compatibility),
    ),
    op(
        "post",
        "/admin/models/probe",
        "Admin",
        "Check one model on disk or on the Hub actively: can it load here, and why not",
        Admin,
        || post(admin::compat::probe),
    )
    .body("ProbeBody"),
    op(
        "get",
        "/admin/models/{*id}",
        "Admin",
        "A loaded model's facts: `{id}/performance` (settings, live rates, latest benchmark)",
        Admin,
        || get(admin::benchmark::performance),
    ),
    op(
        "post",
        "/admin/quantize",
        "Admin",
        "Quantize a model on disk into a smaller one (background job; 507 when the disk cannot hold it)",
        Admin,
        || post(admin::quantize::start),
    )
    .body("QuantizeRequest")
    .returns("QuantizeJob"),
    op(
        "get",
        "/admin/quantize",
        "Admin",
        "Quantize jobs, oldest first",
        Admin,
        || get(admin::quantize::list),
    ),
    op(
        "get",
        "/admin/quantize/{job}",
        "Admin",
        "One quantize job: status, progress, result size and SHA-256",
        Admin,
        || get(admin::quantize::get),
    )
    .returns("QuantizeJob"),
    op(
        "post",
        "/admin/quantize/{job}/cancel",
        "Admin",
        "Cancel a quantize job (its partial output is removed)",
        Admin,
        || post(admin::quantize::cancel),
    ),
    op(
        "get",
        "/admin/presets",
        "Admin",
        "Named presets (model, sampling defaults, system prompt) requests may name as `model`",
        Admin,
        || get(admin::presets::list),
    ),
    op(
        "post",
        "/admin/presets/reload",
        "Admin",
        "Read the configuration (and so the presets) again",
        Admin,
        || post(admin::presets::reload),
    ),
    op(
        "get",
        "/admin/presets/{name}",
        "Admin",
        "One preset, by name or routing alias",
        Admin,
        || get(admin::presets::one),
    ),
    op(
        "get",
        "/admin/stack",
        "Admin",
        "Roles (`models.roles`), their preferences and the model each resolves to now",
        Admin,
        || get(admin::presets::stack),
    ),
    op(
        "get",
        "/admin/device",
        "Admin",
        "The machine: CPU, cores, memory, GPU, OS, engines built in",
        Admin,
        || get(admin::facts::device),
    ),
    op(
        "get",
        "/admin/events",
        "Admin",
        "Loads, unloads, evictions, downloads, memory refusals and config reloads as they happen (server-sent events)",
        Admin,
        || get(admin::events::events),
    )
    .streams(),
    op(
        "get",
        "/admin/memory",
        "Admin",
        "The memory guard's view: budget, used, each model's share and cached prefixes",
        Admin,
        || get(admin::facts::memory),
    ),
    op(
        "get",
        "/admin/metrics/json",
        "Operations",
        "The metrics as JSON: a summary, then every family /metrics exposes",
        Metrics,
        || get(admin::facts::metrics_json),
    ),
    op(
        "get",
        "/.well-known/opta-lmx",
        "Operations",
        "Discovery for zero-config pairing: URLs, loaded models, whether keys are needed (never a key)",
        Open,
        || get(discovery::discovery),
    ),
    op(
        "get",
        "/v1/discovery",
        "Operations",
        "The same discovery document",
        Open,
        || get(discovery::discovery),
    ),
    op(
        "get",
        "/metrics",
        "Operations",
        "Prometheus metrics (admin key unless server.metrics_open)",
        Metrics,
        || get(observe::metrics),
    ),
    op(
        "get",
        "/admin/health",
        "Operations",
        "Liveness",
        Open,
        || get(admin::health),
    ),
    op("get", "/healthz", "Operations", "Liveness", Open, || {
        get(admin::health)
    }),
    op(
        "get",
        "/readyz",
        "Operations",
        "Readiness: 200 while a model is loaded, else 503",
        Open,
        || get(admin::ready),
    ),
    op(
        "get",
        "/openapi.json",
        "Operations",
        "This document",
        Open,
        || get(openapi::json),
    ),
    op(
        "get",
        "/docs",
        "Operations",
        "This document, browsable",
        Open,
        || get(openapi::docs),
    ),
    op("get", "/", "Operations", "The status page", Open, || {
        get(page::status_page)
    }),
    op("get", "/ui", "Operations", "The status page", Open, || {
        get(page::status_page)
    }),
];
