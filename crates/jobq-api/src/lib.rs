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

pub mod auth;
pub mod breaker;
pub mod dashboard;
pub mod error;
mod extract;
pub mod limit;
pub mod openapi;
pub mod replay;
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
    /// API keys.
    pub auth: std::sync::Arc<AuthConfig>,
    /// Per-key rate limits.
    pub limiter: std::sync::Arc<limit::RateLimiter>,
    /// Jobs per second of a DLQ retry by filter.
    pub dlq_replay_rate: u32,
    /// Fails requests that need Redis fast while it does not answer.
    pub redis_breaker: std::sync::Arc<breaker::RedisBreaker>,
}

/// Whether keys are required, and which.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// Keys required.
    pub enabled: bool,
    /// Configured keys.
    pub keys: Vec<jobq_core::config::ApiKey>,
}

impl AppState {
    /// State from settings.
    pub fn new(broker: Broker, store: Store, settings: &Settings) -> Self {
        Self {
            broker,
            store,
            payload_limit: settings.api.payload_limit,
            auth: std::sync::Arc::new(AuthConfig { enabled: settings.api.auth, keys: settings.api.keys.clone() }),
            limiter: std::sync::Arc::new(limit::RateLimiter::new(settings.api.rate_limit, settings.api.rate_burst)),
            dlq_replay_rate: settings.api.dlq_replay_rate,
            redis_breaker: Default::default(),
        }
    }
}

/// The whole router: routes, authorization, body limit, request ids and request tracing.
pub fn router(state: AppState, body_limit: usize) -> Router {
    let request_id = axum::http::HeaderName::from_static("x-request-id");
    let trace = tower_http::trace::TraceLayer::new_for_http().make_span_with(|req: &axum::http::Request<_>| {
        let id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("");
        let span = tracing::info_span!("request", method = %req.method(), uri = %req.uri(), request_id = %id);
        let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
        jobq_core::telemetry::adopt_parent(&span, header("traceparent"), header("tracestate"));
        span
    });
    Router::new()
        .merge(routes::health::router())
        .merge(routes::jobs::router())
        .merge(routes::dlq::router())
        .merge(routes::queues::router())
        .merge(routes::schedules::router())
        .merge(openapi::router())
        .merge(dashboard::router())
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), breaker::guard))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth::authorize))
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
        .layer(tower_http::request_id::PropagateRequestIdLayer::new(request_id.clone()))
        .layer(trace)
        .layer(tower_http::request_id::SetRequestIdLayer::new(request_id, tower_http::request_id::MakeRequestUuid))
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
    if settings.api.auth && settings.api.keys.is_empty() {
        anyhow::bail!(
            "auth is on but no API keys are configured: set JOBQ_API_KEYS (`jobq api-key --name NAME --role ROLE` prints a key and its line) or JOBQ_AUTH=off"
        );
    }
    if !settings.api.auth {
        tracing::warn!("API authentication is OFF (JOBQ_AUTH=off): anyone who can reach this port can enqueue, cancel and purge jobs");
    }
    jobq_core::ops::prometheus();
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
    let state = AppState::new(broker, store, &settings);
    tokio::spawn(replay::take_over_loop(state.clone(), shutdown.clone()));
    tracing::info!(url = %format!("http://{addr}"), "api listening");
    axum::serve(listener, router(state, settings.api.body_limit))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .context("server failed")?;
    tracing::info!("api stopped");
    Ok(())
}
