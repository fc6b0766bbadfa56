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

use std::time::Duration;

use anyhow::Context as _;
use jobq_core::config::Settings;
use jobq_core::store::Store;
use jobq_core::stream::Broker;
use tokio_util::sync::CancellationToken;

pub use cron::upsert_declared;
pub use promoter::promote_once;
pub use recorder::record_once;

/// Connects, and runs the promoter at once and, once the migrations (when configured) are
/// applied, cron, recorder and pruner, until `shutdown` is cancelled.
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
    let consumer = if settings.worker.id.is_empty() {
        format!("scheduler-{}-{}", std::process::id(), &uuid::Uuid::new_v4().simple().to_string()[..6])
    } else {
        format!("scheduler-{}", settings.worker.id)
    };
    tracing::info!(consumer, "scheduler started");
    // The loops stop together: at shutdown, or when one of them ends before it (a panic).
    let stop = shutdown.child_token();
    let s = settings.scheduler.clone();
    // Promotion needs Redis only: it runs from the start, also while Postgres is down. The loops
    // that need Postgres start once the migrations (when configured) are applied and the
    // declared schedules upserted, each retried until Postgres answers.
    let with_postgres = async {
        if settings.database.migrate {
            if let Err(e) = store.migrate_with_retry(&stop).await {
                stop.cancel();
                return vec![Err(format!("migrations failed: {e}"))];
            }
        }
        cron::upsert_declared(&store, &settings, &stop).await;
        if stop.is_cancelled() {
            return Vec::new();
        }
        let ended = tokio::join!(
            supervise("cron", cron::run(broker.clone(), store.clone(), s.clone(), stop.clone()), stop.clone()),
            supervise("pruner", prune_loop(store.clone(), settings.retention.clone(), stop.clone()), stop.clone()),
            supervise(
                "recorder",
                recorder::run(broker.clone(), store.clone(), s.clone(), consumer, stop.clone()),
                stop.clone()
            ),
        );
        vec![ended.0, ended.1, ended.2]
    };
    let (promoter, gauges, others) = tokio::join!(
        supervise("promoter", promoter::run(broker.clone(), s.clone(), stop.clone()), stop.clone()),
        supervise("gauges", gauges_loop(broker.clone(), stop.clone()), stop.clone()),
        with_postgres,
    );
    let failed: Vec<String> = [promoter, gauges].into_iter().chain(others).filter_map(Result::err).collect();
    if !failed.is_empty() {
        anyhow::bail!("scheduler stopped: {}", failed.join("; "));
    }
    tracing::info!("scheduler stopped");
    Ok(())
}

/// Runs one loop of the scheduler as a task of its own until it ends. A loop ends only once
/// `stop` is cancelled; one that ends before (it panicked) cancels `stop`, so that the others
/// end too and the process exits for its supervisor to restart, instead of running on without
/// promotion or cron while `/ready` still answers.
async fn supervise(
    name: &'static str,
    task: impl std::future::Future<Output = ()> + Send + 'static,
    stop: CancellationToken,
) -> Result<(), String> {
    let ended = tokio::spawn(task).await;
    if ended.is_ok() && stop.is_cancelled() {
        return Ok(());
    }
    stop.cancel();
    let why = match ended {
        Ok(()) => "ended on its own".to_owned(),
        Err(e) if e.is_panic() => {
            let p = e.into_panic();
            let msg = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
            format!("panicked: {}", msg.unwrap_or_else(|| "non-string panic".into()))
        }
        Err(e) => e.to_string(),
    };
    tracing::error!(task = name, why, "a scheduler loop stopped; stopping the scheduler");
    Err(format!("the {name} loop {why}"))
}

/// The wait before a loop tries again after an error: doubled each time, from `interval` up
/// to 5 s, or `interval` when that is longer.
pub(crate) fn retry_delay(delay: Duration, interval: Duration) -> Duration {
    delay.saturating_mul(2).min(interval.max(Duration::from_secs(5))).max(interval)
}

/// Deletes history and DLQ rows past their retention every minute, in batches of 1,000.
async fn prune_loop(store: Store, retention: jobq_core::config::RetentionSettings, shutdown: CancellationToken) {
    let age = |d: Duration| chrono::Duration::from_std(d).unwrap_or(chrono::Duration::days(36500));
    loop {
        let now = chrono::Utc::now();
        match store.prune(now - age(retention.history), now - age(retention.dlq), 1000).await {
            Ok((h, d, r)) if h + d + r > 0 => {
                tracing::info!(history = h, dlq = d, schedule_runs = r, "pruned rows past retention")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "pruning failed; retrying in a minute"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
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
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_retry_delay_doubles_from_the_interval_up_to_five_seconds_or_the_interval() {
        let ms = Duration::from_millis;
        assert_eq!(retry_delay(ms(100), ms(100)), ms(200));
        assert_eq!(retry_delay(ms(4000), ms(100)), ms(5000));
        assert_eq!(retry_delay(ms(5000), ms(100)), ms(5000));
        // An interval above 5 s is both the floor and the cap (clamp would panic here).
        assert_eq!(retry_delay(ms(10_000), ms(10_000)), ms(10_000));
        assert_eq!(retry_delay(Duration::ZERO, ms(10_000)), ms(10_000));
        assert_eq!(retry_delay(Duration::MAX, ms(100)), ms(5000));
    }

    #[tokio::test]
    async fn a_loop_that_panics_stops_the_others_and_names_itself() {
        let stop = CancellationToken::new();
        let (s1, s2) = (stop.clone(), stop.clone());
        let (a, b) = tokio::join!(
            supervise("first", async { panic!("boom") }, stop.clone()),
            supervise("second", async move { s1.cancelled().await }, s2),
        );
        assert_eq!(a, Err("the first loop panicked: boom".to_owned()));
        assert_eq!(b, Ok(()), "the other loop ends because it was stopped");
        assert!(stop.is_cancelled());
    }

    #[tokio::test]
    async fn loops_that_end_at_shutdown_end_cleanly() {
        let stop = CancellationToken::new();
        let s1 = stop.clone();
        let running = tokio::spawn(supervise("cron", async move { s1.cancelled().await }, stop.clone()));
        stop.cancel();
        assert_eq!(running.await.unwrap(), Ok(()));
        let early = supervise("gauges", async {}, CancellationToken::new()).await;
        assert_eq!(early, Err("the gauges loop ended on its own".to_owned()));
    }
}
