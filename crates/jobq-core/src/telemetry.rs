//! Logging through `tracing`: JSON or pretty, filtered by `JOBQ_LOG_LEVEL` (or `RUST_LOG`).

use crate::config::{LogFormat, LogSettings};

/// Installs the global subscriber once; later calls are no-ops (tests, `jobq dev`).
pub fn init(log: &LogSettings) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| tracing_subscriber::EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(&log.level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match log.format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
}
