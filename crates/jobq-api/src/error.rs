//! API errors: one JSON shape everywhere, `{"error": {"code", "message", "details"}}`.
//! Caller mistakes are 4xx; an outage of Redis or Postgres is 503; only bugs are 500.

use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

/// An error answered to the caller.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is not well-formed (bad JSON, bad id).
    #[error("{0}")]
    BadRequest(String),
    /// 401: no key, or an unknown one.
    #[error("{0}")]
    Unauthorized(String),
    /// 403: the key's role may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// 429: over the key's rate limit; retry after the duration.
    #[error("rate limit exceeded; retry in {0:?}")]
    RateLimited(std::time::Duration),
    /// 404.
    #[error("{0}")]
    NotFound(String),
    /// 409: conflicts with the current state.
    #[error("{0}")]
    Conflict(String),
    /// 413: over a size limit.
    #[error("{0}")]
    TooLarge(String),
    /// 415: not JSON.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 422: well-formed but invalid.
    #[error("{0}")]
    Invalid(String),
    /// 422 with details (per-item errors of a batch).
    #[error("{0}")]
    InvalidWith(String, Value),
    /// 503: Redis or Postgres unavailable.
    #[error("{0}")]
    Unavailable(String),
    /// 503: Redis did not answer (the Redis breaker opens on it).
    #[error("{0}")]
    RedisUnavailable(String),
    /// 500: a bug; details are logged, not returned.
    #[error(transparent)]
    Internal(anyhow::Error),
}

impl ApiError {
    /// HTTP status and stable error code.
    pub fn parts(&self) -> (StatusCode, &'static str) {
        match self {
            Self::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Self::RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            Self::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Self::UnsupportedMediaType(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            Self::Invalid(_) | Self::InvalidWith(..) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
            Self::Unavailable(_) | Self::RedisUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            Self::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl From<jobq_core::Error> for ApiError {
    fn from(e: jobq_core::Error) -> Self {
        use jobq_core::Error as E;
        match e {
            E::JobNotFound(id) => Self::NotFound(format!("job {id} not found")),
            E::NotFound(m) => Self::NotFound(m),
            E::Invalid(m) => Self::Invalid(m),
            E::Conflict(m) => Self::Conflict(m),
            E::Redis(e) => {
                tracing::warn!(error = %e, "Redis unavailable");
                Self::RedisUnavailable("Redis is unavailable; retry later".into())
            }
            // Class 22 (data exception): a value Postgres cannot store or compare, such as a NUL
            // character in text or a time out of its range; the caller's mistake, not an outage.
            E::Database(sqlx::Error::Database(e)) if e.code().is_some_and(|c| c.starts_with("22")) => {
                Self::Invalid(format!("a value cannot be stored or compared: {}", e.message()))
            }
            E::Database(e) => {
                tracing::warn!(error = %e, "Postgres unavailable");
                Self::Unavailable("Postgres is unavailable; retry later".into())
            }
            other => Self::Internal(other.into()),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        let text = r.body_text();
        match r.status() {
            StatusCode::PAYLOAD_TOO_LARGE => Self::TooLarge(format!("request body is over the limit: {text}")),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                Self::UnsupportedMediaType("send JSON with `Content-Type: application/json`".into())
            }
            StatusCode::UNPROCESSABLE_ENTITY => Self::Invalid(text),
            _ => Self::BadRequest(text),
        }
    }
}

/// A query parameter the route does not take, or one given twice, is a malformed request (400);
/// a value of the wrong type or format (`limit=ten`, a time that is not RFC 3339) is invalid
/// data (422), as the same mistake in a JSON body and an out-of-range `limit` are.
impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        let text = r.body_text();
        if text.contains("unknown field") || text.contains("duplicate field") {
            Self::BadRequest(text)
        } else {
            Self::Invalid(text)
        }
    }
}

impl From<BytesRejection> for ApiError {
    fn from(r: BytesRejection) -> Self {
        let text = r.body_text();
        match r.status() {
            StatusCode::PAYLOAD_TOO_LARGE => Self::TooLarge(format!("request body is over the limit: {text}")),
            _ => Self::BadRequest(text),
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        Self::BadRequest(r.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.parts();
        let message = match &self {
            Self::Internal(err) => {
                tracing::error!(error = ?err, "request failed");
                "internal error".to_owned()
            }
            other => other.to_string(),
        };
        let details = if let Self::InvalidWith(_, d) = &self { d.clone() } else { Value::Null };
        let mut response = error_response(status, code, &message, details);
        if let Self::RedisUnavailable(_) = &self {
            response.extensions_mut().insert(crate::breaker::RedisFailed);
        }
        if let Self::RateLimited(wait) = &self {
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            if let Ok(v) = axum::http::HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert(axum::http::header::RETRY_AFTER, v);
            }
        }
        response
    }
}

/// Builds the error body.
pub fn error_response(status: StatusCode, code: &str, message: &str, details: Value) -> Response {
    (status, Json(json!({ "error": { "code": code, "message": message, "details": details } }))).into_response()
}
