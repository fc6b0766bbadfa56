//! `POST /api/v1/queues/{queue}/pause` and `/resume`.

use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use jobq_core::job::QueueName;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::extract::{ApiPath, NoQuery};
use crate::openapi::ApiErrorBody;
use crate::AppState;
#[allow(unused_imports)]
use jobq_core::stream::QueueStats;

/// The queue routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/queues", get(list))
        .route("/api/v1/queues/{queue}", get(show))
        .route("/api/v1/queues/{queue}/pause", post(pause))
        .route("/api/v1/queues/{queue}/resume", post(resume))
}

fn queue(raw: &str) -> Result<QueueName, ApiError> {
    raw.parse().map_err(ApiError::BadRequest)
}

/// Stats of `queues`, with their dead-letter counts from Postgres (null while it is down).
async fn stats(state: &AppState, queues: &[QueueName]) -> Result<Vec<Value>, ApiError> {
    let stats = state.broker.queue_stats(queues).await?;
    let dead = match state.store.dead_counts().await {
        Ok(d) => Some(d),
        Err(e) => {
            tracing::warn!(error = %e, "dead-letter counts unavailable");
            None
        }
    };
    Ok(stats
        .into_iter()
        .map(|s| {
            let d = dead.as_ref().map(|d| d.get(s.queue.as_str()).copied().unwrap_or(0));
            let mut v = serde_json::to_value(&s).unwrap_or(Value::Null);
            v["dead"] = json!(d);
            v
        })
        .collect())
}

/// `GET /api/v1/queues`: every queue with depth per priority, running, scheduled, dead,
/// paused, counts by outcome and the oldest job's age.
#[utoipa::path(get, path = "/api/v1/queues", tag = "queues", responses((status = 200, description = "stats of every queue", body = serde_json::Value)))]
pub(crate) async fn list(_: NoQuery, State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let queues = state.broker.queues().await?;
    Ok(Json(json!({"items": stats(&state, &queues).await?})))
}

/// `GET /api/v1/queues/{queue}`.
#[utoipa::path(get, path = "/api/v1/queues/{queue}", tag = "queues", params(("queue" = QueueName, Path)),
    responses((status = 200, body = QueueStats), (status = 404, body = ApiErrorBody)))]
pub(crate) async fn show(
    _: NoQuery,
    State(state): State<AppState>,
    ApiPath(q): ApiPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    let q = queue(&q)?;
    if !state.broker.queues().await?.contains(&q) {
        return Err(ApiError::NotFound(format!("queue `{q}` not found")));
    }
    let mut items = stats(&state, std::slice::from_ref(&q)).await?;
    Ok(Json(items.pop().unwrap_or(Value::Null)))
}

/// Workers stop starting the queue's jobs; enqueueing still works; running jobs finish.
#[utoipa::path(post, path = "/api/v1/queues/{queue}/pause", tag = "queues", params(("queue" = QueueName, Path)),
    responses((status = 200, body = serde_json::Value), (status = 400, body = ApiErrorBody)))]
pub(crate) async fn pause(
    _: NoQuery,
    State(state): State<AppState>,
    ApiPath(q): ApiPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    let q = queue(&q)?;
    state.broker.pause(&q).await?;
    Ok(Json(json!({"queue": q, "paused": true})))
}

/// Workers start the queue's jobs again (within a second).
#[utoipa::path(post, path = "/api/v1/queues/{queue}/resume", tag = "queues", params(("queue" = QueueName, Path)),
    responses((status = 200, body = serde_json::Value), (status = 400, body = ApiErrorBody)))]
pub(crate) async fn resume(
    _: NoQuery,
    State(state): State<AppState>,
    ApiPath(q): ApiPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    let q = queue(&q)?;
    state.broker.resume(&q).await?;
    Ok(Json(json!({"queue": q, "paused": false})))
}
