//! Fails fast while Redis does not answer.
//!
//! Without it, every request that needs Redis waits `JOBQ_REDIS_TIMEOUT` while Redis is frozen
//! or overloaded, and leaves its command queued on the connection: when Redis comes back it
//! first runs every one of those commands (enqueues the callers were told had failed), and the
//! new requests wait behind them. Once a request has failed on Redis, the breaker answers the
//! requests that need Redis with a 503 at once (`Retry-After: 1`), and lets one of them through
//! every [`PROBE_EVERY`] to find out whether Redis is back; the first that gets an answer from
//! Redis closes it. Routes that only need Postgres are never held.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::AppState;

/// While open, one request per this interval goes through to Redis.
pub const PROBE_EVERY: Duration = Duration::from_millis(500);

/// Marks a response whose request failed because Redis did not answer.
#[derive(Debug, Clone, Copy)]
pub struct RedisFailed;

/// Marks a success of a held route that did not reach Redis (a DLQ retry by filter, which
/// reads Postgres and replays in the background; a batch whose every item was invalid): it
/// says nothing of Redis, so it does not close the breaker.
#[derive(Debug, Clone, Copy)]
pub struct RedisUntouched;

/// The breaker's state, shared by every request of one API process.
#[derive(Debug)]
pub struct RedisBreaker {
    open: AtomicBool,
    /// Milliseconds since `epoch` when the next probe may go through.
    next_probe: AtomicU64,
    epoch: Instant,
}

impl Default for RedisBreaker {
    fn default() -> Self {
        Self { open: AtomicBool::new(false), next_probe: AtomicU64::new(0), epoch: Instant::now() }
    }
}

impl RedisBreaker {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether a request that needs Redis may go through now.
    pub fn admit(&self) -> bool {
        if !self.open.load(Ordering::Acquire) {
            return true;
        }
        let now = self.now_ms();
        let due = self.next_probe.load(Ordering::Acquire);
        now >= due
            && self
                .next_probe
                .compare_exchange(due, now + PROBE_EVERY.as_millis() as u64, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
    }

    /// A request failed on Redis.
    pub fn trip(&self) {
        if !self.open.swap(true, Ordering::AcqRel) {
            self.next_probe.store(self.now_ms() + PROBE_EVERY.as_millis() as u64, Ordering::Release);
            metrics::counter!("jobq_api_redis_breaker_opened_total").increment(1);
            tracing::warn!("Redis does not answer: requests that need it get 503 at once until it does");
        }
    }

    /// A request got its answer from Redis.
    pub fn reset(&self) {
        if self.open.swap(false, Ordering::AcqRel) {
            tracing::info!("Redis answers again");
        }
    }

    /// Whether the breaker is open.
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }
}

/// Routes that talk to Redis: jobs (but a job's history, read from Postgres), queues, DLQ
/// retries and manual schedule triggers. A schedule's runs read their jobs' live states from
/// Redis, and without it their recorded outcomes: that route is not held.
pub fn needs_redis(method: &Method, path: &str) -> bool {
    (path.starts_with("/api/v1/jobs") && !path.ends_with("/executions"))
        || path.starts_with("/api/v1/queues")
        || (*method == Method::POST && path.starts_with("/api/v1/dlq") && path.ends_with("/retry"))
        || path.ends_with("/trigger")
}

/// The middleware: see the module docs.
pub async fn guard(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let path = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_default();
    if !needs_redis(req.method(), &path) {
        return next.run(req).await;
    }
    if !state.redis_breaker.admit() {
        let mut response = ApiError::Unavailable("Redis is unavailable; retry later".into()).into_response();
        response.headers_mut().insert(axum::http::header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    }
    let response = next.run(req).await;
    if response.extensions().get::<RedisFailed>().is_some() {
        state.redis_breaker.trip();
    } else if answered_by_redis(response.status()) && response.extensions().get::<RedisUntouched>().is_none() {
        state.redis_breaker.reset();
    }
    response
}

/// Whether a response shows that Redis answered: a success. A client error may have been
/// refused before any Redis call (a 422 from validation, a 404 or 409 from Postgres on the DLQ
/// and schedule routes), so it says nothing about Redis and leaves the breaker as it is.
fn answered_by_redis(status: StatusCode) -> bool {
    status.is_success()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_breaker_lets_one_probe_through_per_interval() {
        let b = RedisBreaker::default();
        assert!(b.admit() && b.admit(), "closed: everything goes through");
        b.trip();
        assert!(!b.admit(), "just opened: nothing until the first probe is due");
        b.next_probe.store(0, Ordering::Release);
        assert!(b.admit(), "a probe is due");
        assert!(!b.admit(), "only one per interval");
        b.reset();
        assert!(b.admit() && !b.is_open());
    }

    #[test]
    fn only_answers_from_redis_close_the_breaker() {
        assert!(answered_by_redis(StatusCode::CREATED) && answered_by_redis(StatusCode::OK));
        for refused_early in [
            StatusCode::BAD_REQUEST,
            StatusCode::NOT_FOUND,
            StatusCode::CONFLICT,
            StatusCode::UNPROCESSABLE_ENTITY,
            StatusCode::PAYLOAD_TOO_LARGE,
        ] {
            assert!(!answered_by_redis(refused_early), "{refused_early}");
        }
        assert!(!answered_by_redis(StatusCode::SERVICE_UNAVAILABLE));
    }

    #[test]
    fn only_routes_that_talk_to_redis_are_held() {
        assert!(needs_redis(&Method::POST, "/api/v1/jobs"));
        assert!(needs_redis(&Method::GET, "/api/v1/queues/{queue}"));
        assert!(needs_redis(&Method::POST, "/api/v1/dlq/{id}/retry"));
        assert!(needs_redis(&Method::POST, "/api/v1/schedules/{name}/trigger"));
        assert!(!needs_redis(&Method::GET, "/api/v1/dlq"));
        assert!(!needs_redis(&Method::GET, "/api/v1/jobs/{id}/executions"));
        assert!(!needs_redis(&Method::GET, "/api/v1/schedules/{name}/runs"));
        assert!(!needs_redis(&Method::GET, "/api/v1/schedules"));
        assert!(!needs_redis(&Method::GET, "/health"));
    }
}
