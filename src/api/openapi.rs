//! The OpenAPI 3.1 description at `/openapi.json`, and `/docs`, a page that renders it.
//!
//! Schemas are derived from the wire types themselves (`utoipa::ToSchema` on the request and
//! response structs), so a field added to a type appears here without a second edit. The
//! operations come from [`ROUTES`], the table the router is built from.

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

use super::routes::{Access, ROUTES};
use super::AppState;

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
    super::embeddings::EmbeddingRequest,
    super::embeddings::EmbeddingResponse,
    super::rerank::RerankRequest,
    super::rerank::RerankResponse,
    super::queue::QueueView,
    super::admin::LoadBody,
    super::admin::UnloadBody,
    super::admin::DeleteBody,
    super::admin::Status,
    super::admin::reload::ReloadReport,
    super::admin::benchmark::BenchmarkBody,
    super::admin::compat::ProbeBody,
    crate::models::downloads::DownloadRequest,
    crate::models::downloads::JobView,
    super::error::ErrorDetail,
)))]
struct Schemas;

/// Schemas whose Rust names clash with others' (LM Studio's load bodies, the quantize jobs
/// beside the download jobs), under names of their own.
fn renamed_schemas(doc: &mut OpenApi) {
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
        c.schemas.insert(
            "QuantizeJob".into(),
            crate::models::quantize::JobView::schema(),
        );
        c.schemas.insert(
            "JobStatus".into(),
            crate::models::quantize::JobStatus::schema(),
        );
        c.schemas.insert(
            "QuantizeRequest".into(),
            crate::models::quantize::QuantizeRequest::schema(),
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
    renamed_schemas(&mut doc);
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
    for o in ROUTES {
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
            Access::Open => b,
            Access::Api => b.security(SecurityRequirement::new("bearer", Vec::<String>::new())),
            Access::Admin | Access::AdminUnlessLoaded | Access::Metrics => b
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
        for o in ROUTES {
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
