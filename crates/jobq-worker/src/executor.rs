//! Running one attempt and writing outcomes back in batches.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jobq_core::stream::{Broker, Delivery, Failure, Lease, Outcome, Settled};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::job_metrics::JobMetrics;
use crate::leases::{Running, Slot, Stop};
use crate::registry::{Attached, JobService};
use crate::{HandlerError, HandlerResult, JobContext};

/// Most outcomes written in one pipeline.
const BATCH: usize = 512;
/// How long a handler may take to return after its job was cancelled before it is dropped.
pub(crate) const CANCEL_GRACE: Duration = Duration::from_secs(5);

/// What a fetched job holds: a slot to run in, released when its handler returns, and its
/// place among the jobs whose outcome is not written yet, released after the write.
pub(crate) struct Permits {
    pub(crate) run: OwnedSemaphorePermit,
    pub(crate) held: OwnedSemaphorePermit,
}

pub(crate) type Done = (Outcome, OwnedSemaphorePermit);

/// Ends the lease renewal of a batch of outcomes when dropped.
struct Unregister<'a> {
    running: &'a crate::leases::Running,
    outcomes: &'a [Outcome],
}

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        for o in self.outcomes {
            self.running.remove(&o.delivery.envelope.id, &o.delivery.lease);
        }
    }
}

pub(crate) struct Executor {
    pub(crate) services: std::collections::HashMap<String, JobService>,
    pub(crate) broker: Broker,
    pub(crate) consumer: String,
    pub(crate) default_timeout: Duration,
    pub(crate) done: mpsc::UnboundedSender<Done>,
    /// Cancelled when in-flight jobs are given up (shutdown grace elapsed).
    pub(crate) abandon: CancellationToken,
    pub(crate) running: Running,
    pub(crate) metrics: JobMetrics,
    pub(crate) in_flight: metrics::Gauge,
    /// The leases of attempts given up at shutdown, handed back once every job has ended.
    pub(crate) given_up: Mutex<Vec<Lease>>,
    /// How long a handler has taken lately, in ns (a moving average over about 16 attempts).
    pub(crate) handler_ns: AtomicU64,
}

/// How the handler's task ended.
enum Ended {
    Returned(HandlerResult),
    Panicked(String),
    TimedOut(Duration),
    /// Stopped by a cancel request or a lost lease and did not return within the grace.
    Dropped,
}

impl Executor {
    /// A started job whose envelope does not decode: it is not run, and not heartbeated, so its
    /// lease lapses and the reaper re-queues it (dead-lettered after `max_reclaims`).
    pub(crate) fn undecodable(&self, id: jobq_core::job::JobId, error: jobq_core::Error) {
        metrics::counter!("jobq_worker_undecodable_jobs_total").increment(1);
        tracing::error!(job.id = %id, error = %error, "a started job's envelope does not decode; it is left to the reaper");
    }

    /// Runs the attempt and hands its outcome (with the slot) to the completer. An attempt
    /// abandoned at shutdown, or whose lease was lost, reports nothing.
    /// Registers the job for lease renewal at once (the fetch loop calls this before spawning:
    /// a job waiting for a busy runtime thread is still heartbeated) and returns its run. The
    /// registration ends when its outcome is written (see [`complete_loop`]).
    pub(crate) fn execute(
        self: Arc<Self>,
        d: Delivery,
        permits: Permits,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let lease = Lease {
            queue: d.queue.clone(),
            priority: d.priority,
            entry: d.entry.clone(),
            id: d.envelope.id,
            token: d.lease.clone(),
        };
        let ends_by = std::time::Instant::now().checked_add(self.timeout_of(&d) + CANCEL_GRACE);
        let slot = Arc::new(Slot::new(lease, self.abandon.child_token(), ends_by));
        self.running.insert(d.envelope.id, slot.clone());
        self.run(d, permits, slot)
    }

    async fn run(self: Arc<Self>, d: Delivery, permits: Permits, slot: Arc<Slot>) {
        // The enqueuing request's trace context, carried in the job's metadata.
        let trace = d.envelope.metadata.get("traceparent").and_then(|t| jobq_core::job::parse_traceparent(t));
        let span = tracing::info_span!(
            "job",
            job.id = %d.envelope.id,
            job.kind = %d.envelope.kind,
            queue.name = %d.queue,
            attempt = d.attempt,
            trace_id = trace.map(|t| t.0).unwrap_or(""),
            parent_span_id = trace.map(|t| t.1).unwrap_or(""),
        );
        let meta = |name: &str| d.envelope.metadata.get(name).map(String::as_str);
        jobq_core::telemetry::adopt_parent(&span, meta("traceparent"), meta("tracestate"));
        async move {
            if slot.stopped() == Some(Stop::LeaseLost) {
                // Given up while it waited for a thread (leases::heartbeat_loop), or fetched
                // again by this worker: another attempt owns the job; nothing ran.
                self.running.remove(&d.envelope.id, &d.lease);
                return;
            }
            let started = std::time::Instant::now();
            let m = self.metrics.of(&d.queue, &d.envelope.kind);
            m.started.increment(1);
            // The job's first attempt over all its runs (a reclaimed or given-up attempt comes
            // back as attempt 1, but not as the first over all; a DLQ retry whose hash was
            // rebuilt starts its count again, but in run 2), recorded below unless a limit
            // held it back (it then does not count): its wait counts once, up to the start that
            // ran its handler.
            let waited = (d.attempts_total == 1 && d.run == 1)
                .then(|| (chrono::Utc::now() - d.envelope.created_at).num_milliseconds().max(0) as f64 / 1000.0);
            self.in_flight.increment(1.0);
            let result = self.attempt(&d, slot.clone()).await;
            if let Some(waited) = waited.filter(|_| !matches!(&result, Some(Err(f)) if f.reason == "postponed")) {
                m.enqueue_to_start.record(waited);
            }
            drop(permits.run);
            self.in_flight.decrement(1.0);
            let took = started.elapsed();
            let avg = self.handler_ns.load(Ordering::Relaxed);
            let took_ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
            self.handler_ns.store(avg - avg / 16 + took_ns / 16, Ordering::Relaxed);
            m.duration.record(took.as_secs_f64());
            let Some(result) = result else {
                self.running.remove(&d.envelope.id, &d.lease);
                return;
            };
            let duration_ms = started.elapsed().as_millis() as u64;
            match &result {
                Ok(_) => tracing::debug!(duration_ms, "job succeeded"),
                Err(f) => tracing::info!(duration_ms, error = %f.message, reason = f.reason, "job attempt failed"),
            }
            slot.settling.store(true, Ordering::Release);
            let _ = self.done.send((Outcome { delivery: d, result }, permits.held));
        }
        .instrument(span)
        .await
    }

    async fn attempt(&self, d: &Delivery, slot: Arc<Slot>) -> Option<Result<Option<serde_json::Value>, Failure>> {
        let timeout = self.timeout_of(d);
        if let Ok(mut ends_by) = slot.ends_by.lock() {
            *ends_by = std::time::Instant::now().checked_add(timeout + CANCEL_GRACE);
        }
        if slot.stopped() == Some(Stop::LeaseLost) {
            // Given up while it waited for a thread (see leases::heartbeat_loop), or fetched
            // again by this worker: another attempt owns the job.
            return None;
        }
        slot.started.store(true, Ordering::Release);
        let env = &d.envelope;
        let Some(service) = self.services.get(&env.kind).cloned() else {
            return Some(Err(Failure {
                message: format!(
                    "unknown job type `{}`: no handler is registered for it on worker {}",
                    env.kind, self.consumer
                ),
                retry_in: None,
                reason: "unknown_type",
            }));
        };
        let attached =
            Attached { broker: self.broker.clone(), consumer: self.consumer.clone(), lease: slot.lease.clone() };
        let ctx = JobContext::attached(d, slot.cancel.clone(), attached);
        // Its own task, so a panicking handler fails the attempt and not the worker.
        // Boxed, as the attempt itself is: the task cell holds a pointer.
        let own = slot.clone();
        let handler = async move {
            // Given up while this task waited for a thread that a handler which does not yield
            // held: another worker runs the job, this one does not start it.
            if own.stopped() == Some(Stop::LeaseLost) {
                return Err(crate::HandlerError::fail(anyhow::anyhow!("lease lost before the handler started")));
            }
            let r = tower::ServiceExt::oneshot(service, ctx).await;
            own.returned.store(true, Ordering::Release);
            r
        };
        let mut task = tokio::spawn(Box::pin(handler.in_current_span()));
        let abort = task.abort_handle();
        let joined = async {
            tokio::select! {
                r = tokio::time::timeout(timeout, &mut task) => r.map_err(|_| ()),
                _ = slot.cancel.cancelled() => tokio::time::timeout(CANCEL_GRACE, &mut task).await.map_err(|_| ()),
            }
        };
        let ended = match joined.await {
            Ok(Ok(r)) => Ended::Returned(r),
            Ok(Err(join)) if join.is_panic() => {
                let p = join.into_panic();
                let msg =
                    p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
                Ended::Panicked(msg.unwrap_or_else(|| "non-string panic".into()))
            }
            Ok(Err(_aborted)) => Ended::Dropped,
            Err(()) if slot.cancel.is_cancelled() => Ended::Dropped,
            Err(()) => Ended::TimedOut(timeout),
        };
        abort.abort();
        if self.abandon.is_cancelled() && !matches!(ended, Ended::Returned(Ok(_))) {
            // Shutdown gave up on this attempt: leave it pending for reclaim. One that still
            // succeeded within the grace is written, so it does not run again; an error it
            // returned on seeing its context cancelled spends no attempt.
            if slot.stopped() != Some(Stop::LeaseLost) {
                self.given_up.lock().unwrap_or_else(|e| e.into_inner()).push(slot.lease.clone());
            }
            return None;
        }
        let retry = |message: String| Failure { retry_in: Some(self.retry_delay(d)), message, reason: "max_attempts" };
        let succeeded = matches!(ended, Ended::Returned(Ok(_)));
        // A held-back attempt never ran: written as postponed, the cancel request (in the job
        // hash) ends the job without a history row and without spending an attempt.
        let held = matches!(ended, Ended::Returned(Err(HandlerError::Held(..))));
        match slot.stopped() {
            Some(Stop::LeaseLost) => return None,
            Some(Stop::CancelRequested) if !succeeded && !held => {
                return Some(Err(Failure {
                    message: "cancelled on request".into(),
                    retry_in: None,
                    reason: "cancelled",
                }));
            }
            _ => {}
        }
        Some(match ended {
            Ended::Returned(Ok(value)) => Ok(value),
            Ended::Returned(Err(HandlerError::Retry(e))) => Err(retry(format!("{e:#}"))),
            Ended::Returned(Err(HandlerError::RetryAfter(e, after))) => {
                Err(Failure { message: format!("{e:#}"), retry_in: Some(after), reason: "max_attempts" })
            }
            Ended::Returned(Err(HandlerError::Held(why, after))) => {
                Err(Failure { message: why, retry_in: Some(after), reason: "postponed" })
            }
            Ended::Returned(Err(HandlerError::Fail(e))) => {
                Err(Failure { message: format!("{e:#}"), retry_in: None, reason: "fatal" })
            }
            Ended::Panicked(msg) => Err(retry(format!("handler panicked: {msg}"))),
            Ended::TimedOut(t) => Err(retry(format!("timed out after {}", jobq_core::duration::format(t)))),
            Ended::Dropped => return None,
        })
    }

    fn timeout_of(&self, d: &Delivery) -> Duration {
        d.envelope.timeout.unwrap_or(self.default_timeout)
    }

    fn retry_delay(&self, d: &Delivery) -> Duration {
        let b = &d.envelope.backoff;
        let previous = (d.attempt > 1).then(|| b.nominal(d.attempt - 1));
        b.delay(d.attempt, previous, &mut rand::rng())
    }
}

/// Writes outcomes in batches until every sender is gone. Redis errors are retried with
/// backoff; once `give_up` is cancelled, a batch that cannot be written is left pending.
pub(crate) async fn complete_loop(
    broker: Broker,
    mut rx: mpsc::UnboundedReceiver<Done>,
    running: crate::leases::Running,
    give_up: CancellationToken,
    job_metrics: JobMetrics,
) {
    let mut buf: Vec<Done> = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut buf, BATCH).await > 0 {
        let (outcomes, permits): (Vec<Outcome>, Vec<OwnedSemaphorePermit>) = buf.drain(..).unzip();
        // Heartbeats go on until the outcomes are written (or given up at shutdown).
        let _renewed = Unregister { running: &running, outcomes: &outcomes };
        let counted = |o: &Outcome, r: Settled| {
            let d = &o.delivery;
            let m = job_metrics.of(&d.queue, &d.envelope.kind);
            m.finished(r).increment(1);
            if o.result.is_err() && !matches!(r, Settled::Stale | Settled::Postponed) {
                m.failed.increment(1);
            }
            if r == Settled::Stale {
                tracing::warn!(job.id = %o.delivery.envelope.id, "lease lost: another worker owns this job now; outcome dropped");
            }
        };
        match settle_retrying(&broker, &outcomes, &give_up).await {
            Some(Ok(results)) => outcomes.iter().zip(results).for_each(|(o, r)| counted(o, r)),
            // An error the same call meets again (a job key of another type, a script error):
            // one outcome must not hold the others, nor every slot once the queue of outcomes
            // fills. Each is written alone; one refused for good is dropped, and its job runs
            // again once its lease lapses (this worker stops renewing it).
            Some(Err(e)) => {
                tracing::error!(error = %e, jobs = outcomes.len(), "writing outcomes failed for good; writing them one by one");
                for o in &outcomes {
                    match settle_retrying(&broker, std::slice::from_ref(o), &give_up).await {
                        Some(Ok(r)) => counted(o, r[0]),
                        Some(Err(e)) => {
                            metrics::counter!("jobq_outcomes_dropped_total").increment(1);
                            tracing::error!(job.id = %o.delivery.envelope.id, error = %e, "outcome refused by Redis; dropped: the job runs again once its lease lapses");
                        }
                        None => break,
                    }
                }
            }
            None => {}
        }
        drop(permits);
    }
}

/// Writes outcomes, retrying with backoff while the error is one a retry can mend. None once
/// `give_up` fires (shutdown); the error that a retry does not mend otherwise.
async fn settle_retrying(
    broker: &Broker,
    outcomes: &[Outcome],
    give_up: &CancellationToken,
) -> Option<jobq_core::Result<Vec<Settled>>> {
    let mut delay = Duration::from_millis(50);
    loop {
        match broker.settle(outcomes).await {
            Ok(results) => return Some(Ok(results)),
            Err(e) if !e.is_transient_redis() => return Some(Err(e)),
            Err(e) => {
                metrics::counter!("jobq_redis_errors_total", "component" => "worker").increment(1);
                tracing::warn!(error = %e, jobs = outcomes.len(), "writing outcomes failed; retrying");
                tokio::select! {
                    _ = give_up.cancelled() => return None,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}
