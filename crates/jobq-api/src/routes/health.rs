//! `GET /health` (process up) and `GET /ready` (Redis and Postgres reachable, else 503).

use std::time::Duration;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::AppState;

/// The health routes.
pub fn router() -> Router<AppState> {
    Router::new().route("/health", get(health)).route("/ready", get(ready)).route("/metrics", get(metrics))
}

/// Prometheus metrics of this process (see docs/operations.md).
#[utoipa::path(get, path = "/metrics", tag = "health", responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub(crate) async fn metrics() -> impl IntoResponse {
    jobq_core::ops::prometheus().render()
}

#[utoipa::path(get, path = "/health", tag = "health", responses((status = 200, description = "process up", body = serde_json::Value)))]
pub(crate) async fn health() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

#[utoipa::path(get, path = "/ready", tag = "health", responses((status = 200, description = "Redis and Postgres reachable", body = serde_json::Value), (status = 503, description = "a dependency is down; the body says which", body = serde_json::Value)))]
pub(crate) async fn ready(axum::extract::State(state): axum::extract::State<AppState>) -> impl IntoResponse {
    let limit = Duration::from_secs(2);
    let check = |r: Result<jobq_core::Result<()>, tokio::time::error::Elapsed>| match r {
        Ok(Ok(())) => "ok".to_owned(),
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer within {}s", limit.as_secs()),
    };
    let (redis, postgres) =
        tokio::join!(tokio::time::timeout(limit, state.broker.ping()), tokio::time::timeout(limit, state.store.ping()));
    let (redis, postgres) = (check(redis), check(postgres));
    let ok = redis == "ok" && postgres == "ok";
    let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body =
        json!({"status": if ok { "ready" } else { "unavailable" }, "checks": {"redis": redis, "postgres": postgres}});
    (status, Json(body))
}
