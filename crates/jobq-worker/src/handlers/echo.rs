//! `echo`: succeeds at once; its result is its payload.

use crate::{HandlerResult, JobContext};

pub(super) async fn run(ctx: JobContext) -> HandlerResult {
    Ok(Some(ctx.payload))
}
