//! `jobq-scheduler`: promotes delayed and retrying jobs and records history and the DLQ.

use clap::Parser;

/// Runs the promoter and the recorder until SIGTERM/SIGINT.
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
    let telemetry = jobq_core::telemetry::init(&settings.log, "jobq-scheduler");
    let shutdown = jobq_core::shutdown::token_from_signals();
    let result = jobq_scheduler::run(settings, shutdown).await;
    telemetry.shutdown().await;
    result
}
