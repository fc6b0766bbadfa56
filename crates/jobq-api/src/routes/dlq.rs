//! The dead-letter queue: `GET /api/v1/dlq` and `POST /api/v1/dlq/{job_id}/retry`.

use axum::extract::{Path, State};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use jobq_core::store::DlqFilter;
use serde::Deserialize;
use serde_json::json;

use crate::error::ApiError;
use crate::extract::{job_id, ApiQuery};
use crate::AppState;

/// The DLQ routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/dlq", get(list))
        .route("/api/v1/dlq/{id}", get(show))
        .route("/api/v1/dlq/{id}/retry", post(retry))
}

/// Query of `GET /api/v1/dlq`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only this queue.
    pub queue: Option<String>,
    /// Only this job type.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// Page size, 1-500 (default 50).
    pub limit: Option<i64>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

async fn list(State(state): State<AppState>, ApiQuery(q): ApiQuery<ListQuery>) -> Result<impl IntoResponse, ApiError> {
    let limit = q.limit.unwrap_or(50);
    if !(1..=jobq_core::store::MAX_PAGE).contains(&limit) {
        return Err(ApiError::Invalid(format!("`limit` must be between 1 and {}", jobq_core::store::MAX_PAGE)));
    }
    let page = state.store.dead_jobs(&DlqFilter { queue: q.queue, kind: q.kind, limit, cursor: q.cursor }).await?;
    Ok(Json(page))
}

async fn show(State(state): State<AppState>, Path(id): Path<String>) -> Result<impl IntoResponse, ApiError> {
    let id = job_id(&id)?;
    let dead = state
        .store
        .dead_job(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("job {id} is not in the dead-letter queue")))?;
    let executions = state.store.executions(id).await?;
    Ok(Json(json!({"job": dead, "executions": executions})))
}

async fn retry(State(state): State<AppState>, Path(id): Path<String>) -> Result<impl IntoResponse, ApiError> {
    let id = job_id(&id)?;
    let retried = state.store.retry_dead(&state.broker, id).await.map_err(|e| match e {
        jobq_core::Error::JobNotFound(id) => ApiError::NotFound(format!("job {id} is not in the dead-letter queue")),
        e => e.into(),
    })?;
    Ok(Json(json!({"job_id": retried.job_id, "run": retried.run, "state": "queued"})))
}
