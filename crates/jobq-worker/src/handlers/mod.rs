//! Built-in handlers of the stock `jobq-worker`, for demos and black-box tests.

mod echo;
mod fail;
mod sleep;

use crate::Registry;

/// Registers `echo`, `sleep` and `fail`.
pub fn register_all(r: &mut Registry) {
    r.register("echo", echo::run);
    r.register_typed("sleep", sleep::run);
    r.register_typed("fail", fail::run);
}
