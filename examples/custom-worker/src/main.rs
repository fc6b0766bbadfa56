//! `custom-worker`: runs this crate's handlers with the same settings and flags as
//! `jobq-worker` (`--config`, `REDIS_URL`, `JOBQ_WORKER_QUEUES`, `JOBQ_WORKER_CONCURRENCY`, ...).

fn main() {
    jobq_worker::main("custom-worker", custom_worker::registry())
}
