//! `jobq-worker`: runs the built-in handlers (`echo`, `sleep`, `fail`) on the configured queues.

use clap::Parser;

/// Runs jobs from Redis until SIGTERM/SIGINT.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Settings file (TOML or YAML); environment variables override it.
    #[arg(long, env = "JOBQ_CONFIG")]
    config: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let settings = jobq_core::config::load(args.config.as_deref())?;
    let telemetry = jobq_core::telemetry::init(&settings.log, "jobq-worker");
    let shutdown = jobq_core::shutdown::token_from_signals();
    let result = jobq_worker::run(settings, jobq_worker::Registry::with_builtins(), shutdown).await;
    telemetry.shutdown().await;
    result
}
