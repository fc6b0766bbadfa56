//! Tower layers for handlers: timeout, panic catch, logging, metrics, circuit breaker, and
//! concurrency and rate limits shared by every worker through Redis.
//!
//! Add them to a [`Registry`](crate::Registry) for every type with `layer` or for one type with
//! `layer_for`. A job held back by a limit or an open circuit is not failed: it returns to the
//! scheduled set for a short delay and starts again later without spending an attempt.
//!
//! Your own layer is a function of the context and the rest of the stack, with [`from_fn`]:
//!
//! ```
//! use jobq_worker::{layers, JobContext, Registry};
//! let audit = layers::from_fn(|ctx: JobContext, next: layers::Next| async move {
//!     tracing::info!(job = %ctx.id, "starting");
//!     let result = next.run(ctx).await;
//!     tracing::info!(ok = result.is_ok(), "done");
//!     result
//! });
//! let mut registry = Registry::with_builtins();
//! registry.layer(audit);
//! ```
//!
//! Any `tower::Layer` over [`JobService`] works as well.

use std::future::Future;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use jobq_core::stream::{BreakerOp, Broker};
use rand::Rng;
use tower::{Layer, Service, ServiceExt};

use crate::registry::{BoxFuture, HandlerError, HandlerResult, JobContext, JobService};

/// The rest of the stack below a [`from_fn`] layer.
#[derive(Clone)]
pub struct Next {
    inner: JobService,
}

impl Next {
    /// Runs the inner layers and the handler.
    pub async fn run(self, ctx: JobContext) -> HandlerResult {
        self.inner.oneshot(ctx).await
    }
}

/// A layer from an async function of the context and [`Next`].
pub fn from_fn<F, Fut>(f: F) -> FromFn<F>
where
    F: Fn(JobContext, Next) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    FromFn { f }
}

/// The layer made by [`from_fn`].
#[derive(Clone)]
pub struct FromFn<F> {
    f: F,
}

impl<F, Fut> Layer<JobService> for FromFn<F>
where
    F: Fn(JobContext, Next) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    type Service = FromFnService<F>;

    fn layer(&self, inner: JobService) -> Self::Service {
        FromFnService { f: self.f.clone(), inner }
    }
}

/// The service made by a [`from_fn`] layer.
#[derive(Clone)]
pub struct FromFnService<F> {
    f: F,
    inner: JobService,
}

impl<F, Fut> Service<JobContext> for FromFnService<F>
where
    F: Fn(JobContext, Next) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    type Response = Option<serde_json::Value>;
    type Error = HandlerError;
    type Future = BoxFuture<HandlerResult>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, ctx: JobContext) -> Self::Future {
        Box::pin((self.f)(ctx, Next { inner: self.inner.clone() }))
    }
}

/// Wraps `inner` in an async function of the context and [`Next`] (how the layers below are
/// built).
fn around<F, Fut>(inner: JobService, f: F) -> JobService
where
    F: Fn(JobContext, Next) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    JobService::new(FromFnService { f, inner })
}

/// Fails the attempt (retryable) when the handler runs longer than the limit. The job's own
/// `timeout` still applies; this one is for a type whose jobs should never take longer.
#[derive(Debug, Clone, Copy)]
pub struct Timeout(Duration);

impl Timeout {
    /// A limit of `limit` per attempt.
    pub fn new(limit: Duration) -> Self {
        Self(limit)
    }
}

impl Layer<JobService> for Timeout {
    type Service = JobService;

    fn layer(&self, inner: JobService) -> JobService {
        let limit = self.0;
        around(inner, move |ctx, next| async move {
            match tokio::time::timeout(limit, next.run(ctx)).await {
                Ok(r) => r,
                Err(_) => {
                    Err(HandlerError::retry(anyhow::anyhow!("timed out after {}", jobq_core::duration::format(limit))))
                }
            }
        })
    }
}

/// Turns a panic of the handler into a retryable failure of the attempt. Every registered
/// handler already has it innermost; add it again outside layers that might panic.
#[derive(Debug, Clone, Copy, Default)]
pub struct CatchPanic;

impl Layer<JobService> for CatchPanic {
    type Service = JobService;

    fn layer(&self, inner: JobService) -> JobService {
        around(inner, |ctx, next| async move {
            match std::panic::AssertUnwindSafe(next.run(ctx)).catch_unwind().await {
                Ok(r) => r,
                Err(p) => {
                    let msg = p
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "non-string panic".into());
                    Err(HandlerError::retry(anyhow::anyhow!("handler panicked: {msg}")))
                }
            }
        })
    }
}

/// Logs the start and the end of each attempt (with its duration and outcome) inside the job's
/// span, which the worker opens with the job's id, type, queue, attempt and trace context.
#[derive(Debug, Clone, Copy, Default)]
pub struct Trace;

impl Layer<JobService> for Trace {
    type Service = JobService;

    fn layer(&self, inner: JobService) -> JobService {
        around(inner, |ctx, next| async move {
            let started = Instant::now();
            tracing::info!(payload_bytes = ctx.payload.to_string().len(), "attempt started");
            let cut = OnCutShort::new(&ctx, move |how| {
                let ms = started.elapsed().as_millis() as u64;
                tracing::warn!(duration_ms = ms, cut_short = how.label(), "attempt cut short");
            });
            let r = next.run(ctx).await;
            cut.finish();
            let ms = started.elapsed().as_millis() as u64;
            match &r {
                Ok(_) => tracing::info!(duration_ms = ms, "attempt succeeded"),
                Err(HandlerError::Held(why, _)) => tracing::info!(duration_ms = ms, held = %why, "attempt held back"),
                Err(e) => tracing::warn!(duration_ms = ms, error = %e, "attempt failed"),
            }
            r
        })
    }
}

/// Counts handler outcomes and times them: `jobq_handler_outcomes_total{type, outcome}`
/// (`ok`, `retry`, `fail`, `held`, and for an attempt the worker cut short `timeout`,
/// `cancelled` or `panic`) and `jobq_handler_duration_seconds{type}`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Metrics;

impl Layer<JobService> for Metrics {
    type Service = JobService;

    fn layer(&self, inner: JobService) -> JobService {
        around(inner, |ctx, next| async move {
            let kind = jobq_core::ops::type_label(&ctx.kind);
            let started = Instant::now();
            let cut = OnCutShort::new(&ctx, {
                let kind = kind.clone();
                move |how| handler_outcome(kind, how.label(), started)
            });
            let r = next.run(ctx).await;
            cut.finish();
            let outcome = match &r {
                Ok(_) => "ok",
                Err(HandlerError::Held(..)) => "held",
                Err(HandlerError::Fail(_)) => "fail",
                Err(_) => "retry",
            };
            handler_outcome(kind, outcome, started);
            r
        })
    }
}

fn handler_outcome(kind: String, outcome: &'static str, started: Instant) {
    metrics::histogram!("jobq_handler_duration_seconds", "type" => kind.clone())
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("jobq_handler_outcomes_total", "type" => kind, "outcome" => outcome).increment(1);
}

/// How an attempt ended when the code of a layer after its handler never ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CutShort {
    /// Aborted past its timeout.
    TimedOut,
    /// Aborted after a cancel (on request, a lost lease, shutdown) and its grace period.
    Cancelled,
    /// A panic of a layer outside the handler's own [`CatchPanic`] unwound through it.
    Panicked,
}

impl CutShort {
    fn label(self) -> &'static str {
        match self {
            Self::TimedOut => "timeout",
            Self::Cancelled => "cancelled",
            Self::Panicked => "panic",
        }
    }
}

/// Calls `on_cut` if dropped before [`OnCutShort::finish`]: the worker aborts a handler past
/// its timeout or a cancel's grace period, and then a layer's code after the handler never
/// runs. A layer that holds something across the handler, or records its end, keeps one.
struct OnCutShort<F: FnOnce(CutShort)> {
    on_cut: Option<F>,
    cancel: tokio_util::sync::CancellationToken,
}

impl<F: FnOnce(CutShort)> OnCutShort<F> {
    fn new(ctx: &JobContext, on_cut: F) -> Self {
        Self { on_cut: Some(on_cut), cancel: ctx.cancel.clone() }
    }

    /// The layer's own code runs from here: nothing to do on drop.
    fn finish(mut self) {
        self.on_cut = None;
    }
}

impl<F: FnOnce(CutShort)> Drop for OnCutShort<F> {
    fn drop(&mut self) {
        let Some(on_cut) = self.on_cut.take() else { return };
        on_cut(if std::thread::panicking() {
            CutShort::Panicked
        } else if self.cancel.is_cancelled() {
            CutShort::Cancelled
        } else {
            CutShort::TimedOut
        });
    }
}

/// Runs `task` on the current runtime (from a drop, where nothing can be awaited).
/// Stops a concurrency slot's renewal task and waits until it has: a renewal it was sending
/// then reaches Redis before the slot's release, never after it (where it would take the slot
/// back for a whole TTL).
async fn stop_renewal(renewal: &std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>) {
    let task = renewal.lock().ok().and_then(|mut t| t.take());
    if let Some(task) = task {
        task.abort();
        let _ = task.await;
    }
}

fn spawn_detached(task: impl Future<Output = ()> + Send + 'static) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(task);
    }
}

/// A circuit breaker per job type, shared by every worker process on the namespace (state in
/// Redis): after `threshold` consecutive retryable failures of a type, its jobs are held back
/// (not failed, no attempt spent) for `open_for`; then one probe job runs (half-open): success
/// closes the circuit, failure opens it again. Fatal failures (`HandlerError::Fail`: bad input)
/// do not count. A context without a worker (`JobContext::detached`) passes through.
#[derive(Debug, Clone, Copy)]
pub struct CircuitBreaker {
    threshold: u32,
    open_for: Duration,
}

impl CircuitBreaker {
    /// Opens after `threshold` consecutive failures, for `open_for`.
    pub fn new(threshold: u32, open_for: Duration) -> Self {
        Self { threshold: threshold.max(1), open_for: open_for.max(Duration::from_millis(1)) }
    }
}

impl Layer<JobService> for CircuitBreaker {
    type Service = JobService;

    fn layer(&self, inner: JobService) -> JobService {
        let cfg = *self;
        around(inner, move |ctx, next| async move {
            let Some(broker) = ctx.broker().cloned() else { return next.run(ctx).await };
            let step =
                BreakerStep { broker, name: format!("type:{}", ctx.kind), kind: ctx.kind.clone(), id: ctx.id, cfg };
            let wait = step.broker.breaker(&step.name, BreakerOp::Admit, cfg.threshold, cfg.open_for, step.id);
            let wait = wait.await.map_err(|e| unreachable_state("circuit breaker", e))?;
            if wait > 0 {
                let why = format!("circuit open for type `{}`", step.kind);
                return Err(HandlerError::held(why, Duration::from_millis(wait)));
            }
            // Cut short, the attempt still counts: a timeout or a panic as a failure (a hanging
            // dependency must open the circuit), a cancel as an attempt that did not run, which
            // gives a half-open probe's turn back.
            let cut = OnCutShort::new(&ctx, {
                let step = step.clone();
                move |how| {
                    let op = if how == CutShort::Cancelled { BreakerOp::Held } else { BreakerOp::Fail };
                    spawn_detached(step.record(op));
                }
            });
            let cancel = ctx.cancel.clone();
            let r = next.run(ctx).await;
            cut.finish();
            // An error after a cancel (on request, a lost lease, shutdown) is the handler
            // stopping, and a fatal error is the job's own input: neither says anything of the
            // dependency, so neither counts, and a probe gives its turn back.
            let op = match &r {
                Ok(_) => BreakerOp::Ok,
                Err(_) if cancel.is_cancelled() => BreakerOp::Held,
                Err(HandlerError::Fail(_) | HandlerError::Held(..)) => BreakerOp::Held,
                Err(_) => BreakerOp::Fail,
            };
            // Not awaited: the attempt's time limit covers this call too, and a Redis stall here
            // must not turn an outcome the handler already has into a timeout.
            spawn_detached(async move { step.record(op).await });
            r
        })
    }
}

/// What a [`CircuitBreaker`] records of one attempt of a type.
#[derive(Clone)]
struct BreakerStep {
    broker: Broker,
    name: String,
    kind: String,
    id: jobq_core::job::JobId,
    cfg: CircuitBreaker,
}

impl BreakerStep {
    async fn record(self, op: BreakerOp) {
        let (kind, cfg) = (&self.kind, self.cfg);
        match self.broker.breaker(&self.name, op, cfg.threshold, cfg.open_for, self.id).await {
            Ok(1) if op == BreakerOp::Fail => {
                tracing::warn!(job.kind = %kind, open_for = ?cfg.open_for, "circuit opened");
                metrics::counter!("jobq_circuit_opened_total", "type" => jobq_core::ops::type_label(kind)).increment(1);
            }
            Ok(1) if op == BreakerOp::Ok => tracing::info!(job.kind = %kind, "circuit closed"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "updating the circuit breaker failed"),
        }
    }
}

/// How long a held-back job waits before it is offered again: `base` plus up to `base` of jitter,
/// so held jobs do not come back in one wave.
fn jittered(base: Duration) -> Duration {
    base + base.mul_f64(rand::rng().random::<f64>())
}

#[derive(Debug, Clone, Copy)]
enum Scope {
    Type,
    Partition,
}

/// At most `limit` jobs running at once across every worker process on the namespace, per job
/// type ([`ConcurrencyLimit::per_type`]) or per partition key ([`ConcurrencyLimit::per_partition`],
/// e.g. a tenant, so one tenant cannot occupy every worker; jobs without a partition key are not
/// limited). Enforced by a semaphore in Redis whose slots expire if a worker dies; a job over
/// the limit is held back for `retry_in` (default 250 ms, jittered) without spending an attempt.
#[derive(Debug, Clone, Copy)]
pub struct ConcurrencyLimit {
    limit: u32,
    scope: Scope,
    retry_in: Duration,
    ttl: Duration,
}

impl ConcurrencyLimit {
    /// `limit` jobs of one type at once.
    pub fn per_type(limit: u32) -> Self {
        Self {
            limit: limit.max(1),
            scope: Scope::Type,
            retry_in: Duration::from_millis(250),
            ttl: Duration::from_secs(30),
        }
    }

    /// `limit` jobs of one partition key at once.
    pub fn per_partition(limit: u32) -> Self {
        Self { scope: Scope::Partition, ..Self::per_type(limit) }
    }

    /// How long a job over the limit waits before it is offered again.
    pub fn retry_in(mut self, delay: Duration) -> Self {
        self.retry_in = delay;
        self
    }

    /// How long a slot outlives a worker that stopped renewing it (renewed every third of it).
    pub fn slot_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl.max(Duration::from_millis(300));
        self
    }
}

impl Layer<JobService> for ConcurrencyLimit {
    type Service = JobService;

    fn layer(&self, inner: JobService) -> JobService {
        let cfg = *self;
        around(inner, move |ctx, next| async move {
            let name = match cfg.scope {
                Scope::Type => format!("type:{}", ctx.kind),
                Scope::Partition => match &ctx.partition_key {
                    Some(p) => format!("partition:{p}"),
                    None => return next.run(ctx).await,
                },
            };
            let Some(broker) = ctx.broker().cloned() else { return next.run(ctx).await };
            let member = format!("{}:{}", ctx.id, ctx.attempts_total);
            if !broker
                .acquire_slot(&name, &member, cfg.limit, cfg.ttl)
                .await
                .map_err(|e| unreachable_state("concurrency limit", e))?
            {
                let what = name.replace(':', " `") + "`";
                return Err(HandlerError::held(
                    format!("concurrency limit {} of {what}", cfg.limit),
                    jittered(cfg.retry_in),
                ));
            }
            let renew = {
                let (broker, name, member) = (broker.clone(), name.clone(), member.clone());
                tokio::spawn(async move {
                    let mut lost = false;
                    loop {
                        tokio::time::sleep(cfg.ttl / 3).await;
                        match broker.acquire_slot(&name, &member, cfg.limit, cfg.ttl).await {
                            Ok(held) if held || lost => lost = !held,
                            // Renewed too late (its runtime starved): the slot expired and
                            // another job took it, so more than the limit run now (counted
                            // once; later renewals take a slot again when one is free).
                            Ok(_) => {
                                lost = true;
                                metrics::counter!("jobq_worker_slots_lost_total").increment(1);
                                tracing::warn!(limit = %name, "a concurrency slot lapsed before its renewal and was taken: the limit is exceeded until a job ends");
                            }
                            Err(e) => tracing::warn!(error = %e, "renewing a concurrency slot failed"),
                        }
                    }
                })
            };
            let renewal = std::sync::Arc::new(std::sync::Mutex::new(Some(renew)));
            // Cut short, the attempt gives its slot back all the same: otherwise the renewal
            // would keep it from every later job for as long as this worker lives.
            let cut = OnCutShort::new(&ctx, {
                let (broker, name, member, renewal) = (broker.clone(), name.clone(), member.clone(), renewal.clone());
                move |_| {
                    spawn_detached(async move {
                        stop_renewal(&renewal).await;
                        give_back(&broker, &name, &member).await;
                    });
                }
            });
            let r = next.run(ctx).await;
            cut.finish();
            // Not awaited, as for the breaker: a Redis stall while the slot goes back must not
            // turn the handler's outcome into a timeout (the slot expires on its own at worst).
            spawn_detached(async move {
                stop_renewal(&renewal).await;
                give_back(&broker, &name, &member).await;
            });
            r
        })
    }
}

/// A layer whose state in Redis could not be reached (an outage that passes on its own) holds
/// the job back for about a second rather than fail it: the attempt never ran, so it spends
/// none (with `max_attempts` 1, a Redis blip would otherwise dead-letter the job), and a breaker
/// does not count it. Any other error (the layer's key of the wrong type, a refused script)
/// would come back on every try: it fails the attempt as before, so the job ends in the DLQ
/// instead of being held back for ever.
fn unreachable_state(layer: &str, e: jobq_core::Error) -> HandlerError {
    metrics::counter!("jobq_redis_errors_total", "component" => "worker").increment(1);
    if !e.is_transient_redis() {
        return HandlerError::retry(anyhow::anyhow!("{layer}: {e}"));
    }
    tracing::warn!(error = %e, layer, "a layer's state in Redis could not be reached; the job is held back");
    HandlerError::held(format!("{layer} unavailable: {e}"), jittered(Duration::from_secs(1)))
}

async fn give_back(broker: &Broker, name: &str, member: &str) {
    if let Err(e) = broker.release_slot(name, member).await {
        tracing::warn!(error = %e, "releasing a concurrency slot failed; it expires on its own");
    }
}

/// At most `per_second` job starts per second per job type, on average, across every worker
/// process on the namespace, with bursts of up to `burst` (GCRA in Redis). A job over the rate
/// reserves the next free start time and is held back until then without spending an attempt,
/// so a backlog drains at the rate, oldest reservation first.
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    per_second: f64,
    burst: u32,
}

impl RateLimit {
    /// `per_second` starts per second of each type, `burst` at once.
    pub fn per_type(per_second: f64, burst: u32) -> Self {
        Self { per_second: per_second.max(0.001), burst: burst.max(1) }
    }
}

impl Layer<JobService> for RateLimit {
    type Service = JobService;

    fn layer(&self, inner: JobService) -> JobService {
        let cfg = *self;
        around(inner, move |ctx, next| async move {
            let Some(broker) = ctx.broker().cloned() else { return next.run(ctx).await };
            let name = format!("type:{}", ctx.kind);
            let member = ctx.id.to_string();
            match broker
                .rate_take(&name, &member, cfg.per_second, cfg.burst)
                .await
                .map_err(|e| unreachable_state("rate limit", e))?
            {
                None => next.run(ctx).await,
                Some(wait) => {
                    Err(HandlerError::held(format!("rate limit {}/s of type `{}`", cfg.per_second, ctx.kind), wait))
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redis_outage_in_a_layer_holds_the_job_and_a_lasting_error_fails_it() {
        let io = redis::RedisError::from(std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused"));
        match unreachable_state("rate limit", jobq_core::Error::Redis(io)) {
            HandlerError::Held(why, after) => {
                assert!(why.starts_with("rate limit unavailable"), "{why}");
                assert!(after >= Duration::from_secs(1) && after <= Duration::from_secs(2));
            }
            other => panic!("held expected, got {other:?}"),
        }
        let wrong = redis::RedisError::from((redis::ErrorKind::UnexpectedReturnType, "WRONGTYPE"));
        let e = unreachable_state("rate limit", jobq_core::Error::Redis(wrong));
        assert!(matches!(e, HandlerError::Retry(_)), "{e:?}");
    }

    fn service(f: impl Fn(JobContext) -> HandlerResult + Clone + Send + Sync + 'static) -> JobService {
        JobService::new(tower::service_fn(move |ctx: JobContext| {
            let f = f.clone();
            async move { f(ctx) }
        }))
    }

    async fn call(svc: &JobService) -> HandlerResult {
        svc.clone().oneshot(JobContext::detached("t", serde_json::Value::Null)).await
    }

    #[tokio::test]
    async fn timeout_turns_a_slow_attempt_into_a_retryable_failure() {
        let slow = JobService::new(tower::service_fn(|_ctx: JobContext| async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok(None)
        }));
        let svc = Timeout::new(Duration::from_millis(20)).layer(slow);
        let err = call(&svc).await.unwrap_err();
        assert!(matches!(err, HandlerError::Retry(_)) && err.to_string().contains("timed out after 20ms"), "{err}");
    }

    #[tokio::test]
    async fn catch_panic_turns_a_panic_into_a_retryable_failure() {
        let svc = CatchPanic.layer(service(|_| panic!("boom")));
        let err = call(&svc).await.unwrap_err();
        assert!(matches!(err, HandlerError::Retry(_)) && err.to_string().contains("handler panicked: boom"), "{err}");
    }

    #[tokio::test]
    async fn shared_layers_let_detached_contexts_through() {
        let svc = ConcurrencyLimit::per_type(1).layer(RateLimit::per_type(1.0, 1).layer(service(|_| Ok(None))));
        let svc = CircuitBreaker::new(1, Duration::from_secs(60)).layer(svc);
        assert!(call(&svc).await.is_ok());
        assert!(call(&svc).await.is_ok());
    }

    #[tokio::test]
    async fn trace_and_metrics_pass_every_outcome_through() {
        for make in [|| Ok(Some(serde_json::json!(1))), || Err(HandlerError::held("busy", Duration::from_millis(5)))] {
            let svc = Trace.layer(Metrics.layer(service(move |_| make())));
            let expected = format!("{:?}", make());
            assert_eq!(format!("{:?}", call(&svc).await), expected);
        }
    }
}
