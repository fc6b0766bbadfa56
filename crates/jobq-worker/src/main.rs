//! `jobq-worker`: runs the built-in handlers (`echo`, `noop`, `sleep`, `fail`) on the configured queues.

// Fewer cycles per allocation than the system allocator on the per-job paths (measured in
// docs/performance.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    jobq_worker::main("jobq-worker", jobq_worker::Registry::with_builtins())
}
