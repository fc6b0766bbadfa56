//! `fail`: `{"times": N, "message": "..."}` fails its first N attempts (counted over every run of
//! the job, so a DLQ retry can succeed), then succeeds. Without `times` it always fails.

use serde::Deserialize;

use crate::{HandlerError, JobContext};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct Fail {
    times: Option<u32>,
    message: Option<String>,
}

/// A missing (null) payload means "always fail".
pub(super) async fn run(p: Option<Fail>, ctx: JobContext) -> Result<serde_json::Value, HandlerError> {
    let p = p.unwrap_or_default();
    let failing = p.times.is_none_or(|n| ctx.attempts_total <= n);
    if failing {
        let message = p.message.unwrap_or_else(|| "fail handler failed as asked".to_owned());
        return Err(HandlerError::retry(anyhow::anyhow!("{message} (attempt {})", ctx.attempts_total)));
    }
    Ok(serde_json::json!({"succeeded_on_attempt": ctx.attempts_total}))
}
