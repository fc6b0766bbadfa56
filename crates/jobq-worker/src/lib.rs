//! The jobq worker: fetches jobs from its queues' priority streams through the consumer group,
//! runs their handlers, and writes each outcome back with one script per job, pipelined.
//!
//! # Loop
//!
//! 1. Take every free slot (`concurrency` permits) and run the fetch script on each queue,
//!    in strict order or in a weighted random order, until the slots are used.
//! 2. When nothing was ready, block on XREAD for entries newer than the ones the fetch saw
//!    (no race: anything added after the fetch wakes the worker), at most `poll_interval`.
//! 3. Each job runs in its own task with its timeout; its outcome goes to the completer, which
//!    writes outcomes in batches (one Redis round trip per batch) and then frees the slot.
//!
//! Beside the loop: the heartbeat renews the lease of every running job (and learns of cancel
//! requests and lost leases), the reaper re-queues jobs whose worker stopped renewing theirs,
//! and a pub/sub listener delivers cancel requests at once. See `docs/guarantees.md`.
//!
//! On shutdown the worker stops fetching, gives in-flight jobs `shutdown_timeout`, cancels the
//! rest without acking them (they stay pending and are reclaimed), flushes outcomes and returns.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let settings = jobq_core::config::load(None)?;
//! let registry = jobq_worker::Registry::with_builtins();
//! let shutdown = jobq_core::shutdown::token_from_signals();
//! jobq_worker::run(settings, registry, shutdown).await
//! # }
//! ```

mod executor;
pub mod handlers;
mod leases;
mod registry;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use jobq_core::config::{QueueSelection, Settings, WorkerSettings};
use jobq_core::job::QueueName;
use jobq_core::stream::Broker;
use rand::Rng;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use registry::{BoxFuture, Handler, HandlerError, HandlerResult, JobContext, Registry};

/// Connects to Redis, checks it, and runs a worker until `shutdown` is cancelled.
pub async fn run(settings: Settings, registry: Registry, shutdown: CancellationToken) -> anyhow::Result<()> {
    let broker = Broker::connect(&settings).await.context("invalid Redis settings")?;
    if !broker.wait_until_ready(settings.redis.allow_eviction, &shutdown).await? {
        return Ok(());
    }
    let worker = Worker::new(broker, registry, settings.worker.clone(), settings.jobs.timeout);
    worker.run(shutdown).await
}

/// A consumer name unique to this process: `hostname-pid-random`.
pub fn default_consumer_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".to_owned());
    let tag = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &tag[..6])
}

/// The order in which one fetch round visits the queues: the configured order in strict mode;
/// in weighted mode a random order where each queue comes first with probability
/// weight / total (sampling without replacement).
pub fn fetch_order(selection: &QueueSelection, rng: &mut impl Rng) -> Vec<QueueName> {
    if !selection.weighted {
        return selection.names();
    }
    let mut left: Vec<(QueueName, u32)> = selection.queues.clone();
    let mut order = Vec::with_capacity(left.len());
    while !left.is_empty() {
        let total: u32 = left.iter().map(|(_, w)| w).sum();
        let mut pick = rng.random_range(0..total);
        let i = left
            .iter()
            .position(|(_, w)| {
                if pick < *w {
                    true
                } else {
                    pick -= w;
                    false
                }
            })
            .unwrap_or(0);
        order.push(left.remove(i).0);
    }
    order
}

/// One worker process's fetch/execute/ack machinery.
pub struct Worker {
    broker: Broker,
    registry: Arc<Registry>,
    settings: WorkerSettings,
    consumer: String,
    default_timeout: Duration,
}

impl Worker {
    /// A worker over `broker` running `registry`'s handlers.
    pub fn new(broker: Broker, registry: Registry, settings: WorkerSettings, default_timeout: Duration) -> Self {
        let consumer = if settings.id.is_empty() { default_consumer_name() } else { settings.id.clone() };
        Self { broker, registry: Arc::new(registry), settings, consumer, default_timeout }
    }

    /// This worker's consumer name.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Runs until `shutdown` is cancelled, then drains as described in the crate docs.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let queues = self.settings.queues.names();
        for q in &queues {
            if retry_redis("create consumer groups", &shutdown, || self.broker.ensure_groups(q)).await.is_none() {
                return Ok(());
            }
        }
        tracing::info!(
            consumer = %self.consumer,
            queues = ?self.settings.queues.queues.iter().map(|(q, w)| format!("{q}={w}")).collect::<Vec<_>>(),
            weighted = self.settings.queues.weighted,
            concurrency = self.settings.concurrency,
            handlers = ?self.registry.types(),
            "worker started"
        );
        let slots = Arc::new(Semaphore::new(self.settings.concurrency));
        let abandon = CancellationToken::new();
        let background = CancellationToken::new();
        let running = leases::Running::default();
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let completer = tokio::spawn(executor::complete_loop(self.broker.clone(), done_rx, abandon.clone()));
        let heartbeat = tokio::spawn(leases::heartbeat_loop(
            self.broker.clone(),
            self.consumer.clone(),
            running.clone(),
            self.settings.heartbeat,
            background.clone(),
        ));
        let listener = tokio::spawn(leases::cancel_listener(self.broker.clone(), running.clone(), background.clone()));
        let reaper = tokio::spawn(leases::reaper_loop(
            self.broker.clone(),
            self.consumer.clone(),
            queues.clone(),
            self.settings.clone(),
            shutdown.clone(),
        ));
        let tracker = TaskTracker::new();
        let exec = Arc::new(executor::Executor {
            registry: self.registry.clone(),
            consumer: self.consumer.clone(),
            default_timeout: self.default_timeout,
            done: done_tx,
            abandon: abandon.clone(),
            running: running.clone(),
        });
        let mut blocking = None;
        let mut backoff = Duration::from_millis(50);
        'outer: loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => break,
                p = slots.clone().acquire_owned() => p.context("slots closed")?,
            };
            let mut permits = vec![first];
            while let Ok(p) = slots.clone().try_acquire_owned() {
                permits.push(p);
            }
            let mut started = 0usize;
            let mut paused = 0usize;
            let mut last_ids = Vec::new();
            let order = fetch_order(&self.settings.queues, &mut rand::rng());
            for q in &order {
                if permits.is_empty() || shutdown.is_cancelled() {
                    break;
                }
                match self.broker.fetch(q, &self.consumer, permits.len()).await {
                    Ok(fetched) => {
                        paused += usize::from(fetched.paused);
                        last_ids.extend(fetched.last_ids);
                        for delivery in fetched.jobs {
                            let permit = permits.pop().context("fetched more jobs than free slots")?;
                            started += 1;
                            tracker.spawn(exec.clone().execute(delivery, permit));
                        }
                    }
                    Err(e) => {
                        drop(permits);
                        tracing::warn!(error = %e, queue.name = %q, retry_in_ms = backoff.as_millis() as u64, "fetch failed");
                        tokio::select! {
                            _ = shutdown.cancelled() => break 'outer,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue 'outer;
                    }
                }
            }
            backoff = Duration::from_millis(50);
            drop(permits);
            if started > 0 {
                continue;
            }
            // Nothing ready: wait for an entry newer than what the fetch scripts saw. A paused
            // queue is looked at again within a second of being resumed.
            let block = if paused > 0 {
                self.settings.poll_interval.min(Duration::from_secs(1))
            } else {
                self.settings.poll_interval
            };
            if blocking.is_none() {
                match self.broker.blocking_connection(self.settings.poll_interval).await {
                    Ok(c) => blocking = Some(c),
                    Err(e) => tracing::warn!(error = %e, "cannot open the blocking connection; polling instead"),
                }
            }
            let wait = async {
                match blocking.as_mut() {
                    Some(conn) => Broker::wait_for_work(conn, &last_ids, block).await,
                    None => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        Ok(())
                    }
                }
            };
            let waited = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = wait => r,
            };
            if let Err(e) = waited {
                tracing::warn!(error = %e, "waiting for work failed; reconnecting");
                blocking = None;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        tracing::info!(in_flight = tracker.len(), "stopped fetching; waiting for in-flight jobs");
        tracker.close();
        if tokio::time::timeout(self.settings.shutdown_timeout, tracker.wait()).await.is_err() {
            tracing::warn!(
                in_flight = tracker.len(),
                "shutdown timeout elapsed: cancelling the remaining jobs; they stay pending and will be reclaimed"
            );
            abandon.cancel();
            tracker.wait().await;
        }
        drop(exec);
        // The completer ends once every outcome is written (or Redis stays down too long).
        let mut completer = completer;
        if tokio::time::timeout(Duration::from_secs(10), &mut completer).await.is_err() {
            tracing::warn!("could not write every outcome in time; those jobs stay pending and will be reclaimed");
            abandon.cancel();
            let _ = completer.await;
        }
        background.cancel();
        let _ = tokio::join!(heartbeat, listener, reaper);
        tracing::info!("worker stopped");
        Ok(())
    }
}

/// Retries a Redis operation with backoff until it succeeds or shutdown is requested.
async fn retry_redis<F, Fut, T>(what: &str, shutdown: &CancellationToken, mut op: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = jobq_core::Result<T>>,
{
    let mut delay = Duration::from_millis(100);
    loop {
        match op().await {
            Ok(v) => return Some(v),
            Err(e) => tracing::warn!(error = %e, "{what} failed; retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_order_is_the_configured_order() {
        let sel = jobq_core::config::parse_queues(&["a".into(), "b".into(), "c".into()]).unwrap();
        let order: Vec<String> = fetch_order(&sel, &mut rand::rng()).iter().map(|q| q.to_string()).collect();
        assert_eq!(order, ["a", "b", "c"]);
    }

    #[test]
    fn weighted_order_puts_each_queue_first_in_proportion_to_its_weight() {
        let sel = jobq_core::config::parse_queues(&["a=6".into(), "b=3".into(), "c=1".into()]).unwrap();
        let mut rng = rand::rng();
        let mut first = std::collections::HashMap::new();
        let n = 100_000;
        for _ in 0..n {
            let order = fetch_order(&sel, &mut rng);
            assert_eq!(order.len(), 3);
            *first.entry(order[0].to_string()).or_insert(0usize) += 1;
        }
        for (q, w) in [("a", 0.6), ("b", 0.3), ("c", 0.1)] {
            let share = first[q] as f64 / n as f64;
            assert!((share - w).abs() < 0.01, "{q}: {share}");
        }
    }
}
