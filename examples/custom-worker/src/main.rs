//! `custom-worker`: runs this crate's handlers with the same settings and flags as
//! `jobq-worker` (`--config`, `REDIS_URL`, `JOBQ_WORKER_QUEUES`, `JOBQ_WORKER_CONCURRENCY`, ...).

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    jobq_worker::main("custom-worker", custom_worker::registry()).await
}
