//! The handlers of a user's worker: what a team writes around the `jobq-worker` library.
//!
//! * `thumbnail.resize`: a typed handler calling a (simulated) image service, behind a circuit
//!   breaker; a width out of range is a fatal error (no retry).
//! * `report.build`: a long job that reports progress and checkpoints every chunk of rows, so a
//!   retry or a crash resumes where it stopped; at most 2 reports per account at once across
//!   every worker (the account is the job's partition key).
//! * `SlowJobWarning`: a custom layer, its body written as a function of the context and the
//!   rest of the stack.

use std::time::{Duration, Instant};

use jobq_worker::tower::Layer;
use jobq_worker::{layers, HandlerError, JobContext, JobService, Registry};
use serde::{Deserialize, Serialize};

/// Input of `thumbnail.resize`.
#[derive(Debug, Deserialize)]
pub struct Resize {
    /// Image to resize.
    pub url: String,
    /// Target width in pixels, 1 to 4096.
    pub width: u32,
}

/// Result of `thumbnail.resize`.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Thumbnail {
    /// Where the thumbnail was stored.
    pub url: String,
    /// Its width.
    pub width: u32,
}

/// Resizes an image (simulated): bad input fails for good, a service error is retried.
pub async fn resize(req: Resize, _ctx: JobContext) -> Result<Thumbnail, HandlerError> {
    if !(1..=4096).contains(&req.width) {
        return Err(HandlerError::fail(anyhow::anyhow!("width must be 1 to 4096, got {}", req.width)));
    }
    if req.url.contains("unavailable") {
        return Err(HandlerError::retry_after(anyhow::anyhow!("image service unavailable"), Duration::from_secs(1)));
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    Ok(Thumbnail { url: format!("{}?w={}", req.url, req.width), width: req.width })
}

/// Input of `report.build`.
#[derive(Debug, Deserialize)]
pub struct Report {
    /// Rows to process.
    pub rows: u32,
    /// Time per chunk of 100 rows, in milliseconds (stands in for real work).
    #[serde(default)]
    pub ms_per_chunk: u64,
}

/// Result of `report.build`.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Built {
    /// Rows in the report.
    pub rows: u32,
    /// The row this attempt started from (non-zero when it resumed from a checkpoint).
    pub resumed_from: u32,
    /// When this attempt started and finished building (milliseconds since the epoch).
    pub span_ms: (u64, u64),
}

fn epoch_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Builds a report in chunks of 100 rows, checkpointing after each and stopping early when
/// the job is cancelled.
pub async fn build_report(req: Report, mut ctx: JobContext) -> Result<Built, HandlerError> {
    let started = epoch_ms();
    let resumed_from: u32 = ctx.last_checkpoint().unwrap_or(0);
    let mut row = resumed_from;
    while row < req.rows {
        if ctx.cancel.is_cancelled() {
            return Err(HandlerError::retry(anyhow::anyhow!("stopped at row {row}")));
        }
        tokio::time::sleep(Duration::from_millis(req.ms_per_chunk)).await;
        row = (row + 100).min(req.rows);
        ctx.checkpoint(row).await?;
        ctx.progress(100.0 * row as f32 / req.rows.max(1) as f32, format!("{row}/{} rows", req.rows)).await?;
    }
    Ok(Built { rows: row, resumed_from, span_ms: (started, epoch_ms()) })
}

/// Logs a warning for attempts slower than its limit: a custom layer. A layer is any
/// `tower::Layer` over `JobService`; [`layers::from_fn`] writes its body as an async function of
/// the context and the rest of the stack.
#[derive(Debug, Clone, Copy)]
pub struct SlowJobWarning(pub Duration);

impl Layer<JobService> for SlowJobWarning {
    type Service = JobService;

    fn layer(&self, inner: JobService) -> JobService {
        let limit = self.0;
        let body = layers::from_fn(move |ctx: JobContext, next: layers::Next| async move {
            let (id, kind, started) = (ctx.id, ctx.kind.clone(), Instant::now());
            let result = next.run(ctx).await;
            if started.elapsed() > limit {
                tracing::warn!(job.id = %id, job.kind = %kind, elapsed = ?started.elapsed(), "slow job");
            }
            result
        });
        JobService::new(body.layer(inner))
    }
}

/// Every handler with its layers.
pub fn registry() -> Registry {
    let mut registry = Registry::new();
    registry
        .register_typed("thumbnail.resize", resize)
        .register_typed("report.build", build_report)
        .layer_for("thumbnail.resize", layers::CircuitBreaker::new(5, Duration::from_secs(30)))
        .layer_for("report.build", layers::ConcurrencyLimit::per_partition(2))
        .layer(SlowJobWarning(Duration::from_secs(10)))
        .layer(layers::Metrics);
    registry
}
