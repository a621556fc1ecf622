//! The OpenAPI 3.1 description at `/openapi.json`, and `/docs`, a page that renders it.
//!
//! Schemas are derived from the wire types themselves (`utoipa::ToSchema` on the request and
//! response structs), so a field added to a type appears here without a second edit. The
//! operations come from [`OPERATIONS`], one row per route the router serves; a test compares
//! that table with the router's routes and calls every documented one.

use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::AllOfBuilder;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{
    ContentBuilder, InfoBuilder, ObjectBuilder, OpenApi, PathItem, Ref, RefOr, Required, Schema,
    SecurityRequirement,
};
use utoipa::OpenApi as _;

use super::AppState;

/// Who may call an operation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No key.
    Open,
    /// The API key, when one is configured.
    Api,
    /// The admin key (or the API key when no admin key is set; loopback when neither is).
    Admin,
}

/// One documented operation.
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
}

const fn op(
    method: &'static str,
    path: &'static str,
    tag: &'static str,
    summary: &'static str,
    access: Access,
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
}

use Access::{Admin, Api, Open};

/// Every route the server answers.
pub const OPERATIONS: &[Operation] = &[
    op(
        "post",
        "/v1/chat/completions",
        "OpenAI",
        "Chat completion (streamed with `stream: true`)",
        Api,
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
    )
    .body("CompletionRequest")
    .returns("TextCompletion")
    .streams(),
    op("post", "/v1/responses", "OpenAI", "Responses API", Api).streams(),
    op(
        "get",
        "/v1/responses/{id}",
        "OpenAI",
        "A stored response",
        Api,
    ),
    op(
        "get",
        "/v1/models",
        "OpenAI",
        "Models that can be used",
        Api,
    )
    .returns("ModelList"),
    op("get", "/v1/models/{*id}", "OpenAI", "One model", Api).returns("ModelObject"),
    op(
        "post",
        "/v1/messages",
        "Anthropic",
        "Anthropic Messages (streamed with `stream: true`)",
        Api,
    )
    .streams(),
    op(
        "post",
        "/v1/messages/count_tokens",
        "Anthropic",
        "Count a Messages request's input tokens",
        Api,
    ),
    op(
        "get",
        "/api/v1/models",
        "LM Studio",
        "Models, LM Studio's v1 shape",
        Api,
    ),
    op(
        "post",
        "/api/v1/models/load",
        "LM Studio",
        "Load a model (LM Studio's shape)",
        Api,
    )
    .body("LmStudioLoadBody"),
    op(
        "post",
        "/api/v1/models/unload",
        "LM Studio",
        "Unload a model (LM Studio's shape)",
        Api,
    )
    .body("LmStudioUnloadBody"),
    op(
        "get",
        "/api/v0/models",
        "LM Studio",
        "Models, LM Studio's v0 shape",
        Api,
    ),
    op("post", "/admin/model/load", "Admin", "Load a model", Admin).body("LoadBody"),
    op("post", "/admin/models/load", "Admin", "Load a model", Admin).body("LoadBody"),
    op(
        "post",
        "/admin/model/unload",
        "Admin",
        "Unload a model",
        Admin,
    )
    .body("UnloadBody"),
    op(
        "post",
        "/admin/models/unload",
        "Admin",
        "Unload a model",
        Admin,
    )
    .body("UnloadBody"),
    op(
        "get",
        "/admin/models",
        "Admin",
        "Models on disk, loaded models, downloads",
        Admin,
    ),
    op(
        "get",
        "/admin/models/available",
        "Admin",
        "Models on disk that are not loaded",
        Admin,
    ),
    op(
        "post",
        "/admin/model/download",
        "Admin",
        "Start a verified Hub download",
        Admin,
    )
    .body("DownloadRequest")
    .returns("JobView"),
    op(
        "post",
        "/admin/models/download",
        "Admin",
        "Start a verified Hub download",
        Admin,
    )
    .body("DownloadRequest")
    .returns("JobView"),
    op(
        "get",
        "/admin/model/downloads",
        "Admin",
        "Download jobs",
        Admin,
    ),
    op(
        "get",
        "/admin/models/downloads",
        "Admin",
        "Download jobs",
        Admin,
    ),
    op(
        "get",
        "/admin/model/download/{job}",
        "Admin",
        "One download job",
        Admin,
    )
    .returns("JobView"),
    op(
        "delete",
        "/admin/model/download/{job}",
        "Admin",
        "Cancel a download",
        Admin,
    )
    .returns("JobView"),
    op(
        "get",
        "/admin/models/download/{job}",
        "Admin",
        "One download job",
        Admin,
    )
    .returns("JobView"),
    op(
        "delete",
        "/admin/models/download/{job}",
        "Admin",
        "Cancel a download",
        Admin,
    )
    .returns("JobView"),
    op(
        "post",
        "/admin/model/download/{job}/resume",
        "Admin",
        "Resume a download",
        Admin,
    )
    .returns("JobView"),
    op(
        "post",
        "/admin/models/download/{job}/resume",
        "Admin",
        "Resume a download",
        Admin,
    )
    .returns("JobView"),
    op(
        "get",
        "/admin/model/download/{job}/progress",
        "Admin",
        "A download's progress as server-sent events",
        Admin,
    )
    .streams(),
    op(
        "get",
        "/admin/models/download/{job}/progress",
        "Admin",
        "A download's progress as server-sent events",
        Admin,
    )
    .streams(),
    op(
        "delete",
        "/admin/model/{*id}",
        "Admin",
        "Delete a model's files",
        Admin,
    )
    .body("DeleteBody"),
    op(
        "delete",
        "/admin/models/{*id}",
        "Admin",
        "Delete a model's files",
        Admin,
    )
    .body("DeleteBody"),
    op(
        "get",
        "/admin/status",
        "Admin",
        "Memory, loaded models, performance, downloads",
        Admin,
    )
    .returns("Status"),
    op(
        "get",
        "/metrics",
        "Operations",
        "Prometheus metrics (admin key unless server.metrics_open)",
        Admin,
    ),
    op("get", "/admin/health", "Operations", "Liveness", Open),
    op("get", "/healthz", "Operations", "Liveness", Open),
    op(
        "get",
        "/readyz",
        "Operations",
        "Readiness: 200 while a model is loaded, else 503",
        Open,
    ),
    op("get", "/openapi.json", "Operations", "This document", Open),
    op(
        "get",
        "/docs",
        "Operations",
        "This document, browsable",
        Open,
    ),
    op("get", "/", "Operations", "The status page", Open),
    op("get", "/ui", "Operations", "The status page", Open),
];

/// The schemas, derived from the wire types.
#[derive(utoipa::OpenApi)]
#[openapi(components(schemas(
    super::types::ChatCompletionRequest,
    super::types::SamplingFields,
    super::types::CompletionRequest,
    super::types::ChatCompletion,
    super::types::ChatChunk,
    super::types::TextCompletion,
    super::types::ModelObject,
    super::types::ModelList,
    super::admin::LoadBody,
    super::admin::UnloadBody,
    super::admin::DeleteBody,
    super::admin::Status,
    crate::models::downloads::DownloadRequest,
    crate::models::downloads::JobView,
    super::error::ErrorDetail,
)))]
struct Schemas;

/// The request and response schemas of LM Studio's routes, under names that do not clash
/// with the admin API's types of the same Rust name.
fn lmstudio_schemas(doc: &mut OpenApi) {
    use utoipa::PartialSchema;
    if let Some(c) = doc.components.as_mut() {
        c.schemas.insert(
            "LmStudioLoadBody".into(),
            super::lmstudio::LoadBody::schema(),
        );
        c.schemas.insert(
            "LmStudioUnloadBody".into(),
            super::lmstudio::UnloadBody::schema(),
        );
    }
}

fn schema_ref(name: &str) -> RefOr<Schema> {
    RefOr::Ref(Ref::from_schema_name(name))
}

/// The body of a chat request: its own fields and the sampling fields, one JSON object.
fn body_schema(name: &str) -> RefOr<Schema> {
    match name {
        "ChatCompletionRequest" | "CompletionRequest" => AllOfBuilder::new()
            .item(schema_ref(name))
            .item(schema_ref("SamplingFields"))
            .into(),
        _ => schema_ref(name),
    }
}

/// The OpenAPI path template of a router path: `{*id}` becomes `{id}`.
pub fn template(path: &str) -> String {
    path.replace("{*", "{")
}

fn path_params(path: &str) -> Vec<String> {
    path.split('{')
        .skip(1)
        .filter_map(|s| {
            s.split_once('}')
                .map(|(p, _)| p.trim_start_matches('*').to_string())
        })
        .collect()
}

fn http_method(m: &str) -> HttpMethod {
    match m {
        "post" => HttpMethod::Post,
        "delete" => HttpMethod::Delete,
        "put" => HttpMethod::Put,
        _ => HttpMethod::Get,
    }
}

/// The whole document.
pub fn document() -> OpenApi {
    let mut doc = Schemas::openapi();
    doc.info = InfoBuilder::new()
        .title("opta-lmx")
        .version(env!("CARGO_PKG_VERSION"))
        .description(Some(
            "OpenAI-compatible inference server for local models, with Anthropic and LM Studio dialects and an admin API. Errors are OpenAI error bodies (`{\"error\": ErrorDetail}`).",
        ))
        .build();
    lmstudio_schemas(&mut doc);
    if let Some(c) = doc.components.as_mut() {
        c.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        c.add_security_scheme(
            "admin_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-Admin-Key"))),
        );
    }
    for o in OPERATIONS {
        let mut b = OperationBuilder::new()
            .summary(Some(o.summary))
            .tag(o.tag)
            .operation_id(Some(format!(
                "{}_{}",
                o.method,
                o.path
                    .trim_matches('/')
                    .replace(['/', '{', '}', '*', '.'], "_")
            )));
        for p in path_params(o.path) {
            b = b.parameter(
                ParameterBuilder::new()
                    .name(p)
                    .parameter_in(ParameterIn::Path)
                    .required(Required::True)
                    .schema(Some(
                        ObjectBuilder::new().schema_type(utoipa::openapi::schema::Type::String),
                    )),
            );
        }
        if let Some(body) = o.body {
            b = b.request_body(Some(
                RequestBodyBuilder::new()
                    .content(
                        "application/json",
                        ContentBuilder::new()
                            .schema(Some(body_schema(body)))
                            .build(),
                    )
                    .required(Some(Required::True))
                    .build(),
            ));
        }
        let mut ok = ResponseBuilder::new().description("Success");
        ok = match o.response {
            Some(r) => ok.content(
                "application/json",
                ContentBuilder::new().schema(Some(schema_ref(r))).build(),
            ),
            None => ok.content("application/json", ContentBuilder::new().build()),
        };
        if o.stream {
            ok = ok.content("text/event-stream", ContentBuilder::new().build());
        }
        b = b.response("200", ok.build()).response(
            "default",
            ResponseBuilder::new()
                .description("An OpenAI error body")
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(schema_ref("ErrorDetail")))
                        .build(),
                )
                .build(),
        );
        b = match o.access {
            Open => b,
            Api => b.security(SecurityRequirement::new("bearer", Vec::<String>::new())),
            Admin => b
                .security(SecurityRequirement::new("admin_key", Vec::<String>::new()))
                .security(SecurityRequirement::new("bearer", Vec::<String>::new())),
        };
        let item = PathItem::new(http_method(o.method), b.build());
        let key = template(o.path);
        match doc.paths.paths.get_mut(&key) {
            Some(existing) => existing.merge_operations(item),
            None => {
                doc.paths.paths.insert(key, item);
            }
        }
    }
    doc
}

/// `GET /openapi.json`.
pub async fn json(State(_): State<AppState>) -> Response {
    match document().to_json() {
        Ok(text) => ([(header::CONTENT_TYPE, "application/json")], text).into_response(),
        Err(e) => {
            super::error::ApiError::Internal(format!("OpenAPI document: {e}")).into_response()
        }
    }
}

/// `GET /docs`: a self-contained page (no CDN) that lists and expands `/openapi.json`.
pub async fn docs() -> Html<&'static str> {
    Html(include_str!("../../web/docs.html"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_is_documented_once_with_its_schemas() {
        let doc = document();
        let v = serde_json::to_value(&doc).unwrap();
        assert_eq!(v["openapi"], "3.1.0");
        let mut seen = std::collections::HashSet::new();
        for o in OPERATIONS {
            assert!(
                seen.insert((o.method, o.path)),
                "{} {} twice",
                o.method,
                o.path
            );
            let op = &v["paths"][template(o.path)][o.method];
            assert!(op.is_object(), "{} {} missing", o.method, o.path);
            for name in o.body.iter().chain(o.response.iter()) {
                assert!(
                    v["components"]["schemas"][name].is_object(),
                    "schema {name} missing"
                );
            }
        }
        assert_eq!(path_params("/admin/models/{*id}"), vec!["id".to_string()]);
        // The wire types' fields are in their schemas.
        let chat = &v["components"]["schemas"]["ChatCompletionRequest"]["properties"];
        assert!(chat["messages"].is_object(), "{chat}");
        assert!(
            v["components"]["schemas"]["SamplingFields"]["properties"]["max_tokens"].is_object()
        );
    }
}
