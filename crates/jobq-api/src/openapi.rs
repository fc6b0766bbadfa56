//! The OpenAPI 3.1 document, generated from the handlers' annotations and types
//! (`GET /api/v1/openapi.json`), and a self-contained reference page (`GET /api/v1/docs`)
//! that renders it without loading anything from elsewhere.

use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::{Json, Router};
use utoipa::OpenApi;

use crate::routes::{dlq, health, jobs, queues, schedules};
use crate::AppState;

/// The error body of every 4xx/5xx answer.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct ApiErrorBody {
    /// `{"code": "invalid_request", "message": "...", "details": ...}`
    error: ApiErrorDetail,
}

/// Inside [`ApiErrorBody`].
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct ApiErrorDetail {
    /// Stable machine-readable code: bad_request, unauthorized, forbidden, not_found, conflict,
    /// payload_too_large, unsupported_media_type, invalid_request, rate_limited, unavailable,
    /// internal.
    code: String,
    /// What went wrong, naming the field or limit.
    message: String,
    /// Extra data (per-item errors of an atomic batch), or null.
    details: Option<serde_json::Value>,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "jobq", description = "REST API of the jobq background-job system. Send an API key as `Authorization: Bearer <key>` or `X-API-Key`."),
    paths(
        health::health, health::ready, health::metrics, spec, page, crate::dashboard::page, crate::dashboard::script, crate::dashboard::to_page, crate::dashboard::root,
        jobs::enqueue, jobs::enqueue_batch, jobs::list, jobs::get_job, jobs::executions, jobs::cancel, jobs::run_now,
        queues::list, queues::show, queues::pause, queues::resume, queues::cancel, queues::run,
        dlq::list, dlq::show, dlq::retry, dlq::retry_matching, dlq::remove, dlq::purge, dlq::audit,
        schedules::create, schedules::list, schedules::show, schedules::replace, schedules::patch,
        schedules::remove, schedules::trigger, schedules::runs,
    ),
    components(schemas(
        ApiErrorBody, ApiErrorDetail,
        jobq_core::store::DeadJob, jobq_core::store::Execution, jobq_core::store::AuditEntry,
        jobq_core::store::schedules::ScheduleRun, jobq_core::stream::QueueStats, jobq_core::job::JobState,
    )),
    modifiers(&ApiKeyAuth, &Conventions),
    tags(
        (name = "jobs", description = "enqueue, inspect, cancel"),
        (name = "queues", description = "depth, counters, pause, cancel or run now the jobs not started"),
        (name = "dlq", description = "the dead-letter queue and its audit log"),
        (name = "schedules", description = "cron schedules"),
        (name = "health", description = "liveness and readiness"),
    )
)]
struct ApiDoc;

struct ApiKeyAuth;

impl utoipa::Modify for ApiKeyAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
        };
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components
            .add_security_scheme("api_key", SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))));
        doc.security = Some(vec![
            SecurityRequirement::new("bearer", Vec::<String>::new()),
            SecurityRequirement::new("api_key", Vec::<String>::new()),
        ]);
    }
}

/// What every operation may answer besides its own responses, and which operations need no
/// key, derived from the router's conventions so the document cannot drift from them: the
/// auth middleware ([`crate::auth::required_role`]) answers 401/403/429; the extractors answer
/// 400 (malformed path, query or JSON), 413 (body limit) and 415 (not JSON); Redis or
/// Postgres down is a 503.
struct Conventions;

impl utoipa::Modify for Conventions {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use axum::http::Method;
        use utoipa::openapi::{Content, Ref, ResponseBuilder};
        let error = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content("application/json", Content::new(Some(Ref::from_schema_name("ApiErrorBody"))))
                .build()
        };
        for (path, item) in doc.paths.paths.iter_mut() {
            let operations = [
                (Method::GET, &mut item.get),
                (Method::POST, &mut item.post),
                (Method::PUT, &mut item.put),
                (Method::PATCH, &mut item.patch),
                (Method::DELETE, &mut item.delete),
            ];
            for (method, op) in operations {
                let Some(op) = op.as_mut() else { continue };
                let mut extra = Vec::new();
                let api = crate::auth::required_role(&method, path).is_some();
                if !api {
                    op.security = Some(Vec::new());
                } else {
                    extra.push(("401", "no API key, or an unknown one"));
                    extra.push(("403", "the key's role may not call this route"));
                    extra.push(("429", "over the key's rate limit; see `Retry-After`"));
                    extra.push(("503", "Redis or Postgres is unavailable"));
                }
                let takes_input = op.parameters.as_ref().is_some_and(|p| !p.is_empty()) || op.request_body.is_some();
                if api || takes_input {
                    // Every API route refuses query parameters it does not take.
                    extra.push(("400", "malformed path, query or body, or a query parameter the route does not take"));
                }
                if takes_input {
                    extra.push(("422", "well-formed but invalid; the message names the field"));
                }
                if op.request_body.is_some() {
                    extra.push(("413", "the body is over `JOBQ_API_BODY_LIMIT`"));
                    extra.push(("415", "the body is not `application/json`"));
                }
                for (status, description) in extra {
                    op.responses.responses.entry(status.to_owned()).or_insert_with(|| error(description).into());
                }
            }
        }
    }
}

/// The generated document.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// `GET /api/v1/openapi.json` and `GET /api/v1/docs`.
pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/openapi.json", get(spec)).route("/api/v1/docs", get(page))
}

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "health", responses((status = 200, description = "the OpenAPI 3.1 document", body = serde_json::Value)))]
pub(crate) async fn spec() -> impl IntoResponse {
    Json(document())
}

/// A browsable reference page rendering this document (no external resources).
#[utoipa::path(get, path = "/api/v1/docs", tag = "health", responses((status = 200, description = "HTML", content_type = "text/html")))]
pub(crate) async fn page() -> impl IntoResponse {
    Html(include_str!("docs.html"))
}
