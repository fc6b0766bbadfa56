//! Run handlers against a real Redis in a test, in a few lines.
//!
//! A [`TestWorker`] runs a [`Registry`] in a namespace of its own (random, removed by
//! [`TestWorker::finish`]) on the Redis of `REDIS_URL` (default `redis://127.0.0.1:6379`),
//! with a promoter so retries and held-back jobs come back, exactly as in production.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use jobq_core::job::{JobState, NewJob};
//! use jobq_worker::{testing::TestWorker, JobContext, Registry};
//! let mut registry = Registry::new();
//! registry.register_typed("double", |n: i64, _ctx: JobContext| async move { Ok(n * 2) });
//! let worker = TestWorker::start(registry).await?;
//! let job = worker.run(NewJob::new("double", serde_json::json!(21))).await?;
//! assert_eq!((job.state, job.result), (JobState::Succeeded, Some(serde_json::json!(42))));
//! worker.finish().await;
//! # Ok(())
//! # }
//! ```

use std::time::Duration;

use anyhow::Context as _;
use jobq_core::job::{JobId, JobInfo, NewJob};
use jobq_core::stream::Broker;
use tokio_util::sync::CancellationToken;

use crate::{Registry, Worker};

/// A worker, its promoter and its namespace, for one test.
pub struct TestWorker {
    broker: Broker,
    stop: CancellationToken,
    worker: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl TestWorker {
    /// Starts `registry` (10 slots, queue `default`) in a fresh namespace.
    pub async fn start(registry: Registry) -> anyhow::Result<Self> {
        let namespace = format!("test-{}", uuid::Uuid::new_v4().simple());
        let settings = jobq_core::config::load_from(None, |name| match name {
            "JOBQ_NAMESPACE" => Some(namespace.clone()),
            "JOBQ_AUTH" => Some("off".into()),
            "JOBQ_WORKER_CONCURRENCY" => Some("10".into()),
            other => std::env::var(other).ok(),
        })?;
        let broker = Broker::connect(&settings).await.context("invalid Redis settings")?;
        broker.ping().await.context("Redis is not reachable at REDIS_URL")?;
        let stop = CancellationToken::new();
        let worker = Worker::new(broker.clone(), registry, settings.worker.clone(), settings.jobs.timeout);
        let worker = tokio::spawn(worker.run(stop.clone()));
        let (b, s) = (broker.clone(), stop.clone());
        tokio::spawn(async move {
            while !s.is_cancelled() {
                let queues = b.queues().await.unwrap_or_default();
                let _ = b.promote(&queues, 1000).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        Ok(Self { broker, stop, worker })
    }

    /// The broker of the test namespace (to enqueue, inspect jobs, pause queues).
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// Enqueues `job` and waits (at most 30 s) until it is finished: succeeded, dead or
    /// cancelled.
    pub async fn run(&self, job: NewJob) -> anyhow::Result<JobInfo> {
        let id = self.broker.enqueue(job).await?.job.id;
        self.wait(id, Duration::from_secs(30)).await
    }

    /// Waits until job `id` is finished, for at most `timeout`.
    pub async fn wait(&self, id: JobId, timeout: Duration) -> anyhow::Result<JobInfo> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let job = self.broker.job(id).await?.with_context(|| format!("job {id} does not exist"))?;
            if job.state.is_terminal() {
                return Ok(job);
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!("job {id} is still {} after {timeout:?}", job.state);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the worker and deletes the namespace's keys.
    pub async fn finish(self) {
        self.stop.cancel();
        let _ = self.worker.await;
        if let Err(e) = self.broker.purge_namespace().await {
            tracing::warn!(error = %e, "removing the test namespace failed");
        }
    }
}
