//! The dead-letter queue (unbounded, in Postgres): list with filters and cursor paging, show,
//! retry one (optionally with an edited payload), retry by filter (dry run, bounded rate),
//! delete one, purge by filter. Every retry, edit, delete and purge goes to the audit log.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use chrono::{DateTime, Utc};
use jobq_core::store::DlqFilter;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::Principal;
use crate::error::ApiError;
use crate::extract::{job_id, ApiJson, ApiPath, ApiQuery, NoQuery};
use crate::openapi::ApiErrorBody;
use crate::AppState;
#[allow(unused_imports)]
use jobq_core::store::DlqRetried;

/// An optional integer that may be written with a zero fraction (`58.0`), as JSON Schema's
/// `integer` allows.
pub(crate) fn whole_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else { return Ok(None) };
    if let Some(i) = n.as_i64() {
        return Ok(Some(i));
    }
    match n.as_f64() {
        Some(f) if f.fract() == 0.0 && f.abs() < 9e15 => Ok(Some(f as i64)),
        _ => Err(serde::de::Error::custom(format!("expected an integer, got {n}"))),
    }
}

/// Most jobs one retry-by-filter replays.
pub const MAX_REPLAY: i64 = 100_000;

/// The DLQ routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/dlq", get(list).delete(purge))
        .route("/api/v1/dlq/retry", post(retry_matching))
        .route("/api/v1/dlq/{id}", get(show).delete(remove))
        .route("/api/v1/dlq/{id}/retry", post(retry))
        .route("/api/v1/audit", get(audit))
}

/// Filters shared by listing, retry-by-filter and purge.
#[derive(Debug, Default)]
pub struct Filter {
    /// Only this queue.
    pub queue: Option<String>,
    /// Only this job type.
    pub kind: Option<String>,
    /// Only jobs whose last error contains this text (case-insensitive).
    pub error: Option<String>,
    /// Only jobs that died at or after this time (RFC 3339).
    pub failed_after: Option<DateTime<Utc>>,
    /// Only jobs that died before this time (RFC 3339).
    pub failed_before: Option<DateTime<Utc>>,
}

impl Filter {
    fn into_store(self, limit: i64, cursor: Option<String>) -> Result<DlqFilter, ApiError> {
        if self.error.as_ref().is_some_and(|e| e.chars().count() > 256) {
            return Err(ApiError::Invalid("`error` filter: at most 256 characters".into()));
        }
        Ok(DlqFilter {
            queue: self.queue,
            kind: self.kind,
            error: self.error,
            failed_after: self.failed_after,
            failed_before: self.failed_before,
            limit,
            cursor,
        })
    }
}

/// Declares a query/body struct with the DLQ filter fields plus `extra` fields, and its
/// conversion to [`Filter`] (serde's `flatten` cannot be combined with `deny_unknown_fields`).
macro_rules! with_filter {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $field:ident : $ty:ty),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Deserialize, utoipa::ToSchema, utoipa::IntoParams)]
        #[into_params(parameter_in = Query)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            /// Only this queue.
            #[schema(pattern = r"^[^\x00]*$")]
            #[param(pattern = r"^[^\x00]*$")]
            pub queue: Option<String>,
            /// Only this job type.
            #[schema(pattern = r"^[^\x00]*$")]
            #[param(pattern = r"^[^\x00]*$")]
            #[serde(rename = "type")]
            pub kind: Option<String>,
            /// Only jobs whose last error contains this text (case-insensitive), at most 256
            /// characters.
            #[schema(max_length = 256, pattern = r"^[^\x00]*$")]
            #[param(max_length = 256, pattern = r"^[^\x00]*$")]
            pub error: Option<String>,
            /// Only jobs that died at or after this time (RFC 3339).
            pub failed_after: Option<DateTime<Utc>>,
            /// Only jobs that died before this time (RFC 3339).
            pub failed_before: Option<DateTime<Utc>>,
            $($(#[$fm])* pub $field: $ty,)*
        }

        impl $name {
            fn filter(&self) -> Filter {
                Filter {
                    queue: self.queue.clone(),
                    kind: self.kind.clone(),
                    error: self.error.clone(),
                    failed_after: self.failed_after,
                    failed_before: self.failed_before,
                }
            }
        }
    };
}

with_filter! {
    /// Query of `GET /api/v1/dlq`.
    ListQuery {
        /// Page size, 1-500 (default 50).
        #[param(minimum = 1, maximum = 500)]
        limit: Option<i64>,
        /// `next_cursor` of the previous page.
        #[param(pattern = r"^-?[0-9]{1,16}_[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")]
        cursor: Option<String>,
    }
}

#[utoipa::path(get, path = "/api/v1/dlq", tag = "dlq", params(ListQuery),
    responses((status = 200, description = "items (newest first) and next_cursor", body = serde_json::Value), (status = 400, description = "an unknown query parameter", body = ApiErrorBody), (status = 422, description = "a malformed or out-of-range value", body = ApiErrorBody), (status = 503, body = ApiErrorBody)))]
pub(crate) async fn list(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let limit = q.limit.unwrap_or(50);
    if !(1..=jobq_core::store::MAX_PAGE).contains(&limit) {
        return Err(ApiError::Invalid(format!("`limit` must be between 1 and {}", jobq_core::store::MAX_PAGE)));
    }
    let filter = q.filter().into_store(limit, q.cursor)?;
    Ok(Json(state.store.dead_jobs(&filter).await?))
}

fn not_in_dlq(id: impl std::fmt::Display) -> ApiError {
    ApiError::NotFound(format!("job {id} is not in the dead-letter queue"))
}

#[utoipa::path(get, path = "/api/v1/dlq/{id}", tag = "dlq", params(("id" = uuid::Uuid, Path, description = "job id (UUID)")),
    responses((status = 200, description = "row, envelope and every attempt", body = serde_json::Value), (status = 404, body = ApiErrorBody)))]
pub(crate) async fn show(
    _: NoQuery,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    let id = job_id(&id)?;
    let dead = state.store.dead_job(id).await?.ok_or_else(|| not_in_dlq(id))?;
    let envelope = state.store.dead_envelope(id).await?;
    let executions = state.store.executions(id).await?;
    Ok(Json(json!({"job": dead, "envelope": envelope, "executions": executions})))
}

/// Optional body of `POST /api/v1/dlq/{id}/retry`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RetryBody {
    /// Replaces the job's payload for the new run (`null` included).
    #[serde(default, deserialize_with = "present")]
    pub payload: Option<Value>,
}

/// A field that is present is `Some`, even when it is `null`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// Whether the request says its body is JSON (`application/json`, or a `+json` type).
fn is_json(headers: &axum::http::HeaderMap) -> bool {
    let Some(v) = headers.get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else { return false };
    let essence = v.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

#[utoipa::path(post, path = "/api/v1/dlq/{id}/retry", tag = "dlq", params(("id" = uuid::Uuid, Path, description = "job id (UUID)")), request_body(content = Option<RetryBody>, description = "optional edited payload"),
    responses((status = 200, body = DlqRetried), (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody), (status = 503, body = ApiErrorBody)))]
pub(crate) async fn retry(
    _: NoQuery,
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    ApiPath(id): ApiPath<String>,
    headers: axum::http::HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let id = job_id(&id)?;
    let body = body?;
    // No body (or `null`) retries the job as it was; a body is a JSON object, as on every route.
    let text = std::str::from_utf8(&body).map_err(|_| ApiError::BadRequest("the retry body is not UTF-8".into()))?;
    let body: RetryBody = if text.trim().is_empty() || text.trim() == "null" {
        RetryBody::default()
    } else if !is_json(&headers) {
        return Err(ApiError::UnsupportedMediaType("send JSON with `Content-Type: application/json`".into()));
    } else {
        crate::extract::object(text).map_err(|e| crate::extract::body_error("the retry body", e))?
    };
    if let Some(p) = &body.payload {
        if jobq_core::job::has_nul(p) {
            return Err(ApiError::Invalid("`payload` must not contain the character U+0000".into()));
        }
        let size = p.to_string().len();
        if size > state.payload_limit {
            return Err(ApiError::TooLarge(format!(
                "`payload` is {size} bytes; the limit is {} bytes",
                state.payload_limit
            )));
        }
    }
    let edited = body.payload.is_some();
    let retried = state.store.retry_dead(&state.broker, id, body.payload.clone()).await.map_err(|e| match e {
        jobq_core::Error::JobNotFound(id) => not_in_dlq(id),
        e => e.into(),
    })?;
    if retried.payload_not_applied {
        // Re-enqueued by an earlier retry whose commit failed; marked now, and audited as it is.
        let details = json!({"run": retried.run, "payload_not_applied": body.payload});
        audit_done(&state, &who, "dlq.retry", Some(id.to_string()), None, 1, Some(details)).await;
        return Err(ApiError::Conflict(format!(
            "job {id} was already re-enqueued as run {} by an earlier retry whose commit failed ({}); the payload given was not applied",
            retried.run, retried.state
        )));
    }
    let details = edited.then(|| json!({"payload": body.payload}));
    let action = if edited { "dlq.retry_edited" } else { "dlq.retry" };
    audit_done(&state, &who, action, Some(id.to_string()), None, 1, details).await;
    Ok(Json(retried))
}

with_filter! {
    /// Body of `POST /api/v1/dlq/retry`.
    RetryMatching {
        /// Only count them.
        #[serde(default)]
        dry_run: bool,
        /// At most this many (default and maximum 100,000).
        #[schema(minimum = 1, maximum = 100_000)]
        #[serde(default, deserialize_with = "whole_number")]
        limit: Option<i64>,
    }
}

/// `POST /api/v1/dlq/retry`: re-enqueues every matching dead job at `JOBQ_API_DLQ_REPLAY_RATE`
/// jobs per second, in the background (202); progress shows in the audit log. Idempotent:
/// a job already retried is skipped.
#[utoipa::path(post, path = "/api/v1/dlq/retry", tag = "dlq", request_body = RetryMatching,
    responses((status = 200, description = "dry run: matched count", body = serde_json::Value), (status = 202, description = "replay started", body = serde_json::Value), (status = 422, body = ApiErrorBody)))]
pub(crate) async fn retry_matching(
    _: NoQuery,
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    ApiJson(req): ApiJson<RetryMatching>,
) -> Result<impl IntoResponse, ApiError> {
    let limit = req.limit.unwrap_or(MAX_REPLAY);
    if !(1..=MAX_REPLAY).contains(&limit) {
        return Err(ApiError::Invalid(format!("`limit` must be between 1 and {MAX_REPLAY}")));
    }
    let filter = req.filter().into_store(limit, None)?;
    let matched = state.store.count_dead(&filter).await?.min(limit);
    // Postgres only: the replay reaches Redis later, in the background.
    let untouched = Extension(crate::breaker::RedisUntouched);
    if req.dry_run {
        return Ok((StatusCode::OK, untouched, Json(json!({"matched": matched, "dry_run": true}))));
    }
    let selection = state.store.dead_selection(&filter, None, None, limit).await?;
    let replay = state.store.start_replay(&who.name, &filter, &selection).await?;
    let ids = selection.into_iter().map(|(_, id)| id).collect();
    let (audit_id, total, rate) = (replay.audit_id, replay.of, state.dlq_replay_rate.max(1));
    crate::replay::spawn(state, replay, ids);
    Ok((StatusCode::ACCEPTED, untouched, Json(json!({"matched": total, "rate_per_sec": rate, "audit_id": audit_id}))))
}

#[utoipa::path(delete, path = "/api/v1/dlq/{id}", tag = "dlq", params(("id" = uuid::Uuid, Path, description = "job id (UUID)")),
    responses((status = 204, description = "deleted"), (status = 404, body = ApiErrorBody)))]
pub(crate) async fn remove(
    _: NoQuery,
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    ApiPath(id): ApiPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    let id = job_id(&id)?;
    if !state.store.delete_dead(id).await? {
        return Err(not_in_dlq(id));
    }
    audit_done(&state, &who, "dlq.delete", Some(id.to_string()), None, 1, None).await;
    Ok(StatusCode::NO_CONTENT)
}

with_filter! {
    /// Query of `DELETE /api/v1/dlq`.
    PurgeQuery {
        /// Must be `true`.
        #[schema(value_type = String, pattern = "^true$")]
        #[param(value_type = String, pattern = "^true$", required = true)]
        #[serde(default)]
        confirm: bool,
    }
}

#[utoipa::path(delete, path = "/api/v1/dlq", tag = "dlq", params(PurgeQuery),
    responses((status = 200, description = "deleted count", body = serde_json::Value), (status = 400, description = "confirm=true missing, or an unknown query parameter", body = ApiErrorBody), (status = 422, description = "a malformed value", body = ApiErrorBody)))]
pub(crate) async fn purge(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    ApiQuery(q): ApiQuery<PurgeQuery>,
) -> Result<impl IntoResponse, ApiError> {
    if !q.confirm {
        return Err(ApiError::BadRequest("purging the DLQ needs `confirm=true`".into()));
    }
    let filter = q.filter().into_store(0, None)?;
    // In a task of its own, as a queue's bulk cancel: batches commit one by one, so a purge a
    // caller leaves, or that Postgres stops half-way, is audited with what it deleted.
    let work = async move {
        let (deleted, error) = match state.store.purge_dead(&filter).await {
            Ok(n) => (n, None),
            Err(jobq_core::store::PurgeStopped { deleted, error }) => (deleted, Some(error)),
        };
        let f = serde_json::to_value(&filter).unwrap_or(Value::Null);
        let details = error.as_ref().map(|e| json!({"stopped": e.to_string()}));
        audit_done(&state, &who, "dlq.purge", None, Some(f), deleted as i64, details).await;
        match error {
            Some(e) => Err(e.into()),
            None => Ok(Json(json!({"deleted": deleted}))),
        }
    };
    tokio::spawn(work).await.map_err(|e| ApiError::Internal(e.into()))?
}

/// Writes the audit entry of an action that has already taken effect. A failure to write it
/// is logged and counted, not answered: the caller must not retry what is done (a retried
/// retry would answer 409, a retried purge would find nothing).
pub(crate) async fn audit_done(
    state: &AppState,
    who: &Principal,
    action: &str,
    target: Option<String>,
    filter: Option<Value>,
    count: i64,
    details: Option<Value>,
) {
    if let Err(e) = state.store.audit(&who.name, action, target.clone(), filter, count, details).await {
        metrics::counter!("jobq_postgres_errors_total", "component" => "audit").increment(1);
        tracing::error!(error = %e, action, target = target.as_deref().unwrap_or(""), actor = %who.name, "the action took effect but its audit entry could not be written");
    }
}

/// Query of `GET /api/v1/audit`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// How many, newest first (default 50, at most 500).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
}

#[utoipa::path(get, path = "/api/v1/audit", tag = "dlq", params(AuditQuery), responses((status = 200, description = "audit entries, newest first", body = serde_json::Value), (status = 400, description = "an unknown query parameter", body = ApiErrorBody), (status = 422, description = "a malformed or out-of-range value", body = ApiErrorBody)))]
pub(crate) async fn audit(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let limit = q.limit.unwrap_or(50);
    if !(1..=jobq_core::store::MAX_PAGE).contains(&limit) {
        return Err(ApiError::Invalid(format!("`limit` must be between 1 and {}", jobq_core::store::MAX_PAGE)));
    }
    Ok(Json(json!({"items": state.store.audit_log(limit).await?})))
}
