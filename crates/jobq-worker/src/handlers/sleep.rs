//! `sleep`: `{"ms": N}` waits N milliseconds (cancellable), then succeeds.

use serde::Deserialize;

use crate::{HandlerError, JobContext};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Sleep {
    ms: u64,
}

pub(super) async fn run(p: Sleep, ctx: JobContext) -> Result<serde_json::Value, HandlerError> {
    tokio::select! {
        _ = tokio::time::sleep(std::time::Duration::from_millis(p.ms)) => Ok(serde_json::json!({"slept_ms": p.ms})),
        _ = ctx.cancel.cancelled() => Err(HandlerError::retry(anyhow::anyhow!("cancelled after starting a {} ms sleep", p.ms))),
    }
}
