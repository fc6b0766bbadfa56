//! `POST /api/v1/queues/{queue}/pause` and `/resume`.

use axum::extract::{Path, State};
use axum::response::IntoResponse;
use axum::routing::post;
use axum::{Json, Router};
use jobq_core::job::QueueName;
use serde_json::json;

use crate::error::ApiError;
use crate::AppState;

/// The queue routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/queues/{queue}/pause", post(pause))
        .route("/api/v1/queues/{queue}/resume", post(resume))
}

fn queue(raw: &str) -> Result<QueueName, ApiError> {
    raw.parse().map_err(ApiError::BadRequest)
}

/// Workers stop starting the queue's jobs; enqueueing still works; running jobs finish.
async fn pause(State(state): State<AppState>, Path(q): Path<String>) -> Result<impl IntoResponse, ApiError> {
    let q = queue(&q)?;
    state.broker.pause(&q).await?;
    Ok(Json(json!({"queue": q, "paused": true})))
}

/// Workers start the queue's jobs again (within a second).
async fn resume(State(state): State<AppState>, Path(q): Path<String>) -> Result<impl IntoResponse, ApiError> {
    let q = queue(&q)?;
    state.broker.resume(&q).await?;
    Ok(Json(json!({"queue": q, "paused": false})))
}
