//! `jobq bench`: throughput and latency scenarios against the configured Redis and Postgres,
//! in a namespace and a database of their own (removed afterwards). Each scenario prints one
//! JSON line; a table follows.
//!
//! * `enqueue-lib`: N jobs through the library, in batches of 1,000 (one round trip each), from
//!   C producer tasks sharing one `Broker`.
//! * `enqueue-api`: N jobs through `POST /api/v1/jobs/batch` (batches of 1,000, C clients) of
//!   an API served in this process, answered with `Prefer: return=minimal` (each job's id and
//!   state) unless `--full-answers`.
//! * `drain`: N pre-filled no-op jobs run by W `jobq-worker` processes, until every attempt is
//!   also recorded in Postgres by a `jobq-scheduler` process.
//! * `latency`: 1,000 jobs one at a time into an idle worker: enqueue → start and
//!   enqueue → succeeded percentiles (Redis clock, millisecond resolution).
//! * `mixed`: a producer and W workers at once for `--seconds`: steady-state jobs/s and
//!   enqueue → succeeded percentiles of a sample. The producer offers `--rate` jobs/s, or, without
//!   it, as many as the workers take with a backlog of at most 2,000.
//! * `soak`: N jobs produced and drained in batches while the resident memory of the worker
//!   and scheduler processes and Redis' used memory are sampled: flat means no leak.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use jobq_core::config::Settings;
use jobq_core::job::{JobId, NewJob, QueueName};
use jobq_core::store::Store;
use jobq_core::stream::Broker;
use serde_json::{json, Value};

/// Scenario names, in the order `all` runs them.
pub const SCENARIOS: [&str; 6] = ["enqueue-lib", "enqueue-api", "drain", "latency", "mixed", "soak"];

/// Options of `jobq bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// enqueue-lib, enqueue-api, drain, latency, mixed, soak, or all.
    #[arg(long, default_value = "all")]
    pub scenario: String,
    /// Jobs per scenario.
    #[arg(short = 'n', long, default_value_t = 100_000)]
    pub jobs: usize,
    /// Worker processes (drain).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Concurrency per worker process (drain), concurrent clients (enqueue-api) or producer
    /// tasks (enqueue-lib).
    #[arg(long, default_value_t = 50)]
    pub concurrency: usize,
    /// Duration of `mixed`, in seconds.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Jobs per second the `mixed` producer offers (without it: as many as the workers take,
    /// with a backlog of at most 2,000).
    #[arg(long)]
    pub rate: Option<u32>,
    /// Log level of the worker and scheduler processes it starts (`info` is the binaries'
    /// default; at `warn` nothing is logged per job).
    #[arg(long, default_value = "warn")]
    pub log_level: String,
    /// Milliseconds each job of `drain`, `mixed` and `soak` waits in its handler (the built-in
    /// `sleep` handler); 0 runs no-op jobs.
    #[arg(long, default_value_t = 0)]
    pub job_ms: u64,
    /// `enqueue-api` asks for each job whole in the batch answers, instead of its id and state
    /// (`Prefer: return=minimal`).
    #[arg(long)]
    pub full_answers: bool,
}

struct BenchEnv {
    settings: Settings,
    broker: Broker,
    store: Store,
    database: String,
    vars: HashMap<String, String>,
}

impl BenchEnv {
    async fn new(base: &Settings, log_level: &str) -> anyhow::Result<Self> {
        let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        let mut settings = base.clone();
        // Under the configured namespace, so that benchmarks of different namespaces (and the
        // tests, each in its own) never see each other's keys.
        settings.namespace = format!("{}-bench-{tag}", base.namespace);
        let database = format!("jobq_bench_{tag}");
        let url =
            base.database.url.rsplit_once('/').map(|(head, _)| format!("{head}/{database}")).context("database url")?;
        settings.database.url = url.clone();
        settings.database.create = true;
        settings.api.auth = false;
        let store = Store::connect(&settings.database).await?;
        let ready = async {
            store.migrate().await.context("migrating the bench database")?;
            let broker = Broker::connect(&settings).await?;
            broker.check_server(settings.redis.allow_eviction).await?;
            anyhow::Ok(broker)
        };
        let broker = match ready.await {
            Ok(broker) => broker,
            Err(e) => {
                // The database exists already: it goes with the failed start.
                store.pool().close().await;
                drop_database(&admin_url(&base.database.url), &database).await;
                return Err(e);
            }
        };
        // The prefixed names too: an inherited JOBQ_DATABASE_URL would win over DATABASE_URL
        // and point the processes at another database.
        let vars: HashMap<String, String> = [
            ("JOBQ_NAMESPACE", settings.namespace.clone()),
            ("REDIS_URL", settings.redis.url.clone()),
            ("JOBQ_REDIS_URL", settings.redis.url.clone()),
            ("DATABASE_URL", url.clone()),
            ("JOBQ_DATABASE_URL", url),
            ("JOBQ_DATABASE_MIGRATE", "false".into()),
            ("JOBQ_LOG_LEVEL", log_level.to_owned()),
            ("JOBQ_AUTH", "off".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        Ok(Self { settings, broker, store, database, vars })
    }

    fn spawn(&self, bin: &str, extra: &[(&str, String)]) -> anyhow::Result<tokio::process::Child> {
        let path = sibling(bin)?;
        let mut cmd = tokio::process::Command::new(&path);
        cmd.envs(&self.vars).envs(extra.iter().map(|(k, v)| (*k, v.clone()))).kill_on_drop(true);
        cmd.stdin(std::process::Stdio::null());
        cmd.spawn().with_context(|| format!("starting {}", path.display()))
    }

    async fn reset(&self) -> anyhow::Result<()> {
        self.broker.purge_namespace().await?;
        sqlx::query("TRUNCATE job_executions, dead_jobs").execute(self.store.pool()).await?;
        Ok(())
    }

    async fn cleanup(self, admin_url: &str) {
        let _ = self.broker.purge_namespace().await;
        self.store.pool().close().await;
        drop_database(admin_url, &self.database).await;
    }
}

/// The URL of the `postgres` database beside the one `url` names, to drop a bench database.
fn admin_url(url: &str) -> String {
    url.rsplit_once('/').map(|(h, _)| format!("{h}/postgres")).unwrap_or_default()
}

/// Drops the bench database `name` (its connections are ended); best effort.
async fn drop_database(admin_url: &str, name: &str) {
    if let Ok(mut conn) = <sqlx::PgConnection as sqlx::Connection>::connect(admin_url).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).execute(&mut conn).await;
    }
}

/// A binary next to this one (`jobq-worker`, `jobq-scheduler`).
fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name(name);
    if !path.exists() {
        bail!("{} not found next to jobq; build every binary first (cargo build --release --bins)", path.display());
    }
    Ok(path)
}

fn noop_jobs(n: usize) -> impl Iterator<Item = NewJob> {
    (0..n).map(|i| NewJob::new("noop", json!({ "n": i })))
}

/// The jobs the processing scenarios run: no-op jobs, or `sleep` jobs of `job_ms` each.
fn work_jobs(n: usize, job_ms: u64) -> Vec<NewJob> {
    if job_ms == 0 {
        noop_jobs(n).collect()
    } else {
        (0..n).map(|_| NewJob::new("sleep", json!({ "ms": job_ms }))).collect()
    }
}

async fn prefill(broker: &Broker, n: usize, job_ms: u64) -> anyhow::Result<()> {
    let mut left = n;
    while left > 0 {
        let chunk = left.min(1000);
        let results = broker.enqueue_many(work_jobs(chunk, job_ms), false).await?;
        if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
            bail!("enqueue failed: {e}");
        }
        left -= chunk;
    }
    Ok(())
}

async fn enqueue_lib(env: &BenchEnv, args: &BenchArgs) -> anyhow::Result<Value> {
    let producers = args.concurrency.clamp(1, 64);
    let batches = args.jobs.div_ceil(1000);
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let cpu0 = (redis_cpu_us(&env.broker).await?, proc_cpu_us(std::process::id()).unwrap_or(0));
    let started = Instant::now();
    // A JoinSet: the producers stop with the scenario, also when it is dropped (interrupted).
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..producers {
        let (broker, next) = (env.broker.clone(), next.clone());
        tasks.spawn(async move {
            while next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < batches {
                let results = broker.enqueue_many(noop_jobs(1000).collect(), false).await?;
                if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
                    bail!("enqueue failed: {e}");
                }
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(t) = tasks.join_next().await {
        t??;
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu1 = (redis_cpu_us(&env.broker).await?, proc_cpu_us(std::process::id()).unwrap_or(0));
    let n = batches * 1000;
    let per_job = |us: u64| (us as f64 / n as f64 * 10.0).round() / 10.0;
    let (redis_us, client_us) = (cpu1.0.saturating_sub(cpu0.0), cpu1.1.saturating_sub(cpu0.1));
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    Ok(json!({
        "scenario": "enqueue-lib", "n": n, "producers": producers, "batch": 1000,
        "jobs_per_s": (n as f64 / secs).round(),
        "cpu_us_per_job": {"redis": per_job(redis_us), "client": per_job(client_us), "total": per_job(redis_us + client_us)},
        "cpu_bound_jobs_per_s": (cores as f64 * 1e6 * n as f64 / (redis_us + client_us).max(1) as f64).round(),
    }))
}

/// The REST API served by this process on a free port, until `stop` is cancelled or it is
/// dropped.
struct InProcessApi {
    base: String,
    stop: tokio_util::sync::CancellationToken,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
    _stop_on_drop: tokio_util::sync::DropGuard,
}

impl InProcessApi {
    async fn start(env: &BenchEnv, client: &reqwest::Client) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let stop = tokio_util::sync::CancellationToken::new();
        let server = tokio::spawn(jobq_api::serve(env.settings.clone(), listener, stop.clone()));
        for _ in 0..100 {
            if client.get(format!("{base}/health")).send().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Self { base, _stop_on_drop: stop.clone().drop_guard(), stop, server })
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = self.server.await;
    }
}

async fn enqueue_api(env: &BenchEnv, args: &BenchArgs) -> anyhow::Result<Value> {
    let client = reqwest::Client::new();
    let api = InProcessApi::start(env, &client).await?;
    let base = api.base.clone();
    let body: Value =
        json!({"jobs": (0..1000).map(|i| json!({"type": "noop", "payload": {"n": i}})).collect::<Vec<_>>()});
    let body = std::sync::Arc::new(serde_json::to_vec(&body)?);
    let batches = args.jobs.div_ceil(1000);
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // CPU of Redis and of this process (the API and its HTTP clients both run in it).
    let cpu0 = (redis_cpu_us(&env.broker).await?, proc_cpu_us(std::process::id()).unwrap_or(0));
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency.clamp(1, 64) {
        let (client, body, next, url) =
            (client.clone(), body.clone(), next.clone(), format!("{base}/api/v1/jobs/batch"));
        let full = args.full_answers;
        clients.spawn(async move {
            while next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < batches {
                let mut post = client.post(&url).header("content-type", "application/json");
                if !full {
                    post = post.header("prefer", "return=minimal");
                }
                let r = post.body(body.as_ref().clone()).send().await?;
                if !r.status().is_success() {
                    bail!("batch answered {}", r.status());
                }
                // Read to its end, as a client that looks at the results does.
                r.bytes().await?;
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(c) = clients.join_next().await {
        c??;
    }
    let secs = started.elapsed().as_secs_f64();
    let cpu1 = (redis_cpu_us(&env.broker).await?, proc_cpu_us(std::process::id()).unwrap_or(0));
    api.stop().await;
    let n = batches * 1000;
    let per_job = |us: u64| (us as f64 / n as f64 * 10.0).round() / 10.0;
    let (redis_us, api_us) = (cpu1.0.saturating_sub(cpu0.0), cpu1.1.saturating_sub(cpu0.1));
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    Ok(json!({
        "scenario": "enqueue-api", "n": n, "clients": args.concurrency.clamp(1, 64), "batch": 1000,
        "answers": if args.full_answers { "full" } else { "minimal" },
        "jobs_per_s": (n as f64 / secs).round(),
        "cpu_us_per_job": {"redis": per_job(redis_us), "api_and_client": per_job(api_us), "total": per_job(redis_us + api_us)},
        "cpu_bound_jobs_per_s": (cores as f64 * 1e6 * n as f64 / (redis_us + api_us).max(1) as f64).round(),
    }))
}

/// CPU Redis has used so far (`INFO cpu`), in µs.
async fn redis_cpu_us(broker: &Broker) -> anyhow::Result<u64> {
    let mut conn = broker.connection();
    let info: String = redis::cmd("INFO").arg("cpu").query_async(&mut conn).await?;
    let field = |name: &str| -> f64 {
        info.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')?.trim().parse().ok()).unwrap_or(0.0)
    };
    Ok(((field("used_cpu_sys") + field("used_cpu_user")) * 1e6) as u64)
}

/// Jobs of the bench queue that succeeded so far. Fails once one is dead or cancelled: the
/// benchmark counts successes, and would otherwise wait for ever for the missing ones.
async fn counts(broker: &Broker) -> anyhow::Result<u64> {
    let stats = broker.queue_stats(&[QueueName::default_queue()]).await?;
    let count = |outcome: &str| stats.first().and_then(|s| s.counts.get(outcome).copied()).unwrap_or(0);
    for outcome in ["dead", "cancelled"] {
        if count(outcome) > 0 {
            bail!("{} job(s) of the benchmark ended {outcome}: see the workers' log above", count(outcome));
        }
    }
    Ok(count("succeeded"))
}

/// How long a scenario waits for a count (jobs succeeded, attempts recorded) to grow before it
/// gives up, so that a wedged process cannot hold the benchmark for ever.
const STALL: Duration = Duration::from_secs(60);

/// Waits until `goal` jobs of the bench queue have succeeded, looking every `every`; fails as
/// [`counts`], [`alive`] and [`Progress`] do.
async fn wait_succeeded(
    env: &BenchEnv,
    procs: &mut [tokio::process::Child],
    goal: u64,
    every: Duration,
) -> anyhow::Result<()> {
    let mut progress = Progress::new("jobs succeeded");
    loop {
        let done = counts(&env.broker).await?;
        if done >= goal {
            return Ok(());
        }
        progress.check(done, goal)?;
        alive(procs)?;
        tokio::time::sleep(every).await;
    }
}

/// A count a scenario waits on, failing once it has not grown for [`STALL`].
struct Progress {
    what: &'static str,
    last: u64,
    since: Instant,
}

impl Progress {
    fn new(what: &'static str) -> Self {
        Self { what, last: 0, since: Instant::now() }
    }

    fn check(&mut self, now: u64, goal: u64) -> anyhow::Result<()> {
        if now > self.last {
            (self.last, self.since) = (now, Instant::now());
        } else if self.since.elapsed() >= STALL {
            bail!("{} stopped at {now} of {goal}: none for {} s", self.what, STALL.as_secs());
        }
        Ok(())
    }
}

async fn drain(env: &BenchEnv, args: &BenchArgs) -> anyhow::Result<Value> {
    prefill(&env.broker, args.jobs, args.job_ms).await?;
    // CPU accounting starts here, after the prefill: Redis, the Postgres backends of the bench
    // database (but not the connection this function polls with) and Postgres' own processes.
    let mut probe = <sqlx::PgConnection as sqlx::Connection>::connect(&env.settings.database.url).await?;
    let probe_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut probe).await?;
    let cpu0 = CpuSample::take(env, &mut probe, probe_pid).await?;
    let started = Instant::now();
    let (mut procs, metrics) = start_fleet(env, args)?;
    let n = args.jobs as u64;
    wait_succeeded(env, &mut procs, n, Duration::from_millis(20)).await?;
    let processed = started.elapsed().as_secs_f64();
    let mut progress = Progress::new("attempts recorded");
    loop {
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM job_executions").fetch_one(&mut probe).await?;
        if rows as u64 >= n {
            break;
        }
        progress.check(rows as u64, n)?;
        alive(&mut procs)?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recorded = started.elapsed().as_secs_f64();
    let cpu1 = CpuSample::take(env, &mut probe, probe_pid).await?;
    // How long a job held its lease, on Redis' clock: from the fetch that started it to its
    // outcome written (the history's started_at and finished_at).
    let attempt_ms: Option<f64> = sqlx::query_scalar(
        "SELECT avg(extract(epoch FROM finished_at - started_at) * 1000)::float8 FROM job_executions",
    )
    .fetch_one(&mut probe)
    .await?;
    // The children started after `cpu0`: everything they used is the drain's.
    let child_cpu = |p: &tokio::process::Child| p.id().and_then(proc_cpu_us).unwrap_or(0);
    let scheduler_us = child_cpu(&procs[0]);
    let worker_us: u64 = procs[1..].iter().map(child_cpu).sum();
    let handler_ms = handler_ms(&metrics).await;
    for p in &mut procs {
        let _ = p.start_kill();
    }
    let per_job = |us: u64| (us as f64 / n as f64 * 10.0).round() / 10.0;
    let redis_us = cpu1.redis_us.saturating_sub(cpu0.redis_us);
    let pg_us: u64 = cpu1
        .pg_backends
        .iter()
        .map(|(pid, us)| us.saturating_sub(cpu0.pg_backends.get(pid).copied().unwrap_or(0)))
        .sum();
    let aux_us = cpu1.pg_aux_us.saturating_sub(cpu0.pg_aux_us);
    let total = redis_us + worker_us + scheduler_us + pg_us + aux_us;
    let mut commands: Vec<(String, u64, u64)> = cpu1
        .commands
        .iter()
        .map(|(c, (calls, usec))| {
            let (c0, u0) = cpu0.commands.get(c).copied().unwrap_or((0, 0));
            (c.clone(), calls.saturating_sub(c0), usec.saturating_sub(u0))
        })
        .filter(|(_, calls, _)| *calls > 0)
        .collect();
    commands.sort_by_key(|(_, _, usec)| std::cmp::Reverse(*usec));
    let commands: serde_json::Map<String, Value> = commands
        .into_iter()
        .take(12)
        .map(|(c, calls, usec)| (c, json!({"calls_per_job": (calls as f64 / n as f64 * 100.0).round() / 100.0, "us_per_job": per_job(usec)})))
        .collect();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    // With jobs that wait, the share of the slots' time spent in handlers (1: every slot always
    // busy): what the fetch, the outcome writes and the recording cost the slots.
    let slot_use = (args.job_ms > 0).then(|| {
        let busy = n as f64 * args.job_ms as f64 / 1000.0;
        (busy / (processed * (args.workers * args.concurrency) as f64) * 1000.0).round() / 1000.0
    });
    let mut line = json!({
        "scenario": "drain", "n": n, "workers": args.workers, "concurrency": args.concurrency,
        "job_ms": args.job_ms,
        "retention_succeeded_s": env.settings.retention.succeeded.as_secs(), "log_level": args.log_level,
        "worker_threads": env.settings.worker.threads,
        "jobs_per_s": (n as f64 / processed).round(),
        "recorded_jobs_per_s": (n as f64 / recorded).round(),
        // A slot's turn (one job in each slot after the other); of it, the job's attempt and,
        // in that, its handler.
        "slot_cycle_ms": ((args.workers * args.concurrency) as f64 * processed / n as f64 * 1e5).round() / 100.0,
        "attempt_ms": attempt_ms.map(|a| (a * 100.0).round() / 100.0),
        "handler_ms": handler_ms,
        "cpu_us_per_job": {
            "redis": per_job(redis_us), "worker": per_job(worker_us), "scheduler": per_job(scheduler_us),
            "postgres": per_job(pg_us), "postgres_aux": per_job(aux_us), "total": per_job(total),
        },
        "cpu_bound_jobs_per_s": (cores as f64 * 1e6 * n as f64 / total.max(1) as f64).round(),
        "redis_commands": commands,
    });
    if let Some(u) = slot_use {
        line["slot_use"] = json!(u);
    }
    Ok(line)
}

/// CPU used so far by Redis (`INFO cpu`), by each Postgres backend of the bench database and by
/// Postgres' background processes (from `/proc`), and Redis' `INFO commandstats`.
struct CpuSample {
    redis_us: u64,
    pg_backends: HashMap<i32, u64>,
    pg_aux_us: u64,
    /// Command → (calls, usec).
    commands: HashMap<String, (u64, u64)>,
}

impl CpuSample {
    async fn take(env: &BenchEnv, probe: &mut sqlx::PgConnection, probe_pid: i32) -> anyhow::Result<Self> {
        let redis_us = redis_cpu_us(&env.broker).await?;
        let mut conn = env.broker.connection();
        let stats: String = redis::cmd("INFO").arg("commandstats").query_async(&mut conn).await?;
        let mut commands = HashMap::new();
        for line in stats.lines() {
            let Some((name, rest)) = line.strip_prefix("cmdstat_").and_then(|l| l.split_once(':')) else { continue };
            let get = |k: &str| {
                rest.split(',').find_map(|kv| kv.strip_prefix(k)?.strip_prefix('=')?.parse::<u64>().ok()).unwrap_or(0)
            };
            commands.insert(name.to_owned(), (get("calls"), get("usec")));
        }
        let database = env.database.clone();
        let pids: Vec<i32> = sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> $2")
            .bind(database)
            .bind(probe_pid)
            .fetch_all(&mut *probe)
            .await?;
        let pg_backends = pids.into_iter().map(|p| (p, proc_cpu_us(p as u32).unwrap_or(0))).collect();
        let aux: Vec<i32> =
            sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE backend_type <> 'client backend'")
                .fetch_all(&mut *probe)
                .await?;
        let pg_aux_us = aux.into_iter().filter_map(|p| proc_cpu_us(p as u32)).sum();
        Ok(Self { redis_us, pg_backends, pg_aux_us, commands })
    }
}

/// User + system CPU time a process has used, in µs (`/proc/<pid>/stat`).
fn proc_cpu_us(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some(ticks * 10_000)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted.get(((sorted.len().saturating_sub(1)) as f64 * p).round() as usize).copied().unwrap_or(f64::NAN)
}

/// One job at a time into an idle worker, through `POST /api/v1/jobs`, as the BullMQ baseline
/// measures it: the API and a worker run in this process, so enqueue → start (the handler is
/// called) and enqueue → succeeded (the job hash says so, read in a tight loop) are read off
/// one monotonic clock.
async fn latency(env: &BenchEnv) -> anyhow::Result<Value> {
    let client = reqwest::Client::new();
    let api = InProcessApi::start(env, &client).await?;
    let (started_tx, mut started_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut registry = jobq_worker::Registry::new();
    registry.register("probe", move |ctx: jobq_worker::JobContext| {
        let _ = started_tx.send((ctx.id, Instant::now()));
        async { Ok(None) }
    });
    let mut settings = env.settings.worker.clone();
    settings.concurrency = 10;
    let stop = tokio_util::sync::CancellationToken::new();
    let _stop_on_drop = stop.clone().drop_guard();
    let worker = jobq_worker::Worker::new(env.broker.clone(), registry, settings, env.settings.jobs.timeout);
    let worker = tokio::spawn(worker.run(stop.clone()));
    let probe = Probe { client, url: format!("{}/api/v1/jobs", api.base), broker: &env.broker };
    // Warm up: connections and scripts; then the worker is idle and blocked on XREAD.
    for _ in 0..20 {
        probe.one(&mut started_rx).await?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut to_start, mut to_done) = (Vec::new(), Vec::new());
    for _ in 0..1000 {
        let (start, done) = probe.one(&mut started_rx).await?;
        to_start.push(start);
        to_done.push(done);
    }
    stop.cancel();
    worker.await??;
    api.stop().await;
    to_start.sort_by(f64::total_cmp);
    to_done.sort_by(f64::total_cmp);
    let ms = |sorted: &[f64], p: f64| (percentile(sorted, p) * 1000.0).round() / 1000.0;
    Ok(json!({
        "scenario": "latency", "n": 1000,
        "start_ms_p50": ms(&to_start, 0.5), "start_ms_p90": ms(&to_start, 0.9),
        "start_ms_p99": ms(&to_start, 0.99), "start_ms_max": ms(&to_start, 1.0),
        "done_ms_p50": ms(&to_done, 0.5), "done_ms_p90": ms(&to_done, 0.9),
        "done_ms_p99": ms(&to_done, 0.99), "done_ms_max": ms(&to_done, 1.0),
    }))
}

struct Probe<'a> {
    client: reqwest::Client,
    url: String,
    broker: &'a Broker,
}

impl Probe<'_> {
    /// Enqueues one `probe` job; returns (enqueue → start, enqueue → succeeded) in ms.
    async fn one(
        &self,
        started: &mut tokio::sync::mpsc::UnboundedReceiver<(JobId, Instant)>,
    ) -> anyhow::Result<(f64, f64)> {
        let t0 = Instant::now();
        let r = self
            .client
            .post(&self.url)
            .header("content-type", "application/json")
            .body(r#"{"type": "probe", "payload": {}}"#)
            .send()
            .await?;
        if r.status() != reqwest::StatusCode::CREATED {
            bail!("POST /api/v1/jobs answered {}", r.status());
        }
        let job: Value = r.json().await?;
        let id: JobId = job["id"].as_str().context("no id in the answer")?.parse()?;
        let (sid, start) = tokio::time::timeout(Duration::from_secs(30), started.recv())
            .await
            .context("the job did not start within 30 s")?
            .context("the worker stopped")?;
        anyhow::ensure!(sid == id, "job {sid} started instead of {id}");
        let key = self.broker.keys().job(&QueueName::default_queue(), id);
        let mut conn = self.broker.connection();
        loop {
            let state: Option<String> = redis::cmd("HGET").arg(&key).arg("state").query_async(&mut conn).await?;
            // Gone once started: removed at completion (JOBQ_RETENTION_SUCCEEDED=0).
            if matches!(state.as_deref(), Some("succeeded") | None) {
                let ms = |t: Instant| (t - t0).as_secs_f64() * 1000.0;
                return Ok((ms(start), ms(Instant::now())));
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("job {id} did not succeed within 30 s");
            }
        }
    }
}

/// Waits for a job to succeed; returns its (enqueued_at, started_at, finished_at) in Redis ms,
/// or None once its hash is gone (removed at completion with `JOBQ_RETENTION_SUCCEEDED=0`).
async fn wait_done(broker: &Broker, q: &QueueName, id: JobId) -> anyhow::Result<Option<(i64, i64, i64)>> {
    let key = broker.keys().job(q, id);
    let mut conn = broker.connection();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let f: (Option<String>, Option<i64>, Option<i64>, Option<i64>) = redis::cmd("HMGET")
            .arg(&key)
            .arg(&["state", "enqueued_at", "started_at", "finished_at"])
            .query_async(&mut conn)
            .await?;
        match f {
            (Some(s), Some(e), Some(st), Some(fi)) if s == "succeeded" => return Ok(Some((e, st, fi))),
            (None, ..) => return Ok(None),
            _ => {}
        }
        if Instant::now() > deadline {
            bail!("job {id} did not finish within 30 s: is a worker running?");
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

/// Fails once a started process has exited: the scenario would otherwise wait for it forever.
fn alive(procs: &mut [tokio::process::Child]) -> anyhow::Result<()> {
    for (i, p) in procs.iter_mut().enumerate() {
        if let Some(status) = p.try_wait()? {
            let name = if i == 0 { "jobq-scheduler" } else { "jobq-worker" };
            bail!("{name} exited ({status}) during the scenario; its error is above");
        }
    }
    Ok(())
}

/// Starts a scheduler and `workers` worker processes; returns them (the scheduler first) and
/// the address each worker serves its metrics on (see [`handler_ms`]).
fn start_fleet(env: &BenchEnv, args: &BenchArgs) -> anyhow::Result<(Vec<tokio::process::Child>, Vec<String>)> {
    let mut procs = vec![env.spawn("jobq-scheduler", &[])?];
    let mut metrics = Vec::new();
    for i in 0..args.workers {
        let addr = format!("127.0.0.1:{}", free_port()?);
        metrics.push(addr.clone());
        procs.push(env.spawn(
            "jobq-worker",
            &[
                ("JOBQ_WORKER_CONCURRENCY", args.concurrency.to_string()),
                ("JOBQ_WORKER_ID", format!("bench-{i}")),
                ("JOBQ_METRICS_ADDR", addr),
            ],
        )?);
    }
    Ok((procs, metrics))
}

/// A port nothing listens on now, for a worker to bind a moment later. Taken below the
/// kernel's ephemeral range (`ip_local_port_range`), so that no outgoing connection is given
/// it in between, as one could be a port that `bind(0)` handed out.
fn free_port() -> anyhow::Result<u16> {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let span = low.saturating_sub(10_000).max(1);
    for _ in 0..100 {
        let port = 10_000 + (uuid::Uuid::new_v4().as_u128() % u128::from(span)) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The mean time the workers' handlers took, in ms: `jobq_attempt_duration_seconds` of every
/// worker's `/metrics` (the `sleep` handler's wait is on Tokio's millisecond timer, which
/// rounds a deadline up to the next tick). `None` if a worker does not answer.
async fn handler_ms(metrics: &[String]) -> Option<f64> {
    let client = reqwest::Client::new();
    let (mut sum, mut count) = (0.0, 0.0);
    for addr in metrics {
        let text = client.get(format!("http://{addr}/metrics")).send().await.ok()?.text().await.ok()?;
        for line in text.lines() {
            let Some((name, value)) = line.rsplit_once(' ') else { continue };
            let value: f64 = value.parse().unwrap_or(0.0);
            if name.starts_with("jobq_attempt_duration_seconds_sum") {
                sum += value;
            } else if name.starts_with("jobq_attempt_duration_seconds_count") {
                count += value;
            }
        }
    }
    (count > 0.0).then(|| (sum / count * 1e5).round() / 100.0)
}

async fn mixed(env: &BenchEnv, args: &BenchArgs) -> anyhow::Result<Value> {
    let (mut procs, _) = start_fleet(env, args)?;
    let q = QueueName::default_queue();
    let run_for = Duration::from_secs(args.seconds.max(1));
    // The first fifth of the run (at most 2 s) warms up: jobs/s counts what succeeded after it
    // and before the end of the run, not the final drain.
    let warm_up = (run_for / 5).min(Duration::from_secs(2));
    let started = Instant::now();
    // (when, jobs succeeded) at the first and the last check inside that window.
    let mut first: Option<(Instant, u64)> = None;
    let mut last = None;
    let mut produced = 0usize;
    let mut backlog_max = 0u64;
    let mut sample = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while started.elapsed() < run_for {
        let batch = match args.rate {
            // What the rate owes by now, every 10 ms (at most 1,000 per call).
            Some(rate) => {
                tick.tick().await;
                let owed = started.elapsed().min(run_for).as_secs_f64() * f64::from(rate);
                (owed as usize).saturating_sub(produced).min(1_000)
            }
            None => 100,
        };
        if batch > 0 {
            let results = env.broker.enqueue_many(work_jobs(batch, args.job_ms), false).await?;
            produced += results.len();
            if let Some(Ok(e)) = results.first() {
                sample.push(e.job.id);
            }
        }
        let mut done = counts(&env.broker).await?;
        let mut backlog = (produced as u64).saturating_sub(done);
        backlog_max = backlog_max.max(backlog);
        // Without a rate, keep the backlog small: steady state, not a drain.
        alive(&mut procs)?;
        let mut progress = Progress::new("jobs succeeded");
        while args.rate.is_none() && backlog > 2_000 {
            progress.check(done, produced as u64)?;
            alive(&mut procs)?;
            tokio::time::sleep(Duration::from_millis(2)).await;
            done = counts(&env.broker).await?;
            backlog = (produced as u64).saturating_sub(done);
        }
        let at = Instant::now();
        if at - started >= warm_up && at - started <= run_for {
            first.get_or_insert((at, done));
            last = Some((at, done));
        }
    }
    wait_succeeded(env, &mut procs, produced as u64, Duration::from_millis(10)).await?;
    let secs = started.elapsed().as_secs_f64();
    let steady = match (first, last) {
        (Some((t0, c0)), Some((t1, c1))) if t1 > t0 => (c1 - c0) as f64 / (t1 - t0).as_secs_f64(),
        // Too short a run to have a window: the whole run, final drain included.
        _ => produced as f64 / secs,
    };
    let mut done = Vec::new();
    for id in sample {
        if let Some((enq, _, end)) = wait_done(&env.broker, &q, id).await? {
            done.push((end - enq) as f64);
        }
    }
    done.sort_by(f64::total_cmp);
    for p in &mut procs {
        let _ = p.start_kill();
    }
    Ok(json!({
        "scenario": "mixed", "n": produced, "seconds": args.seconds, "workers": args.workers, "concurrency": args.concurrency,
        "job_ms": args.job_ms,
        "offered_per_s": args.rate,
        "jobs_per_s": steady.round(),
        "warm_up_s": warm_up.as_secs_f64(),
        "backlog_max": backlog_max,
        "sampled": done.len(),
        "done_ms_p50": percentile(&done, 0.5), "done_ms_p90": percentile(&done, 0.9),
        "done_ms_p99": percentile(&done, 0.99), "done_ms_max": done.last().copied().unwrap_or(f64::NAN),
    }))
}

/// Resident memory of a process in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()?.parse().ok())
}

async fn redis_used_kib(broker: &Broker) -> anyhow::Result<u64> {
    let info: String = redis::cmd("INFO").arg("memory").query_async(&mut broker.connection()).await?;
    let bytes: u64 =
        info.lines().find_map(|l| l.strip_prefix("used_memory:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
    Ok(bytes / 1024)
}

async fn soak(env: &BenchEnv, args: &BenchArgs) -> anyhow::Result<Value> {
    let (mut procs, _) = start_fleet(env, args)?;
    let pids: Vec<u32> = procs.iter().filter_map(|p| p.id()).collect();
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut produced = 0usize;
    let step = (args.jobs / 10).max(1000);
    while produced < args.jobs {
        let chunk = step.min(args.jobs - produced);
        prefill(&env.broker, chunk, args.job_ms).await?;
        produced += chunk;
        wait_succeeded(env, &mut procs, produced as u64, Duration::from_millis(20)).await?;
        let rss: Vec<u64> = pids.iter().map(|p| rss_kib(*p).unwrap_or(0)).collect();
        samples.push(json!({"jobs": produced, "scheduler_rss_kib": rss[0], "worker_rss_kib": rss[1..], "redis_used_kib": redis_used_kib(&env.broker).await?}));
    }
    let secs = started.elapsed().as_secs_f64();
    for p in &mut procs {
        let _ = p.start_kill();
    }
    Ok(
        json!({"scenario": "soak", "n": produced, "job_ms": args.job_ms, "jobs_per_s": (produced as f64 / secs).round(), "samples": samples}),
    )
}

/// Runs the chosen scenarios and prints their results.
/// Runs the chosen scenarios; `config` (the `--config` file, if any) is passed on to the
/// processes it starts.
pub async fn run(settings: &Settings, config: Option<&std::path::Path>, args: BenchArgs) -> anyhow::Result<()> {
    let chosen: Vec<&str> = if args.scenario == "all" { SCENARIOS.to_vec() } else { vec![args.scenario.as_str()] };
    if let Some(bad) = chosen.iter().find(|s| !SCENARIOS.contains(s)) {
        bail!("unknown scenario `{bad}`: use {} or all", SCENARIOS.join(", "));
    }
    if args.rate == Some(0) {
        bail!("--rate: the producer offers at least 1 job per second");
    }
    if !(1..=64).contains(&args.workers) {
        bail!("--workers: between 1 and 64 worker processes");
    }
    if !(1..=10_000).contains(&args.concurrency) {
        bail!("--concurrency: between 1 and 10000");
    }
    if args.jobs == 0 {
        bail!("-n: at least 1 job");
    }
    if args.job_ms > 10_000 {
        bail!("--job-ms: at most 10000 (each job has to end within the default job timeout)");
    }
    if !settings.metrics_addr.is_empty() {
        bail!("unset JOBQ_METRICS_ADDR (metrics_addr) for the benchmark: each of its worker processes would bind it");
    }
    let mut checked = settings.clone();
    checked.log.level.clone_from(&args.log_level);
    checked.validate().context("--log-level")?;
    let mut env = BenchEnv::new(settings, &args.log_level).await?;
    if let Some(path) = config {
        let path = std::fs::canonicalize(path).with_context(|| format!("--config {}", path.display()))?;
        env.vars.insert("JOBQ_CONFIG".into(), path.display().to_string());
    }
    let mut results = Vec::new();
    let scenarios = async {
        for s in &chosen {
            env.reset().await?;
            let r = match *s {
                "enqueue-lib" => enqueue_lib(&env, &args).await?,
                "enqueue-api" => enqueue_api(&env, &args).await?,
                "drain" => drain(&env, &args).await?,
                "mixed" => mixed(&env, &args).await?,
                "soak" => soak(&env, &args).await?,
                _ => latency(&env).await?,
            };
            println!("{r}");
            results.push(r);
        }
        Ok(())
    };
    // Interrupted, the scenario is dropped (its processes are killed with it) and the
    // namespace and database are removed all the same.
    let outcome: anyhow::Result<()> = tokio::select! {
        r = scenarios => r,
        () = jobq_core::shutdown::signal() => {
            tokio::spawn(async {
                jobq_core::shutdown::signal().await;
                eprintln!("second signal: exiting now; the bench namespace and database may be left");
                std::process::exit(130);
            });
            // What the stopped scenario had sent Redis lands before the namespace is purged.
            tokio::time::sleep(Duration::from_secs(1)).await;
            Err(anyhow::anyhow!("interrupted; the bench namespace and database are removed"))
        }
    };
    env.cleanup(&admin_url(&settings.database.url)).await;
    outcome?;
    println!();
    println!("{:<12} {:>10} {:>14}  details", "scenario", "jobs", "jobs/s");
    for r in &results {
        let rate = r.get("jobs_per_s").map(|v| v.to_string()).unwrap_or_else(|| "-".into());
        let mut details: Vec<String> = r
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, _)| !matches!(k.as_str(), "scenario" | "n" | "jobs_per_s"))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        details.sort();
        println!("{:<12} {:>10} {:>14}  {}", r["scenario"].as_str().unwrap_or(""), r["n"], rate, details.join(" "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn a_process_that_exited_fails_the_scenario() {
        let mut procs = vec![tokio::process::Command::new("sleep").arg("5").kill_on_drop(true).spawn().unwrap()];
        super::alive(&mut procs).unwrap();
        procs.push(tokio::process::Command::new("false").spawn().unwrap());
        procs[1].wait().await.unwrap();
        let err = super::alive(&mut procs).unwrap_err().to_string();
        assert!(err.contains("jobq-worker exited"), "{err}");
    }

    #[test]
    fn a_free_port_is_bindable_and_outside_the_ephemeral_range() {
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
        let low: u16 = range.split_whitespace().next().unwrap().parse().unwrap();
        for _ in 0..20 {
            let port = super::free_port().unwrap();
            assert!((10_000..low).contains(&port), "{port} not below {low}");
            std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        }
    }
}
