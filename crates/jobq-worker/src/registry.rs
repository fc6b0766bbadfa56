//! Handlers by job type: the one list a worker consults to run a job.
//!
//! ```
//! use jobq_worker::{HandlerError, JobContext, Registry};
//! #[derive(serde::Deserialize)]
//! struct Email { to: String }
//! let mut registry = Registry::new();
//! registry.register_typed("email.send", |email: Email, _ctx: JobContext| async move {
//!     if email.to.is_empty() {
//!         return Err(HandlerError::fail(anyhow::anyhow!("no recipient")));
//!     }
//!     Ok(serde_json::json!({"sent_to": email.to}))
//! });
//! assert!(registry.get("email.send").is_some());
//! ```

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use jobq_core::job::{JobId, QueueName};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// A boxed, sendable future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What a handler returns: an optional result value (stored on the job) or an error.
pub type HandlerResult = Result<Option<Value>, HandlerError>;

/// A failed attempt, saying what the queue should do next.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Counts an attempt; retried after the job's backoff while attempts remain.
    #[error("{0:#}")]
    Retry(anyhow::Error),
    /// No further attempts: the job goes to the dead-letter queue now.
    #[error("{0:#}")]
    Fail(anyhow::Error),
}

impl HandlerError {
    /// A retryable error.
    pub fn retry(e: impl Into<anyhow::Error>) -> Self {
        Self::Retry(e.into())
    }

    /// A fatal error.
    pub fn fail(e: impl Into<anyhow::Error>) -> Self {
        Self::Fail(e.into())
    }
}

impl From<anyhow::Error> for HandlerError {
    /// Errors propagated with `?` are retryable.
    fn from(e: anyhow::Error) -> Self {
        Self::Retry(e)
    }
}

/// Everything a handler learns about the attempt it runs.
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
    /// String map from the enqueuer.
    pub metadata: BTreeMap<String, String>,
    /// Cancelled when the worker gives up on the attempt (shutdown grace elapsed).
    pub cancel: CancellationToken,
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

/// Handlers by job type.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<String, Arc<dyn Handler>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("types", &self.types()).finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry with the built-in handlers `echo`, `sleep` and `fail`.
    pub fn with_builtins() -> Self {
        let mut r = Self::new();
        crate::handlers::register_all(&mut r);
        r
    }

    /// Registers `handler` for `kind`, replacing an earlier one.
    pub fn register(&mut self, kind: impl Into<String>, handler: impl Handler) -> &mut Self {
        self.handlers.insert(kind.into(), Arc::new(handler));
        self
    }

    /// Registers a handler whose payload deserializes into `P` and whose output serializes. A
    /// payload that does not deserialize fails the attempt fatally (retrying cannot fix it).
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

    /// The handler of `kind`.
    pub fn get(&self, kind: &str) -> Option<Arc<dyn Handler>> {
        self.handlers.get(kind).cloned()
    }

    /// Registered types, sorted.
    pub fn types(&self) -> Vec<&str> {
        let mut t: Vec<&str> = self.handlers.keys().map(String::as_str).collect();
        t.sort_unstable();
        t
    }
}
