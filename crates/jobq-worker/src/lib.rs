//! The jobq worker: fetches jobs from its queues' priority streams through the consumer group,
//! runs their handlers, and writes each outcome back with one script per job, pipelined.
//!
//! # Loop
//!
//! 1. Take every free slot (`concurrency` permits) and run the fetch script on each queue,
//!    in strict order or in a weighted random order, until the slots are used.
//! 2. When nothing was ready, block on XREAD for entries newer than the ones the fetch saw
//!    (no race: anything added after the fetch wakes the worker), at most `poll_interval`.
//! 3. Each job runs in its own task with its timeout. When its handler returns, the slot is
//!    free for the next job; the outcome goes to the completer, which writes outcomes in batches
//!    (one Redis round trip per batch). At most `concurrency` outcomes wait to be written: past
//!    that, fetching waits for the completer, so a slow Redis holds the worker back instead of
//!    piling up finished jobs.
//!
//! Beside the loop: the heartbeat, on a thread of its own, renews the lease of every running
//! job (and learns of cancel requests and lost leases), and of the jobs of a fetch whose reply
//! waits for a runtime thread that handlers hold; the reaper re-queues jobs whose worker
//! stopped renewing theirs, and a pub/sub listener delivers cancel requests at once. See
//! `docs/guarantees.md`.
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

#![warn(missing_docs)]

mod executor;
pub mod handlers;
mod job_metrics;
pub mod layers;
mod leases;
mod registry;
pub mod testing;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use jobq_core::config::{QueueSelection, Settings, WorkerSettings};
use jobq_core::job::QueueName;
use jobq_core::stream::{Broker, Fetched, RawDelivery, Received};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The `tower` this library builds on, for writing layers (`tower::Layer`, `tower::Service`).
pub use tower;

pub use registry::{BoxFuture, ContextError, Handler, HandlerError, HandlerResult, JobContext, JobService, Registry};

/// Runs jobs from Redis until SIGTERM/SIGINT.
#[derive(clap::Parser)]
#[command(version, about)]
struct Args {
    /// Settings file (TOML or YAML); environment variables override it.
    #[arg(long, env = "JOBQ_CONFIG")]
    config: Option<std::path::PathBuf>,
}

/// The whole `main` of a worker binary: parses `--config`, loads the settings (file, then
/// `JOBQ_*` variables), starts a runtime of `worker.threads` threads (`JOBQ_WORKER_THREADS`;
/// 0 = one per core), sets up logging and span export as `service`, and runs `registry` until
/// SIGTERM/SIGINT.
///
/// Once the worker has stopped it exits the process (status 0, or 1 with the error) instead
/// of returning, so code after the call does not run: a handler still running past the
/// shutdown timeout (a CPU-bound loop, a blocking call) holds a runtime thread, which dropping
/// the runtime would wait for. If the shutdown, once begun, cannot proceed (handlers hold every
/// runtime thread), the process exits `shutdown_timeout` + 19 s + 3 × `redis.timeout` after the
/// signal, which is handled on a thread of its own (still, run CPU-bound work with
/// `spawn_blocking`). Either way unfinished jobs stay pending and are reclaimed. To own the runtime and the settings, call [`run`] instead.
///
/// ```no_run
/// fn main() {
///     let mut registry = jobq_worker::Registry::new();
///     registry.register("hello", |_ctx: jobq_worker::JobContext| async { Ok(None) });
///     jobq_worker::main("my-worker", registry)
/// }
/// ```
// The examples show the `fn main` a worker binary has.
#[allow(clippy::needless_doctest_main)]
pub fn main(service: &'static str, registry: Registry) -> ! {
    main_with(service, move || async move { Ok(registry) })
}

/// [`main`] for a registry whose handlers need the runtime to be built (a database pool, an
/// HTTP client that connects at start): `setup` runs on the worker's runtime, after the
/// settings are loaded and logging is set up; an error it returns ends the process (status 1),
/// and so does SIGTERM/SIGINT while it runs (status 0).
///
/// ```no_run
/// fn main() {
///     jobq_worker::main_with("my-worker", || async {
///         // Resolved once at start: a worker that cannot reach its mail relay does not start.
///         let relay = tokio::net::lookup_host("smtp.example.com:587").await?.next();
///         let relay = relay.ok_or_else(|| anyhow::anyhow!("smtp.example.com has no address"))?;
///         let mut registry = jobq_worker::Registry::new();
///         registry.register("mail.send", move |_ctx: jobq_worker::JobContext| async move {
///             Ok(Some(serde_json::json!({ "relay": relay.to_string() })))
///         });
///         Ok(registry)
///     })
/// }
/// ```
#[allow(clippy::needless_doctest_main)]
pub fn main_with<F, Fut>(service: &'static str, setup: F) -> !
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Registry>>,
{
    if tokio::runtime::Handle::try_current().is_ok() {
        exit_with(anyhow::anyhow!(
            "jobq_worker::main builds its own runtime: call it from a plain `fn main`, not from \
             async code (to run a worker on a runtime of your own, call jobq_worker::run)"
        ));
    }
    let args = <Args as clap::Parser>::parse();
    let settings = match jobq_core::config::load(args.config.as_deref()) {
        Ok(s) => s,
        Err(e) => exit_with(e.into()),
    };
    let rt = match runtime(settings.worker.threads) {
        Ok(rt) => rt,
        Err(e) => exit_with(anyhow::Error::new(e).context("cannot start the runtime")),
    };
    let result = rt.block_on(async move {
        let telemetry = jobq_core::telemetry::init(&settings.log, service);
        let shutdown = jobq_core::shutdown::token_from_signals();
        exit_if_stuck(shutdown.clone(), settings.worker.shutdown_timeout, settings.redis.timeout);
        // A signal during the setup (a database that does not answer, say) stops the process
        // as it would stop the worker.
        let setup = tokio::select! {
            biased;
            _ = shutdown.cancelled() => None,
            r = setup() => Some(r),
        };
        let result = match setup {
            None => {
                tracing::info!("stopped before the worker started");
                Ok(())
            }
            Some(Ok(registry)) => run(settings, registry, shutdown).await,
            Some(Err(e)) => Err(e.context("worker setup failed")),
        };
        telemetry.shutdown().await;
        result
    });
    match result {
        // Not dropping the runtime: that would wait for handlers still holding its threads.
        Ok(()) => std::process::exit(0),
        Err(e) => exit_with(e),
    }
}

fn exit_with(e: anyhow::Error) -> ! {
    eprintln!("Error: {e:?}");
    std::process::exit(1)
}

/// A multi-thread runtime with `threads` worker threads, or one per core for 0 (set here, so
/// that `TOKIO_WORKER_THREADS` does not override the setting).
fn runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let threads = if threads > 0 { threads } else { std::thread::available_parallelism().map_or(1, usize::from) };
    tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()
}

/// A thread outside the runtime (whose threads handlers may hold) that ends the process once
/// a shutdown has had its time: the timeout, the grace of cancelled handlers, handing back the
/// jobs given up, the completer's last write, a fetch and the heartbeat's last call in flight
/// (a Redis timeout each) and a margin.
fn exit_if_stuck(shutdown: CancellationToken, timeout: Duration, redis_timeout: Duration) {
    let deadline = timeout
        + executor::CANCEL_GRACE
        + GIVE_UP_TIMEOUT
        + COMPLETER_GRACE
        + redis_timeout * 3
        + Duration::from_secs(2);
    std::thread::spawn(move || {
        while !shutdown.is_cancelled() {
            std::thread::sleep(Duration::from_millis(250));
        }
        std::thread::sleep(deadline);
        eprintln!(
            "jobq worker: still not stopped {} after the shutdown signal; exiting, unfinished jobs will be reclaimed",
            jobq_core::duration::format(deadline)
        );
        std::process::exit(1);
    });
}

/// How long handing back the jobs given up at shutdown may take.
const GIVE_UP_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the completer may take to write the last outcomes at shutdown.
const COMPLETER_GRACE: Duration = Duration::from_secs(10);

/// Connects to Redis, checks it, and runs a worker until `shutdown` is cancelled.
pub async fn run(settings: Settings, registry: Registry, shutdown: CancellationToken) -> anyhow::Result<()> {
    jobq_core::ops::prometheus();
    let broker = Broker::connect(&settings).await.context("invalid Redis settings")?;
    if !settings.metrics_addr.is_empty() {
        let b = broker.clone();
        let checks = vec![jobq_core::ops::check("redis", move || {
            let b = b.clone();
            async move { b.ping().await }
        })];
        let addr = settings.metrics_addr.parse().context("JOBQ_METRICS_ADDR")?;
        jobq_core::ops::serve(addr, checks, shutdown.clone()).await.context("cannot serve JOBQ_METRICS_ADDR")?;
    }
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

/// Decides how many of the free slots each queue gets in one fetch round.
///
/// Strict mode: the queues in configured order, each offered every slot still free. Weighted
/// mode: each free slot goes to a queue by smooth weighted round-robin (the state carries over
/// between rounds), so over any run of jobs the queues get their weights' share exactly, also
/// with one free slot at a time; a queue with fewer jobs than its share leaves its slots to the
/// others in the same round.
#[derive(Debug, Clone)]
pub struct QueuePlanner {
    selection: QueueSelection,
    current: Vec<i64>,
}

impl QueuePlanner {
    /// A planner for `selection`.
    pub fn new(selection: QueueSelection) -> Self {
        let current = vec![0; selection.queues.len()];
        Self { selection, current }
    }

    /// (queue, slots) to offer, in the order to fetch them. In strict mode every queue is
    /// offered all `free` slots (the fetch loop passes on what is left).
    pub fn plan(&mut self, free: usize) -> Vec<(QueueName, usize)> {
        if !self.selection.weighted {
            return self.selection.queues.iter().map(|(q, _)| (q.clone(), free)).collect();
        }
        let total: i64 = self.selection.queues.iter().map(|(_, w)| i64::from(*w)).sum();
        let mut counts = vec![0usize; self.current.len()];
        for _ in 0..free {
            for (c, (_, w)) in self.current.iter_mut().zip(&self.selection.queues) {
                *c += i64::from(*w);
            }
            let best = (0..self.current.len()).max_by_key(|&i| (self.current[i], std::cmp::Reverse(i))).unwrap_or(0);
            self.current[best] -= total;
            counts[best] += 1;
        }
        let mut plan: Vec<(usize, usize)> = counts.into_iter().enumerate().filter(|(_, n)| *n > 0).collect();
        plan.sort_by_key(|&(i, n)| (std::cmp::Reverse(n), i));
        plan.into_iter().map(|(i, n)| (self.selection.queues[i].0.clone(), n)).collect()
    }

    /// Every queue, highest weight first: where slots left over in a round go.
    pub fn fallback(&self) -> Vec<QueueName> {
        let mut q = self.selection.queues.clone();
        q.sort_by_key(|(_, w)| std::cmp::Reverse(*w));
        q.into_iter().map(|(q, _)| q).collect()
    }
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
        // A configured id gets a random suffix too: two live processes given one id would be one
        // consumer, and a fetch lost by one would hand back the jobs the other runs.
        let consumer = if settings.id.is_empty() {
            default_consumer_name()
        } else {
            format!("{}-{}", settings.id, &uuid::Uuid::new_v4().simple().to_string()[..6])
        };
        Self { broker, registry: Arc::new(registry), settings, consumer, default_timeout }
    }

    /// This worker's consumer name.
    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    /// Runs until `shutdown` is cancelled, then drains as described in the crate docs.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        // As a task of the runtime, not on the caller's thread (the one blocked in `main`, for
        // a binary): the fetch loop is woken by the Redis connection's replies, read on a
        // runtime thread, and waking a thread outside the runtime costs a futex call and a
        // context switch each time (measured: drain +9%, worker CPU per job -13%).
        match tokio::spawn(tracing::Instrument::in_current_span(self.serve(shutdown))).await {
            Ok(r) => r,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(anyhow::anyhow!("the worker task was cancelled: {e}")),
        }
    }

    async fn serve(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let queues = self.settings.queues.names();
        for q in &queues {
            // A queue whose keys Redis refuses for good (a key of another type, a user without
            // the rights) is left to the fetch loop, which passes it over and tries it again
            // every REFUSED_RETRY; the other queues start.
            let made = retry_redis("create consumer groups", &shutdown, || async {
                match self.broker.ensure_groups(q).await {
                    Err(e) if refused_for_good(&e) => Ok(Some(e)),
                    r => r.map(|()| None),
                }
            });
            match made.await {
                None => return Ok(()),
                Some(Some(e)) => {
                    tracing::error!(error = %e, queue.name = %q, "Redis refused this queue's consumer groups; the other queues start")
                }
                Some(None) => {}
            }
        }
        tracing::info!(
            consumer = %self.consumer,
            queues = ?self.settings.queues.queues.iter().map(|(q, w)| format!("{q}={w}")).collect::<Vec<_>>(),
            weighted = self.settings.queues.weighted,
            concurrency = self.settings.concurrency,
            runtime_threads = tokio::runtime::Handle::current().metrics().num_workers(),
            handlers = ?self.registry.types(),
            "worker started"
        );
        let slots = Arc::new(Semaphore::new(self.settings.concurrency));
        // A job holds one of these from its fetch until its outcome is written: `concurrency`
        // fetched or running plus at most three times that many waiting for the completer (with
        // two fetches in flight, each outcome waits for up to two `complete_many` calls ahead of
        // it; measured: a drain at 1 × 50 did 54k jobs/s with 2 × `concurrency` and 64k with 4 ×).
        let held = Arc::new(Semaphore::new(self.settings.concurrency * 4));
        let abandon = CancellationToken::new();
        // The completer's own: it stops retrying a write only once its grace has elapsed, not
        // when running jobs are given up.
        let give_up = CancellationToken::new();
        let background = CancellationToken::new();
        let running = leases::Running::default();
        let in_transit = leases::InTransit::default();
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let job_metrics = job_metrics::JobMetrics::default();
        let completer = tokio::spawn(executor::complete_loop(
            self.broker.clone(),
            done_rx,
            running.clone(),
            give_up.clone(),
            job_metrics.clone(),
        ));
        let heartbeat = leases::spawn_heartbeat(
            &self.broker,
            self.consumer.clone(),
            (running.clone(), in_transit.clone()),
            (self.settings.queues.names(), self.settings.lease, self.settings.heartbeat),
            background.clone(),
        )?;
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
            services: self.registry.build(),
            broker: self.broker.clone(),
            consumer: self.consumer.clone(),
            default_timeout: self.default_timeout,
            done: done_tx,
            abandon: abandon.clone(),
            running: running.clone(),
            metrics: job_metrics,
            in_flight: metrics::gauge!("jobq_worker_in_flight"),
            given_up: Default::default(),
            handler_ns: Default::default(),
        });
        let mut blocking = None;
        let mut backoff = Duration::from_millis(50);
        let mut planner = QueuePlanner::new(self.settings.queues.clone());
        // At most half the slots per fetch: two batches in flight, so the worker decodes and
        // completes one while Redis runs the other's script (measured: drain +10% at 50 slots).
        let max_fetch = self.settings.concurrency.div_ceil(2).max(1);
        // While the first queue (in strict order, or the only one) has a backlog, a second fetch
        // of it goes out as soon as `max_fetch` slots are free, before the reply of the one in
        // flight, so that Redis runs it while the worker turns that reply around (measured: a
        // drain at 1 × 50 +7%). Its reply is the first fetch of the next round.
        let pipelined = (!self.settings.queues.weighted || queues.len() == 1).then(|| queues[0].clone());
        let mut backlog = false;
        let mut ahead: Option<Ahead> = None;
        // The last fetch's round trip: with a backlog and handlers that take much less, a round
        // without a fetch in flight waits up to that long for `max_fetch` free slots (those of
        // the batch just started), so that its fetch is full and the next can go ahead again.
        let mut round_trip = Duration::ZERO;
        // Per queue, the last entries received; and the queues whose last fetch failed, whose
        // reply may have been lost with jobs it started: those are handed back before the
        // queue is fetched again (and once no fetch is in flight: a fetch sent after the failed
        // one may have started newer jobs, which are this worker's to run).
        let mut received: HashMap<QueueName, Received> = HashMap::new();
        let mut lost: Vec<QueueName> = Vec::new();
        // Queues whose fetch or hand-back Redis refused for good (a user without the rights to
        // their keys, say), with when to try them again: until then the other queues go on.
        let mut refused: HashMap<QueueName, std::time::Instant> = HashMap::new();
        let start = |q: &QueueName,
                     jobs: Vec<RawDelivery>,
                     permits: &mut Vec<executor::Permits>,
                     received: &mut HashMap<QueueName, Received>,
                     transit: Option<leases::Transit>|
         -> anyhow::Result<usize> {
            if jobs.is_empty() {
                return Ok(0);
            }
            received.entry(q.clone()).or_default().note(&jobs);
            let batch = with_permits(jobs, permits)?;
            let n = batch.len();
            // One task decodes the batch and starts its jobs, so that the fetch loop asks for
            // the next batch at once (measured: drain +4-12%). The fetch is in transit until
            // then.
            let (jobs, exec) = (tracker.clone(), exec.clone());
            tracker.spawn(async move {
                start_jobs(batch, &jobs, &exec);
                drop(transit);
            });
            Ok(n)
        };
        // A fetch sent ahead once its task is over: what it received is noted; one that failed
        // is handed back.
        let landed = |(q, started): (QueueName, Option<Started>),
                      received: &mut HashMap<QueueName, Received>,
                      lost: &mut Vec<QueueName>| match started {
            Some(s) => received.entry(q).or_default().merge(s.received),
            None if !lost.contains(&q) => lost.push(q),
            None => {}
        };
        'outer: loop {
            if !lost.is_empty() {
                if let Some(a) = ahead.take() {
                    landed(a.land().await, &mut received, &mut lost);
                }
            }
            if let Err(e) = self.disown_lost(&mut lost, &received, &mut refused).await {
                metrics::counter!("jobq_redis_errors_total", "component" => "worker").increment(1);
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "handing back the jobs of a failed fetch failed");
                tokio::select! {
                    _ = shutdown.cancelled() => break 'outer,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue 'outer;
            }
            let mut started = 0usize;
            let mut paused = 0usize;
            let mut last_ids = Vec::new();
            let mut again = false;
            // The fetch sent ahead is this round's first; the round ends with it (the next
            // one, a full round, decides whether to wait for work).
            let mut adopted = if shutdown.is_cancelled() { None } else { ahead.take() };
            let (mut permits, plan) = match &adopted {
                Some(a) => {
                    again = true;
                    (Vec::new(), vec![(a.queue.clone(), a.want)])
                }
                None => {
                    let mut permits = Vec::new();
                    if backlog
                        && pipelined.is_some()
                        && Duration::from_nanos(exec.handler_ns.load(std::sync::atomic::Ordering::Relaxed)) * 4
                            < round_trip
                    {
                        let full = tokio::select! {
                            biased;
                            _ = shutdown.cancelled() => break,
                            p = tokio::time::timeout(round_trip, take_permits(&slots, &held, max_fetch)) => p,
                        };
                        if let Ok(full) = full {
                            permits = full?;
                        }
                    }
                    if permits.is_empty() {
                        let first = tokio::select! {
                            biased;
                            _ = shutdown.cancelled() => break,
                            p = slots.clone().acquire_owned() => p.context("slots closed")?,
                        };
                        let first_held = tokio::select! {
                            biased;
                            _ = shutdown.cancelled() => break,
                            p = held.clone().acquire_owned() => p.context("slots closed")?,
                        };
                        permits.push(executor::Permits { run: first, held: first_held });
                        while let Ok(run) = slots.clone().try_acquire_owned() {
                            let Ok(held) = held.clone().try_acquire_owned() else { break };
                            permits.push(executor::Permits { run, held });
                        }
                    }
                    let mut plan = planner.plan(permits.len());
                    if self.settings.queues.weighted {
                        // Slots a queue could not use go to the others, highest weight first.
                        plan.extend(planner.fallback().into_iter().map(|q| (q, usize::MAX)));
                    }
                    (permits, plan)
                }
            };
            let mut empty: Vec<&QueueName> = Vec::new();
            for (q, share) in &plan {
                if (permits.is_empty() && adopted.is_none()) || shutdown.is_cancelled() {
                    break;
                }
                // Passed over: a queue Redis refuses, or whose failed fetch is not handed back.
                if empty.contains(&q) || (adopted.is_none() && (refused_now(&mut refused, q) || lost.contains(q))) {
                    continue;
                }
                let adopt = adopted.take();
                let want = adopt.as_ref().map_or(permits.len().min(*share).min(max_fetch), |a| a.want);
                let sent = adopt.as_ref().map_or_else(std::time::Instant::now, |a| a.sent);
                // A fetch sent ahead is in transit in its own task.
                let transit = adopt.is_none().then(|| in_transit.begin());
                let reply: FetchReply<'_> = match adopt {
                    Some(a) => Box::pin(async move { a.reply.await.unwrap_or_else(|e| Err(fetch_task_failed(e))) }),
                    None => Box::pin(async {
                        let fetched = self.broker.fetch_raw(q, &self.consumer, want).await?;
                        Ok(Fetch::Jobs(fetched))
                    }),
                };
                let result = if backlog && ahead.is_none() && pipelined.as_ref() == Some(q) {
                    let mut reply = reply;
                    tokio::select! {
                        biased;
                        r = &mut reply => r,
                        // Stopping: nothing more is fetched.
                        _ = shutdown.cancelled() => reply.await,
                        p = take_permits(&slots, &held, max_fetch) => {
                            let p = p?;
                            ahead = Some(self.fetch_ahead(q, p, &tracker, &exec, in_transit.begin()));
                            reply.await
                        }
                    }
                } else {
                    reply.await
                };
                round_trip = sent.elapsed();
                match result {
                    Ok(fetched) => {
                        if refused.remove(q).is_some() {
                            tracing::info!(queue.name = %q, "Redis takes this queue's keys again");
                        }
                        let (n, fetched) = match fetched {
                            Fetch::Jobs(mut f) => {
                                (start(q, std::mem::take(&mut f.jobs), &mut permits, &mut received, transit)?, f)
                            }
                            Fetch::Started(s) => {
                                received.entry(q.clone()).or_default().merge(s.received);
                                (s.n, s.rest)
                            }
                        };
                        if pipelined.as_ref() == Some(q) {
                            backlog = n == want;
                        }
                        // Strict order: a queue that filled its fetch may have more ready jobs,
                        // so the slots left in this round are not offered to the queues after it.
                        let more = (n == want || fetched.more) && !self.settings.queues.weighted;
                        again |= fetched.more;
                        if n < want && !fetched.more {
                            empty.push(q);
                            paused += usize::from(fetched.paused);
                            last_ids.extend(fetched.last_ids);
                        }
                        started += n;
                        if more {
                            break;
                        }
                    }
                    Err(e) => {
                        backlog = false;
                        if !lost.contains(q) {
                            lost.push(q.clone());
                        }
                        // Not left waiting through a backoff: its jobs may be started already.
                        if let Some(a) = ahead.take() {
                            landed(a.land().await, &mut received, &mut lost);
                        }
                        metrics::counter!("jobq_redis_errors_total", "component" => "worker").increment(1);
                        if refused_for_good(&e) {
                            // This queue alone: handed back (if its fetch started anything) once
                            // Redis takes it again, and passed over until then; the round goes
                            // on with the next queue and the same slots.
                            refuse(&mut refused, q, &e);
                            empty.push(q);
                            continue;
                        }
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
            if let Some(a) = adopted.take() {
                // Shutdown came first: handled after the loop.
                ahead = Some(a);
            }
            backoff = Duration::from_millis(50);
            drop(permits);
            if started > 0 || again || ahead.is_some() {
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
                biased;
                _ = shutdown.cancelled() => break,
                r = wait => r,
            };
            if let Err(e) = waited {
                tracing::warn!(error = %e, "waiting for work failed; reconnecting");
                blocking = None;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        if let Some(a) = ahead.take() {
            // A fetch sent ahead starts its jobs itself; one that failed is handed back.
            landed(a.land().await, &mut received, &mut lost);
        }
        if !lost.is_empty() {
            // Best effort: what is not handed back now is reclaimed once its lease lapses.
            match tokio::time::timeout(GIVE_UP_TIMEOUT, self.disown_lost(&mut lost, &received, &mut HashMap::new()))
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "could not hand back the jobs of a failed fetch; they are reclaimed once their lease lapses")
                }
                Err(_) => tracing::warn!(
                    "handing back the jobs of a failed fetch timed out; they are reclaimed once their lease lapses"
                ),
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
            let given_up = std::mem::take(&mut *exec.given_up.lock().unwrap_or_else(|e| e.into_inner()));
            if !given_up.is_empty() {
                // Best effort: not handed back, they are reclaimed a lease later, as after a crash.
                match tokio::time::timeout(GIVE_UP_TIMEOUT, self.broker.give_up(&self.consumer, &given_up)).await {
                    Ok(Ok(n)) => tracing::info!(jobs = n, "handed the given-up jobs back for the next reaper pass"),
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "could not hand the given-up jobs back; they are reclaimed once their lease lapses")
                    }
                    Err(_) => tracing::warn!(
                        "handing the given-up jobs back timed out; they are reclaimed once their lease lapses"
                    ),
                }
            }
        }
        drop(exec);
        // The completer ends once every outcome is written (or Redis stays down too long).
        let mut completer = completer;
        if tokio::time::timeout(COMPLETER_GRACE, &mut completer).await.is_err() {
            tracing::warn!("could not write every outcome in time; those jobs stay pending and will be reclaimed");
            give_up.cancel();
            let _ = completer.await;
        }
        background.cancel();
        let _ = tokio::join!(listener, reaper, tokio::task::spawn_blocking(move || heartbeat.join()));
        tracing::info!("worker stopped");
        Ok(())
    }

    /// Sends a fetch of `queue` for `permits.len()` jobs in a task of its own, which starts
    /// the jobs of the reply itself (one task between the reply and the jobs, as for the
    /// batches of the fetch loop).
    fn fetch_ahead(
        &self,
        queue: &QueueName,
        permits: Vec<executor::Permits>,
        tracker: &TaskTracker,
        exec: &Arc<executor::Executor>,
        transit: leases::Transit,
    ) -> Ahead {
        let (broker, consumer, q, want) = (self.broker.clone(), self.consumer.clone(), queue.clone(), permits.len());
        let (jobs, exec) = (tracker.clone(), exec.clone());
        let reply = tracker.spawn(async move {
            let mut fetched = broker.fetch_raw(&q, &consumer, want).await?;
            let mut received = Received::default();
            received.note(&fetched.jobs);
            let mut permits = permits;
            let batch = with_permits(std::mem::take(&mut fetched.jobs), &mut permits)
                .map_err(|e| jobq_core::Error::Protocol(e.to_string()))?;
            let n = batch.len();
            start_jobs(batch, &jobs, &exec);
            drop(transit);
            Ok(Fetch::Started(Started { n, received, rest: fetched }))
        });
        Ahead { queue: queue.clone(), want, reply, sent: std::time::Instant::now() }
    }

    /// Hands back, queue by queue, the jobs that failed fetches may have started without their
    /// reply reaching this worker ([`Broker::disown`]); a queue leaves `lost` once done.
    /// Hands back the jobs of each queue in `lost` (see the fetch loop). A queue whose
    /// hand-back Redis refuses for good stays in `lost`, passed over until `refused` says to try
    /// again, and does not hold the others back; any other error is returned.
    async fn disown_lost(
        &self,
        lost: &mut Vec<QueueName>,
        received: &HashMap<QueueName, Received>,
        refused: &mut HashMap<QueueName, std::time::Instant>,
    ) -> anyhow::Result<()> {
        let mut kept = Vec::new();
        while let Some(q) = lost.pop() {
            if refused_now(refused, &q) {
                kept.push(q);
                continue;
            }
            let none = Received::default();
            match self.broker.disown(&q, &self.consumer, received.get(&q).unwrap_or(&none)).await {
                Ok(n) if n > 0 => {
                    metrics::counter!("jobq_worker_lost_fetch_jobs_total").increment(n);
                    tracing::warn!(queue.name = %q, jobs = n, "a fetch reply was lost: handed its jobs back for the next reaper pass");
                }
                Ok(_) => {}
                Err(e) if refused_for_good(&e) => {
                    refuse(refused, &q, &e);
                    kept.push(q);
                }
                Err(e) => {
                    lost.push(q);
                    lost.extend(kept);
                    return Err(e.into());
                }
            }
        }
        *lost = kept;
        Ok(())
    }
}

/// A fetch sent before the reply of the one in flight; its task holds the slots it asked for.
struct Ahead {
    queue: QueueName,
    want: usize,
    reply: tokio::task::JoinHandle<jobq_core::Result<Fetch>>,
    sent: std::time::Instant,
}

impl Ahead {
    /// Waits for its task (a fetch ends within the Redis timeout; the bound is a margin): what
    /// it started, or `None` if the fetch failed.
    async fn land(self) -> (QueueName, Option<Started>) {
        let started = match tokio::time::timeout(GIVE_UP_TIMEOUT * 30, self.reply).await {
            Ok(Ok(Ok(Fetch::Started(s)))) => Some(s),
            _ => None,
        };
        (self.queue, started)
    }
}

/// A fetch's reply: its jobs still to start, or started already by the task that sent it.
enum Fetch {
    Jobs(Fetched<RawDelivery>),
    Started(Started),
}

/// What a fetch sent ahead started: how many jobs, the entries received, and the rest of the
/// reply (its `jobs` taken).
struct Started {
    n: usize,
    received: Received,
    rest: Fetched<RawDelivery>,
}

type FetchReply<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = jobq_core::Result<Fetch>> + Send + 'a>>;

/// Pairs each fetched job with one of `permits` (the fetch asked for at most that many).
fn with_permits(
    jobs: Vec<RawDelivery>,
    permits: &mut Vec<executor::Permits>,
) -> anyhow::Result<Vec<(RawDelivery, executor::Permits)>> {
    jobs.into_iter().map(|raw| Ok((raw, permits.pop().context("fetched more jobs than free slots")?))).collect()
}

/// Decodes each job of a fetched batch and spawns its attempt.
fn start_jobs(batch: Vec<(RawDelivery, executor::Permits)>, jobs: &TaskTracker, exec: &Arc<executor::Executor>) {
    for (raw, permits) in batch {
        let id = raw.id;
        match raw.decode() {
            Ok(delivery) => {
                // Boxed: the task cell and its moves hold a pointer, not the whole attempt's
                // state.
                jobs.spawn(Box::pin(exec.clone().execute(delivery, permits)));
            }
            Err(e) => exec.undecodable(id, e),
        }
    }
}

fn fetch_task_failed(e: tokio::task::JoinError) -> jobq_core::Error {
    jobq_core::Error::Protocol(format!("fetch task failed: {e}"))
}

/// `n` free slots, each with its place among the outcomes to write, taken at once (one wake-up,
/// not one per slot); cancel-safe (a partial take is given back when dropped).
async fn take_permits(
    slots: &Arc<Semaphore>,
    held: &Arc<Semaphore>,
    n: usize,
) -> anyhow::Result<Vec<executor::Permits>> {
    let count = u32::try_from(n).context("too many slots")?;
    let mut run = slots.clone().acquire_many_owned(count).await.context("slots closed")?;
    let mut held = held.clone().acquire_many_owned(count).await.context("slots closed")?;
    let mut permits = Vec::with_capacity(n);
    for _ in 1..n {
        let (Some(run), Some(held)) = (run.split(1), held.split(1)) else { break };
        permits.push(executor::Permits { run, held });
    }
    permits.push(executor::Permits { run, held });
    Ok(permits)
}

/// How long a queue whose keys Redis refuses for good is passed over before it is tried again.
const REFUSED_RETRY: Duration = Duration::from_secs(10);

/// Notes that Redis refused `q` for good: it is passed over for [`REFUSED_RETRY`]; logged as an
/// error when it was not refused already.
fn refuse(refused: &mut HashMap<QueueName, std::time::Instant>, q: &QueueName, e: &jobq_core::Error) {
    if refused.insert(q.clone(), std::time::Instant::now() + REFUSED_RETRY).is_none() {
        tracing::error!(error = %e, queue.name = %q, retry_in_s = REFUSED_RETRY.as_secs(), "Redis refuses this queue's keys; the other queues go on");
    }
}

/// Whether `q` is still passed over as refused; once its time is up it is tried again (and
/// refused again at once if Redis still refuses it, without a new error in the log).
fn refused_now(refused: &mut HashMap<QueueName, std::time::Instant>, q: &QueueName) -> bool {
    match refused.get_mut(q) {
        Some(until) if std::time::Instant::now() < *until => true,
        Some(until) => {
            // Tried now; `refuse` pushes the time on again if it fails.
            *until = std::time::Instant::now();
            false
        }
        None => false,
    }
}

/// Retries a Redis operation with backoff until it succeeds or shutdown is requested.
/// A Redis error that the same call would meet again (a key of another type, a refused
/// command), as opposed to an outage.
fn refused_for_good(e: &jobq_core::Error) -> bool {
    matches!(e, jobq_core::Error::Redis(_)) && !e.is_transient_redis()
}

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
    fn the_runtime_has_the_configured_threads_or_one_per_core() {
        assert_eq!(runtime(1).unwrap().metrics().num_workers(), 1);
        assert_eq!(runtime(3).unwrap().metrics().num_workers(), 3);
        let cores = std::thread::available_parallelism().map(usize::from).unwrap_or(1);
        assert_eq!(runtime(0).unwrap().metrics().num_workers(), cores);
    }

    fn planner(spec: &[&str]) -> QueuePlanner {
        let names: Vec<String> = spec.iter().map(|s| s.to_string()).collect();
        QueuePlanner::new(jobq_core::config::parse_queues(&names).unwrap())
    }

    #[test]
    fn strict_mode_offers_every_slot_to_each_queue_in_order() {
        let plan = planner(&["a", "b", "c"]).plan(4);
        let got: Vec<(String, usize)> = plan.into_iter().map(|(q, n)| (q.to_string(), n)).collect();
        assert_eq!(got, [("a".into(), 4), ("b".into(), 4), ("c".into(), 4)]);
    }

    #[test]
    fn weighted_mode_shares_slots_exactly_by_weight_one_slot_at_a_time_or_many() {
        for free in [1, 3, 10, 50] {
            let mut p = planner(&["critical=6", "default=3", "low=1"]);
            let mut totals = std::collections::HashMap::new();
            for _ in 0..100 {
                for (q, n) in p.plan(free) {
                    *totals.entry(q.to_string()).or_insert(0usize) += n;
                }
            }
            let all = 100 * free;
            assert_eq!(totals["critical"], all * 6 / 10, "free={free}");
            assert_eq!(totals["default"], all * 3 / 10, "free={free}");
            assert_eq!(totals["low"], all / 10, "free={free}");
        }
        let p = planner(&["a=1", "b=5"]);
        assert_eq!(p.fallback().iter().map(|q| q.to_string()).collect::<Vec<_>>(), ["b", "a"]);
    }
}
