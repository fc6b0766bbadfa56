//! Operations endpoints every binary serves: `/health` (process up), `/ready` (its
//! dependencies reachable, JSON naming the failed check, 503 otherwise) and `/metrics`
//! (Prometheus text). The API mounts them on its own port; the worker and the scheduler serve
//! them on `JOBQ_METRICS_ADDR`.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// A named readiness check.
pub type Check = (&'static str, Arc<dyn Fn() -> Pin<Box<dyn Future<Output = crate::Result<()>> + Send>> + Send + Sync>);

/// Builds a [`Check`] from an async closure.
pub fn check<F, Fut>(name: &'static str, f: F) -> Check
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = crate::Result<()>> + Send + 'static,
{
    (name, Arc::new(move || Box::pin(f())))
}

/// The process's Prometheus recorder, installed on first use.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets(&[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            ])
            .expect("static buckets");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // Another recorder may be installed (tests running several services in one process).
        let _ = metrics::set_global_recorder(recorder);
        // Histogram samples are buffered until drained: drain them every few seconds even when
        // nobody scrapes, so memory stays flat.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let h = handle.clone();
            rt.spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    h.run_upkeep();
                }
            });
        }
        handle
    })
}

/// Most distinct job types used as metric labels; later ones are reported as `other`.
pub const MAX_TYPE_LABELS: usize = 100;

/// The label for job type `kind`: itself for the first [`MAX_TYPE_LABELS`] types seen by this
/// process, `other` afterwards (bounded cardinality).
pub fn type_label(kind: &str) -> String {
    static SEEN: OnceLock<std::sync::Mutex<std::collections::HashSet<String>>> = OnceLock::new();
    let seen = SEEN.get_or_init(Default::default);
    let Ok(mut seen) = seen.lock() else { return "other".into() };
    if seen.contains(kind) {
        return kind.to_owned();
    }
    if seen.len() < MAX_TYPE_LABELS {
        seen.insert(kind.to_owned());
        return kind.to_owned();
    }
    "other".into()
}

/// `/health`, `/ready` with `checks`, and `/metrics`.
pub fn router<S: Clone + Send + Sync + 'static>(checks: Vec<Check>) -> Router<S> {
    let checks = Arc::new(checks);
    prometheus();
    Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route(
            "/ready",
            get(move || {
                let checks = checks.clone();
                async move { ready(&checks).await }
            }),
        )
        .route("/metrics", get(|| async { prometheus().render() }))
}

async fn ready(checks: &[Check]) -> impl IntoResponse {
    let limit = Duration::from_secs(2);
    let mut results = serde_json::Map::new();
    let mut ok = true;
    for (name, f) in checks {
        let r = match tokio::time::timeout(limit, f()).await {
            Ok(Ok(())) => "ok".to_owned(),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no answer within {}s", limit.as_secs()),
        };
        ok &= r == "ok";
        results.insert((*name).to_owned(), json!(r));
    }
    let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({"status": if ok { "ready" } else { "unavailable" }, "checks": results})))
}

/// Serves [`router`] on `addr` until `shutdown`; returns the bound address.
pub async fn serve(addr: SocketAddr, checks: Vec<Check>, shutdown: CancellationToken) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        let app: Router = router(checks);
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await {
            tracing::warn!(error = %e, "operations endpoint failed");
        }
    });
    tracing::info!(addr = %bound, "health, readiness and metrics on http://{bound}");
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_labels_are_capped() {
        for i in 0..MAX_TYPE_LABELS + 10 {
            let l = type_label(&format!("cap-test-{i}"));
            if l == "other" {
                assert!(i >= MAX_TYPE_LABELS - 1, "capped too early at {i}");
            }
        }
        assert_eq!(type_label("cap-test-never-seen-before"), "other");
    }
}
