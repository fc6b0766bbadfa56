//! `jobq-api`: the REST API.

use clap::Parser;

/// Serves the REST API until SIGTERM/SIGINT.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Settings file (TOML or YAML); environment variables override it.
    #[arg(long, env = "JOBQ_CONFIG")]
    config: Option<std::path::PathBuf>,
}

// Fewer cycles per allocation than the system allocator on the per-job paths (measured in
// docs/performance.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let settings = jobq_core::config::load(args.config.as_deref())?;
    let telemetry = jobq_core::telemetry::init(&settings.log, "jobq-api");
    let shutdown = jobq_core::shutdown::token_from_signals();
    let result = jobq_api::run(settings, shutdown).await;
    telemetry.shutdown().await;
    result
}
