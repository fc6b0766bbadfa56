//! SQL of cron schedules: definitions, tick claiming and the runs they fired.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::PgRow;
use sqlx::Row;

use super::Store;
use crate::error::{Error, Result};
use crate::job::{JobId, JobInfo};
use crate::schedule::{plan_ticks, CronSchedule, JobTemplate, Misfire, ScheduleSpec};
use crate::stream::Broker;

/// How long an idempotency key of a cron tick is held in Redis at least. A tick is fired again
/// only after a rolled-back claim: seconds later, or, when no scheduler ran meanwhile, once one
/// runs again, for as long as the tick is still among those the plan fires: within the misfire
/// grace, or among the latest `keep` older ones (1 with `fire_once`, `catch_up_limit` with
/// `catch_up`), which it stays until `keep` later ticks are due. So the key is held until the
/// `keep + 1`-th tick after it (`keep + 1` periods of an evenly spaced schedule; longer where a
/// weekday schedule spans a weekend), plus the grace; at least this long.
const TICK_KEY_TTL: std::time::Duration = std::time::Duration::from_secs(3600);
/// The longest such hold (a yearly schedule catching up on many years): the longest unique ttl
/// an enqueue takes, so that no tick's job is refused for its key's ttl.
const TICK_KEY_TTL_MAX: std::time::Duration = crate::job::MAX_UNIQUE_TTL;

/// How long after the claim's last statement a tick may still be enqueued: well within the
/// 10 s after which Postgres ends a session idle in its transaction, and with it the row lock.
const CLAIM_FRESH_FOR: std::time::Duration = std::time::Duration::from_secs(5);

/// The idempotency key's ttl for `tick` of `schedule`.
fn tick_key_ttl(
    schedule: &CronSchedule,
    tick: DateTime<Utc>,
    misfire: Misfire,
    catch_up_limit: u32,
    grace: chrono::Duration,
) -> std::time::Duration {
    let keep = match misfire {
        Misfire::Skip => 0,
        Misfire::FireOnce => 1,
        Misfire::CatchUp => catch_up_limit,
    };
    // The ticks are walked, not counted in periods: ticks are unevenly spaced (`MON-FRI`, the
    // last day of a month, a clock change), and a tick stays in the plan until the `keep`-th
    // tick after it is due, however far that is. A schedule with no further tick keeps the
    // longest hold.
    let until = schedule.upcoming(tick).nth(keep as usize);
    let hold = match until.map(|t| (t - tick).to_std()) {
        Some(Ok(d)) => d,
        _ => TICK_KEY_TTL_MAX,
    };
    hold.saturating_add(grace.to_std().unwrap_or_default()).clamp(TICK_KEY_TTL, TICK_KEY_TTL_MAX)
}

/// A stored schedule.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StoredSchedule {
    /// The definition.
    #[serde(flatten)]
    pub spec: ScheduleSpec,
    /// `api` or `config` (upserted from the config file at scheduler start).
    pub source: String,
    /// The next tick to fire (null while disabled).
    pub next_fire_at: Option<DateTime<Utc>>,
    /// The latest tick fired.
    pub last_fired_at: Option<DateTime<Utc>>,
    /// Created at.
    pub created_at: DateTime<Utc>,
    /// Last changed at.
    pub updated_at: DateTime<Utc>,
}

/// One job a schedule fired.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ScheduleRun {
    /// The tick (for manual triggers: when it was triggered).
    pub tick: DateTime<Utc>,
    /// `cron` or `manual`.
    pub trigger: String,
    /// The job.
    pub job_id: JobId,
    /// Its queue.
    pub queue: String,
    /// When it was enqueued.
    pub fired_at: DateTime<Utc>,
}

/// A tick fired by [`Store::fire_due`].
#[derive(Debug, Clone, PartialEq)]
pub struct FiredTick {
    /// Schedule.
    pub schedule: String,
    /// Tick.
    pub tick: DateTime<Utc>,
    /// Enqueued job (or the existing one, when the tick had been enqueued before a rollback).
    pub job_id: JobId,
    /// How late it fired, in milliseconds.
    pub late_ms: i64,
}

/// Summary of one [`Store::fire_due`] pass.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FirePass {
    /// Ticks fired.
    pub fired: Vec<FiredTick>,
    /// Ticks dropped by misfire policies.
    pub skipped: u64,
    /// Schedules that could not be fired in this pass (name, error): their claim was rolled
    /// back and the pass went on with the next due schedule.
    pub failed: Vec<(String, String)>,
    /// The pass stopped at its `max` with ticks fired and more schedules perhaps due: the
    /// caller goes again at once rather than after its poll interval.
    pub more: bool,
}

const COLUMNS: &str =
    "name, cron, timezone, job, enabled, misfire, catch_up_limit, source, next_fire_at, last_fired_at, created_at, updated_at";

fn schedule_of_row(r: &PgRow) -> Result<StoredSchedule> {
    let misfire: String = r.try_get("misfire")?;
    Ok(StoredSchedule {
        spec: ScheduleSpec {
            name: r.try_get("name")?,
            cron: r.try_get("cron")?,
            timezone: r.try_get("timezone")?,
            job: serde_json::from_value(r.try_get("job")?)?,
            enabled: r.try_get("enabled")?,
            misfire: misfire.parse().map_err(Error::Protocol)?,
            catch_up_limit: r.try_get::<i32, _>("catch_up_limit")? as u32,
        },
        source: r.try_get("source")?,
        next_fire_at: r.try_get("next_fire_at")?,
        last_fired_at: r.try_get("last_fired_at")?,
        created_at: r.try_get("created_at")?,
        updated_at: r.try_get("updated_at")?,
    })
}

type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// Binds $1..$7 of the schedule statements: name, cron, timezone, job, enabled, misfire,
/// catch_up_limit.
fn bind_spec<'q>(q: PgQuery<'q>, name: &'q str, spec: &'q ScheduleSpec) -> Result<PgQuery<'q>> {
    Ok(q.bind(name)
        .bind(&spec.cron)
        .bind(&spec.timezone)
        .bind(serde_json::to_value(&spec.job)?)
        .bind(spec.enabled)
        .bind(spec.misfire.as_str())
        .bind(spec.catch_up_limit as i32))
}

/// The first tick after `now` when enabled.
fn first_tick(spec: &ScheduleSpec, now: DateTime<Utc>) -> Result<Option<DateTime<Utc>>> {
    let schedule = spec.validate()?;
    Ok(if spec.enabled { schedule.next_after(now) } else { None })
}

/// The database's clock: every tick is planned on it, so a replica whose own clock is off
/// (or jumps) neither fires early nor skips ticks.
async fn db_now<'e>(db: impl sqlx::PgExecutor<'e>) -> Result<DateTime<Utc>> {
    Ok(sqlx::query_scalar("SELECT now()").fetch_one(db).await?)
}

impl Store {
    /// Creates a schedule; a name in use is a conflict.
    pub async fn create_schedule(&self, spec: &ScheduleSpec) -> Result<StoredSchedule> {
        let next = first_tick(spec, db_now(&self.pool).await?)?;
        let sql = format!(
            "INSERT INTO schedules (name, cron, timezone, job, enabled, misfire, catch_up_limit, source, next_fire_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'api', $8)
             ON CONFLICT (name) DO NOTHING
             RETURNING {COLUMNS}"
        );
        let row = bind_spec(sqlx::query(&sql), &spec.name, spec)?.bind(next).fetch_optional(&self.pool).await?;
        match row {
            Some(r) => schedule_of_row(&r),
            None => Err(Error::Conflict(format!("schedule `{}` already exists", spec.name))),
        }
    }

    /// Creates or replaces a schedule (`source` is `api` or `config`). The pending tick is kept
    /// unless the expression, the zone or `enabled` changed. Returns it and whether it is new.
    pub async fn put_schedule(&self, spec: &ScheduleSpec, source: &str) -> Result<(StoredSchedule, bool)> {
        let next = first_tick(spec, db_now(&self.pool).await?)?;
        let sql = format!(
            "INSERT INTO schedules (name, cron, timezone, job, enabled, misfire, catch_up_limit, source, next_fire_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (name) DO UPDATE SET
                 cron = EXCLUDED.cron, timezone = EXCLUDED.timezone, job = EXCLUDED.job, enabled = EXCLUDED.enabled,
                 misfire = EXCLUDED.misfire, catch_up_limit = EXCLUDED.catch_up_limit, source = EXCLUDED.source,
                 updated_at = now(),
                 next_fire_at = CASE
                     WHEN schedules.cron <> EXCLUDED.cron OR schedules.timezone <> EXCLUDED.timezone
                          OR schedules.enabled <> EXCLUDED.enabled OR schedules.next_fire_at IS NULL
                     THEN EXCLUDED.next_fire_at ELSE schedules.next_fire_at END
             RETURNING {COLUMNS}, (xmax = 0) AS inserted"
        );
        let row = bind_spec(sqlx::query(&sql), &spec.name, spec)?.bind(source).bind(next).fetch_one(&self.pool).await?;
        Ok((schedule_of_row(&row)?, row.try_get("inserted")?))
    }

    /// Changes a schedule in place (in one transaction). Re-enabling it, or changing its
    /// expression or zone, restarts it from now: skipped ticks do not fire.
    pub async fn patch_schedule(&self, name: &str, change: impl FnOnce(&mut ScheduleSpec)) -> Result<StoredSchedule> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM schedules WHERE name = $1 FOR UPDATE"))
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| Error::NotFound(format!("schedule `{name}` not found")))?;
        let old = schedule_of_row(&row)?;
        let mut spec = old.spec.clone();
        change(&mut spec);
        spec.name = old.spec.name.clone();
        let restart =
            spec.cron != old.spec.cron || spec.timezone != old.spec.timezone || spec.enabled != old.spec.enabled;
        let next = if restart {
            first_tick(&spec, db_now(&mut *tx).await?)?
        } else {
            spec.validate().map(|_| old.next_fire_at)?
        };
        let sql = format!(
            "UPDATE schedules SET cron = $2, timezone = $3, job = $4, enabled = $5, misfire = $6, catch_up_limit = $7,
                 next_fire_at = $8, updated_at = now()
             WHERE name = $1 RETURNING {COLUMNS}"
        );
        let row = bind_spec(sqlx::query(&sql), name, &spec)?.bind(next).fetch_one(&mut *tx).await?;
        tx.commit().await?;
        schedule_of_row(&row)
    }

    /// One schedule.
    pub async fn schedule(&self, name: &str) -> Result<Option<StoredSchedule>> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM schedules WHERE name = $1"))
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(schedule_of_row).transpose()
    }

    /// Every schedule, by name.
    pub async fn schedules(&self) -> Result<Vec<StoredSchedule>> {
        let rows = sqlx::query(&format!("SELECT {COLUMNS} FROM schedules ORDER BY name")).fetch_all(&self.pool).await?;
        rows.iter().map(schedule_of_row).collect()
    }

    /// Deletes a schedule and its run history; false when there was none.
    pub async fn delete_schedule(&self, name: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM schedules WHERE name = $1").bind(name).execute(&self.pool).await?;
        Ok(done.rows_affected() == 1)
    }

    /// Recent jobs a schedule fired, newest first.
    pub async fn schedule_runs(&self, name: &str, limit: i64) -> Result<Vec<ScheduleRun>> {
        let rows = sqlx::query(
            "SELECT tick, trigger, job_id, queue, fired_at FROM schedule_runs
             WHERE schedule_name = $1 ORDER BY fired_at DESC, tick DESC LIMIT $2",
        )
        .bind(name)
        .bind(limit.clamp(1, super::MAX_PAGE))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ScheduleRun {
                    tick: r.try_get("tick")?,
                    trigger: r.try_get("trigger")?,
                    job_id: JobId(r.try_get("job_id")?),
                    queue: r.try_get("queue")?,
                    fired_at: r.try_get("fired_at")?,
                })
            })
            .collect()
    }

    /// Latest recorded outcome of each job (for jobs whose Redis hash expired).
    pub async fn last_outcomes(&self, ids: &[JobId]) -> Result<std::collections::HashMap<JobId, String>> {
        let rows = sqlx::query(
            "SELECT DISTINCT ON (job_id) job_id, outcome FROM job_executions
             WHERE job_id = ANY($1) ORDER BY job_id, run DESC, attempt DESC",
        )
        .bind(ids.iter().map(|i| i.0).collect::<Vec<_>>())
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok((JobId(r.try_get("job_id")?), r.try_get("outcome")?))).collect()
    }

    /// Enqueues a schedule's job now, outside its ticks, and records the run.
    pub async fn trigger_schedule(&self, broker: &Broker, name: &str) -> Result<JobInfo> {
        let s = self.schedule(name).await?.ok_or_else(|| Error::NotFound(format!("schedule `{name}` not found")))?;
        let mut job = s.spec.job.new_job();
        job.metadata.insert("schedule".into(), name.to_owned());
        job.metadata.insert("trigger".into(), "manual".into());
        let enqueued = broker.enqueue(job).await?;
        // The job is queued: a failure to note the run must not answer as if it were not (a
        // caller retrying would fire the schedule twice).
        let noted = sqlx::query(
            "INSERT INTO schedule_runs (schedule_name, tick, trigger, job_id, queue) VALUES ($1, now(), 'manual', $2, $3)
             ON CONFLICT DO NOTHING",
        )
        .bind(name)
        .bind(enqueued.job.id.0)
        .bind(enqueued.job.queue.as_str())
        .execute(&self.pool)
        .await;
        if let Err(e) = noted {
            tracing::warn!(schedule = %name, job.id = %enqueued.job.id, error = %e, "manual run enqueued but not listed in the schedule's runs");
        }
        Ok(enqueued.job)
    }

    /// Fires every due tick, one schedule per transaction: the due row is locked (`FOR UPDATE
    /// SKIP LOCKED`, so replicas share the work), its ticks are enqueued with the idempotency
    /// key `cron:<name>:<tick>`, the runs recorded, and `next_fire_at` advanced by
    /// compare-and-set before the commit. A failure before the commit rolls the claim back; the
    /// tick is fired again later and the key makes it fire once. `grace` decides which late
    /// ticks are misfires. At most `max` schedules are handled per pass.
    pub async fn fire_due(&self, broker: &Broker, grace: chrono::Duration, max: usize) -> Result<FirePass> {
        let mut pass = FirePass::default();
        let mut passed_over: Vec<String> = Vec::new();
        let mut drained = false;
        for _ in 0..max {
            let mut tx = self.pool.begin().await?;
            match claim_due(&mut tx, broker, grace, &mut pass.skipped, &passed_over).await {
                Ok(Claim::NothingDue) => {
                    drained = true;
                    break;
                }
                Ok(Claim::Unchanged) => {
                    tx.rollback().await?;
                }
                Ok(Claim::Fired(fired)) => {
                    tx.commit().await?;
                    pass.fired.extend(fired);
                }
                // One schedule that cannot be fired (a row that no longer decodes, a refused
                // job) must not hold back the ones due after it. An outage stops the pass.
                Ok(Claim::Failed(name, e)) if !is_outage(&e) => {
                    if let Err(rollback) = tx.rollback().await {
                        // The session is gone (a claim that stalled past Postgres' idle
                        // timeout, say): the pass ends with the schedule's own error.
                        tracing::debug!(error = %rollback, "rolling back a failed claim failed");
                        return Err(e);
                    }
                    pass.failed.push((name.clone(), e.to_string()));
                    passed_over.push(name);
                }
                Ok(Claim::Failed(_, e)) | Err(e) => {
                    // Roll back before returning: a dropped transaction only queues its
                    // ROLLBACK for the connection's next use, and until then the row stays
                    // locked, so every replica's `SKIP LOCKED` passes the due tick by.
                    let _ = tx.rollback().await;
                    return Err(e);
                }
            }
        }
        pass.more = !drained && !pass.fired.is_empty();
        Ok(pass)
    }
}

/// Whether `e` says Redis or Postgres cannot be reached or cannot serve for now (end the pass and
/// retry later; also a session Postgres ended for idling in its transaction, 25P03), as
/// opposed to something about one schedule: a row or column that does not decode, a refused job,
/// a script error on its queue's keys.
fn is_outage(e: &Error) -> bool {
    match e {
        // A server loading, out of memory or in a fail-over is an outage too: the next
        // schedule would meet it as well.
        Error::Redis(_) => e.is_transient_redis(),
        Error::Database(d) => {
            matches!(
                d,
                sqlx::Error::Io(_)
                    | sqlx::Error::Tls(_)
                    | sqlx::Error::Protocol(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::WorkerCrashed
            ) || matches!(d, sqlx::Error::Database(db) if db.code().is_some_and(|c| c.starts_with("08") || c.starts_with("57") || c == "25P03"))
        }
        _ => false,
    }
}

/// What [`claim_due`] did with the earliest due schedule.
enum Claim {
    NothingDue,
    /// The row changed under the claim; nothing to commit.
    Unchanged,
    /// Its ticks are enqueued and `next_fire_at` advanced; commit to keep the claim.
    Fired(Vec<FiredTick>),
    /// The schedule of that name could not be fired; roll back.
    Failed(String, Error),
}

/// Locks the earliest due schedule, fires its ticks and advances it, inside `tx`.
async fn claim_due(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    broker: &Broker,
    grace: chrono::Duration,
    skipped: &mut u64,
    passed_over: &[String],
) -> Result<Claim> {
    // A replica frozen mid-claim must not hold the row: the server ends its session.
    sqlx::query("SET LOCAL idle_in_transaction_session_timeout = '10s'").execute(&mut **tx).await?;
    let Some(row) = sqlx::query(&format!(
        "SELECT {COLUMNS}, now() AS db_now FROM schedules
             WHERE enabled AND next_fire_at <= now() AND NOT (name = ANY($1))
             ORDER BY next_fire_at LIMIT 1 FOR UPDATE SKIP LOCKED"
    ))
    .bind(passed_over)
    .fetch_optional(&mut **tx)
    .await?
    else {
        return Ok(Claim::NothingDue);
    };
    let name: String = row.try_get("name")?;
    let mut last_sql = std::time::Instant::now();
    match fire_claimed(tx, broker, grace, skipped, &row, &mut last_sql).await {
        Ok(claim) => Ok(claim),
        Err(e) => Ok(Claim::Failed(name, e)),
    }
}

/// Fires the ticks of the schedule in `row`, locked by [`claim_due`], and advances it.
async fn fire_claimed(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    broker: &Broker,
    grace: chrono::Duration,
    skipped: &mut u64,
    row: &PgRow,
    last_sql: &mut std::time::Instant,
) -> Result<Claim> {
    let s = schedule_of_row(row)?;
    let now: DateTime<Utc> = row.try_get("db_now")?;
    let seen = s.next_fire_at.unwrap_or(now);
    let (next, fired_here) = match s.spec.validate() {
        Ok(schedule) => {
            let plan = plan_ticks(&schedule, seen, now, s.spec.misfire, s.spec.catch_up_limit, grace);
            *skipped += plan.skipped;
            if plan.skipped > 0 {
                tracing::warn!(schedule = %s.spec.name, skipped = plan.skipped, policy = s.spec.misfire.as_str(), "missed ticks");
            }
            let mut fired = Vec::new();
            for tick in plan.fire {
                crate::fault::point("cron.claimed");
                let ttl = tick_key_ttl(&schedule, tick, s.spec.misfire, s.spec.catch_up_limit, grace);
                let job_id = fire_tick(tx, broker, &s.spec.name, &s.spec.job, tick, ttl, last_sql).await?;
                crate::fault::point("cron.enqueued");
                fired.push(FiredTick {
                    schedule: s.spec.name.clone(),
                    tick,
                    job_id,
                    late_ms: (now - tick).num_milliseconds(),
                });
            }
            (plan.next, fired)
        }
        Err(e) => {
            tracing::error!(schedule = %s.spec.name, error = %e, "stored schedule is invalid; disabling it");
            (None, Vec::new())
        }
    };
    let last = fired_here.last().map(|f| f.tick);
    let updated = sqlx::query(
        "UPDATE schedules SET next_fire_at = $2, last_fired_at = COALESCE($3, last_fired_at),
                 enabled = enabled AND $4
             WHERE name = $1 AND next_fire_at = $5",
    )
    .bind(&s.spec.name)
    .bind(next)
    .bind(last)
    .bind(next.is_some())
    .bind(seen)
    .execute(&mut **tx)
    .await?;
    if updated.rows_affected() != 1 {
        // Changed under us (cannot happen while we hold the row lock): leave it alone.
        return Ok(Claim::Unchanged);
    }
    Ok(Claim::Fired(fired_here))
}

async fn fire_tick(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    broker: &Broker,
    name: &str,
    template: &JobTemplate,
    tick: DateTime<Utc>,
    key_ttl: std::time::Duration,
    last_sql: &mut std::time::Instant,
) -> Result<JobId> {
    // The row lock holds only while the session lives, which Postgres ends after 10 s idle in
    // the transaction (claim_due). A process that stalled past that (a frozen VM or container)
    // may have lost the row to another replica, which fired this tick; once the tick's key has
    // expired as well, an enqueue now would fire it twice. So the tick is enqueued only while
    // the last statement of the claim is recent.
    let idle = last_sql.elapsed();
    if idle > CLAIM_FRESH_FOR {
        return Err(Error::Conflict(format!(
            "the claim stalled for {} ms and its row lock may be gone: tick {tick} is left to the next pass",
            idle.as_millis()
        )));
    }
    // And a statement on the claim's session answers just before the enqueue: the session, and
    // with it the row lock, is still this replica's (one ended while the process was frozen
    // fails here, whatever the process' own clock says). Its answer must come soon after it was
    // sent: a process frozen right after sending it reads, once it wakes, the answer Postgres
    // gave at once, from a session that has ended since.
    let asked = std::time::Instant::now();
    sqlx::query("SELECT 1").execute(&mut **tx).await?;
    crate::fault::point("cron.checked");
    let answered_in = asked.elapsed();
    if answered_in > CLAIM_FRESH_FOR {
        return Err(Error::Conflict(format!(
            "the claim's session took {} ms to answer and its row lock may be gone: tick {tick} is left to the next pass",
            answered_in.as_millis()
        )));
    }
    let mut job = template
        .new_job()
        .unique(format!("{}{name}:{}", crate::schedule::CRON_KEY_PREFIX, tick.timestamp_millis()), Some(key_ttl));
    job.metadata.insert("schedule".into(), name.to_owned());
    job.metadata.insert("tick".into(), tick.to_rfc3339());
    let enqueued = broker.enqueue(job).await?;
    sqlx::query(
        "INSERT INTO schedule_runs (schedule_name, tick, trigger, job_id, queue) VALUES ($1, $2, 'cron', $3, $4)
         ON CONFLICT DO NOTHING",
    )
    .bind(name)
    .bind(tick)
    .bind(enqueued.job.id.0)
    .bind(enqueued.job.queue.as_str())
    .execute(&mut **tx)
    .await?;
    *last_sql = std::time::Instant::now();
    Ok(enqueued.job.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tick_key_outlives_every_plan_that_could_fire_its_tick_again() {
        let hourly = CronSchedule::parse("0 0 * * * *", "UTC").unwrap();
        let tick: DateTime<Utc> = "2026-03-01T10:00:00Z".parse().unwrap();
        let grace = chrono::Duration::seconds(30);
        let h = std::time::Duration::from_secs(3600);
        // A rolled-back tick of an hourly schedule is fired again while it is among the plan's
        // late ticks kept: up to `keep` periods later (plus the grace).
        assert_eq!(tick_key_ttl(&hourly, tick, Misfire::FireOnce, 10, grace), 2 * h + grace.to_std().unwrap());
        assert_eq!(tick_key_ttl(&hourly, tick, Misfire::CatchUp, 10, grace), 11 * h + grace.to_std().unwrap());
        // A long grace fires every tick within it again.
        let day = chrono::Duration::days(1);
        assert_eq!(tick_key_ttl(&hourly, tick, Misfire::Skip, 10, day), h + day.to_std().unwrap());
        // Never under an hour, and bounded.
        let every_second = CronSchedule::parse("* * * * * *", "UTC").unwrap();
        assert_eq!(tick_key_ttl(&every_second, tick, Misfire::CatchUp, 10, grace), TICK_KEY_TTL);
        let yearly = CronSchedule::parse("0 0 0 1 1 *", "UTC").unwrap();
        assert_eq!(tick_key_ttl(&yearly, tick, Misfire::CatchUp, 1000, grace), TICK_KEY_TTL_MAX);
        // Whatever the plan, the tick's key is still held when a plan fires it again, also for
        // ticks spaced unevenly (weekdays only: a Thursday's tenth later tick is 14 days on).
        let weekdays = CronSchedule::parse("0 0 9 * * MON-FRI", "UTC").unwrap();
        let thursday: DateTime<Utc> = "2026-03-05T09:00:00Z".parse().unwrap();
        for (schedule, tick) in [(&hourly, tick), (&weekdays, thursday)] {
            for (policy, limit) in [(Misfire::FireOnce, 1), (Misfire::CatchUp, 10), (Misfire::CatchUp, 3)] {
                for hours_down in 0..24 * 20 {
                    let now = tick + chrono::Duration::hours(hours_down) + chrono::Duration::minutes(59);
                    let plan = plan_ticks(schedule, tick, now, policy, limit, grace);
                    if plan.fire.contains(&tick) {
                        let ttl = tick_key_ttl(schedule, tick, policy, limit, grace);
                        let held = chrono::Duration::from_std(ttl).unwrap();
                        assert!(now - tick < held, "{} {policy:?} {limit} {hours_down}h", schedule.expr());
                    }
                }
            }
        }
    }
}
