//! `GET /api/v1/queues`, `POST /api/v1/queues/{queue}/pause`, `/resume`, `/cancel` and `/run`.

use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Extension;
use axum::{Json, Router};
use jobq_core::job::{JobState, QueueName};
use jobq_core::stream::{BulkAction, BulkFilter, BulkStopped};
use serde::Deserialize;
use serde_json::{json, Value};

use super::dlq::{audit_done, whole_number};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::extract::{ApiJson, ApiPath, NoQuery};
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
        .route("/api/v1/queues/{queue}/cancel", post(cancel))
        .route("/api/v1/queues/{queue}/run", post(run))
}

/// Most jobs one `POST /api/v1/queues/{queue}/cancel` or `/run` takes.
pub const MAX_BULK: i64 = 100_000;

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

/// The states of a job that has not started, which a queue cancel takes.
#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum NotStarted {
    /// In a priority stream, ready to start.
    Queued,
    /// Waits for its `run_at` (delayed, or held back by a limit).
    Scheduled,
    /// Waits for its next attempt.
    Retrying,
}

/// The states of a job that waits for its `run_at`, which a queue run takes.
#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Waiting {
    /// Delayed, or held back by a limit.
    Scheduled,
    /// Waits for its next attempt.
    Retrying,
}

impl From<NotStarted> for JobState {
    fn from(s: NotStarted) -> Self {
        match s {
            NotStarted::Queued => JobState::Queued,
            NotStarted::Scheduled => JobState::Scheduled,
            NotStarted::Retrying => JobState::Retrying,
        }
    }
}

impl From<Waiting> for JobState {
    fn from(s: Waiting) -> Self {
        match s {
            Waiting::Scheduled => JobState::Scheduled,
            Waiting::Retrying => JobState::Retrying,
        }
    }
}

/// Body of `POST /api/v1/queues/{queue}/cancel`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelQueue {
    /// Only jobs of this type.
    #[schema(pattern = r"^[^\x00]*$", min_length = 1)]
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// Only jobs in these states: `queued`, `scheduled` (delayed or held back), `retrying`.
    /// Default (left out): all three. Running jobs are cancelled one by one
    /// (`DELETE /api/v1/jobs/{id}`).
    #[schema(min_items = 1)]
    pub states: Option<Vec<NotStarted>>,
    /// At most this many (default and maximum 100,000); `more` says whether some may be left.
    #[schema(minimum = 1, maximum = 100_000)]
    #[serde(default, deserialize_with = "whole_number")]
    pub limit: Option<i64>,
    /// `true` cancels them; without it the answer only counts them (`dry_run`).
    #[serde(default)]
    pub confirm: bool,
}

/// Body of `POST /api/v1/queues/{queue}/run`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunQueue {
    /// Only jobs of this type.
    #[schema(pattern = r"^[^\x00]*$", min_length = 1)]
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// Only jobs in these states: `scheduled` (delayed or held back), `retrying`. Default (left
    /// out): both.
    #[schema(min_items = 1)]
    pub states: Option<Vec<Waiting>>,
    /// At most this many (default and maximum 100,000); `more` says whether some may be left.
    #[schema(minimum = 1, maximum = 100_000)]
    #[serde(default, deserialize_with = "whole_number")]
    pub limit: Option<i64>,
    /// `true` queues them; without it the answer only counts them (`dry_run`).
    #[serde(default)]
    pub confirm: bool,
}

/// `POST /api/v1/queues/{queue}/cancel`: with `"confirm": true`, cancels the queue's jobs that
/// have not started (queued, delayed, held back, waiting for a retry), by type and state, as
/// `DELETE /api/v1/jobs/{id}` cancels one; running jobs are left. Audited. Without it, counts
/// them and changes nothing.
#[utoipa::path(post, path = "/api/v1/queues/{queue}/cancel", tag = "queues", params(("queue" = QueueName, Path)), request_body = CancelQueue,
    responses((status = 200, description = "`cancelled` count (without confirm: `matched` count, `dry_run`), and whether `more` may be left", body = serde_json::Value),
        (status = 422, body = ApiErrorBody)))]
pub(crate) async fn cancel(
    _: NoQuery,
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    ApiPath(q): ApiPath<String>,
    ApiJson(req): ApiJson<CancelQueue>,
) -> Result<impl IntoResponse, ApiError> {
    let states = states_of(req.states)?;
    let filter = BulkFilter { kind: req.kind, states };
    bulk(&state, &who, &q, BulkAction::Cancel, filter, req.limit, req.confirm).await
}

/// `POST /api/v1/queues/{queue}/run`: with `"confirm": true`, queues the queue's scheduled and
/// retrying jobs now instead of at their `run_at` (after an outage: retry now, not after the
/// backoff), by type and state, as `POST /api/v1/jobs/{id}/run` queues one. Audited. Without
/// it, counts them and changes nothing.
#[utoipa::path(post, path = "/api/v1/queues/{queue}/run", tag = "queues", params(("queue" = QueueName, Path)), request_body = RunQueue,
    responses((status = 200, description = "`queued` count (without confirm: `matched` count, `dry_run`), and whether `more` may be left", body = serde_json::Value),
        (status = 422, body = ApiErrorBody)))]
pub(crate) async fn run(
    _: NoQuery,
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    ApiPath(q): ApiPath<String>,
    ApiJson(req): ApiJson<RunQueue>,
) -> Result<impl IntoResponse, ApiError> {
    let states = states_of(req.states)?;
    let filter = BulkFilter { kind: req.kind, states };
    bulk(&state, &who, &q, BulkAction::Run, filter, req.limit, req.confirm).await
}

/// The states asked for: all of them when left out, never none (an empty list taking every
/// state would surprise).
fn states_of<S: Into<JobState>>(states: Option<Vec<S>>) -> Result<Vec<JobState>, ApiError> {
    match states {
        Some(s) if s.is_empty() => {
            Err(ApiError::Invalid("`states` must name at least one state; leave it out for all of them".into()))
        }
        s => Ok(s.into_iter().flatten().map(Into::into).collect()),
    }
}

/// Counts (without `confirm`) or takes the jobs of a queue cancel or run, and audits the latter,
/// in a task of its own: a caller that goes away does not stop it half-way unaudited. One
/// stopped by a Redis error is audited with what it did before (`details.stopped`), even
/// nothing: the call that failed may have taken jobs before its reply was lost.
async fn bulk(
    state: &AppState,
    who: &Principal,
    q: &str,
    action: BulkAction,
    filter: BulkFilter,
    limit: Option<i64>,
    confirm: bool,
) -> Result<Json<Value>, ApiError> {
    let q = queue(q)?;
    let limit = limit.unwrap_or(MAX_BULK);
    if !(1..=MAX_BULK).contains(&limit) {
        return Err(ApiError::Invalid(format!("`limit` must be between 1 and {MAX_BULK}")));
    }
    let (state, who) = (state.clone(), who.clone());
    let work = async move {
        let (done, error) = match state.broker.queue_jobs(&q, action, &filter, limit as u64, !confirm).await {
            Ok(done) => (done, None),
            Err(BulkStopped { done, error }) => (done, Some(error)),
        };
        if !confirm {
            return match error {
                Some(e) => Err(e.into()),
                None => Ok(Json(json!({"queue": q, "matched": done.count, "more": done.more, "dry_run": true}))),
            };
        }
        let (audit, key) = match action {
            BulkAction::Cancel => ("queue.cancel", "cancelled"),
            BulkAction::Run => ("queue.run", "queued"),
        };
        // Audited unless refused before Redis ran anything: a call whose reply was lost may
        // have taken jobs all the same.
        if done.count > 0 || !matches!(error, Some(jobq_core::Error::Invalid(_))) {
            let f = json!({"queue": q, "type": filter.kind, "states": filter.states});
            let details = error.as_ref().map(|e| json!({"stopped": e.to_string()}));
            audit_done(&state, &who, audit, Some(q.to_string()), Some(f), done.count as i64, details).await;
        }
        if let Some(e) = error {
            return Err(e.into());
        }
        let mut answer = json!({"queue": q, "more": done.more});
        answer[key] = json!(done.count);
        Ok(Json(answer))
    };
    tokio::spawn(work).await.map_err(|e| ApiError::Internal(e.into()))?
}
