//! Running one attempt and writing outcomes back in batches.

use std::sync::Arc;
use std::time::Duration;

use jobq_core::stream::{Broker, Delivery, Failure, Outcome, Settled};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::{HandlerError, JobContext, Registry};

/// Most outcomes written in one pipeline.
const BATCH: usize = 512;

pub(crate) type Done = (Outcome, OwnedSemaphorePermit);

pub(crate) struct Executor {
    pub(crate) registry: Arc<Registry>,
    pub(crate) consumer: String,
    pub(crate) default_timeout: Duration,
    pub(crate) done: mpsc::UnboundedSender<Done>,
    /// Cancelled when in-flight jobs are given up (shutdown grace elapsed).
    pub(crate) abandon: CancellationToken,
}

impl Executor {
    /// Runs the attempt and hands its outcome (with the slot) to the completer. An attempt
    /// abandoned at shutdown reports nothing: its entry stays pending for reclaim.
    pub(crate) async fn execute(self: Arc<Self>, d: Delivery, permit: OwnedSemaphorePermit) {
        let span = tracing::info_span!(
            "job",
            job.id = %d.envelope.id,
            job.kind = %d.envelope.kind,
            queue.name = %d.queue,
            attempt = d.attempt,
        );
        async move {
            let started = std::time::Instant::now();
            let Some(result) = self.attempt(&d).await else { return };
            let duration_ms = started.elapsed().as_millis() as u64;
            match &result {
                Ok(_) => tracing::debug!(duration_ms, "job succeeded"),
                Err(f) => {
                    tracing::info!(duration_ms, error = %f.message, retry = f.retry_in.is_some(), "job attempt failed")
                }
            }
            let _ = self.done.send((Outcome { delivery: d, result }, permit));
        }
        .instrument(span)
        .await
    }

    async fn attempt(&self, d: &Delivery) -> Option<Result<Option<serde_json::Value>, Failure>> {
        let env = &d.envelope;
        let Some(handler) = self.registry.get(&env.kind) else {
            return Some(Err(Failure {
                message: format!(
                    "unknown job type `{}`: no handler is registered for it on worker {}",
                    env.kind, self.consumer
                ),
                retry_in: None,
                reason: "unknown_type",
            }));
        };
        let ctx = JobContext {
            id: env.id,
            kind: env.kind.clone(),
            queue: d.queue.clone(),
            attempt: d.attempt,
            attempts_total: d.attempts_total,
            max_attempts: env.max_attempts,
            run: d.run,
            payload: env.payload.clone(),
            metadata: env.metadata.clone(),
            cancel: self.abandon.child_token(),
        };
        let timeout = env.timeout.unwrap_or(self.default_timeout);
        // Its own task, so a panicking handler fails the attempt and not the worker.
        let task = tokio::spawn(handler.call(ctx).in_current_span());
        let abort = task.abort_handle();
        let joined = tokio::select! {
            r = tokio::time::timeout(timeout, task) => r,
            _ = self.abandon.cancelled() => {
                abort.abort();
                return None;
            }
        };
        let retry = |message: String| Failure { retry_in: Some(self.retry_delay(d)), message, reason: "max_attempts" };
        Some(match joined {
            Err(_elapsed) => {
                abort.abort();
                Err(retry(format!("timed out after {}", jobq_core::duration::format(timeout))))
            }
            Ok(Err(join)) if join.is_panic() => {
                let p = join.into_panic();
                let msg =
                    p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
                Err(retry(format!("handler panicked: {}", msg.unwrap_or_else(|| "non-string panic".into()))))
            }
            Ok(Err(_cancelled)) => return None,
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err(HandlerError::Retry(e)))) => Err(retry(format!("{e:#}"))),
            Ok(Ok(Err(HandlerError::Fail(e)))) => {
                Err(Failure { message: format!("{e:#}"), retry_in: None, reason: "fatal" })
            }
        })
    }

    fn retry_delay(&self, d: &Delivery) -> Duration {
        let b = &d.envelope.backoff;
        let previous = (d.attempt > 1).then(|| b.nominal(d.attempt - 1));
        b.delay(d.attempt, previous, &mut rand::rng())
    }
}

/// Writes outcomes in batches until every sender is gone. Redis errors are retried with
/// backoff; once `abandon` is cancelled, a batch that cannot be written is left pending.
pub(crate) async fn complete_loop(broker: Broker, mut rx: mpsc::UnboundedReceiver<Done>, abandon: CancellationToken) {
    let mut buf: Vec<Done> = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut buf, BATCH).await > 0 {
        let (outcomes, permits): (Vec<Outcome>, Vec<OwnedSemaphorePermit>) = buf.drain(..).unzip();
        let mut delay = Duration::from_millis(50);
        loop {
            match broker.settle(&outcomes).await {
                Ok(results) => {
                    for (o, r) in outcomes.iter().zip(results) {
                        if r == Settled::Stale {
                            tracing::warn!(job.id = %o.delivery.envelope.id, "lease lost: another worker owns this job now; outcome dropped");
                        }
                    }
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, jobs = outcomes.len(), "writing outcomes failed; retrying");
                    tokio::select! {
                        _ = abandon.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
        drop(permits);
    }
}
