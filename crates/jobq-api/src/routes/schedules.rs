//! Cron schedules: `POST/GET /api/v1/schedules`, `GET/PUT/PATCH/DELETE
//! /api/v1/schedules/{name}`, `POST /api/v1/schedules/{name}/trigger`,
//! `GET /api/v1/schedules/{name}/runs`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use jobq_core::job::QueueName;
use jobq_core::schedule::{JobTemplate, Misfire, ScheduleSpec};
use jobq_core::store::schedules::StoredSchedule;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::extract::{ApiJson, ApiPath, ApiQuery, NoQuery};
use crate::openapi::ApiErrorBody;
use crate::AppState;
#[allow(unused_imports)]
use jobq_core::job::JobInfo;

/// How many upcoming fire times a schedule view shows.
const NEXT_FIRES: usize = 5;

/// The schedule routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/schedules", post(create).get(list))
        .route("/api/v1/schedules/{name}", get(show).put(replace).patch(patch).delete(remove))
        .route("/api/v1/schedules/{name}/trigger", post(trigger))
        .route("/api/v1/schedules/{name}/runs", get(runs))
}

/// The stored schedule plus its next fire times.
fn view(s: &StoredSchedule) -> Value {
    let next: Vec<String> = match (s.spec.enabled, s.next_fire_at, s.spec.validate()) {
        (true, Some(first), Ok(schedule)) => {
            std::iter::once(first).chain(schedule.upcoming(first)).take(NEXT_FIRES).map(|t| t.to_rfc3339()).collect()
        }
        _ => Vec::new(),
    };
    let mut v = serde_json::to_value(s).unwrap_or(Value::Null);
    v["next_fires"] = json!(next);
    v
}

#[utoipa::path(post, path = "/api/v1/schedules", tag = "schedules", request_body = ScheduleSpec,
    responses((status = 201, body = StoredSchedule), (status = 409, body = ApiErrorBody), (status = 422, body = ApiErrorBody)))]
pub(crate) async fn create(
    _: NoQuery,
    State(state): State<AppState>,
    ApiJson(spec): ApiJson<ScheduleSpec>,
) -> Result<impl IntoResponse, ApiError> {
    check_payload(&spec.job, state.payload_limit)?;
    let stored = state.store.create_schedule(&spec).await?;
    Ok((StatusCode::CREATED, Json(view(&stored))))
}

#[utoipa::path(get, path = "/api/v1/schedules", tag = "schedules", responses((status = 200, description = "every schedule with its next 5 fire times", body = serde_json::Value)))]
pub(crate) async fn list(_: NoQuery, State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let all = state.store.schedules().await?;
    Ok(Json(json!({"items": all.iter().map(view).collect::<Vec<_>>()})))
}

/// Every tick enqueues the template's payload, so it is held to the limit of an enqueued one.
fn check_payload(job: &JobTemplate, payload_limit: usize) -> Result<(), ApiError> {
    let size = job.payload.to_string().len();
    if size > payload_limit {
        return Err(ApiError::TooLarge(format!("`job.payload` is {size} bytes; the limit is {payload_limit} bytes")));
    }
    Ok(())
}

fn not_found(name: &str) -> ApiError {
    ApiError::NotFound(format!("schedule `{name}` not found"))
}

#[utoipa::path(get, path = "/api/v1/schedules/{name}", tag = "schedules", params(("name" = String, Path, pattern = r"^[A-Za-z0-9_.:-]{1,128}$")),
    responses((status = 200, body = StoredSchedule), (status = 404, body = ApiErrorBody)))]
pub(crate) async fn show(
    _: NoQuery,
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    let s = state.store.schedule(&name).await?.ok_or_else(|| not_found(&name))?;
    Ok(Json(view(&s)))
}

/// Body of `PUT`: a whole definition; `name` may be left out (the path names it).
#[utoipa::path(put, path = "/api/v1/schedules/{name}", tag = "schedules", params(("name" = String, Path, pattern = r"^[A-Za-z0-9_.:-]{1,128}$")), request_body = ScheduleSpec,
    responses((status = 200, body = StoredSchedule), (status = 201, body = StoredSchedule), (status = 422, body = ApiErrorBody)))]
pub(crate) async fn replace(
    _: NoQuery,
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiJson(mut spec): ApiJson<ScheduleSpec>,
) -> Result<impl IntoResponse, ApiError> {
    if spec.name.is_empty() {
        spec.name = name.clone();
    }
    if spec.name != name {
        return Err(ApiError::Invalid(format!("`name` is `{}` but the path names `{name}`", spec.name)));
    }
    check_payload(&spec.job, state.payload_limit)?;
    let (stored, created) = state.store.put_schedule(&spec, "api").await?;
    Ok((if created { StatusCode::CREATED } else { StatusCode::OK }, Json(view(&stored))))
}

/// Body of `PATCH`: the fields to change.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SchedulePatch {
    /// New expression.
    pub cron: Option<String>,
    /// New zone.
    pub timezone: Option<String>,
    /// New job template.
    pub job: Option<JobTemplate>,
    /// Pause (false) or resume (true); resuming does not fire the skipped ticks.
    pub enabled: Option<bool>,
    /// New misfire policy.
    pub misfire: Option<Misfire>,
    /// New catch-up bound.
    pub catch_up_limit: Option<u32>,
}

#[utoipa::path(patch, path = "/api/v1/schedules/{name}", tag = "schedules", params(("name" = String, Path, pattern = r"^[A-Za-z0-9_.:-]{1,128}$")), request_body = SchedulePatch,
    responses((status = 200, body = StoredSchedule), (status = 404, body = ApiErrorBody), (status = 422, body = ApiErrorBody)))]
pub(crate) async fn patch(
    _: NoQuery,
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiJson(p): ApiJson<SchedulePatch>,
) -> Result<impl IntoResponse, ApiError> {
    if let Some(job) = &p.job {
        check_payload(job, state.payload_limit)?;
    }
    let stored = state
        .store
        .patch_schedule(&name, |s| {
            if let Some(v) = p.cron {
                s.cron = v;
            }
            if let Some(v) = p.timezone {
                s.timezone = v;
            }
            if let Some(v) = p.job {
                s.job = v;
            }
            if let Some(v) = p.enabled {
                s.enabled = v;
            }
            if let Some(v) = p.misfire {
                s.misfire = v;
            }
            if let Some(v) = p.catch_up_limit {
                s.catch_up_limit = v;
            }
        })
        .await?;
    Ok(Json(view(&stored)))
}

#[utoipa::path(delete, path = "/api/v1/schedules/{name}", tag = "schedules", params(("name" = String, Path, pattern = r"^[A-Za-z0-9_.:-]{1,128}$")),
    responses((status = 204, description = "deleted"), (status = 404, body = ApiErrorBody)))]
pub(crate) async fn remove(
    _: NoQuery,
    State(state): State<AppState>,
    axum::Extension(who): axum::Extension<crate::auth::Principal>,
    ApiPath(name): ApiPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    if state.store.delete_schedule(&name).await? {
        // The schedule and its run history are gone: audited, as the DLQ's deletes are.
        super::dlq::audit_done(&state, &who, "schedule.delete", Some(name), None, 1, None).await;
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(not_found(&name))
    }
}

#[utoipa::path(post, path = "/api/v1/schedules/{name}/trigger", tag = "schedules", params(("name" = String, Path, pattern = r"^[A-Za-z0-9_.:-]{1,128}$")),
    responses((status = 201, body = JobInfo), (status = 404, body = ApiErrorBody)))]
pub(crate) async fn trigger(
    _: NoQuery,
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    let job = state.store.trigger_schedule(&state.broker, &name).await?;
    Ok((StatusCode::CREATED, Json(job)))
}

/// Query of `GET .../runs`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct RunsQuery {
    /// How many, 1-500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
}

#[utoipa::path(get, path = "/api/v1/schedules/{name}/runs", tag = "schedules", params(("name" = String, Path, pattern = r"^[A-Za-z0-9_.:-]{1,128}$"), RunsQuery),
    responses((status = 200, description = "recent runs with their job state", body = serde_json::Value), (status = 400, description = "an unknown query parameter", body = ApiErrorBody), (status = 404, body = ApiErrorBody), (status = 422, description = "a malformed or out-of-range value", body = ApiErrorBody)))]
pub(crate) async fn runs(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(q): ApiQuery<RunsQuery>,
) -> Result<impl IntoResponse, ApiError> {
    state.store.schedule(&name).await?.ok_or_else(|| not_found(&name))?;
    let limit = q.limit.unwrap_or(50);
    if !(1..=jobq_core::store::MAX_PAGE).contains(&limit) {
        return Err(ApiError::Invalid(format!("`limit` must be between 1 and {}", jobq_core::store::MAX_PAGE)));
    }
    let runs = state.store.schedule_runs(&name, limit).await?;
    let keys: Vec<(QueueName, jobq_core::job::JobId)> =
        runs.iter().filter_map(|r| Some((r.queue.parse().ok()?, r.job_id))).collect();
    // Without Redis, each run's recorded outcome: the history keeps answering.
    let states = if state.redis_breaker.is_open() {
        vec![None; keys.len()]
    } else {
        state.broker.states(&keys).await.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "schedule runs: the jobs' live states are unavailable; answering the recorded ones");
            vec![None; keys.len()]
        })
    };
    let expired: Vec<_> = keys.iter().zip(&states).filter(|(_, s)| s.is_none()).map(|((_, id), _)| *id).collect();
    let recorded = state.store.last_outcomes(&expired).await?;
    let items: Vec<Value> = runs
        .iter()
        .map(|r| {
            let live = keys.iter().position(|(_, id)| *id == r.job_id).and_then(|i| states[i]);
            let outcome = live.map(|s| s.to_string()).or_else(|| recorded.get(&r.job_id).cloned());
            let mut v = serde_json::to_value(r).unwrap_or(Value::Null);
            v["state"] = json!(outcome);
            v
        })
        .collect();
    Ok(Json(json!({"schedule": name, "items": items, "as_of": Utc::now().to_rfc3339()})))
}
