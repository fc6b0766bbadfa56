//! Moves due delayed and retrying jobs into their priority streams, in batches per queue, and
//! deletes succeeded jobs whose retention has ended.

use std::time::Duration;

use jobq_core::config::SchedulerSettings;
use jobq_core::stream::{Broker, Promoted};
use tokio_util::sync::CancellationToken;

/// One pass over every known queue; returns what each promotion did.
pub async fn promote_once(broker: &Broker, batch: usize) -> jobq_core::Result<Vec<Promoted>> {
    let queues = broker.queues().await?;
    broker.promote(&queues, batch).await
}

pub(crate) async fn run(broker: Broker, settings: SchedulerSettings, shutdown: CancellationToken) {
    let mut delay = settings.promote_interval;
    loop {
        let pass = match broker.queues().await {
            Ok(queues) => broker.promote_each(&queues, settings.promote_batch).await.map(|each| (queues, each)),
            Err(e) => Err(e),
        };
        // Every queue failing for a reason that passes (Redis loading, read-only in a
        // fail-over) is an outage, backed off as one.
        let pass = match pass {
            Ok((_, each))
                if !each.is_empty() && each.iter().all(|r| r.as_ref().is_err_and(|e| e.is_transient_redis())) =>
            {
                Err(each.into_iter().find_map(Result::err).expect("every queue failed"))
            }
            other => other,
        };
        match pass {
            Ok((queues, each)) => {
                let mut results = Vec::with_capacity(each.len());
                for (q, r) in queues.iter().zip(each) {
                    match r {
                        Ok(p) => results.push(p),
                        // One queue's keys Redis refuses (a key of another type): the other
                        // queues go on at their pace, and this one is tried again each pass.
                        Err(e) => {
                            metrics::counter!("jobq_redis_errors_total", "component" => "promoter").increment(1);
                            tracing::error!(error = %e, queue.name = %q, "promoting a queue failed; the other queues go on");
                        }
                    }
                }
                for p in &results {
                    let q = p.queue.to_string();
                    metrics::counter!("jobq_promoted_total", "queue" => q.clone()).increment(p.count);
                    metrics::counter!("jobq_expired_total", "queue" => q.clone()).increment(p.expired);
                    metrics::counter!("jobq_retention_swept_total", "queue" => q.clone()).increment(p.swept);
                    metrics::gauge!("jobq_promotion_lag_seconds", "queue" => q).set(p.lag_ms as f64 / 1000.0);
                }
                let moved: u64 = results.iter().map(|p| p.count).sum();
                let lag = results.iter().map(|p| p.lag_ms).max().unwrap_or(0);
                if moved > 0 {
                    tracing::debug!(promoted = moved, lag_ms = lag, "promoted due jobs");
                }
                // A full batch means more are due: go again at once.
                let full = results.iter().any(|p| p.count as usize >= settings.promote_batch || p.more);
                delay = if full { Duration::ZERO } else { settings.promote_interval };
            }
            Err(e) => {
                metrics::counter!("jobq_redis_errors_total", "component" => "promoter").increment(1);
                tracing::warn!(error = %e, "promotion failed; retrying");
                delay = crate::retry_delay(delay, settings.promote_interval);
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}
