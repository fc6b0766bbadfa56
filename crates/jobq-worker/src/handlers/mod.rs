//! Built-in handlers of the stock `jobq-worker`, for demos, benchmarks and black-box tests.

mod echo;
mod fail;
mod sleep;

use crate::Registry;

/// Registers `echo`, `noop`, `sleep` and `fail`.
pub fn register_all(r: &mut Registry) {
    r.register("echo", echo::run);
    r.register("noop", |_ctx: crate::JobContext| async { Ok(None) });
    r.register_typed("sleep", sleep::run);
    r.register_typed("fail", fail::run);
}
