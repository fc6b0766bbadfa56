//! Handlers by job type, and the middleware around them: the one table a worker consults to
//! run a job.
//!
//! A handler is a [`tower::Service`] from [`JobContext`] to an optional result value. Plain
//! async functions and typed handlers are turned into services when registered; layers wrap
//! them per type ([`Registry::layer_for`]) or around every type ([`Registry::layer`]).
//!
//! ```
//! use std::time::Duration;
//! use jobq_worker::{layers, HandlerError, JobContext, Registry};
//! #[derive(serde::Deserialize)]
//! struct Email { to: String }
//! let mut registry = Registry::new();
//! registry
//!     .register_typed("email.send", |email: Email, _ctx: JobContext| async move {
//!         if email.to.is_empty() {
//!             return Err(HandlerError::fail(anyhow::anyhow!("no recipient")));
//!         }
//!         Ok(serde_json::json!({"sent_to": email.to}))
//!     })
//!     .layer_for("email.send", layers::Timeout::new(Duration::from_secs(10)))
//!     .layer(layers::CircuitBreaker::new(5, Duration::from_secs(30)));
//! assert_eq!(registry.types(), ["email.send"]);
//! ```

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use jobq_core::job::{JobId, NewJob, QueueName};
use jobq_core::stream::{Broker, Lease, LeaseStatus};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tower::util::BoxCloneSyncService;
use tower::Layer;

/// A boxed, sendable future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What a handler returns: an optional result value (stored on the job) or an error.
pub type HandlerResult = Result<Option<Value>, HandlerError>;

/// A handler with its layers, as the worker calls it.
pub type JobService = BoxCloneSyncService<JobContext, Option<Value>, HandlerError>;

/// A failed or held-back attempt, saying what the queue should do next.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandlerError {
    /// Counts an attempt; retried after the job's backoff while attempts remain.
    #[error("{0:#}")]
    Retry(anyhow::Error),
    /// Counts an attempt; retried after this delay (instead of the backoff) while attempts remain.
    #[error("{0:#}")]
    RetryAfter(anyhow::Error, Duration),
    /// No further attempts: the job goes to the dead-letter queue now.
    #[error("{0:#}")]
    Fail(anyhow::Error),
    /// The attempt did not run (a limit or an open circuit held it back): the job waits for the
    /// delay and starts again without spending an attempt.
    #[error("held back: {0}")]
    Held(String, Duration),
}

impl HandlerError {
    /// A retryable error.
    pub fn retry(e: impl Into<anyhow::Error>) -> Self {
        Self::Retry(e.into())
    }

    /// A retryable error that asks for the next attempt after `delay`.
    pub fn retry_after(e: impl Into<anyhow::Error>, delay: Duration) -> Self {
        Self::RetryAfter(e.into(), delay)
    }

    /// A fatal error: no retry.
    pub fn fail(e: impl Into<anyhow::Error>) -> Self {
        Self::Fail(e.into())
    }

    /// Holds the job back for `delay` without spending an attempt.
    pub fn held(why: impl Into<String>, delay: Duration) -> Self {
        Self::Held(why.into(), delay)
    }

    /// Whether the handler ran and failed (as opposed to being held back).
    pub fn is_failure(&self) -> bool {
        !matches!(self, Self::Held(..))
    }
}

impl From<anyhow::Error> for HandlerError {
    /// Errors propagated with `?` are retryable.
    fn from(e: anyhow::Error) -> Self {
        Self::Retry(e)
    }
}

/// The worker side of a running attempt: its lease, and the broker to act through.
#[derive(Debug)]
pub(crate) struct Attached {
    pub(crate) broker: Broker,
    pub(crate) consumer: String,
    pub(crate) lease: Lease,
}

/// Everything a handler learns about the attempt it runs, and what it can do during it.
///
/// ```
/// use jobq_worker::{HandlerError, JobContext};
/// /// Imports rows in chunks; a retried attempt resumes after the last saved chunk.
/// async fn import(rows: Vec<String>, mut ctx: JobContext) -> Result<usize, HandlerError> {
///     let mut done: usize = ctx.last_checkpoint().unwrap_or(0);
///     for chunk in rows[done..].chunks(100) {
///         if ctx.cancel.is_cancelled() {
///             return Err(HandlerError::retry(anyhow::anyhow!("cancelled at row {done}")));
///         }
///         done += chunk.len(); // ... write the chunk somewhere ...
///         ctx.checkpoint(done).await?;
///         ctx.progress(100.0 * done as f32 / rows.len() as f32, format!("{done} rows")).await?;
///     }
///     Ok(done)
/// }
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let ctx = JobContext::detached("import", serde_json::Value::Null).with_checkpoint(serde_json::json!(100));
/// assert_eq!(import(vec!["row".to_owned(); 250], ctx).await.unwrap(), 250);
/// # });
/// ```
#[derive(Debug, Clone)]
pub struct JobContext {
    /// Job id.
    pub id: JobId,
    /// Job type.
    pub kind: String,
    /// Queue.
    pub queue: QueueName,
    /// Attempt number in the current run, from 1.
    pub attempt: u32,
    /// Attempts over every run of the job (DLQ retries start a new run).
    pub attempts_total: u32,
    /// Attempt budget of the run.
    pub max_attempts: u32,
    /// Run number (1, +1 per DLQ retry).
    pub run: u32,
    /// Input.
    pub payload: Value,
    /// String map from the enqueuer (carries the trace context).
    pub metadata: BTreeMap<String, String>,
    /// Partition key given at enqueue, if any.
    pub partition_key: Option<String>,
    /// The jobs this one waited for (a batch callback finds the batch here).
    pub depends_on: Vec<JobId>,
    /// Cancelled when the attempt must stop: a cancel request, a lost lease, or the end of the
    /// shutdown grace. A handler that sees it should return soon.
    pub cancel: CancellationToken,
    checkpoint: Option<Value>,
    attached: Option<Arc<Attached>>,
}

/// Errors of the context's calls to Redis.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    /// Another worker owns the job now (this attempt's lease lapsed) or it finished.
    #[error("the lease of this attempt is lost: another worker owns the job now")]
    LeaseLost,
    /// Redis failed.
    #[error(transparent)]
    Broker(#[from] jobq_core::Error),
    /// A value did not serialize.
    #[error("value does not serialize: {0}")]
    Json(#[from] serde_json::Error),
}

impl From<ContextError> for HandlerError {
    fn from(e: ContextError) -> Self {
        Self::Retry(e.into())
    }
}

impl JobContext {
    /// A context that is not attached to a worker: `heartbeat`, `progress` and `checkpoint`
    /// do nothing and `enqueue` fails. For calling a handler directly in a unit test.
    pub fn detached(kind: impl Into<String>, payload: Value) -> Self {
        Self {
            id: JobId::new(),
            kind: kind.into(),
            queue: QueueName::default_queue(),
            attempt: 1,
            attempts_total: 1,
            max_attempts: 1,
            run: 1,
            payload,
            metadata: BTreeMap::new(),
            partition_key: None,
            depends_on: Vec::new(),
            cancel: CancellationToken::new(),
            checkpoint: None,
            attached: None,
        }
    }

    /// Sets the checkpoint the attempt starts from (for [`JobContext::detached`] contexts).
    pub fn with_checkpoint(mut self, value: Value) -> Self {
        self.checkpoint = Some(value);
        self
    }

    pub(crate) fn attached(
        delivery: &jobq_core::stream::Delivery,
        cancel: CancellationToken,
        attached: Attached,
    ) -> Self {
        let env = &delivery.envelope;
        Self {
            id: env.id,
            kind: env.kind.clone(),
            queue: delivery.queue.clone(),
            attempt: delivery.attempt,
            attempts_total: delivery.attempts_total,
            max_attempts: env.max_attempts,
            run: delivery.run,
            payload: env.payload.clone(),
            metadata: env.metadata.clone(),
            partition_key: env.partition_key.clone(),
            depends_on: env.depends_on.clone(),
            cancel,
            checkpoint: delivery.checkpoint.clone(),
            attached: Some(Arc::new(attached)),
        }
    }

    /// The broker of the worker running this attempt (`None` when detached).
    pub(crate) fn broker(&self) -> Option<&Broker> {
        self.attached.as_deref().map(|a| &a.broker)
    }

    /// The checkpoint saved by an earlier attempt of this run (or this one), decoded.
    pub fn last_checkpoint<T: DeserializeOwned>(&self) -> Option<T> {
        self.checkpoint.as_ref().and_then(|v| serde_json::from_value(v.clone()).ok())
    }

    /// Renews this attempt's lease now (the worker also renews it every heartbeat period);
    /// fails with [`ContextError::LeaseLost`] when another worker owns the job.
    pub async fn heartbeat(&self) -> Result<(), ContextError> {
        let Some(a) = &self.attached else { return Ok(()) };
        match a.broker.heartbeat(&a.consumer, std::slice::from_ref(&a.lease)).await?.first() {
            Some(LeaseStatus::Lost) | None => Err(ContextError::LeaseLost),
            Some(_) => Ok(()),
        }
    }

    /// Reports progress (`percent` is clamped to 0..=100), shown as `progress` by
    /// `GET /api/v1/jobs/{id}`.
    pub async fn progress(&self, percent: f32, message: impl Into<String>) -> Result<(), ContextError> {
        let message = message.into();
        let progress = jobq_core::job::Progress {
            percent: if percent.is_nan() { 0.0 } else { percent.clamp(0.0, 100.0) },
            message: (!message.is_empty()).then_some(message),
            at: chrono::Utc::now(),
        };
        self.write("progress", serde_json::to_string(&progress)?).await
    }

    /// Saves `value` on the job: a later attempt of the same run (after a retry, a crash or a
    /// reclaim) finds it in [`JobContext::last_checkpoint`]. At most 64 KiB of JSON.
    pub async fn checkpoint(&mut self, value: impl Serialize) -> Result<(), ContextError> {
        let value = serde_json::to_value(value)?;
        let text = serde_json::to_string(&value)?;
        if text.len() > 64 * 1024 {
            return Err(ContextError::Json(serde::ser::Error::custom("checkpoint is larger than 64 KiB")));
        }
        self.write("checkpoint", text).await?;
        self.checkpoint = Some(value);
        Ok(())
    }

    async fn write(&self, field: &str, value: String) -> Result<(), ContextError> {
        let Some(a) = &self.attached else { return Ok(()) };
        if a.broker.touch(&a.lease, &[(field, value)]).await? {
            Ok(())
        } else {
            Err(ContextError::LeaseLost)
        }
    }

    /// Enqueues a follow-up job; it carries this job's trace context unless it has its own.
    pub async fn enqueue(&self, mut job: NewJob) -> Result<jobq_core::stream::Enqueued, ContextError> {
        let Some(a) = &self.attached else {
            return Err(ContextError::Broker(jobq_core::Error::Invalid("a detached context cannot enqueue".into())));
        };
        if !job.metadata.contains_key("traceparent") {
            let exported = jobq_core::telemetry::current_trace_context();
            if exported.is_empty() {
                for name in ["traceparent", "tracestate"] {
                    if let Some(v) = self.metadata.get(name) {
                        job.metadata.insert(name.to_owned(), v.clone());
                    }
                }
            } else {
                job.metadata.extend(exported);
            }
        }
        Ok(a.broker.enqueue(job).await?)
    }
}

/// A job handler. Implemented for every `Fn(JobContext) -> impl Future<Output = HandlerResult>`.
pub trait Handler: Send + Sync + 'static {
    /// Runs one attempt.
    fn call(&self, ctx: JobContext) -> BoxFuture<HandlerResult>;
}

impl<F, Fut> Handler for F
where
    F: Fn(JobContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    fn call(&self, ctx: JobContext) -> BoxFuture<HandlerResult> {
        Box::pin(self(ctx))
    }
}

/// A layer of the registry: anything that wraps a [`JobService`] into another service of the
/// same shape (every `tower::Layer` whose service is `Clone + Send + Sync`).
type BoxLayer = Arc<dyn Fn(JobService) -> JobService + Send + Sync>;

fn boxed_layer<L>(layer: L) -> BoxLayer
where
    L: Layer<JobService> + Send + Sync + 'static,
    L::Service:
        tower::Service<JobContext, Response = Option<Value>, Error = HandlerError> + Clone + Send + Sync + 'static,
    <L::Service as tower::Service<JobContext>>::Future: Send + 'static,
{
    Arc::new(move |inner| BoxCloneSyncService::new(layer.layer(inner)))
}

/// Handlers by job type, with their layers.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<String, JobService>,
    layers: Vec<BoxLayer>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("types", &self.types()).field("layers", &self.layers.len()).finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry with the built-in handlers `echo`, `noop`, `sleep` and `fail`.
    pub fn with_builtins() -> Self {
        let mut r = Self::new();
        crate::handlers::register_all(&mut r);
        r
    }

    /// Registers `handler` for `kind`, replacing an earlier one (and its per-type layers). A
    /// panic in the handler fails the attempt (retryable) and never the worker.
    pub fn register(&mut self, kind: impl Into<String>, handler: impl Handler) -> &mut Self {
        let handler: Arc<dyn Handler> = Arc::new(handler);
        let svc = tower::service_fn(move |ctx: JobContext| handler.call(ctx));
        self.register_service(kind, crate::layers::CatchPanic.layer(BoxCloneSyncService::new(svc)))
    }

    /// Registers any `tower::Service` for `kind`, replacing an earlier one.
    pub fn register_service<S>(&mut self, kind: impl Into<String>, service: S) -> &mut Self
    where
        S: tower::Service<JobContext, Response = Option<Value>, Error = HandlerError> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
    {
        self.handlers.insert(kind.into(), BoxCloneSyncService::new(service));
        self
    }

    /// Registers a handler whose payload deserializes into `P` and whose output serializes. A
    /// payload that does not deserialize fails the attempt fatally (retrying cannot fix it): the
    /// job goes to the dead-letter queue at once. A result that serializes to more than 64 KiB
    /// is stored truncated to a marker (see `docs/writing-workers.md`).
    pub fn register_typed<P, R, F, Fut>(&mut self, kind: impl Into<String>, f: F) -> &mut Self
    where
        P: DeserializeOwned + Send + 'static,
        R: Serialize + Send + 'static,
        F: Fn(P, JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, HandlerError>> + Send + 'static,
    {
        let f = Arc::new(f);
        let kind = kind.into();
        let name = kind.clone();
        self.register(kind, move |ctx: JobContext| {
            let f = f.clone();
            let name = name.clone();
            async move {
                let payload: P = serde_json::from_value(ctx.payload.clone()).map_err(|e| {
                    HandlerError::fail(anyhow::anyhow!("payload of `{name}` does not match its schema: {e}"))
                })?;
                let out = f(payload, ctx).await?;
                let value = serde_json::to_value(out)
                    .map_err(|e| HandlerError::fail(anyhow::anyhow!("result does not serialize: {e}")))?;
                Ok((!value.is_null()).then_some(value))
            }
        })
    }

    /// Wraps the handler of `kind` in `layer` (layers added later wrap earlier ones).
    ///
    /// # Panics
    ///
    /// When no handler is registered for `kind`: register first, then layer.
    pub fn layer_for<L>(&mut self, kind: &str, layer: L) -> &mut Self
    where
        L: Layer<JobService> + Send + Sync + 'static,
        L::Service:
            tower::Service<JobContext, Response = Option<Value>, Error = HandlerError> + Clone + Send + Sync + 'static,
        <L::Service as tower::Service<JobContext>>::Future: Send + 'static,
    {
        let Some(svc) = self.handlers.remove(kind) else {
            panic!("layer_for(\"{kind}\"): no handler is registered for `{kind}`; register it first");
        };
        self.handlers.insert(kind.to_owned(), boxed_layer(layer)(svc));
        self
    }

    /// Wraps every handler, also ones registered later, in `layer`. The first layer added is
    /// the outermost (as with `tower::ServiceBuilder`); per-type layers sit inside all of them.
    pub fn layer<L>(&mut self, layer: L) -> &mut Self
    where
        L: Layer<JobService> + Send + Sync + 'static,
        L::Service:
            tower::Service<JobContext, Response = Option<Value>, Error = HandlerError> + Clone + Send + Sync + 'static,
        <L::Service as tower::Service<JobContext>>::Future: Send + 'static,
    {
        self.layers.push(boxed_layer(layer));
        self
    }

    /// The service of `kind` with every layer applied.
    pub fn service(&self, kind: &str) -> Option<JobService> {
        let svc = self.handlers.get(kind)?.clone();
        Some(self.layers.iter().rev().fold(svc, |svc, layer| layer(svc)))
    }

    /// Every type's service with its layers, built once when a worker starts.
    pub(crate) fn build(&self) -> HashMap<String, JobService> {
        self.handlers.keys().filter_map(|k| Some((k.clone(), self.service(k)?))).collect()
    }

    /// Registered types, sorted.
    pub fn types(&self) -> Vec<&str> {
        let mut t: Vec<&str> = self.handlers.keys().map(String::as_str).collect();
        t.sort_unstable();
        t
    }
}
