//! The jobq scheduler: promotes due delayed and retrying jobs into their streams, fires cron
//! schedules, and runs the recorder that writes the Redis outbox (one event per finished
//! attempt) into Postgres.
//!
//! Any number of replicas can run: promotion is an atomic script per queue, and recorders share
//! the outbox through a consumer group (writes are idempotent per (job, run, attempt)).
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let settings = jobq_core::config::load(None)?;
//! jobq_scheduler::run(settings, jobq_core::shutdown::token_from_signals()).await
//! # }
//! ```

mod cron;
mod promoter;
mod recorder;

use anyhow::Context as _;
use jobq_core::config::Settings;
use jobq_core::store::Store;
use jobq_core::stream::Broker;
use tokio_util::sync::CancellationToken;

pub use cron::upsert_declared;
pub use promoter::promote_once;
pub use recorder::record_once;

/// Connects, applies migrations when configured, and runs promoter and recorder until
/// `shutdown` is cancelled.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let broker = Broker::connect(&settings).await.context("invalid Redis settings")?;
    let store = Store::connect(&settings.database).await.context("invalid Postgres settings")?;
    if !broker.wait_until_ready(settings.redis.allow_eviction, &shutdown).await? {
        return Ok(());
    }
    if settings.database.migrate {
        store.migrate_with_retry(&shutdown).await?;
    }
    let consumer = if settings.worker.id.is_empty() {
        format!("scheduler-{}-{}", std::process::id(), &uuid::Uuid::new_v4().simple().to_string()[..6])
    } else {
        format!("scheduler-{}", settings.worker.id)
    };
    tracing::info!(consumer, "scheduler started");
    cron::upsert_declared(&store, &settings, &shutdown).await;
    let promoter = tokio::spawn(promoter::run(broker.clone(), settings.scheduler.clone(), shutdown.clone()));
    let cron = tokio::spawn(cron::run(broker.clone(), store.clone(), settings.scheduler.clone(), shutdown.clone()));
    let pruner = tokio::spawn(prune_loop(store.clone(), settings.retention.clone(), shutdown.clone()));
    let recorder = tokio::spawn(recorder::run(broker, store, settings.scheduler.clone(), consumer, shutdown.clone()));
    let (p, c, r, _) = tokio::join!(promoter, cron, recorder, pruner);
    p.context("promoter panicked")?;
    c.context("cron loop panicked")?;
    r.context("recorder panicked")?;
    tracing::info!("scheduler stopped");
    Ok(())
}

/// Deletes history and DLQ rows past their retention every minute, in batches of 1,000.
async fn prune_loop(store: Store, retention: jobq_core::config::RetentionSettings, shutdown: CancellationToken) {
    let age = |d: std::time::Duration| chrono::Duration::from_std(d).unwrap_or(chrono::Duration::days(36500));
    loop {
        let now = chrono::Utc::now();
        match store.prune(now - age(retention.history), now - age(retention.dlq), 1000).await {
            Ok((h, d)) if h + d > 0 => tracing::info!(history = h, dlq = d, "pruned rows past retention"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "pruning failed; retrying in a minute"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(60)) => {}
        }
    }
}
