//! `jobq`: the admin CLI of jobq, and `jobq dev` (api + worker + scheduler in one process).

mod admin;
mod bench;
mod devenv;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use jobq_core::config::Settings;
use tokio_util::sync::CancellationToken;

/// Admin CLI of the jobq background-job system.
#[derive(Parser)]
#[command(name = "jobq", version, about)]
struct Cli {
    /// Settings file (TOML or YAML); environment variables override it.
    #[arg(long, global = true, env = "JOBQ_CONFIG")]
    config: Option<PathBuf>,
    /// Print JSON instead of tables (admin commands).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the Postgres migrations (creating the database if it is missing).
    Migrate,
    /// Run api + worker + scheduler in one process, migrations applied (auth off unless
    /// JOBQ_AUTH says otherwise).
    Dev,
    #[command(flatten)]
    Admin(admin::AdminCommand),
    /// Measure throughput and latency (own namespace and database, removed afterwards).
    Bench(bench::BenchArgs),
    /// Make a new API key: prints the key (give it to the client) and the line to configure.
    ApiKey {
        /// Name of the key (shown in logs and the audit log).
        #[arg(long)]
        name: String,
        /// Role: admin, producer or reader.
        #[arg(long, value_parser = ["admin", "producer", "reader"])]
        role: String,
    },
}

// Fewer cycles per allocation than the system allocator on the per-job paths (measured in
// docs/performance.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Command::ApiKey { name, role } = &cli.command {
        if let Err(e) = jobq_core::config::valid_key_name(name) {
            eprintln!("error: --name: {e}");
            return std::process::ExitCode::from(2);
        }
        let key = format!("jobq_{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
        println!("key:    {key}");
        println!("config: JOBQ_API_KEYS=\"{name}:{role}:{}\"", jobq_api::auth::hash_key(&key));
        return std::process::ExitCode::SUCCESS;
    }
    // `jobq dev` runs with auth off unless the file or the environment turns it on.
    let defaults = if matches!(cli.command, Command::Dev) { "[api]\nauth = \"off\"\n" } else { "" };
    let env = |name: &str| std::env::var(name).ok();
    let settings = match jobq_core::config::load_layered(cli.config.as_deref(), env, defaults) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let telemetry = jobq_core::telemetry::init(&settings.log, "jobq");
    let result = match cli.command {
        Command::Migrate => migrate(&settings).await,
        Command::Dev => dev(settings).await,
        Command::ApiKey { .. } => Ok(()),
        Command::Bench(args) => bench::run(&settings, cli.config.as_deref(), args).await,
        Command::Admin(cmd) => {
            return match admin::run(&settings, cmd, cli.json).await {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(admin::Failure(code, message)) => {
                    eprintln!("error: {message}");
                    std::process::ExitCode::from(code)
                }
            };
        }
    };
    telemetry.shutdown().await;
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let store = jobq_core::store::Store::connect(&settings.database).await.context("invalid Postgres settings")?;
    store.migrate().await.context("applying migrations failed")?;
    println!("migrations applied to {}", redact(&settings.database.url));
    Ok(())
}

async fn dev(mut settings: Settings) -> anyhow::Result<()> {
    // Private Redis/PostgreSQL when none is configured and none answers; stopped on return.
    let _private = devenv::ensure(&mut settings).await?;
    let shutdown = jobq_core::shutdown::token_from_signals();
    let store = jobq_core::store::Store::connect(&settings.database).await.context("invalid Postgres settings")?;
    store.migrate_with_retry(&shutdown).await.context("applying migrations failed")?;
    let listener = tokio::net::TcpListener::bind(settings.api.addr)
        .await
        .with_context(|| format!("cannot listen on {} (set JOBQ_API_ADDR)", settings.api.addr))?;
    println!(
        "jobq dev: api on http://{}  (worker queues: {}; Ctrl+C to stop)",
        listener.local_addr()?,
        queue_list(&settings)
    );
    let stop_all = |token: CancellationToken| {
        move |r: anyhow::Result<()>| {
            token.cancel();
            r
        }
    };
    let api = jobq_api::serve(settings.clone(), listener, shutdown.clone());
    // One process, one metrics registry: the scheduler serves JOBQ_METRICS_ADDR (if set) for all
    // three, as the API's port does.
    let mut worker_settings = settings.clone();
    worker_settings.metrics_addr.clear();
    let worker = jobq_worker::run(worker_settings, jobq_worker::Registry::with_builtins(), shutdown.clone());
    let scheduler = jobq_scheduler::run(settings, shutdown.clone());
    let (a, w, s) = tokio::join!(
        async { stop_all(shutdown.clone())(api.await) },
        async { stop_all(shutdown.clone())(worker.await) },
        async { stop_all(shutdown.clone())(scheduler.await) },
    );
    a.context("api")?;
    w.context("worker")?;
    s.context("scheduler")?;
    Ok(())
}

fn queue_list(settings: &Settings) -> String {
    settings.worker.queues.names().iter().map(|q| q.as_str()).collect::<Vec<_>>().join(",")
}

/// The URL without its password.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}
