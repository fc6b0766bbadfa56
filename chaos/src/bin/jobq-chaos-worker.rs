//! `jobq-chaos-worker`: the chaos suite's worker. Handlers:
//!
//! * `chaos.work {ms}`: sleeps `ms`, then appends its side effect to `chaos_effects`;
//! * `chaos.hog {ms}`: keeps its runtime thread busy for `ms` without yielding (CPU-bound work
//!   written without `spawn_blocking`), then appends its side effect;
//! * `chaos.panic`: panics; `chaos.abort`: aborts the whole process; `chaos.hang`: never
//!   returns and ignores cancellation; `chaos.typed {n: u32}`: a typed payload.
//!
//! Settings as `jobq-worker`, plus `DATABASE_URL` for the side-effect table.

use std::time::Duration;

use jobq_worker::{HandlerError, JobContext, Registry};

#[derive(serde::Deserialize)]
struct Work {
    #[serde(default)]
    ms: u64,
}

#[derive(serde::Deserialize)]
struct Typed {
    n: u32,
}

fn main() {
    jobq_worker::main_with("jobq-chaos-worker", setup)
}

async fn setup() -> anyhow::Result<Registry> {
    let url = std::env::var("DATABASE_URL").map_err(|_| anyhow::anyhow!("DATABASE_URL is not set"))?;
    let pool = sqlx::postgres::PgPoolOptions::new().max_connections(20).connect(&url).await?;
    jobq_chaos::create_effects_table(&pool).await?;
    // `chaos.panic` panics on purpose, a thousand times in some scenarios: keep those quiet.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if info.payload().downcast_ref::<&str>() != Some(&"chaos panic") {
            default_hook(info);
        }
    }));
    let worker = std::process::id().to_string();
    let mut registry = Registry::new();
    let (hog_pool, hog_worker) = (pool.clone(), worker.clone());
    registry
        .register_typed("chaos.work", move |w: Work, ctx: JobContext| {
            let (pool, worker) = (pool.clone(), worker.clone());
            async move {
                let started = chrono_now(&pool).await?;
                tokio::time::sleep(Duration::from_millis(w.ms)).await;
                record(&pool, &ctx, &worker, started).await
            }
        })
        .register_typed("chaos.hog", move |w: Work, ctx: JobContext| {
            let (pool, worker) = (hog_pool.clone(), hog_worker.clone());
            async move {
                let started = chrono_now(&pool).await?;
                let until = std::time::Instant::now() + Duration::from_millis(w.ms);
                let mut spins = 0u64;
                while std::time::Instant::now() < until {
                    spins = std::hint::black_box(spins.wrapping_add(1));
                }
                record(&pool, &ctx, &worker, started).await
            }
        })
        .register("chaos.panic", |_ctx: JobContext| async { panic!("chaos panic") })
        .register("chaos.abort", |_ctx: JobContext| async { std::process::abort() })
        .register("chaos.hang", |_ctx: JobContext| async { std::future::pending().await })
        .register_typed("chaos.typed", |t: Typed, _ctx: JobContext| async move { Ok(t.n) });
    Ok(registry)
}

/// Appends the side effect of one attempt.
async fn record(
    pool: &sqlx::PgPool,
    ctx: &JobContext,
    worker: &str,
    started: sqlx::types::chrono::DateTime<sqlx::types::chrono::Utc>,
) -> Result<(), HandlerError> {
    sqlx::query(
        "INSERT INTO chaos_effects (job_id, attempt, worker, started_at, finished_at) VALUES ($1, $2, $3, $4, now())",
    )
    .bind(ctx.id.0)
    .bind(ctx.attempts_total as i32)
    .bind(worker)
    .bind(started)
    .execute(pool)
    .await
    .map_err(HandlerError::retry)?;
    Ok(())
}

/// The database's clock, so side-effect times of every process compare.
async fn chrono_now(
    pool: &sqlx::PgPool,
) -> Result<sqlx::types::chrono::DateTime<sqlx::types::chrono::Utc>, HandlerError> {
    sqlx::query_scalar("SELECT now()").fetch_one(pool).await.map_err(HandlerError::retry)
}
