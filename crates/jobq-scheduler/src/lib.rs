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
    jobq_core::ops::prometheus();
    let broker = Broker::connect(&settings).await.context("invalid Redis settings")?;
    let store = Store::connect(&settings.database).await.context("invalid Postgres settings")?;
    if !settings.metrics_addr.is_empty() {
        let (b, s) = (broker.clone(), store.clone());
        let checks = vec![
            jobq_core::ops::check("redis", move || {
                let b = b.clone();
                async move { b.ping().await }
            }),
            jobq_core::ops::check("postgres", move || {
                let s = s.clone();
                async move { s.ping().await }
            }),
        ];
        let addr = settings.metrics_addr.parse().context("JOBQ_METRICS_ADDR")?;
        jobq_core::ops::serve(addr, checks, shutdown.clone()).await.context("cannot serve JOBQ_METRICS_ADDR")?;
    }
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
    tokio::spawn(gauges_loop(broker.clone(), shutdown.clone()));
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

/// Every 5 s, samples queue depth, running, scheduled, paused and oldest age into gauges, and
/// the outbox backlog the recorder has still to write.
async fn gauges_loop(broker: Broker, shutdown: CancellationToken) {
    loop {
        if let Ok(queues) = broker.queues().await {
            match broker.queue_stats(&queues).await {
                Ok(stats) => {
                    for s in stats {
                        let q = s.queue.to_string();
                        for (p, n) in &s.queued {
                            metrics::gauge!("jobq_queue_depth", "queue" => q.clone(), "priority" => p.clone())
                                .set(*n as f64);
                        }
                        metrics::gauge!("jobq_queue_running", "queue" => q.clone()).set(s.running as f64);
                        metrics::gauge!("jobq_queue_scheduled", "queue" => q.clone()).set(s.scheduled as f64);
                        metrics::gauge!("jobq_queue_paused", "queue" => q.clone()).set(if s.paused {
                            1.0
                        } else {
                            0.0
                        });
                        metrics::gauge!("jobq_queue_oldest_age_seconds", "queue" => q.clone())
                            .set(s.oldest_age_ms as f64 / 1000.0);
                    }
                }
                Err(e) => {
                    metrics::counter!("jobq_redis_errors_total", "component" => "scheduler").increment(1);
                    tracing::debug!(error = %e, "sampling queue gauges failed");
                }
            }
            if let Ok(backlog) = broker.outbox_backlog(&queues).await {
                metrics::gauge!("jobq_recorder_backlog").set(backlog.0 as f64);
                metrics::gauge!("jobq_recorder_lag_seconds").set(backlog.1 as f64 / 1000.0);
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
        }
    }
}
