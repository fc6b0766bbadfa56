//! `jobq-worker`: runs the built-in handlers (`echo`, `sleep`, `fail`) on the configured queues.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    jobq_worker::main("jobq-worker", jobq_worker::Registry::with_builtins()).await
}
