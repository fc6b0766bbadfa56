//! `POST /api/v1/jobs` (enqueue) and `GET /api/v1/jobs/{id}`.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use jobq_core::backoff::Backoff;
use jobq_core::job::{NewJob, Priority, QueueName, Start};
use jobq_core::stream::Cancel;
use serde::Deserialize;

use crate::error::ApiError;
use crate::extract::{job_id, ApiJson};
use crate::AppState;

/// The job routes.
pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/jobs", post(enqueue)).route("/api/v1/jobs/{id}", get(get_job).delete(cancel))
}

/// Body of `POST /api/v1/jobs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnqueueRequest {
    /// Handler name.
    #[serde(rename = "type")]
    pub kind: String,
    /// Handler input (default null).
    #[serde(default)]
    pub payload: serde_json::Value,
    /// Queue (default `default`).
    pub queue: Option<QueueName>,
    /// Priority (default `normal`).
    pub priority: Option<Priority>,
    /// Attempt budget.
    pub max_attempts: Option<u32>,
    /// Start after this delay (`"30s"`, `"5m"`, or milliseconds).
    #[serde(default, with = "jobq_core::duration::serde_human_opt")]
    pub delay: Option<Duration>,
    /// Start at this time (RFC 3339).
    pub run_at: Option<DateTime<Utc>>,
    /// Per-attempt timeout.
    #[serde(default, with = "jobq_core::duration::serde_human_opt")]
    pub timeout: Option<Duration>,
    /// Retry policy.
    pub backoff: Option<Backoff>,
    /// Deadline to start (RFC 3339); a job not started by then is dead with reason `expired`.
    pub expires_at: Option<DateTime<Utc>>,
    /// Like `expires_at`, relative to now (`"10m"`).
    #[serde(default, with = "jobq_core::duration::serde_human_opt")]
    pub ttl: Option<Duration>,
    /// Deduplication key: while held, enqueueing with the same key returns the existing job (200).
    pub unique_key: Option<String>,
    /// How long the unique key is held (default: until the job is finished).
    #[serde(default, with = "jobq_core::duration::serde_human_opt")]
    pub unique_ttl: Option<Duration>,
    /// String map carried to the handler.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Labels.
    #[serde(default)]
    pub tags: Vec<String>,
}

impl EnqueueRequest {
    /// Checks limits and turns the request into a [`NewJob`].
    pub fn into_new_job(self, payload_limit: usize) -> Result<NewJob, ApiError> {
        let size = self.payload.to_string().len();
        if size > payload_limit {
            return Err(ApiError::TooLarge(format!("`payload` is {size} bytes; the limit is {payload_limit} bytes")));
        }
        let start = match (self.delay, self.run_at) {
            (Some(_), Some(_)) => return Err(ApiError::Invalid("set `delay` or `run_at`, not both".into())),
            (Some(d), None) => Start::After(d),
            (None, Some(t)) => Start::At(t),
            (None, None) => Start::Now,
        };
        let expires_at = match (self.expires_at, self.ttl) {
            (Some(_), Some(_)) => return Err(ApiError::Invalid("set `expires_at` or `ttl`, not both".into())),
            (Some(t), None) => Some(t),
            (None, Some(d)) => {
                let d = chrono::Duration::from_std(d).map_err(|_| ApiError::Invalid("`ttl` is too long".into()))?;
                Some(Utc::now() + d)
            }
            (None, None) => None,
        };
        if self.tags.len() > 32 || self.tags.iter().any(|t| t.len() > 128) {
            return Err(ApiError::Invalid("`tags`: at most 32 tags of at most 128 characters".into()));
        }
        if self.metadata.len() > 64 || self.metadata.iter().any(|(k, v)| k.len() > 128 || v.len() > 4096) {
            return Err(ApiError::Invalid(
                "`metadata`: at most 64 entries, keys up to 128 and values up to 4096 characters".into(),
            ));
        }
        let job = NewJob {
            kind: self.kind,
            payload: self.payload,
            queue: self.queue.unwrap_or_else(QueueName::default_queue),
            priority: self.priority.unwrap_or_default(),
            max_attempts: self.max_attempts,
            backoff: self.backoff,
            timeout: self.timeout,
            start,
            expires_at,
            unique_key: self.unique_key,
            unique_ttl: self.unique_ttl,
            metadata: self.metadata,
            tags: self.tags,
        };
        job.validate()?;
        Ok(job)
    }
}

async fn enqueue(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<EnqueueRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let job = req.into_new_job(state.payload_limit)?;
    let enqueued = state.broker.enqueue(job).await?;
    let status = if enqueued.created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(enqueued.job)))
}

async fn get_job(State(state): State<AppState>, Path(id): Path<String>) -> Result<impl IntoResponse, ApiError> {
    let id = job_id(&id)?;
    let job = state.broker.job(id).await?.ok_or_else(|| ApiError::NotFound(format!("job {id} not found")))?;
    Ok(Json(job))
}

/// `DELETE /api/v1/jobs/{id}`: a queued or scheduled job is cancelled and never starts (200,
/// state `cancelled`); a running one is asked to stop (202, state `running`,
/// `cancel_requested`); a finished one is a 409.
async fn cancel(State(state): State<AppState>, Path(id): Path<String>) -> Result<impl IntoResponse, ApiError> {
    let id = job_id(&id)?;
    let status = match state.broker.cancel(id).await? {
        Cancel::Cancelled => StatusCode::OK,
        Cancel::Requested => StatusCode::ACCEPTED,
        Cancel::Finished(s) => return Err(ApiError::Conflict(format!("job {id} is already {s}"))),
    };
    let job = state.broker.job(id).await?.ok_or_else(|| ApiError::NotFound(format!("job {id} not found")))?;
    Ok((status, Json(job)))
}
