//! Fires cron ticks: every `cron_poll`, claims and enqueues due ticks (see
//! [`jobq_core::store::Store::fire_due`]). Any number of replicas may run this loop.

use std::time::Duration;

use jobq_core::config::{SchedulerSettings, Settings};
use jobq_core::store::Store;
use jobq_core::stream::Broker;
use tokio_util::sync::CancellationToken;

/// Upserts the schedules declared in the config file, retrying while Postgres is unreachable.
pub async fn upsert_declared(store: &Store, settings: &Settings, shutdown: &CancellationToken) {
    for spec in &settings.schedules {
        let mut delay = Duration::from_millis(200);
        loop {
            match store.put_schedule(spec, "config").await {
                Ok((_, created)) => {
                    tracing::info!(schedule = %spec.name, created, "declared schedule upserted");
                    break;
                }
                Err(e) if e.is_unavailable() => {
                    tracing::warn!(error = %e, "Postgres unavailable; retrying schedule upsert")
                }
                Err(e) => {
                    tracing::error!(schedule = %spec.name, error = %e, "declared schedule refused");
                    break;
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }
}

pub(crate) async fn run(broker: Broker, store: Store, settings: SchedulerSettings, shutdown: CancellationToken) {
    let grace = chrono::Duration::from_std(settings.misfire_grace).unwrap_or(chrono::Duration::seconds(30));
    let mut delay = settings.cron_poll;
    loop {
        match store.fire_due(&broker, grace, 100).await {
            Ok(pass) => {
                for f in &pass.fired {
                    metrics::counter!("jobq_cron_fires_total", "schedule" => f.schedule.clone()).increment(1);
                    tracing::info!(schedule = %f.schedule, tick = %f.tick.to_rfc3339(), job.id = %f.job_id, late_ms = f.late_ms, "cron tick fired");
                }
                if pass.skipped > 0 {
                    metrics::counter!("jobq_cron_misfires_total").increment(pass.skipped);
                }
                for (schedule, error) in &pass.failed {
                    metrics::counter!("jobq_cron_errors_total").increment(1);
                    tracing::error!(schedule = %schedule, error = %error, "schedule could not be fired; the other schedules go on, this one is tried again");
                }
                // A pass that stopped at its batch with more perhaps due goes again at once, so
                // that a burst of schedules due at one tick is not turned into misfires.
                delay = if pass.more { Duration::ZERO } else { settings.cron_poll };
            }
            Err(e) => {
                metrics::counter!("jobq_cron_errors_total").increment(1);
                tracing::warn!(error = %e, "firing cron ticks failed; the claim was rolled back and is retried");
                delay = crate::retry_delay(delay, settings.cron_poll);
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}
