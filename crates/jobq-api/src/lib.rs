//! The jobq REST API (axum): enqueue and inspect jobs, the dead-letter queue, health.
//!
//! Every error has the shape `{"error": {"code", "message", "details"}}`; see [`error`].
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let settings = jobq_core::config::load(None)?;
//! jobq_api::run(settings, jobq_core::shutdown::token_from_signals()).await
//! # }
//! ```

pub mod error;
mod extract;
pub mod routes;

use std::net::SocketAddr;

use anyhow::Context as _;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::Router;
use jobq_core::config::Settings;
use jobq_core::store::Store;
use jobq_core::stream::Broker;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Shared state of every handler.
#[derive(Debug, Clone)]
pub struct AppState {
    /// Redis.
    pub broker: Broker,
    /// Postgres.
    pub store: Store,
    /// Largest payload in bytes.
    pub payload_limit: usize,
}

/// The whole router, with body limit and request tracing.
pub fn router(state: AppState, body_limit: usize) -> Router {
    Router::new()
        .merge(routes::health::router())
        .merge(routes::jobs::router())
        .merge(routes::dlq::router())
        .merge(routes::queues::router())
        .merge(routes::schedules::router())
        .fallback(|| async { error::error_response(StatusCode::NOT_FOUND, "not_found", "no such route", Value::Null) })
        .method_not_allowed_fallback(|| async {
            error::error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route",
                Value::Null,
            )
        })
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// Connects to Redis and Postgres, applies migrations when configured, binds `api.addr` and
/// serves until `shutdown` is cancelled.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let listener = TcpListener::bind(settings.api.addr)
        .await
        .with_context(|| format!("cannot listen on {}", settings.api.addr))?;
    serve(settings, listener, shutdown).await
}

/// Like [`run`] on an already bound listener.
pub async fn serve(settings: Settings, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    let broker = Broker::connect(&settings).await.context("invalid Redis settings")?;
    let store = Store::connect(&settings.database).await.context("invalid Postgres settings")?;
    if !broker.wait_until_ready(settings.redis.allow_eviction, &shutdown).await? {
        return Ok(());
    }
    if settings.database.migrate {
        // Enqueueing needs only Redis: serve while Postgres catches up.
        let (store, shutdown) = (store.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = store.migrate_with_retry(&shutdown).await {
                tracing::error!(error = %e, "migrations failed");
            }
        });
    }
    let addr: SocketAddr = listener.local_addr()?;
    let state = AppState { broker, store, payload_limit: settings.api.payload_limit };
    tracing::info!(url = %format!("http://{addr}"), "api listening");
    axum::serve(listener, router(state, settings.api.body_limit))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .context("server failed")?;
    tracing::info!("api stopped");
    Ok(())
}
