//! Leases of running jobs: the heartbeat that renews them, the reaper that reclaims lapsed
//! ones, and the listener of cancel requests.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use jobq_core::config::WorkerSettings;
use jobq_core::job::{JobId, QueueName};
use jobq_core::stream::{Broker, Lease, LeaseStatus};
use tokio_util::sync::CancellationToken;

/// Why a running job is being stopped before its handler returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// `DELETE /api/v1/jobs/{id}` (or `Broker::cancel`) asked for it.
    CancelRequested,
    /// Another worker owns the job now; this attempt's outcome would be refused.
    LeaseLost,
}

/// How many leases past its end an attempt whose handler returned keeps its lease while its
/// outcome waits for a runtime thread, before it is given up as any other (a runtime that stays
/// wedged that long would otherwise hold the job for ever).
const RETURNED_HOLD: u32 = 10;

/// A job running on this worker.
pub(crate) struct Slot {
    pub(crate) lease: Lease,
    pub(crate) cancel: CancellationToken,
    pub(crate) stop: Mutex<Option<Stop>>,
    /// Set once the handler returned and its outcome went to the completer. The lease is still
    /// renewed until the outcome is written, but a renewal that finds it gone is not a loss:
    /// the write may just have landed (the completer reports a real loss as a stale outcome).
    pub(crate) settling: AtomicBool,
    /// When the attempt will have ended at the latest: its timeout, and the grace a cancelled
    /// handler gets, from its registration, and again from the start of its handler. Only a
    /// worker whose handlers hold every thread of its runtime lets an attempt run past it, or
    /// wait past it for a thread to start on.
    pub(crate) ends_by: Mutex<Option<Instant>>,
    /// Set as its handler starts.
    pub(crate) started: AtomicBool,
    /// Set in the handler's task as the handler returns, before the attempt that awaits it
    /// has seen it: a handler that finished is not taken at once for one held past its end
    /// when a handler that does not yield holds the runtime's thread before its outcome is
    /// sent on (its lease is renewed meanwhile, up to [`RETURNED_HOLD`] leases, and the job
    /// does not run again elsewhere).
    pub(crate) returned: AtomicBool,
}

impl Slot {
    pub(crate) fn new(lease: Lease, cancel: CancellationToken, ends_by: Option<Instant>) -> Self {
        Self {
            lease,
            cancel,
            stop: Mutex::new(None),
            settling: AtomicBool::new(false),
            ends_by: Mutex::new(ends_by),
            started: AtomicBool::new(false),
            returned: AtomicBool::new(false),
        }
    }

    /// Whether the attempt is still running, or still waiting to start, `margin` past
    /// [`Slot::ends_by`].
    /// An attempt whose handler returned (and that was not given up already) waits for a thread
    /// to hand its outcome on: it is kept [`RETURNED_HOLD`] leases longer than the others.
    fn overdue(&self, now: Instant, margin: Duration) -> bool {
        if self.settling.load(Ordering::Acquire) {
            return false;
        }
        let held = self.returned.load(Ordering::Acquire) && self.stopped() != Some(Stop::LeaseLost);
        let past = if held { margin * (RETURNED_HOLD + 1) } else { margin };
        self.ends_by.lock().ok().and_then(|t| *t).and_then(|t| t.checked_add(past)).is_some_and(|t| now > t)
    }

    pub(crate) fn stop(&self, why: Stop) {
        if let Ok(mut s) = self.stop.lock() {
            s.get_or_insert(why);
        }
        self.cancel.cancel();
    }

    pub(crate) fn stopped(&self) -> Option<Stop> {
        self.stop.lock().ok().and_then(|s| *s)
    }
}

/// The jobs running on this worker, by id.
#[derive(Clone, Default)]
pub(crate) struct Running(Arc<Mutex<HashMap<JobId, Arc<Slot>>>>);

impl Running {
    /// Registers a started attempt. An earlier attempt of the same job still registered here
    /// (its lease lapsed and this worker fetched the job again) has lost its lease: it is told
    /// so, instead of running on unrenewed and deaf to cancel requests.
    pub(crate) fn insert(&self, id: JobId, slot: Arc<Slot>) {
        let replaced = self.0.lock().ok().and_then(|mut m| m.insert(id, slot));
        if let Some(old) = replaced {
            if !old.settling.load(Ordering::Acquire) {
                metrics::counter!("jobq_worker_leases_lost_total").increment(1);
                tracing::warn!(job.id = %id, "fetched again while an earlier attempt still ran here: that attempt lost its lease and is stopped");
            }
            old.stop(Stop::LeaseLost);
        }
    }

    /// Ends the renewal of attempt `token` of job `id` (a later attempt of the same job on this
    /// worker, after a reclaim, keeps its own).
    pub(crate) fn remove(&self, id: &JobId, token: &str) {
        if let Ok(mut m) = self.0.lock() {
            if m.get(id).is_some_and(|s| s.lease.token == token) {
                m.remove(id);
            }
        }
    }

    fn get(&self, id: &JobId) -> Option<Arc<Slot>> {
        self.0.lock().ok().and_then(|m| m.get(id).cloned())
    }

    fn snapshot(&self) -> Vec<Arc<Slot>> {
        self.0.lock().map(|m| m.values().cloned().collect()).unwrap_or_default()
    }
}

/// The fetches of this worker whose jobs are not registered for renewal yet: sent and not
/// answered, or answered and not started. Both wait for a runtime thread, which handlers that
/// do not yield may hold for longer than a lease; meanwhile the jobs such a fetch started run
/// under this worker's name in Redis, and only [`heartbeat_loop`] (on a thread of its own) can
/// keep them.
#[derive(Clone, Default)]
pub(crate) struct InTransit(Arc<Mutex<Sent>>);

/// The fetches in transit, by number, with the time each was sent; and the last number given.
#[derive(Default)]
struct Sent {
    last: u64,
    fetches: Vec<(u64, Instant)>,
}

impl InTransit {
    /// Notes a fetch about to be sent, until the returned guard is dropped (once its jobs are
    /// registered, or it failed).
    pub(crate) fn begin(&self) -> Transit {
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        g.last += 1;
        let seq = g.last;
        g.fetches.push((seq, Instant::now()));
        Transit { of: self.clone(), seq }
    }

    /// When the oldest fetch still in transit was sent.
    fn oldest(&self) -> Option<Instant> {
        let g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        g.fetches.iter().map(|t| t.1).min()
    }
}

/// A fetch in transit (see [`InTransit`]).
pub(crate) struct Transit {
    of: InTransit,
    seq: u64,
}

impl Drop for Transit {
    fn drop(&mut self) {
        let mut g = self.of.0.lock().unwrap_or_else(|e| e.into_inner());
        g.fetches.retain(|t| t.0 != self.seq);
    }
}

/// Runs [`heartbeat_loop`] on a thread of its own, with its own runtime and Redis connection,
/// so leases hold while handlers keep every thread of the worker's runtime busy with CPU-bound
/// work (a lapsed lease would hand a healthy job to another worker).
/// `(queues, lease, every)`: the queues served, the lease, and how often to renew.
pub(crate) type Renewal = (Vec<QueueName>, Duration, Duration);

pub(crate) fn spawn_heartbeat(
    broker: &Broker,
    consumer: String,
    jobs: (Running, InTransit),
    renewal: Renewal,
    stop: CancellationToken,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let broker = broker.with_own_connection()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let thread = std::thread::Builder::new()
        .name("jobq-heartbeat".into())
        .spawn(move || runtime.block_on(heartbeat_loop(broker, consumer, jobs, renewal, stop)))?;
    Ok(thread)
}

/// Each `every` until `stop`: renews this worker's lease registration on its queues (for three
/// heartbeats: reapers of other workers wait for it, also while this worker shuts down or its
/// runtime is busy) and the lease of every running job. While a fetch has been in transit for
/// half of `every` or more, the leases of every job running under this worker's name are
/// renewed too, those of jobs it does not know of yet included. An attempt a lease past its end
/// (see [`Slot::ends_by`]) is not renewed.
async fn heartbeat_loop(
    broker: Broker,
    consumer: String,
    (running, in_transit): (Running, InTransit),
    renewal: Renewal,
    stop: CancellationToken,
) {
    let (queues, lease, every) = renewal;
    let mut overdue_before = 0;
    loop {
        if let Err(e) = broker.register_lease(&consumer, &queues, lease, every * 3).await {
            tracing::warn!(error = %e, "registering this worker's lease failed");
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        // An attempt a lease past its end is held by handlers that hold every thread of the
        // runtime (its timeout cannot fire, or it cannot start): its lease is given up, so that
        // another worker's reaper re-runs it (counted as a crash), and the attempt, once it
        // ends or starts here, is dropped as one whose lease was lost.
        let (overdue, slots) = given_up(running.snapshot(), Instant::now(), lease);
        for slot in &overdue {
            slot.stop(Stop::LeaseLost);
        }
        report_overdue(&overdue, &mut overdue_before);
        if in_transit.oldest().is_some_and(|t| t.elapsed() >= every / 2) {
            let given_up: Vec<JobId> = overdue.iter().map(|s| s.lease.id).collect();
            match broker.renew_pending(&queues, &consumer, &given_up).await {
                Ok(n) => {
                    metrics::counter!("jobq_worker_in_transit_renewals_total").increment(1);
                    tracing::debug!(jobs = n, "a fetch is still in transit: renewed every job running here");
                }
                Err(e) => tracing::warn!(error = %e, "renewing the jobs of a fetch in transit failed"),
            }
        }
        if slots.is_empty() {
            continue;
        }
        let leases: Vec<Lease> = slots.iter().map(|s| s.lease.clone()).collect();
        match broker.heartbeat(&consumer, &leases).await {
            Ok(statuses) => {
                for (slot, status) in slots.iter().zip(statuses) {
                    match status {
                        LeaseStatus::Held => {}
                        LeaseStatus::CancelRequested => slot.stop(Stop::CancelRequested),
                        LeaseStatus::Lost if slot.settling.load(Ordering::Acquire) => {}
                        LeaseStatus::Lost => {
                            metrics::counter!("jobq_worker_leases_lost_total").increment(1);
                            tracing::warn!(job.id = %slot.lease.id, "lease lost: another worker owns this job now; stopping it here");
                            slot.stop(Stop::LeaseLost);
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, jobs = leases.len(), "heartbeat failed; leases may lapse if Redis stays unreachable")
            }
        }
    }
}

/// Splits `slots` into the attempts whose lease is given up, `margin` past their end, and the
/// others. A job still waiting for a thread that long is given up only beside a started one:
/// handlers that are slow but within their timeouts may keep jobs waiting for a thread past
/// theirs, and those jobs would otherwise count reclaims without any crash.
fn given_up(slots: Vec<Arc<Slot>>, now: Instant, margin: Duration) -> (Vec<Arc<Slot>>, Vec<Arc<Slot>>) {
    let wedged = slots.iter().any(|s| s.started.load(Ordering::Acquire) && s.overdue(now, margin));
    slots.into_iter().partition(|s| wedged && s.overdue(now, margin))
}

/// Logs a change in the number of attempts past their end, and sets its gauge.
fn report_overdue(overdue: &[Arc<Slot>], before: &mut usize) {
    metrics::gauge!("jobq_worker_overdue_attempts").set(overdue.len() as f64);
    if overdue.len() > *before {
        let ids: Vec<String> = overdue.iter().take(10).map(|s| s.lease.id.to_string()).collect();
        tracing::error!(
            attempts = overdue.len(),
            job.ids = %ids.join(","),
            "attempts are running past their timeout: handlers hold every thread of this worker's runtime \
             (blocking or CPU-bound code outside spawn_blocking); their leases are no longer renewed, \
             so that another worker re-runs them"
        );
    } else if overdue.is_empty() && *before > 0 {
        tracing::info!("no attempt is running past its timeout any more");
    }
    *before = overdue.len();
}

/// Delivers published cancel requests to running jobs at once, reconnecting on errors.
pub(crate) async fn cancel_listener(broker: Broker, running: Running, stop: CancellationToken) {
    while !stop.is_cancelled() {
        // Raced against the stop, and bounded: subscribing has no timeout of its own, and a
        // Redis that accepts connections but does not answer would hold up the shutdown.
        let subscribed = tokio::select! {
            _ = stop.cancelled() => return,
            r = tokio::time::timeout(SUBSCRIBE_TIMEOUT, broker.cancel_requests()) => r,
        };
        match subscribed {
            Ok(Ok(stream)) => {
                let mut stream = std::pin::pin!(stream);
                loop {
                    let next = tokio::select! {
                        _ = stop.cancelled() => return,
                        n = stream.next() => n,
                    };
                    match next {
                        Some(id) => {
                            if let Some(slot) = running.get(&id) {
                                tracing::info!(job.id = %id, "cancel requested");
                                slot.stop(Stop::CancelRequested);
                            }
                        }
                        None => break,
                    }
                }
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "cancel subscription failed; heartbeats still deliver cancels"),
            Err(_) => tracing::debug!("cancel subscription timed out; heartbeats still deliver cancels"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// How long subscribing to cancel requests may take.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the reaper removes consumers of stopped workers.
const CONSUMER_CLEANUP_EVERY: Duration = Duration::from_secs(300);
/// A consumer with nothing pending and idle this long is removed (its process is gone, or it
/// is created again by its next read).
pub(crate) const CONSUMER_IDLE: Duration = Duration::from_secs(3600);

/// At start and then every `reaper_interval`, registers this worker's lease and reclaims jobs
/// of `queues` whose lease lapsed, and now and then removes idle consumers with nothing
/// pending.
pub(crate) async fn reaper_loop(
    broker: Broker,
    consumer: String,
    queues: Vec<QueueName>,
    settings: WorkerSettings,
    stop: CancellationToken,
) {
    let mut last_cleanup = std::time::Instant::now();
    // The first pass at once: it registers this worker's lease before its jobs can be idle.
    let mut first = true;
    loop {
        if !first {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(settings.reaper_interval) => {}
            }
        }
        first = false;
        if last_cleanup.elapsed() >= CONSUMER_CLEANUP_EVERY {
            last_cleanup = std::time::Instant::now();
            match broker.cleanup_consumers(&queues, jobq_core::stream::Keys::GROUP, CONSUMER_IDLE).await {
                Ok(n) if n > 0 => tracing::info!(removed = n, "removed idle consumers with nothing pending"),
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "consumer clean-up failed"),
            }
        }
        // The queues stay in the namespace's queue set, where the promoter and the recorder find
        // them, even after a `jobq purge-all` (a Redis call a minute per queue; see
        // Broker::register_queue).
        for q in &queues {
            if let Err(e) = broker.register_queue(q).await {
                tracing::debug!(queue.name = %q, error = %e, "queue registration failed; retrying");
            }
        }
        // The registration of this worker's lease holds for three passes of its reaper.
        let registered_for = settings.reaper_interval * 3;
        match broker.reclaim(&consumer, &queues, settings.lease, settings.max_reclaims, registered_for).await {
            Ok(results) => {
                for (q, r) in queues.iter().zip(results) {
                    for (result, n) in
                        [("requeued", r.requeued), ("dead", r.dead), ("cancelled", r.cancelled), ("deleted", r.deleted)]
                    {
                        if n > 0 {
                            metrics::counter!("jobq_reclaims_total", "queue" => q.to_string(), "result" => result)
                                .increment(n);
                        }
                    }
                    if r.requeued + r.dead + r.cancelled > 0 {
                        tracing::warn!(
                            queue.name = %q,
                            requeued = r.requeued,
                            dead = r.dead,
                            cancelled = r.cancelled,
                            "reclaimed jobs whose worker stopped renewing their lease"
                        );
                    }
                    if r.deleted > 0 {
                        tracing::error!(queue.name = %q, entries = r.deleted, "pending stream entries were deleted without an ack");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "reclaim failed; retrying"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(id: JobId, token: &str) -> Arc<Slot> {
        let lease = Lease {
            queue: QueueName::default_queue(),
            priority: jobq_core::job::Priority::Normal,
            entry: "1-0".into(),
            id,
            token: token.into(),
        };
        Arc::new(Slot::new(lease, CancellationToken::new(), None))
    }

    #[test]
    fn an_attempt_is_overdue_a_margin_past_its_end_until_its_handler_returned() {
        let s = slot(JobId(uuid::Uuid::now_v7()), "1");
        let (now, margin) = (Instant::now(), Duration::from_secs(1));
        assert!(!s.overdue(now + Duration::from_secs(3600), margin), "no end (a timeout beyond Instant's range)");
        *s.ends_by.lock().unwrap() = Some(now);
        assert!(!s.overdue(now + margin, margin));
        assert!(s.overdue(now + margin + Duration::from_millis(1), margin));
        s.settling.store(true, Ordering::Release);
        assert!(!s.overdue(now + Duration::from_secs(3600), margin), "returned: its outcome is being written");
        let s = slot(JobId(uuid::Uuid::now_v7()), "1");
        *s.ends_by.lock().unwrap() = Some(now);
        s.started.store(true, Ordering::Release);
        s.returned.store(true, Ordering::Release);
        let hold = margin * RETURNED_HOLD;
        assert!(!s.overdue(now + margin + hold, margin), "its handler returned, its attempt not seen it yet");
        assert!(s.overdue(now + margin + hold + Duration::from_millis(1), margin), "held for so long only");
        s.stop(Stop::LeaseLost);
        assert!(s.overdue(now + margin + Duration::from_millis(1), margin), "given up already: it stays so");
    }

    #[test]
    fn a_job_waiting_for_a_thread_past_its_end_is_given_up_only_beside_a_started_one() {
        let (now, margin) = (Instant::now(), Duration::from_secs(1));
        let past = now - Duration::from_secs(5);
        let waiting = slot(JobId(uuid::Uuid::now_v7()), "1");
        *waiting.ends_by.lock().unwrap() = Some(past);
        let running = slot(JobId(uuid::Uuid::now_v7()), "1");
        running.started.store(true, Ordering::Release);
        *running.ends_by.lock().unwrap() = Some(now);
        let (gone, kept) = given_up(vec![waiting.clone(), running.clone()], now, margin);
        assert_eq!((gone.len(), kept.len()), (0, 2), "a slow runtime, not a wedged one");
        *running.ends_by.lock().unwrap() = Some(past);
        let (gone, kept) = given_up(vec![waiting, running], now, margin);
        assert_eq!((gone.len(), kept.len()), (2, 0), "a timeout that cannot fire: both go");
    }

    #[test]
    fn a_job_fetched_again_stops_its_earlier_attempt_on_this_worker() {
        let running = Running::default();
        let id = JobId(uuid::Uuid::now_v7());
        let (first, second) = (slot(id, "1"), slot(id, "2"));
        running.insert(id, first.clone());
        running.insert(id, second.clone());
        assert!(first.cancel.is_cancelled(), "the earlier attempt is told to stop");
        assert_eq!(first.stopped(), Some(Stop::LeaseLost));
        assert!(!second.cancel.is_cancelled());
        // The earlier attempt ending does not end the renewal of the new one.
        running.remove(&id, "1");
        assert!(running.get(&id).is_some_and(|s| s.lease.token == "2"));
        running.remove(&id, "2");
        assert!(running.get(&id).is_none());
    }
}
