//! `POST /api/v1/jobs` (enqueue) and `GET /api/v1/jobs/{id}`.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::http::{header, HeaderMap, HeaderName};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Extension;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use jobq_core::backoff::Backoff;
use jobq_core::config::Role;
use jobq_core::job::{DependencyMode, JobId, JobState, NewJob, Priority, QueueName, Start};
use jobq_core::stream::{Cancel, RunNow};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::auth::Principal;
use crate::error::ApiError;
use crate::extract::{job_id, ApiJson, ApiPath, ApiQuery, NoQuery};
use crate::openapi::ApiErrorBody;
use crate::AppState;
#[allow(unused_imports)]
use jobq_core::job::JobInfo;

/// The job routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/jobs", post(enqueue).get(list))
        .route("/api/v1/jobs/batch", post(enqueue_batch))
        .route("/api/v1/jobs/{id}", get(get_job).delete(cancel))
        .route("/api/v1/jobs/{id}/executions", get(executions))
        .route("/api/v1/jobs/{id}/run", post(run_now))
}

/// Body of `POST /api/v1/jobs`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
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
    #[schema(schema_with = jobq_core::duration::schema_opt)]
    #[serde(default, with = "jobq_core::duration::serde_human_opt")]
    pub delay: Option<Duration>,
    /// Start at this time (RFC 3339).
    pub run_at: Option<DateTime<Utc>>,
    /// Per-attempt timeout.
    #[schema(schema_with = jobq_core::duration::schema_opt)]
    #[serde(default, with = "jobq_core::duration::serde_human_opt")]
    pub timeout: Option<Duration>,
    /// Retry policy.
    pub backoff: Option<Backoff>,
    /// Deadline to start (RFC 3339); a job not started by then is dead with reason `expired`.
    pub expires_at: Option<DateTime<Utc>>,
    /// Like `expires_at`, relative to now (`"10m"`).
    #[schema(schema_with = jobq_core::duration::schema_opt)]
    #[serde(default, with = "jobq_core::duration::serde_human_opt")]
    pub ttl: Option<Duration>,
    /// Deduplication key: while held, enqueueing with the same key returns the existing job (200).
    /// Keys starting with `cron:` are the scheduler's (one per schedule tick) and are refused.
    pub unique_key: Option<String>,
    /// Partition (a tenant id, an account): per-partition concurrency limits count jobs by it.
    pub partition_key: Option<String>,
    /// Ids of jobs in the same queue this one waits for (state `waiting`): queued once all
    /// succeeded; dead-lettered (reason `dependency_failed`) if one dies or is cancelled.
    #[serde(default)]
    pub depends_on: Vec<JobId>,
    /// `succeeded` (default) or `finished`: queue once every dependency finished in any state.
    pub dependency_mode: Option<DependencyMode>,
    /// How long the unique key is held (default: until the job is finished).
    #[schema(schema_with = jobq_core::duration::schema_opt)]
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
        if self.unique_key.as_deref().is_some_and(|k| k.starts_with(jobq_core::schedule::CRON_KEY_PREFIX)) {
            // Taking a tick's key ahead of the scheduler would stop that tick from running.
            return Err(ApiError::Invalid(format!(
                "`unique_key` must not start with `{}`: such keys are the scheduler's, one per schedule tick",
                jobq_core::schedule::CRON_KEY_PREFIX
            )));
        }
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
                let too_long = || ApiError::Invalid("`ttl` is too long".into());
                let d = chrono::Duration::from_std(d).map_err(|_| too_long())?;
                Some(Utc::now().checked_add_signed(d).ok_or_else(too_long)?)
            }
            (None, None) => None,
        };
        // Start and deadline past the year 9999 are refused by `NewJob::validate`.
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
            enqueued_by: None,
            partition_key: self.partition_key,
            depends_on: self.depends_on,
            dependency_mode: self.dependency_mode.unwrap_or_default(),
            dependencies_enqueued: false,
            metadata: self.metadata,
            tags: self.tags,
        };
        job.validate()?;
        Ok(job)
    }
}

#[utoipa::path(post, path = "/api/v1/jobs", tag = "jobs", request_body = EnqueueRequest,
    responses((status = 201, description = "enqueued", body = JobInfo), (status = 200, description = "a job with this unique key exists", body = JobInfo),
        (status = 400, body = ApiErrorBody), (status = 409, description = "the unique_key is held by a job another API key enqueued", body = ApiErrorBody),
        (status = 413, body = ApiErrorBody), (status = 422, body = ApiErrorBody), (status = 503, body = ApiErrorBody)))]
pub(crate) async fn enqueue(
    _: NoQuery,
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<EnqueueRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let mut job = req.into_new_job(state.payload_limit)?;
    job.enqueued_by = Some(who.name.clone());
    carry_trace(&headers, &mut job);
    let enqueued = state.broker.enqueue(job).await?;
    if enqueued.created {
        count_enqueued(&enqueued.job.queue, &enqueued.job.kind, 1);
    } else if !visible(&who, &enqueued.job) {
        return Err(held_by_another(&enqueued.job));
    }
    let status = if enqueued.created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(enqueued.job)))
}

/// A producer's enqueue whose unique key is held by a job another key enqueued: that job is not
/// shown to it, as `GET /api/v1/jobs/{id}` would not show it.
fn held_by_another(job: &jobq_core::job::JobInfo) -> ApiError {
    let key = job.unique_key.as_deref().unwrap_or_default();
    ApiError::Conflict(format!("`unique_key` {key:?} is held by a job another API key enqueued"))
}

/// Most jobs in one `POST /api/v1/jobs/batch`.
pub const MAX_BATCH: usize = 1000;

/// Body of `POST /api/v1/jobs/batch`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    /// Up to 1,000 jobs, each like the body of `POST /api/v1/jobs`. Each is read on its own,
    /// so one bad item fails alone (unless the batch is atomic).
    #[schema(value_type = Vec<serde_json::Value>, min_items = 1, max_items = 1000)]
    pub jobs: Vec<Box<RawValue>>,
    /// All or nothing: any invalid item rejects the batch (422) and nothing is enqueued.
    #[serde(default)]
    pub atomic: bool,
    /// A callback job, enqueued after the batch, that waits until every job of the batch has
    /// finished (any outcome) and then runs once. Its queue defaults to the batch's; every job
    /// of the batch must be in that queue. Its `depends_on` lists the batch's jobs.
    #[schema(value_type = Option<EnqueueRequest>)]
    pub on_complete: Option<serde_json::Value>,
}

/// `POST /api/v1/jobs/batch`: one Redis round trip for the whole batch (and one for all the
/// existing jobs of its duplicates); per-item results
/// (`status` 201 created, 200 existing, 4xx with `error`) in the order given. With
/// `Prefer: return=minimal`, a created or existing job's result holds its `id` and `state`
/// instead of the whole job.
#[utoipa::path(post, path = "/api/v1/jobs/batch", tag = "jobs", request_body = BatchRequest,
    params(("Prefer" = Option<String>, Header, description = "`return=minimal`: each job's result holds `id` and `state` only (answered with `Preference-Applied: return=minimal`)")),
    responses((status = 200, description = "per-item results", body = BatchAnswer, headers(
        ("Preference-Applied" = String, description = "`return=minimal` when the results hold ids and states only"),
        ("Vary" = String, description = "`Prefer`: the answer's shape depends on it"))),
        (status = 413, body = ApiErrorBody), (status = 422, body = ApiErrorBody), (status = 503, body = ApiErrorBody)))]
pub(crate) async fn enqueue_batch(
    _: NoQuery,
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<BatchRequest>,
) -> Result<impl IntoResponse, ApiError> {
    if req.jobs.is_empty() {
        return Err(ApiError::Invalid("`jobs`: a batch holds at least one job".into()));
    }
    if req.jobs.len() > MAX_BATCH {
        return Err(ApiError::TooLarge(format!("a batch holds 1 to {MAX_BATCH} jobs, got {}", req.jobs.len())));
    }
    let mut results: Vec<Option<BatchItem>> = std::iter::repeat_with(|| None).take(req.jobs.len()).collect();
    let mut jobs = Vec::with_capacity(req.jobs.len());
    let mut index = Vec::with_capacity(req.jobs.len());
    let mut errors = Vec::new();
    for (i, raw) in req.jobs.into_iter().enumerate() {
        let parsed = crate::extract::object::<EnqueueRequest>(raw.get())
            .map_err(|e| ApiError::Invalid(e.to_string()))
            .and_then(|r| r.into_new_job(state.payload_limit));
        match parsed {
            Ok(mut job) => {
                job.enqueued_by = Some(who.name.clone());
                carry_trace(&headers, &mut job);
                index.push(i);
                jobs.push(job);
            }
            Err(e) => {
                errors.push(json!({"index": i, "message": e.to_string()}));
                results[i] = Some(item_error(i, e));
            }
        }
    }
    if req.atomic && !errors.is_empty() {
        return Err(ApiError::InvalidWith(
            "the batch is atomic and some jobs are invalid; nothing was enqueued".into(),
            json!(errors),
        ));
    }
    let callback = match req.on_complete {
        Some(raw) => Some(batch_callback(raw, &jobs, &state, &who, &headers)?),
        None => None,
    };
    // Every item invalid and no callback: Redis is not called, which says nothing of it.
    let untouched = (jobs.is_empty() && callback.is_none()).then_some(Extension(crate::breaker::RedisUntouched));
    let outcome = state.broker.enqueue_many(jobs, req.atomic).await?;
    // The callback waits for the batch's jobs as the caller sees them: not for a job another
    // key enqueued whose unique key an item named (answered 409 below, its id not shown).
    let done: Vec<JobId> = outcome
        .iter()
        .filter_map(|r| r.as_ref().ok().filter(|e| e.created || visible(&who, &e.job)).map(|e| e.job.id))
        .collect();
    let minimal = prefers_minimal(&headers);
    let (mut created, mut existing) = (0, 0);
    // Jobs created per queue and type: one counter update for each, not one per job.
    let mut counts: Vec<(QueueName, String, u64)> = Vec::new();
    for (i, r) in index.into_iter().zip(outcome) {
        results[i] = Some(match r {
            Ok(e) if !e.created && !visible(&who, &e.job) => item_error(i, held_by_another(&e.job)),
            Ok(e) => {
                if e.created {
                    match counts.iter_mut().find(|(q, k, _)| *q == e.job.queue && *k == e.job.kind) {
                        Some((.., n)) => *n += 1,
                        None => counts.push((e.job.queue.clone(), e.job.kind.clone(), 1)),
                    }
                    created += 1;
                } else {
                    existing += 1;
                }
                let status = if e.created { 201 } else { 200 };
                if minimal {
                    BatchItem::Brief { index: i, status, id: e.job.id, state: e.job.state }
                } else {
                    BatchItem::Job { index: i, status, job: Box::new(e.job) }
                }
            }
            Err(e) => item_error(i, e.into()),
        });
    }
    for (queue, kind, n) in &counts {
        count_enqueued(queue, kind, *n);
    }
    let failed = results.len() - created - existing;
    let results: Vec<BatchItem> = results.into_iter().flatten().collect();
    let mut body = BatchAnswer { created, existing, failed, results, on_complete: None, on_complete_error: None };
    if let Some(callback) = callback {
        // The batch is in Redis whatever happens now: a failed callback is reported beside the
        // batch's results, not instead of them (a client retrying the whole batch would
        // enqueue it twice).
        match state.broker.enqueue(callback.after_batch(done)).await {
            Ok(enqueued) if !enqueued.created && !visible(&who, &enqueued.job) => {
                let e = held_by_another(&enqueued.job);
                body.on_complete_error = Some(ItemError { code: e.parts().1, message: e.to_string() });
            }
            Ok(enqueued) => {
                if enqueued.created {
                    count_enqueued(&enqueued.job.queue, &enqueued.job.kind, 1);
                }
                body.on_complete = Some(enqueued.job);
            }
            Err(e) => {
                tracing::warn!(error = %e, "batch enqueued but its on_complete job was not");
                let e = ApiError::from(e);
                body.on_complete_error = Some(ItemError { code: e.parts().1, message: e.to_string() });
            }
        }
    }
    let applied = minimal.then_some([(PREFERENCE_APPLIED, "return=minimal")]);
    Ok((untouched, [(header::VARY, "prefer")], applied, Json(body)))
}

const PREFERENCE_APPLIED: HeaderName = HeaderName::from_static("preference-applied");

/// Whether the request holds `Prefer: return=minimal` (RFC 7240), among other preferences or
/// alone: a batch's created and existing jobs are then answered by their id and state only. A
/// `return` preference given more than once counts by its first instance, as the RFC says.
fn prefers_minimal(headers: &HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|p| p.split(';').next()?.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("return"))
        .is_some_and(|(_, v)| v.trim().trim_matches('"').eq_ignore_ascii_case("minimal"))
}

/// Answer of `POST /api/v1/jobs/batch`, serialized as it is (no intermediate JSON tree: a
/// 1,000-job answer is built once).
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct BatchAnswer {
    /// Jobs created.
    created: usize,
    /// Items answered by a job that already held their unique key.
    existing: usize,
    /// Items refused.
    failed: usize,
    /// One per item, in the order given.
    results: Vec<BatchItem>,
    /// The batch's `on_complete` job.
    #[serde(skip_serializing_if = "Option::is_none")]
    on_complete: Option<JobInfo>,
    /// Why the `on_complete` job was not enqueued (the batch's jobs were).
    #[serde(skip_serializing_if = "Option::is_none")]
    on_complete_error: Option<ItemError>,
}

/// One item of a batch answer: the job (201 created, 200 existing) or why it failed.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(untagged)]
enum BatchItem {
    Job {
        index: usize,
        status: u16,
        job: Box<JobInfo>,
    },
    /// With `Prefer: return=minimal`.
    Brief {
        index: usize,
        status: u16,
        id: JobId,
        state: JobState,
    },
    Failed {
        index: usize,
        status: u16,
        error: ItemError,
    },
}

#[derive(Serialize, utoipa::ToSchema)]
struct ItemError {
    #[schema(value_type = String)]
    code: &'static str,
    message: String,
}

/// The `on_complete` job of a batch: in the batch's queue (every job of the batch must share
/// it), its `depends_on` left to the batch.
fn batch_callback(
    raw: Value,
    jobs: &[NewJob],
    state: &AppState,
    who: &Principal,
    headers: &HeaderMap,
) -> Result<NewJob, ApiError> {
    let req: EnqueueRequest =
        crate::extract::object(&raw.to_string()).map_err(|e| ApiError::Invalid(format!("`on_complete`: {e}")))?;
    if !req.depends_on.is_empty() || req.dependency_mode.is_some() {
        return Err(ApiError::Invalid("`on_complete`: `depends_on` is set by the batch; leave it out".into()));
    }
    let given = req.queue.clone();
    let mut job = req.into_new_job(state.payload_limit)?;
    let queue = match (given, jobs.first()) {
        (Some(q), _) => q,
        (None, Some(first)) => first.queue.clone(),
        (None, None) => job.queue.clone(),
    };
    if let Some(other) = jobs.iter().find(|j| j.queue != queue) {
        return Err(ApiError::Invalid(format!(
            "`on_complete` waits for jobs of its own queue `{queue}`; this batch also has queue `{}`",
            other.queue
        )));
    }
    job.queue = queue;
    job.enqueued_by = Some(who.name.clone());
    carry_trace(headers, &mut job);
    Ok(job)
}

/// Puts the W3C trace context into the job's metadata, unless the job carries its own: the
/// worker opens the job's span as a child of it. With span export on, that is the request's
/// span (itself a child of the caller's `traceparent`); without, the caller's headers.
fn carry_trace(headers: &HeaderMap, job: &mut NewJob) {
    if job.metadata.contains_key("traceparent") {
        return;
    }
    let exported = jobq_core::telemetry::current_trace_context();
    if !exported.is_empty() {
        job.metadata.extend(exported);
        return;
    }
    for name in ["traceparent", "tracestate"] {
        if let Some(v) = headers.get(name).and_then(|v| v.to_str().ok()) {
            let valid = name != "traceparent" || jobq_core::job::parse_traceparent(v).is_some();
            if valid && v.len() <= 512 {
                job.metadata.entry(name.to_owned()).or_insert_with(|| v.to_owned());
            }
        }
    }
}

fn count_enqueued(queue: &QueueName, kind: &str, n: u64) {
    let labels = [("queue", queue.to_string()), ("type", jobq_core::ops::type_label(kind))];
    metrics::counter!("jobq_jobs_enqueued_total", &labels).increment(n);
}

fn item_error(i: usize, e: ApiError) -> BatchItem {
    let (status, code) = e.parts();
    BatchItem::Failed { index: i, status: status.as_u16(), error: ItemError { code, message: e.to_string() } }
}

/// Query of `GET /api/v1/jobs`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only this queue.
    #[param(value_type = Option<QueueName>)]
    pub queue: Option<String>,
    /// Only this state.
    #[param(value_type = Option<JobState>)]
    pub state: Option<String>,
    /// Only this type.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// Page size, 1-500 (default 50). A page ends between two scans of Redis' keys, so it may
    /// hold a few more jobs (at most 10 or so), or fewer while more follow (`next_cursor`).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<usize>,
    /// `next_cursor` of the previous page.
    #[param(pattern = r"^[0-9]{1,20}\.[A-Za-z0-9_.-]{1,64}$")]
    pub cursor: Option<String>,
}

/// `GET /api/v1/jobs`: jobs still in Redis (per retention), filtered; cursor-paged.
#[utoipa::path(get, path = "/api/v1/jobs", tag = "jobs", params(ListQuery),
    responses((status = 200, description = "items and next_cursor", body = serde_json::Value), (status = 400, description = "an unknown query parameter", body = ApiErrorBody), (status = 422, description = "a malformed or out-of-range value", body = ApiErrorBody)))]
pub(crate) async fn list(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::Invalid("`limit` must be between 1 and 500".into()));
    }
    let queue = q.queue.map(|s| s.parse::<QueueName>().map_err(ApiError::Invalid)).transpose()?;
    let job_state = q.state.map(|s| s.parse::<JobState>().map_err(ApiError::Invalid)).transpose()?;
    let (items, next_cursor) =
        state.broker.list_jobs(queue.as_ref(), job_state, q.kind.as_deref(), limit, q.cursor.as_deref()).await?;
    Ok(Json(json!({"items": items, "next_cursor": next_cursor})))
}

/// A producer sees only the jobs its key enqueued; others see every job.
fn visible(who: &Principal, job: &jobq_core::job::JobInfo) -> bool {
    who.role != Role::Producer || job.enqueued_by.as_deref() == Some(who.name.as_str())
}

#[utoipa::path(get, path = "/api/v1/jobs/{id}", tag = "jobs", params(("id" = uuid::Uuid, Path, description = "job id (UUID)")),
    responses((status = 200, body = JobInfo), (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody)))]
pub(crate) async fn get_job(
    _: NoQuery,
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    ApiPath(id): ApiPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    let id = job_id(&id)?;
    let job = state.broker.job(id).await?.filter(|j| visible(&who, j));
    Ok(Json(job.ok_or_else(|| ApiError::NotFound(format!("job {id} not found")))?))
}

/// `GET /api/v1/jobs/{id}/executions`: every recorded attempt, from Postgres.
#[utoipa::path(get, path = "/api/v1/jobs/{id}/executions", tag = "jobs", params(("id" = uuid::Uuid, Path, description = "job id (UUID)")),
    responses((status = 200, description = "every recorded attempt", body = serde_json::Value), (status = 404, body = ApiErrorBody)))]
pub(crate) async fn executions(
    _: NoQuery,
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    ApiPath(id): ApiPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    let id = job_id(&id)?;
    if who.role == Role::Producer {
        let job = state.broker.job(id).await?.filter(|j| visible(&who, j));
        job.ok_or_else(|| ApiError::NotFound(format!("job {id} not found")))?;
    }
    let items = state.store.executions(id).await?;
    Ok(Json(json!({"job_id": id, "items": items})))
}

/// `DELETE /api/v1/jobs/{id}`: a queued or scheduled job is cancelled and never starts (200,
/// state `cancelled`); a running one is asked to stop (202, state `running`,
/// `cancel_requested`); a finished one is a 409.
#[utoipa::path(delete, path = "/api/v1/jobs/{id}", tag = "jobs", params(("id" = uuid::Uuid, Path, description = "job id (UUID)")),
    responses((status = 200, description = "cancelled; never starts", body = JobInfo), (status = 202, description = "running; asked to stop", body = JobInfo),
        (status = 404, body = ApiErrorBody), (status = 409, body = ApiErrorBody)))]
pub(crate) async fn cancel(
    _: NoQuery,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    let id = job_id(&id)?;
    let status = match state.broker.cancel(id).await? {
        Cancel::Cancelled => StatusCode::OK,
        Cancel::Requested => StatusCode::ACCEPTED,
        Cancel::Finished(s) => return Err(ApiError::Conflict(format!("job {id} is already {s}"))),
    };
    let job = state.broker.job(id).await?.ok_or_else(|| ApiError::NotFound(format!("job {id} not found")))?;
    Ok((status, Json(job)))
}

/// `POST /api/v1/jobs/{id}/run`: a scheduled job, or one waiting for its retry, goes to its
/// queue now instead of at its `run_at` (200, state `queued`); a job in any other state is a
/// 409 and stays as it is.
#[utoipa::path(post, path = "/api/v1/jobs/{id}/run", tag = "jobs", params(("id" = uuid::Uuid, Path, description = "job id (UUID)")),
    responses((status = 200, description = "queued now", body = JobInfo), (status = 404, body = ApiErrorBody),
        (status = 409, description = "neither scheduled nor retrying", body = ApiErrorBody)))]
pub(crate) async fn run_now(
    _: NoQuery,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    let id = job_id(&id)?;
    match state.broker.run_now(id).await? {
        RunNow::Queued(job) => Ok(Json(*job)),
        RunNow::Not(s) => {
            Err(ApiError::Conflict(format!("job {id} is {s}: only a scheduled or retrying job can be run now")))
        }
    }
}
