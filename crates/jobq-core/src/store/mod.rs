//! The Postgres store: every SQL statement of jobq lives here.
//!
//! * `job_executions`: one row per finished attempt (written by the recorder, in batches).
//! * `dead_jobs`: the dead-letter queue.
//! * `schedules`, `schedule_runs`: cron schedules and the jobs they fired ([`schedules`]).

pub mod schedules;

use chrono::{DateTime, Datelike, Utc};
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Executor, PgPool, Row};
use std::str::FromStr;
use uuid::Uuid;

use crate::config::DatabaseSettings;
use crate::error::{Error, Result};
use crate::job::{Envelope, JobId};
use crate::stream::outbox::Event;
use crate::stream::{Broker, Requeued};

/// Largest page of a list endpoint.
pub const MAX_PAGE: i64 = 500;

/// Handle to Postgres. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
}

/// One dead-letter queue entry.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeadJob {
    /// Job id.
    pub job_id: JobId,
    /// Queue.
    pub queue: String,
    /// Job type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Priority.
    pub priority: String,
    /// Payload of the run that died.
    pub payload: serde_json::Value,
    /// Run that died.
    pub run: i32,
    /// Attempts made in that run.
    pub attempts: i32,
    /// Error of the last attempt.
    pub last_error: Option<String>,
    /// Why it died: `max_attempts`, `unknown_type`, `fatal`...
    pub reason: String,
    /// When it died.
    pub failed_at: DateTime<Utc>,
    /// Times it was retried from the DLQ before.
    pub retry_count: i32,
}

/// A DLQ retry by filter in progress, as its audit entry (`dlq.retry_filter`) records it.
#[derive(Debug, Clone)]
pub struct Replay {
    /// Its audit entry.
    pub audit_id: i64,
    /// This run of it: a replay taken over by another process gets a new one.
    pub owner: uuid::Uuid,
    /// Which dead jobs.
    pub filter: DlqFilter,
    /// How many it set out to retry.
    pub of: i64,
    /// Retried so far.
    pub retried: i64,
    /// Skipped: retried or deleted by someone else meanwhile.
    pub skipped: i64,
    /// Could not be retried (Redis or Postgres errors); they stay in the DLQ.
    pub failed: i64,
    /// The last job of the selection it set out to retry, by `(failed_at, job_id)`, as the DLQ
    /// orders them oldest first: it retries no row past it (a job that died again since is past
    /// it), and a replay taken over goes no further, so that it never retries more jobs than
    /// were chosen.
    pub upto: Option<(DateTime<Utc>, JobId)>,
    /// When it began (its audit entry's time, Postgres' clock): a replay taken over retries only
    /// rows recorded before (`dead_jobs.recorded_at`).
    pub began: Option<DateTime<Utc>>,
}

impl Replay {
    /// Dead jobs still to retry.
    pub fn left(&self) -> i64 {
        (self.of - self.retried - self.skipped - self.failed).max(0)
    }

    /// The audit entry's `details`.
    pub fn details(&self, done: bool) -> serde_json::Value {
        let mut d = serde_json::json!({"retried": self.retried, "skipped": self.skipped, "failed": self.failed, "of": self.of, "done": done});
        if let Some((at, id)) = self.upto {
            // Microseconds, as Postgres keeps them: the bound compares exactly.
            d["upto"] = serde_json::json!({"failed_at_us": at.timestamp_micros(), "job_id": id});
        }
        d
    }
}

/// Filters and cursor of a DLQ listing.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct DlqFilter {
    /// Only this queue.
    pub queue: Option<String>,
    /// Only this type.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// Only jobs whose last error contains this (case-insensitive).
    pub error: Option<String>,
    /// Only jobs that died at or after this time.
    pub failed_after: Option<DateTime<Utc>>,
    /// Only jobs that died before this time.
    pub failed_before: Option<DateTime<Utc>>,
    /// Page size (clamped to 1..=[`MAX_PAGE`]).
    #[serde(skip)]
    pub limit: i64,
    /// Continue after this cursor (from a previous page).
    #[serde(skip)]
    pub cursor: Option<String>,
}

/// The WHERE clause of DLQ filters, binding $1..$5 (queue, type, error pattern, after, before).
const DLQ_WHERE: &str = "retried_at IS NULL
    AND ($1::text IS NULL OR queue = $1)
    AND ($2::text IS NULL OR job_type = $2)
    AND ($3::text IS NULL OR last_error ILIKE $3)
    AND ($4::timestamptz IS NULL OR failed_at >= $4)
    AND ($5::timestamptz IS NULL OR failed_at < $5)";

/// `%text%` for ILIKE, with the pattern characters escaped.
fn contains_pattern(text: &Option<String>) -> Option<String> {
    text.as_ref().map(|t| format!("%{}%", t.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")))
}

fn bind_filter<'q>(
    q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    f: &'q DlqFilter,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    q.bind(&f.queue).bind(&f.kind).bind(contains_pattern(&f.error)).bind(f.failed_after).bind(f.failed_before)
}

/// One audit log entry.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AuditEntry {
    /// Id.
    pub id: i64,
    /// When.
    pub at: DateTime<Utc>,
    /// API key name.
    pub actor: String,
    /// `dlq.retry`, `dlq.retry_filter`, `dlq.delete`, `dlq.purge`.
    pub action: String,
    /// Job id, when one job was concerned.
    pub target: Option<String>,
    /// Filter of a bulk action.
    pub filter: Option<serde_json::Value>,
    /// How many jobs.
    pub count: i64,
    /// Anything else (edited payload, progress).
    pub details: Option<serde_json::Value>,
}

/// A page of results and the cursor of the next page.
#[derive(Debug, Clone, Serialize)]
pub struct Page<T> {
    /// Items, newest first.
    pub items: Vec<T>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// One recorded attempt.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Execution {
    /// Run number.
    pub run: i32,
    /// Attempt in the run.
    pub attempt: i32,
    /// succeeded | failed | dead.
    pub outcome: String,
    /// Error message.
    pub error: Option<String>,
    /// Consumer that ran it.
    pub worker: Option<String>,
    /// Start.
    pub started_at: Option<DateTime<Utc>>,
    /// End.
    pub finished_at: Option<DateTime<Utc>>,
}

/// A [`Store::purge_dead`] stopped by an error after `deleted` rows were deleted (and committed).
#[derive(Debug)]
pub struct PurgeStopped {
    /// Rows deleted before the error.
    pub deleted: u64,
    /// The error.
    pub error: Error,
}

/// A DLQ row's place in the order a retry by filter selects rows in: `(failed_at, job_id)`.
pub type DeadKey = (DateTime<Utc>, JobId);

/// What a DLQ retry did.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DlqRetried {
    /// Job id.
    pub job_id: JobId,
    /// The new run number.
    pub run: u32,
    /// The job's state now: `queued`, or, when an earlier retry had re-enqueued it already
    /// (its commit failed), the state of that run (`recorded` once its history is written).
    pub state: String,
    /// A payload was given but not applied: an earlier retry had re-enqueued the job already,
    /// with the payload it had (the row is marked all the same).
    #[serde(skip)]
    pub payload_not_applied: bool,
}

/// One `job_executions` row per attempt of `events`: a repeated event (an outbox entry read
/// again) once, and a `dead` event that follows a `failed` one of the same attempt (the job
/// died before its next attempt started) folded into it.
fn one_row_per_attempt(events: &[Event]) -> Vec<Event> {
    let mut rows: Vec<Event> = Vec::with_capacity(events.len());
    let mut seen: std::collections::HashMap<(JobId, i32, i32), usize> = std::collections::HashMap::new();
    for e in events {
        match seen.get(&(e.job_id, e.run, e.attempt)) {
            None => {
                seen.insert((e.job_id, e.run, e.attempt), rows.len());
                rows.push(e.clone());
            }
            Some(&i) if e.outcome == "dead" && rows[i].outcome == "failed" => {
                let row = &mut rows[i];
                row.outcome = e.outcome.clone();
                row.error = match (row.error.take(), &e.error) {
                    (Some(a), Some(b)) => Some(format!("{a}; {b}")),
                    (a, b) => a.or_else(|| b.clone()),
                };
                row.finished_at = e.finished_at.or(row.finished_at);
            }
            Some(_) => {}
        }
    }
    rows
}

fn encode_cursor(t: DateTime<Utc>, id: Uuid) -> String {
    format!("{}_{id}", t.timestamp_micros())
}

fn decode_cursor(c: &str) -> Result<(DateTime<Utc>, Uuid)> {
    let bad = || Error::Invalid(format!("invalid cursor `{c}`"));
    let (t, id) = c.split_once('_').ok_or_else(bad)?;
    // Postgres keeps times from 4713 BC to 294276 AD; a cursor comes from a row it kept.
    let t = t
        .parse::<i64>()
        .ok()
        .and_then(DateTime::<Utc>::from_timestamp_micros)
        .filter(|t| (-4712..=294_275).contains(&t.year()))
        .ok_or_else(bad)?;
    Ok((t, Uuid::parse_str(id).map_err(|_| bad())?))
}

impl Store {
    /// Connects (creating the database first when `create` is set and it is missing).
    pub async fn connect(settings: &DatabaseSettings) -> Result<Self> {
        let options = PgConnectOptions::from_str(&settings.url)?.log_statements(tracing::log::LevelFilter::Debug);
        if settings.create {
            create_database_if_missing(&options).await?;
        }
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .acquire_timeout(std::time::Duration::from_secs(5))
            .connect_lazy_with(options);
        Ok(Self { pool })
    }

    /// Wraps an existing pool (tests).
    pub fn from_pool(pool: PgPool) -> Self {
        Self { pool }
    }

    /// The pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies pending migrations.
    pub async fn migrate(&self) -> Result<()> {
        crate::MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// Applies migrations, retrying while Postgres is unreachable (until `shutdown`).
    pub async fn migrate_with_retry(&self, shutdown: &tokio_util::sync::CancellationToken) -> Result<()> {
        let mut delay = std::time::Duration::from_millis(200);
        loop {
            match self.migrate().await {
                Ok(()) => return Ok(()),
                Err(Error::Database(e)) => {
                    tracing::warn!(error = %e, "Postgres is not reachable yet; retrying migrations")
                }
                // The migrator wraps the pool's errors: one that cannot connect is an outage too.
                Err(Error::Migrate(sqlx::migrate::MigrateError::Execute(
                    e @ (sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_)),
                ))) => tracing::warn!(error = %e, "Postgres is not reachable yet; retrying migrations"),
                Err(e) => return Err(e),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(std::time::Duration::from_secs(5));
        }
    }

    /// `SELECT 1`.
    pub async fn ping(&self) -> Result<()> {
        self.pool.execute("SELECT 1").await?;
        Ok(())
    }

    /// Writes a batch of outbox events in one transaction: one `job_executions` row per event
    /// and one `dead_jobs` row per dead event. Idempotent: events written before insert nothing.
    pub async fn record(&self, events: &[Event]) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        // Nearly every batch is new, so it is first written with a plain INSERT: `ON CONFLICT`
        // makes each row a speculative insertion, which costs Postgres about 60% more per row.
        // A batch holding an attempt written before (an outbox entry read again after a
        // recorder stopped between its commit and its ack) fails on the primary key as a whole,
        // and is written again skipping the rows that exist. So does a job that died without a
        // new attempt after a failed one (it expired while waiting to retry): its `dead` event
        // names the failed attempt, whose row then ends `dead`, with both errors.
        match self.record_tx(events, events, false).await {
            Err(Error::Database(e)) if is_unique_violation(&e, "job_executions_pkey") => {
                self.record_tx(&one_row_per_attempt(events), events, true).await
            }
            r => r,
        }
    }

    /// `rows` go to `job_executions` (with `skip_existing`, at most one per attempt), the dead
    /// ones of `events` to `dead_jobs`.
    async fn record_tx(&self, rows: &[Event], events: &[Event], skip_existing: bool) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let col = |f: fn(&Event) -> Option<String>| rows.iter().map(f).collect::<Vec<_>>();
        const INSERT: &str = "INSERT INTO job_executions (job_id, run, attempt, queue, job_type, outcome, error, worker, started_at, finished_at)
             SELECT * FROM UNNEST($1::uuid[], $2::int[], $3::int[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
                                  $9::timestamptz[], $10::timestamptz[])";
        // Rows written before stay as they are, but a failed attempt's row takes the death that
        // followed it (no row is proposed twice: `rows` holds one per attempt here).
        let sql = if skip_existing {
            std::borrow::Cow::Owned(format!(
                "{INSERT} ON CONFLICT (job_id, run, attempt) DO UPDATE SET outcome = 'dead',
                     error = concat_ws('; ', job_executions.error, EXCLUDED.error), finished_at = EXCLUDED.finished_at
                 WHERE EXCLUDED.outcome = 'dead' AND job_executions.outcome = 'failed'"
            ))
        } else {
            std::borrow::Cow::Borrowed(INSERT)
        };
        sqlx::query(&sql)
            .bind(rows.iter().map(|e| e.job_id.0).collect::<Vec<_>>())
            .bind(rows.iter().map(|e| e.run).collect::<Vec<_>>())
            .bind(rows.iter().map(|e| e.attempt).collect::<Vec<_>>())
            .bind(rows.iter().map(|e| e.queue.to_string()).collect::<Vec<_>>())
            .bind(rows.iter().map(|e| e.kind.clone()).collect::<Vec<_>>())
            .bind(rows.iter().map(|e| e.outcome.clone()).collect::<Vec<_>>())
            .bind(col(|e| e.error.clone()))
            .bind(col(|e| e.worker.clone()))
            .bind(rows.iter().map(|e| e.started_at).collect::<Vec<_>>())
            .bind(rows.iter().map(|e| e.finished_at).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;

        // Latest death per job (a job can die, be retried and die again within one batch).
        let mut dead: std::collections::HashMap<JobId, &Event> = std::collections::HashMap::new();
        for e in events.iter().filter(|e| e.outcome == "dead") {
            match dead.get(&e.job_id) {
                Some(prev) if prev.run >= e.run => {}
                _ => {
                    dead.insert(e.job_id, e);
                }
            }
        }
        if !dead.is_empty() {
            let dead: Vec<&Event> = dead.into_values().collect();
            let envs: Vec<serde_json::Value> =
                dead.iter().map(|e| e.envelope.clone().unwrap_or(serde_json::Value::Null)).collect();
            sqlx::query(
                "INSERT INTO dead_jobs (job_id, queue, job_type, priority, payload, envelope, run, attempts, last_error, reason, failed_at)
                 SELECT d.job_id, d.queue, d.job_type, COALESCE(j.env->>'priority', 'normal'), COALESCE(j.env->'payload', 'null'::jsonb),
                        j.env, d.run, d.attempts, d.last_error, d.reason, d.failed_at
                 FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int[], $6::int[], $7::text[], $8::text[],
                             $9::timestamptz[])
                      AS d(job_id, queue, job_type, env_text, run, attempts, last_error, reason, failed_at)
                      CROSS JOIN LATERAL (SELECT d.env_text::jsonb AS env) AS j
                 ON CONFLICT (job_id) DO UPDATE SET
                     queue = EXCLUDED.queue, job_type = EXCLUDED.job_type, priority = EXCLUDED.priority,
                     payload = EXCLUDED.payload, envelope = EXCLUDED.envelope, run = EXCLUDED.run,
                     attempts = EXCLUDED.attempts, last_error = EXCLUDED.last_error, reason = EXCLUDED.reason,
                     failed_at = EXCLUDED.failed_at, retried_at = NULL, recorded_at = now()
                 WHERE dead_jobs.run < EXCLUDED.run",
            )
            .bind(dead.iter().map(|e| e.job_id.0).collect::<Vec<_>>())
            .bind(dead.iter().map(|e| e.queue.to_string()).collect::<Vec<_>>())
            .bind(dead.iter().map(|e| e.kind.clone()).collect::<Vec<_>>())
            .bind(envs.iter().map(|v| v.to_string()).collect::<Vec<_>>())
            .bind(dead.iter().map(|e| e.run).collect::<Vec<_>>())
            .bind(dead.iter().map(|e| e.attempt).collect::<Vec<_>>())
            .bind(dead.iter().map(|e| e.error.clone()).collect::<Vec<_>>())
            .bind(dead.iter().map(|e| e.reason.clone().unwrap_or_else(|| "unknown".into())).collect::<Vec<_>>())
            .bind(dead.iter().map(|e| e.finished_at.unwrap_or_else(Utc::now)).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Dead jobs not retried yet, newest first, filtered and paged.
    pub async fn dead_jobs(&self, filter: &DlqFilter) -> Result<Page<DeadJob>> {
        let limit = filter.limit.clamp(1, MAX_PAGE);
        let cursor = filter.cursor.as_deref().map(decode_cursor).transpose()?;
        let sql = format!(
            "SELECT job_id, queue, job_type, priority, payload, run, attempts, last_error, reason, failed_at, retry_count
             FROM dead_jobs
             WHERE {DLQ_WHERE}
               AND ($6::timestamptz IS NULL OR (failed_at, job_id) < ($6, $7))
             ORDER BY failed_at DESC, job_id DESC
             LIMIT $8"
        );
        let rows = bind_filter(sqlx::query(&sql), filter)
            .bind(cursor.map(|c| c.0))
            .bind(cursor.map(|c| c.1))
            .bind(limit + 1)
            .fetch_all(&self.pool)
            .await?;
        let mut items = rows.iter().map(dead_job_of_row).collect::<Result<Vec<_>>>()?;
        let next_cursor = if items.len() as i64 > limit {
            items.truncate(limit as usize);
            items.last().map(|d| encode_cursor(d.failed_at, d.job_id.0))
        } else {
            None
        };
        Ok(Page { items, next_cursor })
    }

    /// One DLQ entry (also when already retried).
    pub async fn dead_job(&self, id: JobId) -> Result<Option<DeadJob>> {
        let row = sqlx::query(
            "SELECT job_id, queue, job_type, priority, payload, run, attempts, last_error, reason, failed_at, retry_count
             FROM dead_jobs WHERE job_id = $1",
        )
        .bind(id.0)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(dead_job_of_row).transpose()
    }

    /// Every recorded attempt of a job, oldest first.
    pub async fn executions(&self, id: JobId) -> Result<Vec<Execution>> {
        let rows = sqlx::query(
            "SELECT run, attempt, outcome, error, worker, started_at, finished_at
             FROM job_executions WHERE job_id = $1 ORDER BY run, attempt",
        )
        .bind(id.0)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Execution {
                    run: r.try_get("run")?,
                    attempt: r.try_get("attempt")?,
                    outcome: r.try_get("outcome")?,
                    error: r.try_get("error")?,
                    worker: r.try_get("worker")?,
                    started_at: r.try_get("started_at")?,
                    finished_at: r.try_get("finished_at")?,
                })
            })
            .collect()
    }

    /// Retries a dead job: in one transaction, locks its DLQ row, re-enqueues it in Redis as a
    /// new run and marks the row retried. A failed enqueue rolls the transaction back; a row
    /// already retried is a conflict, so retrying twice enqueues once.
    pub async fn retry_dead(
        &self,
        broker: &Broker,
        id: JobId,
        payload: Option<serde_json::Value>,
    ) -> Result<DlqRetried> {
        self.retry_dead_where(broker, id, payload, None).await
    }

    /// [`Store::retry_dead`] for a retry by filter: the job is retried only if its row, once
    /// locked, still matches `filter` (not retried) and is not past `upto`, the last job of the
    /// selection by `(failed_at, job_id)` (a job that died again since it was chosen is past
    /// it); otherwise [`Error::JobNotFound`]. A job someone retried by hand meanwhile, which
    /// died again of something else, is not the filter's business any more.
    pub async fn retry_dead_matching(
        &self,
        broker: &Broker,
        id: JobId,
        filter: &DlqFilter,
        upto: Option<(DateTime<Utc>, JobId)>,
    ) -> Result<DlqRetried> {
        self.retry_dead_where(broker, id, None, Some((filter, upto))).await
    }

    async fn retry_dead_where(
        &self,
        broker: &Broker,
        id: JobId,
        payload: Option<serde_json::Value>,
        filter: Option<(&DlqFilter, Option<DeadKey>)>,
    ) -> Result<DlqRetried> {
        let mut tx = self.pool.begin().await?;
        let row = match filter {
            None => {
                sqlx::query("SELECT envelope, run, retried_at FROM dead_jobs WHERE job_id = $1 FOR UPDATE")
                    .bind(id.0)
                    .fetch_optional(&mut *tx)
                    .await?
            }
            Some((f, upto)) => {
                let sql = format!(
                    "SELECT envelope, run, retried_at FROM dead_jobs WHERE {DLQ_WHERE} AND job_id = $6
                       AND ($7::timestamptz IS NULL OR (failed_at, job_id) <= ($7, $8::uuid)) FOR UPDATE"
                );
                bind_filter(sqlx::query(&sql), f)
                    .bind(id.0)
                    .bind(upto.map(|u| u.0))
                    .bind(upto.map(|u| u.1 .0))
                    .fetch_optional(&mut *tx)
                    .await?
            }
        };
        let row = row.ok_or(Error::JobNotFound(id))?;
        let retried_at: Option<DateTime<Utc>> = row.try_get("retried_at")?;
        if let Some(at) = retried_at {
            return Err(Error::Conflict(format!("job {id} was already retried at {}", at.to_rfc3339())));
        }
        let mut envelope: Envelope = serde_json::from_value(row.try_get("envelope")?)?;
        let edited = payload.is_some();
        if let Some(p) = payload {
            envelope.payload = p;
        }
        let dead_run: i32 = row.try_get("run")?;
        // A later run in the history means an earlier retry re-enqueued the job and its commit
        // failed; once that run finished and its hash was swept, Redis alone could not tell,
        // and the job would run again.
        let later: Option<i32> =
            sqlx::query_scalar("SELECT max(run) FROM job_executions WHERE job_id = $1 AND run > $2")
                .bind(id.0)
                .bind(dead_run)
                .fetch_one(&mut *tx)
                .await?;
        let requeued = match later {
            Some(run) => Requeued::NotDead { run: run as u32, state: "recorded".into() },
            None => broker.retry_dead(&envelope, dead_run as u32).await?,
        };
        let (run, state, earlier) = match requeued {
            Requeued::Queued { run } => (run, "queued".to_owned(), false),
            // Enqueued by an earlier retry whose commit failed: just mark the row.
            Requeued::NotDead { run, state } => {
                tracing::info!(job.id = %id, state, "dead job was already re-enqueued; marking its DLQ row");
                (run, state, true)
            }
        };
        sqlx::query("UPDATE dead_jobs SET retried_at = now(), retry_count = retry_count + 1 WHERE job_id = $1")
            .bind(id.0)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        // The run an earlier retry enqueued carries the payload it had: the one given now was
        // not applied, which the caller must hear of.
        Ok(DlqRetried { job_id: id, run, state, payload_not_applied: earlier && edited })
    }
}

impl Store {
    /// The stored envelope of a dead job.
    pub async fn dead_envelope(&self, id: JobId) -> Result<Option<serde_json::Value>> {
        Ok(sqlx::query_scalar("SELECT envelope FROM dead_jobs WHERE job_id = $1")
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// Dead jobs (not retried) per queue.
    pub async fn dead_counts(&self) -> Result<std::collections::HashMap<String, i64>> {
        let rows = sqlx::query("SELECT queue, count(*) FROM dead_jobs WHERE retried_at IS NULL GROUP BY queue")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok((r.try_get(0)?, r.try_get(1)?))).collect()
    }

    /// How many dead jobs (not retried) match.
    pub async fn count_dead(&self, filter: &DlqFilter) -> Result<i64> {
        let sql = format!("SELECT count(*) FROM dead_jobs WHERE {DLQ_WHERE}");
        Ok(bind_filter(sqlx::query(&sql), filter).fetch_one(&self.pool).await?.try_get(0)?)
    }

    /// Ids of dead jobs (not retried) matching, oldest first, at most `limit`.
    pub async fn dead_ids(&self, filter: &DlqFilter, limit: i64) -> Result<Vec<JobId>> {
        Ok(self.dead_selection(filter, None, None, limit).await?.into_iter().map(|(_, id)| id).collect())
    }

    /// Dead jobs (not retried) matching, as `(failed_at, job_id)`, oldest first, at most
    /// `limit`: none after `upto` in that order, and none recorded at or after
    /// `recorded_before`.
    pub async fn dead_selection(
        &self,
        filter: &DlqFilter,
        upto: Option<(DateTime<Utc>, JobId)>,
        recorded_before: Option<DateTime<Utc>>,
        limit: i64,
    ) -> Result<Vec<(DateTime<Utc>, JobId)>> {
        let sql = format!(
            "SELECT failed_at, job_id FROM dead_jobs WHERE {DLQ_WHERE}
               AND ($6::timestamptz IS NULL OR (failed_at, job_id) <= ($6, $7::uuid))
               AND ($8::timestamptz IS NULL OR recorded_at < $8)
             ORDER BY failed_at, job_id LIMIT $9"
        );
        let rows = bind_filter(sqlx::query(&sql), filter)
            .bind(upto.map(|u| u.0))
            .bind(upto.map(|u| u.1 .0))
            .bind(recorded_before)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok((r.try_get(0)?, JobId(r.try_get(1)?)))).collect()
    }

    /// Deletes one DLQ row; false when there was none.
    pub async fn delete_dead(&self, id: JobId) -> Result<bool> {
        let done = sqlx::query("DELETE FROM dead_jobs WHERE job_id = $1").bind(id.0).execute(&self.pool).await?;
        Ok(done.rows_affected() == 1)
    }

    /// Deletes every DLQ row (not retried) matching, in batches of 1,000 committed one by one;
    /// returns how many, or how many before an error stopped it.
    pub async fn purge_dead(&self, filter: &DlqFilter) -> std::result::Result<u64, PurgeStopped> {
        let sql = format!(
            // The filter again outside: a row a retry marks while this waits for its lock is
            // checked again as it is then, and stays.
            "DELETE FROM dead_jobs WHERE job_id IN (SELECT job_id FROM dead_jobs WHERE {DLQ_WHERE} LIMIT 1000) AND {DLQ_WHERE}"
        );
        let mut total = 0;
        loop {
            let n = match bind_filter(sqlx::query(&sql), filter).execute(&self.pool).await {
                Ok(done) => done.rows_affected(),
                Err(e) => return Err(PurgeStopped { deleted: total, error: e.into() }),
            };
            total += n;
            if n == 0 {
                return Ok(total);
            }
        }
    }

    /// Appends to the audit log; returns the entry id.
    pub async fn audit(
        &self,
        actor: &str,
        action: &str,
        target: Option<String>,
        filter: Option<serde_json::Value>,
        count: i64,
        details: Option<serde_json::Value>,
    ) -> Result<i64> {
        // What the caller sent goes into the entry as it was, but for U+0000, which Postgres'
        // text and jsonb cannot hold: an action that took effect is audited whatever it named.
        use crate::stream::outbox::{storable, storable_json};
        let (mut filter, mut details) = (filter, details);
        filter.iter_mut().chain(details.iter_mut()).for_each(storable_json);
        let (actor, target) = (storable(actor.to_owned()), target.map(storable));
        Ok(sqlx::query_scalar(
            "INSERT INTO audit_log (actor, action, target, filter, count, details) VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        )
        .bind(actor)
        .bind(action)
        .bind(target)
        .bind(filter)
        .bind(count)
        .bind(details)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Starts a DLQ replay (retry by filter) of `of` dead jobs: its audit entry, owned by the
    /// returned [`Replay`] and alive from now on.
    /// Starts a replay of the dead jobs of `selection` (from [`Store::dead_selection`]) matching
    /// `filter`: an audit entry, alive now.
    pub async fn start_replay(
        &self,
        actor: &str,
        filter: &DlqFilter,
        selection: &[(DateTime<Utc>, JobId)],
    ) -> Result<Replay> {
        let mut replay = Replay {
            audit_id: 0,
            owner: uuid::Uuid::new_v4(),
            filter: filter.clone(),
            of: selection.len() as i64,
            retried: 0,
            skipped: 0,
            failed: 0,
            upto: selection.last().copied(),
            began: None,
        };
        let (audit_id, began): (i64, DateTime<Utc>) = sqlx::query_as(
            "INSERT INTO audit_log (actor, action, filter, count, details, replay_owner, replay_alive_at) \
             VALUES ($1, 'dlq.retry_filter', $2, 0, $3, $4, now()) RETURNING id, at",
        )
        .bind(crate::stream::outbox::storable(actor.to_owned()))
        .bind({
            let mut filter = serde_json::to_value(filter)?;
            crate::stream::outbox::storable_json(&mut filter);
            filter
        })
        .bind(replay.details(false))
        .bind(replay.owner)
        .fetch_one(&self.pool)
        .await?;
        replay.audit_id = audit_id;
        replay.began = Some(began);
        Ok(replay)
    }

    /// Writes a replay's progress into its audit entry, and that it is alive (or, with `done`,
    /// finished). False when another replay has taken it over meanwhile: this one must stop.
    pub async fn replay_progress(&self, replay: &Replay, done: bool) -> Result<bool> {
        let n = sqlx::query(
            "UPDATE audit_log SET count = $3, details = $4, replay_alive_at = CASE WHEN $5 THEN NULL ELSE now() END, \
             replay_owner = CASE WHEN $5 THEN NULL ELSE replay_owner END WHERE id = $1 AND replay_owner = $2",
        )
        .bind(replay.audit_id)
        .bind(replay.owner)
        .bind(replay.retried)
        .bind(replay.details(done))
        .bind(done)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n == 1)
    }

    /// Takes over the oldest replay that has not reported for `stale` (its process stopped
    /// mid-way), if any: it gets a new owner and is alive again, and its filter is narrowed to
    /// the jobs that died before it began. Its failures are forgotten, so that the jobs they
    /// left in the DLQ are tried again.
    pub async fn claim_stale_replay(&self, stale: std::time::Duration) -> Result<Option<Replay>> {
        let row = sqlx::query(
            "UPDATE audit_log SET replay_owner = $1, replay_alive_at = now() WHERE id = ( \
               SELECT id FROM audit_log WHERE replay_alive_at < now() - $2 ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED) \
             RETURNING id, at, filter, details, replay_owner",
        )
        .bind(uuid::Uuid::new_v4())
        .bind(stale)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let details: serde_json::Value = row.try_get("details")?;
        let filter: Option<serde_json::Value> = row.try_get("filter")?;
        let count = |k: &str| details.get(k).and_then(serde_json::Value::as_i64).unwrap_or(0);
        let upto = details.get("upto").and_then(|u| {
            let at = DateTime::<Utc>::from_timestamp_micros(u.get("failed_at_us")?.as_i64()?)?;
            Some((at, serde_json::from_value(u.get("job_id")?.clone()).ok()?))
        });
        // Only jobs dead when the replay began: one it retried that died again since is not
        // its business any more.
        let began: DateTime<Utc> = row.try_get("at")?;
        let mut filter: DlqFilter = filter.map(serde_json::from_value).transpose()?.unwrap_or_default();
        if upto.is_none() {
            // An entry written before replays kept their selection's bound.
            filter.failed_before = Some(filter.failed_before.map_or(began, |b| b.min(began)));
        }
        Ok(Some(Replay {
            audit_id: row.try_get("id")?,
            owner: row.try_get("replay_owner")?,
            filter,
            of: count("of"),
            retried: count("retried"),
            skipped: count("skipped"),
            failed: 0,
            upto,
            began: Some(began),
        }))
    }

    /// Newest audit entries first.
    pub async fn audit_log(&self, limit: i64) -> Result<Vec<AuditEntry>> {
        let rows = sqlx::query(
            "SELECT id, at, actor, action, target, filter, count, details FROM audit_log ORDER BY id DESC LIMIT $1",
        )
        .bind(limit.clamp(1, MAX_PAGE))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AuditEntry {
                    id: r.try_get("id")?,
                    at: r.try_get("at")?,
                    actor: r.try_get("actor")?,
                    action: r.try_get("action")?,
                    target: r.try_get("target")?,
                    filter: r.try_get("filter")?,
                    count: r.try_get("count")?,
                    details: r.try_get("details")?,
                })
            })
            .collect()
    }

    /// Deletes, in batches of `batch`, history rows (attempts, and the runs of schedules)
    /// finished or fired before `history_before` and DLQ rows that died before `dlq_before`;
    /// returns (attempt rows, DLQ rows, schedule run rows) deleted.
    pub async fn prune(
        &self,
        history_before: DateTime<Utc>,
        dlq_before: DateTime<Utc>,
        batch: i64,
    ) -> Result<(u64, u64, u64)> {
        let history = self
            .delete_in_batches(
                "DELETE FROM job_executions WHERE ctid IN (SELECT ctid FROM job_executions WHERE finished_at < $1 LIMIT $2)",
                history_before,
                batch,
            )
            .await?;
        let dlq = self
            .delete_in_batches(
                "DELETE FROM dead_jobs WHERE job_id IN (SELECT job_id FROM dead_jobs WHERE failed_at < $1 LIMIT $2)",
                dlq_before,
                batch,
            )
            .await?;
        let runs = self
            .delete_in_batches(
                "DELETE FROM schedule_runs WHERE ctid IN (SELECT ctid FROM schedule_runs WHERE fired_at < $1 LIMIT $2)",
                history_before,
                batch,
            )
            .await?;
        Ok((history, dlq, runs))
    }

    /// Runs a `DELETE ... $1 (before) ... LIMIT $2 (batch)` until a batch deletes less than
    /// `batch` rows; returns how many were deleted.
    async fn delete_in_batches(&self, sql: &str, before: DateTime<Utc>, batch: i64) -> Result<u64> {
        let mut total = 0;
        loop {
            let n = sqlx::query(sql).bind(before).bind(batch).execute(&self.pool).await?.rows_affected();
            total += n;
            if n < batch as u64 {
                return Ok(total);
            }
        }
    }
}

fn dead_job_of_row(r: &sqlx::postgres::PgRow) -> Result<DeadJob> {
    Ok(DeadJob {
        job_id: JobId(r.try_get("job_id")?),
        queue: r.try_get("queue")?,
        kind: r.try_get("job_type")?,
        priority: r.try_get("priority")?,
        payload: r.try_get("payload")?,
        run: r.try_get("run")?,
        attempts: r.try_get("attempts")?,
        last_error: r.try_get("last_error")?,
        reason: r.try_get("reason")?,
        failed_at: r.try_get("failed_at")?,
        retry_count: r.try_get("retry_count")?,
    })
}

/// Creates the database named in `options` when it does not exist.
async fn create_database_if_missing(options: &PgConnectOptions) -> Result<()> {
    let Some(name) = options.get_database().map(str::to_owned) else { return Ok(()) };
    let admin = options.clone().database("postgres");
    let mut conn = match admin.connect().await {
        Ok(c) => c,
        // Not reachable now: the pool reports it later (readiness, retries); nothing to create.
        Err(e) => {
            tracing::warn!(error = %e, "cannot reach Postgres to check the database exists");
            return Ok(());
        }
    };
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
        .bind(&name)
        .fetch_one(&mut conn)
        .await?;
    if !exists {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        match conn.execute(format!("CREATE DATABASE {quoted}").as_str()).await {
            Ok(_) => tracing::info!(database = %name, "created database"),
            // Another process created it at the same moment.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// A unique violation of `constraint`.
fn is_unique_violation(e: &sqlx::Error, constraint: &str) -> bool {
    e.as_database_error().is_some_and(|d| d.is_unique_violation() && d.constraint() == Some(constraint))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_invalid() {
        let t = DateTime::<Utc>::from_timestamp_micros(1_700_000_000_123_456).unwrap();
        let id = Uuid::now_v7();
        assert_eq!(decode_cursor(&encode_cursor(t, id)).unwrap(), (t, id));
        assert!(matches!(decode_cursor("nope"), Err(Error::Invalid(_))));
        assert!(matches!(decode_cursor("12_notauuid"), Err(Error::Invalid(_))));
    }
}
